"""The Sparse FF block's parts, added: by XLA, a kernel, the next kernel, or atomic adds.

  python -m sparse_scaling.bench.parts_sum [--layers 24] [--tokens 64]
      [--forms parts,kernel,next,unsummed,atomic1,atomic4,atomic8,last16,last32]

Decoding a token at 800M, the FF block ends in 96 units programs (`sparse_ff_kernel`), each
writing its part of the output [d_model]: its block's chosen row of W2 times the unit's
activation. XLA adds the parts and the residual in a kernel of its own, 1.3-1.5 µs of a
~15 µs layer (docs/results/decode_profile_gpu.md). Whether another way of adding them pays
is a question of a generation's chain of kernels, so this times a layer of two kernels with
the programs of the real ones, looped over `--layers` and `--tokens` in one compiled program,
compiled as a generation is (`decoding.compiler_options`):

  attend  d_model / 16 programs of 16 columns (the attention kernel's): x2 = tanh(x) there
  units   one program per part (the units kernel's): part p = relu(x2·W1[p])·W2[p]

and the forms of adding the parts into the next layer's x (part 0 also carries x2):

  parts     units writes the parts [P, d]; XLA adds them (the decoders' way)
  kernel    units writes the parts; a Pallas kernel adds them (d_model / 16 programs of 16
            columns), letting the next kernel launch early as the decoders' kernels do
  next      units writes the parts; the next attend programs add those of their columns
            (loaded in power-of-2 blocks of rows)
  atomicG   attend also writes the row as G copies (x2, then zeros) and each units program
            adds its part into copy p mod G with atomic adds (Triton's `atomic_add`); the
            next attend programs add the G copies. The order of the adds varies from run to
            run, and so do the last bits of x.
  lastK     units has K more programs, 'summers' (ids P .. P+K-1): each units program stores
            its part, then (a gpu-scope fence and the program's barrier) adds 1 to a counter
            that attend's program 0 zeroes; each summer spins until the counter is P, then
            adds the P parts of its d_model / K columns and writes x. XLA's sum kernel goes,
            and the wait for the parts moves inside the units kernel. The summers wait only
            on programs of lower ids (which a GPU starts first, and the interpreter runs
            first). On an NVIDIA GPU only (the fence is PTX).
  unsummed  the parts, of which the next attend reads part 0 alone: not a sum (its x is
            wrong), the two kernels' time with nothing added, for scale

Every kernel lets the next launch early (`decode_kernels.launch_dependents`), as the
decoders' do. Prints µs per layer of each form, in rounds alternating the forms
(`timing.per_steps`; a layer's time is the difference of two token counts over the
layers they add), and how far each form's x is from the parts form's. On a CPU the kernels
run in Pallas' interpreter (the tests do). docs/decoding_gpu.md quotes runs on an H200.
"""

import functools

from absl import app
from absl import flags
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp
import numpy as np

from sparse_scaling import decoding
from sparse_scaling.bench import common
from sparse_scaling.bench import decoders
from sparse_scaling.bench import timing
from sparse_scaling.layers import decode_kernels

COLUMNS = 16          # columns per attend program (the attention kernel's VALUE_WIDTH)
ROUNDS = 7            # rounds of the forms' alternation
SHORT_TOKENS = 2      # the shorter of the two token counts
FORMS = ('parts', 'kernel', 'next', 'unsummed', 'atomic1', 'atomic4', 'atomic8', 'last16',
         'last32')


def shape_800m():
  """(d_model, parts) of the 800M FF+QKV block: d_model 1024, 6144 / 64 = 96 blocks."""
  dims = decoders.dimensions('800m', 'ffqkv')
  return dims['d_model'], dims['d_ff'] // dims['ff_sparsity'][0]


def parse_forms(names):
  """The forms of --forms, each (name, kind, n): n is G of atomicG or K of lastK, else 0."""
  forms = []
  for name in names:
    kind = next((k for k in ('atomic', 'last') if name.startswith(k)), name)
    n = name[len(kind):]
    if not (kind in ('parts', 'kernel', 'next', 'unsummed') or (
        n.isdigit() and int(n) >= 1 and (kind == 'atomic' or decode_kernels.is_power_of_2(
            int(n))))):
      raise app.UsageError(f'--forms: {name!r} must be parts, kernel, next, unsummed, '
                           'atomicG with G >= 1 copies (e.g. atomic4) or lastK with K a power '
                           'of 2 of summing programs (e.g. last16)')
    forms.append((name, kind, int(n) if n else 0))
  return forms


def _column_sum(x_ref, rows, cols):
  """Inside a kernel: Σ of x_ref's first `rows` rows at `cols`, loaded in power-of-2 blocks."""
  return decode_kernels.sum_rows(decode_kernels.load_pieces(lambda r: x_ref[r, cols], rows))


def _sum_kernel(x_ref, out_ref):
  """One program of COLUMNS columns: the sum of the parts there."""
  decode_kernels.launch_dependents()
  cols = pl.ds(pl.program_id(0) * COLUMNS, COLUMNS)
  out_ref[0, cols] = _column_sum(x_ref, x_ref.shape[0], cols)


def column_sum(parts):
  """parts [P, d] -> their sum [1, d], as a Pallas kernel."""
  return pl.pallas_call(
      _sum_kernel, grid=(parts.shape[1] // COLUMNS,), interpret=timing.interpreted(),
      out_shape=jax.ShapeDtypeStruct((1, parts.shape[1]), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=4))(parts)   # Triton, not Mosaic GPU


def _attend_kernel(x_ref, *out_refs, rows, copies, counter):
  """One program of COLUMNS columns: x2 = tanh(Σ of the input's `rows` rows there); with
  `copies`, also the copies' row (x2, then zeros); with `counter`, program 0 zeroes it."""
  decode_kernels.launch_dependents()
  cols = pl.ds(pl.program_id(0) * COLUMNS, COLUMNS)
  x2 = jnp.tanh(_column_sum(x_ref, rows, cols))
  out_refs[0][0, cols] = x2
  if copies:
    out_refs[1][0, cols] = x2
    for g in range(1, copies):
      out_refs[1][g, cols] = jnp.zeros((COLUMNS,), jnp.float32)
  if counter:
    @pl.when(pl.program_id(0) == 0)
    def _():
      out_refs[-1][pl.ds(0, 1)] = jnp.zeros((1,), jnp.int32)


def attend(x, rows, copies=0, counter=False):
  """x [R, d] -> (x2 [1, d],), with `copies` also the copies [copies, d], with `counter` also
  a zeroed counter [1] (int32)."""
  d = x.shape[1]
  out_shape = [jax.ShapeDtypeStruct((1, d), jnp.float32)]
  if copies:
    out_shape.append(jax.ShapeDtypeStruct((copies, d), jnp.float32))
  if counter:
    out_shape.append(jax.ShapeDtypeStruct((1,), jnp.int32))
  return pl.pallas_call(
      functools.partial(_attend_kernel, rows=rows, copies=copies, counter=counter),
      grid=(d // COLUMNS,), out_shape=out_shape, interpret=timing.interpreted(),
      compiler_params=plgpu.CompilerParams(num_warps=4))(x)   # Triton, not Mosaic GPU


def _part(x_ref, w1_ref, w2_ref, p, carry=True):
  """Inside a kernel: part p = relu(x2·W1[p])·W2[p], and with `carry` x2 too in part 0."""
  x = x_ref[0, :]
  part = jnp.maximum(jnp.sum(x * w1_ref[p, :]), 0.0) * w2_ref[p, :]
  return part + (p == 0).astype(jnp.float32) * x if carry else part


def _units_kernel(x_ref, w1_ref, w2_ref, *refs, copies):
  """Program p: part p = relu(x2·W1[p])·W2[p] (+ x2 in part 0), stored as row p or added
  into copy p mod `copies`."""
  decode_kernels.launch_dependents()
  p = pl.program_id(0)
  if copies:   # x2 is in copy 0 already (attend's)
    plgpu.atomic_add(refs[-1], (p % copies, pl.ds(0, x_ref.shape[1])),
                     _part(x_ref, w1_ref, w2_ref, p, carry=False))
  else:
    refs[-1][p, :] = _part(x_ref, w1_ref, w2_ref, p)


def units(x2, w1, w2, acc=None):
  """The parts [P, d], or `acc` [G, d] with the parts added in (updated in place)."""
  acc = () if acc is None else (acc,)
  return pl.pallas_call(
      functools.partial(_units_kernel, copies=acc[0].shape[0] if acc else 0),
      grid=(w1.shape[0],), interpret=timing.interpreted(),
      out_shape=jax.ShapeDtypeStruct((acc[0] if acc else w1).shape, jnp.float32),
      input_output_aliases={3: 0} if acc else {},
      compiler_params=plgpu.CompilerParams(num_warps=4))(x2, w1, w2, *acc)


def _units_summed_kernel(x_ref, w1_ref, w2_ref, _, parts_ref, out_ref, counter_ref, *, summers):
  """Programs p < P: part p, stored, then counted; the `summers` programs after them: once
  all P are counted, the sum of the parts at their columns."""
  decode_kernels.launch_dependents()
  p, n_parts = pl.program_id(0), w1_ref.shape[0]

  @pl.when(p < n_parts)
  def _unit():
    parts_ref[p, :] = _part(x_ref, w1_ref, w2_ref, p)
    # Every thread's stores visible GPU-wide, the program's threads met, then counted.
    decode_kernels.ptx('fence.acq_rel.gpu;\n\tbar.sync 0;', min_capability=70)
    plgpu.atomic_add(counter_ref, p * 0, p * 0 + 1)

  @pl.when(p >= n_parts)
  def _summer():
    zero = p * 0   # traced, so that the loop's body has no constants (the interpreter's rule)
    count = jax.lax.while_loop(lambda n: n < n_parts,
                               lambda n: plgpu.atomic_add(counter_ref, zero, zero), zero)
    decode_kernels.ptx('fence.acq_rel.gpu;', min_capability=70)
    width = out_ref.shape[1] // summers
    start = (p - n_parts) * width + (count - n_parts)   # count is P: uses the loop's result
    cols = pl.ds(pl.multiple_of(start, width), width)
    out_ref[0, cols] = _column_sum(parts_ref, n_parts, cols)


def units_summed(x2, w1, w2, counter, summers):
  """(the parts [P, d], their sum [1, d], the counter), in one kernel of P + `summers`
  programs; `counter` [1] must be zero and is updated in place."""
  d = x2.shape[1]
  return pl.pallas_call(
      functools.partial(_units_summed_kernel, summers=summers), grid=(w1.shape[0] + summers,),
      out_shape=[jax.ShapeDtypeStruct(w1.shape, jnp.float32),
                 jax.ShapeDtypeStruct((1, d), jnp.float32),
                 jax.ShapeDtypeStruct((1,), jnp.int32)],
      input_output_aliases={3: 2}, interpret=timing.interpreted(),
      compiler_params=plgpu.CompilerParams(num_warps=4))(x2, w1, w2, counter)


def layer(kind, n, x, w1, w2):
  """The next layer's input after one layer of form `kind` (n: its G or K): [1, d], [P, d] or
  [G, d]."""
  if kind == 'atomic':
    x2, acc = attend(x, x.shape[0], copies=n)
    return units(x2, w1, w2, acc)
  if kind == 'last':
    x2, counter = attend(x, 1, counter=True)
    return units_summed(x2, w1, w2, counter, n)[1]
  x2, = attend(x, x.shape[0] if kind == 'next' else 1)
  parts = units(x2, w1, w2)
  if kind == 'kernel':
    return column_sum(parts)
  return jnp.sum(parts, axis=0, keepdims=True) if kind == 'parts' else parts


def generation(kind, n, n_layers):
  """run(x0 [d], w1s, w2s [layers, P, d], tokens) -> x [d] after `tokens` passes over the
  layers of form `kind` (n: its G or K), compiled as a generation's loop."""
  def run(x0, w1s, w2s, tokens):
    rows = {'atomic': n, 'next': w1s.shape[1], 'unsummed': w1s.shape[1]}.get(kind, 1)
    x = jnp.zeros((rows, x0.shape[0]), jnp.float32).at[0].set(x0)

    def token(_, x):
      for i in range(n_layers):
        x = layer(kind, n, x, w1s[i], w2s[i])
      return x

    x = jax.lax.fori_loop(0, tokens, token, x)
    # The x each form hands on: the sum of its rows (unsummed: part 0, as its attend reads).
    return x[0] if kind == 'unsummed' else jnp.sum(x, axis=0)
  return jax.jit(run, static_argnums=3, compiler_options=decoding.compiler_options())


def random_weights(n_layers, n_parts, d_model, seed=0):
  rng = np.random.RandomState(seed)
  normal = lambda *shape: jnp.asarray(rng.randn(*shape).astype(np.float32))
  return (normal(d_model), normal(n_layers, n_parts, d_model) / np.sqrt(d_model),
          normal(n_layers, n_parts, d_model) / np.sqrt(n_parts))


def measure(forms, n_layers, tokens, d_model, n_parts, rounds=ROUNDS, on_row=print):
  """One row per form, {form, us, error}: µs per layer and max |x − the first form's x|
  after `tokens` tokens. Each form is compiled and checked first, then all are timed in
  alternating rounds; rows are handed to `on_row` as they are complete."""
  x0, w1s, w2s = random_weights(n_layers, n_parts, d_model)
  runs, errors, reference = [], [], None
  for _, kind, n in forms:
    run = generation(kind, n, n_layers)
    out = np.asarray(run(x0, w1s, w2s, SHORT_TOKENS))
    reference = out if reference is None else reference
    errors.append(float(np.max(np.abs(out - reference))))
    runs.append(run)
  per_token = timing.per_steps([functools.partial(run, x0, w1s, w2s) for run in runs],
                               SHORT_TOKENS, tokens, min_runs=rounds)
  rows = []
  for (name, _, _), error, seconds in zip(forms, errors, per_token):
    rows.append(dict(form=name, us=seconds / n_layers * 1e6, error=error))
    on_row(rows[-1])
  return rows


def define_flags():
  """Defines the command line's flags; only when run as a program."""
  flags.DEFINE_integer('layers', 24, 'Layers a token passes (the 800M decoder: 24).',
                       lower_bound=1)
  flags.DEFINE_integer('tokens', 64, 'Tokens of the longer loop (the shorter: 2).',
                       lower_bound=SHORT_TOKENS + 1)
  flags.DEFINE_list('forms', list(FORMS), 'Forms to time (parts, kernel, next, unsummed, '
                    'atomicG, lastK); the first is the reference of the last column.')


def main(argv):
  del argv
  args = flags.FLAGS
  forms = parse_forms(args.forms)
  d_model, n_parts = shape_800m()
  print(f'Machine: {timing.machine_description()}. The 800M FF block\'s {n_parts} parts of '
        f'{d_model}, {args.layers} layers of two kernels, {args.tokens} against {SHORT_TOKENS} '
        'tokens in one compiled program.', flush=True)
  print(common.table_header(['form', 'µs/layer', 'max |Δx| vs first form']), flush=True)
  measure(forms, args.layers, args.tokens, d_model, n_parts, on_row=lambda row: print(
      common.table_row([row['form'], f"{row['us']:.2f}", f"{row['error']:.1e}"]), flush=True))


if __name__ == '__main__':
  common.run(main, define_flags)
