"""A corpus tokenized once into uint16 shards that travel to the GPU machine, and their inputs.

`python -m sparse_scaling.data.make_token_files --source rfc --output_dir .data/rfc_tokens
--vocab_size 8192` (`make_token_files.py`) calls `write_token_files`, which writes to
`output_dir`:

  * `train-NNNNN.npy`, `validation-NNNNN.npy`: 1-D uint16 token ids (numpy's .npy format), the
    split's documents in a fixed shuffled order (seed `ORDER_SEED`), each followed by `EOS_ID`.
    A shard holds at most `--shard_tokens` tokens (train) or `--validation_shard_tokens`
    (validation) and ends at a document boundary unless one document alone is longer.
  * `vocab.model`: the SentencePiece model that made the ids.
  * `manifest.json`: the source, its split rule, the vocabulary (pieces and sha256), and per
    split its shards with their tokens and documents and the totals.

The split is the source's, by whole documents (`rfc.split_of`: by RFC number, revisions kept
together; the embedded corpus: `corpus.VALIDATION_WORKS`). Shuffling the documents before
sharding makes every shard a sample of the whole split, so the first shards can travel alone.
The files hold the corpus's text in another form: keep them out of git (the RFCs' licence
allows verbatim copying only).

`token_file_lm_inputs` reads the first `train_shards` and `validation_shards` shards, the same
files on every machine: train batches are the non-overlapping `seq_len` windows of the train
tokens in a new random order each epoch (seeded), so no token is seen k + 1 times before every
window has been seen k times; eval batches are the consecutive windows of the validation tokens
(or of their first `eval_windows`), cycled, so every eval stream yields the same batches.
"""

import hashlib
import json
import pathlib

import gin
import numpy as np

from sparse_scaling.data import lm
from sparse_scaling.data import pipeline
from sparse_scaling.data import vocab as vocab_lib

MANIFEST = 'manifest.json'
VOCAB_FILE = 'vocab.model'
FORMAT = 1  # the manifest's `format`; bump when the layout changes
SPLITS = ('train', 'validation')
ORDER_SEED = 0
# 12M uint16 tokens (24 MB) a train shard: two travel with a 2M-token validation shard (4 MB)
# in under 64 MiB (a GPU machine's carry).
SHARD_TOKENS = 12_000_000
VALIDATION_SHARD_TOKENS = 2_000_000
MAX_ID = np.iinfo(np.uint16).max


def write_token_files(output_dir, splits, sp, source, split_rule,
                      shard_tokens=SHARD_TOKENS, validation_shard_tokens=VALIDATION_SHARD_TOKENS,
                      max_tokens=None):
  """Tokenizes the documents of each split into shards, writes the vocabulary and manifest.

  Args:
    output_dir: created if absent; existing shards of the same names are overwritten.
    splits: {'train': docs, 'validation': docs}; a doc is a str or a function returning one
      (read lazily, one at a time).
    sp: the `sentencepiece.SentencePieceProcessor` (at most 65,536 pieces).
    source: names the corpus in the manifest.
    split_rule: how documents were assigned to splits, for the manifest.
    shard_tokens: most tokens in a train shard.
    validation_shard_tokens: most tokens in a validation shard.
    max_tokens: None, or stop a split after the shard that reaches this many tokens.

  Returns:
    The manifest (a dict), also written as `output_dir/manifest.json`.

  Raises:
    ValueError: with a one-line message, for a vocabulary too large for uint16, a shard size
      below 1 or a split with no documents.
  """
  if sp.get_piece_size() > MAX_ID + 1:
    raise ValueError(f'the vocabulary has {sp.get_piece_size()} pieces; uint16 shards hold at '
                     f'most {MAX_ID + 1}')
  for name, value in (('shard_tokens', shard_tokens),
                      ('validation_shard_tokens', validation_shard_tokens)):
    if value < 1:
      raise ValueError(f'{name}={value}: give at least 1 token a shard')
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  model = sp.serialized_model_proto()
  (output_dir / VOCAB_FILE).write_bytes(model)
  manifest = dict(
      format=FORMAT, source=source, split_rule=split_rule, dtype='uint16', eos_id=vocab_lib.EOS_ID,
      order=f'documents shuffled by numpy default_rng({ORDER_SEED}).permutation, per split',
      vocab=dict(file=VOCAB_FILE, pieces=sp.get_piece_size(),
                 sha256=hashlib.sha256(model).hexdigest()),
      shards={}, tokens={}, documents={})
  for split in SPLITS:
    docs = list(splits[split])
    if not docs:
      raise ValueError(f'splits[{split!r}] has no documents')
    limit = shard_tokens if split == 'train' else validation_shard_tokens
    order = np.random.default_rng(ORDER_SEED).permutation(len(docs))
    shards = _write_split(output_dir, split, (docs[i] for i in order), sp, limit, max_tokens)
    manifest['shards'][split] = shards
    manifest['tokens'][split] = sum(shard['tokens'] for shard in shards)
    manifest['documents'][split] = sum(shard['documents'] for shard in shards)
  (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + '\n')
  return manifest


def _write_split(output_dir, split, docs, sp, limit, max_tokens):
  """Writes one split's shards; returns their manifest entries."""
  shards, pending, n_pending, n_docs, total = [], [], 0, 0, 0

  def flush():
    nonlocal pending, n_pending, n_docs
    name = f'{split}-{len(shards):05d}.npy'
    np.save(output_dir / name, np.concatenate(pending).astype(np.uint16))
    shards.append(dict(file=name, tokens=n_pending, documents=n_docs))
    pending, n_pending, n_docs = [], 0, 0

  for doc in docs:
    text = doc() if callable(doc) else doc
    ids = np.array(sp.encode(text) + [vocab_lib.EOS_ID], np.int64)
    if n_pending and n_pending + len(ids) > limit:
      flush()
      if max_tokens is not None and total >= max_tokens:
        return shards
    pending.append(ids)
    n_pending += len(ids)
    n_docs += 1
    total += len(ids)
  if pending:
    flush()
  return shards


def read_manifest(path):
  """The manifest of the token files in directory `path`.

  Raises:
    FileNotFoundError: (one line) if `path/manifest.json` does not exist.
    ValueError: (one line) if it is not this module's format.
  """
  file = pathlib.Path(path) / MANIFEST
  if not file.is_file():
    raise FileNotFoundError(f'path={str(path)!r} has no {MANIFEST}; write the token files with '
                            'python -m sparse_scaling.data.make_token_files')
  manifest = json.loads(file.read_text())
  if manifest.get('format') != FORMAT:
    raise ValueError(f'{file}: format {manifest.get("format")!r}, expected {FORMAT}')
  return manifest


def load_tokens(path, split, n_shards=None):
  """The first `n_shards` shards (None: all) of a split, concatenated: 1-D uint16.

  Raises:
    FileNotFoundError, ValueError: one line each, for a missing manifest or shard file, or
      `n_shards` outside [1, the split's shards].
  """
  manifest = read_manifest(path)
  shards = manifest['shards'][split]
  n_shards = len(shards) if n_shards is None else n_shards
  if not 1 <= n_shards <= len(shards):
    raise ValueError(f'{split}_shards={n_shards}: {path} has {len(shards)} {split} shards')
  arrays = []
  for shard in shards[:n_shards]:
    file = pathlib.Path(path) / shard['file']
    if not file.is_file():
      raise FileNotFoundError(f'{split}_shards={n_shards} needs {file}, which is missing (carry '
                              'it with the manifest)')
    array = np.load(file, mmap_mode='r')
    if array.dtype != np.uint16 or array.shape != (shard['tokens'],):
      raise ValueError(f'{file}: {array.dtype} {array.shape}, the manifest says uint16 '
                       f'({shard["tokens"]},)')
    arrays.append(array)
  return np.concatenate(arrays)


def shuffled_window_starts(n_tokens, length, batch_size, seed):
  """Yields, forever, `[batch_size]` offsets of the non-overlapping `length`-windows of
  `n_tokens`, every window once per epoch, in a new order each epoch (numpy's default_rng(seed));
  a batch may span two epochs."""
  n_windows = n_tokens // length
  if n_windows < 1:
    raise ValueError(f'n_tokens={n_tokens} holds no window of length={length}')
  rng = np.random.default_rng(seed)
  order, position = rng.permutation(n_windows), 0
  while True:
    batch = []
    while len(batch) < batch_size:
      take = order[position:position + batch_size - len(batch)]
      batch.extend(take)
      position += len(take)
      if position == n_windows:
        order, position = rng.permutation(n_windows), 0
    yield length * np.array(batch, np.int64)  # [batch_size]


@gin.configurable(module='sparse_scaling.data')
def token_file_lm_inputs(path, batch_size=8, seq_len=128, vocab_size=lm.VOCAB_SIZE,
                         train_shards=None, validation_shards=None, eval_windows=None, seed=0):
  """Returns trax `Inputs` for language modeling on token files (see the module docstring).

  Args:
    path: the directory of `manifest.json` and the shards.
    batch_size: examples per batch, over all devices (divisible by the streams' `n_devices`).
    seq_len: tokens per example.
    vocab_size: the model's vocabulary; must equal the token files' pieces.
    train_shards: how many train shards to read, from the first (None: all).
    validation_shards: the same for validation.
    eval_windows: None, or the eval stream cycles through only the first `eval_windows`
      windows: with `eval_steps * batch_size` of them every evaluation reads the same tokens
      (trax's evaluations go on reading one stream), also after resuming from a checkpoint.
    seed: seed of the train windows' order.

  Returns:
    A `trax.data.inputs.Inputs` whose infinite streams yield `(inputs, targets, weights)`, each
    `[batch_size, seq_len]`: `inputs is targets` (int32 ids) and float32 ones.

  Raises:
    FileNotFoundError, ValueError: one line each, for a missing manifest or shard, a
      `vocab_size` other than the files' vocabulary, or a split shorter than one batch.
  """
  path = str(path)
  manifest = read_manifest(path)
  pieces = manifest['vocab']['pieces']
  if vocab_size != pieces:
    raise ValueError(f'vocab_size={vocab_size} does not match the token files\' vocabulary of '
                     f'{pieces} pieces ({pathlib.Path(path) / MANIFEST})')
  tokens = {'train': load_tokens(path, 'train', train_shards),
            'validation': load_tokens(path, 'validation', validation_shards)}
  for split, array in tokens.items():
    if len(array) // seq_len < batch_size:
      raise ValueError(f'seq_len={seq_len}, batch_size={batch_size}: the {split} tokens '
                       f'({len(array):,}) hold fewer than one batch of windows')
  if eval_windows is not None:
    if not batch_size <= eval_windows <= len(tokens['validation']) // seq_len:
      raise ValueError(f'eval_windows={eval_windows}: give from batch_size={batch_size} to the '
                       f'{len(tokens["validation"]) // seq_len} windows of seq_len={seq_len} '
                       'the validation tokens hold')
    tokens['validation'] = tokens['validation'][:eval_windows * seq_len]

  def batches(split, starts):
    for batch in lm.windows(tokens[split], starts, seq_len):
      batch = batch.astype(np.int32)  # [batch_size, seq_len]
      yield batch, batch, np.ones(batch.shape, np.float32)

  n_train, n_validation = len(tokens['train']), len(tokens['validation'])
  return pipeline.make_inputs(
      batch_size,
      lambda: batches('train', shuffled_window_starts(n_train, seq_len, batch_size, seed)),
      lambda: batches('validation', lm.consecutive_starts(n_validation, seq_len, batch_size)))
