"""SentencePiece vocabularies trained locally and cached as `.model` files.

Only the `sentencepiece` package is used (no GCS, no `t5`). The model is BPE: on the embedded
corpus's train split (4.6 MB) a 4096-piece vocabulary trains in about half a second, and the
same text always gives the same model. Ids follow the T5 convention that trax expects:

  * `PAD_ID = 0` (`<pad>`), `EOS_ID = 1` (`</s>`), `UNK_ID = 2` (`<unk>`); BOS is disabled
    (`bos_id() == -1`).
  * id 3 is the newline, a user-defined piece, so line breaks survive tokenization.
  * ids 4-259 are the byte pieces `<0x00>`..`<0xFF>` (byte fallback): characters never seen in
    training still encode losslessly, and `vocab_size` must leave room for them.

Text is not normalized (identity rule, all whitespace kept), so `decode(encode(s)) == s`.

A model is cached as `<cache_dir>/<corpus_name>_<vocab_size>_<options hash>.model`, where
`cache_dir` defaults to `$SPARSE_SCALING_CACHE`, else `~/.cache/sparse_scaling`, and the hash
covers the training options below, so changing them never loads a stale model. It is written to
a temporary file in the same directory and renamed into place, so a concurrent or killed run
never leaves a half-written model.
"""
import contextlib
import hashlib
import io
import os
import pathlib
import re
import tempfile

from absl import logging
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# Options that determine the trained model; their hash is part of the cache file name.
_TRAINER_OPTIONS = dict(
    model_type='bpe',
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    user_defined_symbols=['\n'],
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    byte_fallback=True,
    character_coverage=1.0,
    # Larger corpora are subsampled to this many paragraphs; the embedded train split has
    # ~35k, so it is used whole.
    input_sentence_size=1_000_000,
    shuffle_input_sentence=True,
)
_OPTIONS_HASH = hashlib.sha256(
    repr(sorted(_TRAINER_OPTIONS.items())).encode()).hexdigest()[:8]


def load_or_train_vocab(corpus_name, texts_fn, vocab_size, cache_dir=None):
  """Returns the cached SentencePiece model of a corpus, training it first on a cache miss.

  Args:
    corpus_name: names the text that `texts_fn` returns (e.g. `'shakespeare_train'`); part of
      the cache key, so different texts need different names.
    texts_fn: called without arguments, only on a cache miss; returns an iterable of documents
      (str). Their paragraphs (split at blank lines) are SentencePiece's training sentences.
    vocab_size: number of pieces, the reserved ids above included.
    cache_dir: directory of the `.model` files; defaults to `$SPARSE_SCALING_CACHE`, else
      `~/.cache/sparse_scaling`.

  Returns:
    A `sentencepiece.SentencePieceProcessor`.
  """
  cache_dir = pathlib.Path(
      cache_dir or os.environ.get('SPARSE_SCALING_CACHE') or '~/.cache/sparse_scaling')
  path = cache_dir.expanduser() / f'{corpus_name}_{vocab_size}_{_OPTIONS_HASH}.model'
  if not path.exists():
    _train(texts_fn(), vocab_size, path)
  return spm.SentencePieceProcessor(model_file=str(path))


def _train(texts, vocab_size, path):
  """Trains a model on the paragraphs of `texts` and writes it atomically to `path`."""
  logging.info('Training a %d-piece SentencePiece vocabulary into %s', vocab_size, path)
  n_paragraphs = 0

  def paragraphs():
    nonlocal n_paragraphs
    for text in texts:
      for paragraph in text.split('\n\n'):
        if paragraph.strip():
          n_paragraphs += 1
          yield paragraph

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=paragraphs(), model_writer=model, vocab_size=vocab_size,
        minloglevel=2, **_TRAINER_OPTIONS)
  except RuntimeError as error:  # SentencePiece's checks, e.g. too little text for the size
    # 'INTERNAL: src/trainer_interface.cc(744) [check] Vocabulary size too high (4096). ...'
    why = re.sub(r'^\w+: \S+\(\d+\) \[.*?\] ', '', ' '.join(str(error).split()))
    why = why if n_paragraphs else 'there is no text'
    raise ValueError(f'SentencePiece cannot train a {vocab_size}-piece vocabulary for '
                     f'{path.name} ({why}): give it more text, a smaller vocab_size, or a '
                     'trained model (spm_path)') from None
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=path.parent, prefix=f'{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(model.getvalue())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp_path)
