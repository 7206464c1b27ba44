"""checkpoints.py: damaged checkpoints, pickles that would run code, the previous checkpoint.

All on one checkpoint of the tiny LM (conftest's `one_step_run`), copied before it is changed;
and the weights' signature of a fresh encoder-decoder, against which checkpoints are checked.
"""

import gzip
import logging
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_scaling import checkpoints
from sparse_scaling import configs
from sparse_scaling import convert
from tests import utils


@pytest.fixture
def run(one_step_run, tmp_path):
  """A copy of the one-step run's output directory."""
  shutil.copytree(one_step_run[0], tmp_path / 'run')
  return tmp_path / 'run'


class _RunsCode:
  """Unpickling this calls `os.system`: what a hostile checkpoint does."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def test_a_trax_checkpoint_reads_whole_through_the_restricted_unpickler(one_step_run):
  run_dir, _, loop = one_step_run
  checkpoint = checkpoints.load_latest(run_dir)
  assert checkpoint.step == 1 and checkpoint.data_counters == {'train': 2}
  assert len(checkpoint.weights) == len(checkpoints.weight_names(loop.model))
  for ours, theirs in zip(checkpoint.weights, jax.tree.leaves(loop.model.weights)):
    np.testing.assert_array_equal(ours, theirs)
  assert len(checkpoint.slots) == 1 and checkpoint.slots[0]
  assert checkpoint.state and checkpoint.history


def test_decode_reads_the_weights_checked_against_the_model(one_step_run):
  run_dir, cache, loop = one_step_run
  utils.parse_tiny_lm(cache)
  weights = checkpoints.read_weights(run_dir, configs.configured_model())
  for ours, theirs in zip(weights, jax.tree.leaves(loop.model.weights), strict=True):
    np.testing.assert_array_equal(ours, theirs)
  utils.parse_tiny_lm(cache, 'ScalingTransformerLM.n_layers=2')
  with pytest.raises(checkpoints.CheckpointError, match='27 weights there, 47 in the model'):
    checkpoints.read_weights(run_dir, configs.configured_model())


@pytest.mark.parametrize('name, write', [
    ('model.pkl.gz', lambda path, obj: path.write_bytes(gzip.compress(pickle.dumps(obj)))),
    ('data_counters0.pkl', lambda path, obj: path.write_bytes(pickle.dumps(obj))),
])
def test_a_pickle_that_would_run_code_is_refused_naming_the_type(run, tmp_path, name, write):
  marker = tmp_path / 'code_ran'
  write(run / 'checkpoint' / name, {'step': 1, 'flat_weights': 2, 'x': _RunsCode(marker)})
  with pytest.raises(checkpoints.CheckpointError, match=rf'{name} holds a posix\.system') as e:
    checkpoints.load_latest(run)
  assert '\n' not in str(e.value) and 'could run code' in str(e.value)
  assert not marker.exists()


def test_a_stray_data_counters_pickle_is_refused_before_trax_opens_it(run, tmp_path, cache_dir):
  # trax's Loop unpickles output_dir/data_counters0.pkl (not ours, in checkpoint/) as it starts.
  marker = tmp_path / 'code_ran'
  (run / 'data_counters0.pkl').write_bytes(pickle.dumps({'train': _RunsCode(marker)}))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'run/data_counters0\.pkl holds a posix\.system'):
    utils.train_tiny_lm(run, cache_dir, steps=2)
  assert not marker.exists()
  # A plain one is read (the checkpoint's data position then wins).
  (run / 'data_counters0.pkl').write_bytes(pickle.dumps({'train': 5}))
  assert utils.train_tiny_lm(run, cache_dir, steps=2).step == 2


@pytest.mark.parametrize('protocol', [4, 5])
def test_numpy_and_jax_arrays_unpickle_under_each_protocol(tmp_path, protocol):
  # trax pickles with the highest protocol (5), under which numpy writes a numpy array as raw
  # bytes (`_frombuffer`): the model state that parallel.Trainer copies to the host is numpy.
  # trax bit-casts bfloat16 weights and slots to uint16, not the state.
  state = {'numpy': np.arange(6, dtype=np.float32).reshape(2, 3),
           'fortran': np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
           'jax': jnp.arange(3, dtype=jnp.bfloat16), 'scalar': np.int32(7),
           'empty': np.zeros((0, 4), np.uint16)}
  path = tmp_path / 'state.pkl'
  path.write_bytes(pickle.dumps(state, protocol=protocol))
  loaded = checkpoints.unpickle(str(path))
  assert loaded.keys() == state.keys()
  for name, array in state.items():
    assert loaded[name].dtype == array.dtype and loaded[name].shape == np.shape(array), name
    np.testing.assert_array_equal(loaded[name], array)


def test_convert_reads_trax_checkpoints_through_the_restricted_unpickler(run, tmp_path):
  marker = tmp_path / 'code_ran'
  path = run / 'checkpoint' / 'model.pkl.gz'
  path.write_bytes(gzip.compress(pickle.dumps({'flat_weights': [_RunsCode(marker)]})))
  with pytest.raises(checkpoints.CheckpointError, match='posix.system'):
    convert.load_trax_checkpoint(None, str(path))
  assert not marker.exists()


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garble(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('name, damage', [
    ('model.pkl.gz', _truncate), ('model.weights.npy.gz', _truncate),
    ('model.opt_slots0.npy.gz', _garble), ('model.weights.npy.gz', _garble),
    ('data_counters0.pkl', _truncate), ('model.weights.npy.gz', os.remove),
])
def test_a_damaged_checkpoint_fails_in_one_line_naming_the_file(run, name, damage):
  damage(run / 'checkpoint' / name)
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.load_latest(run)
  message = str(e.value)
  assert str(run / 'checkpoint' / name) in message and '\n' not in message
  assert 'restore the checkpoint directory from a copy' in message


def test_train_eval_and_decode_stop_on_a_damaged_checkpoint_instead_of_starting_over(run,
                                                                                    cache_dir):
  before = utils.snapshot(run)
  _truncate(run / 'checkpoint' / 'model.weights.npy.gz')
  damaged = utils.snapshot(run)
  for evaluate_only in (False, True):
    with pytest.raises(checkpoints.CheckpointError, match='model.weights.npy.gz is damaged'):
      utils.train_tiny_lm(run, cache_dir, steps=2, evaluate_only=evaluate_only)
  with pytest.raises(checkpoints.CheckpointError, match='model.weights.npy.gz is damaged'):
    checkpoints.read_weights(run, configs.configured_model())
  assert utils.snapshot(run) == damaged != before


def test_a_damaged_checkpoint_falls_back_to_a_kept_previous_one_with_a_warning(run, caplog):
  shutil.copytree(run / 'checkpoint', run / checkpoints.PREVIOUS)  # as a crash mid-swap leaves
  _garble(run / 'checkpoint' / 'model.weights.npy.gz')
  with caplog.at_level(logging.WARNING):
    checkpoint = checkpoints.load_latest(run)
  assert checkpoint.directory == str(run / checkpoints.PREVIOUS) and checkpoint.step == 1
  [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert 'model.weights.npy.gz is damaged' in warning and 'using the previous' in warning


def test_no_checkpoint_is_none_and_a_crash_mid_swap_leaves_one_that_loads(run):
  assert checkpoints.load_latest(run.parent / 'nothing_here') is None
  os.rename(run / 'checkpoint', run / checkpoints.PREVIOUS)  # between the two renames
  assert checkpoints.load_latest(run).step == 1


@pytest.mark.parametrize('mode', ['eval', 'predict'])
def test_a_fresh_encoder_decoders_weights_signature_fits_its_trained_weights(mode):
  """trax's `weights_and_state_signature` fails on a fresh Terraformer as it puts the fresh
  state back (so `export` and decoding failed on a Terraformer run); `weights_signature` gives
  the shapes that an initialized model's weights have, and its checkpoint fits."""
  from trax import shapes  # pylint: disable=g-import-not-at-top
  from sparse_scaling.models import Terraformer  # pylint: disable=g-import-not-at-top
  model_fn = lambda: Terraformer(input_vocab_size=32, d_model=16, d_ff=64, n_encoder_layers=1,
                                 n_decoder_layers=1, n_heads=2, max_len=32, dropout=0.0,
                                 ff_sparsity=8, attention_sparsity=4, loss_sparsity=4,
                                 ff_use_sru=(1, 4), mode=mode)
  tokens = shapes.ShapeDtype((1, 8), np.int32)
  signature = (tokens, shapes.ShapeDtype((1, 1 if mode == 'predict' else 8), np.int32))
  with pytest.raises((ValueError, IndexError)):
    model_fn().weights_and_state_signature(signature)
  fresh = model_fn()
  ours = checkpoints.weights_signature(fresh, signature)
  trained = model_fn()
  weights, _ = trained.init(signature, rng=jax.random.PRNGKey(0))
  flat = jax.tree.leaves(weights)
  assert [(s.shape, s.dtype) for s in jax.tree.leaves(ours)] == [(w.shape, w.dtype) for w in flat]
  checkpoints.check_fits(flat, fresh, 'here', ours)
  assert checkpoints.weight_names(fresh, ours) == checkpoints.weight_names(trained)
