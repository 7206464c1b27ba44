"""The kernel-chain benchmark (`bench/kernel_chain.py`): its forms in Pallas' interpreters and
lowered for an H200."""

import functools
import math
import re

from absl import app
import jax
import jax.numpy as jnp
import pytest

from sparse_scaling.bench import kernel_chain
from sparse_scaling.bench import timing
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import mosaic_kernels
from tests import utils
from tests.test_sparse_ff_mosaic import MARKS_PDL

needs_mosaic = pytest.mark.skipif(mosaic_kernels.MISSING is not None,
                                  reason=str(mosaic_kernels.MISSING))


@needs_mosaic
def test_every_form_adds_its_kernels_count_and_is_timed():
  forms = kernel_chain.parse_forms(['xla', 'triton', 'mosaic', 'mosaic1', 'mosaic4'], 128)
  rows = []
  measured = kernel_chain.measure(forms, n_kernels=2, tokens=3, programs=2, columns=128,
                                  rounds=1, on_row=rows.append)
  assert rows == measured
  assert [row['form'] for row in rows] == ['xla', 'triton', 'mosaic', 'mosaic1', 'mosaic4']
  assert all(math.isfinite(row['us']) for row in rows)


def test_the_xla_form_keeps_each_kernel_apart():
  """XLA fuses a chain of elementwise adds into one kernel (on an H100 the form then took
  0.32 µs an add); each add sits behind an optimization barrier, so that the program XLA
  receives holds one per kernel of every token."""
  run = kernel_chain.chained('xla', 0, n_kernels=5)
  text = run.lower(jnp.zeros((4, 128), jnp.float32), 3).as_text()
  assert text.count('optimization_barrier') == 5


@needs_mosaic
def test_a_form_that_adds_the_wrong_count_is_refused(monkeypatch):
  """The check before the timing sees a kernel that does not add 1."""
  monkeypatch.setattr(kernel_chain, 'triton', lambda x: x + 2)
  with pytest.raises(AssertionError, match='the triton form added'):
    kernel_chain.measure(kernel_chain.parse_forms(['triton'], 128), n_kernels=2, tokens=3,
                         programs=2, columns=128, rounds=1, on_row=lambda row: None)


@needs_mosaic
@pytest.mark.parametrize('copies', [0, 1, 4])
def test_the_mosaic_forms_lower_for_an_h200_as_the_decoding_kernels_do(copies, monkeypatch):
  """Compiled for an H200, each Mosaic form is one Mosaic GPU kernel that lets the next launch
  early and waits for the one before, marked for Programmatic Dependent Launch under jax >=
  0.11 (as the Mosaic decoding kernels); mosaicK copies with the TMA unit, mosaic not."""
  monkeypatch.setattr(timing, 'interpreted', lambda: False)
  text = utils.lowered_for_an_h200(functools.partial(kernel_chain.mosaic, copies=copies),
                                   jax.ShapeDtypeStruct((64, 128), jnp.float32))
  assert text.count('@mosaic_gpu') == 1
  assert 'griddepcontrol.launch_dependents' in text and 'griddepcontrol.wait' in text
  assert text.count('mosaic_gpu.uses_pdl') == (1 if MARKS_PDL else 0)
  # A TMA copy from the card's memory into shared memory: an NVVM op under jax 0.10 and 0.11
  # (cp.async.bulk.tensor.shared.cluster.global), inline PTX under 0.12
  # (cp.async.bulk.tensor.2d.shared::cta.global).
  tma = re.search(r'cp\.async\.bulk\.tensor\.(\dd\.)?shared(\.cluster|::cta)\.global', text)
  assert bool(tma) == bool(copies)


def test_the_triton_form_launches_the_next_kernel_early_for_an_h200(monkeypatch):
  monkeypatch.setattr(timing, 'interpreted', lambda: False)
  text = utils.lowered_for_an_h200(kernel_chain.triton,
                                   jax.ShapeDtypeStruct((64, 128), jnp.float32))
  assert 'griddepcontrol.launch_dependents' in text


def test_the_early_launch_turned_off_leaves_the_instruction_out_until_restored(monkeypatch):
  """`decode_kernels.launching_early(False)`, as `decode_profile` traces its kernels: no
  `launch_dependents` in what is lowered within, and LAUNCH_EARLY as before after."""
  monkeypatch.setattr(timing, 'interpreted', lambda: False)

  def lowered():
    return utils.lowered_for_an_h200(kernel_chain.triton,
                                     jax.ShapeDtypeStruct((64, 128), jnp.float32))

  with decode_kernels.launching_early(False):
    assert 'griddepcontrol.launch_dependents' not in lowered()
  assert decode_kernels.LAUNCH_EARLY
  assert 'griddepcontrol.launch_dependents' in lowered()


@pytest.mark.parametrize('name', ['mosaic3', 'mosaic0', 'mosaic256', 'mosaicx', 'pallas'])
def test_a_form_that_is_not_one_is_refused_naming_the_rule(name):
  with pytest.raises(app.UsageError, match=f"--forms: '{name}' must be xla, triton, mosaic or "
                     r'mosaicK with K a power of 2 of copies dividing --columns \(128\)'):
    kernel_chain.parse_forms(['xla', name], 128)
