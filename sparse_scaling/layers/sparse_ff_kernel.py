"""Sparse FF decoding as one Pallas kernel: controller choice, gathered rows, ReLU, product.

The decoding half of §3.1 (`sparse_ff.py`) for calls of a few tokens. XLA runs it as about
six kernels per layer (the controller's second product, its argmax, two gathers, two
products), each of a few microseconds on a GPU while the layer reads well under a megabyte.
Here one kernel does all of it for a group of G blocks of N units per program:

  logits[k] = z·C2[:, k] + c[k]                  z = x·C1, [d_lowrank] (computed by XLA)
  u[k]      = argmax(logits[k])                  the chosen unit of block k
  h[k]      = relu(x·W1[k, u[k]] + b1[k, u[k]])
  part[p]   = Σ_{k of program p} h[k]·W2[k, u[k]]           [d_model]

and XLA adds the programs' parts and b2 in one reduction. Reads per token: z, the G·N
controller columns and the 2·(d_ff / N) chosen rows of W1 and W2, as `gathered_units` does.

Runs on GPUs through Pallas' Triton backend; `interpret=True` runs the same kernel on any
backend (the tests do, on the CPU). `decode_kernels.use(name)` chooses where `sparse_ff.py`
calls it.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

def _chunk(d_model):
  """Width of the slices of a row the kernel loads: a power of 2 that divides d_model."""
  chunk = 1
  while chunk < 1024 and d_model % (2 * chunk) == 0:
    chunk *= 2
  return chunk


def _kernel(x_ref, z_ref, c2_ref, cb_ref, w1_ref, b1_ref, w2_ref, out_ref, *, group, n,
            chunk, n_chunks):
  """One (token, group of blocks) program. Shapes in `sparse_units`."""
  t, p = pl.program_id(0), pl.program_id(1)
  # In float32 whatever the weights' dtype: summed in bfloat16, the controller's logits lose
  # the bits that decide its argmax.
  z = z_ref[t, :].astype(jnp.float32)                              # [r]
  hidden, rows = [], []
  for g in range(group):
    k = p * group + g
    logits = jnp.sum(z[:, None] * c2_ref[:, pl.ds(k * n, n)].astype(jnp.float32), axis=0)
    logits = logits + cb_ref[pl.ds(k * n, n)].astype(jnp.float32)   # [N]
    best = jnp.max(logits)
    unit = jnp.min(jnp.where(logits == best, jnp.arange(n, dtype=jnp.int32), n))
    row = k * n + unit
    h = b1_ref[row].astype(jnp.float32)
    for c in range(n_chunks):
      x = x_ref[t, pl.ds(c * chunk, chunk)].astype(jnp.float32)
      h += jnp.sum(x * w1_ref[row, pl.ds(c * chunk, chunk)].astype(jnp.float32))
    hidden.append(jnp.maximum(h, 0.0))
    rows.append(row)
  for c in range(n_chunks):
    part = hidden[0] * w2_ref[rows[0], pl.ds(c * chunk, chunk)].astype(jnp.float32)
    for g in range(1, group):
      part += hidden[g] * w2_ref[rows[g], pl.ds(c * chunk, chunk)].astype(jnp.float32)
    out_ref[t, p, pl.ds(c * chunk, chunk)] = part


def sparse_units(x, z, c2, cb, w1, b1, w2, b2, interpret=False, group=None):
  """Sparse FF output for a few tokens: x [T, d], z = x·C1 [T, r] -> [T, d].

  Weights as `sparse_ff.py` keeps them: C2 [r, K, N], c [K, N], W1 and W2 [K, N, d],
  b1 [K, N], b2 [d] (K = d_ff / N blocks). The units are chosen by argmax, as in eval and
  predict mode; ties go to the lowest unit, as `jnp.argmax`.
  """
  n_tokens, d_model = x.shape
  r, n_blocks, n = c2.shape
  if group is None:  # about 128 programs per token keep the GPU's multiprocessors busy
    group = next(g for g in (8, 4, 2, 1) if n_blocks % g == 0 and n_blocks // g >= 96) \
        if n_blocks >= 96 else 1
  chunk = _chunk(d_model)
  kernel = functools.partial(_kernel, group=group, n=n, chunk=chunk,
                             n_chunks=d_model // chunk)
  parts = pl.pallas_call(
      kernel, grid=(n_tokens, n_blocks // group),
      out_shape=jax.ShapeDtypeStruct((n_tokens, n_blocks // group, d_model), jnp.float32),
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=4),   # Triton, not Mosaic GPU
  )(x, z, c2.reshape(r, n_blocks * n), cb.reshape(-1), w1.reshape(n_blocks * n, d_model),
    b1.reshape(-1), w2.reshape(n_blocks * n, d_model))
  return (jnp.sum(parts, axis=1) + b2).astype(x.dtype)
