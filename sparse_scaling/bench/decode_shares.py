"""How the fused blocks' work is shared among programs: a sweep, side by side.

  python -m sparse_scaling.bench.decode_shares [--shape 800m] [--variant ffqkv] [--depth 6]
      [--measure token] [--settings default,DOT=0,WIDTH=16,WARPS=8,ROWS=32,...]

`layers/sparse_qkv_block_kernel.py` splits a token's Sparse QKV block over programs by
module constants (its "shares"): ROWS input rows per multiplicative program, WIDTH channels
per convolution program, MODULES modules per convolution program, SPLIT modules per
multiplicative program, VALUE_WIDTH value columns per attention program, WARPS per program,
DOT (1: the multiplicative product as one matrix product) and MAX_PARTS (the most partial
sums the convolutions add themselves); `layers/sparse_ff_kernel.py` has FF_GROUP (blocks of N
units per program), FF_WARPS and FF_ROWS (rows of C1 per LayerNorm-controller program). For
each setting (NAME=value pairs joined by '+'; 'default' changes nothing) this builds the Table
1 decoder of `--variant` at `--shape` with `--depth` blocks (`decoders.py`, random weights,
batch 1, float32), and times one compiled generation (`--measure token`:
`table1.seconds_per_token_program`, a 128-token prompt, 32 tokens) or one block looped in a
compiled program (`--measure block`: `table1.seconds_per_block_program`, where the 17B
shape's output layer would hide the blocks), printing one Markdown row per setting as it is
measured. The constants are restored after each. The kernels run on GPUs only: elsewhere
every setting times XLA's path, and the program says so. Results: stdout (the README's
"Decoding on a GPU" quotes runs on an H200).
"""

import contextlib
import functools

from absl import app
from absl import flags
import jax

from sparse_scaling.bench import common
from sparse_scaling.bench import decoders
from sparse_scaling.bench import table1
from sparse_scaling.bench import timing
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers import sparse_qkv_block_kernel

# Setting name -> (module, constant).
SHARES = {**{name: (sparse_qkv_block_kernel, name)
             for name in ('ROWS', 'WIDTH', 'VALUE_WIDTH', 'WARPS', 'DOT', 'MODULES',
                          'MAX_PARTS', 'SPLIT')},
          'FF_GROUP': (sparse_ff_kernel, 'GROUP'), 'FF_WARPS': (sparse_ff_kernel, 'WARPS'),
          'FF_ROWS': (sparse_ff_kernel, 'NORM_ROWS')}
DEFAULT_SETTINGS = ['default', 'DOT=0', 'WIDTH=16', 'WARPS=8', 'ROWS=32', 'ROWS=128',
                    'VALUE_WIDTH=32', 'VALUE_WIDTH=64', 'WIDTH=16+WARPS=8']


def parse_setting(text):
  """'WIDTH=16+WARPS=8' -> {'WIDTH': 16, 'WARPS': 8}; 'default' -> {}. One-line ValueError
  naming the rule for anything else."""
  if text == 'default':
    return {}
  setting = {}
  for pair in text.split('+'):
    name, _, value = pair.partition('=')
    if name not in SHARES or not value.isdigit():
      raise ValueError(f'--settings: {pair!r} must be NAME=integer with NAME one of '
                       f'{list(SHARES)}')
    value = int(value)
    if (name == 'DOT' and value not in (0, 1)) or (name == 'MAX_PARTS' and value < 1) or (
        name not in ('DOT', 'MAX_PARTS') and not decode_kernels.is_power_of_2(value)):
      raise ValueError(f'--settings: {pair!r}: DOT is 0 or 1, MAX_PARTS positive, the others '
                       'powers of 2')
    setting[name] = bool(value) if name == 'DOT' else value
  return setting


@contextlib.contextmanager
def shares(setting):
  """Within the block, the kernels' constants take the setting's values."""
  before = {name: getattr(*SHARES[name]) for name in SHARES}
  try:
    for name, value in setting.items():
      setattr(*SHARES[name], value)
    yield
  finally:
    for name, value in before.items():
      setattr(*SHARES[name], value)


def per_block(model_fn, dtype, prompt, n_tokens):
  """`table1.seconds_per_block_program` with `table1.seconds_per_token_program`'s arguments."""
  del prompt
  return table1.seconds_per_block_program(model_fn(), dtype, n_tokens)


def sweep(shape, variant, depth, settings, measure=table1.seconds_per_token_program):
  """Seconds per token (or block) of each setting: [(text, seconds)], each printed as measured."""
  dims = decoders.dimensions(shape, variant)
  model_fn = functools.partial(decoders.build, 'ours', dims, depth, decoders.MAX_LEN)
  results = []
  for text in settings:
    with shares(parse_setting(text)):   # traced anew by each measurement
      seconds = measure(model_fn, 'float32', 128, 32)
    results.append((text, seconds))
    print(common.table_row([text, f'{seconds * 1e3:.4f}']), flush=True)
  return results


def define_flags():
  """Defines the command line's flags; only when run as a program."""
  flags.DEFINE_enum('shape', '800m', list(decoders.SHAPES), 'Table 1 shape.')
  flags.DEFINE_enum('variant', 'ffqkv', [v for v in decoders.VARIANTS if 'qkv' in v],
                    'Table 1 variant (one with Sparse QKV).')
  flags.DEFINE_integer('depth', 6, 'Blocks of the decoder timed (--measure token).',
                       lower_bound=1)
  flags.DEFINE_enum('measure', 'token', ['token', 'block'], 'Time one compiled generation '
                    'per token, or the first block looped in a compiled program.')
  flags.DEFINE_list('settings', DEFAULT_SETTINGS,
                    f'Settings: NAME=value pairs joined by "+", NAME one of {list(SHARES)}; '
                    '"default" for the constants as they are.')


def main(argv):
  del argv
  args = flags.FLAGS
  try:
    for text in args.settings:
      parse_setting(text)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  timed = (f'{args.depth} blocks, float32, one compiled generation of 32 tokens after 128'
           if args.measure == 'token' else 'float32, one block looped in a compiled program')
  print(f'Machine: {timing.machine_description()}. {args.variant} at {args.shape}, {timed}.')
  if jax.default_backend() != 'gpu':
    print('Not a GPU: the fused blocks do not run here, every setting times XLA\'s path.')
  print(common.table_header(['setting', f'ms/{args.measure}']))
  sweep(args.shape, args.variant, args.depth, args.settings,
        table1.seconds_per_token_program if args.measure == 'token' else per_block)


if __name__ == '__main__':
  common.run(main, define_flags)
