"""main.py end to end: train, resume after kill -9 or SIGTERM, eval, decode; faults, bad input.

Training, its output, the signals and the export run main.py (or the export module) as a
program. The other modes and the errors run main.py's `main` in the test's process, its flags
parsed as `python main.py` parses them (`run_main_here`): the same code, without a start-up of
~7 s each on 2 cores.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings

from absl import flags
from absl import logging as absl_logging
import numpy as np
import pytest

from sparse_scaling import __main__ as entry
from sparse_scaling import checkpoints
from tests import utils

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = utils.TINY_LM


def _command(output_dir, *args, steps=4):
  params = [f'--gin_param={p}' for p in FAST + [f'train.steps={steps}']]
  return [sys.executable, str(ROOT / 'main.py'), '--gin_file=tiny/lm.gin',
          f'--output_dir={output_dir}', *params, *args]


def run_main(command):
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def run_main_here(command, monkeypatch, capsys):
  """`run_main` in this process: main.py's `main` on the flags of `command`, parsed by absl as
  `app.run` parses them; an exit message goes to stderr with exit status 1, as Python's exit
  gives them. Returns a `subprocess.CompletedProcess` as `run_main` does."""
  # main.py as `python -m sparse_scaling` loads it: once per process (it defines its flags).
  main = entry._main_module()  # pylint: disable=protected-access
  assert command[:2] == [sys.executable, str(ROOT / 'main.py')]
  monkeypatch.chdir(ROOT)
  verbosity = absl_logging.get_verbosity()  # main sets it
  capsys.readouterr()
  returncode, exit_message = 0, ''
  try:
    with warnings.catch_warnings():  # main adds a filter
      main.main(flags.FLAGS(['main.py', *command[2:]]))
  except SystemExit as e:
    returncode, exit_message = ((1, f'{e.code}\n') if isinstance(e.code, str)
                                else (e.code or 0, ''))   # sys.exit(None) is a success
  finally:
    flags.FLAGS.unparse_flags()
    absl_logging.set_verbosity(verbosity)
  out, err = capsys.readouterr()
  return subprocess.CompletedProcess(command, returncode, out, err + exit_message)


def _one_line_error(result, message):
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error:') and message in last, result.stderr[-2000:]


def _snapshot(directory):
  return {p: p.read_bytes() for p in pathlib.Path(directory).rglob('*') if p.is_file()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  out = tmp_path_factory.mktemp('trained') / 'run'
  result = run_main(_command(out))
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def test_tiny_lm_trains_checkpoints_and_samples(trained):
  out, result = trained
  assert 'Step      4: eval                log_perplexity' in result.stdout
  assert 'step      4/4 | loss' in result.stdout and 'tokens/s' in result.stdout
  assert '--- sample' in result.stdout
  for name in ['config.gin', 'checkpoint/model.pkl.gz', 'checkpoint/model.weights.npy.gz',
               'checkpoint/data_counters0.pkl']:
    assert (out / name).exists(), name
  assert 'ScalingTransformerLM.ff_sparsity = 16' in (out / 'config.gin').read_text()
  assert list((out / 'train').glob('events.out.tfevents.*'))  # TensorBoard


NOISE = ['cuda', 'oneDNN', 'absl::InitializeLog', 'Gym has been unmaintained', 'gymnasium',
         'SyntaxWarning']


def test_main_job_says_where_it_runs_and_prints_nothing_but_its_own_output(trained):
  import jax  # pylint: disable=g-import-not-at-top
  _, result = trained
  first = result.stdout.splitlines()[0]
  assert first.startswith(f'running on {jax.default_backend()}: ') and 'trax 1.4.1' in first
  assert f'jax {jax.__version__}' in first, first
  output = result.stdout + result.stderr
  assert not [word for word in NOISE if word.lower() in output.lower()], result.stderr[-3000:]


def test_eval_and_decode_modes_use_the_checkpoint(trained, monkeypatch, capsys):
  out, _ = trained
  result = run_main_here(_command(out, '--mode=eval'), monkeypatch, capsys)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Evaluating the checkpoint of step 4' in result.stdout
  assert 'eval                      accuracy' in result.stdout
  result = run_main_here(_command(out, '--mode=decode', '--prompt=Juliet.',
                                  '--temperature=0.7', '--top_k=5', '--top_p=0.9',
                                  '--max_new_tokens=3', '--seed=2'),
                         monkeypatch, capsys)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '--- sample (temperature 0.7, top_k 5, top_p 0.9) ---\nJuliet.' in result.stdout


def test_export_writes_named_weights_that_load_back_into_the_gin_model(trained, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sparse_scaling import configs  # pylint: disable=g-import-not-at-top
  from sparse_scaling import export  # pylint: disable=g-import-not-at-top
  out, _ = trained
  path = tmp_path / 'weights.npz'
  result = subprocess.run([sys.executable, '-m', 'sparse_scaling.export', f'--output_dir={out}',
                           f'--to={path}'], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  flat = checkpoints.from_bits(checkpoints.load_latest(out, n_tasks=0).weights)
  assert f'wrote {len(flat)} weight arrays' in result.stdout
  configs.parse([str(out / 'config.gin')])  # the model's bindings hold until the test ends
  model_fn = configs.configured_model()
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  exported, reference = model_fn(mode='eval'), model_fn(mode='eval')
  exported.init(export.model_signature(exported, 8))
  export.load_weights(exported, path)
  reference.init(export.model_signature(reference, 8))
  reference.weights = jax.tree.unflatten(jax.tree.structure(reference.weights), flat)
  np.testing.assert_array_equal(exported(tokens), reference(tokens))


def test_export_without_checkpoint_fails_with_one_line_error(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'sparse_scaling.export',
                           f'--output_dir={tmp_path}', f'--to={tmp_path / "w.npz"}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  _one_line_error(result, 'no checkpoint')
  assert not (tmp_path / 'w.npz').exists()


# Every case by default: in this process each takes under 3 s (as a program, ~17 s on 2
# cores). The layers' and the sampler's rules are also tested on their own (test_sparse_ff,
# test_scaling_transformer, test_decoding).
@pytest.mark.parametrize('args, message', [
    (['--gin_file=tiny/no_such.gin'], 'no_such.gin'),
    (['--gin_param=train.no_such_arg=1'], 'no_such_arg'),
    (['--gin_param=ScalingTransformerLM.n_heads=3'], 'n_heads'),
    (['--gin_param=ScalingTransformerLM.d_ff=500'], 'd_ff'),
    (['--gin_param=embedded_lm_inputs.seq_len=1024'], 'max_len'),
    (['--mode=decode', '--temperature=1', '--top_p=1.5'], 'top_p'),
    (['--mode=decode', '--gin_param=sample.top_q=0.5'], 'top_q'),
])
def test_bad_input_fails_with_one_line_error_and_keeps_the_checkpoint(trained, args, message,
                                                                     monkeypatch, capsys):
  out, _ = trained
  before = _snapshot(out)
  _one_line_error(run_main_here(_command(out, *args), monkeypatch, capsys), message)
  assert _snapshot(out) == before


def test_decode_without_checkpoint_fails_with_one_line_error(tmp_path, monkeypatch, capsys):
  _one_line_error(run_main_here(_command(tmp_path / 'empty', '--mode=decode'), monkeypatch,
                                capsys), 'no checkpoint')


def test_decode_of_a_task_without_text_fails_with_one_line_error(tmp_path, monkeypatch, capsys):
  """The copy task's config binds no vocabulary to write its tokens as text: said in one line
  before any checkpoint is read (gin's missing-binding error was a traceback)."""
  command = [sys.executable, str(ROOT / 'main.py'), '--gin_file=tiny/terraformer_copy.gin',
             f'--output_dir={tmp_path / "empty"}', '--mode=decode']
  _one_line_error(run_main_here(command, monkeypatch, capsys),
                  '--mode=decode: the config binds no vocabulary (sample.vocab)')


@pytest.mark.slow  # 58 s; by default the SIGTERM test resumes a stopped run and
# test_training's lock test has a killed process release its lock.
def test_kill_9_during_training_then_the_same_command_resumes(tmp_path):
  out = tmp_path / 'run'
  command = _command(out, steps=1000)
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
  try:
    for line in process.stdout:  # kill at once after a checkpoint beyond step 1
      if line.startswith('step      5/'):
        break
    with pytest.raises(checkpoints.OutputDirInUseError):  # a second run would stop at once
      checkpoints.lock_output_dir(out)
    time.sleep(0.5)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  step = checkpoints.load_latest(out).step  # complete, whenever the kill came
  assert step >= 4
  result = run_main(_command(out, steps=step + 2))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resumed from the checkpoint of step {step} ' in result.stdout
  assert f'step {step + 2:6d}/{step + 2}' in result.stdout


def test_diverging_training_stops_on_its_gradients_norm_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys):
  out = tmp_path / 'run'
  diverge = ['--gin_param=train.optimizer=@trax.optimizers.SGD',  # weights ~1e29 after step 1
             '--gin_param=multifactor.constant=1e30', '--gin_param=train.eval_frequency=1']
  result = run_main_here(_command(out, *diverge, steps=20), monkeypatch, capsys)
  # The gradients are checked before the loss (both are nan here, at step 2).
  _one_line_error(result, "error: gradients' global norm is nan at step 2 (loss nan); stopped. "
                  f'The last good checkpoint is kept: {out}/checkpoint')
  last = checkpoints.load_latest(out)  # checkpointed every step, the diverged one excepted
  assert last.step == 1 and all(np.isfinite(w).all() for w in last.weights)


def _losses(stdout):
  """{step: loss} of main.py's progress lines ('step      3/4 | loss 8.1139 | ...')."""
  return {int(line.split()[1].split('/')[0]): line.split('| loss ')[1].split()[0]
          for line in stdout.splitlines() if line.startswith('step ')}


def test_sigterm_stops_after_the_step_in_flight_and_the_run_resumes_on_the_same_losses(
    trained, tmp_path, cache_dir, capsys):
  reference, uninterrupted = trained  # 4 steps, checkpointed at 2 and 4
  out = tmp_path / 'run'
  with open(tmp_path / 'stderr.txt', 'w') as stderr:
    process = subprocess.Popen(_command(out, steps=1000), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
      for line in process.stdout:
        if line.startswith('step      1/'):
          break
      process.send_signal(signal.SIGTERM)  # during step 1's checkpoint and eval, or step 2
      signalled = time.time()
      stdout = line + process.communicate(timeout=300)[0]
      seconds = time.time() - signalled
    finally:
      process.kill()
  assert process.returncode == 0, (tmp_path / 'stderr.txt').read_text()[-3000:]
  [stopped] = [l for l in stdout.splitlines() if l.startswith('Stopped by SIGTERM')]
  step = int(stopped.split(' after step ')[1].split(':')[0])
  assert stopped == (f'Stopped by SIGTERM after step {step}: checkpoint saved in '
                     f'{out}/checkpoint; run the same command to resume')
  assert 1 <= step < 4 and seconds < 60
  assert checkpoints.load_latest(out).step == step

  utils.train_tiny_lm(out, cache_dir, steps=4)  # as main.py; here to save a start-up
  resumed = capsys.readouterr().out
  assert f'Resumed from the checkpoint of step {step} ' in resumed
  losses = _losses(stdout) | _losses(resumed)
  assert losses == _losses(uninterrupted.stdout) and len(losses) == 4  # to the printed 1e-4
  for ours, theirs in zip(checkpoints.load_latest(out).weights,
                          checkpoints.load_latest(reference).weights):
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.slow  # ~35 s; test_compat trains the same Loop on two devices by default
def test_two_devices_train_data_parallel(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  result = subprocess.run(_command(tmp_path / 'run', '--n_devices=2', '--seed=3', steps=2),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step      2/2 | loss' in result.stdout
  assert 'train.n_devices = 2' in (tmp_path / 'run' / 'config.gin').read_text()


def test_missing_tfds_data_fails_with_one_line_error(tmp_path, monkeypatch, capsys):
  command = [sys.executable, str(ROOT / 'main.py'), '--gin_file=paper/c4_800m_ff.gin',
             f'--output_dir={tmp_path / "run"}', f'--data_dir={tmp_path / "no_data"}']
  _one_line_error(run_main_here(command, monkeypatch, capsys), 'c4')
  assert not (tmp_path / 'run' / 'checkpoint').exists()
