"""main.py end to end: the tiny job trains, checkpoints and decodes; bad input fails cleanly."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ['train.steps=4', 'train.eval_frequency=2', 'train.eval_steps=1',
        'embedded_lm_inputs.batch_size=4', 'embedded_lm_inputs.seq_len=32',
        'ScalingTransformerLM.n_layers=1', 'sample.max_new_tokens=4']


def run_main(tmp_path, *args):
  env = dict(os.environ, SPARSE_SCALING_CACHE=str(tmp_path / 'cache'))
  return subprocess.run([sys.executable, str(ROOT / 'main.py'), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_tiny_lm_trains_checkpoints_and_samples(tmp_path):
  out = tmp_path / 'run'
  result = run_main(tmp_path, '--gin_file=gin_configs/tiny/lm.gin', f'--output_dir={out}',
                    *[f'--gin_param={p}' for p in FAST])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Step      4: eval                          loss' in result.stdout
  assert '--- sample' in result.stdout
  for name in ['config.gin', 'model.pkl.gz', 'model.weights.npy.gz']:
    assert (out / name).exists(), name


@pytest.mark.parametrize('args, message', [
    (['--gin_file=gin_configs/tiny/no_such.gin'], 'no_such.gin'),
    (['--gin_file=gin_configs/tiny/lm.gin', '--gin_param=train.no_such_arg=1'], 'no_such_arg'),
    (['--gin_file=gin_configs/tiny/lm.gin', '--gin_param=ScalingTransformerLM.n_heads=3'],
     'n_heads'),
])
def test_bad_input_fails_with_one_line_error(tmp_path, args, message):
  result = run_main(tmp_path, *args, f'--output_dir={tmp_path / "run"}')
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error:') and message in last, result.stderr[-2000:]
