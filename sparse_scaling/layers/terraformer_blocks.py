"""Reversible Terraformer blocks: attention and feed-forward (with an SRU beside it).

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §4. Blocks are RevNet-style
half-residuals on two streams (Reformer): [x1, x2, mask] -> [x1 + f(x2), x2, mask], then a
swap, so the inputs of a block can be recomputed from its outputs and training stores no
activations per layer (trax's `ReversibleHalfResidual`, `ReversibleSwap`, and its
memory-efficient trainer). The mask [batch, length] (1 on real positions) rides along as the
third stream for the layers that mix positions.

  encoder block:  attention (bidirectional, masked), FF
  decoder block:  `n_attention_layers` causal attentions over [encoder; decoder], FF

Attention types ('dense', 'chunked', 'lsh'; a decoder also takes Sparse QKV through
`attention_sparsity`) and the FF with Sparse FF and SRU knobs follow trax's
`ConfigurableTerraformer` layer by layer, so that weights convert one to one.
"""

from trax import layers as tl
from trax.layers.research import efficient_attention

from sparse_scaling.layers import components
from sparse_scaling.layers.concat_decoder import PackedDenseAttention
from sparse_scaling.layers.concat_decoder import PackedSparseQKVAttention
from sparse_scaling.layers.feed_forward import FeedForward
from sparse_scaling.layers.layer_norm import LayerNorm
from sparse_scaling.layers.sru import SRUSideBranch

ATTENTION_TYPES = ('dense', 'chunked', 'lsh')
CHUNK_LEN = 128     # Chunked and LSH attention (the paper's arXiv model).
N_BUCKETS = 128
N_HASHES = 2
SRU_UNITS = 32     # The paper's SRU width; an int `ff_use_sru` counts layers (as trax).


def EncoderBlock(d_model, d_ff, n_heads, attention_type='dense', dropout=0.0, ff_sparsity=0,
                 ff_use_sru=0, mode='train'):
  """A reversible encoder block: [x1, x2, mask] -> [x1', x2', mask].

  Args:
    d_model: Width of each stream.
    d_ff: Hidden units of the FF.
    n_heads: Attention heads.
    attention_type: 'dense', 'chunked' or 'lsh' (bidirectional, padding masked).
    dropout: Dropout rate of attention and FF.
    ff_sparsity: Sparse FF: 0 (dense), N, or (N, d_lowrank).
    ff_use_sru: SRU beside the FF: 0, n_layers (of SRU_UNITS), or (n_layers, units).
    mode: 'train' or 'eval' (an encoder runs in eval mode when the model predicts).
  """
  if attention_type == 'dense':
    attention = components.SelfAttention(            # x, mask [batch, length]
        tl.Parallel([], tl.Fn('AttentionMask', lambda m: m[:, None, None, :] != 0)),
        tl.Attention(d_model, n_heads=n_heads, dropout=dropout, mode=mode),
        tl.Select([0], n_in=2), name='SelfAttention')
  else:
    attention = _EfficientAttention(attention_type, d_model, n_heads, dropout, False, mode)
  return [_AttentionHalfResidual(attention, 'Encoder'),
          _FeedForwardHalfResidual(d_model, d_ff, dropout, ff_sparsity, ff_use_sru, mode,
                                   'Encoder')]


def DecoderBlock(d_model, d_ff, n_heads, attention_type='dense', attention_sparsity=0,
                 length_kernel_size=3, n_attention_layers=2, dropout=0.0, ff_sparsity=0,
                 ff_use_sru=0, max_len=2048, mode='train'):
  """A reversible decoder block over [encoder; decoder]: [x1, x2, mask] -> [x1', x2', mask].

  Args:
    d_model: Width of each stream.
    d_ff: Hidden units of the FF.
    n_heads: Attention heads.
    attention_type: 'dense', 'chunked' or 'lsh' (causal); ignored with attention_sparsity.
    attention_sparsity: Sparse QKV modules S (0: attention_type).
    length_kernel_size: Length extent of the Sparse QKV convolutions.
    n_attention_layers: Attention half-residuals before the FF (the paper: 2).
    dropout: Dropout rate of attention and FF.
    ff_sparsity: Sparse FF: 0 (dense), N, or (N, d_lowrank).
    ff_use_sru: SRU beside the FF: 0, n_layers (of SRU_UNITS), or (n_layers, units).
    max_len: Size of the decoding caches (encoder plus decoder length).
    mode: 'train', 'eval' or 'predict'.
  """
  def Attention():
    if attention_sparsity:
      return PackedSparseQKVAttention(d_model, n_heads, attention_sparsity, length_kernel_size,
                                      dropout=dropout, max_inference_length=max_len,
                                      mode=mode)
    if attention_type == 'dense':
      return PackedDenseAttention(d_model, n_heads, dropout, max_len, mode)
    if mode == 'predict':
      raise ValueError(f'decoder attention_type={attention_type!r} cannot decode: use '
                       "'dense' or attention_sparsity in predict mode")
    return _EfficientAttention(attention_type, d_model, n_heads, dropout, True, mode)

  return ([_AttentionHalfResidual(Attention(), 'Decoder') for _ in range(n_attention_layers)]
          + [_FeedForwardHalfResidual(d_model, d_ff, dropout, ff_sparsity, ff_use_sru, mode,
                                      'Decoder')])


def _AttentionHalfResidual(attention, part):
  """x1 += attention(LayerNorm(x2), mask); swap.

  The name tells encoder and decoder apart: trax's memory-efficient trainer caches compiled
  layers by their repr, and trax's LSH layer's repr does not show whether it is causal.
  """
  return [tl.ReversibleHalfResidual(LayerNorm(), attention_layer=attention,
                                    name=f'{part}AttentionHalfResidual'),
          tl.ReversibleSwap()]


def _FeedForwardHalfResidual(d_model, d_ff, dropout, ff_sparsity, ff_use_sru, mode, part):
  """x1 += FF(LayerNorm(x2)) [+ SRU branch(x2, mask)]; swap."""
  ff = [LayerNorm(), FeedForward(d_model, d_ff, dropout, ff_sparsity, mode)]
  if ff_use_sru:
    n_layers, units = (ff_use_sru if isinstance(ff_use_sru, (tuple, list))
                       else (ff_use_sru, SRU_UNITS))
    ff = [tl.Branch(ff, SRUSideBranch(d_model, units, n_layers, mode)), tl.Add()]
  return [tl.ReversibleHalfResidual(*ff, name=f'{part}FeedForwardHalfResidual'),
          tl.ReversibleSwap()]


def _EfficientAttention(attention_type, d_model, n_heads, dropout, causal, mode):
  """trax's memory-efficient chunked or LSH self-attention over (x, mask)."""
  common = dict(n_heads=n_heads, d_qk=d_model // n_heads, d_v=d_model // n_heads,
                causal=causal, masked=True, chunk_len=CHUNK_LEN, n_chunks_before=1,
                attention_dropout=dropout, output_dropout=dropout, mode=mode)
  if attention_type == 'chunked':
    return efficient_attention.SelfAttention(**common)
  if attention_type == 'lsh':
    return efficient_attention.LSHSelfAttention(n_buckets=N_BUCKETS, n_hashes=N_HASHES,
                                                **common)
  raise ValueError(f'attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}')
