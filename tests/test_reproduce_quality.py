"""The quality reproduction: its arms keep the dense parameter count; a tiny run end to end."""

import functools
import json
import shutil

import gin
import numpy as np
import pytest
from trax import shapes

from sparse_scaling import configs
from sparse_scaling import data
from sparse_scaling.data import token_files
from sparse_scaling.models.params import parameter_counts
from sparse_scaling.reproduce import quality

ROW_KEYS = {'arm', 'params', 'seeds', 'val_log_ppl_mean', 'val_log_ppl_spread', 'steps',
            'tokens'}


@functools.lru_cache(maxsize=None)  # the gpu size's, for both tests that read it
def _counts(size):
  counts = {}
  for arm in quality.ARMS:
    gin.clear_config()
    configs.parse([quality.GIN_FILE.format(size)], quality.bindings(arm, 0, 'embedded'))
    model = configs.configured_model()(mode='eval')
    counts[arm] = parameter_counts(model, shapes.ShapeDtype((1, 8), np.int32))['total']
  return counts


@pytest.mark.parametrize('size', ['cpu', 'small', 'gpu'])
def test_arms_have_the_dense_parameter_count_within_1_percent(size):
  counts = _counts(size)
  assert 'dense_conv' in counts
  for arm, count in counts.items():
    assert abs(count / counts['dense'] - 1) < 0.01, (arm, counts)


def test_gpu_size_meets_the_issues_scale():
  # Issue #16: >= 20M weights, >= 25M training tokens, >= 1M validation tokens an evaluation,
  # at least LATE_EVALS evaluations, and the token files' first 2 train shards read at most
  # twice (their 12M-token cap: token_files.SHARD_TOKENS).
  assert min(_counts('gpu').values()) >= 20e6
  gin.clear_config()
  configs.parse([quality.GIN_FILE.format('gpu')], quality.bindings('dense', 0, 'tokens'))
  tokens_per_step = (gin.query_parameter('%BATCH_SIZE') * gin.query_parameter('%SEQ_LEN'))
  steps = gin.query_parameter('train.steps')
  assert steps * tokens_per_step >= 25e6
  assert gin.query_parameter('train.eval_steps') * tokens_per_step >= 1e6
  assert steps // gin.query_parameter('train.eval_frequency') >= quality.LATE_EVALS
  assert (gin.query_parameter('token_file_lm_inputs.eval_windows') ==  # the same every time
          gin.query_parameter('train.eval_steps') * gin.query_parameter('%BATCH_SIZE'))
  shards = gin.query_parameter('token_file_lm_inputs.train_shards')
  assert steps * tokens_per_step <= 2 * 0.99 * shards * token_files.SHARD_TOKENS


def test_tiny_reproduction_writes_rows_markdown_and_curves(tmp_path):
  results_dir = tmp_path / 'results'
  # 21 steps: evaluations every 2 steps, and one more after the last (odd) step.
  results = quality.reproduce('tiny', 'embedded', [0], ['dense', 'ff'], str(tmp_path / 'runs'),
                              steps=21, command='python -m sparse_scaling.reproduce.quality')
  quality.write_results(results, results_dir)

  rows = json.loads((results_dir / 'quality.json').read_text())['rows']
  assert [row['arm'] for row in rows] == ['dense', 'ff']
  for row in rows:
    assert ROW_KEYS <= row.keys()
    assert (row['steps'], row['tokens'], row['seeds']) == (21, 21 * 8 * 64, [0])
    assert np.isfinite(row['val_log_ppl_mean']) and row['val_log_ppl_spread'] == 0
    assert row['curve'][-1] == [21, row['val_log_ppl_mean']]
    late = [value for _, value in row['curve'][-quality.LATE_EVALS:]]
    assert np.isclose(row['late_log_ppl_mean'], np.mean(late))
  assert rows[0]['delta_vs_dense'] == 0 and rows[1]['goal'] == quality.GOALS['ff']
  for arm in ('dense', 'ff'):  # one directory per run
    assert (tmp_path / 'runs' / arm / 'seed0' / 'checkpoint' / 'model.pkl.gz').exists()

  markdown = (results_dir / 'quality.md').read_text()
  assert '| ff | 256 | 8 |' in markdown and '≤ +0.02' in markdown
  assert (results_dir / 'quality_curves.png').stat().st_size > 0
  (results_dir / 'quality_curves.png').unlink()
  (results_dir / 'quality.md').unlink()
  quality.render(results_dir)  # --render_only
  assert (results_dir / 'quality.md').read_text() == markdown
  (results_dir / quality.NOTES).write_text('## Notes\n\nBy hand.\n')
  quality.render(results_dir)
  assert (results_dir / 'quality.md').read_text() == markdown + '\n## Notes\n\nBy hand.\n'
  assert (results_dir / 'quality_curves.png').exists()


@pytest.fixture(scope='module')
def tiny_tokens(tmp_path_factory, cache_dir):
  """Token files of the embedded corpus at the tiny size's vocabulary (512)."""
  path = tmp_path_factory.mktemp('tokens')
  splits = {split: data.shakespeare_texts(split)[:2] for split in ('train', 'validation')}
  token_files.write_token_files(path, splits, data.embedded_vocab(512, cache_dir), 'test', '-',
                                shard_tokens=20_000, validation_shard_tokens=20_000)
  return path


def _run(tmp_path, arm, output_dir, tiny_tokens, steps=4):
  return quality.train_run('tiny', arm, 0, 'tokens', str(output_dir), steps=steps,
                           gin_params=[f"token_file_lm_inputs.path = '{tiny_tokens}'",
                                       'token_file_lm_inputs.batch_size = %BATCH_SIZE',
                                       'token_file_lm_inputs.seq_len = %SEQ_LEN',
                                       'token_file_lm_inputs.vocab_size = %VOCAB_SIZE',
                                       'token_file_lm_inputs.eval_windows = 32'],  # 4 x 8
                           command='test')


@pytest.fixture(scope='module')
def finished(tmp_path_factory, tiny_tokens):
  """{arm: (output_dir, record)}: a dense and a dense_conv run of 4 steps, each in an output
  directory of its own, trained once for the tests below (a test that changes one copies it)."""
  root = tmp_path_factory.mktemp('finished')
  return {arm: (root / directory, _run(root, arm, root / directory, tiny_tokens))
          for arm, directory in (('dense', 'gpu0'), ('dense_conv', 'gpu1'))}


def test_finished_runs_are_kept_and_other_runs_refused(tmp_path, tiny_tokens, finished):
  output_dir, record = finished['dense_conv']
  assert record['steps'] == 4 and record['knobs']['attention_conv'] == 4
  assert record['tokens_per_s'] > 0 and record['size'] == 'tiny'
  assert _run(tmp_path, 'dense_conv', output_dir, tiny_tokens) == record  # not retrained
  with pytest.raises(ValueError, match='another run'):
    _run(tmp_path, 'dense_conv', output_dir, tiny_tokens, steps=6)


def test_a_cut_off_run_resumes_from_its_checkpoint(tmp_path, tiny_tokens, capsys, finished):
  output_dir = tmp_path / 'runs'
  shutil.copytree(finished['dense'][0], output_dir)
  record = finished['dense'][1]
  run_dir = output_dir / 'dense' / 'seed0'
  (run_dir / quality.RECORD).unlink()  # as if cut off after its last checkpoint (step 4)
  capsys.readouterr()
  resumed = _run(tmp_path, 'dense', output_dir, tiny_tokens)
  assert 'Resumed from the checkpoint of step 4' in capsys.readouterr().out
  assert resumed['history'] == record['history'] and resumed['steps'] == 4
  assert resumed['tokens_per_s'] is None  # no step trained in this call


def test_render_merges_output_dirs_and_renders_some_arms(tmp_path, finished):
  gpu0, gpu1 = finished['dense'][0], finished['dense_conv'][0]
  only_conv = quality.render(tmp_path / 'one', [gpu1])
  assert [row['arm'] for row in only_conv['rows']] == ['dense_conv']
  assert only_conv['rows'][0]['delta_vs_dense'] is None
  assert '| dense_conv | 312 | - | - | - | 4 |' in (tmp_path / 'one' / 'quality.md').read_text()
  both = quality.render(tmp_path / 'both', [gpu0, gpu1])
  assert [row['arm'] for row in both['rows']] == ['dense', 'dense_conv']
  conv = both['rows'][1]
  assert conv['delta_vs_dense'] == conv['val_log_ppl_mean'] - both['rows'][0]['val_log_ppl_mean']
  # quality.json's runs, joined by a record: the saved table grows by the new arm.
  quality.render(tmp_path / 'grown', [gpu0])
  grown = quality.render(tmp_path / 'grown', [gpu1])
  assert [row['arm'] for row in grown['rows']] == ['dense', 'dense_conv']
  with pytest.raises(FileNotFoundError, match='nothing to render'):
    quality.render(tmp_path / 'none', [tmp_path / 'empty'])


def _row(arm, curve, spread=0.01):
  return dict(arm=arm, curve=[[step, value] for step, value in enumerate(curve)],
              val_log_ppl_mean=curve[-1], val_log_ppl_spread=spread,
              delta_vs_dense=None)


def test_a_diverged_arm_is_named_and_the_control_is_not_read_from_it():
  dense, qkv = _row('dense', [7.0, 4.0, 3.5, 3.3]), _row('qkv', [7.0, 4.0, 3.4, 3.2])
  stable = _row('dense_conv', [7.0, 4.0, 3.5, 3.46])        # +0.04 over its best: noise
  diverged = _row('dense_conv', [7.0, 4.0, 4.3, 4.4])       # +0.4 over its best
  for row in (qkv, stable, diverged):
    row['delta_vs_dense'] = row['val_log_ppl_mean'] - dense['val_log_ppl_mean']
  assert not quality._divergence_lines([dense, qkv, stable])  # pylint: disable=protected-access
  assert quality._convolution_lines([dense, qkv, stable])[0].startswith(  # pylint: disable=protected-access
      'Control: dense_conv - dense = +0.1600 nats')
  [line, _] = quality._divergence_lines([dense, qkv, diverged])  # pylint: disable=protected-access
  assert 'dense_conv (+0.40)' in line and 'qkv' not in line
  assert quality._convolution_lines([dense, qkv, diverged]) == [  # pylint: disable=protected-access
      'Control: not readable here, dense_conv diverged.', '']


def _record(arm, seed, final, bindings=()):
  """A finished run's record with a two-point curve ending at `final`."""
  return dict(
      arm=arm, seed=seed, params=1000, val_log_ppl=final, history=[[1, 7.0], [8, final]],
      wall_s=1.0, steps=8, tokens=64, tokens_per_s=None, size='tiny', corpus='tokens',
      knobs=dict(d_ff=32, ff_sparsity=0, attention_sparsity=0, loss_sparsity=0,
                 attention_conv=0),
      setting=dict(d_model=8, n_layers=1, n_heads=1, vocab_size=16, seq_len=4, batch_size=2,
                   dropout=0.0),
      eval_tokens=8, machine='test', command='test', output_dir='-',
      bindings=quality.bindings(arm, seed, 'tokens') + list(bindings))


def test_delta_pairs_each_run_with_dense_s_run_of_its_seed():
  runs = [_record('dense', 0, 3.0), _record('dense', 1, 3.4),
          _record('ff', 0, 3.01), _record('ff', 1, 3.42), _record('ff', 2, 9.0),
          _record('qkv', 5, 3.0)]
  dense, ff, qkv = quality.summarize(runs)
  assert dense['delta_vs_dense'] == 0 and dense['delta_by_seed_range'] == [0, 0]
  # Seed 2 has no dense run: it counts in ff's mean, not in its Δ.
  assert ff['val_log_ppl_mean'] == pytest.approx((3.01 + 3.42 + 9.0) / 3)
  assert ff['delta_vs_dense'] == pytest.approx(0.015)  # not 5.14 - 3.2
  assert ff['delta_by_seed_range'] == pytest.approx([0.01, 0.02]) and ff['meets_goal']
  assert ff['late_delta_vs_dense'] == pytest.approx(0.015 / 2)  # 7.0 cancels
  assert qkv['delta_vs_dense'] is None and qkv['delta_by_seed_range'] is None
  markdown = quality.markdown(quality.results_from_runs(
      runs + [_record('dense_conv', 0, 3.1)]))
  assert '| +0.010 .. +0.020 |' in markdown
  assert 'Control: not readable here, qkv or dense_conv shares no seed with dense.' in markdown


def test_render_refuses_runs_of_different_gin_params(tmp_path):
  for name, seed, extra in (('a', 0, []), ('b', 1, ['multifactor.constant = 0.32'])):
    run_dir = tmp_path / name / 'dense' / f'seed{seed}'
    run_dir.mkdir(parents=True)
    (run_dir / quality.RECORD).write_text(json.dumps(_record('dense', seed, 3.0, extra)))
  same = quality.render(tmp_path / 'one', [tmp_path / 'b'])
  assert same['extra_bindings'] == ['multifactor.constant = 0.32']
  assert '`multifactor.constant = 0.32`' in (tmp_path / 'one' / 'quality.md').read_text()
  with pytest.raises(ValueError, match='mix --steps or --gin_param'):
    quality.render(tmp_path / 'both', [tmp_path / 'a', tmp_path / 'b'])
