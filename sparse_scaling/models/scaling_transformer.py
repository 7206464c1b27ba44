"""Scaling Transformer: a Transformer whose big layers are sparse.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §3. The models read like the
paper's figures: token embedding and positions, pre-LayerNorm residual blocks of (attention,
feed-forward), a final LayerNorm and the vocabulary projection. Each big layer has a sparsity
knob; every knob at 0 gives the dense baseline:

  ff_sparsity         Sparse FF, one active unit per block of N     §3.1  layers/sparse_ff.py
  attention_sparsity  Sparse QKV, S modules + causal convolution    §3.2  layers/sparse_qkv.py
  loss_sparsity       multiplicative vocabulary projection          §3.3  layers/sparse_loss.py

`attention_conv` is no paper idea but the control of Sparse QKV's sparsity
(layers/conv_attention.py): Sparse QKV with a dense projection instead of the multiplicative one.

The encoder-decoder keeps dense self-attention in the encoder; the decoder's self-attention
takes `attention_sparsity`, and its encoder-decoder attention `enc_dec_attention_sparsity`
(a Sparse QKV query and no output projection), as in trax's `ConfigurableTransformer`.
"""

from trax import layers as tl

from sparse_scaling.layers import CausalAttention
from sparse_scaling.layers import DenseConvAttention
from sparse_scaling.layers import Embedder
from sparse_scaling.layers import SparseEncDecAttention
from sparse_scaling.layers import FeedForward
from sparse_scaling.layers import FusedDecoder
from sparse_scaling.layers import LayerNorm
from sparse_scaling.layers import SparseFFResidual
from sparse_scaling.layers import SparseLoss
from sparse_scaling.layers import SparseQKVAttention
from sparse_scaling.layers import SparseQKVResidual
from sparse_scaling.layers import components
from sparse_scaling.layers.checks import check_divides
from sparse_scaling.layers.checks import check_mode

# The 800M model of the paper (T5-large-like; Table 1 and docs/paper.md §6).
D_MODEL = 1024
D_FF = 4096
N_HEADS = 16
N_LAYERS = 24
VOCAB_SIZE = 32000
MAX_LEN = 2048
DROPOUT = 0.1


def ScalingTransformerLM(vocab_size=VOCAB_SIZE, d_model=D_MODEL, d_ff=D_FF,
                         n_layers=N_LAYERS, n_heads=N_HEADS, max_len=MAX_LEN,
                         dropout=DROPOUT, ff_sparsity=0, attention_sparsity=0,
                         loss_sparsity=0, length_kernel_size=3, attention_conv=0,
                         mode='train'):
  """Returns a decoder-only Scaling Transformer language model.

  Input: token ids [batch, length] (shifted right inside). Output: logits
  [batch, length, vocab_size].

  Args:
    vocab_size: Size of the token vocabulary.
    d_model: Width of the residual stream.
    d_ff: Hidden units of each feed-forward layer.
    n_layers: Number of decoder blocks.
    n_heads: Attention heads; must divide d_model.
    max_len: Longest sequence: positional encoding and the decoding caches. Decoding attends
      over the whole KV cache (as trax does), so its cost grows with max_len.
    dropout: Dropout rate after embeddings, on attention weights and residual branches.
    ff_sparsity: 0 for a dense FF; N for Sparse FF with blocks of N (controller rank
      d_model // N, the paper's rule); or a pair (N, d_lowrank).
    attention_sparsity: 0 for dense attention; S for Sparse QKV with S modules.
    loss_sparsity: 0 for a dense output layer; S for a multiplicative one with S modules.
    length_kernel_size: Length extent of the Sparse QKV convolutions.
    attention_conv: 0, or S: Sparse QKV's convolution over S modules after a dense projection
      (the control, layers/conv_attention.py); only with attention_sparsity 0.
    mode: 'train', 'eval' or 'predict' (fast decoding with caches).
  """
  _check_model_args(d_model, n_heads, attention_sparsity, mode)
  if attention_conv:
    if attention_sparsity:
      raise ValueError(f'attention_conv={attention_conv} replaces Sparse QKV by its dense '
                       f'control; it takes attention_sparsity=0, got {attention_sparsity}')
    check_divides('attention_conv', attention_conv, 'd_model', d_model)
  top = FusedDecoder if mode == 'predict' else tl.Serial    # the same layer, blocks chained
  return top(                                                # toks [batch, length]
      tl.ShiftRight(mode=mode),
      Embedder(vocab_size, d_model, max_len, dropout, mode),  # [batch, length, d_model]
      [[_SelfAttention(d_model, n_heads, max_len, dropout, attention_sparsity,
                       length_kernel_size, mode, attention_conv),
        _FeedForwardBlock(d_model, d_ff, dropout, ff_sparsity, mode)]
       for _ in range(n_layers)],
      LayerNorm(),
      SparseLoss(vocab_size, loss_sparsity),                 # [batch, length, vocab_size]
      name='ScalingTransformerLM')


def ScalingTransformer(input_vocab_size=VOCAB_SIZE, output_vocab_size=None,
                       d_model=D_MODEL, d_ff=D_FF, n_encoder_layers=N_LAYERS,
                       n_decoder_layers=N_LAYERS, n_heads=N_HEADS, max_len=MAX_LEN,
                       dropout=DROPOUT, ff_sparsity=0, attention_sparsity=0,
                       enc_dec_attention_sparsity=0, loss_sparsity=0, length_kernel_size=3,
                       encoder_d_ff=None, mode='train'):
  """Returns an encoder-decoder Scaling Transformer (T5-large-like in the paper).

  Inputs: encoder token ids [batch, length_e] and decoder token ids [batch, length_d]
  (shifted right inside); 0 is padding. Output: logits [batch, length_d, vocab_size].

  Args:
    input_vocab_size: Vocabulary of the encoder (and of the decoder unless given).
    output_vocab_size: Vocabulary of the decoder; None shares the encoder's embedding (as
      trax's `ConfigurableTransformer` and T5 do).
    d_model: Width of the residual stream.
    d_ff: Hidden units of each decoder feed-forward layer.
    n_encoder_layers: Encoder blocks.
    n_decoder_layers: Decoder blocks.
    n_heads: Attention heads; must divide d_model.
    max_len: Longest sequence: positional encodings and the decoding caches.
    dropout: Dropout rate after embeddings, on attention weights and residual branches.
    ff_sparsity: Sparse FF in encoder and decoder; see `ScalingTransformerLM`.
    attention_sparsity: Sparse QKV modules of the decoder's self-attention (0: dense).
    enc_dec_attention_sparsity: Modules of the encoder-decoder attention's query (0: dense).
    loss_sparsity: Multiplicative output layer modules (0: dense).
    length_kernel_size: Length extent of the Sparse QKV convolutions.
    encoder_d_ff: Hidden units of the encoder's FF; None means d_ff. The paper raises d_ff
      to pay for Sparse QKV's saved weights, which only the decoder has.
    mode: 'train', 'eval' or 'predict' (the encoder then runs once and is cached).
  """
  _check_model_args(d_model, n_heads, attention_sparsity, mode)
  if enc_dec_attention_sparsity:
    check_divides('enc_dec_attention_sparsity', enc_dec_attention_sparsity, 'd_model', d_model)
  embedding = tl.Embedding(input_vocab_size, d_model)
  output_embedding = embedding if output_vocab_size is None else tl.Embedding(
      output_vocab_size, d_model)
  output_vocab_size = output_vocab_size or input_vocab_size
  encoder_mode = 'eval' if mode == 'predict' else mode   # the encoder sees whole inputs
  encoder = components.Encoder(
      Embedder(input_vocab_size, d_model, max_len, dropout, encoder_mode, embedding),
      [[_MaskedSelfAttention(d_model, n_heads, dropout, encoder_mode),
        _FeedForwardBlock(d_model, encoder_d_ff or d_ff, dropout, ff_sparsity,
                          encoder_mode)]
       for _ in range(n_encoder_layers)],
      LayerNorm(),
      name='Encoder')
  if mode == 'predict':
    encoder = tl.Cache(encoder)
  return tl.Serial(
      tl.Select([0, 1, 1]),                              # tok_e tok_d tok_d
      tl.Branch([], tl.PaddingMask()),                   # tok_e mask_e tok_d tok_d
      encoder,                                           # vec_e mask_e tok_d tok_d
      tl.Select([2, 1, 0]),                              # tok_d mask_e vec_e tok_d
      tl.ShiftRight(mode=mode),
      Embedder(output_vocab_size, d_model, max_len, dropout, mode,
               output_embedding),                        # vec_d mask_e vec_e tok_d
      tl.Branch([], tl.EncoderDecoderMask()),            # vec_d mask_ed vec_e tok_d
      [[_SelfAttention(d_model, n_heads, max_len, dropout, attention_sparsity,
                       length_kernel_size, mode),
        _EncDecAttention(d_model, n_heads, dropout, enc_dec_attention_sparsity,
                         length_kernel_size, mode),
        _FeedForwardBlock(d_model, d_ff, dropout, ff_sparsity, mode)]
       for _ in range(n_decoder_layers)],
      LayerNorm(),
      tl.Select([0], n_in=3),                            # vec_d tok_d
      SparseLoss(output_vocab_size, loss_sparsity),      # logits tok_d
      name='ScalingTransformer')


def _SelfAttention(d_model, n_heads, max_len, dropout, attention_sparsity, length_kernel_size,
                   mode, attention_conv=0):
  """Pre-LayerNorm residual causal self-attention: dense, Sparse QKV with S modules, or its
  dense control with `attention_conv` modules."""
  if attention_conv:
    attention = DenseConvAttention(d_model, n_heads, attention_conv, length_kernel_size,
                                   dropout=dropout, max_inference_length=max_len, mode=mode)
  elif attention_sparsity:
    attention = SparseQKVAttention(d_model, n_heads, attention_sparsity, length_kernel_size,
                                   dropout=dropout, max_inference_length=max_len, mode=mode)
  else:
    attention = CausalAttention(d_model, n_heads, dropout=dropout,
                                max_inference_length=max_len, mode=mode)
  residual = (SparseQKVResidual if attention_sparsity and not attention_conv and
              mode == 'predict' else tl.Residual)    # the same layer, decoding fused
  return residual(components.SelfAttention(
      LayerNorm(), attention, tl.Dropout(rate=dropout, mode=mode), name='SelfAttention'))


def _MaskedSelfAttention(d_model, n_heads, dropout, mode):
  """Pre-LayerNorm residual bidirectional attention over (x, mask) -> (x, mask)."""
  attention = tl.Attention(d_model, n_heads=n_heads, dropout=dropout, mode=mode)
  return tl.Residual(components.SelfAttention(
      LayerNorm(), attention, tl.Dropout(rate=dropout, mode=mode), name='SelfAttention'))


def _EncDecAttention(d_model, n_heads, dropout, sparsity, length_kernel_size, mode):
  """Pre-LayerNorm residual attention of (vec_d, mask, vec_e) over the encoder output."""
  if sparsity:
    attention = SparseEncDecAttention(d_model, n_heads, sparsity, length_kernel_size,
                                      dropout=dropout, mode=mode)
  else:
    attention = tl.AttentionQKV(d_model, n_heads=n_heads, dropout=dropout, mode=mode,
                                cache_KV_in_predict=True)
  return tl.Residual(components.EncDecAttention(
      LayerNorm(),
      tl.Select([0, 2, 2, 1, 2]),                  # vec_d vec_e vec_e mask vec_e
      attention,                                   # vec_d mask vec_e
      tl.Dropout(rate=dropout, mode=mode),
      name='EncDecAttention'))


def _FeedForwardBlock(d_model, d_ff, dropout, ff_sparsity, mode):
  """Pre-LayerNorm residual feed-forward."""
  residual = SparseFFResidual if ff_sparsity and mode == 'predict' else tl.Residual
  return residual(LayerNorm(), FeedForward(d_model, d_ff, dropout, ff_sparsity, mode))


def _check_model_args(d_model, n_heads, attention_sparsity, mode):
  check_mode(mode)
  check_divides('n_heads', n_heads, 'd_model', d_model)
  if attention_sparsity:
    check_divides('attention_sparsity', attention_sparsity, 'd_model', d_model)
