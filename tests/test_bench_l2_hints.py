"""The L2 hints benchmark (`bench/l2_hints.py`): small chains, Pallas' interpreter."""

import functools
import math

from absl import app
import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering as triton_lowering
import pytest

from sparse_scaling.bench import l2_hints
from sparse_scaling.bench import timing
from tests import utils


def test_every_hint_computes_the_same_x_as_its_plain_loads():
  forms = l2_hints.parse_forms(['normal.normal.xla', 'last.cs.xla', 'last.first.first',
                                'cs.last.normal', 'ahead.normal.xla', 'shared.normal.xla',
                                'shared.cs.cs', 'normal.none.none', 'ahead.none.none'])
  rows = []
  measured = l2_hints.measure(forms, n_layers=3, tokens=3, weight_rows=2, stream_rows=4,
                              vocab=512, d_model=64, rounds=1, on_row=rows.append)
  assert rows == measured
  assert [row['form'] for row in rows] == [f[0] for f in forms]
  errors = {row['form']: row['error'] for row in rows}
  assert errors['normal.normal.xla'] == errors['shared.normal.xla'] == 0   # the references
  assert errors['normal.none.none'] == 0
  for form in ('last.cs.xla', 'last.first.first', 'cs.last.normal', 'ahead.normal.xla',
               'shared.cs.cs', 'ahead.none.none'):
    assert errors[form] < 1e-5, (form, errors)
  assert all(math.isfinite(row['us']) for row in rows)


def test_the_layers_differ_so_shared_weights_compute_another_x():
  arrays = l2_hints.random_arrays(3, 2, 4, 512, d_model=64)
  own, shared = (l2_hints.generation(weights, 'normal', 'xla', 2, *arrays)(*arrays)
                 for weights in ('normal', 'shared'))
  assert float(jnp.max(jnp.abs(own - shared))) > 1e-3


def test_ahead_asks_for_the_next_layers_weights_where_compiled_for_an_h200(monkeypatch):
  monkeypatch.setattr(timing, 'interpreted', lambda: False)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  layer = lambda x, w, after: l2_hints.layer(x, w, None, 'ahead', 'none', after=after)
  with l2_hints.ptx_loads():
    text = utils.lowered_for_an_h200(layer, f32(1, 64), f32(8, 64), f32(8, 64))
  assert 'prefetch.global.L2 [$1];' in text and 'ld.global.f32 $0, [$1];' in text


@pytest.mark.parametrize('hint, ptx', [
    ('last', 'createpolicy.fractional.L2::evict_last.b64 policy, 1.0;'),
    ('first', 'createpolicy.fractional.L2::evict_first.b64 policy, 1.0;'),
    ('cs', 'ld.global.cs.f32 $0, [$1];'),
    ('normal', 'ld.global.f32 $0, [$1];')])
def test_the_hinted_loads_are_ptx_where_compiled_for_an_h200(monkeypatch, hint, ptx):
  """Lowered for an H200 inside `ptx_loads`, the marked loads of a layer and of the product
  are the hint's PTX, and Pallas' load rule is put back after."""
  monkeypatch.setattr(timing, 'interpreted', lambda: False)   # Triton's kernels on any machine
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  layer = functools.partial(l2_hints.layer, weights=hint, stream=hint)
  args = f32(1, 64), f32(8, 64), f32(16, 64)
  pallas_rule = triton_lowering._load
  product = functools.partial(l2_hints.product, hint=hint)
  with l2_hints.ptx_loads():
    texts = [utils.lowered_for_an_h200(layer, *args),
             utils.lowered_for_an_h200(product, f32(1, 64), f32(64, 512))]
  assert triton_lowering._load is pallas_rule                  # put back
  for text in texts:   # (a kernel's strings are stored once, however many loads use them)
    assert ptx in text


@pytest.mark.parametrize('name', ['normal', 'normal.normal', 'shared.shared.xla',
                                  'normal.xla.xla', 'none.normal.xla', 'last.cs.xla.x',
                                  'normal.ahead.xla'])
def test_a_form_that_is_not_one_is_refused_naming_the_rule(name):
  with pytest.raises(app.UsageError, match=f"--forms: '{name}' must be weights.stream.product, "
                     'weights one of normal, last, first, cs, shared, ahead, stream one of normal, '
                     r'last, first, cs, none, product one of .*xla \(e.g. last.cs.xla\)'):
    l2_hints.parse_forms(['normal.normal.xla', name])
