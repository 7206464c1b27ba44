"""The benchmarks' shared timing: the memory-bandwidth probes behind every floor column."""

import jax

from sparse_scaling.bench import timing

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
  large = {f'vector-matrix product, {timing.ACCELERATOR_PASSES} passes in one loop at [128, 512]'}
  assert rates.keys() == ONE_PASS | looped | large and min(rates.values()) > 0


def test_memory_bandwidth_is_the_best_probe(monkeypatch):
  monkeypatch.setattr(timing, 'bandwidth_probes', lambda: {'a': 2.0, 'b': 5.0, 'c': 3.0})
  assert timing.memory_bandwidth() == 5.0
  assert timing.memory_bandwidth(with_probe=True) == (5.0, 'b')
