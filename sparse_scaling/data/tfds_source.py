"""Reading prepared TFDS text datasets offline, for `c4.py` and `arxiv.py`.

`tfds.load(..., download=False)` never touches the network: a dataset must already be prepared
under `data_dir` (default `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`). When it is not, the
loaders raise a one-line `FileNotFoundError` naming the dataset, the directory searched and the
command to prepare it on a machine with network (then copy the directory over).

Train splits are read with shuffled files and a shuffle buffer (both seeded, reshuffled each
epoch) and repeated; eval splits are read in file order and repeated. Each stream opens its split
anew, so every train stream of a seed, and every eval stream, yields the same examples.
Text features arrive as UTF-8 bytes and are decoded to str.

Tests use `tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE)`: it fakes examples
from the builder's code (features), so it needs neither data nor the metadata files that tfds
4.9.10 does not ship for c4 or scientific_papers.
"""
import functools
import itertools
import re

import tensorflow_datasets as tfds

from sparse_scaling.data import pipeline

SHUFFLE_BUFFER = 1024  # Examples; trax's `data.Shuffle()` default.


def load_split(name, split, data_dir=None, seed=None, repeat=True):
  """Opens a prepared TFDS split, checking at once that it exists.

  Args:
    name: `'dataset/config:version'`, e.g. `'c4/en:3.1.0'`.
    split: a TFDS split, e.g. `'train'`.
    data_dir: the TFDS data directory; None for TFDS's default.
    seed: None reads in order; an int shuffles files and examples with this seed.
    repeat: repeat forever (else one pass).

  Returns:
    A `tf.data.Dataset` of feature dicts. With a seed, each iteration of it is shuffled
    differently; open the split again (`opener`) to repeat an order.

  Raises:
    FileNotFoundError: if the dataset is not prepared under `data_dir`.
  """
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False,
                   shuffle_files=seed is not None,
                   read_config=tfds.ReadConfig(shuffle_seed=seed))
  except AssertionError as error:  # tfds: "Dataset c4: could not find data in <data_dir>."
    if 'could not find data' not in str(error):
      raise
    raise FileNotFoundError(missing_data_message(name, data_dir)) from None
  if seed is not None:
    ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed)
  return ds.repeat() if repeat else ds


def opener(name, split, data_dir=None, seed=None):
  """Checks now that a split is prepared and returns a function that opens it anew.

  Each call of the returned function gives a fresh `load_split(name, split, data_dir, seed)`,
  which yields the same examples in the same order (a reused dataset would reshuffle).
  """
  load_split(name, split, data_dir, seed)
  return functools.partial(load_split, name, split, data_dir, seed)


def texts(ds, keys):
  """Yields each example of `ds` as a tuple of the str values of its text features `keys`."""
  for example in tfds.as_numpy(ds):
    yield tuple(example[key].decode('utf-8') for key in keys)


def sample_texts(name, keys, n_examples, data_dir=None):
  """Returns the texts (all `keys`) of the first `n_examples` train examples, for a vocabulary."""
  examples = itertools.islice(
      texts(load_split(name, 'train', data_dir, repeat=False), keys), n_examples)
  return [text for example in examples for text in example]


def vocab(name, keys, n_pieces, data_dir=None, spm_path=None, cache_dir=None,
          n_examples=1000):
  """Returns the model at `spm_path`, else one trained on the first `n_examples` train examples.

  See `pipeline.vocab_for`; the cache key names the dataset, version and sample size.
  """
  corpus_name = re.sub(r'[^0-9A-Za-z.]+', '_', f'{name}_{"_".join(keys)}_{n_examples}')
  return pipeline.vocab_for(
      corpus_name, functools.partial(sample_texts, name, keys, n_examples, data_dir), n_pieces,
      cache_dir, spm_path)


def missing_data_message(name, data_dir=None):
  """Says what to download and where, in one line."""
  searched = data_dir or tfds.core.constants.get_default_data_dir()
  dataset_dir = name.replace(':', '/')
  return (f'TFDS dataset {name} is not prepared in data_dir={searched} (no network here); on a '
          f'machine with network run `tfds build {name} --data_dir=DIR` (or '
          f'tfds.builder({name!r}, data_dir=DIR).download_and_prepare()), then copy '
          f'DIR/{dataset_dir} to {searched}/{dataset_dir}')
