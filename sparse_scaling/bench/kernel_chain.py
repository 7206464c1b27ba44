"""What one small kernel costs in a chain of them: XLA, Triton and Mosaic GPU side by side.

  python -m sparse_scaling.bench.kernel_chain [--kernels 24] [--tokens 64]
      [--programs 64] [--columns 128] [--forms xla,triton,mosaic,mosaic1,mosaic4]

A decoded 800M token runs ~120 small kernels, each reading little, so what a kernel costs
besides its bytes sets the token's time. On an H200 the Mosaic GPU forms of the fused blocks'
kernels were each slower than their Triton twins, by 0.2-3.3 µs (docs/decoding_gpu.md,
"Mosaic GPU"). This tells the backend's own cost from the kernels' design: every form adds 1
to x [programs, columns] float32, one program a row, `--kernels` times a token, `--tokens`
tokens in one compiled program, compiled as a generation is (`decoding.compiler_options`):

  xla       XLA's fusion, each behind an optimization barrier (else XLA fuses the chain of
            adds into one kernel)
  triton    a Pallas Triton kernel letting the next launch early, as the decoders' kernels do
            (`decode_kernels.launch_dependents`)
  mosaic    a Pallas Mosaic GPU kernel, the row read from the card's memory into registers
            and written back from them, that lets the next launch early and waits for the one
            before, as the Mosaic decoding kernels do (`mosaic_kernels.Program`)
  mosaicK   the same, the row copied into shared memory by the TMA unit in K copies (each on
            its barrier) and written back from shared memory: the Mosaic decoding kernels' way
            with their arrays (K a power of 2 dividing --columns)

Prints µs per kernel of each form, in rounds alternating the forms (`timing.per_steps`: the
difference of two token counts over the kernels they add), after checking each form's x. It
runs on a GPU only; the tests run the forms in Pallas' interpreters on a CPU.
docs/decoding_gpu.md quotes runs on an H200.
"""

import functools

from absl import app
from absl import flags
import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

from sparse_scaling import decoding
from sparse_scaling.bench import common
from sparse_scaling.bench import timing
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import mosaic_kernels
from sparse_scaling.layers.mosaic_kernels import plgpu

ROUNDS = 7            # rounds of the forms' alternation
SHORT_TOKENS = 2      # the shorter of the two token counts
FORMS = ('xla', 'triton', 'mosaic', 'mosaic1', 'mosaic4')


def parse_forms(names, columns):
  """The forms of --forms, each (name, kind, copies): copies is K of mosaicK, else 0."""
  forms = []
  for name in names:
    copies = name[len('mosaic'):] if name.startswith('mosaic') else ''
    if not (name in ('xla', 'triton', 'mosaic') or (
        copies.isdigit() and decode_kernels.is_power_of_2(int(copies))
        and columns % int(copies) == 0)):
      raise app.UsageError(f'--forms: {name!r} must be xla, triton, mosaic or mosaicK with K '
                           f'a power of 2 of copies dividing --columns ({columns}), e.g. '
                           'mosaic4')
    forms.append((name, 'mosaic' if copies else name, int(copies or 0)))
  return forms


def _triton_kernel(x_ref, out_ref):
  decode_kernels.launch_dependents()
  out_ref[...] = x_ref[...] + 1


def triton(x):
  """x [programs, columns] + 1 as a Triton kernel, one program a row."""
  row = pl.BlockSpec((1, x.shape[1]), lambda i: (i, 0))
  return pl.pallas_call(
      _triton_kernel, grid=(x.shape[0],), in_specs=[row], out_specs=row,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=timing.interpreted(),
      compiler_params=decode_kernels.triton_params(4))(x)


def _mosaic_kernel(x_g, out_g, *scratch, copies):
  """One row's program: straight from and to the card's memory, or through shared memory
  in `copies` TMA copies."""
  program = mosaic_kernels.Program(timing.interpreted())
  program.launch_dependents()
  program.wait()
  p = lax.axis_index('p')
  if not copies:
    out_g[p] = x_g[p] + 1
    return
  x_s, out_s, barriers = scratch
  copy = mosaic_kernels.Copies(barriers)
  width = x_s.shape[0] // copies
  for c in range(copies):
    copy(x_g.at[p, pl.ds(c * width, width)], x_s.at[pl.ds(c * width, width)])
  copy.wait()
  out_s[...] = x_s[...] + 1
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_s, out_g.at[p])
  plgpu.wait_smem_to_gmem(0)


def mosaic(x, copies=0):
  """x [programs, columns] + 1 as a Mosaic GPU kernel, one program a row (`copies`: through
  shared memory)."""
  scratch = ([plgpu.SMEM(x.shape[1:], x.dtype), plgpu.SMEM(x.shape[1:], x.dtype),
              plgpu.Barrier(num_barriers=copies)] if copies else [])
  return mosaic_kernels.kernel(
      functools.partial(_mosaic_kernel, copies=copies), timing.interpreted(),
      out_type=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0],),
      grid_names=('p',), scratch_types=scratch)(x)


def chained(kind, copies, n_kernels):
  """run(x [programs, columns], tokens) -> x after `tokens` × `n_kernels` kernels of the
  form, compiled as a generation's loop."""
  step = {'xla': lambda x: lax.optimization_barrier(x + 1), 'triton': triton,
          'mosaic': functools.partial(mosaic, copies=copies)}[kind]

  def run(x, tokens):
    def token(_, x):
      for _ in range(n_kernels):
        x = step(x)
      return x
    return lax.fori_loop(0, tokens, token, x)
  return jax.jit(run, static_argnums=1, compiler_options=decoding.compiler_options())


def measure(forms, n_kernels, tokens, programs, columns, rounds=ROUNDS, on_row=print):
  """One row per form, {form, us}: µs per kernel. Each form is compiled and its x checked
  first (the kernels' count added to every element), then all are timed in alternating
  rounds; rows are handed to `on_row` as they are complete."""
  if mosaic_kernels.MISSING and any(kind == 'mosaic' for _, kind, _ in forms):
    raise ValueError(f'kernel_chain: the mosaic forms need {mosaic_kernels.MISSING}')
  x = jnp.zeros((programs, columns), jnp.float32)
  runs = []
  for name, kind, copies in forms:
    run = chained(kind, copies, n_kernels)
    out = np.asarray(run(x, SHORT_TOKENS))
    if not np.array_equal(out, np.full(out.shape, SHORT_TOKENS * n_kernels, np.float32)):
      raise AssertionError(f'kernel_chain: the {name} form added {np.unique(out)[:4]} to x, '
                           f'not {SHORT_TOKENS * n_kernels}')
    runs.append(functools.partial(run, x))
  per_token = timing.per_steps(runs, SHORT_TOKENS, tokens, min_runs=rounds)
  rows = []
  for (name, _, _), seconds in zip(forms, per_token):
    rows.append(dict(form=name, us=seconds / n_kernels * 1e6))
    on_row(rows[-1])
  return rows


def define_flags():
  """Defines the command line's flags; only when run as a program."""
  flags.DEFINE_integer('kernels', 24, 'Kernels a token runs.', lower_bound=1)
  flags.DEFINE_integer('tokens', 64, 'Tokens of the longer loop (the shorter: 2).',
                       lower_bound=SHORT_TOKENS + 1)
  flags.DEFINE_integer('programs', 64, 'Programs (rows of x) a kernel (the 800M attention '
                       'kernel: 64).', lower_bound=1)
  flags.DEFINE_integer('columns', 128, 'float32 columns a program adds to (mosaic: a '
                       'multiple of 128, a row of the strided layout).', lower_bound=128)
  flags.register_validator('columns', lambda n: n % 128 == 0,
                           message='--columns must be a multiple of 128')
  flags.DEFINE_list('forms', list(FORMS), 'Forms to time (xla, triton, mosaic, mosaicK).')


def main(argv):
  del argv
  args = flags.FLAGS
  forms = parse_forms(args.forms, args.columns)
  if timing.interpreted():   # the interpreters' times say nothing of a GPU's
    raise app.UsageError(f'kernel_chain: times kernels on a GPU (here: '
                         f'{jax.default_backend()}); the tests run its forms on a CPU')
  print(f'Machine: {timing.machine_description()}. {args.kernels} kernels a token, each adding '
        f'1 to x [{args.programs}, {args.columns}] float32 a program a row, {args.tokens} '
        f'against {SHORT_TOKENS} tokens in one compiled program.', flush=True)
  print(common.table_header(['form', 'µs/kernel']), flush=True)
  try:
    measure(forms, args.kernels, args.tokens, args.programs, args.columns, on_row=lambda row:
            print(common.table_row([row['form'], f"{row['us']:.2f}"]), flush=True))
  except ValueError as error:
    raise app.UsageError(str(error)) from None


if __name__ == '__main__':
  common.run(main, define_flags)
