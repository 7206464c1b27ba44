"""Peak memory of a training step: the reversible Terraformer against a dense encoder-decoder.

  python -m sparse_scaling.bench.memory [--models terraformer,dense]
      [--lengths 4096,8192,16384,32768,65536] [--depths 2,4,8,16] [--point_timeout 1200]
      [--memory_limit_gb 20] [--json] [--nowrite]

Two sweeps, each point a training step (forward, backward, Adafactor update, float32,
dropout 0, batch 1) of an encoder-decoder of one width (d_model 512, d_ff 2048, 8 heads,
vocabulary 1024, so that the output layer does not dominate):

  by length  --lengths tokens in all, 3/4 to the encoder and 1/4 to the decoder, at depth 2
  by depth   --depths layers in the encoder and as many in the decoder, at 4096 tokens

- terraformer: `Terraformer` with LSH attention in encoder and decoder (trax's
  `LSHSelfAttention`: chunks of 128, 128 buckets, 2 hashes), trained by trax's memory-efficient
  `ReversibleSerialTrainer`, built as `Loop(..., use_memory_efficient_trainer=True)` builds it
  (`extract_reversible_blocks`, `init_reversible_blocks`, one Adafactor per layer): layer by
  layer, each reversible layer's inputs recomputed from its outputs on the way back, its
  update applied at once. Its weights start as numpy arrays, as a step leaves them: from
  `init_reversible_blocks`' jax arrays trax would compile every layer again in the second step.
- dense: `ScalingTransformer` with every sparsity 0 (dense attention, cross-attention, FF and
  output layer), trained by trax's plain `Trainer` (one jitted step; autodiff keeps every
  layer's activations for the backward pass).

Each point runs in a fresh child process of this module (so that peaks do not mix) whose
address space is limited to --memory_limit_gb (`RLIMIT_AS`): an allocation past it fails in
the child, which is reported as OOM, as is a child killed by a signal; a child still running
after --point_timeout seconds is killed and reported as timeout. The child builds and
initializes the model, its trainer and optimizer slots (the baseline: resident memory then),
runs one step (compilation included) and a second one (timed). Memory is the process's
high-water mark of resident memory, `getrusage(RUSAGE_SELF).ru_maxrss`:

  peak   the high-water mark over the whole child: what must fit in memory
  step   the high-water mark during the second step, reset before it (Linux: "5" written to
         /proc/self/clear_refs), minus the baseline: the memory the step itself takes, not
         counting compilation.

Writes docs/results/memory.md and memory.png unless --nowrite. The default sweep takes about
30 minutes on 2 CPU cores shared with other jobs (load about 6), 28 of them CPU time.
"""

import collections
import gc
import json
import math
import os
import resource
import signal

from absl import app
from absl import flags
import jax
import numpy as np
from trax import layers as tl
from trax import optimizers
from trax import shapes
from trax.optimizers import trainer as trax_trainer

from sparse_scaling.bench import common
from sparse_scaling.bench import timing
from sparse_scaling.models import ScalingTransformer
from sparse_scaling.models import Terraformer

MODELS = ('terraformer', 'dense')
LENGTHS = (4096, 8192, 16384, 32768, 65536)   # tokens, encoder and decoder together
DEPTHS = (2, 4, 8, 16)                        # layers of the encoder, and of the decoder
LENGTH_SWEEP_DEPTH = 2
DEPTH_SWEEP_LENGTH = 4096
D_MODEL = 512
D_FF = 2048
N_HEADS = 8
VOCAB_SIZE = 1024
MEMORY_LIMIT_GB = 20   # of the machine's 24 GB, the rest left to the system
POINT_TIMEOUT_S = 1200
LINEAR = 1.25   # the largest exponent of length called ~linear (quadratic is 2)
FLAT = 0.25     # the largest exponent of depth called flat (proportional is 1)
MODULE = 'sparse_scaling.bench.memory'
_RESULT = 'RESULT '   # starts the child's line of results on its stdout
# A failed allocation under RLIMIT_AS, as jax, XLA, C++ or Python report it.
_OUT_OF_MEMORY = ('RESOURCE_EXHAUSTED', 'MemoryError', 'bad_alloc', 'out of memory',
                  'Out of memory', 'Cannot allocate memory')

_GOAL = {True: 'met', False: 'not met', None: 'not measured (a sweep has fewer than two points)'}

Point = collections.namedtuple('Point', 'model length depth')

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command line's flags; only when run as a program (others have namesakes)."""
  common.define_flags(json_output=True, writes='docs/results/memory.md and memory.png')
  flags.DEFINE_list('models', list(MODELS), f'Models to measure, of {MODELS}.')
  flags.DEFINE_list('lengths', [str(n) for n in LENGTHS],
                    f'Tokens (encoder + decoder, multiples of 512) of the sweep by length, at '
                    f'depth {LENGTH_SWEEP_DEPTH}.')
  flags.DEFINE_list('depths', [str(n) for n in DEPTHS],
                    f'Depths of the sweep by depth, at {DEPTH_SWEEP_LENGTH} tokens.')
  flags.DEFINE_integer('point_timeout', POINT_TIMEOUT_S, 'Seconds a point may take.',
                       lower_bound=1)
  flags.DEFINE_float('memory_limit_gb', MEMORY_LIMIT_GB, 'Address space of each point, GB.')
  flags.register_validator('memory_limit_gb', lambda gb: gb > 0, message='must be > 0')
  flags.DEFINE_string('child_point', None, 'Internal: measure this model,length,depth in this '
                      'process and print the result.')


def split(length):
  """Encoder and decoder lengths of `length` tokens: 3/4 and 1/4."""
  return length * 3 // 4, length // 4


def build_model(model, length, depth):
  """The model named `model` in train mode, for `length` tokens and `depth` layers a side."""
  common = dict(input_vocab_size=VOCAB_SIZE, d_model=D_MODEL, d_ff=D_FF, n_heads=N_HEADS,
                n_encoder_layers=depth, n_decoder_layers=depth, max_len=length, dropout=0.0,
                mode='train')
  if model == 'terraformer':
    return Terraformer(encoder_attention_type='lsh', decoder_attention_type='lsh', **common)
  # A decoder embedding of its own (output_vocab_size), as in the sweep of
  # docs/results/memory.md, measured before the default became a shared embedding.
  return ScalingTransformer(output_vocab_size=VOCAB_SIZE, **common)


def make_batch(length):
  """Random (encoder tokens, decoder tokens, loss weights) of batch 1 and `length` tokens."""
  encoder_length, decoder_length = split(length)
  rs = np.random.RandomState(0)
  tokens_e = rs.randint(1, VOCAB_SIZE, (1, encoder_length)).astype(np.int32)
  tokens_d = rs.randint(1, VOCAB_SIZE, (1, decoder_length)).astype(np.int32)
  return tokens_e, tokens_d, np.ones(tokens_d.shape, np.float32)


def training_step(model_name, model, batch):
  """Initializes `model`, its trainer and Adafactor slots for `batch`.

  Returns:
    `step(i)`: runs training step `i` on `batch`, waits for the updated weights and returns
    the loss.
  """
  loss = tl.WeightedCategoryCrossEntropy()
  signature, rng = shapes.signature(batch), jax.random.PRNGKey(0)
  if model_name == 'terraformer':
    blocks, loss_layer = trax_trainer.extract_reversible_blocks([model, loss])
    trax_trainer.init_reversible_blocks(blocks, loss_layer, signature, rng)
    trainer = optimizers.ReversibleSerialTrainer(blocks, loss_layer, optimizers.Adafactor)
    for layer in trainer.all_layers:  # numpy, as a step leaves them: the first step compiles
      layer.weights = jax.tree.map(np.asarray, layer.weights)  # all there is to compile
    weights = lambda: [layer.weights for layer in trainer.all_layers]
  else:
    model_with_loss = tl.Serial(model, loss)
    model_with_loss.init(signature, rng=rng)
    # Committed to the device as the step's outputs are: trax then compiles the step once.
    model_with_loss.weights, model_with_loss.state = jax.device_put(
        (model_with_loss.weights, model_with_loss.state), jax.devices()[0])
    optimizer = optimizers.Adafactor()
    optimizer.tree_init(model_with_loss.weights)
    trainer = optimizers.Trainer(model_with_loss, optimizer, n_devices=1)
    weights = lambda: trainer.accelerated_model_with_loss.weights
  rng = jax.random.PRNGKey(1)

  def step(i):
    loss_value, _ = trainer.one_step(batch, rng, step=i)
    return float(jax.block_until_ready((loss_value, weights()))[0])

  return step


def resident_mb():
  """Resident memory of this process now, MB."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb():
  """High-water mark of this process's resident memory, MB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def reset_peak():
  """Resets the high-water mark to the resident memory now (Linux)."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def measure_point(point):
  """Measures one training step of `point` in this process; the result row as a dict."""
  batch = make_batch(point.length)
  model = build_model(*point)
  step = training_step(point.model, model, batch)
  params = sum(np.size(w) for w in jax.tree.leaves(model.weights))
  gc.collect()
  baseline = resident_mb()
  start = timing.now()
  step(0)
  first_step_s = timing.now() - start
  peak = peak_mb()
  reset_peak()
  start = timing.now()
  loss = step(1)
  step_s = timing.now() - start
  step_peak = peak_mb()
  encoder_length, decoder_length = split(point.length)
  return dict(point._asdict(), encoder_length=encoder_length, decoder_length=decoder_length,
              params=params, status='ok', baseline_mb=baseline,
              peak_mb=max(peak, step_peak), step_mb=step_peak - baseline,
              first_step_s=first_step_s, step_s=step_s, loss=loss, load=os.getloadavg()[0])


def run_child(point, memory_limit_gb):
  """The child process: limits its address space, measures `point`, prints the row."""
  limit = int(memory_limit_gb * 2**30)
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  print(_RESULT + json.dumps(measure_point(point)), flush=True)


def child_command(point, memory_limit_gb):
  """The command of the child process that measures `point`."""
  return common.module_command(MODULE, f'--child_point={",".join(map(str, point))}',
                               f'--memory_limit_gb={memory_limit_gb}')


def run_point(point, timeout_s=POINT_TIMEOUT_S, memory_limit_gb=MEMORY_LIMIT_GB):
  """Measures `point` in a child process; a row whose status is ok, OOM, timeout or error.

  A row that is not ok has the point, its status and `detail` (why); an ok row also has
  encoder_length, decoder_length, params, baseline_mb, peak_mb, step_mb, first_step_s, step_s,
  loss and load.
  """
  returncode, timed_out, lines = common.run_child(
      child_command(point, memory_limit_gb), read=list, kill_after_s=timeout_s)
  results = [line for line in lines if line.startswith(_RESULT)]
  if returncode == 0 and results:
    return json.loads(results[-1][len(_RESULT):])
  if timed_out:
    return dict(point._asdict(), status='timeout', detail=f'killed after {timeout_s} s')
  errors = [line for line in lines if line.strip()] or [f'exit status {returncode}']
  detail = next((line for line in reversed(errors) if any(s in line for s in _OUT_OF_MEMORY)),
                errors[-1])
  if returncode < 0:
    detail = f'{signal.Signals(-returncode).name}: {detail}'
  out_of_memory = returncode < 0 or any(s in detail for s in _OUT_OF_MEMORY)
  return dict(point._asdict(), status='OOM' if out_of_memory else 'error',
              detail=detail.strip()[-300:])


def sweep_points(models, lengths, depths):
  """(sweep name, points) of the sweeps by length and by depth, each point once in all."""
  by_length = [Point(m, n, LENGTH_SWEEP_DEPTH) for m in models for n in lengths]
  by_depth = [Point(m, DEPTH_SWEEP_LENGTH, d) for m in models for d in depths]
  return [('length', by_length), ('depth', by_depth)]


def format_row(row):
  """The markdown table row of a result row (`TABLE_HEADER`'s columns)."""
  if row['status'] != 'ok':
    return (f'| {row["model"]} | {row["length"]:,} | {row["depth"]} '
            f'| {row["status"]} | | | | | | |')
  return (f'| {row["model"]} | {row["length"]:,} ({row["encoder_length"]:,} + '
          f'{row["decoder_length"]:,}) | {row["depth"]} | {row["params"] / 1e6:.1f}M '
          f'| {row["baseline_mb"] / 1024:.2f} | {row["peak_mb"] / 1024:.2f} '
          f'| {row["step_mb"] / 1024:.2f} | {row["first_step_s"]:.1f} | {row["step_s"]:.1f} '
          f'| {row["load"]:.1f} |')


TABLE_HEADER = common.table_header(['model', 'tokens (encoder + decoder)', 'depth', 'weights',
                                    'baseline GB', 'peak GB', 'step GB', 'first step s',
                                    'step s', 'load'])


def measured(rows, model, key):
  """`model`'s rows that trained, in order of `key` (length or depth)."""
  return sorted((r for r in rows if r['model'] == model and r['status'] == 'ok'),
                key=lambda r: r[key])


def exponent(a, b, key):
  """p such that the step memory grows as `key`**p from row `a` to row `b`."""
  return math.log(b['step_mb'] / a['step_mb']) / math.log(b[key] / a[key])


def findings(model, by_length, by_depth, memory_limit_gb):
  """`(line, goal)` on `model`: its longest sequence, how its step memory grows.

  The goal: step memory ~linear in length (exponent <= LINEAR between the two longest lengths
  that trained) and flat in depth (exponent <= FLAT from the shallowest to the deepest); `goal`
  says whether it is met, None with fewer than two points of a sweep.
  """
  ok = measured(by_length, model, 'length')
  longer = [r for r in by_length if r['model'] == model and r['status'] != 'ok'
            and (not ok or r['length'] > ok[-1]['length'])]
  if not ok:
    line = f'no measured length trains in {memory_limit_gb:g} GB'
  else:
    line = (f'the longest sequence that trains in {memory_limit_gb:g} GB is '
            f'{ok[-1]["length"]:,} tokens' + (f' ({longer[0]["length"]:,}: {longer[0]["status"]})'
                                              if longer else ', the longest measured'))
  linear = flat = None
  if len(ok) > 1:
    p = exponent(ok[-2], ok[-1], 'length')
    linear = p <= LINEAR
    steps = ', '.join(f'x{b["step_mb"] / a["step_mb"]:.2f}' for a, b in zip(ok, ok[1:]))
    line += (f'; its step memory grows as length^{p:.2f} between the two longest '
             f'({"~linear" if linear else "faster than linear"}; x from each length to the '
             f'next: {steps})')
  deep = measured(by_depth, model, 'depth')
  if len(deep) > 1:
    a, b = deep[0], deep[-1]
    p = exponent(a, b, 'depth')
    flat = p <= FLAT
    line += (f'; from depth {a["depth"]} to {b["depth"]}, step memory x'
             f'{b["step_mb"] / a["step_mb"]:.2f} (depth^{p:.2f}: {"flat" if flat else "growing"}), '
             f'peak x{b["peak_mb"] / a["peak_mb"]:.2f}, weights x{b["params"] / a["params"]:.2f}')
  return f'- {model}: {line}.', None if linear is None or flat is None else linear and flat


def section(title, rows):
  """A sweep's part of memory.md: its table, then why each failed point failed."""
  failures = [f'- {r["model"]}, {r["length"]:,} tokens, depth {r["depth"]}: {r["status"]} '
              f'({r["detail"]})' for r in rows if r['status'] != 'ok']
  return [f'## {title}', '', TABLE_HEADER, *map(format_row, rows)] + (
      ['', *failures] if failures else [])


def markdown(sweeps, command, machine, memory_limit_gb, timeout_s):
  """memory.md: setup, findings and one table per sweep."""
  by_length, by_depth = (rows for _, rows in sweeps)
  models = list(dict.fromkeys(r['model'] for _, rows in sweeps for r in rows))
  lines = {model: findings(model, by_length, by_depth, memory_limit_gb) for model in models}
  goal = []
  if 'terraformer' in lines:
    goal = ['', f'The issue\'s goal, Terraformer step memory ~linear in length (exponent <= '
            f'{LINEAR}) and flat in depth (exponent <= {FLAT}): '
            f'{_GOAL[lines["terraformer"][1]]}.']
  text = [
      '# Memory of a training step: reversible Terraformer vs dense encoder-decoder', '',
      f'`{command}`', '',
      f'Machine: {machine}. Each point is a fresh process limited to {memory_limit_gb:g} GB of '
      f'address space and {timeout_s} s (GB: 2^30 bytes). Width: d_model {D_MODEL}, d_ff {D_FF}, '
      f'{N_HEADS} heads, vocabulary {VOCAB_SIZE}; batch 1, float32, dropout 0, Adafactor. Tokens '
      'are split 3/4 encoder, 1/4 decoder; depth is the number of encoder layers and of decoder '
      'layers. terraformer: `Terraformer` with LSH attention, trained by trax\'s memory-efficient '
      '`ReversibleSerialTrainer` (as `Loop(use_memory_efficient_trainer=True)`); dense: '
      '`ScalingTransformer` without sparsity, trained by trax\'s `Trainer`. Weights include the '
      'positional-encoding tables (max_len = tokens; trax keeps them as weights). baseline: '
      'resident memory after the model, trainer and optimizer slots are initialized; peak: the '
      'high-water mark of the whole process (`ru_maxrss`, compilation included); step: the '
      'high-water mark during a second, compiled step minus the baseline; times: the first step '
      '(compilation included) and the second; load: the 1-minute load average after the step '
      '(other processes on the cores slow the steps down, they do not change the memory). The '
      'method is in the module docstring.', '',
      *(line for line, _ in lines.values()), *goal, '',
      *section(f'By length, depth {LENGTH_SWEEP_DEPTH}', by_length), '',
      *section(f'By depth, {DEPTH_SWEEP_LENGTH:,} tokens', by_depth)]
  return '\n'.join(text) + '\n'


def plot(sweeps, memory_limit_gb, path):
  """Peak and step memory by length and by depth, one panel per sweep; failures at the limit."""
  fig, axes = common.pyplot().subplots(1, 2, figsize=(12, 4.5))
  for ax, (key, rows) in zip(axes, sweeps):
    for i, model in enumerate(dict.fromkeys(r['model'] for r in rows)):
      color = f'C{i}'
      ok = [r for r in rows if r['model'] == model and r['status'] == 'ok']
      x = [r[key] for r in ok]
      ax.plot(x, [r['peak_mb'] / 1024 for r in ok], 'o-', color=color, label=f'{model} peak')
      ax.plot(x, [r['step_mb'] / 1024 for r in ok], 's--', color=color,
              label=f'{model} step')
      failed = [r[key] for r in rows if r['model'] == model and r['status'] != 'ok']
      if failed:
        ax.plot(failed, [memory_limit_gb] * len(failed), 'x', color=color, markersize=10,
                label=f'{model} OOM / timeout')
    ax.axhline(memory_limit_gb, color='gray', linestyle=':', label='limit')
    ax.set_xscale('log', base=2)
    ticks = sorted({r[key] for r in rows})
    ax.set_xticks(ticks, [f'{t:,}' for t in ticks])
    ax.minorticks_off()
    ax.set_yscale('log')
    ax.set_xlabel('tokens (encoder + decoder)' if key == 'length' else 'layers (each side)')
    ax.set_ylabel('GB')
    ax.set_title(f'by length, depth {LENGTH_SWEEP_DEPTH}' if key == 'length'
                 else f'by depth, {DEPTH_SWEEP_LENGTH} tokens')
    ax.legend(fontsize=7)
  common.save_figure(fig, path)


def _integers(name, values):
  try:
    return [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f'--{name}: give integers, got {",".join(values)}') from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.child_point:
    model, length, depth = FLAGS.child_point.split(',')
    run_child(Point(model, int(length), int(depth)), FLAGS.memory_limit_gb)
    return
  unknown = set(FLAGS.models) - set(MODELS)
  if unknown:
    raise app.UsageError(f'--models: unknown {sorted(unknown)}; use {MODELS}')
  lengths = _integers('lengths', FLAGS.lengths)
  if any(n % 512 for n in lengths):
    raise app.UsageError('--lengths: multiples of 512 (LSH chunks of 128 on both sides)')
  depths = _integers('depths', FLAGS.depths)
  measured, sweeps = {}, []
  for key, points in sweep_points(FLAGS.models, lengths, depths):
    for point in points:
      if point not in measured:
        measured[point] = run_point(point, FLAGS.point_timeout, FLAGS.memory_limit_gb)
        print(format_row(measured[point]), measured[point].get('detail', ''), flush=True)
    sweeps.append((key, [measured[point] for point in points]))
  command = common.command_line(MODULE)
  text = markdown(sweeps, command, timing.machine_description(), FLAGS.memory_limit_gb,
                  FLAGS.point_timeout)
  print(text)
  if FLAGS.write:
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / 'memory.md').write_text(text)
    plot(sweeps, FLAGS.memory_limit_gb, common.RESULTS_DIR / 'memory.png')
  if FLAGS.json:
    print(json.dumps(list(measured.values())))


if __name__ == '__main__':
  common.run(main, define_flags)
