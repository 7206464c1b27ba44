"""Sparse layers of the Scaling Transformer, one paper idea per file."""
from sparse_scaling.layers.causal_attention import CausalAttention
from sparse_scaling.layers.causal_attention import CausalAttentionCore
from sparse_scaling.layers.conv_attention import DenseConvAttention
from sparse_scaling.layers.embedding import Embedder
from sparse_scaling.layers.feed_forward import FeedForward
from sparse_scaling.layers.fused_residual import FusedDecoder
from sparse_scaling.layers.layer_norm import LayerNorm
from sparse_scaling.layers.multiplicative_dense import MultiplicativeDense
from sparse_scaling.layers.sparse_ff import SparseFF
from sparse_scaling.layers.sparse_ff import SparseFFResidual
from sparse_scaling.layers.sparse_loss import SparseLoss
from sparse_scaling.layers.sparse_qkv import ModuleConv
from sparse_scaling.layers.sparse_qkv import SparseEncDecAttention
from sparse_scaling.layers.sparse_qkv import SparseQKVAttention
from sparse_scaling.layers.sparse_qkv import SparseQKVResidual
