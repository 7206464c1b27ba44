"""arXiv summarization (TFDS `scientific_papers/arxiv`), the paper's downstream task.

docs/paper.md §5 (trax's `scientific_papers_terraformer.gin`): `scientific_papers/arxiv:1.1.1`,
article -> abstract; the article truncated to 15,359 tokens plus EOS and padded to 15,360, the
abstract to 1,023 plus EOS and padded to 1,024; batch 32; T5's 32k SentencePiece vocabulary.
(trax's config appends 0 rather than EOS to the article; here both sides end in `EOS_ID`.)
tfds 4.9.10's builder is at 1.1.1 (and supports 1.1.0).

The data must be prepared beforehand (`tfds_source.py`): `tfds build
scientific_papers/arxiv:1.1.1 --data_dir=DIR` on a machine with network, then copy
`DIR/scientific_papers/arxiv/1.1.1` into this machine's `data_dir`. Pass the paper's vocabulary
as `spm_path`, or a model is trained on the lines of the first `vocab_sample_docs` train
articles and abstracts and cached (`vocab.py`).
"""
import gin

from sparse_scaling.data import pipeline
from sparse_scaling.data import tfds_source

ARXIV_VERSION = '1.1.1'  # Paper §5.
VOCAB_SIZE = 32000  # Paper §5.
BATCH_SIZE = 32  # Paper §5.
INPUTS_LEN = 15360  # Paper §5: 15,359 article tokens + EOS.
TARGETS_LEN = 1024  # Paper §5: 1,023 abstract tokens + EOS.
VOCAB_SAMPLE_DOCS = 1000  # Articles (with their abstracts), about 40 MB.
_KEYS = ('article', 'abstract')


@gin.configurable(module='sparse_scaling.data')
def arxiv_summarization_inputs(batch_size=BATCH_SIZE, inputs_len=INPUTS_LEN,
                               targets_len=TARGETS_LEN, vocab_size=VOCAB_SIZE, data_dir=None,
                               version=ARXIV_VERSION, spm_path=None, seed=0, cache_dir=None,
                               vocab_sample_docs=VOCAB_SAMPLE_DOCS):
  """Returns trax `Inputs` of arXiv article -> abstract pairs for the encoder-decoder.

  Args:
    batch_size: examples per batch, over all devices (divisible by the streams' `n_devices`).
    inputs_len: padded article length; longer articles keep their first `inputs_len - 1` tokens.
    targets_len: padded abstract length; longer abstracts keep their first `targets_len - 1`.
    vocab_size: the model's vocabulary (SentencePiece pieces).
    data_dir: TFDS data directory holding the prepared `scientific_papers/arxiv/<version>`;
      None for TFDS's default.
    version: version of `scientific_papers/arxiv`.
    spm_path: a SentencePiece model to use instead of training one.
    seed: seed of the train shuffling.
    cache_dir: where a trained vocabulary is cached; see `vocab.load_or_train_vocab`.
    vocab_sample_docs: train examples a vocabulary is trained on.

  Returns:
    A `trax.data.inputs.Inputs` whose infinite streams yield `(inputs [batch_size, inputs_len],
    targets [batch_size, targets_len], weights [batch_size, targets_len])`: int32 ids padded with
    0, each side ending in `EOS_ID`; float32 weights 1 on abstract tokens incl. EOS, 0 on
    padding. Train reads shuffled `train`, eval reads `validation` in order.

  Raises:
    FileNotFoundError: if the dataset is not prepared under `data_dir`.
  """
  name = f'scientific_papers/arxiv:{version}'
  splits = {'train': tfds_source.opener(name, 'train', data_dir, seed),
            'validation': tfds_source.opener(name, 'validation', data_dir)}

  def batches(split):
    sp = tfds_source.vocab(name, _KEYS, vocab_size, data_dir, spm_path, cache_dir,
                           vocab_sample_docs)
    pairs = ((sp.encode(article), sp.encode(abstract))
             for article, abstract in tfds_source.texts(splits[split](), _KEYS))
    yield from pipeline.pair_batches(pairs, batch_size, inputs_len, targets_len)

  return pipeline.make_inputs(batch_size, lambda: batches('train'),
                              lambda: batches('validation'))
