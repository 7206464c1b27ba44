"""The dense FF's ReLU: trax's values and gradients as max(x, 0) (RELU_AS_MAXIMUM)."""

import jax
import jax.numpy as jnp
import numpy as np
from trax import layers as tl

from sparse_scaling.layers import feed_forward

X = np.array([-2.0, -0.0, 0.0, 1e-30, 3.5, np.nan, -np.inf, np.inf], np.float32)


def test_relu_gives_trax_s_values_nan_included():
  ours, theirs = feed_forward.Relu()(jnp.asarray(X)), tl.Relu()(jnp.asarray(X))
  np.testing.assert_array_equal(ours, theirs)
  ours, theirs = feed_forward.Relu(), tl.Relu()
  assert [layer.name for layer in ours.sublayers] == [layer.name for layer in theirs.sublayers]
  assert ours.weights == theirs.weights   # a checkpoint's weights tree is trax's


def test_relu_as_a_maximum_has_trax_s_gradient_zero_included():
  x = jnp.asarray(np.random.RandomState(0).randn(64).astype(np.float32)).at[:2].set(0.0)
  grad = lambda layer: jax.grad(lambda t: jnp.sum(layer(t) * jnp.arange(64.0)))(x)
  np.testing.assert_array_equal(grad(feed_forward.Relu()), grad(tl.Relu()))
