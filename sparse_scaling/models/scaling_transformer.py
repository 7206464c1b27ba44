"""Scaling Transformer: a Transformer whose big layers are sparse.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §3. The decoder-only LM reads
like the paper's figure: token embedding and positions, then pre-LayerNorm residual blocks of
(causal attention, feed-forward), a final LayerNorm and the vocabulary projection. Each big
layer has a sparsity knob; every knob at 0 gives the dense baseline:

  ff_sparsity  -> Sparse FF, one active unit per block of N (§3.1, `layers/sparse_ff.py`)

Input: token ids [batch, length]. Output: log-probability logits [batch, length, vocab_size].
"""

from trax import layers as tl

from sparse_scaling.layers import SparseFF

# The 800M model of the paper (T5-large-like, Table 1), per layer stack.
D_MODEL = 1024
D_FF = 4096
N_HEADS = 16
N_LAYERS = 24
VOCAB_SIZE = 32000
MAX_LEN = 2048
DROPOUT = 0.1


def ScalingTransformerLM(vocab_size=VOCAB_SIZE, d_model=D_MODEL, d_ff=D_FF,
                         n_layers=N_LAYERS, n_heads=N_HEADS, max_len=MAX_LEN,
                         dropout=DROPOUT, ff_sparsity=0, mode='train'):
  """Returns a decoder-only Scaling Transformer language model.

  Input: token ids [batch, length] (shifted right inside). Output: logits
  [batch, length, vocab_size].

  Args:
    vocab_size: Size of the token vocabulary.
    d_model: Width of the residual stream.
    d_ff: Hidden units of each feed-forward layer.
    n_layers: Number of decoder blocks.
    n_heads: Attention heads; must divide d_model.
    max_len: Longest sequence the positional encoding (and decoding) supports.
    dropout: Dropout rate after embeddings and on every residual branch.
    ff_sparsity: 0 for a dense FF; N for Sparse FF with blocks of N (controller rank
      d_model // N, the paper's rule); or a pair (N, d_lowrank).
    mode: 'train', 'eval' or 'predict' (fast decoding with caches).
  """
  _check_divides('n_heads', n_heads, 'd_model', d_model)

  def Dropout():
    return tl.Dropout(rate=dropout, mode=mode)

  def Block():
    return [
        tl.Residual(tl.LayerNorm(),
                    tl.CausalAttention(d_model, n_heads=n_heads, dropout=dropout, mode=mode),
                    Dropout()),
        tl.Residual(tl.LayerNorm(),
                    FeedForward(d_model, d_ff, dropout, ff_sparsity, mode)),
    ]

  return tl.Serial(                                            # toks [batch, length]
      tl.ShiftRight(mode=mode),
      tl.Embedding(vocab_size, d_model),                       # vecs [batch, length, d_model]
      Dropout(),
      tl.PositionalEncoding(max_len=max_len, dropout=dropout, mode=mode),
      [Block() for _ in range(n_layers)],
      tl.LayerNorm(),
      tl.Dense(vocab_size),                                    # logits [.., vocab_size]
      name='ScalingTransformerLM')


def FeedForward(d_model, d_ff, dropout, ff_sparsity, mode):
  """The FF branch of a block: dense (trax's layout) or Sparse FF, then dropout.

  Args:
    d_model: Width of input and output.
    d_ff: Hidden units.
    dropout: Dropout rate on the hidden activations (dense) and the output.
    ff_sparsity: 0, N, or (N, d_lowrank); see `ScalingTransformerLM`.
    mode: 'train', 'eval' or 'predict'.
  """
  if not ff_sparsity:
    return [tl.Dense(d_ff), tl.Dropout(rate=dropout, shared_axes=[-2], mode=mode), tl.Relu(),
            tl.Dense(d_model), tl.Dropout(rate=dropout, mode=mode)]
  n, d_lowrank = ff_sparsity if isinstance(ff_sparsity, (tuple, list)) else (ff_sparsity, None)
  return SparseFF(d_ff, n, d_lowrank=d_lowrank, dropout_rate=dropout, mode=mode)


def _check_divides(small_name, small, big_name, big):
  if small < 1 or big % small:
    raise ValueError(f'{small_name} ({small}) must divide {big_name} ({big})')
