"""Scaling Transformer LM: shapes, predict == eval, argument checks."""

import functools

import jax
import numpy as np
import pytest
from trax import shapes

from sparse_scaling.models import ScalingTransformerLM
from tests.utils import assert_predict_equals_eval

TINY = dict(vocab_size=32, d_model=16, d_ff=64, n_layers=2, n_heads=2, max_len=16, dropout=0.1)


def _tokens(batch=2, length=9, seed=0):
  return np.random.RandomState(seed).randint(1, TINY['vocab_size'], (batch, length)).astype(
      np.int32)


@pytest.mark.parametrize('ff_sparsity', [0, 8, (8, 4)])
def test_logits_have_vocab_size(ff_sparsity):
  model = ScalingTransformerLM(**TINY, ff_sparsity=ff_sparsity, mode='train')
  tokens = _tokens()
  model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(0))
  assert model(tokens, rng=jax.random.PRNGKey(1)).shape == (2, 9, TINY['vocab_size'])


@pytest.mark.parametrize('ff_sparsity', [0, 8])
def test_predict_equals_eval(ff_sparsity):
  model_fn = functools.partial(ScalingTransformerLM, **TINY, ff_sparsity=ff_sparsity)
  assert_predict_equals_eval(model_fn, _tokens(), shifted=True)


def test_n_heads_must_divide_d_model():
  with pytest.raises(ValueError, match='n_heads'):
    ScalingTransformerLM(**dict(TINY, n_heads=3))
