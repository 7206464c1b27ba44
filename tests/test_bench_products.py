"""The one-token products benchmark (`bench/products.py`): a tiny block, Pallas' interpreter."""

import functools
import re

from absl import app
import jax
import jax.numpy as jnp
import pytest

from sparse_scaling import decoding
from sparse_scaling.bench import products
from tests import utils

DIMS = dict(d_model=32, d_ff=64)


@pytest.fixture
def small_shares(monkeypatch):
  """Program shares that divide the tiny block, and two copies of each pair."""
  for name, value in (('SPLIT_ROWS', 16), ('SPLIT_COLUMNS', 8), ('ROWS_PIECE', 16),
                      ('COLD_BYTES', 2 * 2 * 32 * 96 * 4)):
    monkeypatch.setattr(products, name, value)


def test_every_form_computes_the_same_chain_and_gets_a_row(small_shares):
  rows = []
  measured = products.measure(DIMS, list(products.FORMS), bandwidth=1e9, steps=(1, 3),
                              on_row=rows.append)
  assert rows == measured
  assert [(r['pair'], r['form']) for r in rows] == [
      (pair, form) for pair in ('ff', 'qkv', 'output') for form in products.FORMS]
  for row in rows:
    # The pair's two products: d·n float32 weights each (the biases aside).
    assert row['mb'] == pytest.approx(2 * row['d'] * row['n'] * 4 / 1e6)
    assert row['error'] < 1e-5, row
    assert row['floor_us'] == pytest.approx(row['mb'] * 1e6 / 1e9 * 1e6)   # bytes at 1 GB/s, µs
  assert {(r['d'], r['n']) for r in rows} == {(32, 64), (32, 96), (32, 32)}
  assert products.table_row(rows[0]).startswith('| ff | 32 -> 64 -> 32 | 0.0 | xla |')


def test_bfloat16_pairs_read_half_the_bytes_and_every_form_keeps_the_dtype(small_shares):
  rows = products.measure(DIMS, list(products.FORMS), bandwidth=1e9, steps=(1, 2),
                          on_row=lambda row: None, dtype=jnp.bfloat16)
  for row in rows:
    assert row['mb'] == pytest.approx(2 * row['d'] * row['n'] * 2 / 1e6)
    assert row['error'] < 2e-2, row   # bfloat16's rounding; float32 forms agree to 1e-5
  pairs = products.random_pairs(32, 64, 1, dtype=jnp.bfloat16)
  assert {w.dtype for w in pairs[0]} == {jnp.dtype(jnp.bfloat16)}
  x = jnp.ones((1, 32), jnp.bfloat16)
  for form in products.FORMS:
    assert products.chain(form, pairs)(x, 2).dtype == jnp.bfloat16, form


def test_a_wrong_product_would_show_in_the_error_column(small_shares, monkeypatch):
  product, options, transposed = products.FORMS['split']
  monkeypatch.setitem(products.FORMS, 'split',
                      (lambda x, w, b: product(x, w, b) * 1.01, options, transposed))
  rows = products.measure(DIMS, ['xla', 'split'], bandwidth=1e9, steps=(1, 2),
                          on_row=lambda row: None)
  assert all((row['error'] > 1e-6) == (row['form'] == 'split') for row in rows)


def test_fits_refuses_shapes_the_programs_do_not_divide():
  assert products.fits(1024, 4096) and products.fits(9216, 27648)
  assert not products.fits(1000, 4096)


_flags = functools.partial(utils.parsed_flags, 'sparse_scaling.bench.products')


def test_an_unknown_form_is_refused_naming_the_forms():
  with pytest.raises(app.UsageError, match=re.escape(
      "--forms: ['xla', 'gemv'] must name one or more of ['xla', 'rewrite'")):
    products.check_flags(_flags('--forms', 'xla,gemv'))
  products.check_flags(_flags('--forms', 'xla,rewrite'))


def test_the_forms_loop_their_products_as_xla_compiles_loops(monkeypatch):
  # Their loop repeats a product, not a generation's token: no CUDA graph of the loop
  # (decoding.GRAPH_LOOPS), whose conditional node would add its cost to every pair.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  for form, (_, options, _) in products.FORMS.items():
    assert 'xla_gpu_enable_command_buffer' not in (options() or {}), form
  assert products.FORMS['xla'][1]() == decoding.COMPILER_OPTIONS['gpu']
