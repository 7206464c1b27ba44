"""The parts-sum benchmark (`bench/parts_sum.py`): a small layer, Pallas' interpreter."""

import math

from absl import app
import pytest

from sparse_scaling.bench import parts_sum


def test_every_summing_form_hands_on_the_same_x_and_unsummed_does_not():
  forms = parts_sum.parse_forms(['parts', 'kernel', 'next', 'unsummed', 'atomic1', 'atomic3'])
  rows = []
  measured = parts_sum.measure(forms, n_layers=2, tokens=3, d_model=64, n_parts=6, rounds=1,
                               on_row=rows.append)
  assert rows == measured
  assert [row['form'] for row in rows] == ['parts', 'kernel', 'next', 'unsummed', 'atomic1',
                                           'atomic3']
  errors = {row['form']: row['error'] for row in rows}
  assert errors['parts'] == 0
  for form in ('kernel', 'next', 'atomic1', 'atomic3'):   # the same sum in another order
    assert errors[form] < 1e-5, (form, errors)
  assert errors['unsummed'] > 1e-2               # part 0 alone is not the layer's output
  assert all(math.isfinite(row['us']) for row in rows)


def test_the_800m_shape_is_96_parts_of_1024():
  assert parts_sum.shape_800m() == (1024, 96)


@pytest.mark.parametrize('name', ['atomic', 'atomic0', 'atomicx', 'sum'])
def test_a_form_that_is_not_one_is_refused_naming_the_rule(name):
  with pytest.raises(app.UsageError, match=f"--forms: '{name}' must be parts, kernel, next, "
                     r'unsummed or atomicG with G >= 1 copies'):
    parts_sum.parse_forms(['parts', name])
