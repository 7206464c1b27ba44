"""The multiplicative layer's product for a few tokens as one Pallas kernel.

A decoded token's multiplicative product (`multiplicative_dense.py`, §3.2)

  y[b, s, m] = Σ_i x[b, i]·D[s, i]·E[i, m]       D [S, d_in], E [d_in, M]

reads d_in·(S + M) weights but makes d_in·S·M multiply-adds, as many as a dense layer of its
size (docs/speed.md): at 17B (d_in 9216, 64 modules of 144) 7.7 MB and 85 M, about as long on
an H100's float32 FMA units (67 TFLOP/s: 2.5 µs) as at its memory rate (3 TB/s: 2.6 µs). XLA
runs it as three kernels: x·D written out [S, d_in], a product of it with E split along d_in,
and the parts' sum (on an H100 at 17B 2.8, 6.7 and 2.1 µs; docs/decoding_gpu.md). Here one
kernel scales D's columns as it loads them:

  program (b, p, s, c)   rows [p·R, (p + 1)·R) of d_in, modules [s·S', (s + 1)·S') and
                         channels [c·C, (c + 1)·C): Σ over its rows, STEP rows a loop step, of
                         (D[modules, rows]·x[b, rows]) @ E[rows, channels], a part [S', C].

XLA adds the d_in / R parts. R is the largest power of 2 up to ROWS dividing d_in; where M (or
S) is not a multiple of C (S'), the last slice overlaps the one before, its programs writing
the same sums twice. Fewer rows a program mean more programs but more parts to add (each
[S, M], as large as the token); more channels a program read D's rows fewer times.

Measured, and off. On an H100 at 17B one FF+QKV block looped in a compiled program took
0.0613-0.0621 ms with the kernel against 0.0577-0.0588 with XLA's kernels in float32, and
0.0377-0.0396 against 0.0396-0.0413 in bfloat16 (`bench/decode_shares.py --shape 17b
--measure block --settings MULT_MIN=8192,default`; docs/decoding_gpu.md). In a step's trace
the kernel took 13.6 µs and XLA's sum of its 36 parts 5.2: float32 products run on the FMA
units (Triton's IEEE dot), and each program's loop waits for its loads a step at a time. With
one TF32 product (PRECISION 2) the block took 0.0548, under XLA's, at TF32's 10-bit mantissa.
So 'auto' does not take it (MIN_D_IN None).

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs it on any backend (the
tests do, on the CPU). `decode_kernels.use(name)` chooses where the layer calls it: 'pallas'
and 'interpret' always, 'auto' on a GPU where `pays`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers.decode_kernels import f32

# The programs' shares (powers of 2): input rows, rows a loop step loads, modules and channels.
ROWS, STEP, MODULES, CHANNELS = 256, 64, 64, 32
WARPS, STAGES = 4, 0   # per program; Triton's pipeline stages for the loop (0: its own)
LOOP = True   # the steps as a loop (Triton pipelines its loads); False: unrolled, loads first
# A float32 product's precision on the GPU: 0 IEEE float32 (FMA, no tensor cores), 1 three
# TF32 products (about float32's accuracy, on tensor cores), 2 one TF32 product. bfloat16
# weights multiply as bfloat16 (x·D rounded to it, as XLA's path does), summed in float32.
PRECISION = 0
# 'auto' takes the kernel on a GPU from this d_in; None: never (measured slower, the module's
# note). 800M's sparse attention block decodes through its own kernels anyway
# (`sparse_qkv_block_kernel.py`).
MIN_D_IN = None
MAX_TOKENS = 8   # rows of x the kernel takes (decoding: the batch)


def shares(d_in, n_modules, n_channels):
  """(rows, step, (modules, module starts), (channels, channel starts)) of a program."""
  rows = decode_kernels.largest_share(ROWS, d_in)
  return (rows, min(STEP, rows), decode_kernels.cache_blocks(n_modules, MODULES),
          decode_kernels.cache_blocks(n_channels, CHANNELS))


def pays(d_in):
  """Whether 'auto' takes the kernel on a GPU: d_in from MIN_D_IN, and a program's rows a
  multiple of 16 (Triton's least side of a product)."""
  return (MIN_D_IN is not None and d_in >= MIN_D_IN
          and decode_kernels.largest_share(ROWS, d_in) >= 16)


_PRECISIONS = (jax.lax.Precision.HIGHEST, jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
               jax.lax.DotAlgorithmPreset.TF32_TF32_F32)


def _kernel(x_ref, d_ref, e_ref, y_ref, *, rows, step, modules, channels, loop, precision):
  """One (row of x, rows of d_in, modules, channels) program: its part of y [S', C]."""
  decode_kernels.launch_dependents()
  b, p, s, c = (pl.program_id(i) for i in range(4))
  # As `decode_kernels.cache_blocks` starts them: the last slice overlaps the one before.
  s0 = jnp.minimum(s * modules, d_ref.shape[0] - modules)
  c0 = jnp.minimum(c * channels, e_ref.shape[1] - channels)
  dot = min(modules, channels, step) >= 16   # Triton's least side of a product

  def load(k):
    cols = pl.ds(p * rows + k * step, step)
    return (x_ref[b, cols], d_ref[pl.ds(s0, modules), cols],
            e_ref[cols, pl.ds(c0, channels)])

  def add(total, loaded):
    x, d, e = loaded
    scaled = f32(d) * f32(x)[None, :]                                     # [S', step]
    if dot and d.dtype == jnp.bfloat16:
      part = jnp.dot(scaled.astype(d.dtype), e, preferred_element_type=jnp.float32)
    elif dot:
      part = jnp.dot(scaled, f32(e), precision=precision)                  # [S', C]
    else:
      part = jnp.sum(scaled[:, :, None] * f32(e)[None, :, :], axis=1)
    return total + part

  zero = jnp.zeros((modules, channels), jnp.float32)
  if loop:
    total = jax.lax.fori_loop(0, rows // step, lambda k, t: add(t, load(k)), zero)
  else:
    loads = [load(k) for k in range(rows // step)]   # every load first (`decode_kernels`)
    total = functools.reduce(add, loads, zero)
  y_ref[b, p, pl.ds(s0, modules), pl.ds(c0, channels)] = total


def product(x, d, e, interpret=False):
  """y = Σ_i x[:, i]·D[s, i]·E[i, m], the few-token form of `MultiplicativeDense`.

  Args:
    x: [B, d_in], B up to MAX_TOKENS.
    d: [S, d_in].
    e: [d_in, M].
    interpret: Run in Pallas' interpreter (any backend).

  Returns:
    y [B, S, M] in x's dtype, summed in float32.
  """
  batch, d_in = x.shape
  n_modules, n_channels = d.shape[0], e.shape[1]
  rows, step, (modules, m_starts), (channels, c_starts) = shares(d_in, n_modules, n_channels)
  n_parts = d_in // rows
  kernel = functools.partial(_kernel, rows=rows, step=step, modules=modules,
                             channels=channels, loop=LOOP,
                             precision=_PRECISIONS[0 if interpret else PRECISION])
  parts = pl.pallas_call(
      kernel, grid=(batch, n_parts, len(m_starts), len(c_starts)),
      out_shape=jax.ShapeDtypeStruct((batch, n_parts, n_modules, n_channels), jnp.float32),
      interpret=interpret,
      compiler_params=decode_kernels.triton_params(WARPS, STAGES or None),
  )(x, d, e)
  return jnp.sum(parts, axis=1).astype(x.dtype)
