"""Where the layers run their Pallas kernels: one switch for all of them.

Decoding a token reads little and runs many small XLA kernels; on a GPU, three layers can
decode through Pallas kernels instead: Sparse FF (`sparse_ff_kernel.py`), Sparse QKV's
convolutions (`sparse_qkv_kernel.py`) and attention over the KV cache (`attention_kernel.py`).
In training, Sparse FF's controller can run as two (`sparse_ff_controller_kernel.py`). Each
layer asks `active(kernel)` when it is traced:

  'auto'       on a GPU the kernels measured faster there (AUTO_ON_GPU: Sparse FF's decoding
               kernel and its controller's training kernels; Sparse QKV's and attention's
               cut a block's kernels but not the time of a whole generation, README
               "Decoding on a GPU"), XLA's ops elsewhere;
  'pallas'     every kernel, compiled (GPUs only);
  'interpret'  every kernel, run by Pallas' interpreter on any backend (the tests' CPU check);
  'xla'        XLA's ops everywhere (`table1 --impls ours-xla`, `train_step --kernels xla`).
"""

import contextlib

import jax

CHOICES = ('auto', 'pallas', 'interpret', 'xla')
KERNELS = ('sparse_ff', 'sparse_qkv', 'attention', 'sparse_ff_controller')
AUTO_ON_GPU = ('sparse_ff', 'sparse_ff_controller')
_CHOICE = ['auto']


@contextlib.contextmanager
def use(name):
  """Within the block, layers traced anew use `name`: one of CHOICES."""
  if name not in CHOICES:
    raise ValueError(f'decode kernel must be one of {CHOICES}, got {name!r}')
  previous, _CHOICE[0] = _CHOICE[0], name
  try:
    yield
  finally:
    _CHOICE[0] = previous


def active(kernel):
  """'pallas', 'interpret' or 'xla': what calls of `kernel` (one of KERNELS) use."""
  if kernel not in KERNELS:
    raise ValueError(f'kernel must be one of {KERNELS}, got {kernel!r}')
  if _CHOICE[0] == 'auto':
    return 'pallas' if jax.default_backend() == 'gpu' and kernel in AUTO_ON_GPU else 'xla'
  return _CHOICE[0]


def is_power_of_2(*values):
  """Whether every value is a positive power of 2 (Triton's block shapes must be)."""
  return all(isinstance(v, int) and v > 0 and v & (v - 1) == 0 for v in values)
