"""Argument checks shared by the layers and models: one-line ValueErrors naming the parameter."""

MODES = ('train', 'eval', 'predict')


def check_positive_int(name, value):
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')


def check_divides(small_name, small, big_name, big):
  if not isinstance(small, int) or small < 1 or big % small:
    raise ValueError(f'{small_name} ({small}) must divide {big_name} ({big})')


def check_mode(mode):
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')


def check_chunks(name, what, length, chunk_len):
  """`length` (`what`, the lengths in `name`) fills whole chunks of chunked or LSH attention,
  which reads chunks of `chunk_len` positions (None: any length)."""
  if chunk_len and length % chunk_len:
    raise ValueError(f'{name}: chunked and LSH attention read chunks of {chunk_len} positions, '
                     f'so {what} must be a multiple of {chunk_len}, got {length}')
