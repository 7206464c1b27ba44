"""Causal attention with a head-major KV cache: trax's numbers, predict == eval, no cache copy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from sparse_scaling import convert
from sparse_scaling.bench import decode_profile
from sparse_scaling.layers import CausalAttention
from sparse_scaling.layers import attention_kernel
from sparse_scaling.layers import causal_attention
from sparse_scaling.layers import decode_kernels
from tests.utils import assert_predict_equals_eval
from tests.utils import initialized as _init
from tests.utils import lowered_for_an_h200
from tests.utils import needs_gpu
from tests.utils import random_inputs as _inputs

D_MODEL, N_HEADS = 16, 4


def test_matches_trax_causal_attention_with_the_same_weights():
  x = _inputs(2, 7, D_MODEL)
  theirs = _init(tl.CausalAttention(D_MODEL, n_heads=N_HEADS, mode='eval'), x, seed=5)
  ours = _init(CausalAttention(D_MODEL, N_HEADS, mode='eval'), x)
  convert.load_trax_weights(ours, theirs.weights)
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)


@pytest.mark.parametrize('kernel, reductions, max_len, length, d_model, split', [
    ('xla', False, 16, 9, D_MODEL, None), ('xla', True, 16, 9, D_MODEL, None),
    ('xla', True, 16, 16, D_MODEL, None),
    ('interpret', False, 16, 9, D_MODEL, False), ('interpret', False, 20, 19, D_MODEL, False),
    ('interpret', False, 20, 19, 48, False), ('interpret', False, 20, 19, 48, True),
    ('interpret', False, 40, 39, 48, True), ('interpret', False, 40, 39, 48, 'skip')])
def test_predict_equals_eval(kernel, reductions, max_len, length, d_model, split, monkeypatch):
  # reductions: each decoded token's products over the cache as sums (as on a GPU; here on
  # any backend), up to a full cache. kernel 'interpret': each decoded token through the
  # Pallas kernel (attention_kernel.py), run by Pallas' interpreter, its programs by value
  # columns or (split) by blocks of positions. A cache of 20 is read in blocks of 16, one of
  # 40 in blocks of 32, the second overlapping the first; decoding fills it up to its last
  # position. d_model 48: heads of 12, loaded in pieces of 8 and 4, each head's values in
  # three programs of 4 columns (as 17B's heads of 96: 64 and 32, three of 32). 'skip': split,
  # the second block of 32 skipped (SKIP) until a token's position passes 32. The kernel's
  # cases also lower for a GPU (an abstract H200 off one): Triton's rules hold for their
  # shapes, which Pallas' interpreter does not check.
  monkeypatch.setattr(causal_attention, 'one_query_as_reductions', lambda: reductions)
  if split is not None:
    monkeypatch.setattr(attention_kernel, 'SPLIT', bool(split))
    monkeypatch.setattr(attention_kernel, 'SKIP', split == 'skip')
  model_fn = functools.partial(CausalAttention, d_model, N_HEADS, max_inference_length=max_len)
  with decode_kernels.use(kernel):
    assert_predict_equals_eval(model_fn, _inputs(2, length, d_model))
  if kernel == 'interpret':
    token = jax.ShapeDtypeStruct((2, N_HEADS, d_model // N_HEADS), jnp.float32)
    cache = jax.ShapeDtypeStruct((2 * N_HEADS, max_len, d_model // N_HEADS), jnp.float32)
    text = lowered_for_an_h200(attention_kernel.attention_step, token, token, token, cache,
                               cache, jax.ShapeDtypeStruct((), jnp.int32))
    assert text.count('xla.gpu.triton') == 1


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU path (`reads_filled`)')
@pytest.mark.parametrize('max_len, length, block', [(10, 10, 4), (12, 12, 4), (16, 9, 8)])
def test_a_step_over_a_long_cache_reads_its_filled_blocks_as_eval(max_len, length, block,
                                                                  monkeypatch):
  """On a CPU, caches of FILLED_MIN_LEN positions or more (here 8) are read block by block as
  far as the token's position (`attend_filled`): predict == eval up to a full cache, the last
  block overlapping the one before where max_len is not a multiple of the block."""
  monkeypatch.setattr(causal_attention, 'FILLED_MIN_LEN', 8)
  monkeypatch.setattr(causal_attention, 'FILLED_BLOCK', block)
  calls = []
  real = causal_attention.attend_filled
  monkeypatch.setattr(causal_attention, 'attend_filled',
                      lambda *args: calls.append(1) or real(*args))
  model_fn = functools.partial(CausalAttention, D_MODEL, N_HEADS, max_inference_length=max_len)
  with decode_kernels.use('xla'):
    assert_predict_equals_eval(model_fn, _inputs(2, length, D_MODEL))
  assert calls


@pytest.mark.parametrize('index', [0, 3, 4, 7, 9, 12])
def test_attend_filled_is_softmax_attention_over_the_positions_up_to_the_token(index):
  """Positions 0..index of caches of 10 in blocks of 4 (the third overlapping the second);
  past the caches' end, all of them, as the whole-cache path attends."""
  rows, max_len, d_head = 6, 10, 8
  q, k, v = _inputs(rows, 1, d_head), _inputs(rows, max_len, d_head, seed=1), _inputs(
      rows, max_len, d_head, seed=2)
  got = causal_attention.attend_filled(q, k, v, np.int32(index), 4)
  n = min(index, max_len - 1) + 1
  scores = np.einsum('bqd,bkd->bqk', q, k[:, :n]) / np.sqrt(d_head)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  expected = np.einsum('bqk,bkd->bqd', weights / weights.sum(-1, keepdims=True), v[:, :n])
  np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize('until, reads_past', [(100, False), (50, False), (30, True)])
def test_a_token_late_in_the_caches_takes_the_whole_cache_products(until, reads_past,
                                                                   monkeypatch):
  """On a CPU, a token in the first FILLED_UNTIL percent of caches of FILLED_MIN_LEN or more
  (here caches of 16, blocks of 4) reads their filled blocks only; past that it takes the
  whole-cache products, which read every position: with NaN in the caches past the second
  block, the token at position 5 (31% of 16) gets a clean output from the loop and NaN from
  the products (a masked weight of 0 times NaN). Clean caches: both as eval's."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  monkeypatch.setattr(causal_attention, 'FILLED_MIN_LEN', 8)
  monkeypatch.setattr(causal_attention, 'FILLED_BLOCK', 4)
  monkeypatch.setattr(causal_attention, 'FILLED_UNTIL', until)
  model_fn = functools.partial(CausalAttention, D_MODEL, N_HEADS, max_inference_length=16)
  with decode_kernels.use('xla'):
    assert_predict_equals_eval(model_fn, _inputs(2, 12, D_MODEL))
    x = _inputs(2, 6, D_MODEL)
    layer = model_fn(mode='predict')
    layer.init(shapes.signature(x[:, :1]))
    layer(x[:, :5])
    caches = lambda a: a.ndim == 3 and a.shape[1] == 16   # [B·H, max_len, d_head]
    assert sum(caches(a) for a in jax.tree.leaves(layer.state)) == 2
    poisoned = jax.tree.map(lambda a: a.at[:, 8:].set(jnp.nan) if caches(a) else a,
                            layer.state)
    step = jax.jit(lambda w, s, t: layer.pure_fn(t, w, s, None)[0])
    got = step(layer.weights, poisoned, x[:, 5:6])
  assert np.isnan(got).any() == reads_past


def test_only_a_cpu_reads_only_the_filled_blocks_and_only_of_long_caches(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert causal_attention.reads_filled(2048) and not causal_attention.reads_filled(168)
  for backend in ('gpu', 'tpu'):
    monkeypatch.setattr(jax, 'default_backend', lambda backend=backend: backend)
    assert not causal_attention.reads_filled(2048)


@pytest.mark.parametrize('split', [False, True, 'skip'])
def test_a_step_past_the_caches_end_writes_their_last_position_as_xla_does(split, monkeypatch):
  """A loop of one block (Table 1's per-block column) runs on past max_len: XLA's in-place
  update clamps the position to the caches' last, and the kernel does the same (unclamped, it
  would store past the caches on a GPU and attend to a position twice)."""
  monkeypatch.setattr(attention_kernel, 'SPLIT', bool(split))
  monkeypatch.setattr(attention_kernel, 'SKIP', split == 'skip')
  x = _inputs(1, 1, 48)
  layer = _init(CausalAttention(48, N_HEADS, max_inference_length=20, mode='predict'), x)
  branch, (k_cache, v_cache, _), dense = layer.state   # the projections', the core's, Dense's
  state = (branch, (_inputs(*k_cache.shape, seed=1), _inputs(*v_cache.shape, seed=2),
                    np.int32(23)), dense)
  outputs = {}
  for kernel in ('xla', 'interpret'):
    with decode_kernels.use(kernel):
      outputs[kernel] = layer.pure_fn(x, layer.weights, state, None)
  (out_x, state_x), (out_k, state_k) = outputs['xla'], outputs['interpret']
  np.testing.assert_allclose(out_k, out_x, atol=1e-5)
  for got, expected in zip(jax.tree.leaves(state_k), jax.tree.leaves(state_x)):
    np.testing.assert_allclose(got, expected, atol=1e-6)


@needs_gpu('compiles the kernel for a GPU')
@pytest.mark.parametrize('split', [False, True, 'skip'])
@pytest.mark.parametrize('d_model, max_len, length', [(64, 16, 16), (384, 168, 24)])
def test_the_kernel_compiled_for_a_gpu_decodes_as_eval(d_model, max_len, length, split,
                                                       monkeypatch):
  # Heads of 16, and of 96 (17B's: pieces of 64 and 32; by columns three programs of 32 a
  # head) over a cache of 168 read in blocks of 64, the last overlapping (with SKIP, the
  # blocks past the 24 positions skipped).
  monkeypatch.setattr(attention_kernel, 'SPLIT', bool(split))
  monkeypatch.setattr(attention_kernel, 'SKIP', split == 'skip')
  model_fn = functools.partial(CausalAttention, d_model, N_HEADS, max_inference_length=max_len)
  with decode_kernels.use('pallas'):
    assert_predict_equals_eval(model_fn, _inputs(1, length, d_model), atol=1e-4)


def test_auto_takes_the_attention_kernel_on_a_gpu_from_min_rows_or_min_len(monkeypatch):
  """'auto' counts a step's rows·heads: 17B's 96 heads take the kernel on a GPU, 800M's 16
  keep XLA's ops (at batch 4, 64, they take it) unless the caches hold MIN_LEN positions or
  more (512: the gin files' 2048, not Table 1's 168); off a GPU XLA's ops always; a kernel
  chosen by name runs whatever the count."""
  assert attention_kernel.value_width(96) == 32 and attention_kernel.value_width(12) == 4
  assert attention_kernel.pays(1, 96) and not attention_kernel.pays(1, 16)
  assert attention_kernel.pays(4, 16) and not attention_kernel.pays(3, 16)
  assert attention_kernel.MIN_LEN == 512
  assert attention_kernel.pays(1, 16, 2048) and attention_kernel.pays(1, 16, 512)
  assert not attention_kernel.pays(1, 16, 511) and not attention_kernel.pays(1, 16, 168)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(decode_kernels, 'MISSING', None)
  assert decode_kernels.active('attention', attention_kernel.pays(1, 96)) == 'pallas'
  assert decode_kernels.active('attention', attention_kernel.pays(1, 16)) == 'xla'
  with decode_kernels.use('interpret'):
    assert decode_kernels.active('attention', attention_kernel.pays(1, 16)) == 'interpret'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert decode_kernels.active('attention', attention_kernel.pays(1, 96)) == 'xla'
  monkeypatch.setattr(attention_kernel, 'MIN_LEN', None)
  assert not attention_kernel.pays(1, 16, 2048) and attention_kernel.pays(1, 96, 168)


@pytest.mark.parametrize('min_rows, max_len, runs_kernel', [(8, 16, True), (9, 16, False),
                                                            (9, 512, True)])
def test_a_predict_step_asks_auto_with_its_rows_heads_and_caches(min_rows, max_len,
                                                                 runs_kernel, monkeypatch):
  """On a GPU (here pretended, the kernel in Pallas' interpreter) a one-token step of batch 2
  and 4 heads, 8 rows·heads, runs the kernel where MIN_ROWS is 8, XLA's ops where it is 9,
  unless its caches hold MIN_LEN (512) positions."""
  calls = []
  real_step = attention_kernel.attention_step
  monkeypatch.setattr(attention_kernel, 'attention_step', lambda *args, interpret: (
      calls.append(1) or real_step(*args, interpret=True)))
  monkeypatch.setattr(attention_kernel, 'MIN_ROWS', min_rows)
  x = _inputs(2, 1, D_MODEL)
  make = lambda: _init(CausalAttention(D_MODEL, N_HEADS, max_inference_length=max_len,
                                      mode='predict'), x)
  layer = make()
  expected = layer(x)
  layer.state = make().state
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(decode_kernels, 'MISSING', None)
  np.testing.assert_allclose(layer(x), expected, atol=1e-5)
  assert bool(calls) == runs_kernel


def test_one_query_products_are_reductions_on_gpus_only(monkeypatch):
  assert causal_attention.one_query_as_reductions() == (jax.default_backend() == 'gpu')
  x = _inputs(1, 1, D_MODEL)
  # caches of 16 positions: below FILLED_MIN_LEN, the whole-cache products on any backend
  layer = _init(CausalAttention(D_MODEL, N_HEADS, max_inference_length=16, mode='predict'), x)
  for reductions in (False, True):
    monkeypatch.setattr(causal_attention, 'one_query_as_reductions', lambda: reductions)
    jaxpr = str(jax.make_jaxpr(lambda w, s, x: layer.pure_fn(x, w, s, None))(
        layer.weights, layer.state, x))
    # The Q, K, V and output projections stay products; those over the cache become sums.
    assert jaxpr.count('dot_general') == (4 if reductions else 6)


@pytest.mark.parametrize('filled', [False, True])
def test_a_decoding_step_writes_the_cache_in_place_and_never_copies_it(filled, monkeypatch):
  """A step reads each of the K and V caches [batch·heads, max_len, d_head] once and writes
  only the new position: a transpose or copy of a cache (XLA makes one when a product wants
  another layout) would move it twice more. Read block by block (`attend_filled`, where a
  loop's operands count whole in the kernels' bytes), no cache is copied either."""
  if not filled:
    monkeypatch.setattr(causal_attention, 'FILLED_MIN_LEN', 1 << 30)
  d_model = 64  # heads of 32: the scores [heads, 1, max_len] are small beside a cache
  x = _inputs(1, 1, d_model)
  layer = _init(CausalAttention(d_model, 2, max_inference_length=4096, mode='predict'), x)
  step = jax.jit(lambda w, s, x: layer.pure_fn(x, w, s, None), donate_argnums=(1,))
  with decode_kernels.use('xla'):  # XLA's ops (the kernel's in-place writes: test_sparse_qkv)
    hlo = step.lower(layer.weights, layer.state, x).compile().as_text()
  assert (' while(' in hlo) == (filled and jax.default_backend() == 'cpu')
  assert not [line for line in hlo.splitlines()
              if 'f32[2,4096,32]' in line.partition('=')[2][:40] and ' copy(' in line]
  if not filled:
    moved = sum(k['bytes'] for k in decode_profile.kernels(hlo).values())
    cache_bytes = 4096 * d_model * 4
    assert 2 * cache_bytes <= moved < 2.5 * cache_bytes
