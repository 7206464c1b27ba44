"""Sparse QKV's convolutions for one decoded token as one Pallas kernel.

The decoding half of `ModuleConv` (`sparse_qkv.py`, §3.2). For a token, the multiplicative
layer's output y [S, M] (S modules of M channels) and the state, the previous n = lks − 1
outputs [n, S, M], form the window [lks, S, M]; each output o (Q, K, V: module kernel sizes
k_o = 3, 3, 1) is

  out_o[s] = b_o + Σ_{i < lks} Σ_{j < k_o} window[i, s + j − k_o // 2] · K_o[i, j]   [M]

with K_o [lks, k_o, M, M] (zero outside the modules). XLA runs this as about eight kernels
(the window's concatenation and padding, the receptive fields, one product per output, the
state's shift), each of one or two microseconds on a GPU for ~0.3 MB of weights. Here one
kernel does all of it: program (b, s, c) computes channels [c·C, (c + 1)·C) of every output
at module s of row b, and the same channels of the new state. It reads the weights once over
all programs (Σ_o lks·k_o·M·C each). On an H200 at the 800M shape it takes 5.8 µs, about what
XLA's kernels take together, so `decode_kernels.py` leaves it off by default.

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs it on any backend (the
tests do, on the CPU). `decode_kernels.use(name)` chooses where `ModuleConv` calls it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels

CHANNELS = 8  # C: output channels per program


def fits(n_channels, length_kernel_size):
  """Whether the kernel takes these shapes: M a power of 2 (Triton's blocks), a state."""
  return decode_kernels.is_power_of_2(n_channels) and length_kernel_size >= 2


def _kernel(*refs, sizes, n_modules, lks, width):
  """One (row, module, channel block) program. Shapes in `conv_step`.

  Every load comes first, the arithmetic after: the loads are independent, so the GPU has
  them all in flight at once instead of waiting for each in turn.
  """
  decode_kernels.launch_dependents()
  n_out = len(sizes)
  y_ref, state_ref = refs[:2]
  weight_refs = refs[2:2 + 2 * n_out]
  out_ref, new_state_ref = refs[2 + 2 * n_out:]
  b, s, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  n = lks - 1
  block = pl.ds(c * width, width)
  half = max(sizes) // 2
  rows = {}
  for i in range(lks):        # the window: position i (n: this token) of module s + offset
    for offset in range(-half, half + 1):
      module = s + offset
      inside = ((module >= 0) & (module < n_modules)).astype(jnp.float32)
      module = jnp.clip(module, 0, n_modules - 1)
      row = y_ref[b, module, :] if i == n else state_ref[b, i, module, :]    # [M]
      rows[i, offset] = (row, inside)
  weights = [[[weight_refs[2 * o][i, j, :, block] for j in range(size)]    # [M, C] each
              for i in range(lks)] for o, size in enumerate(sizes)]
  biases = [weight_refs[2 * o + 1][block] for o in range(n_out)]
  newer = [state_ref[b, i + 1, s, block] if i + 1 < n else y_ref[b, s, block] for i in range(n)]
  for o, size in enumerate(sizes):
    out = biases[o].astype(jnp.float32)                                     # [C]
    for i in range(lks):
      for j in range(size):
        row, inside = rows[i, j - size // 2]
        product = row.astype(jnp.float32)[:, None] * weights[o][i][j].astype(jnp.float32)
        out += jnp.sum(product, axis=0) * inside
    out_ref[o, b, s, block] = out.astype(out_ref.dtype)
  for i in range(n):  # the state moves one position on
    new_state_ref[b, i, s, block] = newer[i].astype(new_state_ref.dtype)


def conv_step(y, state, weights, sizes, interpret=False):
  """The outputs for one token per row and the new state.

  Args:
    y: [B, S, M], the multiplicative layer's output for this token.
    state: [B, n, S, M], its outputs at the n previous positions (oldest first).
    weights: ((K_o [lks, k_o, M, M], b_o [M]) for each output), as `ModuleConv` keeps them.
    sizes: k_o of each output (odd).
    interpret: Run in Pallas' interpreter (any backend).

  Returns:
    (outputs [n_out, B, S, M] in y's dtype, new state [B, n, S, M]).
  """
  batch, n_modules, channels = y.shape
  lks = state.shape[1] + 1
  width = min(CHANNELS, channels)
  kernel = functools.partial(_kernel, sizes=tuple(sizes), n_modules=n_modules, lks=lks,
                             width=width)
  return pl.pallas_call(
      kernel, grid=(batch, n_modules, channels // width),
      out_shape=(jax.ShapeDtypeStruct((len(sizes),) + y.shape, y.dtype),
                 jax.ShapeDtypeStruct(state.shape, state.dtype)),
      interpret=interpret,
      compiler_params=decode_kernels.triton_params(4),
  )(y, state, *[w for pair in weights for w in pair])
