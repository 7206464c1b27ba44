"""C4 (TFDS `c4/en`) as in the paper: span corruption for the encoder-decoder, and an LM stream.

docs/paper.md §5: C4 `c4/en:2.3.0`, T5 span corruption (noise density 0.15, mean span 3),
inputs 512 and targets 256 (trax's `c4_trax_data.gin`), batch 32, a 32k SentencePiece vocabulary.
tfds 4.9.10's C4 builder is at version 3.1.0 and still supports 2.3.1, 2.3.0, 2.2.1 and 2.2.0;
`C4_VERSION` is 3.1.0, and `version='2.3.0'` selects the paper's.

The data must be prepared beforehand (`tfds_source.py`: nothing here downloads). C4 is built
from Common Crawl with Apache Beam, which TFDS recommends running on a distributed service:
`tfds build c4/en:3.1.0 --data_dir=DIR` on a machine with network, then copy `DIR/c4/en/3.1.0`
into this machine's `data_dir`.

Vocabulary: the paper used T5's `cc_all.32000` SentencePiece model; pass a local copy as
`spm_path` (with `vocab_size=32100` for span corruption: 32,000 pieces plus T5's 100 sentinels).
Without it a model is trained on the lines of the first `vocab_sample_docs` train documents and
cached (`vocab.py`).

Documents are concatenated with `EOS_ID` after each and cut into windows (`pipeline.py`):
`seq_len` tokens for LM, `span_corruption.raw_length(inputs_len, targets_len)` for span
corruption (568 for 512/256). Batch formats are those of `pipeline.py`.
"""
import gin
import numpy as np

from sparse_scaling.data import pipeline
from sparse_scaling.data import span_corruption
from sparse_scaling.data import tfds_source

C4_VERSION = '3.1.0'  # tfds 4.9.10's default; the paper used 2.3.0.
VOCAB_SIZE = 32000  # Paper §5, c4_trax_data.gin.
BATCH_SIZE = 32  # Paper §5 ("batch_size 4 per chip", 8 chips).
INPUTS_LEN = 512  # c4_trax_data.gin: PadToLength({0: 512, 1: 256}).
TARGETS_LEN = 256
VOCAB_SAMPLE_DOCS = 10_000  # About 20 MB of C4 text.
_KEYS = ('text',)


@gin.configurable(module='sparse_scaling.data')
def c4_lm_inputs(batch_size=BATCH_SIZE, seq_len=INPUTS_LEN, vocab_size=VOCAB_SIZE,
                 data_dir=None, version=C4_VERSION, spm_path=None, seed=0, cache_dir=None,
                 vocab_sample_docs=VOCAB_SAMPLE_DOCS):
  """Returns trax `Inputs` for language modeling on C4's `text`.

  Args:
    batch_size: examples per batch, over all devices (divisible by the streams' `n_devices`).
    seq_len: tokens per example.
    vocab_size: the model's vocabulary (SentencePiece pieces).
    data_dir: TFDS data directory holding the prepared `c4/en/<version>`; None for TFDS's
      default.
    version: version of `c4/en`.
    spm_path: a SentencePiece model to use instead of training one.
    seed: seed of the train shuffling.
    cache_dir: where a trained vocabulary is cached; see `vocab.load_or_train_vocab`.
    vocab_sample_docs: train documents a vocabulary is trained on.

  Returns:
    A `trax.data.inputs.Inputs` whose infinite streams yield `(inputs, targets, weights)`, each
    `[batch_size, seq_len]`: `inputs is targets` (int32 ids of packed documents, `EOS_ID` after
    each) and float32 ones. Train reads shuffled `train`, eval reads `validation` in order.

  Raises:
    FileNotFoundError: if the dataset is not prepared under `data_dir`.
  """
  name = f'c4/en:{version}'
  splits = _load(name, data_dir, seed)

  def batches(split):
    sp = tfds_source.vocab(name, _KEYS, vocab_size, data_dir, spm_path, cache_dir,
                           vocab_sample_docs)
    docs = pipeline.encode(sp, (text for (text,) in tfds_source.texts(splits[split](), _KEYS)))
    yield from pipeline.lm_batches(pipeline.packed_windows(docs, seq_len), batch_size)

  return pipeline.make_inputs(batch_size, lambda: batches('train'),
                              lambda: batches('validation'))


@gin.configurable(module='sparse_scaling.data')
def c4_span_corruption_inputs(batch_size=BATCH_SIZE, inputs_len=INPUTS_LEN,
                              targets_len=TARGETS_LEN, vocab_size=VOCAB_SIZE,
                              noise_density=span_corruption.NOISE_DENSITY,
                              mean_noise_span_length=span_corruption.MEAN_NOISE_SPAN_LENGTH,
                              data_dir=None, version=C4_VERSION, spm_path=None, seed=0,
                              cache_dir=None, extra_ids=span_corruption.EXTRA_IDS,
                              vocab_sample_docs=VOCAB_SAMPLE_DOCS):
  """Returns trax `Inputs` for T5 span corruption on C4 (the paper's pretraining objective).

  Args:
    batch_size: examples per batch, over all devices (divisible by the streams' `n_devices`).
    inputs_len: padded length of the encoder inputs.
    targets_len: padded length of the decoder targets.
    vocab_size: the model's vocabulary: at most `vocab_size - extra_ids` SentencePiece pieces,
      then the sentinels.
    noise_density: fraction of each window that is noise.
    mean_noise_span_length: mean tokens per noise span.
    data_dir: TFDS data directory holding the prepared `c4/en/<version>`; None for TFDS's
      default.
    version: version of `c4/en`.
    spm_path: a SentencePiece model to use instead of training one.
    seed: seed of the train shuffling and noise masks (eval uses a fixed mask seed).
    cache_dir: where a trained vocabulary is cached; see `vocab.load_or_train_vocab`.
    extra_ids: sentinel ids reserved at the top of the vocabulary.
    vocab_sample_docs: train documents a vocabulary is trained on.

  Returns:
    A `trax.data.inputs.Inputs` whose infinite streams yield `(inputs [batch_size, inputs_len],
    targets [batch_size, targets_len], weights [batch_size, targets_len])`: int32 ids padded with
    0 and ending in `EOS_ID`; float32 weights 1 on target tokens incl. EOS, 0 on padding.

  Raises:
    FileNotFoundError: if the dataset is not prepared under `data_dir`.
    ValueError: if the lengths fit no window or `extra_ids` is too small.
  """
  length = span_corruption.raw_length(inputs_len, targets_len, noise_density,
                                      mean_noise_span_length)
  span_corruption.check_sentinels(length, extra_ids, noise_density, mean_noise_span_length)
  name = f'c4/en:{version}'
  splits = _load(name, data_dir, seed)

  def batches(split, noise_seed):
    sp = tfds_source.vocab(name, _KEYS, vocab_size - extra_ids, data_dir, spm_path, cache_dir,
                           vocab_sample_docs)
    docs = pipeline.encode(sp, (text for (text,) in tfds_source.texts(splits[split](), _KEYS)))
    yield from span_corruption.span_corruption_batches(
        pipeline.packed_windows(docs, length), np.random.default_rng(noise_seed), batch_size,
        inputs_len, targets_len, vocab_size, noise_density, mean_noise_span_length)

  return pipeline.make_inputs(batch_size, lambda: batches('train', (seed, 1)),
                              lambda: batches('validation', 0))


def _load(name, data_dir, seed):
  """Opens C4's shuffled train and ordered validation splits (raising now if missing)."""
  return {'train': tfds_source.opener(name, 'train', data_dir, seed),
          'validation': tfds_source.opener(name, 'validation', data_dir)}
