"""Sparse FF's LayerNorm-controller and units kernels in Mosaic GPU (`sparse_ff_mosaic.py`):
Pallas' GPU interpreter on the CPU against the numpy reference, the Triton kernels and XLA's
path (a model decoding through them, chained after the attention blocks and not), lowering for
an H200 at Table 1's shapes, and the shapes they decline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_scaling.layers import SparseFF
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import fused_residual
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers import sparse_ff_mosaic
from sparse_scaling.layers import sparse_qkv_block_kernel
from tests.test_fused_residual import VOCAB
from tests.test_fused_residual import _decode
from tests.test_fused_residual import _decodes_as_xla
from tests.test_fused_residual import _two_800m_layers_lowered_for_an_h200
from tests.test_sparse_ff import _reference
from tests.utils import initialized
from tests.utils import lowered_for_an_h200
from tests.utils import needs_gpu
from tests.utils import random_inputs

try:
  from jax._src.pallas.mosaic_gpu import core as mosaic_core
except ImportError:   # no Mosaic GPU backend: the kernels decline
  mosaic_core = None
# Whether this JAX marks a kernel that waits for Programmatic Dependent Launch (0.11 and later).
MARKS_PDL = hasattr(mosaic_core, 'PdlEffect')

# The smallest shapes Mosaic GPU's layouts take: d_model 128 (the warpgroup's threads), N 64
# (the matrix units' tiles), two blocks; rank 16, 800M's.
D_MODEL, D_FF, N, RANK = 128, 128, 64, 16


def _mosaic_kernels(fn, *args, grids=None):
  """How many Mosaic GPU kernels (their grids, named ('t', ...)) fn(*args) runs, traced anew;
  given `grids` (texts of grid names), how many of each, a tuple."""
  text = str(jax.make_jaxpr(lambda *a: fn(*a))(*args))
  return (text.count("grid_names=('t', ") if grids is None
          else tuple(text.count(grid) for grid in grids))


def _layer(seed=0, d_ff=D_FF, n=N, rank=RANK):
  x = random_inputs(3, D_MODEL, seed=seed)
  layer = initialized(SparseFF(d_ff, n, d_lowrank=rank, mode='predict'), x, seed=seed + 1)
  return layer, x


def test_units_in_the_interpreter_equal_the_reference_with_partials_residual_and_a_tie(
    monkeypatch):
  """Three tokens, z as two partial sums, a residual; block 0's logits all 0, a tie that unit
  0 must win, as argmax does."""
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  layer, x = _layer()
  _, (c1, c2, cb), (w1, b1, w2, b2), _ = layer.weights
  c2, cb = c2.at[:, 0].set(0.0), cb.at[0].set(0.0)
  layer.weights = ((), (c1, c2, cb), (w1, b1, w2, b2), ())
  expected, chosen = _reference(layer, x)
  assert (chosen[:, 0] == 0).all()
  z = x @ c1
  partials = jnp.stack([0.25 * z, 0.75 * z], axis=1)                               # [T, 2, r]
  residual = random_inputs(3, D_MODEL, seed=9)
  units = lambda *a: sparse_ff_kernel.sparse_units(*a, interpret=True, residual=residual)
  args = (x, partials, c2, cb, w1, b1, w2, b2)
  assert _mosaic_kernels(units, *args) == 1
  got = units(*args)
  np.testing.assert_allclose(got, expected + residual, rtol=1e-5, atol=1e-4)
  parts = sparse_ff_mosaic.units_parts(x, partials, c2, cb, w1, b1, w2, b2, interpret=True)
  assert parts.shape == (3, D_FF // N, D_MODEL) and parts.dtype == jnp.float32


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_norm_controller_in_the_interpreter_equals_the_triton_kernel(dtype):
  """The LayerNorm and the controller's first product over 4 slices of 64 rows, on rows
  whose mean (1000) is large beside their spread, where a one-pass variance would lose it:
  LayerNorm(x) and each partial sum as Triton's kernel (64 rows a program too) computes them."""
  x = jnp.asarray(1000.0 + random_inputs(3, 256), dtype)
  scale, bias = (jnp.asarray(random_inputs(256, seed=s), dtype) for s in (1, 2))
  c1 = jnp.asarray(random_inputs(256, RANK, seed=3), dtype)
  normed, z = sparse_ff_mosaic.norm_controller(x, scale, bias, c1, 1e-6, interpret=True)
  want_normed, want_z = sparse_ff_kernel.norm_controller(x, scale, bias, c1, 1e-6,
                                                         interpret=True)
  assert normed.dtype == dtype and z.shape == want_z.shape == (3, 4, RANK)
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(want_normed, np.float32),
                             rtol=tolerance, atol=tolerance)
  np.testing.assert_allclose(z, want_z, rtol=tolerance, atol=tolerance * 10)


def test_bfloat16_units_equal_the_triton_kernel(monkeypatch):
  """bfloat16 weights, computed in float32 by both."""
  layer, x = _layer(seed=3)
  _, (c1, c2, cb), units, _ = jax.tree.map(lambda w: w.astype(jnp.bfloat16), layer.weights)
  x = jnp.asarray(x, jnp.bfloat16)
  z = (x @ c1).astype(jnp.float32)
  triton = sparse_ff_kernel.sparse_units(x, z, c2, cb, *units, interpret=True)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  units_call = lambda *a: sparse_ff_kernel.sparse_units(*a, interpret=True)
  assert _mosaic_kernels(units_call, x, z, c2, cb, *units) == 1
  mosaic = units_call(x, z, c2, cb, *units)
  assert mosaic.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(mosaic, np.float32), np.asarray(triton, np.float32),
                             rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_units_writing_activations_for_w2s_kernel_equal_the_triton_kernels(dtype, monkeypatch):
  """Where the parts would be large (MAX_PARTS_BYTES 0 here; 17B's 9.4 MB), the Mosaic units
  kernel writes each block's activation and chosen row and Triton's `down` kernel multiplies
  W2's rows: z as two partial sums, a residual, block 0's logits all 0 (a tie that unit 0
  must win), against the Triton kernels' same form and, in float32, the numpy reference."""
  monkeypatch.setattr(sparse_ff_kernel, 'MAX_PARTS_BYTES', 0)
  layer, x = _layer(seed=11)
  _, (c1, c2, cb), (w1, b1, w2, b2), _ = layer.weights
  c2, cb = c2.at[:, 0].set(0.0), cb.at[0].set(0.0)
  layer.weights = ((), (c1, c2, cb), (w1, b1, w2, b2), ())
  expected, chosen = _reference(layer, x)
  assert (chosen[:, 0] == 0).all()
  residual = random_inputs(3, D_MODEL, seed=12)
  cast = lambda a: jnp.asarray(a, dtype)
  z = (cast(x) @ cast(c1)).astype(jnp.float32)
  args = (cast(x), jnp.stack([0.25 * z, 0.75 * z], axis=1), *map(cast, (c2, cb, w1, b1, w2, b2)))
  units = lambda *a: sparse_ff_kernel.sparse_units(*a, interpret=True, residual=cast(residual))
  triton = units(*args)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  assert _mosaic_kernels(units, *args) == 1
  mosaic = units(*args)
  assert mosaic.dtype == dtype
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(mosaic, np.float32), np.asarray(triton, np.float32),
                             rtol=tolerance, atol=tolerance)
  hidden, rows = sparse_ff_mosaic.units_hidden(*args[:6], interpret=True)
  assert hidden.shape == rows.shape == (3, D_FF // N) and rows.dtype == jnp.int32
  if dtype == jnp.float32:
    np.testing.assert_allclose(mosaic, expected + residual, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(rows, chosen + N * np.arange(D_FF // N))


def test_a_predict_layer_decodes_through_it(monkeypatch):
  """SparseFF in predict mode, its units kernel chosen by `decode_kernels.use`, interpreted."""
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  layer, x = _layer(seed=5)
  expected, _ = _reference(layer, x)
  with decode_kernels.use('interpret'):
    assert _mosaic_kernels(lambda x: layer.pure_fn(x, layer.weights, layer.state, None)[0],
                           x) == 1
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-4)


def test_a_scaling_transformer_decodes_through_it_unchained(monkeypatch):
  """The two-layer LM of test_fused_residual at shapes Mosaic GPU takes (d_model 128, N 64,
  rank 16), its FF blocks' kernels not chained to the attention blocks' (the units' z from
  the LayerNorm kernel's partial sums): each layer's FF kernels are the Mosaic ones, and every
  step's logits and the whole state equal XLA's path, two rows, the caches filled past their
  end."""
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  monkeypatch.setattr(fused_residual, 'CHAIN', False)
  kwargs = dict(d_model=128, n_heads=4, attention_sparsity=8, ff_sparsity=(N, RANK), max_len=8)
  tokens = jnp.asarray(np.random.RandomState(1).randint(1, VOCAB, (2, 11)), jnp.int32)
  n_mosaic = _decodes_as_xla('interpret', kwargs, tokens, count="grid_names=('t', ")
  assert n_mosaic == 4   # the Mosaic kernels' grids: the LayerNorm's and the units', a layer


def test_a_scaling_transformer_decodes_through_it_chained(monkeypatch):
  """The same LM with its blocks chained, as decoded by default: the units kernel finishes
  the FF block's LayerNorm from the attention kernel's partial sums, of which the Mosaic
  kernel takes multiples of 64 (attention programs of 2 value columns: 4 heads of 16 programs;
  800M: 16 heads of 4). Each layer's units kernel is the Mosaic one; logits and state as XLA's
  path."""
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'VALUE_WIDTH', 2)
  kwargs = dict(d_model=128, n_heads=4, attention_sparsity=8, ff_sparsity=(N, RANK), max_len=8)
  tokens = jnp.asarray(np.random.RandomState(2).randint(1, VOCAB, (2, 11)), jnp.int32)
  n_mosaic = _decodes_as_xla('interpret', kwargs, tokens, count="grid_names=('t', ")
  assert n_mosaic == 2   # the units kernel's grid, once a layer


@pytest.mark.slow   # ~1 min: covered by default by the bfloat16 units and the chained tests
def test_bfloat16_decoding_through_it_chained_follows_the_triton_kernel(monkeypatch):
  """The chained LM with bfloat16 weights and state: the same logits, within bfloat16's
  rounding, as with the Triton units kernel (both compute in float32)."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'VALUE_WIDTH', 2)
  kwargs = dict(d_model=128, n_heads=4, attention_sparsity=8, ff_sparsity=(N, RANK), max_len=8)
  tokens = jnp.asarray(np.random.RandomState(3).randint(1, VOCAB, (2, 8)), jnp.int32)
  triton, _, _ = _decode('interpret', kwargs, tokens, dtype=jnp.bfloat16)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  mosaic, _, n_mosaic = _decode('interpret', kwargs, tokens, dtype=jnp.bfloat16,
                                count="grid_names=('t', ")
  assert n_mosaic == 2
  np.testing.assert_allclose(np.asarray(mosaic, np.float32), np.asarray(triton, np.float32),
                             rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_two_800m_layers_decode_through_it_chained_when_lowered_for_an_h200(dtype,
                                                                             monkeypatch):
  """Two 800M FF+QKV layers (64 partial sums from the attention kernel), one decoding step
  lowered for an abstract H200: a layer's three attention kernels Triton's, its units kernel
  Mosaic GPU's."""
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  text = _two_800m_layers_lowered_for_an_h200(dtype=dtype, triton=3)
  assert text.count('@mosaic_gpu') == 2


@needs_gpu('compiles the kernels for a GPU')
@pytest.mark.parametrize('chain', [False, True])
def test_compiled_for_the_gpu_a_scaling_transformer_decodes_through_them(chain, monkeypatch):
  """As the interpreted tests above, compiled: logits and state as XLA's path."""
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  monkeypatch.setattr(fused_residual, 'CHAIN', chain)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'VALUE_WIDTH', 2)
  kwargs = dict(d_model=128, n_heads=4, attention_sparsity=8, ff_sparsity=(N, RANK), max_len=8)
  tokens = jnp.asarray(np.random.RandomState(1).randint(1, VOCAB, (2, 11)), jnp.int32)
  _decodes_as_xla('pallas', kwargs, tokens, tolerance=1e-4)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('d_model, d_ff, n, rank, mosaic, triton', [
    (1024, 6144, 64, 16, 2, 0),     # 800M: the LayerNorm's kernel and the units'
    (9216, 65536, 256, 32, 2, 1)])  # 17B: the LayerNorm's and the units'; W2's rows Triton's
def test_the_ff_block_lowers_to_mosaic_gpu_kernels_for_an_h200_unchained(
    d_model, d_ff, n, rank, mosaic, triton, dtype, monkeypatch):
  """An FF block unchained (`ff_block` without partials, as at 17B, where the attention block
  declines), lowered for an abstract H200 at Table 1's shapes: at 800M the LayerNorm kernel's
  16 partial sums go into the units kernel, both Mosaic GPU's; at 17B the units' parts would
  be large, so the Mosaic units kernel writes each block's activation and chosen row, and
  Triton's `down` kernel multiplies W2's rows. From jax 0.11 each Mosaic kernel is marked for
  Programmatic Dependent Launch."""
  blocks = d_ff // n
  controller = [(d_model, rank), (rank, blocks, n), (blocks, n)]
  units = [(blocks, n, d_model), (blocks, n), (blocks, n, d_model), (d_model,)]
  args = [jax.ShapeDtypeStruct(shape, dtype)
          for shape in [(1, d_model), (d_model,), (d_model,), *controller, *units]]
  block = lambda x, scale, bias, c1, c2, cb, *units: sparse_ff_kernel.ff_block(
      x, scale, bias, (c1, c2, cb), units, 1e-6)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  text = lowered_for_an_h200(block, *args)
  assert text.count('@mosaic_gpu') == mosaic and text.count('xla.gpu.triton') == triton
  assert text.count('mosaic_gpu.uses_pdl') == (mosaic if MARKS_PDL else 0)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_lowers_to_mosaic_gpu_for_an_h200_at_the_800m_shape(dtype, monkeypatch):
  """The 800M layer (d_model 1024, d_ff 6144, N 64, rank 16) as `SparseFFDecode` calls it:
  one Mosaic GPU kernel and no Triton one; without MOSAIC, Triton's."""
  blocks = 6144 // 64
  shapes = [(1, 1024), (1, 16), (16, blocks, 64), (blocks, 64), (blocks, 64, 1024),
            (blocks, 64), (blocks, 64, 1024), (1024,)]
  args = [jax.ShapeDtypeStruct(shape, jnp.float32 if i == 1 else dtype)
          for i, shape in enumerate(shapes)]
  lowered = lambda: lowered_for_an_h200(   # a new function each time: traced anew
      lambda *a: sparse_ff_kernel.sparse_units(*a), *args)
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  text = lowered()
  assert text.count('@mosaic_gpu') == 1 and 'xla.gpu.triton' not in text
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', False)
  text = lowered()
  assert '@mosaic_gpu' not in text and 'xla.gpu.triton' in text


@needs_gpu('compiles the kernel for a GPU')
@pytest.mark.parametrize('parts_bytes', [None, 0])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_compiled_for_the_gpu_it_equals_triton_at_the_800m_shape(dtype, parts_bytes,
                                                                 monkeypatch):
  """The 800M layer (d_model 1024, d_ff 6144, N 64, rank 16), one token, compiled: the Mosaic
  GPU kernel against the Triton one (both compute in float32 whatever the weights' dtype),
  writing the parts, and with MAX_PARTS_BYTES 0 the activations for W2's kernel (17B's form)."""
  if parts_bytes is not None:
    monkeypatch.setattr(sparse_ff_kernel, 'MAX_PARTS_BYTES', parts_bytes)
  x = random_inputs(1, 1, 1024, seed=1)
  layer = initialized(SparseFF(6144, 64, d_lowrank=16, mode='predict'), x, seed=2)
  weights = jax.tree.map(lambda w: w.astype(dtype), layer.weights)
  x = jnp.asarray(x, dtype)
  run = lambda: np.asarray(jax.jit(lambda x, w: layer.pure_fn(x, w, layer.state, None)[0])(
      x, weights), np.float32)   # a new function each time: traced anew
  with decode_kernels.use('pallas'):
    triton = run()
    monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
    mosaic = run()
  tolerance = 1e-4 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(mosaic, triton, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize('d_model, rank, n, dtype, fits', [
    (1024, 16, 64, jnp.float32, True), (1024, 16, 64, jnp.bfloat16, True),   # 800M
    (9216, 32, 256, jnp.float32, True),                                       # 17B
    (1024, 16, 32, jnp.float32, False),     # N under the matrix units' 64 rows
    (1024, 12, 64, jnp.float32, False),     # a rank that is not a multiple of 8
    (1024, 8, 64, jnp.bfloat16, False),     # a rank of 16 bytes, under the 32-byte swizzle
    (1000, 16, 64, jnp.float32, False)])    # d_model not a multiple of 128
def test_shapes_it_takes(d_model, rank, n, dtype, fits):
  assert sparse_ff_mosaic.fits(d_model, rank, dtype, n) == fits


def test_shapes_it_declines_go_to_triton_and_a_direct_call_is_refused(monkeypatch):
  """N 32 runs as Triton's kernel; called directly, the Mosaic kernel says which shapes it
  takes in one line."""
  monkeypatch.setattr(sparse_ff_kernel, 'MOSAIC', True)
  layer, x = _layer(seed=7, d_ff=64, n=32)
  _, (c1, c2, cb), units, _ = layer.weights
  text = lowered_for_an_h200(sparse_ff_kernel.sparse_units, x, x @ c1, c2, cb, *units)
  assert '@mosaic_gpu' not in text and 'xla.gpu.triton' in text
  with pytest.raises(ValueError, match=r'units_parts: .*N 32 do not fit'):
    sparse_ff_mosaic.units_parts(x, (x @ c1)[:, None], c2, cb, *units)
