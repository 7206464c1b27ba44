"""Every read-bandwidth probe behind the floors, and streaming sums' shares side by side.

  python -m sparse_scaling.bench.bandwidth [--shares 4096:4:1024:8,2048:4:1024:4]
      [--rows 9216] [--columns 40960] [--rounds 2]

Table 1, the decode profile and `products` divide the bytes a token reads by the best rate of
`timing.bandwidth_probes`, so a floor is only as low as the fastest probe is fast. This prints
every probe's rate as those programs measure it. With --shares it also times streaming sums
(`timing.stream_sums`, x read in turn by the programs) of those shares, each
`width:rows:programs:warps`, side by side with XLA's vector-matrix product: 20 passes
(`timing.ACCELERATOR_PASSES`) in one compiled loop each, over a float32 array [--rows,
--columns] (by default the 17B FF layer's weight, 1.5 GB), in alternating rounds. On a CPU the
streaming sums run in Pallas' interpreter (the tests do so), and their rates say nothing of a
GPU's.
"""

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

from sparse_scaling.bench import common
from sparse_scaling.bench import timing
from sparse_scaling.layers import decode_kernels

XLA = 'XLA vector-matrix product'


def parse_shares(specs):
  """[(width, rows, programs, warps)] of --shares' `width:rows:programs:warps` items, each a
  power of 2."""
  shares = []
  for spec in specs:
    parts = spec.split(':')
    if not (len(parts) == 4 and all(p.isdigit() and decode_kernels.is_power_of_2(int(p))
                                    for p in parts)):
      raise app.UsageError(f'--shares: {spec!r} must be width:rows:programs:warps, each a '
                           'power of 2, e.g. 4096:4:1024:8')
    shares.append(tuple(int(p) for p in parts))
  return shares


def share_name(width, rows, programs, warps):
  return f'streaming sum, {width} columns, {rows} rows, {programs} programs, {warps} warps'


def measure_shares(shares, shape, rounds, on_row=print, min_runs=5):
  """Rows {round, form, rate (bytes/s)}: XLA's vector-matrix product and each share's
  streaming sum over x of `shape`, looped, every form timed in each of `rounds` rounds in
  turn; each row handed to `on_row` as it is measured. A share that does not divide x's rows
  of its width is refused first, in one line."""
  x = jnp.asarray(np.random.RandomState(0).rand(*shape).astype(np.float32))
  forms = {XLA: timing.probe_passes(x)['vector-matrix product']}
  for width, rows, programs, warps in shares:
    if x.size % (width * rows):
      raise ValueError(f'--shares: {width}:{rows}:{programs}:{warps}: x has {x.size} '
                       f'elements, not a whole number of {rows} rows of {width}')
    forms[share_name(width, rows, programs, warps)] = timing.stream_pass(
        x, width=width, rows=rows, programs=programs, warps=warps)
  forms = {name: (timing.looped(one_pass), first) for name, (one_pass, first, _) in forms.items()}
  out = []
  for r in range(rounds):
    for name, (fn, carry) in forms.items():
      seconds = timing.time_call(fn, x, carry, min_runs=min_runs, min_seconds=0.1)[0]
      out.append(dict(round=r, form=name,
                      rate=timing.ACCELERATOR_PASSES * x.nbytes / seconds))
      on_row(out[-1])
  return out


def define_flags():
  """Defines the command line's flags; only when run as a program."""
  flags.DEFINE_list('shares', [], 'Streaming sums to time side by side with XLA\'s product, '
                    'each width:rows:programs:warps (powers of 2).')
  flags.DEFINE_integer('rows', 9216, 'Rows of the array the shares read.', lower_bound=1)
  flags.DEFINE_integer('columns', 40960, 'Columns of the array the shares read.', lower_bound=1)
  flags.DEFINE_integer('rounds', 2, 'Rounds of the shares\' alternation.', lower_bound=1)


def main(argv):
  del argv
  args = flags.FLAGS
  shares = parse_shares(args.shares)
  print(f'Machine: {timing.machine_description()}.', flush=True)
  print(common.table_header(['probe', 'TB/s']), flush=True)
  for name, rate in timing.bandwidth_probes().items():
    print(common.table_row([name, f'{rate / 1e12:.3f}']), flush=True)
  if not shares:
    return
  print(f'\nx [{args.rows}, {args.columns}] float32, {timing.ACCELERATOR_PASSES} passes in one '
        'compiled loop a call.', flush=True)
  print(common.table_header(['round', 'form', 'TB/s']), flush=True)
  try:
    measure_shares(shares, (args.rows, args.columns), args.rounds, on_row=lambda row: print(
        common.table_row([row['round'], row['form'], f"{row['rate'] / 1e12:.3f}"]),
        flush=True))
  except ValueError as error:
    raise app.UsageError(str(error)) from None


if __name__ == '__main__':
  common.run(main, define_flags)
