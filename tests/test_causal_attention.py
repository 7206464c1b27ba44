"""Causal attention with a head-major KV cache: trax's numbers, predict == eval, no cache copy."""

import functools

import jax
import numpy as np
import pytest
from trax import layers as tl

from sparse_scaling import convert
from sparse_scaling.bench import decode_profile
from sparse_scaling.layers import CausalAttention
from sparse_scaling.layers import causal_attention
from sparse_scaling.layers import decode_kernels
from tests.utils import assert_predict_equals_eval
from tests.utils import initialized as _init
from tests.utils import random_inputs as _inputs

D_MODEL, N_HEADS = 16, 4


def test_matches_trax_causal_attention_with_the_same_weights():
  x = _inputs(2, 7, D_MODEL)
  theirs = _init(tl.CausalAttention(D_MODEL, n_heads=N_HEADS, mode='eval'), x, seed=5)
  ours = _init(CausalAttention(D_MODEL, N_HEADS, mode='eval'), x)
  convert.load_trax_weights(ours, theirs.weights)
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)


@pytest.mark.parametrize('kernel, reductions, max_len, length', [
    ('xla', False, 16, 9), ('xla', True, 16, 9), ('xla', True, 16, 16),
    ('interpret', False, 16, 9), ('interpret', False, 20, 19)])
def test_predict_equals_eval(kernel, reductions, max_len, length, monkeypatch):
  # reductions: each decoded token's products over the cache as sums (as on a GPU; here on
  # any backend), up to a full cache. kernel 'interpret': each decoded token through the
  # Pallas kernel (attention_kernel.py), run by Pallas' interpreter. A cache of 20 is read in
  # blocks of 16, the second overlapping the first; decoding fills it up to its last position.
  monkeypatch.setattr(causal_attention, 'one_query_as_reductions', lambda: reductions)
  model_fn = functools.partial(CausalAttention, D_MODEL, N_HEADS, max_inference_length=max_len)
  with decode_kernels.use(kernel):
    assert_predict_equals_eval(model_fn, _inputs(2, length, D_MODEL))


def test_one_query_products_are_reductions_on_gpus_only(monkeypatch):
  assert causal_attention.one_query_as_reductions() == (jax.default_backend() == 'gpu')
  x = _inputs(1, 1, D_MODEL)
  layer = _init(CausalAttention(D_MODEL, N_HEADS, mode='predict'), x)
  for reductions in (False, True):
    monkeypatch.setattr(causal_attention, 'one_query_as_reductions', lambda: reductions)
    jaxpr = str(jax.make_jaxpr(lambda w, s, x: layer.pure_fn(x, w, s, None))(
        layer.weights, layer.state, x))
    # The Q, K, V and output projections stay products; those over the cache become sums.
    assert jaxpr.count('dot_general') == (4 if reductions else 6)


def test_a_decoding_step_writes_the_cache_in_place_and_never_copies_it():
  """A step reads each of the K and V caches [batch·heads, max_len, d_head] once and writes
  only the new position: a transpose or copy of a cache (XLA makes one when a product wants
  another layout) would move it twice more."""
  d_model = 64  # heads of 32: the scores [heads, 1, max_len] are small beside a cache
  x = _inputs(1, 1, d_model)
  layer = _init(CausalAttention(d_model, 2, max_inference_length=4096, mode='predict'), x)
  step = jax.jit(lambda w, s, x: layer.pure_fn(x, w, s, None), donate_argnums=(1,))
  with decode_kernels.use('xla'):  # XLA's ops (the kernel's in-place writes: test_sparse_qkv)
    hlo = step.lower(layer.weights, layer.state, x).compile().as_text()
  moved = sum(k['bytes'] for k in decode_profile.kernels(hlo).values())
  cache_bytes = 4096 * d_model * 4
  assert 2 * cache_bytes <= moved < 2.5 * cache_bytes
