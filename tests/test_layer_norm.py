"""LayerNorm: trax's numbers; a decoded token's statistics from one pass over x."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from trax.layers import normalization

from sparse_scaling.layers import LayerNorm
from sparse_scaling.layers import layer_norm
from tests.utils import initialized
from tests.utils import random_inputs

D = 96


def _pair(x, dtype=jnp.float32):
  """(ours, trax's) initialized on x, sharing random (scale, bias) of `dtype`."""
  ours, theirs = initialized(LayerNorm(), x), initialized(normalization.LayerNorm(), x)
  weights = tuple(jnp.asarray(1 + 0.1 * random_inputs(D, seed=s), dtype) for s in (1, 2))
  ours.weights = theirs.weights = weights
  return ours, theirs


@pytest.mark.parametrize('offset, rtol', [(0.0, 1e-5), (10.0, 1e-4)])
def test_a_decoded_token_is_normalized_as_trax_does(offset, rtol):
  """One position per row: one pass, trax's output to float32's rounding of Σx² (larger for a
  row whose mean is `offset` standard deviations off zero: the module's note)."""
  x = jnp.asarray(random_inputs(3, 1, D) + offset)
  ours, theirs = _pair(x)
  np.testing.assert_allclose(ours(x), theirs(x), rtol=rtol, atol=rtol)


def test_other_calls_are_trax_s_own_bit_for_bit():
  x = jnp.asarray(random_inputs(2, 7, D))
  ours, theirs = _pair(x)
  np.testing.assert_array_equal(ours(x), theirs(x))


@pytest.mark.parametrize('x_dtype, w_dtype', [(jnp.bfloat16, jnp.bfloat16),
                                              (jnp.float32, jnp.bfloat16),
                                              (jnp.bfloat16, jnp.float32)])
def test_a_decoded_token_keeps_trax_s_dtype(x_dtype, w_dtype):
  x = jnp.asarray(random_inputs(1, 1, D), x_dtype)
  ours, theirs = _pair(x, w_dtype)
  got, expected = ours(x), theirs(x)
  assert got.dtype == expected.dtype
  np.testing.assert_allclose(np.float32(got), np.float32(expected), atol=0.05)


def _reductions(fn, *args):
  """(reductions in fn's program, how many of them read what another reduction computed)."""
  after_reduction, count, waiting = set(), 0, 0
  for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns:
    reads_one = any(isinstance(v, jax.extend.core.Var) and v in after_reduction
                    for v in eqn.invars)
    if eqn.primitive.name.startswith('reduce'):
      count, waiting = count + 1, waiting + reads_one
    if reads_one or eqn.primitive.name.startswith('reduce'):
      after_reduction.update(eqn.outvars)
  return count, waiting


@pytest.mark.parametrize('one_pass, reductions', [(True, (1, 0)), (False, (2, 1))])
def test_a_decoded_token_takes_both_statistics_from_one_reduction(one_pass, reductions,
                                                                  monkeypatch):
  """ONE_PASS: both sums one reduction (one kernel on a GPU, whatever made x); trax's two, the
  variance's waiting on the mean."""
  monkeypatch.setattr(layer_norm, 'ONE_PASS', one_pass)
  x = jnp.asarray(random_inputs(1, 1, D))
  ours, _ = _pair(x)
  forward = lambda w, t: ours.pure_fn(t, w, (), None)[0]   # a new function: traced anew
  assert _reductions(forward, ours.weights, x) == reductions
