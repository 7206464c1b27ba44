"""sparse_scaling: *Sparse is Enough in Scaling Transformers* (Jaszczur et al., 2021) in Trax.

Importing the package applies the compatibility shims that trax 1.4.1 needs on the pinned JAX
(`sparse_scaling.compat`).
"""
from sparse_scaling import compat as _compat

_compat.apply()
