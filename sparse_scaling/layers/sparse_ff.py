"""Sparse feed-forward layer: one active unit in every block of N.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §3.1 "Sparse Feedforward Layer".
The d_ff units are split into d_ff // N blocks of N units; for every token a low-rank
controller picks one unit per block and the others are zero:

  Controller(x) = argmax(Reshape(x·C1·C2 + c, (-1, N)))           [..., d_ff // N]
  SparseFF(x)   = (max(0, x·W1 + b1) ⊙ Controller(x))·W2 + b2       [..., d_model]

Training samples the choice as trax does, argmax(logits + temperature·Gumbel noise), which
draws unit j of a block with probability softmax(logits / temperature)_j; here it is drawn
from that distribution directly, one uniform number per block inverted through its cumulative
sum, instead of one Gumbel number per unit (the same distribution, N times fewer random numbers
and no logarithms; another random stream than trax's). Gradients pass to the controller
straight through the one-hot mask (hard forward, softmax backward); eval and predict take the
argmax. In training the controller keeps its choice as state, so that the reverse pass of a
reversible model (Terraformer) replays it instead of recomputing it from reconstructed,
slightly different inputs: trax's `ReversibleHalfResidual` marks that pass by handing the
state back as `(choice, {'running_second_time_yes': ()})`.

W1 and W2 are both stored unit-major, [d_ff // N, N, d_model], so a unit's weights are one
contiguous row of each. Whenever a call has fewer than N tokens (decoding), the layer gathers
the d_ff // N chosen rows of W1 and W2 per token and never reads the rest; larger calls (and
training) run the dense product under the mask, which reads fewer bytes there. In predict mode
the controller and the units are one layer (`SparseFFDecode`, with the same weights), so that
on a GPU a decoding step runs them as one or two Pallas kernels (`sparse_ff_kernel.py`)
instead of six XLA kernels.
"""

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers import base
from trax.layers import normalization
from trax import shapes
from trax.layers import initializers as init

from sparse_scaling import decoding
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import sparse_ff_controller_kernel
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers.checks import check_mode
from sparse_scaling.layers.checks import check_positive_int
from sparse_scaling.layers.fused_residual import FusedResidual


# The state markers of trax's reversible layers (reversible.py, ReversibleHalfResidual).
_FIRST_TIME = 'running_second_time'       # Set by the forward pass: replay me in reverse.
_SECOND_TIME = 'running_second_time_yes'  # Set by the reverse pass.


def SparseFF(d_ff, n_elements_in_block=32, d_lowrank=None, temperature=0.1,
             quant_prob=0.3, dropout_rate=0.0, mode='train'):
  """Returns a feed-forward layer with one active unit in every block of N.

  Input: [..., d_model] activations. Output: the same shape.

  Args:
    d_ff: Number of hidden units; a multiple of `n_elements_in_block`.
    n_elements_in_block: N, the block size; one unit of every block is active.
    d_lowrank: Rank of the controller. None means the paper's d_model // N (at least 1);
      trax's models use d_ff // N instead (`ff_sparsity=N` in `ConfigurableTransformer`).
    temperature: Scale of the Gumbel noise added to the controller's log-probabilities in
      training (trax's convention: argmax(log_softmax + temperature·g)); 0 in eval/predict.
    quant_prob: Share of training calls that use the hard straight-through mask; the others
      use the soft mask (the softmax itself). As in trax, one coin is flipped per call.
    dropout_rate: Dropout on the layer's output in training.
    mode: 'train', 'eval' or 'predict'.
  """
  check_positive_int('d_ff', d_ff)
  check_positive_int('n_elements_in_block', n_elements_in_block)
  if n_elements_in_block < 2:
    raise ValueError(f'n_elements_in_block must be >= 2 (one active unit per block of N), '
                     f'got {n_elements_in_block}')
  if d_ff % n_elements_in_block:
    raise ValueError(f'd_ff ({d_ff}) must be a multiple of n_elements_in_block '
                     f'({n_elements_in_block})')
  if d_lowrank is not None:
    check_positive_int('d_lowrank', d_lowrank)
  if not 0.0 <= quant_prob <= 1.0:
    raise ValueError(f'quant_prob must be in [0, 1], got {quant_prob}')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  check_mode(mode)
  name = f'SparseFF_{d_ff}_{n_elements_in_block}'
  if mode == 'predict':
    return SparseFFDecode(d_ff, n_elements_in_block, d_lowrank, name)
  return tl.Serial(
      tl.Dup(),                                                           # x, x
      SparseFFController(d_ff, n_elements_in_block, d_lowrank,
                         temperature, quant_prob, mode),                  # choice, x
      ChosenUnitsFF(d_ff, n_elements_in_block),                           # y
      tl.Dropout(rate=dropout_rate, mode=mode),
      name=name)


class SparseFFController(base.Layer):
  """Low-rank controller choosing one unit in every block of N.

  Weights: C1 [d_model, d_lowrank], C2 [d_lowrank, d_ff // N, N], c [d_ff // N, N].
  Input x [..., d_model]. Output in train mode: the mask [..., d_ff // N, N] (straight-through
  one-hot or soft); in eval and predict: the chosen unit of each block, [..., d_ff // N] int32.
  State in train mode: the last choice [..., d_ff // N] and the reverse-pass marker.
  """

  def __init__(self, d_ff, n_elements_in_block, d_lowrank, temperature, quant_prob, mode):
    super().__init__(name='SparseFFController')
    self._n_blocks = d_ff // n_elements_in_block
    self._block = n_elements_in_block
    self._d_lowrank = d_lowrank
    self._temperature = temperature
    self._quant_prob = quant_prob
    self._mode = mode

  def forward(self, x):
    if self._mode != 'train':
      logits = _controller_logits(x, *self.weights)               # [..., d_ff // N, N]
      return decoding.argmax(logits)                              # [..., d_ff // N]
    noise_rng, coin_rng = jax.random.split(self.rng)
    choice, marker = self.state
    replay = _SECOND_TIME in marker  # The reverse pass replays the forward pass's choice.
    use_hard = jax.random.uniform(coin_rng) < self._quant_prob
    c1, c2, cb = self.weights
    n_tokens = x.size // x.shape[-1]
    kernel = decode_kernels.active('sparse_ff_controller')
    if kernel != 'xla' and sparse_ff_controller_kernel.fits(n_tokens, c1.shape[1], self._block):
      z = x.reshape(n_tokens, -1) @ c1                                   # [tokens, d_lowrank]
      draw = (choice.reshape(n_tokens, -1) if replay else
              jax.random.uniform(noise_rng, (n_tokens, self._n_blocks), x.dtype))
      mask, choice = sparse_ff_controller_kernel.controller_mask(
          z, c2, cb, draw, use_hard, self._temperature, replay, kernel == 'interpret')
      self.state = (choice.reshape(x.shape[:-1] + (self._n_blocks,)), {_FIRST_TIME: ()})
      return mask.reshape(x.shape[:-1] + (self._n_blocks, self._block))
    logits = _controller_logits(x, c1, c2, cb)                    # [..., d_ff // N, N]
    probs = jax.nn.softmax(logits, axis=-1)
    if not replay:
      choice = _sample_units(logits, self._temperature, noise_rng)
    self.state = (choice, {_FIRST_TIME: ()})
    hard = jax.nn.one_hot(choice, self._block, dtype=probs.dtype)
    straight_through = hard + probs - jax.lax.stop_gradient(probs)
    return jnp.where(use_hard, straight_through, probs)

  def init_weights_and_state(self, input_signature):
    d_model = input_signature.shape[-1]
    d_lowrank = self._d_lowrank or max(1, d_model // self._block)
    d_ff = self._n_blocks * self._block
    rng1, rng2, rng3 = jax.random.split(self.rng, 3)
    glorot = init.GlorotUniformInitializer()
    c1 = glorot((d_model, d_lowrank), rng1)
    c2 = glorot((d_lowrank, d_ff), rng2).reshape(d_lowrank, self._n_blocks, self._block)
    cb = init.RandomNormalInitializer(1e-6)((self._n_blocks, self._block), rng3)
    self.weights = (c1, c2, cb)
    if self._mode == 'train':
      self.state = (jnp.zeros(input_signature.shape[:-1] + (self._n_blocks,), jnp.int32),
                    {_FIRST_TIME: ()})


class ChosenUnitsFF(base.Layer):
  """ReLU feed-forward that computes only the units the controller chose.

  Weights: W1 [d_ff // N, N, d_model], b1 [d_ff // N, N], W2 [d_ff // N, N, d_model],
  b2 [d_model]. Inputs: the controller's choice (a float mask [..., d_ff // N, N] or unit
  indices [..., d_ff // N]) and x [..., d_model]. Output: [..., d_model].
  """

  def __init__(self, d_ff, n_elements_in_block):
    super().__init__(n_in=2, n_out=1, name='ChosenUnitsFF')
    self._n_blocks = d_ff // n_elements_in_block
    self._block = n_elements_in_block

  def forward(self, inputs):
    choice, x = inputs
    n_tokens = x.size // x.shape[-1]
    if jnp.issubdtype(choice.dtype, jnp.integer) and n_tokens < self._block:
      return _gathered_units(choice, x, *self.weights)
    if jnp.issubdtype(choice.dtype, jnp.integer):
      choice = jax.nn.one_hot(choice, self._block, dtype=x.dtype)
    return _masked_units(choice, x, *self.weights)

  def init_weights_and_state(self, input_signature):
    _, x_signature = input_signature
    d_model = x_signature.shape[-1]
    shape = (self._n_blocks, self._block, d_model)
    d_ff = self._n_blocks * self._block
    rng1, rng2, rng3, rng4 = jax.random.split(self.rng, 4)
    glorot = init.GlorotUniformInitializer()
    bias = init.RandomNormalInitializer(1e-6)
    w1 = glorot((d_ff, d_model), rng1).reshape(shape)
    w2 = glorot((d_ff, d_model), rng2).reshape(shape)
    self.weights = (w1, bias(shape[:2], rng3), w2, bias((d_model,), rng4))


class SparseFFDecode(base.Layer):
  """`SparseFF` in predict mode: the controller's choice and the chosen units in one layer.

  Input x [..., d_model]; output [..., d_model]. Weights ((), (C1, C2, c), (W1, b1, W2, b2),
  ()): the tree of the train and eval layer (Dup, controller, units, dropout), so that a
  trained model's weights can be set on the predict-mode model as they are. A call of fewer
  than N tokens reads only the chosen rows: on a GPU through the Pallas kernels of
  `sparse_ff_kernel.py`, else by gathers; a longer call (a prompt) runs the dense product under
  the one-hot mask. There is no dropout in predict mode.
  """

  def __init__(self, d_ff, n_elements_in_block, d_lowrank, name):
    super().__init__(name=name)
    self._parts = (SparseFFController(d_ff, n_elements_in_block, d_lowrank, 0.0, 0.0, 'eval'),
                   ChosenUnitsFF(d_ff, n_elements_in_block))
    self._block = n_elements_in_block

  def forward(self, x):
    _, controller, units, _ = self.weights
    n_tokens = x.size // x.shape[-1]
    kernel = decode_kernels.active('sparse_ff')
    rank, _, block = controller[1].shape
    if n_tokens < self._block and kernel != 'xla' and sparse_ff_kernel.fits(rank, block):
      flat = x.reshape(n_tokens, x.shape[-1])                      # [tokens, d_model]
      y = sparse_ff_kernel.sparse_units(flat, flat @ controller[0], *controller[1:], *units,
                                        interpret=kernel == 'interpret')
      return y.reshape(x.shape)
    choice = decoding.argmax(_controller_logits(x, *controller))
    if n_tokens < self._block:
      return _gathered_units(choice, x, *units)
    return _masked_units(jax.nn.one_hot(choice, self._block, dtype=x.dtype), x, *units)

  def init_weights_and_state(self, input_signature):
    rng_c, rng_u = jax.random.split(self.rng)
    controller, units = self._parts
    choice = shapes.ShapeDtype(input_signature.shape[:-1] + (units._n_blocks,), jnp.int32)  # pylint: disable=protected-access
    self.weights = ((), controller.init(input_signature, rng=rng_c, use_cache=False)[0],
                    units.init((choice, input_signature), rng=rng_u, use_cache=False)[0], ())


class SparseFFResidual(FusedResidual):
  """x + SparseFF(LayerNorm(x)) as `tl.Residual`; one decoded token as Pallas kernels
  (`sparse_ff_kernel.ff_block`: the LayerNorm with the controller's first product, then the
  units, and W2's chosen rows either in the units programs, their parts added by XLA, or in a
  kernel of their own; where `decode_kernels` says so). Chained after an attention block
  (`fused_residual.CHAIN`), the units kernel finishes the LayerNorm from that block's partial
  sums, with no kernel of its own for it."""

  PARTS = (normalization.LayerNorm, SparseFFDecode)

  def fused(self, x, parts, partials=None, ahead=()):
    """With `partials` (the attention block's before it, `FusedDecoder`), no LayerNorm
    kernel; `ahead`: the next block's fixed weights, for `decode_kernels.PREFETCH`."""
    kernel = decode_kernels.active('sparse_ff_block')
    norm = self.part(0)
    (norm_w, _), ((_, controller, units, _), _) = parts
    if not self._takes(x, controller):
      return None
    batch, _, d_model = x.shape
    y = sparse_ff_kernel.ff_block(x.reshape(batch, d_model), *norm_w, controller, units,
                                  norm._epsilon, interpret=kernel == 'interpret',  # pylint: disable=protected-access
                                  partials=partials, ahead=ahead)
    return y.reshape(x.shape), ((), ())

  def ahead_arrays(self, weights):
    """What this block's units kernel reads of its `weights` whatever the token, for the
    kernel before it to ask the L2 cache for (`decode_kernels.PREFETCH`): C2, c, b1, b2."""
    _, (_, c2, cb), (_, b1, _, b2), _ = self.part_weights(weights, 1)
    return c2, cb, b1, b2

  def chain_norm(self, x, weights):
    """(scale, bias, C1) for the partial sums that the attention block before this one
    computes (`FusedDecoder`), where a one-token call of this block runs its kernels; else
    None."""
    if not (self._mode == 'predict' and x.ndim == 3 and x.shape[1] == 1):
      return None
    norm_w, (_, controller, _, _) = self.part_weights(weights, 0), self.part_weights(weights, 1)
    return (*norm_w, controller[0]) if self._takes(x, controller) else None

  def _takes(self, x, controller):
    """Whether a one-token call on x [batch, 1, d] runs the kernels: N rows or more take the
    masked dense product, as `SparseFFDecode` does."""
    rank, _, block = controller[1].shape
    return (decode_kernels.active('sparse_ff_block') != 'xla'
            and self.part(0)._center and x.shape[0] < block  # pylint: disable=protected-access
            and sparse_ff_kernel.fits(rank, block))


def _sample_units(logits, temperature, rng):
  """One unit per block: logits [..., d_ff // N, N] -> int32 [..., d_ff // N].

  Draws unit j with probability softmax(logits / temperature)_j, the distribution of trax's
  argmax(logits + temperature·Gumbel), by inverting the cumulative distribution at one
  uniform number per block; temperature 0 takes the argmax.
  """
  if not temperature:
    return decoding.argmax(logits)
  cdf = jnp.cumsum(jax.nn.softmax(logits / temperature, axis=-1), axis=-1)   # [..., k, N]
  u = jax.random.uniform(rng, logits.shape[:-1] + (1,), cdf.dtype) * cdf[..., -1:]
  return jnp.sum(cdf[..., :-1] <= u, axis=-1).astype(jnp.int32)   # units before the draw


def _controller_logits(x, c1, c2, cb):
  """x [..., d_model] -> logits [..., d_ff // N, N] of the low-rank controller."""
  return jnp.einsum('...d,dr,rkn->...kn', x, c1, c2) + cb


def _masked_units(mask, x, w1, b1, w2, b2):
  """The dense product under a (soft or one-hot) mask [..., d_ff // N, N]: x [..., d].

  Both products run on 2-D views ([tokens, d] and [d_ff, d]), so that XLA lays the hidden
  activations out token-major instead of transposing them between the products.
  """
  n_blocks, block, d_model = w1.shape
  flat = x.reshape(-1, d_model)                                        # [tokens, d]
  hidden = jnp.dot(flat, w1.reshape(-1, d_model).T) + b1.reshape(-1)  # [tokens, d_ff]
  masked = jax.nn.relu(hidden) * mask.reshape(-1, n_blocks * block)
  return (masked @ w2.reshape(-1, d_model)).reshape(x.shape) + b2


# On a CPU, the most bytes of W1's (and W2's) float32 chosen rows that `_gathered_units` gathers
# at once for a token; 0: all at once (`bench.decode_shares`' CHUNK).
CPU_CHUNK_BYTES = 4 * 2**20


def _gathered_units(units, x, w1, b1, w2, b2):
  """Reads only the chosen rows: units [..., d_ff // N] int32, x [..., d_model].

  On a CPU, where a token's chosen float32 rows of W1 pass CPU_CHUNK_BYTES (at the 17B shapes
  256 rows of 36 KB, 9.4 MB), the blocks are taken a chunk at a time (`lax.scan`): a chunk's
  rows of W1 and W2 are gathered and multiplied before the next chunk's are gathered, so that
  the products read them from the cache instead of from memory, as they must when all the rows
  are gathered first (a 17B FF+QKV block 3-11% faster, side by side: docs/speed.md). The sum
  is the same up to the order of its additions.
  """
  n_blocks, block, d_model = w1.shape
  rows = units + block * jnp.arange(n_blocks, dtype=units.dtype)      # [..., d_ff // N]
  take = lambda w, rows: jnp.take(w.reshape(n_blocks * block, -1), rows, axis=0, mode='clip',
                                  indices_are_sorted=True, unique_indices=True)  # [..., k, d]

  def units_ff(rows):                                                  # -> [..., d_model]
    hidden = jnp.einsum('...d,...kd->...k', x, take(w1, rows)) + take(b1, rows)[..., 0]
    return jnp.einsum('...k,...kd->...d', jax.nn.relu(hidden), take(w2, rows))

  n_chunks = _cpu_chunks(n_blocks, d_model, w1.dtype)
  if n_chunks == 1:
    return units_ff(rows) + b2
  chunks = jnp.moveaxis(rows.reshape(*rows.shape[:-1], n_chunks, -1), -2, 0)  # [chunks, ..., k]
  total, _ = jax.lax.scan(lambda total, rows: (total + units_ff(rows), None),
                          units_ff(chunks[0]), chunks[1:])
  return total + b2


def _cpu_chunks(n_blocks, d_model, dtype):
  """How many chunks `_gathered_units` takes a token's n_blocks chosen rows of d_model
  elements in: on a CPU, for float32 weights, the fewest that divide n_blocks into chunks of
  at most CPU_CHUNK_BYTES; otherwise, or with CPU_CHUNK_BYTES 0, one. (Inside a scan XLA's CPU
  compiler multiplies bfloat16 rows some 150 times slower: the 17B layer's token 1.84 s
  against 12.5 ms; docs/speed.md.)"""
  if not CPU_CHUNK_BYTES or jax.default_backend() != 'cpu' or dtype != jnp.float32:
    return 1
  row_bytes = 4 * d_model
  fit = [n for n in range(1, n_blocks + 1)
         if n_blocks % n == 0 and n_blocks // n * row_bytes <= CPU_CHUNK_BYTES]
  return fit[0] if fit else n_blocks

