"""bench/ff_decode.py: one token through an FF layer, timed on inputs that change."""

import numpy as np

from sparse_scaling import decoding
from sparse_scaling.bench import ff_decode
from sparse_scaling.layers import SparseFF


def test_a_layer_is_timed_on_different_tokens_in_turn(monkeypatch):
  """A sparse layer fed one input would read the same rows every call, from the cache after
  the first: each call gets the next of TOKENS different inputs."""
  seen = []
  real = decoding.jit

  def jit(fn, weights):
    compiled = real(fn, weights)
    return lambda weights, state, x: seen.append(np.asarray(x)) or compiled(weights, state, x)

  monkeypatch.setattr(ff_decode.decoding, 'jit', jit)
  seconds = ff_decode.decode_seconds(SparseFF(64, 8, mode='predict'), 16, 'float32')
  assert seconds > 0
  assert len(seen) >= 20 and len({x.tobytes() for x in seen}) == ff_decode.TOKENS
  assert all(not np.array_equal(a, b) for a, b in zip(seen, seen[1:]))
