"""Sparse QKV's multiplicative, convolution and attention kernels in Mosaic GPU
(`sparse_qkv_mosaic.py`): Pallas' GPU interpreter on the CPU against numpy and the Triton
kernels, a model decoding through them (with the FF block's Mosaic kernels and without),
lowering for an H200 at the 800M shape, and the shapes they decline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import mosaic_kernels
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers import sparse_ff_mosaic
from sparse_scaling.layers import sparse_qkv_block_kernel
from sparse_scaling.layers import sparse_qkv_mosaic
from tests.test_fused_residual import VOCAB
from tests.test_fused_residual import _decodes_as_xla
from tests.test_fused_residual import _two_800m_layers_lowered_for_an_h200
from tests.test_sparse_ff_mosaic import MARKS_PDL
from tests.test_sparse_ff_mosaic import N
from tests.test_sparse_ff_mosaic import RANK
from tests.test_sparse_ff_mosaic import _mosaic_kernels
from tests.utils import lowered_for_an_h200
from tests.utils import needs_gpu
from tests.utils import random_inputs

# The tiny LM of test_fused_residual at shapes the multiplicative and FF kernels take:
# d_model 128 (the warpgroup's threads), 8 modules of 16 channels, 4 heads; with 2 modules of
# 64 channels the convolution kernel too.
LM = dict(d_model=128, n_heads=4, attention_sparsity=8, ff_sparsity=(N, RANK), max_len=8)
SIZES = (3, 3, 1)   # the module kernels of Q, K and V, as at 800M
GRIDS = ("grid_names=('t', 'p', 'c')", "grid_names=('b', 'o', 'g', 'c')",
         "grid_names=('b', 'h', 'c')")   # mixed, conv, attend


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


def _block(d_model, n_modules, n_channels, n_heads, dtype, interpret, max_len=8, index=5,
           seed=3, **kwargs):
  """(decode_step, its arguments): one Sparse QKV block of these shapes, 3 rows, module
  kernels of SIZES, random weights, state and caches in `dtype`, the token at `index`;
  `kwargs` go to decode_step (ff_norm)."""
  x, scale, bias, d, e = _weights(d_model, n_modules, n_channels, dtype, seed=seed)
  rng = np.random.RandomState(seed + 10)
  conv = tuple((jnp.asarray(rng.randn(3, size, n_channels, n_channels) / 8, dtype),
                jnp.asarray(rng.randn(n_channels), dtype)) for size in SIZES)
  state = jnp.asarray(rng.randn(3, 2, n_modules, n_channels), dtype)
  caches = [jnp.asarray(rng.randn(3 * n_heads, max_len, d_model // n_heads), dtype)
            for _ in range(2)]
  y_bias = jnp.asarray(rng.randn(d_model), dtype)
  step = lambda *a: sparse_qkv_block_kernel.decode_step(
      *a, n_heads=n_heads, sizes=SIZES, epsilon=1e-6, interpret=interpret, **kwargs)
  return step, (x, (scale, bias), (d, e, y_bias), conv, state, *caches, jnp.int32(index))


def _assert_close(got, want, tolerance):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tolerance, atol=tolerance)


F32, BOTH = (jnp.float32,), (jnp.float32, jnp.bfloat16)
# (n_modules, n_channels, n_heads, max_len, index, kernels), and the dtypes run by default:
# ~12 s a case and dtype on 2 CPU cores, the others with -m slow.
BLOCK_CASES = [
    ((8, 16, 4, 8, 5, (1, 0, 0)), F32),       # M 16: the multiplicative kernel alone
    ((2, 64, 4, 8, 5, (1, 1, 0)), F32),       # M 64: and the convolutions
    ((2, 64, 4, 8, 11, (1, 1, 0)), ()),       # the token past the caches' end: their last
    ((2, 64, 2, 96, 5, (1, 1, 1)), ()),       # position; heads of 64, caches of 96: and
    ((2, 64, 2, 96, 40, (1, 1, 1)), BOTH),    # attention (blocks of 64 positions from 0 and
    ((2, 64, 2, 96, 130, (1, 1, 1)), F32)]    # 32), the token in the first, in both, past
                                              # the end (in the second)


@pytest.mark.parametrize('n_modules, n_channels, n_heads, max_len, index, kernels, dtype', [
    pytest.param(*case, dtype, marks=() if dtype in default else pytest.mark.slow)
    for dtype in (jnp.float32, jnp.bfloat16) for case, default in BLOCK_CASES])
def test_the_block_through_them_equals_the_block_through_the_triton_kernels(
    n_modules, n_channels, n_heads, max_len, index, kernels, dtype, monkeypatch):
  """`decode_step` at d_model 128, module kernels of 3, 3 and 1, its multiplicative,
  convolution and attention programs Mosaic GPU's (where M and d_head are multiples of 64 and
  the caches hold 64 positions) or Triton's (all compute in float32, LayerNorm(x) and the
  state's newest position rounded to the dtype first): the same output, state (moved on in
  place), caches (K and V written in place) and position."""
  step, args = _block(128, n_modules, n_channels, n_heads, dtype, interpret=True,
                      max_len=max_len, index=index)
  triton = step(*args)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  assert _mosaic_kernels(step, *args, grids=GRIDS) == kernels
  _assert_close(step(*args), triton, 1e-4 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize('value_width', [16, pytest.param(64, marks=pytest.mark.slow)])
def test_chained_its_partial_sums_for_the_ff_block_equal_the_triton_kernels(value_width,
                                                                             monkeypatch):
  """Chained (the next FF block's LayerNorm and C1 given, rank 16), the attention programs'
  partial sums for that block: Mosaic GPU's programs of 64 columns write one for each slice
  of the Triton kernel's value width (4 of 16, or 1 of 64), equal to the Triton programs'
  slice by slice, beside the same output and state."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'VALUE_WIDTH', value_width)
  rng = np.random.RandomState(7)
  ff_norm = tuple(jnp.asarray(rng.randn(*shape), jnp.float32) + mean
                  for shape, mean in (((128,), 1.0), ((128,), 0.0), ((128, 16), 0.0)))
  chained, args = _block(128, 2, 64, 2, jnp.float32, interpret=True, max_len=96, index=40,
                         ff_norm=ff_norm)
  triton = chained(*args)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  assert _mosaic_kernels(chained, *args, grids=GRIDS) == (1, 1, 1)
  mosaic = chained(*args)
  assert mosaic[-1].shape == (3, 128 // value_width, 3, 16)
  _assert_close(mosaic, triton, 1e-4)


def test_the_programs_shares_follow_the_module_constants(monkeypatch):
  """CHANNELS and WIDTH (`decode_shares`' MOSAIC_CHANNELS and MOSAIC_WIDTH) set the programs'
  shares: all 64 channels a multiplicative program (3 tokens, 2 slices of rows, 1 of
  channels) and 32 output channels a convolution program (2 slices of 64); the block's result
  is unchanged."""
  step, args = _block(128, 2, 64, 4, jnp.float32, interpret=True)
  triton = step(*args)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  monkeypatch.setattr(sparse_qkv_mosaic, 'CHANNELS', 64)
  monkeypatch.setattr(sparse_qkv_mosaic, 'WIDTH', 32)
  text = str(jax.make_jaxpr(lambda *a: step(*a))(*args))
  assert "grid=(3, 2, 1), grid_names=('t', 'p', 'c')" in text
  assert "grid=(3, 3, 2, 2), grid_names=('b', 'o', 'g', 'c')" in text
  _assert_close(step(*args), triton, 1e-4)


@pytest.mark.parametrize('attention_sparsity, n_heads, max_len, ff_mosaic, kernels', [
    (8, 4, 4, False, (2, 0, 0)),   # 8 modules of 16 channels: the multiplicative kernel a layer
    pytest.param(2, 4, 4, False, (2, 2, 0), marks=pytest.mark.slow),   # 2 of 64: and the
    pytest.param(2, 4, 4, True, (4, 2, 0), marks=pytest.mark.slow),   # convolutions, and the
    # FF block's units kernel (~60 s; by default in the next, with attention's kernel too)
    (2, 2, 64, True, (4, 2, 2))])  # heads of 64, caches of 64: and attention (~60 s)
def test_a_scaling_transformer_decodes_through_them_chained(
    attention_sparsity, n_heads, max_len, ff_mosaic, kernels, monkeypatch):
  """The two-layer LM, its blocks chained as decoded by default, every layer's attention
  kernels Mosaic GPU's where they fit, and with the FF block's Mosaic kernels its units
  kernel (fed the attention programs' 64 partial sums of 2 columns: from 4 heads of 16
  programs of 2 value columns (Triton's), or from 2 heads of one program of 64 columns, each
  writing 32 (Mosaic GPU's)): every step's logits and the whole state as XLA's path, two
  rows, the caches (of 4 positions) filled past their end."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', ff_mosaic)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'VALUE_WIDTH', 2)
  lm = dict(LM, attention_sparsity=attention_sparsity, n_heads=n_heads, max_len=max_len)
  tokens = jnp.asarray(np.random.RandomState(5).randint(1, VOCAB, (2, 7)), jnp.int32)
  counts = _decodes_as_xla('interpret', lm, tokens, count=("grid_names=('t', ", *GRIDS[1:]))
  assert counts == kernels   # the kernels with a grid over tokens; convolutions; attention


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('ff_mosaic, attend', [(False, True), (True, True), (True, False)])
def test_two_800m_layers_decode_through_them_when_lowered_for_an_h200(ff_mosaic, attend, dtype,
                                                                       monkeypatch):
  """Two 800M FF+QKV layers (d_model 1024, 16 modules of 64 channels, 16 heads of 64,
  caches of 168), one decoding step lowered for an abstract H200: a layer's multiplicative,
  convolution and attention kernels Mosaic GPU's (attention Triton's without MOSAIC_ATTEND),
  and with the FF block's, its units kernel (the whole layer Mosaic GPU's); the convolutions
  write K and V into the caches in place and attention the state and the position (their
  custom calls' outputs alias those inputs); from jax 0.11 each Mosaic kernel is marked for
  Programmatic Dependent Launch, without which its wait would hide nothing."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC_ATTEND', attend)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', ff_mosaic)
  n_mosaic = 2 + attend + ff_mosaic   # a layer's
  text = _two_800m_layers_lowered_for_an_h200(dtype=dtype, triton=4 - n_mosaic)
  assert text.count('@mosaic_gpu') == 2 * n_mosaic
  assert text.count('mosaic_gpu.uses_pdl') == (2 * n_mosaic if MARKS_PDL else 0)
  aliased = [line for line in text.split('\n')
             if '@mosaic_gpu' in line and 'output_operand_aliases' in line]
  assert len(aliased) == 2 * (1 + attend)   # a layer's convolutions and attention


@pytest.mark.parametrize('d_model, n_modules, n_channels, dtype, fits', [
    (1024, 16, 64, jnp.float32, True), (1024, 16, 64, jnp.bfloat16, True),   # 800M
    (9216, 64, 144, jnp.float32, True),    # 17B (where the fused block declines)
    (128, 16, 8, jnp.float32, False),      # fewer channels than a program's 16
    (128, 8, 24, jnp.float32, False),      # channels that 16 does not divide
    (192, 8, 24, jnp.float32, False),      # d_model not a multiple of 128
    (1024, 512, 2, jnp.float32, False)])   # more modules than a copy's 256
def test_shapes_the_multiplicative_kernel_takes(d_model, n_modules, n_channels, dtype, fits):
  assert sparse_qkv_mosaic.fits(d_model, n_modules, n_channels, dtype) == fits


@pytest.mark.parametrize('d_model, n_modules, n_heads, dtype, parts, fits', [
    (1024, 16, 16, jnp.float32, 16, True), (1024, 16, 16, jnp.bfloat16, 16, True),   # 800M
    (128, 2, 4, jnp.float32, 2, True),        # 2 modules of 64, heads of 32
    (9216, 64, 96, jnp.float32, 16, False),   # 17B: 144 channels, not a multiple of 64
    (128, 8, 4, jnp.float32, 2, False),       # 16 channels, under the matrix layout's 64 rows
    (256, 2, 32, jnp.float32, 4, False),      # heads of 8, under a program's 16 channels
    (1024, 4, 16, jnp.float32, 16, True),     # M 256: 202 KB of shared memory
    (1024, 2, 16, jnp.float32, 16, False),    # M 512: 404 KB, over CONV_BYTES
    (1024, 2, 16, jnp.bfloat16, 1, True)])    # M 512 in bfloat16, y's sums added: 160 KB
def test_shapes_the_convolution_kernel_takes(d_model, n_modules, n_heads, dtype, parts, fits):
  n_channels = d_model // n_modules
  assert sparse_qkv_mosaic.convolutions_fit(d_model, n_modules, n_channels, n_heads, dtype,
                                            n_state=2, largest=3, parts=parts) == fits


@pytest.mark.parametrize('d_model, n_heads, max_len, n_state, dtype, rank, partial, fits', [
    (1024, 16, 168, 2, jnp.float32, 16, 16, True),      # 800M, chained
    (1024, 16, 168, 2, jnp.bfloat16, 16, 16, True),
    (1024, 16, 168, 2, jnp.float32, None, None, True),  # unchained
    (128, 2, 64, 1, jnp.float32, 16, 2, True),          # one position of state, 64 of cache
    (128, 4, 168, 2, jnp.float32, 16, 16, False),       # heads of 32, under a program's 64
    (1024, 16, 32, 2, jnp.float32, 16, 16, False),      # caches under a block's 64 positions
    (1024, 16, 320, 2, jnp.float32, 16, 16, True),      # 5 blocks of K and V: 160 KB
    (1024, 16, 384, 2, jnp.float32, 16, 16, False),     # 6: over CACHE_BYTES
    (1024, 16, 384, 2, jnp.bfloat16, 16, 16, True),     # in bfloat16, 96 KB
    (1024, 16, 168, 0, jnp.float32, 16, 16, False),     # no state
    (1024, 16, 168, 2, jnp.float32, 12, 16, False),     # rank not a multiple of 8
    (1024, 16, 168, 2, jnp.float32, 16, 48, False)])    # partial sums of 48 columns
def test_shapes_the_attention_kernel_takes(d_model, n_heads, max_len, n_state, dtype, rank,
                                           partial, fits):
  assert sparse_qkv_mosaic.attend_fits(d_model, n_heads, max_len, n_state, dtype, rank,
                                       partial) == fits


def test_shapes_they_decline_go_to_triton_and_a_direct_call_is_refused(monkeypatch):
  """A Sparse QKV block of 16 modules of 8 channels runs Triton's three kernels; called
  directly, each Mosaic kernel says which shapes it takes in one line."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  x, scale, bias, d, e = _weights(128, 16, 8)
  conv = tuple((jnp.zeros((3, 3, 8, 8)), jnp.zeros(8)) for _ in range(3))
  caches = [jnp.zeros((3 * 4, 8, 32)) for _ in range(2)]
  state = jnp.zeros((3, 2, 16, 8))
  step = lambda *a: sparse_qkv_block_kernel.decode_step(
      *a, n_heads=4, sizes=(3, 3, 3), epsilon=1e-6)
  with decode_kernels.use('pallas'):
    text = lowered_for_an_h200(step, x, (scale, bias), (d, e, jnp.zeros(128)), conv, state,
                               *caches, jnp.int32(0))
  assert '@mosaic_gpu' not in text and text.count('xla.gpu.triton') == 3
  with pytest.raises(ValueError, match=r'mixed_parts: d_model 128, 16 modules and 8 channels '
                                       r'\(16 a program\) do not fit'):
    sparse_qkv_mosaic.mixed_parts(x, scale, bias, d, e, 1e-6)
  with pytest.raises(ValueError, match=r'convolutions: 16 modules of 8 channels, 4 heads '
                                       r'\(16 channels a program\) do not fit'):
    sparse_qkv_mosaic.convolutions(jnp.zeros(1, jnp.int32), jnp.zeros((3, 2, 16, 8)),
                                   jnp.zeros(128), state, conv, *caches, n_heads=4,
                                   sizes=(3, 3, 3))
  with pytest.raises(ValueError, match=r'attend: d_model 128, 4 heads, 8 positions, a state '
                                       r'of 2, rank None and 64 columns a partial sum do not'):
    sparse_qkv_mosaic.attend(jnp.zeros(1, jnp.int32), x, x, *caches, jnp.zeros((3, 2, 128)),
                             jnp.zeros(128), state.reshape(3, 2, 128), jnp.zeros(1, jnp.int32),
                             n_heads=4)


def test_without_the_backend_the_mosaic_kernels_decline(monkeypatch):
  """Where JAX has no Mosaic GPU backend (`mosaic_kernels.MISSING` says why), no shape fits,
  so the Triton kernels run."""
  monkeypatch.setattr(mosaic_kernels, 'MISSING', 'no backend')
  assert not sparse_qkv_mosaic.fits(1024, 16, 64, jnp.float32)
  assert not sparse_qkv_mosaic.convolutions_fit(1024, 16, 64, 16, jnp.float32, n_state=2,
                                                largest=3, parts=16)
  assert not sparse_qkv_mosaic.attend_fits(1024, 16, 168, 2, jnp.float32, 16, 16)
  assert not sparse_ff_mosaic.fits(1024, 16, jnp.float32, 64)


@needs_gpu('compiles the kernels for a GPU')
@pytest.mark.parametrize('ff_mosaic, n_heads, max_len, length', [
    (False, 4, 8, 11), (True, 4, 8, 11), (True, 2, 64, 70)])
def test_compiled_for_the_gpu_a_scaling_transformer_decodes_through_them(
    ff_mosaic, n_heads, max_len, length, monkeypatch):
  """As the interpreted test above (2 modules of 64 channels: the multiplicative and the
  convolution kernels Mosaic GPU's, the units kernel with `ff_mosaic`, and attention with
  heads of 64 and caches of 64), compiled: logits and state as XLA's path, the caches filled
  past their end."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', ff_mosaic)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'VALUE_WIDTH', 2)
  lm = dict(LM, attention_sparsity=2, n_heads=n_heads, max_len=max_len)
  tokens = jnp.asarray(np.random.RandomState(5).randint(1, VOCAB, (2, length)), jnp.int32)
  _decodes_as_xla('pallas', lm, tokens, tolerance=1e-4)


@needs_gpu('compiles the kernel for a GPU')
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_compiled_for_the_gpu_the_800m_block_through_them_equals_the_triton_kernels(
    dtype, monkeypatch):
  """The 800M block (d_model 1024, 16 modules of 64 channels, 16 heads, caches of 168),
  compiled: its multiplicative, convolution and attention programs Mosaic GPU's against
  Triton's, the token in the caches' last block."""
  run = lambda: jax.jit(step)(*args)   # traced anew each time
  step, args = _block(1024, 16, 64, 16, dtype, interpret=False, max_len=168, index=140)
  with decode_kernels.use('pallas'):
    triton = run()
    monkeypatch.setattr(sparse_qkv_block_kernel, 'MOSAIC', True)
    mosaic = run()
  _assert_close(mosaic, triton, 1e-4 if dtype == jnp.float32 else 2e-2)
