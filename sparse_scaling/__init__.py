"""sparse_scaling: *Sparse is Enough in Scaling Transformers* (Jaszczur et al., 2021) in Trax.

Importing the package checks the Python and JAX versions against the tested range, imports
trax with TensorFlow's and gym's import notices dropped and TensorFlow kept off the GPUs
(`sparse_scaling.runtime`), and
applies the compatibility shims that trax 1.4.1 needs on the pinned JAX
(`sparse_scaling.compat`).
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # quiet TensorFlow (data only) at import

# pylint: disable=g-import-not-at-top
from sparse_scaling import runtime as _runtime

_runtime.check_versions()
_runtime.ignore_trax_syntax_warnings()
with _runtime.quiet_imports():
  from sparse_scaling import compat as _compat  # imports trax, TensorFlow and gym
  _runtime.keep_tensorflow_off_gpus()

_compat.apply()
