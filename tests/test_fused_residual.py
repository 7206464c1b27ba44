"""Blocks that decode a token through kernels fused across their layers (`fused_residual.py`).

A Scaling Transformer's sparse blocks in predict mode are `SparseQKVResidual` and
`SparseFFResidual`: `tl.Residual` itself (same weights, same state) whose one-token calls run
as Pallas kernels on a GPU (`sparse_qkv_block_kernel.py`, `sparse_ff_kernel.py`). Here the
kernels run in Pallas' interpreter (any backend) against XLA's path, and are lowered for a GPU.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from sparse_scaling import decoding
from sparse_scaling.layers import attention_kernel
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import fused_residual
from sparse_scaling.layers import sparse_ff_controller_kernel
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers import sparse_qkv
from sparse_scaling.layers import sparse_qkv_block_kernel
from sparse_scaling.layers import sparse_qkv_fields_kernel
from sparse_scaling.layers import sparse_qkv_kernel
from sparse_scaling.layers import SparseFFResidual
from sparse_scaling.layers import SparseQKVResidual
from sparse_scaling.models import ScalingTransformerLM
from tests.utils import lowered_for_an_h200
from tests.utils import needs_gpu

VOCAB = 40
# Settings of sparse_ff_kernel's constants; the others are the QKV block's.
FF_SHARES = ('MAX_PARTS_BYTES', 'COLUMNS', 'GATHER', 'GROUP')


def _lm(mode, d_model=64, n_heads=4, attention_sparsity=8, ff_sparsity=(8, 16), max_len=16,
        **kwargs):
  return ScalingTransformerLM(VOCAB, d_model, d_ff=128, n_layers=2, n_heads=n_heads,
                              max_len=max_len, dropout=0.0, ff_sparsity=ff_sparsity,
                              attention_sparsity=attention_sparsity, mode=mode, **kwargs)


def _decode(kernel, model_kwargs, tokens, prompt=3, dtype=jnp.float32, count='pallas_call',
            lay_out=False):
  """Logits of each decoded token, the final state, decoding `tokens` after a prompt, and how
  often `count` (a string, or a tuple of them) appears in the step's jaxpr; with `lay_out`,
  the weights laid out as a generation lays them out (`decoding.laid_out`)."""
  model = _lm('predict', **model_kwargs)
  model.init(shapes.signature(tokens[:, :1]), rng=jax.random.PRNGKey(0))
  cast = lambda tree: jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
  model.weights, model.state = cast(model.weights), cast(model.state)
  model(tokens[:, :prompt])
  with decode_kernels.use(kernel):
    weights = decoding.laid_out(model, model.weights) if lay_out else model.weights
    step = jax.jit(lambda w, s, t: model.pure_fn(t, w, s, None))    # traced in this block
    jaxpr = str(jax.make_jaxpr(step)(weights, model.state, tokens[:, :1]))
    state, logits = model.state, []
    for i in range(prompt, tokens.shape[1]):
      out, state = step(weights, state, tokens[:, i:i + 1])
      logits.append(np.asarray(out))
  counts = (jaxpr.count(count) if isinstance(count, str)
            else tuple(jaxpr.count(text) for text in count))
  return np.concatenate(logits, axis=1), state, counts


def _decodes_as_xla(kernel, model_kwargs, tokens, tolerance=1e-5, prompt=3,
                    count='pallas_call', lay_out=False):
  """Decodes `tokens` through `kernel` and through XLA's path: every step's logits and the
  final state agree to `tolerance`. Returns how often `count` appears in the kernel's step
  (`_decode`, `lay_out` there for both)."""
  expected, expected_state, _ = _decode('xla', model_kwargs, tokens, prompt=prompt,
                                        lay_out=lay_out)
  got, state, counts = _decode(kernel, model_kwargs, tokens, prompt=prompt, count=count,
                               lay_out=lay_out)
  np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
  for g, e in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state)):
    np.testing.assert_allclose(g, e, rtol=tolerance, atol=tolerance)
  return counts


@pytest.mark.parametrize('d_model, n_heads, attention_sparsity, settings', [
    (64, 4, 8, {}), (64, 4, 2, dict(PREFETCH=True)), (64, 4, 8, dict(L2_PERSIST=1)),
    (64, 4, 8, dict(PREFETCH_CACHES=True, PREFETCH_STATE=True)),
    (256, 4, 16, {}), (256, 4, 32, {}),
    (16, 2, 4, {}),
    (48, 4, 4, dict(MIXED_CHANNELS=None)),
    (64, 4, 8, dict(ROWS=16, MAX_PARTS=2, MODULES=4, SPLIT=2, MIXED_CHANNELS=4,
                    MAX_PARTS_BYTES=0, COLUMNS=8, GATHER=4, GROUP=2)),
    (768, 8, 16, dict(CONV_PROGRAMS=8, STATS_IN_KERNEL=512))])
def test_fused_blocks_equal_xla_step_by_step(d_model, n_heads, attention_sparsity, settings,
                                             monkeypatch):
  """Modules and heads of different sizes (8 modules of 8 channels against 4 heads of 16;
  2 of 32 against 4 of 16; 16 of 16 against 4 of 64, where the multiplicative layer is one
  matrix product per program; 32 of 8 against 4 of 64, multiplicative programs of all 32
  modules (SPLIT 64, as at 17B's 64); 4 of 4 against 2 of 8, fewer channels than a program's
  16),
  sides that are not powers of 2 (d_model 48: modules and heads of 12, 3 partial sums of the
  multiplicative layer, each program taking all 12 channels, and heads, loaded as 8 and 4),
  programs that convolve several modules with the partial sums added first and
  multiplicative programs of 2 modules and 4 of the 8 channels each (and, in the same case,
  the FF block with W2's chosen rows multiplied by a kernel of their own, as at 17B where the
  units programs' parts would be large: programs of 8 columns gathering 4 rows a load, after
  units programs of two blocks), and d_model 768 as 17B's shapes in small: 16 modules of 48
  channels (multiplicative programs of 16 of them, a matrix product each), 12 partial sums,
  heads of 96, programs of 16 channels and 16 modules where 16 channels of one module each
  would make too many programs, and the LayerNorm's statistics computed once by XLA for the
  multiplicative programs (above STATS_IN_KERNEL, as at 17B),
  two rows, the caches filled past their end: each step's logits and the whole state
  (convolution states, caches, positions) as XLA's path. Each kernel lets the next launch
  early (`decode_kernels.launch_dependents`, nothing in the interpreter). With PREFETCH (2
  modules of 32 channels) the kernels also take the next kernels' weights, to ask the L2
  cache for them (nothing in the interpreter), and still compute the same, as they do asking
  the L2 cache to keep their fixed weights (L2_PERSIST) and the multiplicative programs
  asking for the KV caches and the convolution's state (PREFETCH_CACHES, PREFETCH_STATE).
  Each case also lowers for a GPU (an abstract H200 off one) to as many Triton kernels:
  Triton's rules hold for its shapes, which Pallas' interpreter does not check."""
  for name, value in settings.items():
    module = (sparse_ff_kernel if name in FF_SHARES else
              decode_kernels if name in ('PREFETCH', 'L2_PERSIST') else sparse_qkv_block_kernel)
    monkeypatch.setattr(module, name, value)
  kwargs = dict(d_model=d_model, n_heads=n_heads, attention_sparsity=attention_sparsity)
  tokens = jnp.asarray(np.random.RandomState(1).randint(1, VOCAB, (2, 18)), jnp.int32)
  expected, expected_state, n_xla = _decode('xla', kwargs, tokens)
  got, state, n_kernels = _decode('interpret', kwargs, tokens, count='launch_dependents')
  assert n_xla == 0
  # per block: mixed, conv, attend; norm, units (and down, multiplying W2's rows)
  # per layer: mixed, conv, attend (chained: with the FF LayerNorm's partial sums); units (and
  # down, multiplying W2's rows)
  assert n_kernels == 2 * (3 + 1 + (settings.get('MAX_PARTS_BYTES') == 0))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for g, e in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
  model, token = _lm('predict', **kwargs), jax.ShapeDtypeStruct((2, 1), jnp.int32)
  weights, state = model.weights_and_state_signature(token)
  with decode_kernels.use('pallas'):
    text = lowered_for_an_h200(lambda w, s, t: model.pure_fn(t, w, s, None), weights, state,
                               token)
  assert text.count('xla.gpu.triton') == n_kernels


@pytest.mark.parametrize('d_model, n_heads, attention_sparsity', [(64, 4, 8), (48, 4, 4)])
def test_blocks_each_alone_equal_xla_step_by_step(d_model, n_heads, attention_sparsity,
                                                  monkeypatch):
  """`FusedDecoder` without CHAIN: each block runs its own kernels, the FF block its
  LayerNorm and the controller's first product in a kernel of its own (5 a layer), as where
  an FF block follows no attention block that takes its partial sums. Logits and the whole
  state as XLA's path, two rows, the caches filled past their end; d_model 48 takes heads of
  12 in slices of 4."""
  monkeypatch.setattr(fused_residual, 'CHAIN', False)
  kwargs = dict(d_model=d_model, n_heads=n_heads, attention_sparsity=attention_sparsity)
  tokens = jnp.asarray(np.random.RandomState(5).randint(1, VOCAB, (2, 18)), jnp.int32)
  assert _decodes_as_xla('interpret', kwargs, tokens) == 2 * (3 + 2)


@pytest.mark.parametrize('first, step', [(0, 1), (2, 1), (0, 3), (1, 2)])
@pytest.mark.parametrize('max_len', [16, 14])
def test_attention_programs_read_long_caches_in_a_loop_as_xla_step_by_step(max_len, first,
                                                                          step, monkeypatch):
  """From FILLED_MIN_LEN positions (here 8) the attention programs read the caches' first
  FILLED_FIRST blocks of POSITIONS (here 0, 1 or 2 blocks of 4) up front and the others in a
  loop (of 14 positions, the last from 10, overlapping the one before), FILLED_STEP blocks a
  step (1, 2 or 3: a last step may reach past the caches' end), as far as the token's
  position: each step's logits and the whole state as XLA's path, two rows, the tokens from
  the first block to past the caches' end (every block then)."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'POSITIONS', 4)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'FILLED_MIN_LEN', 8)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'FILLED_FIRST', first)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'FILLED_STEP', step)
  assert sparse_qkv_block_kernel.reads_filled(max_len)
  tokens = jnp.asarray(np.random.RandomState(6).randint(1, VOCAB, (2, 18)), jnp.int32)
  assert _decodes_as_xla('interpret', dict(max_len=max_len), tokens) == 2 * 4


@pytest.mark.parametrize('filled_min_len, first, step, reads_past', [
    (8, 0, 1, False), (8, 1, 1, False), (8, 2, 1, False), (8, 0, 3, False),
    (1 << 30, 2, 1, True)])
def test_attention_programs_in_a_loop_let_nothing_past_the_token_in(filled_min_len, first,
                                                                    step, reads_past,
                                                                    monkeypatch):
  """The caches' positions past the token's (5) hold NaN: read in a loop (FILLED_MIN_LEN 8,
  caches of 16 in blocks of 4, the first 0, 1 or 2 of them up front, 1 or 3 blocks a loop
  step), the step's logits are those of clean caches (the blocks past the token's are not
  read, or, in a step's later blocks, count as 0, as do the positions after it in the blocks
  read); every block loaded first (FILLED_MIN_LEN above the caches), NaN reaches them."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'POSITIONS', 4)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'FILLED_MIN_LEN', filled_min_len)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'FILLED_FIRST', first)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'FILLED_STEP', step)
  tokens = jnp.asarray(np.random.RandomState(7).randint(1, VOCAB, (1, 6)), jnp.int32)
  model = _lm('predict')
  model.init(shapes.signature(tokens[:, :1]), rng=jax.random.PRNGKey(0))
  model(tokens[:, :5])
  caches = lambda a: a.ndim == 3 and a.shape[1] == 16   # [B·H, max_len, d_head]
  poisoned = jax.tree.map(lambda a: a.at[:, 5:].set(jnp.nan) if caches(a) else a, model.state)
  assert sum(caches(a) for a in jax.tree.leaves(model.state)) == 2 * 2
  with decode_kernels.use('interpret'):
    step = jax.jit(lambda w, s, t: model.pure_fn(t, w, s, None))
    clean, _ = step(model.weights, model.state, tokens[:, 5:6])
    got, _ = step(model.weights, poisoned, tokens[:, 5:6])
  assert np.isnan(got).any() == reads_past
  if not reads_past:
    np.testing.assert_allclose(got, clean, rtol=1e-6, atol=1e-6)


def test_chained_layer_norm_keeps_its_bits_where_the_residual_mean_is_large():
  """The FF block's LayerNorm(x)·C1 from the attention programs' partial sums of 4 slices
  (`_ff_partials`, `merge_partials`) for residuals of mean 4000 and spread 0.25, and C1's
  columns sharing a component (as a trained controller's do): each slice centred on its own
  mean, z is within 4% of its scale of float64's from the same float32 x, over 6 draws
  (2.1% at most; the uncentred Σx·scale·C1 − mean·Σscale·C1 was off by up to 7.6%, and in a
  trained model's decoding with its embeddings so moved it chose other units)."""
  d, r, n_slices, epsilon, size = 64, 8, 4, 1e-6, 16
  worst = 0.0
  for seed in range(6):
    rng = np.random.RandomState(seed)
    x = (4000 + 0.25 * rng.randn(d)).astype(np.float32)
    scale = (1 + 0.1 * rng.randn(d)).astype(np.float32)
    bias = (0.1 * rng.randn(d)).astype(np.float32)
    c1 = (rng.randn(d, r) / 8 + 0.5).astype(np.float32)
    sums, m2s = np.zeros((1, n_slices), np.float32), np.zeros((1, n_slices), np.float32)
    products = np.zeros((1, n_slices, 3, r), np.float32)
    for p in range(n_slices):   # numpy arrays stand for the kernel's output refs
      cols = slice(p * size, (p + 1) * size)
      sparse_qkv_block_kernel._ff_partials(jnp.asarray(x[cols]), scale[cols], bias[cols],
                                           c1[cols], sums, m2s, products, 0, p)
    _, _, z = sparse_ff_kernel.merge_partials(
        [jnp.asarray(sums[0])], [jnp.asarray(m2s[0])],
        [[jnp.asarray(products[0, :, i])] for i in range(3)], d, epsilon)
    x = x.astype(np.float64)
    expected = ((x - x.mean()) / np.sqrt(x.var() + epsilon) * scale + bias) @ c1
    worst = max(worst, np.abs(np.asarray(z) - expected).max() / np.abs(expected).max())
  assert worst < 0.04


def test_fused_blocks_decode_bfloat16_weights_at_least_as_well_as_xla():
  """bfloat16 weights, caches and states (`Decoder(dtype=...)`): the kernels compute in
  float32 and round only what the state holds, so their logits are no farther from the
  float32 decoder's than XLA's bfloat16 path is (measured: 0.044 against 0.14 at most)."""
  tokens = jnp.asarray(np.random.RandomState(4).randint(1, VOCAB, (1, 9)), jnp.int32)
  reference, _, _ = _decode('xla', {}, tokens)
  xla, _, _ = _decode('xla', {}, tokens, dtype=jnp.bfloat16)
  got, _, n_kernels = _decode('interpret', {}, tokens, dtype=jnp.bfloat16)
  assert n_kernels == 2 * 4 and got.dtype == xla.dtype == jnp.bfloat16
  error = lambda logits: np.abs(logits.astype(np.float32) - reference).max()
  assert error(got) <= max(error(xla), 0.05)


def test_fused_blocks_keep_the_weights_and_state_of_tl_residual():
  def tree(model):   # shapes and dtypes of the weights and state
    model.init(shapes.signature(np.ones((1, 4), np.int32)))
    return jax.tree.map(lambda a: (a.shape, a.dtype), (model.weights, model.state))

  # The same model with plain residual blocks: tl.Residual of each fused block's layer
  # (its sublayers are Branch[Select, Parallel[Serial(), layer]] and Add, as tl.Residual's).
  plain = tl.Serial(*[tl.Residual(*layer.sublayers[0].sublayers[1].sublayers[1:])
                      if isinstance(layer, fused_residual.FusedResidual) else layer
                      for layer in _lm('predict').sublayers])
  assert tree(_lm('predict')) == tree(plain)
  blocks = [type(layer) for layer in _lm('predict').sublayers
            if isinstance(layer, fused_residual.FusedResidual)]
  assert blocks == [SparseQKVResidual, SparseFFResidual] * 2
  assert not any(isinstance(layer, fused_residual.FusedResidual)
                 for layer in _lm('eval').sublayers)


@pytest.mark.parametrize('kwargs, max_d_model, n_per_block', [
    (dict(ff_sparsity=(8, 12)), None, 3),
    (dict(length_kernel_size=1), None, 2 + 2),
    ({}, 32, 2 + 3)])
def test_shapes_the_kernels_do_not_take_decode_through_xla(kwargs, max_d_model, n_per_block,
                                                           monkeypatch):
  """A controller of rank 12 (not a power of 2, as Triton's blocks must be): the FF block
  declines and Sparse FF decodes through XLA; the attention block's three kernels run. No
  look-back along the length (length_kernel_size 1): the attention block declines and its
  multiplicative layer and attention decode through their own kernels
  (`multiplicative_kernel.py`, `attention_kernel.py`); the FF block's two run. d_model above
  MAX_D_MODEL (as 17B's 9216 above 4096): the attention block declines and its layers decode
  through their own kernels (the multiplicative layer's, Sparse QKV's convolutions,
  attention's); the FF block's two run. The logits are XLA's."""
  if max_d_model:
    monkeypatch.setattr(sparse_qkv_block_kernel, 'MAX_D_MODEL', max_d_model)
  tokens = jnp.asarray(np.random.RandomState(2).randint(1, VOCAB, (1, 7)), jnp.int32)
  expected, _, _ = _decode('xla', kwargs, tokens)
  got, _, n_kernels = _decode('interpret', kwargs, tokens)
  assert n_kernels == 2 * n_per_block
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _count_fields_calls(monkeypatch):
  """A list that gets P (the parts' count) each time `sparse_qkv_fields_kernel.fields` is
  traced."""
  calls, fields = [], sparse_qkv_fields_kernel.fields

  def counted(parts, *args, **kwargs):
    calls.append(parts.shape[0])
    return fields(parts, *args, **kwargs)

  monkeypatch.setattr(sparse_qkv_fields_kernel, 'fields', counted)
  return calls


def _declining_block(monkeypatch, n_parts=4):
  """The attention block of `_FIELDS_LM` declines (d_model above MAX_D_MODEL, as 17B's) and
  its convolutions are laid out as one product (DECODE_LAYOUT, as on a GPU); the parts'
  count P; a list of each trace's P of `sparse_qkv_fields_kernel.fields`."""
  monkeypatch.setattr(sparse_qkv, 'DECODE_LAYOUT', True)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MAX_D_MODEL', 32)
  monkeypatch.setattr(sparse_qkv_fields_kernel, 'PARTS', n_parts)
  return _count_fields_calls(monkeypatch)


# Modules of 12 channels (not a power of 2, so Sparse QKV's own convolution kernel declines).
_FIELDS_LM = dict(d_model=48, n_heads=4, attention_sparsity=4)


# One part (the kernel's own test has a case of it) with `-m slow`.
@pytest.mark.parametrize('n_parts', [4, pytest.param(1, marks=pytest.mark.slow)])
def test_where_the_attention_block_declines_the_fields_kernel_decodes_as_xla(n_parts,
                                                                            monkeypatch):
  """Where the attention block's kernels decline, the block sums the multiplicative layer's
  parts into the receptive fields and state in one kernel (`SparseQKVResidual._from_parts`,
  `sparse_qkv_fields_kernel.py`), once a layer: every step's logits and the final state are
  XLA's; the product in 4 slices of d_in, or 1."""
  calls = _declining_block(monkeypatch, n_parts)
  tokens = jnp.asarray(np.random.RandomState(2).randint(1, VOCAB, (2, 7)), jnp.int32)
  _decodes_as_xla('interpret', _FIELDS_LM, tokens, lay_out=True)
  assert calls == [n_parts] * 2   # once a layer (the step traced once: its jaxpr, reused)


def test_the_fields_kernel_decodes_bfloat16_weights_at_least_as_well_as_xla(monkeypatch):
  """bfloat16 weights, caches and states: the kernel sums the float32 parts and rounds y
  once, so the logits are no farther from the float32 decoder's than XLA's bfloat16 path
  (measured: 0.259 for both at most, the two paths' logits 0.016 apart)."""
  calls = _declining_block(monkeypatch)
  tokens = jnp.asarray(np.random.RandomState(4).randint(1, VOCAB, (1, 9)), jnp.int32)
  reference, _, _ = _decode('xla', _FIELDS_LM, tokens, lay_out=True)
  xla, _, _ = _decode('xla', _FIELDS_LM, tokens, dtype=jnp.bfloat16, lay_out=True)
  got, _, _ = _decode('interpret', _FIELDS_LM, tokens, dtype=jnp.bfloat16, lay_out=True)
  assert calls == [4] * 2 and got.dtype == xla.dtype == jnp.bfloat16
  error = lambda logits: np.abs(logits.astype(np.float32) - reference).max()
  assert error(got) <= max(error(xla), 0.05), (error(got), error(xla))


@needs_gpu('compiles the kernels for a GPU')
def test_the_fields_kernel_compiled_for_the_gpu_decodes_as_xla(monkeypatch):
  """A shape loaded in pieces as 17B's (modules of 144 channels, heads of 96, d_model 1152),
  its attention block declining (MAX_D_MODEL) and its receptive fields from the parts'
  kernel compiled for the GPU: XLA's logits and state, with the product in 64 parts."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MAX_D_MODEL', 1024)
  calls = _count_fields_calls(monkeypatch)
  kwargs = dict(d_model=1152, n_heads=12, attention_sparsity=8, ff_sparsity=(64, 16),
                max_len=168)
  tokens = jnp.asarray(np.random.RandomState(3).randint(1, VOCAB, (1, 10)), jnp.int32)
  _decodes_as_xla('pallas', kwargs, tokens, tolerance=1e-4, prompt=5, lay_out=True)
  assert calls == [64] * 2


@pytest.mark.parametrize(
    'd_model, d_ff, n_heads, sparsity, ff_sparsity, n_products, n_ff, settings', [
        (1024, 6144, 16, 16, (64, 16), 1, 1, {}), (8, 32, 2, 2, (4, 2), 0, 1, {}),
        (9216, 65536, 96, 64, (256, 32), 1, 2, {}),
        (1024, 6144, 16, 16, (64, 16), 1, 1, dict(MIXED_CHANNELS=None)),
        (1024, 6144, 16, 16, (64, 16), 1, 2, dict(CHAIN=False)),
        (1024, 6144, 16, 16, (64, 16), 1, 1, dict(LAUNCH_EARLY=False)),
        (1024, 6144, 16, 16, (64, 16), 1, 1, dict(FILLED_MIN_LEN=128)),
        (1024, 6144, 16, 16, (64, 16), 1, 1, dict(FILLED_MIN_LEN=128, FILLED_STEP=1)),
        (9216, 65536, 96, 64, (256, 32), 1, 2, dict(FILLED_MIN_LEN=128))])
def test_fused_blocks_lower_to_triton_for_a_gpu(d_model, d_ff, n_heads, sparsity, ff_sparsity,
                                                n_products, n_ff, settings, monkeypatch):
  """One block lowered for CUDA on any machine, KV caches of 168: 800M FF+QKV (d_model 1024,
  16 modules, 16 heads, d_ff 6144, N 64), where the multiplicative layer is a matrix product;
  a tiny one (d_model 8), where it is broadcast sums (Triton's products need sides of 16);
  17B FF+QKV (d_model 9216, 64 modules of 144 channels, 96 heads of 96, N 256), loaded in
  power-of-2 pieces (the products of the pieces of 128 and 16 channels share one source
  line): the attention block's three Triton kernels, the last also writing the partial sums
  of the FF block's LayerNorm (`CHAIN`), and the FF block's units kernel (and at 17B a kernel
  multiplying W2's chosen rows), the caches written in place, and a matrix product in a
  kernel's code (`dot_general:`, its source location in Triton's module) except at the tiny
  shape; the 800M block also with multiplicative programs of all 64 channels
  (`MIXED_CHANNELS`, by default 16), unchained (CHAIN off: the FF block's LayerNorm and
  the controller's first product in a kernel of their own). Every kernel lets the next launch
  early (PTX's launch_dependents in each; not with `decode_kernels.LAUNCH_EARLY` off, the
  800M block's case) and, with FILLED_MIN_LEN at 128, the attention programs reading the
  caches in a loop (`_attend_filled`, as from 512 positions by default) at 800M and 17B, at
  800M also one block a loop step (`FILLED_STEP`; by default four).
  (At 17B the attention block is slower than XLA's kernels and declines, MAX_D_MODEL; here
  it is lowered all the same.)"""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MAX_D_MODEL', d_model)
  for name, value in settings.items():
    module = {'CHAIN': fused_residual, 'LAUNCH_EARLY': decode_kernels}.get(
        name, sparse_qkv_block_kernel)
    monkeypatch.setattr(module, name, value)
  model = ScalingTransformerLM(64, d_model, d_ff=d_ff, n_layers=1, n_heads=n_heads,
                               max_len=168, dropout=0.0, ff_sparsity=ff_sparsity,
                               attention_sparsity=sparsity, mode='predict')
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  weights, state = model.weights_and_state_signature(tokens)
  step = lambda w, s, t: model.pure_fn(t, w, s, None)
  with decode_kernels.use('pallas'):
    text = lowered_for_an_h200(step, weights, state, tokens)
  assert text.count('xla.gpu.triton') == 3 + n_ff
  assert text.count('griddepcontrol.launch_dependents') == (
      3 + n_ff if settings.get('LAUNCH_EARLY', True) else 0)
  assert text.count('dot_general:') == n_products
  assert ('_attend_filled' in text) == ('FILLED_MIN_LEN' in settings)   # its source locations
  # The convolution kernel's outputs 2 and 3 are the K and V caches, its operands 10 and 11.
  assert 'output_operand_alias<output_tuple_indices = [2], operand_index = 10,' in text
  assert 'output_operand_alias<output_tuple_indices = [3], operand_index = 11,' in text


@pytest.mark.parametrize('capability', [80, 89, 0])
def test_kernels_before_hopper_do_not_launch_the_next_early(capability):
  """PTX's griddepcontrol exists from compute capability 9.0 on (Pallas names ROCm's 0): the
  lowering emits nothing there (it would need an MLIR context to emit anything)."""
  ctx = types.SimpleNamespace(context=types.SimpleNamespace(compute_capability=capability))
  assert decode_kernels._ptx_lowering(
      ctx, 'griddepcontrol.launch_dependents;', min_capability=90) == []


def test_the_layers_own_decoding_kernels_launch_the_next_early_and_training_s_do_not():
  """The kernels used where a block's do not apply (attention over the KV cache, Sparse QKV's
  convolutions, Sparse FF's LayerNorm and units) each let the next kernel launch early, as the
  blocks' do; the training controller's forward and backward kernels do not."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  index = jax.ShapeDtypeStruct((1,), jnp.int32)
  attention = lowered_for_an_h200(attention_kernel.attention_step, f32(1, 2, 16), f32(1, 2, 16),
                                   f32(1, 2, 16), f32(2, 8, 16), f32(2, 8, 16), index)
  conv = lowered_for_an_h200(
      lambda y, state, weights: sparse_qkv_kernel.conv_step(y, state, weights, (3, 3, 1)),
      f32(1, 4, 8), f32(1, 2, 4, 8),
      [(f32(3, k, 8, 8), f32(8)) for k in (3, 3, 1)])
  r, k, n, d = 16, 4, 8, 32
  ff = lowered_for_an_h200(
      lambda x, scale, bias, c1, c2, cb, w1, b1, w2, b2: sparse_ff_kernel.ff_block(
          x, scale, bias, (c1, c2, cb), (w1, b1, w2, b2), 1e-6),
      f32(1, d), f32(d), f32(d), f32(d, r), f32(r, k, n), f32(k, n), f32(k, n, d), f32(k, n),
      f32(k, n, d), f32(d))
  controller = lowered_for_an_h200(
      lambda z, c2, cb, draw: jax.grad(lambda z: jnp.sum(sparse_ff_controller_kernel
          .controller_mask(z, c2, cb, draw, jnp.asarray(True), 1.0, False)[0] ** 2))(z),
      f32(16, r), f32(r, k, 16), f32(k, 16), f32(16, k))
  for text, n_kernels in ((attention, 1), (conv, 1), (ff, 2), (controller, 2)):
    assert text.count('xla.gpu.triton') == n_kernels
  assert [text.count('griddepcontrol.launch_dependents')
          for text in (attention, conv, ff, controller)] == [1, 1, 2, 0]


@needs_gpu('compiles the kernels for a GPU')
@pytest.mark.parametrize('settings', [{}, dict(MIXED_CHANNELS=None), dict(CHAIN=False),
                                      dict(STATS_IN_KERNEL=0), dict(PREFETCH=True),
                                      dict(L2_PERSIST=1), dict(L2_PERSIST=3),
                                      dict(PREFETCH_CACHES=True, PREFETCH_STATE=True),
                                      dict(FILLED_MIN_LEN=128, FILLED_FIRST=0),
                                      dict(FILLED_MIN_LEN=128, FILLED_FIRST=0,
                                           FILLED_STEP=2)])
@pytest.mark.parametrize('d_model, n_heads, attention_sparsity', [(1024, 16, 16), (1152, 12, 8)])
def test_fused_blocks_compiled_for_the_gpu_equal_xla(d_model, n_heads, attention_sparsity,
                                                     settings, monkeypatch):
  """The 800M shape, and one loaded in pieces as 17B's (modules of 144 channels, heads of
  96, d_model 1152); the default shares, multiplicative programs of all channels
  (`MIXED_CHANNELS`), each block alone (CHAIN off, 5 kernels a layer), and the
  multiplicative programs reading the LayerNorm statistics XLA computed (`STATS_IN_KERNEL`,
  as above 4096), the kernels asking the L2 cache for the next kernels' weights
  (`decode_kernels.PREFETCH`), and to keep their own in it (`decode_kernels.L2_PERSIST`, line
  by line or in bulk; by default they do not ask), and the multiplicative programs asking for
  the KV caches and the convolution's state (`PREFETCH_CACHES`, `PREFETCH_STATE`), and the
  attention programs reading the caches in a loop (`FILLED_MIN_LEN`, here from 128, every
  block in the loop: `FILLED_FIRST` 0), a block or two a step (`FILLED_STEP`; the second past
  the token's)."""
  for name, value in settings.items():
    module = {'CHAIN': fused_residual, 'PREFETCH': decode_kernels,
              'L2_PERSIST': decode_kernels}.get(
        name, sparse_qkv_block_kernel)
    monkeypatch.setattr(module, name, value)
  kwargs = dict(d_model=d_model, n_heads=n_heads, attention_sparsity=attention_sparsity,
                ff_sparsity=(64, 16), max_len=168)
  tokens = jnp.asarray(np.random.RandomState(3).randint(1, VOCAB, (1, 10)), jnp.int32)
  n_kernels = _decodes_as_xla('pallas', kwargs, tokens, tolerance=1e-4, prompt=5)
  assert n_kernels == 2 * (5 if settings.get('CHAIN') is False else 4)


def test_benchmarks_time_and_profile_the_blocks_chained():
  """Table 1's one-block step (`table1._first_block`) and the profile's scoped step
  (`decode_profile.scoped_step`) run the blocks through `fused_residual.run_layers`, chained
  as a decoded token is: 3 + 1 kernels a block, the units kernel in its FF block's scope;
  the profile's step picks the token the model's own step does."""
  from sparse_scaling.bench import decode_profile, table1   # pylint: disable=import-outside-toplevel
  model = _lm('predict')
  tokens = jnp.asarray([[3], [5]], jnp.int32)
  model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(0))
  with decode_kernels.use('interpret'):
    block, weights, state, x = table1._first_block(model, jnp.float32)  # pylint: disable=protected-access
    assert str(jax.make_jaxpr(block)(weights, state, x)).count('pallas_call') == 3 + 1
    lowered = jax.jit(decode_profile.scoped_step(model)).lower(model.weights, model.state,
                                                               tokens)
    assert lowered.as_text(debug_info=True).count('block1/ff/pallas_call') >= 1
    token, _ = lowered.compile()(model.weights, model.state, tokens)
  logits, _ = jax.jit(lambda w, s, t: model.pure_fn(t, w, s, None))(   # XLA's path
      model.weights, model.state, tokens)
  np.testing.assert_array_equal(token[:, 0], np.argmax(logits[:, -1], axis=-1))


def _two_800m_layers_lowered_for_an_h200(with_jaxpr=False, dtype=jnp.float32, triton=4):
  """The text of one decoding step of two 800M FF+QKV layers lowered for CUDA (on any
  machine), their floating weights and state in `dtype` (as `decoding.Decoder` casts them):
  `triton` Triton kernels a layer (4: all); `with_jaxpr`, (that text, the step's jaxpr as
  text)."""
  model = ScalingTransformerLM(64, 1024, d_ff=6144, n_layers=2, n_heads=16, max_len=168,
                               dropout=0.0, ff_sparsity=(64, 16), attention_sparsity=16,
                               mode='predict')
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  cast = lambda a: (jax.ShapeDtypeStruct(a.shape, dtype)
                    if jnp.issubdtype(a.dtype, jnp.floating) else a)
  weights, state = jax.tree.map(cast, model.weights_and_state_signature(tokens))
  with decode_kernels.use('pallas'):
    step = lambda w, s, t: model.pure_fn(t, w, s, None)
    text = lowered_for_an_h200(step, weights, state, tokens)
    jaxpr = str(jax.make_jaxpr(step)(weights, state, tokens)) if with_jaxpr else None
  assert text.count('xla.gpu.triton') == 2 * triton
  return (text, jaxpr) if with_jaxpr else text


@pytest.mark.parametrize('prefetch', [False, True])
def test_prefetches_lower_to_ptx_for_a_gpu(prefetch, monkeypatch):
  """Two 800M FF+QKV layers lowered for CUDA on any machine: with PREFETCH, PTX's
  `prefetch.global.L2` in both multiplicative kernels (for the convolutions' weights), both
  attention kernels (for the FF block's) and the first units kernel (for the second layer's
  attention block's; the last layer's has no block after it). Each Triton module holds the
  string once."""
  monkeypatch.setattr(decode_kernels, 'PREFETCH', prefetch)
  text = _two_800m_layers_lowered_for_an_h200()
  assert text.count('prefetch.global.L2 [$1];') == (5 if prefetch else 0)


@pytest.mark.parametrize('prefetch, wrap, asked', [(False, True, 0), (True, False, 0),
                                                    (True, True, 1)])
def test_an_unchained_ff_block_asks_for_the_next_blocks_weights_with_prefetch(
    prefetch, wrap, asked, monkeypatch):
  """Where the attention block declines (17B's; here an 800M block's, MAX_D_MODEL below its
  d_model) the FF block runs unchained, and with PREFETCH its units kernel asks the L2 cache
  for the next block's LayerNorm and multiplicative weights (`run_layers` hands them on): a
  block looped (`wrap`, as Table 1's per-block column runs it) for its own; a block with
  nothing after it asks for nothing. Lowered for an H200 with every kernel on: the attention
  block's layers' own three (multiplicative, convolutions, attention), the FF block's two
  (LayerNorm-controller, units)."""
  from sparse_scaling.bench import table1   # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(sparse_qkv_block_kernel, 'MAX_D_MODEL', 512)
  monkeypatch.setattr(decode_kernels, 'PREFETCH', prefetch)
  model = ScalingTransformerLM(64, 1024, d_ff=6144, n_layers=1, n_heads=16, max_len=168,
                               dropout=0.0, ff_sparsity=(64, 16), attention_sparsity=16,
                               mode='predict')
  weights, state = model.weights_and_state_signature(jax.ShapeDtypeStruct((1, 1), jnp.int32))
  index = [i for i, label in enumerate(table1.scope_labels(model))
           if label.startswith('block0/')]
  layers = [model.sublayers[i] for i in index]
  step = lambda w, s, x: fused_residual.run_layers(layers, x, w, s, wrap=wrap)
  with decode_kernels.use('pallas'):
    text = lowered_for_an_h200(step, tuple(weights[i] for i in index),
                               tuple(state[i] for i in index),
                               jax.ShapeDtypeStruct((1, 1, 1024), jnp.float32))
  assert text.count('xla.gpu.triton') == 3 + 2
  assert text.count('prefetch.global.L2 [$1];') == asked


@pytest.mark.parametrize('persist', [0, 1, 2, 3, 4])
def test_kernels_ask_to_keep_their_fixed_weights_in_the_l2_cache_with_l2_persist(persist,
                                                                                 monkeypatch):
  """Two 800M FF+QKV layers lowered for CUDA on any machine: with L2_PERSIST 1 every kernel
  of both layers (multiplicative, convolutions, attention, units) asks the L2 cache for its
  fixed weights with the evict_last priority, with 2 without it, line by line; 3 and 4 the
  same in one bulk request a program and array; off, none asks."""
  monkeypatch.setattr(decode_kernels, 'L2_PERSIST', persist)
  text = _two_800m_layers_lowered_for_an_h200()
  # once in each kernel's module
  assert text.count('prefetch.global.L2::evict_last [$1];') == (2 * 4 if persist == 1 else 0)
  assert text.count('prefetch.global.L2 [$1];') == (2 * 4 if persist == 2 else 0)
  bulk = [text.count(f'cp.async.bulk.prefetch.L2.global{hint} [$1]')
          for hint in ('.L2::cache_hint', '')]
  assert bulk == {3: [2 * 4, 0], 4: [0, 2 * 4]}.get(persist, [0, 0])


@pytest.mark.parametrize('caches, state', [(False, False), (True, False), (False, True),
                                           (True, True)])
def test_the_multiplicative_kernels_ask_for_the_caches_and_state_when_told(caches, state,
                                                                         monkeypatch):
  """With PREFETCH_CACHES both layers' multiplicative kernels ask the L2 cache for the K and
  V caches in bulk, with PREFETCH_STATE for the convolution's state, each with no priority (the
  fixed weights' requests carry one); without, none does."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'PREFETCH_CACHES', caches)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'PREFETCH_STATE', state)
  text, jaxpr = _two_800m_layers_lowered_for_an_h200(with_jaxpr=True)
  # Each Triton module holds the request's text once, the kernels' jaxprs each request.
  assert text.count('cp.async.bulk.prefetch.L2.global [$1]') == (2 if caches or state else 0)
  assert jaxpr.count('prefetch_l2[bulk=True keep=False') == 2 * (2 * caches + state)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_by_default_kernels_keep_their_fixed_weights_in_bfloat16_alone(dtype):
  """L2_PERSIST's default (None): in bfloat16 every kernel of both layers asks in bulk, with
  the evict_last priority, as L2_PERSIST 3 does; in float32 none asks."""
  assert decode_kernels.L2_PERSIST is None
  text = _two_800m_layers_lowered_for_an_h200(dtype=dtype)
  asked = text.count('cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1]')
  assert asked == (2 * 4 if dtype == jnp.bfloat16 else 0)
  assert 'prefetch.global.L2' not in text.replace('cp.async.bulk.prefetch.L2.global.L2', '')


def test_kernels_whose_fixed_weights_are_large_ask_for_none(monkeypatch):
  """Above KEEP_MAX_BYTES of fixed weights (here 100 KB: all but the attention kernel's 74 KB,
  its LayerNorm's and C1; the others' are 336-455 KB) a kernel makes no request, L2_PERSIST
  asking in bulk."""
  monkeypatch.setattr(decode_kernels, 'L2_PERSIST', 3)
  monkeypatch.setattr(decode_kernels, 'KEEP_MAX_BYTES', 100 << 10)
  text = _two_800m_layers_lowered_for_an_h200()
  assert text.count('cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1]') == 2


@pytest.mark.parametrize('size, itemsize, parts', [(6 * 16 * 64 * 64, 4, 64), (1000, 4, 7),
                                                   (1024, 2, 96), (1, 4, 3), (33, 4, 1),
                                                   (1030, 4, 4)])
def test_the_parts_of_a_bulk_prefetch_cover_the_array_in_16_byte_pieces(size, itemsize,
                                                                        parts):
  """Each part starts 16-byte aligned (the arrays are), is a multiple of 16 bytes long, and
  the parts ask for every byte but those of the array's last partial 16 once."""
  elements, share = decode_kernels.bulk_shares(size, itemsize, parts)
  assert share % 16 == 0 and elements * itemsize == share
  asked = []
  for p in range(parts):
    n = min(size * itemsize - p * share, share) & -16
    if n > 0:
      asked.extend(range(p * share, p * share + n))
  assert asked == list(range(size * itemsize // 16 * 16))


@pytest.mark.parametrize('size, itemsize, parts', [(6 * 16 * 64 * 64, 4, 64), (1000, 4, 7),
                                                   (1024, 2, 96), (1, 4, 3), (33, 4, 1)])
def test_the_parts_of_a_prefetch_cover_every_line_of_the_array(size, itemsize, parts):
  per_line, share, n = decode_kernels.prefetch_shares(size, itemsize, parts)
  assert per_line * itemsize == 128 and n >= share and n & (n - 1) == 0
  asked = {min((p * share + k) * per_line, size - 1) // per_line
           for p in range(parts) for k in range(n)}
  assert asked == set(range(-(-size // per_line)))


def test_no_prefetch_on_rocm():
  """Pallas names ROCm's capability 0: the prefetch lowers to nothing there (it would need
  an MLIR context to emit anything)."""
  ctx = types.SimpleNamespace(context=types.SimpleNamespace(compute_capability=0))
  assert decode_kernels._prefetch_lowering(ctx, None, None, parts=4, keep=True, bulk=False) == []
