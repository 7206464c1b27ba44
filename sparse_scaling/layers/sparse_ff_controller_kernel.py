"""Sparse FF's controller in training as two Pallas kernels, forward and backward.

The training half of the controller in `sparse_ff.py` (§3.1). For every token and block k of
N units, from z = x·C1 [d_lowrank] (computed by XLA):

  logits[k] = z·C2[:, k] + c[k]                                   [N]
  p[k]      = softmax(logits[k])
  choice[k] = the unit drawn with probability softmax(logits[k] / temperature), by
              inverting its cumulative sum at one uniform number u[k] (replayed instead
              when the reverse pass of a reversible layer asks for the forward pass's choice)
  mask[k]   = one_hot(choice[k]) if hard else p[k]    (the value; the gradient is p's:
              the straight-through estimator)

and backward, for the mask's cotangent g: dlogits[k] = p[k] ⊙ (g[k] − Σ_j g[k, j] p[k, j]),
from which XLA's products give dz, dC2 and dc. XLA runs the same arithmetic as about a dozen
fusions per layer, each passing over a [tokens, d_ff] array (the logits, both softmaxes, the
cumulative sum, the mask and their cotangents): on an H200 at the quality reproduction's GPU
size that is ~0.9 ms and ~50 kernels a layer per step (docs/speed.md, "Training step"). Here the
forward pass reads z and writes the mask once, the backward pass reads the cotangent and
writes dlogits once; the logits are recomputed from z instead of stored.

Program (i, j) takes BT tokens and G consecutive blocks. Runs on GPUs through Pallas' Triton
backend; `interpret=True` runs the same kernels on any backend (the tests do, on the CPU).
`decode_kernels.use(name)` chooses where `sparse_ff.py` calls them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sparse_scaling.layers import decode_kernels

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products, not TF32: the logits decide a draw
_MAX_TOKENS = 64                      # BT: tokens per program


def fits(n_tokens, d_lowrank, block):
  """Whether the kernels take these shapes (Triton: power-of-2 blocks, products of K >= 16)."""
  return (decode_kernels.is_power_of_2(d_lowrank, block) and d_lowrank >= 16 and block >= 16
          and _tokens_per_program(n_tokens) >= 16)


def _tokens_per_program(n_tokens):
  """BT: the largest power of 2 up to _MAX_TOKENS that divides the number of tokens."""
  return min(_MAX_TOKENS, n_tokens & -n_tokens)


def _group(n_blocks):
  """G: blocks per program, so that one program reuses its tokens' z over several blocks."""
  return next(g for g in (8, 4, 2, 1) if n_blocks % g == 0)


def _logits_and_probs(z, c2, cb):
  """z [BT, r], C2 [r, N], c [N] -> logits, softmax(logits) [BT, N] and the row maxima."""
  logits = jnp.dot(z, c2, precision=_HIGHEST) + cb[None, :]
  top = jnp.max(logits, axis=1, keepdims=True)
  e = jnp.exp(logits - top)
  return logits, e / jnp.sum(e, axis=1, keepdims=True), top


def _forward_kernel(z_ref, c2_ref, cb_ref, draw_ref, hard_ref, mask_ref, choice_ref, *,
                    group, n, inverse_temperature, replay):
  z = z_ref[...]                                                  # [BT, r]
  units = jax.lax.broadcasted_iota(jnp.int32, (z.shape[0], n), 1)
  hard = hard_ref[0] != 0
  for g in range(group):
    columns = pl.ds(g * n, n)
    logits, probs, top = _logits_and_probs(z, c2_ref[:, columns], cb_ref[columns])
    if replay:                                                    # the forward pass's choice
      choice = draw_ref[g, :]
    elif inverse_temperature is None:                             # temperature 0: argmax
      choice = jnp.min(jnp.where(logits == top, units, n), axis=1)
    else:                                # units whose cumulative weight is <= u · total
      cdf = jnp.cumsum(jnp.exp((logits - top) * inverse_temperature), axis=1)
      threshold = draw_ref[g, :] * jnp.max(cdf, axis=1)           # [BT]
      below = (cdf <= threshold[:, None]) & (units < n - 1)
      choice = jnp.sum(below.astype(jnp.int32), axis=1)
    one_hot = (units == choice[:, None]).astype(probs.dtype)
    mask_ref[:, columns] = jnp.where(hard, one_hot, probs)
    choice_ref[g, :] = choice


def _backward_kernel(z_ref, c2_ref, cb_ref, g_ref, dlogits_ref, *, group, n):
  z = z_ref[...]
  for g in range(group):
    columns = pl.ds(g * n, n)
    _, probs, _ = _logits_and_probs(z, c2_ref[:, columns], cb_ref[columns])
    cotangent = g_ref[:, columns]
    dlogits_ref[:, columns] = probs * (
        cotangent - jnp.sum(cotangent * probs, axis=1, keepdims=True))


def _specs(n_tokens, r, n_blocks, n):
  """Block specs and grid shared by both kernels: (token tile i, block group j)."""
  bt, group = _tokens_per_program(n_tokens), _group(n_blocks)
  grid = (n_tokens // bt, n_blocks // group)
  z = pl.BlockSpec((bt, r), lambda i, j: (i, 0))
  c2 = pl.BlockSpec((r, group * n), lambda i, j: (0, j))
  cb = pl.BlockSpec((group * n,), lambda i, j: (j,))
  wide = pl.BlockSpec((bt, group * n), lambda i, j: (i, j))       # [T, d_ff] arrays
  per_block = pl.BlockSpec((group, bt), lambda i, j: (j, i))      # [K, T] arrays
  return grid, group, z, c2, cb, wide, per_block


def _forward(z, c2, cb, draw, hard, temperature, replay, interpret):
  n_tokens, r = z.shape
  _, n_blocks, n = c2.shape
  grid, group, z_spec, c2_spec, cb_spec, wide, per_block = _specs(n_tokens, r, n_blocks, n)
  kernel = functools.partial(
      _forward_kernel, group=group, n=n, replay=replay,
      inverse_temperature=1.0 / temperature if temperature else None)
  mask, choice = pl.pallas_call(
      kernel, grid=grid,
      in_specs=[z_spec, c2_spec, cb_spec, per_block, pl.BlockSpec((1,), lambda i, j: (0,))],
      out_specs=[wide, per_block],
      out_shape=[jax.ShapeDtypeStruct((n_tokens, n_blocks * n), z.dtype),
                 jax.ShapeDtypeStruct((n_blocks, n_tokens), jnp.int32)],
      interpret=interpret,
      compiler_params=decode_kernels.triton_params(4),
  )(z, c2.reshape(r, -1), cb.reshape(-1), draw.T, hard.astype(jnp.int32).reshape(1))
  return mask.reshape(n_tokens, n_blocks, n), choice.T


def _dlogits(z, c2, cb, cotangent, interpret):
  n_tokens, r = z.shape
  _, n_blocks, n = c2.shape
  grid, group, z_spec, c2_spec, cb_spec, wide, _ = _specs(n_tokens, r, n_blocks, n)
  return pl.pallas_call(
      functools.partial(_backward_kernel, group=group, n=n), grid=grid,
      in_specs=[z_spec, c2_spec, cb_spec, wide], out_specs=wide,
      out_shape=jax.ShapeDtypeStruct((n_tokens, n_blocks * n), z.dtype),
      interpret=interpret,
      compiler_params=decode_kernels.triton_params(4),
  )(z, c2.reshape(r, -1), cb.reshape(-1), cotangent.reshape(n_tokens, -1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def controller_mask(z, c2, cb, draw, hard, temperature, replay, interpret=False):
  """The training controller's mask and choice: z [T, r] -> [T, K, N], int32 [T, K].

  C2 [r, K, N] and c [K, N] as `sparse_ff.py` keeps them. `draw`: one uniform number in
  [0, 1) per token and block, [T, K] float32, or with `replay` the choice to repeat, [T, K]
  int32. `hard` (a boolean scalar) picks the one-hot mask over the soft one; `temperature`
  0 takes the argmax. Gradients reach z, C2 and c through the softmax (straight through).
  """
  return _forward(z, c2, cb, draw, hard, temperature, replay, interpret)


def _controller_mask_forward(z, c2, cb, draw, hard, temperature, replay, interpret):
  outputs = _forward(z, c2, cb, draw, hard, temperature, replay, interpret)
  return outputs, (z, c2, cb, draw, hard)


def _controller_mask_backward(temperature, replay, interpret, residuals, cotangents):
  del temperature, replay
  z, c2, cb, draw, hard = residuals
  dlogits = _dlogits(z, c2, cb, cotangents[0], interpret)      # [T, d_ff]
  flat_c2 = c2.reshape(c2.shape[0], -1)
  dz = dlogits @ flat_c2.T
  dc2 = (z.T @ dlogits).reshape(c2.shape)
  dcb = jnp.sum(dlogits, axis=0).reshape(cb.shape)
  return dz, dc2, dcb, _zero_cotangent(draw), _zero_cotangent(hard)


def _zero_cotangent(x):
  """No gradient for the random numbers, the replayed choice and the coin."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)


controller_mask.defvjp(_controller_mask_forward, _controller_mask_backward)
