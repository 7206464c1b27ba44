"""Terraformer: a reversible, sparse encoder-decoder for long documents.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §4: the Scaling Transformer's
sparse layers plus

  reversible blocks       activations are recomputed, not stored    layers/terraformer_blocks.py
  LSH / chunked attention for long inputs (trax's layers)           layers/terraformer_blocks.py
  SRU beside each FF      recurrence, `ff_use_sru=(n_layers, units)` layers/sru.py
  no cross-attention      the decoder reads [encoder; decoder]      layers/concat_decoder.py

  tok_e ─ Embedder ─ encoder blocks ─┐
                                     ├─ pack at true length ─ decoder blocks ─ strip ─ output
  tok_d ─ ShiftRight ─ Embedder ─────┘

Decoder blocks have `n_decoder_attention_layers` (2) causal attentions per FF. The layer order
is that of trax's `ConfigurableTerraformer`, so its weights convert one to one
(`convert.load_trax_weights`). In predict mode the encoder runs once and is cached; the
decoder keeps KV, convolution and SRU caches over the packed sequence.
"""

import jax.numpy as jnp
from trax import layers as tl

from sparse_scaling.layers import Embedder
from sparse_scaling.layers import LayerNorm
from sparse_scaling.layers import SparseLoss
from sparse_scaling.layers import components
from sparse_scaling.layers import concat_decoder
from sparse_scaling.layers import terraformer_blocks
from sparse_scaling.layers.checks import check_chunks
from sparse_scaling.layers.checks import check_divides
from sparse_scaling.layers.checks import check_mode

# The paper's Terraformer on C4 (trax's terraformer_c4_medium.gin, docs/paper.md §6): the 800M
# model's shape (24 + 24 layers, d_model 1024, 16 heads) with d_ff 6144.
D_MODEL = 1024
D_FF = 6144
N_HEADS = 16
N_LAYERS = 24
VOCAB_SIZE = 32000
MAX_LEN = 2048
DROPOUT = 0.1


def Terraformer(input_vocab_size=VOCAB_SIZE, output_vocab_size=None, d_model=D_MODEL,
                d_ff=D_FF, n_encoder_layers=N_LAYERS, n_decoder_layers=N_LAYERS,
                n_heads=N_HEADS, max_len=MAX_LEN, dropout=DROPOUT,
                encoder_attention_type='dense', decoder_attention_type='dense',
                n_decoder_attention_layers=2, ff_sparsity=0, attention_sparsity=0,
                length_kernel_size=3, loss_sparsity=0, ff_use_sru=0, reversible_encoder=True,
                mode='train'):
  """Returns a Terraformer encoder-decoder.

  Inputs: encoder token ids [batch, length_e] (0 is padding) and decoder token ids [batch,
  length_d] (shifted right inside). Outputs: logits [batch, length_d, vocab] and the decoder
  ids.

  Args:
    input_vocab_size: Vocabulary of the encoder (and of the decoder unless given).
    output_vocab_size: Vocabulary of the decoder; None shares the encoder's embedding.
    d_model: Width of each of the two reversible streams.
    d_ff: Hidden units of every FF.
    n_encoder_layers: Encoder blocks.
    n_decoder_layers: Decoder blocks.
    n_heads: Attention heads; must divide d_model.
    max_len: Longest encoder plus decoder sequence (positions and decoding caches).
    dropout: Dropout rate of embeddings, attention and FF.
    encoder_attention_type: 'dense', 'chunked' or 'lsh' (bidirectional; the last two read
      chunks of 128 positions, so the encoder's length must be a multiple of 128).
    decoder_attention_type: 'dense', 'chunked' or 'lsh' (causal; the last two: the encoder's
      and the decoder's lengths together a multiple of 128); only 'dense' decodes.
    n_decoder_attention_layers: Attention layers per decoder block.
    ff_sparsity: Sparse FF everywhere: 0, N, or (N, d_lowrank).
    attention_sparsity: Sparse QKV modules of decoder attention (0: decoder_attention_type).
    length_kernel_size: Length extent of the Sparse QKV convolutions.
    loss_sparsity: Multiplicative output layer modules (0: dense).
    ff_use_sru: SRU beside every FF: 0, n_layers (of 32 units), or (n_layers, units); the
      paper uses (1, 32).
    reversible_encoder: Whether the encoder's two streams go to the decoder as they are
      (True, the paper's) or averaged, projected and normalized first.
    mode: 'train', 'eval' or 'predict'.
  """
  check_mode(mode)
  check_divides('n_heads', n_heads, 'd_model', d_model)
  for name, value in (('encoder_attention_type', encoder_attention_type),
                      ('decoder_attention_type', decoder_attention_type)):
    if value not in terraformer_blocks.ATTENTION_TYPES:
      raise ValueError(f'{name} must be one of {terraformer_blocks.ATTENTION_TYPES}, got '
                       f'{value!r}')
  if attention_sparsity:
    check_divides('attention_sparsity', attention_sparsity, 'd_model', d_model)
  encoder_mode = 'eval' if mode == 'predict' else mode   # the encoder sees whole inputs
  # Chunked and LSH attention read whole chunks: of the encoder's inputs, and of the decoder's
  # [encoder; decoder] where its attention is one of them.
  chunked = lambda attention_type: (None if attention_type == 'dense' else
                                    terraformer_blocks.CHUNK_LEN)
  decoder_chunks = None if attention_sparsity else chunked(decoder_attention_type)

  def padding_mask(tokens):
    check_chunks('inputs', "the encoder's length", tokens.shape[1],
                 chunked(encoder_attention_type))
    return jnp.asarray(tokens != 0, jnp.float32)

  embedding = tl.Embedding(input_vocab_size, d_model)
  output_embedding = embedding if output_vocab_size is None else tl.Embedding(
      output_vocab_size, d_model)
  output_vocab_size = output_vocab_size or input_vocab_size

  encoder_embedder = Embedder(input_vocab_size, d_model, max_len, dropout, encoder_mode,
                              embedding)
  encoder = [
      tl.ReversibleSelect([0, 0]),                             # vec_e vec_e mask_e
      tl.ReversibleSerial([terraformer_blocks.EncoderBlock(
          d_model, d_ff, n_heads, encoder_attention_type, dropout, ff_sparsity, ff_use_sru,
          encoder_mode) for _ in range(n_encoder_layers)])]    # vec_e1 vec_e2 mask_e
  if reversible_encoder:
    pack = [tl.Select([0, 2, 3, 1, 2, 3, 2]),       # e1 mask_e vec_d e2 mask_e vec_d mask_e
            concat_decoder.ConcatEncoderDecoder(mode, decoder_chunks),  # ed1 mask_ed e2 ...
            tl.Parallel([], [], concat_decoder.ConcatEncoderDecoder(mode, decoder_chunks)),
            tl.Select([0, 2, 1, 4]),                # ed1 ed2 mask_ed mask_e
           ]
  else:
    encoder += [_Average(), tl.Dense(d_model), LayerNorm()]  # vec_e mask_e
    pack = [tl.Select([0, 1, 2, 1]),                            # vec_e mask_e vec_d mask_e
            concat_decoder.ConcatEncoderDecoder(mode, decoder_chunks),  # ed mask_ed mask_e
            tl.Select([0, 0, 1, 2])]                            # ed ed mask_ed mask_e
  encoder = components.Encoder(encoder, name='Encoder')
  if mode == 'predict':
    encoder_embedder, encoder = tl.Cache(encoder_embedder), tl.Cache(encoder)

  decoder = tl.ReversibleSerial([terraformer_blocks.DecoderBlock(
      d_model, d_ff, n_heads, decoder_attention_type, attention_sparsity, length_kernel_size,
      n_decoder_attention_layers, dropout, ff_sparsity, ff_use_sru, max_len, mode)
                                 for _ in range(n_decoder_layers)])
  return tl.Serial(                                          # tok_e tok_d
      tl.Select([0, 0, 1, 1]),                               # tok_e tok_e tok_d tok_d
      tl.Parallel(encoder_embedder,
                  tl.Fn('PaddingMask', padding_mask),
                  [tl.ShiftRight(mode=mode),
                   Embedder(output_vocab_size, d_model, max_len, dropout, mode,
                            output_embedding)]),             # vec_e mask_e vec_d tok_d
      encoder,                                               # (e1 e2 | e) mask_e vec_d tok_d
      pack,                                                  # ed1 ed2 mask_ed mask_e tok_d
      decoder,
      _Average(),                                            # ed mask_ed mask_e tok_d
      LayerNorm(),
      tl.Select([0, 2], n_in=3),                             # ed mask_e tok_d
      concat_decoder.StripEncoder(mode),                     # vec_d tok_d
      SparseLoss(output_vocab_size, loss_sparsity),          # logits tok_d
      name='Terraformer')


def _Average():
  """The mean of the two reversible streams."""
  return tl.Fn('Average', lambda x1, x2: (x1 + x2) / 2.0)
