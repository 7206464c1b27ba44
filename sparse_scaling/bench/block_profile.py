"""Where one decoding step's time goes, layer by layer: the why behind Table 1's speedups.

  python -m sparse_scaling.bench.block_profile [--shapes 17b,800m] [--variants dense,ffqkv]
      [--impls ours,trax] [--depth 4] [--json]

Builds the one-block LM of each Table 1 variant (`decoders.build`, random weights of the table's
dtype, predict mode, KV caches of 168 positions as in Table 1) and walks its trax layer tree
down to `--depth`: every layer is jitted alone with its weights and state as arguments and
timed on the inputs it gets in the step (batch 1, one token; median of many calls). Beside the
time, XLA's own cost analysis of the compiled layer gives its floating-point operations, and
its jaxpr the bytes of weights, state and inputs it reads (of an array it only gathers from,
the gathered rows); the floor is the larger of bytes / read bandwidth and flops / matmul
rate, both measured in the same run. A layer far above its floor wastes time; a layer at a
compute floor cannot get faster by reading less.

The rows are the layers that take at least `--min_share` of the step, indented by depth.
Writes docs/results/block_profile.md.
"""

import json

from absl import app
from absl import flags
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from trax import layers as tl

from sparse_scaling import decoding
from sparse_scaling.bench import common
from sparse_scaling.bench import decoders
from sparse_scaling.bench import timing

PLUMBING = ('', 'Serial', 'Branch', 'Parallel')  # combinators that only route data


def matmul_rate(n=2048):
  """Float32 operations per second of a jitted [n, n] @ [n, n] product: the compute roof."""
  a = jnp.ones((n, n), jnp.float32)
  median, _ = timing.time_call(jax.jit(jnp.matmul), a, a, min_runs=10)
  return 2 * n ** 3 / median


def bytes_read(fn, *args):
  """Bytes of its arguments that a call of `fn` reads.

  An argument counts whole, unless every use of it (through reshapes and nested jitted
  functions) is the operand of a gather: then only the gathered elements count. XLA's cost
  analysis charges a gather its whole operand, which would price Sparse FF's d_ff/N gathered
  rows of W1 and W2 as all of them. A jitted `fn` is traced itself: JAX refuses to nest a jit
  that carries compiler options (the decoding programs' on a GPU, `decoding.jit`).
  """
  closed = fn.trace(*args).jaxpr if hasattr(fn, 'trace') else jax.make_jaxpr(fn)(*args)
  return sum(_read_per_input(closed.jaxpr))


def _nbytes(aval):
  return aval.size * aval.dtype.itemsize


def _read_per_input(jaxpr):
  """Bytes read of each input variable of `jaxpr` (see `bytes_read`)."""
  source = {var: i for i, var in enumerate(jaxpr.invars)}  # variable -> input it views
  gathered = [0] * len(jaxpr.invars)
  whole = [False] * len(jaxpr.invars)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'pallas_call':
      for position, reads in enumerate(_kernel_accesses(eqn)[0]):
        var = eqn.invars[position]
        i = source.get(var) if isinstance(var, jax.extend.core.Var) else None
        if i is not None:
          gathered[i] += reads
      continue
    inner = eqn.params.get('jaxpr')
    inner_reads = _read_per_input(inner.jaxpr) if hasattr(inner, 'jaxpr') else None
    for position, var in enumerate(eqn.invars):
      i = source.get(var) if isinstance(var, jax.extend.core.Var) else None
      if i is None:
        continue
      if eqn.primitive.name == 'reshape':
        source[eqn.outvars[0]] = i
      elif eqn.primitive.name == 'gather' and position == 0:
        gathered[i] += _nbytes(eqn.outvars[0].aval)
      elif inner_reads is not None:
        gathered[i] += inner_reads[position]
      else:
        whole[i] = True
  return [_nbytes(var.aval) if whole[i] else min(gathered[i], _nbytes(var.aval))
          for i, var in enumerate(jaxpr.invars)]


def _kernel_accesses(eqn):
  """(bytes loaded of each operand, bytes stored into each output) by a Pallas kernel's
  programs: what they load, not the whole arrays they could index. Every access of a program
  counts, once per program of the grid; an access in a branch that some programs take
  (`pl.when`) counts as if all took it."""
  kernel = eqn.params['jaxpr']
  programs = int(np.prod(eqn.params['grid_mapping'].grid))
  n_in = len(eqn.invars)
  loads, stores = [0] * n_in, [0] * (len(kernel.invars) - n_in)

  def visit(jaxpr, refs):   # refs: the jaxpr's variables -> the kernel's refs they are
    for inner in jaxpr.eqns:
      name = inner.primitive.name
      first = inner.invars[0] if inner.invars else None
      ref = refs.get(first) if isinstance(first, jax.extend.core.Var) else None
      if name in ('get', 'masked_load') and ref is not None and ref < n_in:
        loads[ref] += programs * _nbytes(inner.outvars[0].aval)
      elif name in ('swap', 'masked_swap') and ref is not None and ref >= n_in:
        stores[ref - n_in] += programs * _nbytes(inner.invars[1].aval)
      elif name == 'cond':
        for branch in inner.params['branches']:
          visit(branch.jaxpr, {var: refs[outer] for var, outer
                               in zip(branch.jaxpr.invars, inner.invars[1:])
                               if isinstance(outer, jax.extend.core.Var) and outer in refs})

  visit(kernel, {var: position for position, var in enumerate(kernel.invars)})
  return loads, stores


def pallas_bytes(closed_jaxpr):
  """Bytes moved by each Pallas kernel a traced program runs (`closed_jaxpr`, as
  `jax.make_jaxpr` or a jitted function's `.trace(...).jaxpr` give it): {(kernel function's
  name, programs): bytes}. Of each operand what its programs load, of each output what they store
  (`_kernel_accesses`), neither more than the array holds. A kernel's custom call in XLA's
  program names the same function and grid; its operands are whole arrays of which the kernel
  may read a part (Sparse FF's chosen rows)."""
  found = {}

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'pallas_call':
        loads, stores = _kernel_accesses(eqn)
        moved = sum(min(n, _nbytes(var.aval)) for n, var in zip(loads, eqn.invars))
        moved += sum(min(n, _nbytes(var.aval)) for n, var in zip(stores, eqn.outvars))
        name = getattr(getattr(eqn.params['jaxpr'], 'debug_info', None), 'func_name', None)
        found[name, int(np.prod(eqn.params['grid_mapping'].grid))] = moved
        continue
      for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(item, 'jaxpr', item)
          if hasattr(inner, 'eqns'):
            visit(inner)

  visit(closed_jaxpr.jaxpr)
  return found


def flop_count(lowered):
  """Floating-point operations of a lowered computation: XLA's count for the compiled program,
  or, where that is unknown (-1: on GPUs XLA cannot count what runs as a library call, a
  cuBLAS product; jax-ml/jax#16008), its count for the program before compilation."""
  flops = (lowered.compile().cost_analysis() or {}).get('flops', 0.0)
  if flops < 0:
    flops = (lowered.cost_analysis() or {}).get('flops', 0.0)
  return max(flops, 0.0)


def _as_args(values, n):
  """A layer's input: the array itself when it takes one, else the tuple."""
  return values[0] if n == 1 else tuple(values)


def _as_values(output, n):
  return (output,) if n == 1 else tuple(output)


def profile(layer, stack, depth, level=0, rng=None, min_runs=10, min_seconds=0.3):
  """Rows of `layer` and, `depth` levels down, of its sublayers, on the data stack `stack`.

  Combinator plumbing (unnamed layers, Serial, Branch, Parallel) gets no row of its own: its
  sublayers take its place, one level under the nearest named ancestor. Returns (rows, the
  stack after the layer). A row: layer, level, seconds, flops (XLA's cost analysis of the
  layer compiled alone) and bytes (`bytes_read`). `min_runs` and `min_seconds` go to
  `timing.time_call`.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  inputs = _as_args(stack[:layer.n_in], layer.n_in)
  run = decoding.jit(lambda x, w, s: layer.pure_fn(x, w, s, rng)[0], layer.weights)
  rows = []
  shown = level == 0 or layer.name not in PLUMBING
  if shown:
    flops = flop_count(run.lower(inputs, layer.weights, layer.state))
    seconds, _ = timing.time_call(run, inputs, layer.weights, layer.state, min_runs=min_runs,
                                  min_seconds=min_seconds)
    rows.append(dict(layer=layer.name, level=level, seconds=seconds, flops=flops,
                     bytes=bytes_read(run, inputs, layer.weights, layer.state)))
  inner_level = level + 1 if shown else level
  if inner_level <= depth and isinstance(layer, tl.Serial):
    outputs = tuple(stack[:layer.n_in])  # the sublayers' stack ends as the layer's outputs
    for sublayer in layer.sublayers:
      sub_rows, outputs = profile(sublayer, outputs, depth, inner_level, rng, min_runs,
                                  min_seconds)
      rows += sub_rows
  elif inner_level <= depth and isinstance(layer, tl.Parallel):
    outputs, start = (), 0
    for sublayer in layer.sublayers:
      sub_rows, sub_outputs = profile(sublayer, stack[start:start + sublayer.n_in], depth,
                                      inner_level, rng, min_runs, min_seconds)
      rows += sub_rows
      outputs += sub_outputs
      start += sublayer.n_in
  else:
    outputs = _as_values(run(inputs, layer.weights, layer.state), layer.n_out)
  return rows, outputs + tuple(stack[layer.n_in:])


def profile_model(model, dtype, depth, **timing_args):
  """`profile` rows of one decoding step of an LM in predict mode, with random weights."""
  model.weights, model.state = decoders.random_weights_and_state(model, dtype)
  return profile(model, (jnp.ones((1, 1), jnp.int32),), depth, **timing_args)[0]


def measure(shape, variant, impl, depth, bandwidth, rate):
  """Rows of one variant's one-block LM, with the floors of this machine."""
  model = decoders.build(impl, decoders.dimensions(shape, variant), 1, decoders.MAX_LEN)
  rows = profile_model(model, decoders.SHAPES[shape][1], depth)
  for row in rows:
    row.update(shape=shape, variant=variant, impl=impl,
               floor_seconds=max(row['bytes'] / bandwidth, row['flops'] / rate))
  return rows


def markdown(rows, min_share, bandwidth, rate):
  """One table per (shape, variant, impl): the layers above `min_share` of the step."""
  lines = [f'Machine: {timing.machine_description()}; read bandwidth {bandwidth / 1e9:.1f} GB/s '
           f'(a jitted reduction), matmul rate {rate / 1e9:.0f} GFLOP/s (a jitted float32 '
           '2048² product), both measured in this run. Batch 1, one token, KV caches of '
           f'{decoders.MAX_LEN}. GFLOP: XLA\'s cost analysis of each layer compiled alone; '
           'MB read: the weights, state and inputs it reads (`bytes_read`: of an array it '
           'only gathers from, the gathered rows); floor = max(bytes / bandwidth, flops / '
           'matmul rate); bound: which term sets it.', '']
  keys = sorted({(r['shape'], r['variant'], r['impl']) for r in rows},
                key=lambda k: (list(decoders.SHAPES).index(k[0]), decoders.VARIANTS.index(k[1]),
                               k[2]))
  for key in keys:
    group = [r for r in rows if (r['shape'], r['variant'], r['impl']) == key]
    step = group[0]['seconds']
    lines += [f'### {key[0]} {key[1]} ({key[2]}): one block and the output layer', '',
              common.table_header(['layer', 'ms', 'share', 'GFLOP', 'MB read', 'floor ms',
                                   'bound', 'ms / floor'])]
    for r in group:
      if r['level'] > 1 and r['seconds'] < min_share * step:
        continue
      bound = 'memory' if r['bytes'] / bandwidth >= r['flops'] / rate else 'compute'
      lines.append(common.table_row([
          '&nbsp;' * 4 * r['level'] + r['layer'], f'{r["seconds"] * 1e3:.3f}',
          f'{r["seconds"] / step:.0%}', f'{r["flops"] / 1e9:.3f}', f'{r["bytes"] / 1e6:.1f}',
          f'{r["floor_seconds"] * 1e3:.3f}', bound,
          f'{r["seconds"] / max(r["floor_seconds"], 1e-9):.1f}x']))
    lines.append('')
  return '\n'.join(lines)


def define_flags():
  """Defines the command line's flags; only when run as a program (others have namesakes)."""
  common.define_flags(json_output=True, shapes=decoders.SHAPES,
                      writes='docs/results/block_profile.md')
  flags.DEFINE_list('variants', ['dense', 'ffqkv'], 'Table 1 variants to profile.')
  flags.DEFINE_list('impls', ['ours'], "Implementations: 'ours' and/or 'trax'.")
  flags.DEFINE_integer('depth', 4, 'Levels of named layers to descend.', lower_bound=1)
  flags.DEFINE_float('min_share', 0.02, 'Smallest share of the step a row below the block '
                     'level needs to be shown.', lower_bound=0, upper_bound=1)


def main(argv):
  del argv
  args = flags.FLAGS
  shapes = args.shapes or ['17b']
  for name, values, allowed in (('variants', args.variants, decoders.VARIANTS),
                                ('impls', args.impls, ('ours', 'trax'))):
    if not set(values) <= set(allowed):
      raise app.UsageError(f'--{name}: {values} must be among {list(allowed)}')
  bandwidth, rate = timing.memory_bandwidth(), matmul_rate()
  rows = []
  for shape in shapes:
    for variant in args.variants:
      for impl in args.impls:
        rows += measure(shape, variant, impl, args.depth, bandwidth, rate)
  text = markdown(rows, args.min_share, bandwidth, rate)
  print(text)
  if args.write:
    (common.RESULTS_DIR / 'block_profile.md').write_text(
        '# Where a decoding step goes: one block, layer by layer\n\n'
        f'`{common.command_line("sparse_scaling.bench.block_profile")}`\n\n' + text)
  if args.json:
    print(json.dumps(rows))


if __name__ == '__main__':
  common.run(main, define_flags)
