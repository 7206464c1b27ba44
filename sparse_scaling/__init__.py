"""sparse_scaling: *Sparse is Enough in Scaling Transformers* (Jaszczur et al., 2021) in Trax.

Importing the package makes one call, `sparse_scaling.compat.apply()`: it checks the Python
and JAX versions, imports trax quietly and applies the shims that trax 1.4.1 needs on the
pinned JAX. The call is idempotent, and the programs (`main.py`, the benchmarks, the
reproductions), the notebook and the tests make it themselves too. It stays here so that code
that only imports the package (a user's script training with trax's own `Loop`, say) still gets
a version check in one line and a trax that works on this JAX. Nothing else happens on import
of any module of the package: gin names are registered, no Python name is rebound.
"""

from sparse_scaling import compat as _compat

_compat.apply()
