"""A decoded token's receptive fields from the multiplicative layer's parts, as one kernel.

Where XLA's ops take a token's Sparse QKV block (17B's: the fused block declines above
`sparse_qkv_block_kernel.MAX_D_MODEL`), a generation on a GPU runs the multiplicative layer
(§3.2) and the convolutions laid out as one product (`sparse_qkv.DECODE_LAYOUT`,
`ONE_PRODUCT`) in these kernels (docs/results/decode_profile_gpu_17b.md):

  x·D                        [S, d_in]
  its product with E, split along d_in into P slices: the parts  [P, S, M]
  the parts' sum, + bias: y                                       [S, M]
  the receptive fields: window = [state; y] [lks, S, M], each module's
    lks·k·M inputs, zeros past the modules and up to R            [S, R]
  the new state, from the fields                                  [lks − 1, S, M]
  the fields' product with the convolutions' kernel               [S, 3M]

The third, fourth and fifth are three kernels of ~1-2.5 µs each for ~3 MB (on an H200 at
17B 2.5, 1.7 and 1.2 µs of a 51.4 µs block). XLA cannot make them one: the fields read y at
neighbouring modules, across the reduction's rows. `fields` is one kernel taking the parts as
XLA's product writes them: program (b, s) sums module s's parts once, adds the bias, and
writes y[s] and the state's rows of module s into every slot of the fields that reads them
(slot (i, j) of row s + k // 2 − j for window position i and module offset j), zeros where
that row lies past the modules (into its own slot (i, k − 1 − j) instead, whose module lies
past them too), and the next state in place (no program reads another module's state).

The parts come from `MultiplicativeDense.decode_parts`, the product as one batched product
(`'bspk,pkm->pbsm'`), which XLA compiles as the split product it makes of the einsum.
The 17B attention block's 12 kernels become 10; on an H100 the block looped in 0.0520 ms
against 0.0527-0.0532 (float32; bfloat16 0.0344-0.0360 against 0.0367-0.0379) and its
kernels traced 53.5 µs against 56.9, this kernel 3.0 µs where the three took 5.8
(docs/decoding_gpu.md, the forty-sixth session), so 'auto' takes it on a GPU from d_model
8192 (MIN_D_MODEL; `bench/decode_shares.py`'s FIELDS_MIN sets it).

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs it on any backend (the
tests do, on the CPU).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers.decode_kernels import f32

# 'auto' takes the kernel on a GPU from this d_model (17B's 9216; 800M's blocks take the
# fused block instead); None: never.
MIN_D_MODEL = 8192
PARTS = 64   # P, the slices of d_in the multiplicative product is split into (dividing d_in;
             # a power of two, as the kernel loads a module's parts as one array)
WARPS = 4


def pays(d_model):
  """Whether 'auto' takes the kernel on a GPU at this d_model (MIN_D_MODEL)."""
  return MIN_D_MODEL is not None and d_model >= MIN_D_MODEL


def n_parts(d_in):
  """P for an input of d_in: PARTS where it divides d_in, else 1 (one slice)."""
  return PARTS if d_in % PARTS == 0 else 1


def _fields_kernel(parts_ref, bias_ref, state_ref, fields_ref, new_state_ref, *, size):
  """One (row, module) program. Shapes in `fields`; every load before any store."""
  decode_kernels.launch_dependents()
  b, s = pl.program_id(0), pl.program_id(1)
  _, n, n_modules, channels = state_ref.shape
  pieces = decode_kernels.pieces(channels)
  loaded = [parts_ref[:, b, s, pl.ds(start, length)] for start, length in pieces]   # [P, l]
  bias = [bias_ref[s, pl.ds(start, length)] for start, length in pieces]
  old = [[state_ref[b, i, s, pl.ds(start, length)] for start, length in pieces]
         for i in range(n)]
  y = [jnp.sum(f32(part), axis=0) + f32(c) for part, c in zip(loaded, bias)]
  window = old + [y]                          # positions 0..n of module s, in pieces
  half = size // 2
  for i, row in enumerate(window):
    for j in range(size):
      target = s + half - j                   # the fields row whose slot (i, j) reads s
      inside = ((target >= 0) & (target < n_modules)).astype(jnp.int32)
      at = s + inside * (target - s)
      slot = i * size + 2 * half - j + inside * (2 * j - 2 * half)
      for (start, length), value in zip(pieces, row):   # `inside` as a vector to lower
        kept = jnp.where(jnp.full((length,), inside) > 0, f32(value),
                         jnp.zeros((length,), jnp.float32))
        fields_ref[b, at, pl.ds(slot * channels + start, length)] = kept.astype(
            fields_ref.dtype)
  filled = len(window) * size * channels
  for start, length in decode_kernels.pieces(fields_ref.shape[2] - filled):
    fields_ref[b, s, pl.ds(filled + start, length)] = jnp.zeros((length,), fields_ref.dtype)
  for i in range(n):                          # the state moves one position on
    for (start, length), value in zip(pieces, window[i + 1]):
      new_state_ref[b, i, s, pl.ds(start, length)] = value.astype(new_state_ref.dtype)


def fields(parts, bias, state, size, rows, interpret=False):
  """A token's receptive fields and the convolutions' next state.

  Args:
    parts: [P, B, S, M], the multiplicative layer's output before its bias, in P parts (P a
      power of two: Pallas' Triton lowering takes arrays of such sizes only).
    bias: [S, M], its bias.
    state: [B, n, S, M], the window's previous n = lks − 1 positions (oldest first);
      updated in place.
    size: k, the module kernel size of the fields (odd).
    rows: R, a row of fields' width: lks·k·M and zeros after (`ModuleConv`'s layout).
    interpret: Run in Pallas' interpreter (any backend).

  Returns:
    (fields [B, S, R] in the state's dtype: for module s, window[i, s + j − k // 2] at
    columns [(i·k + j)·M, (i·k + j + 1)·M), zeros past the modules; new state [B, n, S, M]:
    window[1:]).
  """
  batch, n, n_modules, channels = state.shape
  if not decode_kernels.is_power_of_2(parts.shape[0]):
    raise ValueError(f'parts: P = {parts.shape[0]} must be a power of two (the kernel loads a '
                     "module's parts as one array)")
  if rows < (n + 1) * size * channels:
    raise ValueError(f'rows must be at least lks·k·M = {(n + 1) * size * channels}, '
                     f'got {rows}')
  return pl.pallas_call(
      functools.partial(_fields_kernel, size=size), grid=(batch, n_modules),
      out_shape=(jax.ShapeDtypeStruct((batch, n_modules, rows), state.dtype),
                 jax.ShapeDtypeStruct(state.shape, state.dtype)),
      input_output_aliases={2: 1}, interpret=interpret,
      compiler_params=decode_kernels.triton_params(WARPS),
  )(parts, bias, state)
