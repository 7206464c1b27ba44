"""sparse_scaling: *Sparse is Enough in Scaling Transformers* (Jaszczur et al., 2021) in Trax.

Importing the package applies the compatibility shims that trax 1.4.1 needs on the pinned JAX
(`sparse_scaling.compat`).
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # quiet TensorFlow (data only) at import

from sparse_scaling import compat as _compat  # pylint: disable=g-import-not-at-top

_compat.apply()
