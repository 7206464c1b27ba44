"""What a piece of a model is, as a class: the encoder, an attention, a dense FF, an SRU branch.

Each class is a `tl.Serial` that adds no computation: the models and blocks build these
pieces as instances of them (`SelfAttention(tl.LayerNorm(), attention, tl.Dropout(...))`), so
that code reading a model (`models/params.py` counts weights by component) finds a piece by
`isinstance` and never by its name, which stays free to change. A layer that is a component by
itself (`SparseFFController`, trax's `LayerNorm`, ...) is known by its own class there.
"""

from trax import layers as tl


class Encoder(tl.Serial):
  """The encoder of an encoder-decoder model: its weights are the model's encoder part."""


class SelfAttention(tl.Serial):
  """Attention of a sequence over itself, with what wraps it in a block (norm, dropout)."""


class EncDecAttention(tl.Serial):
  """The decoder's attention over the encoder's output, with its norm and dropout."""


class DenseFF(tl.Serial):
  """A dense feed-forward layer (Sparse FF's are its own classes, `sparse_ff.py`)."""


class SRUBranch(tl.Serial):
  """The SRU branch beside a Terraformer FF (`sru.py`)."""
