"""Can PTX's L2 hints keep the blocks' fixed weights in the L2 cache, or requests bring them early?

  python -m sparse_scaling.bench.l2_hints [--layers 24] [--tokens 64] [--weight_rows 4]
      [--stream_rows 8] [--vocab 32000] [--set_aside_mb 0] [--forms normal.normal.xla,...]

Decoding one token at 800M reads ~29 MB of fixed weights (the multiplicative layer, the
convolutions' kernels, the controller, LayerNorms) that would fit the H200's 60 MB L2 cache,
but also streams the KV caches, the chosen rows of W1 and W2 (~52 MB) and the 131 MB output
layer through it. Given every block the same arrays (`decode_shares --settings SHARED=1`), a
generation is 10-15% faster on an H200 (docs/decoding_gpu.md, "The L2 hints, a first measurement").
Pallas' Triton loads carry no L2 hint, so this writes the loads as inline PTX
(`ptx_loads`) and times a chain like a generation's, looped over `--tokens` in one compiled
program (`decoding.compiler_options`), every layer's arrays its own (as the decoder's blocks'
are; not slices of one array, which XLA may copy every token):

  layer    `--layers` a token, one kernel each, of D_MODEL / COLUMNS programs: program p reads
           its `--weight_rows` rows of the layer's fixed weights and its `--stream_rows` rows
           of the layer's stream (read once a token, as a KV cache is), then
           x[its columns] = tanh(x + 0.01·(w·x summed) + 0.001·(stream summed))
  product  x·W_out [D_MODEL, --vocab] (131 MB at 800M), whose logits nudge x (all of them,
           so that XLA cannot cut the product to the columns it uses)

A form is `weights.stream.product`, each part naming how its loads are written:

  normal   ld.global.f32 (the same scalar loads as the hinted ones, no hint)
  last     ld.global.L2::cache_hint with a createpolicy.fractional.L2::evict_last policy
  first    the same with L2::evict_first
  cs       ld.global.cs (streaming: evict-first in L1 and L2)
  shared   (weights) every layer reads layer 0's weights, normal loads: they stay in the L2
           cache, the reference that the hints would reach
  ahead    (weights) normal loads, and each layer's programs ask the L2 cache for the next
           layer's weights without waiting (`decode_kernels.prefetch`, PTX's
           prefetch.global.L2), as the decoder's kernels do with `decode_kernels.PREFETCH`
  none     (stream, product) not read
  xla      (product) XLA's product, as the decoders compute it

`--set_aside_mb` sets aside that much of the L2 for persisting (evict_last) lines first
(`decode_kernels.set_aside_l2`; the device's maximum if larger). Prints µs per token of each
form, in rounds alternating the forms (`timing.per_steps`: a token's time is the
difference of two token counts over the tokens they add), and how far each form's x is from the
first form of the same arithmetic (same weights shared or not, same parts read). On a CPU the
kernels run in Pallas' interpreter, with no hints (the tests do). docs/decoding_gpu.md quotes
runs on an H200.
"""

import contextlib
import functools

from absl import app
from absl import flags
import jax
from jax._src.lib.mlir import ir
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from sparse_scaling import decoding
from sparse_scaling.bench import common
from sparse_scaling.bench import timing
from sparse_scaling.layers import decode_kernels

D_MODEL = 1024        # the 800M decoder's
COLUMNS = 16          # columns of x per layer program (the attention kernel's VALUE_WIDTH)
PRODUCT_COLUMNS = 256  # logits per product program
PRODUCT_ROWS = 64     # rows of W_out a product program loads at a time
ROUNDS = 5
SHORT_TOKENS = 2
# The loads as PTX, by hint ($0: the float32 loaded, $1: its address).
PTX_LOADS = {
    'normal': 'ld.global.f32 $0, [$1];',
    'cs': 'ld.global.cs.f32 $0, [$1];',
    **{hint: ('{\n\t.reg .b64 policy;\n\t'
              f'createpolicy.fractional.L2::evict_{hint}.b64 policy, 1.0;\n\t'
              'ld.global.L2::cache_hint.f32 $0, [$1], policy;\n\t}')
       for hint in ('last', 'first')},
}
PARTS = (('normal', 'last', 'first', 'cs', 'shared', 'ahead'),   # weights
         ('normal', 'last', 'first', 'cs', 'none'),                # stream
         ('normal', 'last', 'first', 'cs', 'none', 'xla'))         # product
FORMS = ('normal.normal.xla', 'last.normal.xla', 'last.first.xla', 'last.cs.xla',
         'shared.normal.xla', 'normal.normal.normal', 'normal.cs.cs', 'last.cs.cs',
         'last.first.first', 'shared.normal.normal', 'ahead.normal.xla', 'normal.none.none',
         'shared.none.none', 'ahead.none.none')
_MARK = 'l2_hints:'   # an eviction_policy that `ptx_loads` writes as PTX


def parse_forms(names):
  """The forms of --forms, each (name, weights, stream, product)."""
  forms = []
  for name in names:
    parts = tuple(name.split('.'))
    if len(parts) != 3 or any(p not in allowed for p, allowed in zip(parts, PARTS)):
      raise app.UsageError(
          f'--forms: {name!r} must be weights.stream.product, weights one of '
          f'{", ".join(PARTS[0])}, stream one of {", ".join(PARTS[1])}, product one of '
          f'{", ".join(PARTS[2])} (e.g. last.cs.xla)')
    forms.append((name,) + parts)
  return forms


@contextlib.contextmanager
def ptx_loads():
  """While lowered inside it, the kernels' loads marked by `load` are inline PTX.

  Pallas computes a ref's addresses in its Triton lowering and keeps them to itself, so this
  wraps that lowering's load rule (`_load`, private to jax): a marked load of float32 without
  a mask becomes Triton's elementwise inline assembly over the addresses, one scalar load per
  element."""
  original = decode_kernels.triton_lowering._load

  def _load(ptr, mask=None, other=None, *, eviction_policy=None, **kwargs):
    if not (eviction_policy or '').startswith(_MARK):
      return original(ptr, mask, other, eviction_policy=eviction_policy, **kwargs)
    if mask is not None or other is not None:
      raise ValueError('ptx_loads: a marked load must not be masked')
    f32 = ir.F32Type.get()
    return decode_kernels.tt_dialect.elementwise_inline_asm(
        [ir.RankedTensorType.get(ir.RankedTensorType(ptr.type).shape, f32)],
        PTX_LOADS[eviction_policy[len(_MARK):]], constraints='=f,l', pure=True,
        packed_element=1, args=[ptr])

  decode_kernels.triton_lowering._load = _load
  try:
    yield
  finally:
    decode_kernels.triton_lowering._load = original


def load(ref, hint):
  """Inside a kernel: ref[...] (float32), its loads written as PTX with `hint`. The kernel
  must be lowered for a GPU inside `ptx_loads` (Pallas' own rule refuses the mark); Pallas'
  interpreter loads as always."""
  return decode_kernels.plgpu.load(ref, eviction_policy=_MARK + hint)


def _layer_kernel(x_ref, w_ref, *refs, weights, stream):
  """Program p: columns p of x, from its rows of the weights (and of the stream); with
  weights 'ahead', refs begin with the next layer's weights, whose part p it asks for."""
  decode_kernels.launch_dependents()
  p, out_ref, programs = pl.program_id(0), refs[-1], x_ref.shape[1] // COLUMNS
  x = x_ref[0, :]
  rows = w_ref.shape[0] // programs
  h = 0.01 * jnp.sum(load(w_ref.at[pl.ds(p * rows, rows), :],
                          'normal' if weights == 'ahead' else weights) * x[None, :])
  if weights == 'ahead':
    decode_kernels.prefetch(refs[0], p, programs)
    refs = refs[1:]
  if stream != 'none':
    rows = refs[0].shape[0] // programs
    h += 0.001 * jnp.sum(load(refs[0].at[pl.ds(p * rows, rows), :], stream))
  cols = pl.ds(p * COLUMNS, COLUMNS)
  out_ref[0, cols] = jnp.tanh(x_ref[0, cols] + h)


def layer(x, w, s, weights, stream, after=None):
  """x [1, D] -> [1, D]: one kernel reading w [R, D] (and s [S, D] unless stream is none;
  with weights 'ahead', asking for `after`, the next layer's w)."""
  return pl.pallas_call(
      functools.partial(_layer_kernel, weights=('normal' if weights == 'shared' else weights),
                        stream=stream),
      grid=(x.shape[1] // COLUMNS,), interpret=timing.interpreted(),
      out_shape=jax.ShapeDtypeStruct(x.shape, jnp.float32),
      compiler_params=decode_kernels.triton_params(4))(
          x, w, *([after] if weights == 'ahead' else []), *([] if stream == 'none' else [s]))


def _product_kernel(x_ref, w_ref, out_ref, *, hint):
  """Program p: logits p·PRODUCT_COLUMNS.., from PRODUCT_ROWS rows of W_out at a time."""
  decode_kernels.launch_dependents()
  cols = pl.ds(pl.program_id(0) * PRODUCT_COLUMNS, PRODUCT_COLUMNS)

  def add_rows(i, acc):
    rows = pl.ds(i * PRODUCT_ROWS, PRODUCT_ROWS)
    return acc + jnp.sum(x_ref[0, rows][:, None] * load(w_ref.at[rows, cols], hint), axis=0)

  out_ref[0, cols] = jax.lax.fori_loop(0, w_ref.shape[0] // PRODUCT_ROWS, add_rows,
                                       jnp.zeros((PRODUCT_COLUMNS,), jnp.float32))


def product(x, w_out, hint):
  """x [1, D] · w_out [D, V] -> [1, V]: XLA's product, or a kernel loading with `hint`."""
  if hint == 'xla':
    return x @ w_out
  return pl.pallas_call(
      functools.partial(_product_kernel, hint=hint),
      grid=(w_out.shape[1] // PRODUCT_COLUMNS,), interpret=timing.interpreted(),
      out_shape=jax.ShapeDtypeStruct((1, w_out.shape[1]), jnp.float32),
      compiler_params=decode_kernels.triton_params(8))(x, w_out)


def token(x, ws, ss, w_out, weights, stream, hint):
  """One token: the layers, then the product's logits (all of them) nudge x."""
  for i in range(len(ws)):
    x = layer(x, ws[0 if weights == 'shared' else i], ss[i], weights, stream,
              after=ws[(i + 1) % len(ws)])
  if hint == 'none':
    return x
  logits = product(x, w_out, hint)
  return x + 1e-3 * jnp.tanh(logits[:, :x.shape[1]]) + 1e-6 * jnp.max(logits)


def generation(weights, stream, hint, tokens, *args):
  """x [D] after `tokens` tokens of a form, compiled as a generation's loop with its loads as
  PTX: run(x0 [D], ws (L arrays [R, D]), ss (L arrays [S, D]), w_out [D, V])."""
  def run(x0, ws, ss, w_out):
    step = lambda _, x: token(x, ws, ss, w_out, weights, stream, hint)
    return jax.lax.fori_loop(0, tokens, step, x0[None])[0]
  with ptx_loads():
    return jax.jit(run, compiler_options=decoding.compiler_options()).lower(*args).compile()


def random_arrays(n_layers, weight_rows, stream_rows, vocab, d_model=D_MODEL, seed=0):
  """x0 [D], the layers' weights and streams, each layer's arrays of their own (L arrays
  [R, D], L arrays [S, D]; R, S: rows of every layer program times its D / COLUMNS programs),
  W_out [D, vocab] (vocab >= D)."""
  rng = np.random.RandomState(seed)
  normal = lambda *shape: jnp.asarray(rng.randn(*shape).astype(np.float32))
  programs = d_model // COLUMNS
  ws = [normal(programs * weight_rows, d_model) / np.sqrt(d_model) for _ in range(n_layers)]
  ss = [normal(programs * stream_rows, d_model) for _ in range(n_layers)]
  return normal(d_model), ws, ss, normal(d_model, vocab) / 32


def arithmetic(form):
  """Forms of the same arithmetic compute the same x (to rounding)."""
  _, weights, stream, hint = form
  return weights == 'shared', stream == 'none', hint == 'none'


def measure(forms, n_layers, tokens, weight_rows, stream_rows, vocab, d_model=D_MODEL,
            rounds=ROUNDS, on_row=print):
  """One row per form, {form, us, error}: µs per token, and max |x − x of the first form of
  the same arithmetic| after SHORT_TOKENS tokens. Each form is compiled and checked first,
  then all are timed in alternating rounds; rows go to `on_row` as they are complete."""
  arrays = random_arrays(n_layers, weight_rows, stream_rows, vocab, d_model)
  runs, errors, references = [], [], {}
  for form in forms:
    compiled = {n: generation(*form[1:], n, *arrays) for n in (SHORT_TOKENS, tokens)}
    out = np.asarray(compiled[SHORT_TOKENS](*arrays))
    reference = references.setdefault(arithmetic(form), out)
    errors.append(float(np.max(np.abs(out - reference))))
    runs.append(lambda n, compiled=compiled: compiled[n](*arrays))
  rows = []
  for form, error, seconds in zip(
      forms, errors, timing.per_steps(runs, SHORT_TOKENS, tokens, min_runs=rounds)):
    rows.append(dict(form=form[0], us=seconds * 1e6, error=error))
    on_row(rows[-1])
  return rows


def define_flags():
  """Defines the command line's flags; only when run as a program."""
  flags.DEFINE_integer('layers', 24, 'Layers a token passes (the 800M decoder: 24).',
                       lower_bound=1)
  flags.DEFINE_integer('tokens', 64, 'Tokens of the longer loop (the shorter: 2).',
                       lower_bound=SHORT_TOKENS + 1)
  flags.DEFINE_integer('weight_rows', 4, 'Rows of fixed weights per layer program, a power of '
                       '2 (4: 1 MB a layer; 800M: 1.2 MB).', lower_bound=1)
  flags.DEFINE_integer('stream_rows', 8, 'Rows of the stream per layer program, a power of 2 '
                       '(8: 2 MB a layer; 800M: ~2.2 MB of KV caches and W1/W2 rows).',
                       lower_bound=1)
  flags.DEFINE_integer('vocab', 32000, f'Columns of W_out, a multiple of {PRODUCT_COLUMNS}.',
                       lower_bound=PRODUCT_COLUMNS)
  flags.DEFINE_integer('set_aside_mb', 0, 'MB of L2 set aside for persisting lines first '
                       '(NVIDIA GPUs only).', lower_bound=0)
  flags.DEFINE_list('forms', list(FORMS), 'Forms to time, weights.stream.product (see the '
                    'module docstring).')


def main(argv):
  del argv
  args = flags.FLAGS
  forms = parse_forms(args.forms)
  for name in ('weight_rows', 'stream_rows'):
    if not decode_kernels.is_power_of_2(getattr(args, name)):
      raise app.UsageError(f'--{name}: {getattr(args, name)} must be a power of 2')
  if args.vocab % PRODUCT_COLUMNS:
    raise app.UsageError(f'--vocab: {args.vocab} must be a multiple of {PRODUCT_COLUMNS}')
  if args.set_aside_mb and timing.interpreted():
    raise app.UsageError('--set_aside_mb: needs an NVIDIA GPU (JAX\'s backend is '
                         f'{jax.default_backend()})')
  set_aside = ''
  if args.set_aside_mb:
    limit, maximum = decode_kernels.set_aside_l2(args.set_aside_mb << 20)
    set_aside = f' L2 set aside for persisting lines: {limit} bytes (maximum {maximum}).'
  mb = lambda rows: rows * D_MODEL * 4 * (D_MODEL // COLUMNS) / 1e6
  print(f'Machine: {timing.machine_description()}. {args.layers} layers a token of '
        f'{mb(args.weight_rows):.2f} MB fixed weights and {mb(args.stream_rows):.2f} MB '
        f'stream each, a product of {D_MODEL * args.vocab * 4 / 1e6:.0f} MB; {args.tokens} '
        f'against {SHORT_TOKENS} tokens in one compiled program.{set_aside}', flush=True)
  print(common.table_header(['form', 'µs/token', 'max |Δx| vs the same arithmetic']),
        flush=True)
  measure(forms, args.layers, args.tokens, args.weight_rows, args.stream_rows, args.vocab,
          on_row=lambda row: print(common.table_row(
              [row['form'], f"{row['us']:.1f}", f"{row['error']:.1e}"]), flush=True))


if __name__ == '__main__':
  common.run(main, define_flags)
