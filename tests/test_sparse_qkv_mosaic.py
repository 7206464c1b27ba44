"""Sparse QKV's multiplicative kernel in Mosaic GPU (`sparse_qkv_mosaic.py`): Pallas' GPU
interpreter on the CPU against numpy and the Triton kernel, a model decoding through it (with
the FF block's Mosaic kernels and without), lowering for an H200 at the 800M shape, and the
shapes it declines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu import core as mosaic_core

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import mosaic_kernels
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers import sparse_ff_mosaic
from sparse_scaling.layers import sparse_qkv_block_kernel
from sparse_scaling.layers import sparse_qkv_mosaic
from tests.test_fused_residual import VOCAB
from tests.test_fused_residual import _decode
from tests.test_fused_residual import _two_800m_layers_lowered_for_an_h200
from tests.test_sparse_ff_mosaic import N
from tests.test_sparse_ff_mosaic import RANK
from tests.test_sparse_ff_mosaic import _mosaic_kernels
from tests.utils import lowered_for_an_h200
from tests.utils import random_inputs

# The tiny LM of test_fused_residual at shapes both Mosaic kernels take: d_model 128 (the
# warpgroup's threads), 8 modules of 16 channels, 4 heads.
LM = dict(d_model=128, n_heads=4, attention_sparsity=8, ff_sparsity=(N, RANK), max_len=8)
# Whether this JAX marks a kernel that waits for Programmatic Dependent Launch (0.11 and later).
MARKS_PDL = hasattr(mosaic_core, 'PdlEffect')


def _weights(d_model, n_modules, n_channels, dtype=jnp.float32, mean=0.0, seed=0):
  """x [3, d] (rows of this mean), the LayerNorm's scale and bias, D [S, d], E [d, M]."""
  x = mean + random_inputs(3, d_model, seed=seed)
  shapes = [(d_model,), (d_model,), (n_modules, d_model), (d_model, n_channels)]
  return [jnp.asarray(a, dtype) for a in
          [x] + [random_inputs(*shape, seed=seed + i + 1) for i, shape in enumerate(shapes)]]


def _reference(x, scale, bias, d, e, epsilon=1e-6):
  """numpy: the partial sums over slices of ROWS input rows, [T, d / ROWS, S, M]."""
  x, scale, bias, d, e = (np.asarray(a, np.float64) for a in (x, scale, bias, d, e))
  mean = x.mean(axis=1, keepdims=True)
  normed = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + epsilon)
  normed = normed * scale + bias
  rows = sparse_qkv_mosaic.ROWS
  return np.stack([np.einsum('tr,sr,rm->tsm', normed[:, p:p + rows], d[:, p:p + rows],
                             e[p:p + rows]) for p in range(0, x.shape[1], rows)], axis=1)


@pytest.mark.parametrize('mean, tolerance', [(0.0, 1e-5), (1000.0, 2e-3)])
@pytest.mark.parametrize('channels', [16, 32])
def test_in_the_interpreter_it_equals_the_reference(channels, mean, tolerance):
  """Four slices of 64 rows, 4 modules of 32 channels, programs of 16 channels (two a slice)
  or all 32; and rows whose mean (1000) is large beside their spread, where float32 keeps
  ~5 digits of x - mean (a one-pass variance would keep ~1)."""
  weights = _weights(256, 4, 32, mean=mean)
  got = sparse_qkv_mosaic.mixed_parts(*weights, 1e-6, interpret=True, channels=channels)
  assert got.shape == (3, 4, 4, 32) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _reference(*weights), rtol=tolerance, atol=tolerance)


def _block(d_model, n_modules, n_channels, n_heads, dtype, interpret, max_len=8, seed=3):
  """(decode_step, its arguments): one Sparse QKV block of these shapes, 3 rows, random
  weights, state and caches (their first 5 positions valid) in `dtype`."""
  x, scale, bias, d, e = _weights(d_model, n_modules, n_channels, dtype, seed=seed)
  rng = np.random.RandomState(seed + 10)
  conv = tuple((jnp.asarray(rng.randn(3, 3, n_channels, n_channels) / 8, dtype),
                jnp.asarray(rng.randn(n_channels), dtype)) for _ in range(3))
  state = jnp.asarray(rng.randn(3, 2, n_modules, n_channels), dtype)
  caches = [jnp.asarray(rng.randn(3 * n_heads, max_len, d_model // n_heads), dtype)
            for _ in range(2)]
  y_bias = jnp.asarray(rng.randn(d_model), dtype)
  step = lambda *a: sparse_qkv_block_kernel.decode_step(
      *a, n_heads=n_heads, sizes=(3, 3, 3), epsilon=1e-6, interpret=interpret)
  return step, (x, (scale, bias), (d, e, y_bias), conv, state, *caches, jnp.int32(5))


def _assert_close(got, want, tolerance):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_the_block_through_it_equals_the_block_through_the_triton_kernel(dtype, monkeypatch):
  """`decode_step` at 8 modules of 16 channels, 4 heads, its multiplicative programs
  Mosaic GPU's or Triton's (both compute in float32, LayerNorm(x) rounded to x's dtype first):
  the same output, state and caches."""
  step, args = _block(128, 8, 16, 4, dtype, interpret=True)
  triton = step(*args)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  assert _mosaic_kernels(step, *args) == 1
  _assert_close(step(*args), triton, 1e-4 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize('ff_mosaic, n_mosaic', [(False, 2), (True, 4)])
def test_a_scaling_transformer_decodes_through_it_chained(ff_mosaic, n_mosaic, monkeypatch):
  """The two-layer LM, its blocks chained as decoded by default, every layer's multiplicative
  kernel Mosaic GPU's, and with the FF block's Mosaic kernels too its units kernel (fed the
  attention programs' 64 partial sums: 4 heads of 16 programs of 2 value columns): every
  step's logits and the whole state as XLA's path, two rows, the caches filled past their end."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', ff_mosaic)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'VALUE_WIDTH', 2)
  tokens = jnp.asarray(np.random.RandomState(5).randint(1, VOCAB, (2, 11)), jnp.int32)
  expected, expected_state, _ = _decode('xla', LM, tokens)
  got, state, count = _decode('interpret', LM, tokens, count="grid_names=('t', ")
  assert count == n_mosaic   # the Mosaic kernels' grids, one or two a layer
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for g, e in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('ff_mosaic', [False, True])
def test_two_800m_layers_decode_through_it_when_lowered_for_an_h200(ff_mosaic, dtype,
                                                                     monkeypatch):
  """Two 800M FF+QKV layers (d_model 1024, 16 modules of 64 channels), one decoding step
  lowered for an abstract H200: a layer's multiplicative kernel Mosaic GPU's (and with the
  FF block's, its units kernel), the others Triton's; from jax 0.11 each Mosaic kernel is
  marked for Programmatic Dependent Launch, without which its wait would hide nothing."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', ff_mosaic)
  text = _two_800m_layers_lowered_for_an_h200(dtype=dtype, triton=2 if ff_mosaic else 3)
  n_mosaic = 4 if ff_mosaic else 2
  assert text.count('@mosaic_gpu') == n_mosaic
  assert text.count('mosaic_gpu.uses_pdl') == (n_mosaic if MARKS_PDL else 0)


@pytest.mark.parametrize('d_model, n_modules, n_channels, dtype, fits', [
    (1024, 16, 64, jnp.float32, True), (1024, 16, 64, jnp.bfloat16, True),   # 800M
    (9216, 64, 144, jnp.float32, True),    # 17B (where the fused block declines)
    (128, 16, 8, jnp.float32, False),      # fewer channels than a program's 16
    (128, 8, 24, jnp.float32, False),      # channels that 16 does not divide
    (192, 8, 24, jnp.float32, False),      # d_model not a multiple of 128
    (1024, 512, 2, jnp.float32, False)])   # more modules than a copy's 256
def test_shapes_it_takes(d_model, n_modules, n_channels, dtype, fits):
  assert sparse_qkv_mosaic.fits(d_model, n_modules, n_channels, dtype) == fits


def test_shapes_it_declines_go_to_triton_and_a_direct_call_is_refused(monkeypatch):
  """A Sparse QKV block of 16 modules of 8 channels runs Triton's multiplicative kernel;
  called directly, the Mosaic kernel says which shapes it takes in one line."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  x, scale, bias, d, e = _weights(128, 16, 8)
  conv = tuple((jnp.zeros((3, 3, 8, 8)), jnp.zeros(8)) for _ in range(3))
  caches = [jnp.zeros((3 * 4, 8, 32)) for _ in range(2)]
  step = lambda *a: sparse_qkv_block_kernel.decode_step(
      *a, n_heads=4, sizes=(3, 3, 3), epsilon=1e-6)
  with decode_kernels.use('pallas'):
    text = lowered_for_an_h200(step, x, (scale, bias), (d, e, jnp.zeros(128)), conv,
                               jnp.zeros((3, 2, 16, 8)), *caches, jnp.int32(0))
  assert '@mosaic_gpu' not in text and text.count('xla.gpu.triton') == 3
  with pytest.raises(ValueError, match=r'mixed_parts: d_model 128, 16 modules and 8 channels '
                                       r'\(16 a program\) do not fit'):
    sparse_qkv_mosaic.mixed_parts(x, scale, bias, d, e, 1e-6)


def test_without_the_backend_the_mosaic_kernels_decline(monkeypatch):
  """Where JAX has no Mosaic GPU backend (`mosaic_kernels.MISSING` says why), no shape fits,
  so the Triton kernels run."""
  monkeypatch.setattr(mosaic_kernels, 'MISSING', 'no backend')
  assert not sparse_qkv_mosaic.fits(1024, 16, 64, jnp.float32)
  assert not sparse_ff_mosaic.fits(1024, 16, jnp.float32, 64)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='compiles the kernels for a GPU')
@pytest.mark.parametrize('ff_mosaic', [False, True])
def test_compiled_for_the_gpu_a_scaling_transformer_decodes_through_it(ff_mosaic, monkeypatch):
  """As the interpreted test above, compiled: logits and state as XLA's path."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', ff_mosaic)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'VALUE_WIDTH', 2)
  tokens = jnp.asarray(np.random.RandomState(5).randint(1, VOCAB, (2, 11)), jnp.int32)
  expected, expected_state, _ = _decode('xla', LM, tokens)
  got, state, _ = _decode('pallas', LM, tokens)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  for g, e in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state)):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='compiles the kernel for a GPU')
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_compiled_for_the_gpu_the_800m_block_through_it_equals_the_triton_kernel(dtype,
                                                                               monkeypatch):
  """The 800M block (d_model 1024, 16 modules of 64 channels, 16 heads), compiled: its
  multiplicative programs Mosaic GPU's against Triton's."""
  run = lambda: jax.jit(step)(*args)   # traced anew each time
  step, args = _block(1024, 16, 64, 16, dtype, interpret=False, max_len=168)
  with decode_kernels.use('pallas'):
    triton = run()
    monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
    mosaic = run()
  _assert_close(mosaic, triton, 1e-4 if dtype == jnp.float32 else 2e-2)
