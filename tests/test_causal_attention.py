"""Causal attention with a KV cache read chunk by chunk: predict == eval, trax parity."""

import functools

import jax
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from sparse_scaling import convert
from sparse_scaling.layers import CausalAttention
from sparse_scaling.layers import causal_attention
from tests.utils import assert_predict_equals_eval


@pytest.mark.parametrize('init_tokens', [1, 6])  # prompts within one chunk and across two
def test_predict_equals_eval_across_chunks(monkeypatch, init_tokens):
  monkeypatch.setattr(causal_attention, 'CHUNK', 4)  # 13 positions span 4 chunks
  x = np.random.RandomState(0).randn(2, 13, 16).astype(np.float32)
  model_fn = functools.partial(CausalAttention, 16, n_heads=2, max_len=16)
  assert_predict_equals_eval(model_fn, x, init_tokens=init_tokens)


def test_cache_rounds_up_to_whole_chunks(monkeypatch):
  monkeypatch.setattr(causal_attention, 'CHUNK', 8)
  layer = causal_attention.CachedCausalAttention(max_len=20)
  q = shapes.ShapeDtype((4, 1, 8), np.float32)
  layer.init((q, q, q))
  assert layer.state[0].shape == (4, 24, 8)


def test_eval_matches_trax_causal_attention():
  x = np.random.RandomState(1).randn(2, 7, 16).astype(np.float32)
  theirs = tl.CausalAttention(16, n_heads=4, mode='eval')
  theirs.init(shapes.signature(x), rng=jax.random.PRNGKey(3))
  ours = CausalAttention(16, n_heads=4, mode='eval')
  ours.init(shapes.signature(x))
  convert.load_trax_weights(ours, theirs.weights)
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)
