"""The sweep of the fused Sparse QKV block's shares (`bench/decode_shares.py`)."""

import pytest

from sparse_scaling.bench import decode_shares
from sparse_scaling.layers import sparse_qkv_block_kernel


def test_each_setting_is_in_force_while_it_is_measured_and_undone_after():
  before = {name: getattr(sparse_qkv_block_kernel, name) for name in decode_shares.SHARES}
  seen = []

  def measure(model_fn, dtype, prompt, n_tokens):   # what a measurement's trace would see
    del model_fn, dtype, prompt, n_tokens
    seen.append({name: getattr(sparse_qkv_block_kernel, name) for name in decode_shares.SHARES})
    return 1e-3 * len(seen)

  results = decode_shares.sweep('800m', 'ffqkv', 1, ['default', 'WIDTH=16+WARPS=8', 'DOT=0'],
                                measure=measure)
  assert [text for text, _ in results] == ['default', 'WIDTH=16+WARPS=8', 'DOT=0']
  assert seen == [before, dict(before, WIDTH=16, WARPS=8), dict(before, DOT=False)]
  assert {name: getattr(sparse_qkv_block_kernel, name)
          for name in decode_shares.SHARES} == before


@pytest.mark.parametrize('text', ['WIDTH', 'WIDTH=12', 'DOT=2', 'SPEED=4', 'WIDTH=8+', ''])
def test_a_bad_setting_is_refused_naming_the_rule(text):
  with pytest.raises(ValueError, match='--settings: '):
    decode_shares.parse_setting(text)
