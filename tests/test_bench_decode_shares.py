"""The sweep of the fused blocks' shares (`bench/decode_shares.py`)."""

import pytest

from sparse_scaling.bench import decode_shares


def _constants():
  return {name: getattr(*place) for name, place in decode_shares.SHARES.items()}


def test_each_setting_is_in_force_while_it_is_measured_and_undone_after():
  before = _constants()
  seen = []

  def measure(model_fn, dtype, prompt, n_tokens):   # what a measurement's trace would see
    del model_fn, dtype, prompt, n_tokens
    seen.append(_constants())
    return 1e-3 * len(seen)

  settings = ['default', 'WIDTH=16+WARPS=8', 'DOT=0', 'MODULES=4+FF_GROUP=1+MAX_PARTS=144']
  results = decode_shares.sweep('800m', 'ffqkv', 1, settings, measure=measure)
  assert [text for text, _ in results] == settings
  assert seen == [before, dict(before, WIDTH=16, WARPS=8), dict(before, DOT=False),
                  dict(before, MODULES=4, FF_GROUP=1, MAX_PARTS=144)]
  assert _constants() == before


def test_a_block_is_measured_in_a_compiled_loop(monkeypatch):
  calls = []
  monkeypatch.setattr(decode_shares.table1, 'seconds_per_block_program',
                      lambda model, dtype, n_tokens: calls.append((model, dtype, n_tokens)) or 2e-5)
  assert decode_shares.per_block(lambda: 'model', 'float32', 128, 32) == 2e-5
  assert calls == [('model', 'float32', 32)]


@pytest.mark.parametrize('text', ['WIDTH', 'WIDTH=12', 'DOT=2', 'SPEED=4', 'WIDTH=8+', '',
                                  'MAX_PARTS=0', 'FF_GROUP=3'])
def test_a_bad_setting_is_refused_naming_the_rule(text):
  with pytest.raises(ValueError, match='--settings: '):
    decode_shares.parse_setting(text)
