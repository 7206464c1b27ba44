"""Tokenizes a corpus once into the uint16 shards of `token_files.py`.

  python -m sparse_scaling.data.make_token_files --source rfc --output_dir .data/rfc_tokens \\
      --vocab_size 8192

Sources: `rfc`, Debian's doc-rfc (`rfc.py`: its split by RFC number and its vocabulary,
`rfc.vocab`, trained on a sample of the train RFCs), and `embedded`, the Shakespeare corpus
(`corpus.py`, `lm.embedded_vocab`; small, for trying the format). The output directory holds the
corpus's text in another form: keep it out of git (`.data/` is ignored).
"""

from absl import app
from absl import flags

from sparse_scaling.bench import common
from sparse_scaling.data import corpus
from sparse_scaling.data import lm
from sparse_scaling.data import rfc
from sparse_scaling.data import token_files


def _rfc_source(vocab_size, cache_dir):
  """(splits {split: [text thunk]}, sentencepiece model, split rule) of Debian's doc-rfc."""
  splits = {split: [lambda r=r: rfc.read_rfc(r) for r in rfc.documents(split)]
            for split in token_files.SPLITS}
  rule = ('rfc.split_of: RFCs linked by obsoletes/obsoleted_by form a group; validation when '
          "the group's smallest RFC number ends in 0")
  return splits, rfc.vocab(rfc.RFC_DIR, vocab_size, cache_dir), rule


def _embedded_source(vocab_size, cache_dir):
  """The same for the embedded Shakespeare corpus (small: for trying the format)."""
  splits = {split: corpus.shakespeare_texts(split) for split in token_files.SPLITS}
  rule = f'corpus.VALIDATION_WORKS: {", ".join(corpus.VALIDATION_WORKS)}'
  return splits, lm.embedded_vocab(vocab_size, cache_dir), rule


SOURCES = {'rfc': _rfc_source, 'embedded': _embedded_source}


def _define_flags():
  """The command line's flags; only when run as a program."""
  flags.DEFINE_enum('source', 'rfc', list(SOURCES), 'rfc: Debian doc-rfc; embedded: Shakespeare.')
  flags.DEFINE_string('output_dir', None, 'Where the shards, vocab.model and manifest go.',
                      required=True)
  flags.DEFINE_integer('vocab_size', 8192, 'SentencePiece pieces (the model\'s vocab_size).',
                       lower_bound=1)
  flags.DEFINE_integer('shard_tokens', token_files.SHARD_TOKENS, 'Most tokens in a train shard.',
                       lower_bound=1)
  flags.DEFINE_integer('validation_shard_tokens', token_files.VALIDATION_SHARD_TOKENS,
                       'Most tokens in a validation shard.', lower_bound=1)
  flags.DEFINE_integer('max_tokens', None, 'Stop a split after the shard reaching this many.',
                       lower_bound=1)
  flags.DEFINE_string('cache_dir', None, 'Vocabulary cache (vocab.load_or_train_vocab).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  splits, sp, rule = SOURCES[args.source](args.vocab_size, args.cache_dir)
  manifest = token_files.write_token_files(
      args.output_dir, splits, sp, args.source, rule, args.shard_tokens,
      args.validation_shard_tokens, args.max_tokens)
  for split in token_files.SPLITS:
    shards = manifest['shards'][split]
    sizes = ', '.join(f'{shard["tokens"]:,}' for shard in shards)
    print(f'{split}: {manifest["documents"][split]:,} documents, '
          f'{manifest["tokens"][split]:,} tokens in {len(shards)} shards ({sizes})')


if __name__ == '__main__':
  common.run(main, _define_flags)
