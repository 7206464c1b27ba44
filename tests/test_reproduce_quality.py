"""The quality reproduction: its arms keep the dense parameter count; a tiny run end to end."""

import json

import gin
import numpy as np
import pytest
from trax import shapes

from sparse_scaling import configs
from sparse_scaling.models.params import parameter_counts
from sparse_scaling.reproduce import quality

ROW_KEYS = {'arm', 'params', 'seeds', 'val_log_ppl_mean', 'val_log_ppl_spread', 'steps',
            'tokens'}


@pytest.mark.parametrize('size', ['cpu', 'small'])
def test_arms_have_the_dense_parameter_count_within_1_percent(size):
  counts = {}
  for arm in quality.ARMS:
    gin.clear_config()
    configs.parse([quality.GIN_FILE.format(size)], quality.bindings(arm, 0, 'embedded'))
    model = configs.configured_model()(mode='eval')
    counts[arm] = parameter_counts(model, shapes.ShapeDtype((1, 8), np.int32))['total']
  for arm, count in counts.items():
    assert abs(count / counts['dense'] - 1) < 0.01, (arm, counts)


def test_tiny_reproduction_writes_rows_markdown_and_curves(tmp_path, monkeypatch, cache_dir):
  monkeypatch.setenv('SPARSE_SCALING_CACHE', str(cache_dir))
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
  assert (results_dir / 'quality_curves.png').exists()
