"""The convolution control (dense attention + Sparse QKV's convolution): dense at the identity
kernel, causal, predict == eval, gradients, the LM's knob and its parameter count."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax import shapes

from sparse_scaling.layers import CausalAttention
from sparse_scaling.layers import DenseConvAttention
from sparse_scaling.models import ScalingTransformerLM
from sparse_scaling.models.params import parameter_counts
from tests.utils import assert_predict_equals_eval
from tests.utils import initialized as _init
from tests.utils import random_inputs as _inputs

D_MODEL, N_HEADS, S = 16, 2, 4
VOCAB = 32


def _identity_kernels(weights, length_kernel_size):
  """The layer's weights with every convolution the identity: the current position's own
  module, bias 0."""
  (select, branch), core, out = weights  # tl.Branch: its Select's (), then (Q, K, V)
  m = D_MODEL // S
  projections = []
  for dense, ((kernel, bias),) in branch:
    identity = np.zeros(kernel.shape, np.float32)
    identity[length_kernel_size - 1, kernel.shape[1] // 2] = np.eye(m)
    projections.append((dense, ((jnp.asarray(identity), jnp.zeros_like(bias)),)))
  return ((select, tuple(projections)), core, out)


@pytest.mark.parametrize('length_kernel_size', [1, 3])
def test_identity_kernels_give_dense_attention(length_kernel_size):
  x = _inputs(2, 7, D_MODEL)
  ours = _init(DenseConvAttention(D_MODEL, N_HEADS, S, length_kernel_size, mode='eval'), x)
  dense = _init(CausalAttention(D_MODEL, N_HEADS, mode='eval'), x)
  ours.weights = _identity_kernels(ours.weights, length_kernel_size)
  (_, (q, k, v)), _, out = ours.weights
  dense.weights = (((), (q[0], k[0], v[0])), (), out)
  np.testing.assert_allclose(ours(x), dense(x), atol=1e-5)


def test_is_causal():
  x = _inputs(1, 8, D_MODEL)
  layer = _init(DenseConvAttention(D_MODEL, N_HEADS, S, mode='eval'), x)
  changed = x.copy()
  changed[:, 5:] -= 2.0
  y, y_changed = np.asarray(layer(x)), np.asarray(layer(changed))
  np.testing.assert_allclose(y[:, :5], y_changed[:, :5], atol=1e-6)
  assert not np.allclose(y[:, 5], y_changed[:, 5])


@pytest.mark.parametrize('length_kernel_size', [1, 3])
def test_predict_equals_eval(length_kernel_size):
  model_fn = functools.partial(DenseConvAttention, D_MODEL, N_HEADS, S, length_kernel_size,
                               max_inference_length=16)
  assert_predict_equals_eval(model_fn, _inputs(2, 8, D_MODEL))


def test_lm_predict_equals_eval():
  tokens = np.random.RandomState(0).randint(1, VOCAB, (2, 9)).astype(np.int32)
  model_fn = functools.partial(ScalingTransformerLM, vocab_size=VOCAB, d_model=D_MODEL, d_ff=32,
                               n_layers=2, n_heads=N_HEADS, max_len=16, dropout=0.0,
                               attention_conv=S)
  assert_predict_equals_eval(model_fn, tokens, shifted=True)


def test_gradients_reach_every_weight_and_match_finite_differences():
  x = _inputs(2, 6, D_MODEL)
  layer = _init(DenseConvAttention(D_MODEL, N_HEADS, S, mode='eval'), x)
  target = _inputs(2, 6, D_MODEL, seed=1)

  def loss(weights):
    y, _ = layer.pure_fn(x, weights, layer.state, jax.random.PRNGKey(0))
    return jnp.mean((y - target) ** 2)

  grads = jax.grad(loss)(layer.weights)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 3 * (2 + 2) + 2  # q, k, v: Dense w, b and kernel, bias; output w, b
  for g in leaves:
    assert np.isfinite(g).all() and np.abs(g).max() > 0
  direction = jax.tree.map(lambda w: _inputs(*w.shape, seed=2), layer.weights)
  eps = 1e-2
  moved = [loss(jax.tree.map(lambda w, d, s=s: w + s * eps * d, layer.weights, direction))
           for s in (1, -1)]
  numeric = (moved[0] - moved[1]) / (2 * eps)
  analytic = sum(np.vdot(g, d) for g, d in zip(leaves, jax.tree.leaves(direction)))
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


def test_lm_has_dense_weights_plus_the_convolutions():
  signature = shapes.ShapeDtype((1, 8), np.int32)
  counts = {conv: parameter_counts(ScalingTransformerLM(
      vocab_size=VOCAB, d_model=D_MODEL, d_ff=32, n_layers=2, n_heads=N_HEADS, max_len=16,
      attention_conv=conv, mode='eval'), signature) for conv in (0, S)}
  m = D_MODEL // S
  per_layer = 2 * (3 * 3 * m * m + m) + (3 * 1 * m * m + m)  # Q, K (3, 3); V (3, 1); biases
  assert counts[S]['total'] - counts[0]['total'] == 2 * per_layer
  assert (counts[S]['decoder/self_attention'] - counts[0]['decoder/self_attention'] ==
          2 * per_layer)


@pytest.mark.parametrize('make, parameter', [
    (lambda: ScalingTransformerLM(d_model=16, n_heads=2, attention_conv=4,
                                  attention_sparsity=4), 'attention_sparsity'),
    (lambda: ScalingTransformerLM(d_model=16, n_heads=2, attention_conv=3), 'attention_conv'),
    (lambda: DenseConvAttention(16, 2, n_modules=5), 'n_modules'),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(make, parameter):
  with pytest.raises(ValueError, match=parameter):
    make()
