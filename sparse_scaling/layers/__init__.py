"""Sparse layers of the Scaling Transformer, one paper idea per file."""
from sparse_scaling.layers.sparse_ff import SparseFF
