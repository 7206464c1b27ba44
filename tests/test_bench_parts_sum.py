"""The parts-sum benchmark (`bench/parts_sum.py`): a small layer, Pallas' interpreter."""

import functools
import math

from absl import app
import jax
import jax.numpy as jnp
import pytest

from sparse_scaling.bench import parts_sum
from sparse_scaling.bench import timing
from tests import utils


def test_every_summing_form_hands_on_the_same_x_and_unsummed_does_not():
  forms = parts_sum.parse_forms(['parts', 'kernel', 'next', 'unsummed', 'atomic1', 'atomic3',
                                 'last4', 'last1'])
  rows = []
  measured = parts_sum.measure(forms, n_layers=2, tokens=3, d_model=64, n_parts=6, rounds=1,
                               on_row=rows.append)
  assert rows == measured
  assert [row['form'] for row in rows] == ['parts', 'kernel', 'next', 'unsummed', 'atomic1',
                                           'atomic3', 'last4', 'last1']
  errors = {row['form']: row['error'] for row in rows}
  assert errors['parts'] == 0
  # The same sum in another order:
  for form in ('kernel', 'next', 'atomic1', 'atomic3', 'last4', 'last1'):
    assert errors[form] < 1e-5, (form, errors)
  assert errors['unsummed'] > 1e-2               # part 0 alone is not the layer's output
  assert all(math.isfinite(row['us']) for row in rows)


def test_the_summers_fence_and_count_where_compiled_for_an_h200(monkeypatch):
  """Compiled for an H200, the units programs of a lastK layer fence their stores and meet
  before they count, and the summers fence after the count; the interpreter runs neither."""
  monkeypatch.setattr(timing, 'interpreted', lambda: False)   # Triton's kernels on any machine
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  text = utils.lowered_for_an_h200(functools.partial(parts_sum.layer, 'last', 4), f32(1, 64),
                                   f32(6, 64), f32(6, 64))
  assert 'atomic_rmw' in text
  assert text.count('fence.acq_rel.gpu;\\0A\\09bar.sync 0;') == 1
  assert text.count('fence.acq_rel.gpu;') == 2


def test_the_800m_shape_is_96_parts_of_1024():
  assert parts_sum.shape_800m() == (1024, 96)


@pytest.mark.parametrize('name', ['atomic', 'atomic0', 'atomicx', 'sum', 'last', 'last3',
                                  'last0'])
def test_a_form_that_is_not_one_is_refused_naming_the_rule(name):
  with pytest.raises(app.UsageError, match=f"--forms: '{name}' must be parts, kernel, next, "
                     r'unsummed, atomicG with G >= 1 copies \(e.g. atomic4\) or lastK with K '
                     'a power of 2 of summing programs'):
    parts_sum.parse_forms(['parts', name])
