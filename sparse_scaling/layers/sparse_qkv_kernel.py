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

`conv_attention_step` goes further when the modules are the heads (M = d_head, as in the
paper's 800M model): one program per (row, head) computes its module's Q, K and V, all M
channels, and attends over the head's KV cache (`attention_kernel.attend`), so that the
convolutions' outputs never leave the kernel and the per-block run of small kernels between
the multiplicative layer and the residual (convolutions, three slices, cache updates, scores,
softmax, weighted sum) is one kernel. Each program reads every kernel tile (Σ_o lks·k_o·M²
weights, 336 KB in float32 at M = 64) from the L2 cache; `SparseQKVAttention` calls it
(`sparse_qkv.py`, kernel 'sparse_qkv_attention' of `decode_kernels.py`).

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs it on any backend (the
tests do, on the CPU). `decode_kernels.use(name)` chooses where `ModuleConv` calls it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sparse_scaling.layers import attention_kernel
from sparse_scaling.layers import decode_kernels

CHANNELS = 8  # C: output channels per program of `conv_step`
ATTENTION_WARPS = 8  # of a (row, head) program of `conv_attention_step`


def fits(n_channels, length_kernel_size):
  """Whether the kernel takes these shapes: M a power of 2 (Triton's blocks), a state."""
  return decode_kernels.is_power_of_2(n_channels) and length_kernel_size >= 2


def _window(y_ref, state_ref, b, s, n_modules, lks, half):
  """The convolution's inputs at module s of row b: (row [M], inside) for each (position i of
  the window, module offset), inside 0.0 for a module beyond the edges (zero padding)."""
  n = lks - 1
  rows = {}
  for i in range(lks):        # the window: position i (n: this token) of module s + offset
    for offset in range(-half, half + 1):
      module = s + offset
      inside = ((module >= 0) & (module < n_modules)).astype(jnp.float32)
      module = jnp.clip(module, 0, n_modules - 1)
      row = y_ref[b, module, :] if i == n else state_ref[b, i, module, :]    # [M]
      rows[i, offset] = (row, inside)
  return rows


def _load_weights(weight_refs, sizes, lks, block):
  """Channels `block` of every kernel tile and bias: ([[[K_o[i, j, :, block]]]], [b_o])."""
  weights = [[[weight_refs[2 * o][i, j, :, block] for j in range(size)]    # [M, C] each
              for i in range(lks)] for o, size in enumerate(sizes)]
  biases = [weight_refs[2 * o + 1][block] for o in range(len(sizes))]
  return weights, biases


def _convolve(rows, weights, biases, sizes, lks):
  """Each output's channels that `weights` hold, float32: [out_o [C] for each output]."""
  outputs = []
  for o, size in enumerate(sizes):
    out = biases[o].astype(jnp.float32)                                     # [C]
    for i in range(lks):
      for j in range(size):
        row, inside = rows[i, j - size // 2]
        product = row.astype(jnp.float32)[:, None] * weights[o][i][j].astype(jnp.float32)
        out += jnp.sum(product, axis=0) * inside
    outputs.append(out)
  return outputs


def _shift(y_ref, state_ref, new_state_ref, b, s, block, n):
  """Writes channels `block` of module s of the new state: the window's last n positions."""
  newer = [state_ref[b, i + 1, s, block] if i + 1 < n else y_ref[b, s, block] for i in range(n)]
  for i in range(n):
    new_state_ref[b, i, s, block] = newer[i].astype(new_state_ref.dtype)


def _kernel(*refs, sizes, n_modules, lks, width):
  """One (row, module, channel block) program. Shapes in `conv_step`.

  Every load comes first, the arithmetic after: the loads are independent, so the GPU has
  them all in flight at once instead of waiting for each in turn.
  """
  n_out = len(sizes)
  y_ref, state_ref = refs[:2]
  weight_refs = refs[2:2 + 2 * n_out]
  out_ref, new_state_ref = refs[2 + 2 * n_out:]
  b, s, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  block = pl.ds(c * width, width)
  rows = _window(y_ref, state_ref, b, s, n_modules, lks, max(sizes) // 2)
  weights, biases = _load_weights(weight_refs, sizes, lks, block)
  for o, out in enumerate(_convolve(rows, weights, biases, sizes, lks)):
    out_ref[o, b, s, block] = out.astype(out_ref.dtype)
  _shift(y_ref, state_ref, new_state_ref, b, s, block, lks - 1)


def _attention_kernel(*refs, sizes, n_modules, lks, max_len, block):
  """One (row, head) program of `conv_attention_step`: the head's module is its Q, K and V."""
  index_ref, y_ref, state_ref = refs[:3]
  weight_refs = refs[3:9]
  k_cache_ref, v_cache_ref, out_ref, new_state_ref, k_out_ref, v_out_ref = refs[9:]
  b, s = pl.program_id(0), pl.program_id(1)
  row = b * n_modules + s                                   # the caches' row
  channels = pl.ds(0, y_ref.shape[-1])
  cache = attention_kernel.load_cache(k_cache_ref, v_cache_ref, row, max_len, block)
  rows = _window(y_ref, state_ref, b, s, n_modules, lks, max(sizes) // 2)
  weights, biases = _load_weights(weight_refs, sizes, lks, channels)
  q, k, v = _convolve(rows, weights, biases, sizes, lks)
  _shift(y_ref, state_ref, new_state_ref, b, s, channels, lks - 1)
  out = attention_kernel.attend(q, k, v, index_ref[0], cache, k_out_ref, v_out_ref, row, block)
  out_ref[b, s, :] = out.astype(out_ref.dtype)


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
      compiler_params=plgpu.CompilerParams(num_warps=4),   # Triton, not Mosaic GPU
  )(y, state, *[w for pair in weights for w in pair])


def conv_attention_step(y, state, weights, sizes, k_cache, v_cache, index, interpret=False):
  """Sparse QKV attention of one token per row after the multiplicative layer, one kernel.

  The convolutions (Q and K: module kernel sizes 3, V: 1) and causal attention over the KV
  cache, for S modules = heads (M = d_head): program (row, head) computes its module's Q, K
  and V in registers, writes K and V into the caches in place and attends. Nothing between
  the convolutions and the attention goes to memory, and the cache loads are issued first, so
  they are in flight during the convolutions.

  Args:
    y: [B, S, M], the multiplicative layer's output for this token.
    state: [B, n, S, M], its outputs at the n previous positions (oldest first).
    weights: ((K_o [lks, k_o, M, M], b_o [M]) for Q, K and V), as `ModuleConv` keeps them.
    sizes: (k_q, k_k, k_v), odd.
    k_cache, v_cache: [B·S, max_len, M], valid before `index`.
    index: int32 scalar, the token's position (< max_len).
    interpret: Run in Pallas' interpreter (any backend).

  Returns:
    (out [B, S, M] in y's dtype, new state [B, n, S, M], k_cache, v_cache), the caches
    updated in place.
  """
  batch, n_modules, _ = y.shape
  lks = state.shape[1] + 1
  max_len = k_cache.shape[1]
  kernel = functools.partial(_attention_kernel, sizes=tuple(sizes), n_modules=n_modules,
                             lks=lks, max_len=max_len,
                             block=attention_kernel.block_size(max_len))
  return pl.pallas_call(
      kernel, grid=(batch, n_modules),
      out_shape=(jax.ShapeDtypeStruct(y.shape, y.dtype),
                 jax.ShapeDtypeStruct(state.shape, state.dtype),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
      input_output_aliases={9: 2, 10: 3},
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=ATTENTION_WARPS),   # Triton
  )(jnp.reshape(index, (1,)).astype(jnp.int32), y, state, *[w for pair in weights for w in pair],
    k_cache, v_cache)
