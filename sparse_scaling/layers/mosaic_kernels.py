"""What the decoding kernels written for Pallas' Mosaic GPU backend share.

jax 0.11 deprecates Pallas' Triton backend, which the decoding kernels were first written for
(`decode_kernels.py`), in favour of Mosaic GPU. Kernels written for it so far:
`sparse_ff_mosaic.py` (the FF block's LayerNorm-controller and units programs) and
`sparse_qkv_mosaic.py` (the attention block's multiplicative, convolution and attention
programs), each
behind its module's MOSAIC switch, off: timed on an H200 they equal the Triton kernels' results
and are slower (docs/decoding_gpu.md, "Mosaic GPU").

Mosaic GPU differs from Triton in what a program may hold and how it loads (jax 0.10-0.12):
one warpgroup of 128 threads a program, an array in registers laid out over its threads, and
a reduction along one axis only in one of the tiled layouts of Hopper's matrix units (WGMMA:
[m, n], m a multiple of 64, n of 8, straight or transposed), which load only from shared
memory, tiled and swizzled as the TMA unit copies it (`swizzled`). Rows [d] read straight
from the card's memory take the strided layout (d a multiple of 128); a vector along the rows
of such a matrix and one along its columns are different layouts, which no cast converts (a
value goes through shared memory instead). What the backend brings that Triton's does not: a
program runs `griddepcontrol.wait` itself (`Program.wait`), so that the copies of its fixed
weights are issued before it, while the kernel before this one still runs; under Triton, XLA
places the wait at the kernel's entry (`decode_kernels`' note on launching early). From jax
0.11 a kernel that waits is marked for Programmatic Dependent Launch (the module's
`mosaic_gpu.uses_pdl`), so that it may start before the kernel it waits for ends; jax 0.10
does not mark it: the kernel starts after that kernel's end, and its wait returns at once.

Pallas' GPU interpreter runs these kernels on any backend (`interpreter`; the tests do, on
the CPU); it has no rule for the layout casts, the grid dependency control or an iota with a
layout, which `Program` skips there.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels

try:
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as error:   # a JAX without the backend: the kernels' `fits` say no
  plgpu = None
  MISSING = f'this JAX ({jax.__version__}) has no Pallas Mosaic GPU backend ({error})'
else:
  MISSING = None

# The matrix units' layouts of [m, n] arrays (m a multiple of 64, n of 8), straight and
# transposed from shared memory, and of the [m] and [n] vectors along them.
if plgpu:
  MATRIX, TRANSPOSED = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA_TRANSPOSED
  ALONG_ROWS, ALONG_COLUMNS = MATRIX.reduce(1), MATRIX.reduce(0)
  ALONG_ROWS_T, ALONG_COLUMNS_T = TRANSPOSED.reduce(1), TRANSPOSED.reduce(0)


def interpreter():
  """The `interpret` argument that runs a Mosaic GPU kernel (`plgpu.kernel`) in Pallas' GPU
  interpreter, on any backend: its parameters, public in jax 0.12
  (`plgpu.InterpretGPUParams`), in JAX's internals before."""
  try:
    from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams   # pylint: disable=import-outside-toplevel
  except ImportError:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams   # pylint: disable=import-outside-toplevel
  return InterpretGPUParams()


def kernel(body, interpret, input_output_aliases=None, **kwargs):
  """`plgpu.kernel(body, **kwargs)`, in the GPU interpreter where `interpret`.

  With `input_output_aliases` ({input index: output index}) the outputs named there are
  written in place into those inputs' buffers, as `pallas_call`'s argument of that name does
  (the KV caches at a token's position). `plgpu.kernel` has no such argument, and a
  `pallas_call` with Mosaic GPU's compiler parameters no longer lowers from jax 0.11, so the
  kernel is then Pallas' own `mpmd_map` with aliases, which `plgpu.kernel` also runs on
  (JAX's internals; the same in jax 0.10.2 to 0.12.0.1: `tests/test_sparse_qkv_mosaic.py`).
  """
  if not input_output_aliases:
    return plgpu.kernel(body, interpret=interpreter() if interpret else None, **kwargs)
  from jax._src.pallas import mpmd   # pylint: disable=import-outside-toplevel
  scratch = kwargs.pop('scratch_types', ())
  out_type = kwargs.pop('out_type')
  mesh = plgpu.Mesh(**kwargs)

  def scoped(*refs):   # scratch with transforms is allocated in the body, as plgpu.kernel does
    pl.run_scoped(functools.partial(body, *refs), *scratch)

  return mpmd._mpmd_map(   # pylint: disable=protected-access
      [(mesh, scoped)], out_types=tuple(out_type), input_output_aliases=input_output_aliases,
      interpret=interpreter() if interpret else False)


def swizzled(shape, dtype):
  """A shared-memory array [m, n] tiled and swizzled for the TMA unit and the matrix units'
  layouts: rows of 8, the widest swizzle (128, 64 or 32 bytes) that divides a row."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = next(s for s in (128, 64, 32) if shape[-1] * itemsize % s == 0)
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // itemsize)),
                                              plgpu.SwizzleTransform(swizzle)))


def swizzles(n, dtype):
  """Whether rows of n elements take `swizzled`'s layout: n a multiple of 8, rows a multiple
  of 32 bytes."""
  return n % 8 == 0 and n * jnp.dtype(dtype).itemsize % 32 == 0


def row_stats(x, epsilon):
  """(mean, 1/σ) of LayerNorm over a row x [d] (any layout), in float32."""
  x = x.astype(jnp.float32)
  mean = jnp.sum(x) / x.shape[0]
  return mean, lax.rsqrt(jnp.sum((x - mean) * (x - mean)) / x.shape[0] + epsilon)


class Copies:
  """A program's copies into shared memory by the TMA unit, each on a barrier of its own in
  turn (`barriers`: a `plgpu.Barrier` scratch of at least as many), and the wait for them all."""

  def __init__(self, barriers):
    self.barriers, self.count = barriers, 0

  def __call__(self, src, dst):
    plgpu.copy_gmem_to_smem(src, dst, self.barriers.at[self.count])
    self.count += 1

  def wait(self):
    for i in range(self.count):
      plgpu.barrier_wait(self.barriers.at[i])


class Program:
  """What a program body calls that Pallas' GPU interpreter has no rule for: outside it, the
  grid dependency control and the layouts; inside, nothing and the arrays as they are."""

  def __init__(self, interpret):
    self.interpret = interpret

  def launch_dependents(self):
    if not self.interpret:
      plgpu.griddepcontrol_launch_dependents()

  def wait(self):
    """Until the kernels before this one have finished and their writes are visible."""
    if not self.interpret:
      plgpu.griddepcontrol_wait()

  def cast(self, value, layout):
    return value if self.interpret else plgpu.layout_cast(value, layout)

  def load(self, ref, layout):
    """ref[...] in float32, in `layout`."""
    return self.cast(ref[...], layout).astype(jnp.float32)

  def load_transposed(self, ref):
    """ref[...].T [n, m] in float32, in the matrix units' transposed layout."""
    if self.interpret:
      return ref[...].T.astype(jnp.float32)
    return self.cast(ref.T[...], TRANSPOSED).astype(jnp.float32)

  def layer_norm(self, x_s, scale_s, bias_s, stats):
    """LayerNorm(x)[cols] in x's dtype, along the rows of a matrix layout, from x's slice and
    the LayerNorm's scale and bias [cols] in shared memory and the row's (mean, 1/σ)."""
    return decode_kernels.layer_norm_slice(
        [self.cast(ref[...], ALONG_ROWS) for ref in (x_s, scale_s, bias_s)], stats)

  def iota(self, n, layout):
    return (lax.iota(jnp.int32, n) if self.interpret
            else plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=layout))
