"""Simple Recurrent Unit beside the feed-forward layer: the Terraformer's recurrence.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §4.3 "Recurrence for
generalization": a small SRU (Lei et al., 2017) runs in parallel with every feed-forward
layer, `x + FF(LN(x)) + Dense(SRU(Dense_u(LN(x))))`, with u = 32 units (64 in the big model).

  r, f, y = sigmoid(x·Wr + br), sigmoid(x·Wf + bf), x·Wy + by
  c_t = f_t ⊙ c_{t-1} + (1 − f_t) ⊙ y_t
  h_t = r_t ⊙ c_t + (1 − r_t) ⊙ x_t · √3

The recurrence is linear in c, so it runs as a parallel (associative) scan over the length.
A mask [batch, length] marks the positions that exist: at a masked position the cell keeps
its state. In a Terraformer decoder the padding of [encoder; decoder] sits after the real
tokens, so the mask changes nothing in training; it matters in predict mode, where the first
call's padding must not advance the state that later tokens continue from.
"""

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers import base

from sparse_scaling.layers import components
from sparse_scaling.layers.checks import check_mode
from sparse_scaling.layers.checks import check_positive_int
from sparse_scaling.layers.layer_norm import LayerNorm


def SRU(n_units, mode='train'):
  """Returns an SRU layer: (x [batch, length, n_units], mask [batch, length]) -> h [batch, length, n_units].

  Weights: one Dense(3·n_units) producing r, f and y (trax's `tl.SRU` layout).

  Args:
    n_units: Width of input, state and output.
    mode: 'train', 'eval' or 'predict' (the state is kept between calls).
  """
  check_positive_int('n_units', n_units)
  check_mode(mode)
  def split_gates(rfy):
    r, f, y = jnp.split(rfy, 3, axis=-1)
    return jax.nn.sigmoid(r), jax.nn.sigmoid(f), y

  return tl.Serial(                                      # x, mask
      tl.Branch(tl.Dense(3 * n_units), []),              # rfy, x, mask
      tl.Fn('Gates', split_gates, n_out=3),              # r, f, y, x, mask
      tl.Select([1, 2, 4, 0, 3], n_in=5),                # f, y, mask, r, x
      SRUScan(mode),                                     # c, r, x
      tl.Fn('SRUOutput', lambda c, r, x: r * c + (1.0 - r) * x * 3**0.5),
      name=f'SRU_{n_units}')


def SRUSideBranch(d_model, n_units, n_layers, mode):
  """The SRU branch of a feed-forward block: (x, mask) -> [batch, length, d_model].

  LayerNorm, Dense to `n_units`, `n_layers` SRUs, Dense back to d_model (trax's layout in
  `FeedForwardWithOptions`, so that weights convert one to one).
  """
  srus = [[tl.Select([0, 1, 1]), SRU(n_units, mode)] for _ in range(n_layers)]  # keeps mask
  return components.SRUBranch(LayerNorm(), tl.Dense(n_units), srus, tl.Select([0], n_in=2),
                              tl.Dense(d_model), name='SRUSideBranch')


class SRUScan(base.Layer):
  """The cell state c_t = f_t·c_{t-1} + (1 − f_t)·y_t where mask_t, else c_{t-1}.

  Inputs: f (forget gate, in (0, 1)), y [batch, length, n], mask [batch, length]. Output: c
  [batch, length, n]. State in predict mode: the last c [batch, n], zeros at first.
  """

  def __init__(self, mode):
    super().__init__(n_in=3, n_out=1, name='SRUScan')
    self._mode = mode

  def forward(self, inputs):
    f, y, mask = inputs
    keep = mask[..., None].astype(f.dtype)                   # [batch, length, 1]
    decay = keep * f + (1.0 - keep)                          # c_t = decay_t·c_{t-1} + update_t
    update = keep * (1.0 - f) * y
    if self._mode == 'predict':
      update = update.at[:, 0].add(decay[:, 0] * self.state)

    def combine(earlier, later):  # (a1, b1) then (a2, b2) is (a1·a2, a2·b1 + b2)
      return earlier[0] * later[0], later[0] * earlier[1] + later[1]

    _, c = jax.lax.associative_scan(combine, (decay, update), axis=1)
    if self._mode == 'predict':
      self.state = c[:, -1]
    return c

  def init_weights_and_state(self, input_signature):
    if self._mode == 'predict':
      y = input_signature[1]
      self.state = jnp.zeros((y.shape[0], y.shape[-1]), y.dtype)
