"""The benchmarks' shared timing: the memory-bandwidth probes behind every floor column."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_scaling.bench import timing
from sparse_scaling.layers import decode_kernels
from tests import utils

ONE_PASS = {'full reduction', 'row reduction', 'column reduction', 'matrix-vector product',
            'vector-matrix product', 'scaled copy, read + write'}


def test_accelerators_also_time_probes_looped_in_one_call(monkeypatch):
  # On an accelerator the vector-matrix product and the copy also run looped: a call's
  # dispatch then counts once per ACCELERATOR_PASSES passes of reading. A CPU: one pass a call.
  looped = {f'{name}, {timing.ACCELERATOR_PASSES} passes in one loop'
            for name in ('vector-matrix product', 'scaled copy, read + write')}
  rates = timing.bandwidth_probes(shape=(256, 128))
  on_cpu = jax.default_backend() == 'cpu'
  assert rates.keys() == (ONE_PASS if on_cpu else ONE_PASS | looped)
  assert min(rates.values()) > 0
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  rates = timing.bandwidth_probes(shape=(256, 128), large_shape=(128, 512))
  # On a GPU also the streaming sum, where Pallas has its Triton backend (in Pallas'
  # interpreter here).
  streams = ({timing.STREAM_PROBE} if decode_kernels.MISSING is None else set())
  large = {f'{name}, {timing.ACCELERATOR_PASSES} passes in one loop at [128, 512]'
           for name in {'vector-matrix product'} | streams}
  looped |= {f'{name}, {timing.ACCELERATOR_PASSES} passes in one loop' for name in streams}
  assert rates.keys() == ONE_PASS | streams | looped | large and min(rates.values()) > 0


def test_the_streaming_sum_sums_and_is_a_triton_kernel_for_a_gpu():
  x = jnp.asarray(np.random.RandomState(0).rand(48, 2 * timing.STREAM_WIDTH), jnp.float32)
  scale = jnp.full((1,), 0.25, jnp.float32)
  sums = timing.stream_sums(x, scale, interpret=True)
  # 48 rows of 2·WIDTH: 96 rows of WIDTH, in blocks of ROWS (4), over 8 programs of 3 steps
  assert sums.shape == (8,)
  np.testing.assert_allclose(float(jnp.sum(sums)), 0.25 * float(jnp.sum(x)), rtol=1e-5)
  # each program's own rows: in turn along x, program 1 sums blocks 1, 9 and 17 of 4 rows of
  # the [96, WIDTH] view; each along its own share, rows 12..23
  view = x.reshape(-1, 4, timing.STREAM_WIDTH)
  np.testing.assert_allclose(float(sums[1]), 0.25 * float(jnp.sum(view[1::8])), rtol=1e-5)
  shares = timing.stream_sums(x, scale, interpret=True, interleaved=False)
  np.testing.assert_allclose(float(shares[1]), 0.25 * float(jnp.sum(view[3:6])), rtol=1e-5)
  if decode_kernels.MISSING is None:
    text = utils.lowered_for_an_h200(
        lambda x, s: timing.stream_sums(x, s, interpret=False), x, scale)
    assert text.count('__gpu$xla.gpu.triton') == 1
  with pytest.raises(ValueError, match='multiple of the width'):
    timing.stream_sums(x[:, :-1], scale, interpret=True)


def test_memory_bandwidth_is_the_best_probe(monkeypatch):
  monkeypatch.setattr(timing, 'bandwidth_probes', lambda: {'a': 2.0, 'b': 5.0, 'c': 3.0})
  assert timing.memory_bandwidth() == 5.0
  assert timing.memory_bandwidth(with_probe=True) == (5.0, 'b')
