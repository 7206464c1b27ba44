"""Every gin file parses and builds its model at tiny size; the paper configs' sizes."""

import functools

import gin
import jax
import numpy as np
import pytest
from trax import shapes

from sparse_scaling import checkpoints
from sparse_scaling import configs
from sparse_scaling import models
from sparse_scaling import training
from sparse_scaling.models.params import parameter_counts

GIN_FILES = sorted(configs.GIN_DIR.rglob('*.gin'))
TINY_MACROS = ['D_MODEL = 64', 'D_FF = 512', 'ENCODER_D_FF = 512', 'N_HEADS = 4',
               'N_LAYERS = 1', 'N_ENCODER_LAYERS = 1', 'N_DECODER_LAYERS = 1',
               'VOCAB_SIZE = 64', 'MAX_LEN = 32',
               "ENCODER_ATTENTION = 'dense'", "DECODER_ATTENTION = 'dense'"]  # LSH: twins


def _model(gin_file, bindings=()):
  gin.clear_config()
  configs.parse([gin_file], bindings)
  return configs.configured_model()


def _signature(model, length=8):
  tokens = shapes.ShapeDtype((2, length), np.int32)
  return (tokens, tokens) if model.n_in == 2 else tokens


TINY_TWINS = sorted(p for p in GIN_FILES if p.parent.name == 'tiny' and 'twin' not in p.name
                    and p.name.startswith(('c4_800m_', 'terraformer_')) and 'copy' not in p.name)
# The long-document twins train with LSH in trax's memory-efficient trainer (1-2 min each on 2
# cores, most of it compiling each layer's steps apart): with -m slow. By default the C4
# medium twin trains a Terraformer on the same span corruption in the standard trainer;
# test_bench_memory.py runs a step of the memory-efficient trainer built as the Loop builds it,
# on LSH attention, and test_terraformer.py checks the reversible gradients.
# Of the C4 800M twins, the two ends run by default (dense, and FF+QKV+loss with all three
# sparse layers); the three between them, each a subset of the last one's layers, with -m slow.
# The dense twin trains by default in test_two_runs_in_one_process_train_on_the_same_batches,
# with this test's checks; here with -m slow.
SLOW_TWINS = ('terraformer_arxiv.gin', 'terraformer_rfc.gin', 'c4_800m_ff.gin',
              'c4_800m_qkv.gin', 'c4_800m_ff_qkv.gin', 'c4_800m_dense.gin')


@pytest.mark.parametrize('path', GIN_FILES, ids=lambda p: str(p.relative_to(configs.GIN_DIR)))
def test_every_gin_file_parses_and_builds_its_model_at_tiny_size(path):
  configs.parse([str(path)], TINY_MACROS)
  if not configs.has_binding('train.model'):
    return  # a run or twin file, included by experiment files
  model = configs.configured_model()(mode='eval')
  signature = _signature(model)
  model.init(signature, rng=jax.random.PRNGKey(0))
  inputs = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), signature)
  logits = model(inputs)
  logits = logits[0] if isinstance(logits, tuple) else logits
  assert logits.shape[:2] == (2, 8) and np.isfinite(logits).all()


@pytest.mark.parametrize('path', [
    pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_TWINS else p for p in TINY_TWINS],
                         ids=lambda p: p.name)
def test_tiny_twin_trains_three_steps(path, tmp_path):
  configs.parse([str(path)])
  loop = training.train(str(tmp_path / 'run'))
  assert loop.step == 3
  assert checkpoints.latest_checkpoint(str(tmp_path / 'run'))
  losses = [value for _, value in loop.history.get('eval', 'metrics/log_perplexity')]
  assert np.isfinite(losses).all()


def test_a_parsed_binding_reaches_the_configured_model_not_a_plain_call():
  # main.py builds `train.model` through gin; the Python function stays plain (commit 79460e8:
  # a parsed config used to reshape plain calls).
  configs.parse(['tiny/lm.gin'], ['ScalingTransformerLM.d_model = 48'])
  tokens = shapes.ShapeDtype((1, 8), np.int32)
  configured = parameter_counts(configs.configured_model()(mode='eval'), tokens)
  plain = parameter_counts(models.ScalingTransformerLM(
      vocab_size=64, d_ff=64, n_layers=1, n_heads=2, max_len=16, mode='eval'), tokens)
  assert configured['decoder/embedding'] == (4096 + 512) * 48   # tiny/lm.gin's vocab, max_len
  assert plain['decoder/embedding'] == (64 + 16) * 1024         # the default d_model


def _total(gin_file, bindings=()):
  model = _model(gin_file, bindings)(mode='eval')
  return parameter_counts(model, _signature(model, length=512))['total']


@functools.lru_cache(maxsize=None)  # the dense config's, for each test that compares with it
def _total_at_24_layers(gin_file):
  """The weights of the 24 + 24-layer config, from builds of depth 1 and 2 (exactly affine)."""
  one, two = (_total(gin_file, [f'N_ENCODER_LAYERS = {n}', f'N_DECODER_LAYERS = {n}'])
              for n in (1, 2))
  return one + 23 * (two - one)


def test_800m_config_has_about_800m_weights():
  assert 770e6 < _total_at_24_layers('paper/c4_800m_dense.gin') < 830e6


@pytest.mark.slow  # ~30 s: a shape-only build of all 48 layers
def test_the_24_layer_extrapolation_equals_the_whole_build():
  assert _total('paper/c4_800m_dense.gin') == _total_at_24_layers('paper/c4_800m_dense.gin')


@pytest.mark.parametrize('variant', ['ff', 'qkv', 'ff_qkv', 'ff_qkv_loss'])
def test_sparse_800m_configs_match_the_dense_size_within_3_percent(variant):
  dense = _total_at_24_layers('paper/c4_800m_dense.gin')
  assert abs(_total_at_24_layers(f'paper/c4_800m_{variant}.gin') / dense - 1) < 0.03


def test_component_counts_add_up_to_the_initialized_weights():
  model = _model('paper/c4_800m_ff_qkv_loss.gin', TINY_MACROS)(mode='eval')
  signature = _signature(model)
  counts = parameter_counts(model, signature)
  model.init(signature)
  assert counts['total'] == sum(w.size for w in jax.tree.leaves(model.weights))
  assert sum(v for k, v in counts.items() if k != 'total') == counts['total']
  assert {'encoder/self_attention', 'decoder/self_attention', 'decoder/ff_controller',
          'decoder/feed_forward', 'decoder/output'} <= set(counts)


def test_includes_resolve_when_the_working_directory_has_same_named_folders(tmp_path,
                                                                             monkeypatch):
  # The main job writes runs/ beside the gin files' own runs/ and models/ includes.
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  for name in ('runs', 'models'):
    (tmp_path / name).mkdir()
  configs.parse(['paper/c4_800m_dense.gin'])
  assert gin.query_parameter('%D_MODEL') == 1024


def test_two_runs_in_one_process_train_on_the_same_batches(tmp_path):
  # trax counts batches per process; each run must start from the first batch. The first run
  # is also the dense C4 800M twin's test_tiny_twin_trains_three_steps (there with -m slow).
  losses = []
  for run in ('a', 'b'):
    gin.clear_config()
    configs.parse(['tiny/c4_800m_dense.gin'])
    loop = training.train(str(tmp_path / run))
    assert loop.step == 3
    assert checkpoints.latest_checkpoint(str(tmp_path / run))
    losses.append([value for _, value in loop.history.get('eval', 'metrics/log_perplexity')])
  assert len(losses[0]) == 2 and np.isfinite(losses[0]).all()  # after steps 1 and 3
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
