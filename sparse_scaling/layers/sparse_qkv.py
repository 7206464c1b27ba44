"""Sparse QKV attention: Q, K and V from a multiplicative layer and a causal 2-D convolution.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §3.2 "Sparse QKV Layer". One
multiplicative layer (`multiplicative_dense.py`) mixes the d_model inputs into S modules of
size M = d_model / S. Its output, viewed as an image [length, S] with M channels, goes through
2-D convolutions that are causal along the length: Q and K with a (length_kernel_size, 3)
kernel, V with (length_kernel_size, 1). The convolution weights are shared across modules.
The results split into heads for causal dot-product attention (`causal_attention.py`); there
is no output projection.

Per token, decoding reads d_model·(S + M) multiplicative weights and three small kernels
instead of the 4·d_model² of dense Q, K, V and output projections. In predict mode the three
convolutions share one state, the last length_kernel_size − 1 outputs of the multiplicative
layer, and compute each new position as one matrix product over its receptive field (no
convolution call); attention keeps a KV cache.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers import base
from trax.layers import normalization
from trax.layers import initializers as init

from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import fused_residual
from sparse_scaling.layers import sparse_qkv_block_kernel
from sparse_scaling.layers import sparse_qkv_fields_kernel
from sparse_scaling.layers import sparse_qkv_kernel
from sparse_scaling.layers.causal_attention import CausalAttentionCore
from sparse_scaling.layers.checks import check_divides
from sparse_scaling.layers.checks import check_mode
from sparse_scaling.layers.fused_residual import FusedResidual
from sparse_scaling.layers.multiplicative_dense import MultiplicativeDense

# Decoding computes each new position of the convolutions as a product of its receptive
# fields and the kernels (`ModuleConv`'s predict path). On a GPU, XLA merges Q's and K's
# products into one, concatenating their kernels, and pads the contracting side of its Triton
# products to a multiple of 64 rows (at 17B: Q and K 1296 -> 1344, V 432 -> 448, and the
# fields); those passes run after its loop-invariant code motion, so a generation did that at
# every token, 6.4 µs of a 17B block's ~60 (docs/results/decode_profile_gpu_17b.md), and
# pads that the step itself made were not hoisted either (docs/decoding_gpu.md, "17B
# shapes"). So the kernels are laid out once per generation, outside its loop
# (`ModuleConv.decode_weights`, called through `decoding.laid_out`): those of one module
# kernel size side by side, their rows padded with zeros to a multiple of PAD_ROWS, and each
# step pads the fields in the concatenation that builds them: one 17B block looped 0.0623-0.0629
# ms against 0.0658-0.0667 on an H100, 0.0577-0.0583 against 0.0615-0.0620 on an H200
# (docs/decoding_gpu.md). DECODE_LAYOUT None: on GPUs only (on a CPU it changed nothing
# beyond the spread, docs/speed.md); True: on every backend (the tests); False: never.
DECODE_LAYOUT = None
PAD_ROWS = 64
# With ONE_PRODUCT the layout makes one product of all three convolutions: V's kernel (module
# kernel size 1) placed at the middle module of the receptive fields that Q and K read (size
# 3), zeros at the others, so that a token builds one set of fields and runs one product
# [S, 3·lks·M] x [3·lks·M, 3M]: at 17B a [1344, 432] kernel of 2.32 MB where the two products
# read 1.81, and V's own concatenation and product kernels go. On an H200 one 17B block looped
# 0.0534-0.0544 ms against 0.0577-0.0583 with a product per size, and in bfloat16
# 0.0408-0.0409 against 0.0442-0.0448 (docs/decoding_gpu.md): on (`bench.decode_shares`'
# CONV_ONE=0 turns it off). It changes nothing where nothing is laid out (CPUs, fused blocks).
ONE_PRODUCT = True
# With STATE_FROM_FIELDS a laid-out token's new state (the window's last lks − 1 positions)
# is read from the receptive fields the product reads, through an optimization barrier, not
# from the window: XLA then writes it into the donated state after building the fields, where
# reading the old state and writing the new one in one fusion made it copy the state first, a
# kernel a block at every token (the 17B attention block: 15 -> 14 kernels looped, compiled
# for an H100 without one; docs/decoding_gpu.md, "The convolution's state from the fields").
STATE_FROM_FIELDS = True


class DecodeLayout(NamedTuple):
  """`ModuleConv`'s weights as a generation reads them (`ModuleConv.decode_weights`).

  kernels: one per product (`ModuleConv._products`): per module kernel size k, in the order
    of first use, or with ONE_PRODUCT one of the largest k. [R, n·M]: the product's n outputs
    side by side, each kernel [lks, k, M, M] (a smaller one placed among zeros at the middle
    modules) as [lks·k·M, M], its rows padded with zeros to R, a multiple of PAD_ROWS.
  biases: one per product, [n·M], in the same order.
  """
  kernels: tuple
  biases: tuple


def SparseQKVAttention(d_model, n_heads=1, sparsity=None, length_kernel_size=3,
                       module_kernel_size=3, dropout=0.0, max_inference_length=2048,
                       mode='train'):
  """Returns causal self-attention with Sparse QKV projections and no output projection.

  Input and output: activations [batch, length, d_model].

  Args:
    d_model: Width of the activations.
    n_heads: Attention heads; must divide d_model.
    sparsity: S, the number of modules; must divide d_model (None: n_heads, as trax).
    length_kernel_size: Kernel extent along the length (causal; 1 means no look-back).
    module_kernel_size: Kernel extent along the modules for Q and K (odd; V uses 1).
    dropout: Dropout on the attention weights in training.
    max_inference_length: Size of the KV cache in predict mode.
    mode: 'train', 'eval' or 'predict'.
  """
  sparsity = _check_sparse_qkv_args(d_model, n_heads, sparsity, mode)
  return tl.Serial(
      MultiplicativeDense(sparsity, d_model),                # [batch, length, d_model]
      ModuleConv(d_model, sparsity, length_kernel_size,
                 (module_kernel_size, module_kernel_size, 1), mode),   # q, k, v
      CausalAttentionCore(n_heads, dropout, max_inference_length, mode),
      name=f'SparseQKVAttention_{sparsity}')


def SparseEncDecAttention(d_model, n_heads=1, sparsity=None, length_kernel_size=3,
                          dropout=0.0, mode='train'):
  """Encoder-decoder attention with a Sparse QKV query projection and no output projection.

  Inputs: decoder activations [batch, length_d, d_model], encoder activations
  [batch, length_e, d_model] (twice: keys and values) and the encoder-decoder mask. Outputs:
  [batch, length_d, d_model] and the mask. Q is the multiplicative layer and a causal
  (length_kernel_size, 3) convolution; K and V are dense projections of the encoder output,
  computed once and cached in predict mode.

  Args:
    d_model: Width of the activations.
    n_heads: Attention heads; must divide d_model.
    sparsity: S, the modules of the query projection; must divide d_model (None: n_heads).
    length_kernel_size: Kernel extent of the query convolution along the decoder length.
    dropout: Dropout on the attention weights in training.
    mode: 'train', 'eval' or 'predict'.
  """
  sparsity = _check_sparse_qkv_args(d_model, n_heads, sparsity, mode)

  def KeysOrValues():
    dense = tl.Dense(d_model)
    return tl.Cache(dense) if mode == 'predict' else dense

  return tl.Serial(                                  # dec, enc, enc, mask
      tl.Parallel([MultiplicativeDense(sparsity, d_model),
                   ModuleConv(d_model, sparsity, length_kernel_size, 3, mode)],
                  KeysOrValues(), KeysOrValues()),   # q, k, v, mask
      tl.PureAttention(n_heads=n_heads, dropout=dropout, mode=mode),   # out, mask
      name=f'SparseEncDecAttention_{sparsity}')


class ModuleConv(base.Layer):
  """2-D convolutions of one input over (length, modules), causal along the length.

  Input x [batch, length, d]; one output [batch, length, d] per entry of
  `module_kernel_size`. d is viewed as S = n_modules modules of M = d / S channels; output i
  is the convolution with a kernel [length_kernel_size, module_kernel_size[i], M, M] shared by
  the modules, plus a bias [M]. Modules are zero-padded on both sides (so module kernel sizes
  are odd), the length on the left: with zeros, or in predict mode with the previous positions,
  the state [batch, length_kernel_size − 1, S, M] that all outputs share.

  Weights: ((kernel, bias) for each output), the layout of trax's `tl.Conv`. Predict mode
  computes a call as one matrix product per output over the receptive fields (a call there is
  a prompt or one token), or one token per row as one Pallas kernel (`sparse_qkv_kernel.py`;
  off by default, `decode_kernels.py`); train and eval run the convolution. A generation on a
  GPU reads the weights laid out once for it (`decode_weights`, DECODE_LAYOUT): one product
  of all outputs (ONE_PRODUCT), or else one per module kernel size.
  """

  def __init__(self, d_model, n_modules, length_kernel_size, module_kernel_size, mode,
               n_in=1):
    sizes = (tuple(module_kernel_size) if isinstance(module_kernel_size, (tuple, list))
             else (module_kernel_size,))
    check_divides('n_modules', n_modules, 'd_model', d_model)
    if not isinstance(length_kernel_size, int) or length_kernel_size < 1:
      raise ValueError(f'length_kernel_size must be >= 1, got {length_kernel_size}')
    for size in sizes:
      if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f'module_kernel_size must be odd (padded equally on both sides), '
                         f'got {size}')
    check_mode(mode)
    super().__init__(n_in=n_in, n_out=len(sizes) + n_in - 1, name='ModuleConv')
    self._n_modules = n_modules
    self._channels = d_model // n_modules
    self._lks = length_kernel_size
    self._sizes = sizes
    self._mode = mode

  def forward(self, x):
    outputs = self._convolve(x)
    return outputs if len(outputs) > 1 else outputs[0]

  def _convolve(self, x, mask=None):
    """The outputs for x [batch, length, d] (and the packed variant's mask), as a tuple."""
    batch, length, d = x.shape
    x = x.reshape(batch, length, self._n_modules, self._channels)   # [b, l, S, M]
    n = self._lks - 1
    kernel = self._step_kernel()
    if (self._mode == 'predict' and length == 1 and mask is None and kernel
        and not isinstance(self.weights, DecodeLayout)):
      outputs, self.state = sparse_qkv_kernel.conv_step(
          x[:, 0].astype(self.state.dtype), self.state, self.weights, self._sizes,
          interpret=kernel == 'interpret')
      return tuple(out.reshape(batch, length, d) for out in outputs)
    # A laid-out token's new state is taken from its receptive fields (STATE_FROM_FIELDS).
    from_fields = (self._mode == 'predict' and STATE_FROM_FIELDS and length == 1
                   and mask is None and n > 0 and isinstance(self.weights, DecodeLayout))
    if self._mode == 'predict':
      window = jnp.concatenate([self.state, x.astype(self.state.dtype)], axis=1)
      if not from_fields:
        self.state = self._last_inputs(window, mask)
    else:
      window = jnp.pad(x, [(0, 0), (n, 0), (0, 0), (0, 0)])       # [b, n + l, S, M]
    half = max(self._sizes) // 2
    window = jnp.pad(window, [(0, 0), (0, 0), (half, half), (0, 0)])   # [b, n + l, S + 2h, M]
    if self._mode == 'predict':
      return self._products_over_fields(window, length, from_fields)
    outputs = []
    for (kernel, bias), size in zip(self.weights, self._sizes):
      start = half - size // 2
      view = window[:, :, start:start + self._n_modules + size - 1]
      y = jax.lax.conv_general_dilated(view, kernel.astype(view.dtype), (1, 1), 'VALID',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      outputs.append((y + bias).reshape(batch, length, d))
    return tuple(outputs)

  def _receptive_fields(self, view, length, rows=0):
    """view [b, n + l, S + k − 1, M] -> [b, l, S, lks·k·M]: each output position's inputs,
    in the order of a kernel [lks, k, M, M] reshaped to [lks·k·M, M]; with `rows` larger,
    zeros after them up to `rows`."""
    size = view.shape[2] - self._n_modules + 1
    parts = [view[:, i:i + length, j:j + self._n_modules]
             for i in range(self._lks) for j in range(size)]
    pad = rows - self._lks * size * self._channels
    if pad > 0:
      parts.append(jnp.zeros(view.shape[:1] + (length, self._n_modules, pad), view.dtype))
    return jnp.concatenate(parts, axis=-1)

  def _products(self, one):
    """The products of a `DecodeLayout`: [(module kernel size of its receptive fields, [the
    indices of its outputs])], one per size in order of first use, or with `one` one of the
    largest size and every output."""
    if one:
      return [(max(self._sizes), list(range(len(self._sizes))))]
    groups = {}
    for i, size in enumerate(self._sizes):
      groups.setdefault(size, []).append(i)
    return list(groups.items())

  def _products_over_fields(self, window, length, state_from_fields=False):
    """Predict mode's outputs (a tuple of [b, l, d]) from window [b, n + l, S + 2h, M]: each
    a product of receptive fields and kernels, as `self.weights` lays them out: a
    `DecodeLayout`'s products (`_products`), or trax's layout's one per output, the outputs of
    one module kernel size sharing their fields. With `state_from_fields` (a token read
    through a `DecodeLayout`) it also sets the new state, from the first fields built."""
    half = max(self._sizes) // 2
    if isinstance(self.weights, DecodeLayout):
      # The layout says which products it holds (one kernel: all outputs in one), so that
      # it reads as it was made whatever ONE_PRODUCT is when it is read.
      products, layout = self._products(len(self.weights.kernels) == 1), self.weights
    else:
      products = [(size, [i]) for i, size in enumerate(self._sizes)]
      layout = DecodeLayout(tuple(k.reshape(-1, self._channels) for k, _ in self.weights),
                            tuple(b for _, b in self.weights))
    fields = {}   # (module kernel size, rows) -> receptive fields [b, l, S, rows]
    outputs = [None] * len(self._sizes)
    for (size, indices), kernel, bias in zip(products, layout.kernels, layout.biases):
      if (size, kernel.shape[0]) not in fields:
        start = half - size // 2
        view = window[:, :, start:start + self._n_modules + size - 1]
        found = self._receptive_fields(view, length, kernel.shape[0])
        if state_from_fields and not fields:   # XLA must not see through to the window
          found = jax.lax.optimization_barrier(found)
          self.state = self._last_inputs_in_fields(found, size)
        fields[size, kernel.shape[0]] = found
      self._product(fields[size, kernel.shape[0]], kernel, bias, indices, outputs)
    return tuple(outputs)

  def _product(self, fields, kernel, bias, indices, outputs):
    """outputs[i] [b, l, d] for i in `indices`: fields [b, l, S, rows] times a laid-out
    kernel [rows, n·M] of those outputs side by side, plus their biases [n·M]."""
    batch, length = fields.shape[:2]
    y = jnp.einsum('blsf,fo->blso', fields, kernel) + bias
    for i, part in zip(indices, jnp.split(y, len(indices), axis=-1)):   # [b, l, S, M] each
      outputs[i] = part.reshape(batch, length, self._n_modules * self._channels)

  def takes_parts(self, weights):
    """Whether `from_parts` takes a token with these weights: laid out as one product
    (`decode_weights`, ONE_PRODUCT), a state to move on (length_kernel_size >= 2)."""
    return (self._mode == 'predict' and self._lks >= 2 and isinstance(weights, DecodeLayout)
            and len(weights.kernels) == 1)

  def from_parts(self, parts, bias, weights, state, interpret=False):
    """(outputs, each [B, 1, d], and the new state) of one token from the multiplicative
    layer's parts [P, B, S, M] and bias [S, M] (`MultiplicativeDense.decode_parts`), with
    weights that `takes_parts`: the receptive fields and state from one kernel
    (`sparse_qkv_fields_kernel.py`), then the product of `_products_over_fields`."""
    (kernel,), (conv_bias,) = weights.kernels, weights.biases
    fields, state = sparse_qkv_fields_kernel.fields(
        parts, bias, state, max(self._sizes), kernel.shape[0], interpret=interpret)
    outputs = [None] * len(self._sizes)
    self._product(fields[:, None], kernel, conv_bias, range(len(self._sizes)), outputs)
    return tuple(outputs), state

  def _step_kernel(self):
    """The Pallas kernel a one-token predict call runs (`sparse_qkv_kernel.py`): 'pallas' or
    'interpret'; None where XLA's ops take it."""
    kernel = decode_kernels.active('sparse_qkv')
    if kernel == 'xla' or not sparse_qkv_kernel.fits(self._channels, self._lks):
      return None
    return kernel

  def decode_weights(self, weights):
    """`weights` as a generation reads them, made once per generation outside its loop
    (`decoding.laid_out`): a `DecodeLayout` where DECODE_LAYOUT says so (by default on a
    GPU) and XLA's ops take a token; else `weights` as they are."""
    on = jax.default_backend() == 'gpu' if DECODE_LAYOUT is None else DECODE_LAYOUT
    if (not on or self._mode != 'predict' or self._step_kernel()
        or isinstance(weights, DecodeLayout)):
      return weights
    kernels, biases = [], []
    for size, indices in self._products(ONE_PRODUCT):
      kernel = jnp.concatenate([_widened(weights[i][0], size).reshape(-1, self._channels)
                                for i in indices], axis=1)
      kernels.append(jnp.pad(kernel, [(0, -kernel.shape[0] % PAD_ROWS), (0, 0)]))
      biases.append(jnp.concatenate([weights[i][1] for i in indices]))
    return DecodeLayout(tuple(kernels), tuple(biases))

  def _last_inputs_in_fields(self, fields, size):
    """The predict state after one token, [b, n, S, M], from its receptive fields
    [b, 1, S, rows] of module kernel size `size`: length taps 1..n, the middle module's
    (`_receptive_fields`' order), hold the window's last n positions unpadded."""
    m, middle = self._channels, size // 2
    taps = [fields[..., (i * size + middle) * m:(i * size + middle + 1) * m]
            for i in range(1, self._lks)]
    return jnp.concatenate(taps, axis=1)

  def _last_inputs(self, window, mask):
    """The predict state after a call: the last n positions of window [b, n + l, S, M]."""
    del mask
    return window[:, window.shape[1] - (self._lks - 1):]

  def init_weights_and_state(self, input_signature):
    x = input_signature[0] if self._n_in > 1 else input_signature
    rngs = jax.random.split(self.rng, 2 * len(self._sizes))
    glorot = init.GlorotNormalInitializer()      # tl.Conv's (HWIO: in -2, out -1)
    bias = init.RandomNormalInitializer(1e-6)
    m = self._channels
    self.weights = tuple(
        (glorot((self._lks, size, m, m), rngs[2 * i]), bias((m,), rngs[2 * i + 1]))
        for i, size in enumerate(self._sizes))
    if self._mode == 'predict':
      self.state = jnp.zeros((x.shape[0], self._lks - 1, self._n_modules, m), x.dtype)


def _widened(kernel, size):
  """kernel [lks, k, M, M] -> [lks, size, M, M]: the same convolution over `size` modules
  centred on the output's (k odd, at most size), zeros at the outer ones."""
  pad = (size - kernel.shape[1]) // 2
  return jnp.pad(kernel, [(0, 0), (pad, pad), (0, 0), (0, 0)])


class SparseQKVResidual(FusedResidual):
  """x + SparseQKVAttention(LayerNorm(x)) as `tl.Residual`; one decoded token as the three
  Pallas kernels of `sparse_qkv_block_kernel.py` (where `decode_kernels` says so), whose
  attention kernel also writes the next FF block's LayerNorm partial sums where the blocks
  are chained (`fused_residual.CHAIN`). Where those decline (17B's d_model), a token's
  receptive fields come from one kernel of their own (`sparse_qkv_fields_kernel.py`,
  on a GPU from its MIN_D_MODEL), its layers' other work XLA's."""

  PARTS = (normalization.LayerNorm, MultiplicativeDense, ModuleConv, CausalAttentionCore)

  def fused(self, x, parts, ff_norm=None, ahead=()):
    """With `ff_norm` (the next FF block's, `FusedDecoder`), also the partial sums for it;
    `ahead`: the next FF block's fixed weights, for `decode_kernels.PREFETCH`."""
    kernel = self._kernel()
    if kernel is None:
      return None if ff_norm is not None else self._from_parts(x, parts)
    norm, _, conv, core = [self.part(i) for i in range(len(self.PARTS))]
    (norm_w, _), (mixed_w, _), (conv_w, conv_state), (_, (k_cache, v_cache, index)) = parts
    batch, _, d_model = x.shape
    if len(mixed_w) == 2:
      mixed_w = (*mixed_w, jnp.zeros((d_model,), x.dtype))
    out, conv_state, k_cache, v_cache, index, *partials = sparse_qkv_block_kernel.decode_step(
        x.reshape(batch, d_model), norm_w, mixed_w, conv_w, conv_state, k_cache, v_cache,
        index, n_heads=core._n_heads, sizes=conv._sizes,  # pylint: disable=protected-access
        epsilon=norm._epsilon, interpret=kernel == 'interpret',  # pylint: disable=protected-access
        ff_norm=ff_norm, ahead=ahead)
    states = ((), (), conv_state, (k_cache, v_cache, index))
    return (out.reshape(x.shape), states) + ((partials,) if ff_norm else ())

  def _from_parts(self, x, parts):
    """Where the block's kernels decline (17B's) and `sparse_qkv_fields_kernel` takes the
    shapes: the block through its layers, the multiplicative layer's parts summed into the
    convolutions' receptive fields by that kernel (`ModuleConv.from_parts`); else None."""
    norm, mixed, conv, core = [self.part(i) for i in range(len(self.PARTS))]
    (norm_w, norm_s), (mixed_w, _), (conv_w, conv_s), (core_w, core_s) = parts
    d_model = x.shape[-1]
    kernel = decode_kernels.active('sparse_qkv_fields',
                                   sparse_qkv_fields_kernel.pays(d_model))
    if kernel == 'xla' or not conv.takes_parts(conv_w):
      return None
    normed, _ = norm.pure_fn(x, norm_w, norm_s, None)
    mixed_parts, bias = mixed.decode_parts(normed, mixed_w,
                                           sparse_qkv_fields_kernel.n_parts(d_model))
    qkv, conv_s = conv.from_parts(mixed_parts, bias, conv_w, conv_s,
                                  interpret=kernel == 'interpret')
    out, core_s = core.pure_fn(qkv, core_w, core_s, None)
    return x + out, ((), (), conv_s, core_s)

  def _kernel(self):
    """'pallas' or 'interpret' where the block's kernels take a token, but not within
    `fused_residual.late()` where the block declines late; else None."""
    if fused_residual.is_late() and self.late_position() is not None:
      return None
    return self._takes_token()

  def _takes_token(self):
    """'pallas' or 'interpret' where the block's kernels take these shapes; else None."""
    kernel = decode_kernels.active('sparse_qkv_block')
    norm, mixed, conv, core = [self.part(i) for i in range(len(self.PARTS))]
    # pylint: disable=protected-access
    if (kernel == 'xla' or not norm._center or not sparse_qkv_block_kernel.fits(
        conv._n_modules * conv._channels, mixed._n_modules, core._n_heads, conv._sizes,
        conv._lks)):
      return None
    return kernel

  def late_position(self):
    """Where the block's kernels take a token: the cache position from which they give way
    to its layers' own (`sparse_qkv_block_kernel.LATE_POSITION`, caches read in a loop);
    else None."""
    if self._takes_token() is None:
      return None
    return sparse_qkv_block_kernel.late_position(self.part(3)._max_len)  # pylint: disable=protected-access

  def decode_weights(self, weights):
    """`weights` as they are where the block's kernels take a token (they read the
    sublayers' own layout); None, each sublayer's own (`decoding.laid_out`), where not."""
    return weights if self._kernel() else None

  def ahead_arrays(self, weights):
    """What this block's first kernel reads of its `weights`, for the kernel before it to
    ask the L2 cache for (`decode_kernels.PREFETCH`): the LayerNorm's scale and bias, the
    multiplicative layer's D and E."""
    return (*self.part_weights(weights, 0), *self.part_weights(weights, 1)[:2])


def _check_sparse_qkv_args(d_model, n_heads, sparsity, mode):
  """The number of modules (default n_heads, as trax) after checking the arguments."""
  sparsity = n_heads if sparsity is None else sparsity
  check_divides('n_heads', n_heads, 'd_model', d_model)
  check_divides('sparsity', sparsity, 'd_model', d_model)
  check_mode(mode)
  return sparsity
