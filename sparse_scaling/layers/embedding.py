"""The input layer of every model: token embedding, dropout and learned positions.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*: the Scaling Transformer (§3) and
the Terraformer (§4) embed tokens as the Transformer does. Input: token ids [batch, length];
output: [batch, length, d_model]. trax's layers, with a check that the sequence fits the
positional table (`max_len`).
"""

from trax import layers as tl


def Embedder(vocab_size, d_model, max_len, dropout, mode, embedding=None):
  """Token embedding, dropout and learned positions: ids [b, l] -> [b, l, d_model].

  `embedding` is a `tl.Embedding` to share (e.g. between encoder and decoder); None makes one.
  """

  def check_length(tokens):
    if tokens.shape[1] > max_len:
      raise ValueError(f'sequence length {tokens.shape[1]} is longer than max_len ({max_len})')
    return tokens

  return tl.Serial(tl.Fn('CheckLength', check_length),
                   embedding or tl.Embedding(vocab_size, d_model),
                   tl.Dropout(rate=dropout, mode=mode),
                   tl.PositionalEncoding(max_len=max_len, dropout=dropout, mode=mode),
                   name='Embedder')
