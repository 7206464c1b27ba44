"""Sparse loss layer: the vocabulary projection as a multiplicative layer.

Jaszczur et al., *Sparse is Enough in Scaling Transformers*, §3.3 "Sparse Loss Layer". The
final d_model → vocab_size projection, the largest single matrix of a small model, is
replaced by a multiplicative layer (`multiplicative_dense.py`) with S = loss_sparsity modules
of vocab_size / S outputs each: d_model·(S + vocab_size / S) weights, read once per decoded
token, instead of d_model·vocab_size. The paper's models use S = 4.
"""

from trax import layers as tl

from sparse_scaling.layers.checks import check_divides
from sparse_scaling.layers.multiplicative_dense import MultiplicativeDense


def SparseLoss(vocab_size, loss_sparsity=0):
  """Returns the output projection [..., d_model] -> logits [..., vocab_size].

  Args:
    vocab_size: Number of output classes.
    loss_sparsity: S modules of the multiplicative layer (must divide vocab_size); 0 gives
      the dense projection.
  """
  if not loss_sparsity:
    return tl.Dense(vocab_size)
  check_divides('loss_sparsity', loss_sparsity, 'vocab_size', vocab_size)
  return MultiplicativeDense(loss_sparsity, vocab_size)
