"""Training-step time of the Scaling Transformer LM: dense vs Sparse FF, +QKV, +loss.

The variants are the 800M rows of Table 1 at equal parameters (gin_configs/paper/
c4_800m_<variant>.gin: N=64, S=16, loss 4, d_ff 6144 with Sparse QKV), as a 2-layer
decoder-only LM, and their tiny twins (gin_configs/tiny/train_step_<variant>.gin: the width
of tiny/lm.gin's model). Only ff_qkv_loss has fewer weights: the paper keeps its d_ff, and the
multiplicative output layer is smaller. The `gpu` shape is the quality reproduction's GPU
size (gin_configs/reproduce/quality_gpu.gin, every arm of `reproduce.quality.ARMS` at ~21M
weights, 4 layers, batch 64 x 256): the step that issue #16's runs take, dropout as given.

A step is trax's own: `optimizers.Trainer.one_step`, which `training.Loop` runs, on
tl.Serial(model in train mode, WeightedCategoryCrossEntropy) with Adafactor (trax's defaults:
factored, no momentum), float32; the data pipeline and learning-rate schedule are left out.
Each variant is warmed up (compilation included), then timed as the median and p90 of at
least --steps steps, each blocked until ready. The issue's goal: a sparse step takes <= 1.25x
the dense one. The tiny shape takes about 2 minutes on 2 CPU cores, mostly compilation.

  python -m sparse_scaling.bench.train_step [--json] [--shapes tiny,800m,gpu] [--dropout 0.1]
      [--steps 20] [--variants dense,ff] [--kernels xla,pallas] [--rounds 4] [--profile 25]

--profile N also traces --steps steps of each variant (`jax.profiler`, every trax layer's
forward under a named scope, on a GPU compiled without command buffers so that each kernel
keeps its instruction's name) and prints the N (layer, operation) pairs that take the most
device time per step, forward and backward apart: where a sparse variant's extra time goes.
--kernels times each sparse variant under each Pallas kernel choice (`layers/decode_kernels.py`;
on a GPU, `pallas` runs Sparse FF's controller as `layers/sparse_ff_controller_kernel.py`), one
row each, in the same run. --rounds R > 1 compiles every row's step first and then times them
in R alternating rounds (order reversed every other round), so that the drift of a shared
machine between rows falls on all of them alike.
"""

import collections
import contextlib
import gc
import itertools
import json
import re

import gin
import jax
import numpy as np
from absl import app
from absl import flags
from trax import layers as tl
from trax import optimizers
from trax import shapes
from trax.layers import base
from trax.optimizers import trainer as trainer_lib

from sparse_scaling.bench import common
from sparse_scaling.bench import decode_profile
from sparse_scaling.bench import timing
from sparse_scaling.layers import decode_kernels
from sparse_scaling.models import ScalingTransformerLM
from sparse_scaling.models.params import parameter_counts
from sparse_scaling.reproduce.quality import ARMS

DROPOUT = 0.1  # the paper's 800M (gin_configs/models/scaling_transformer_800m.gin)
VARIANTS = ('dense', 'ff', 'ff_qkv', 'ff_qkv_loss')  # gin_configs/paper/c4_800m_<variant>.gin

# A shape: the gin file of each variant ('{}'; without it, one file and the variant's bindings
# of reproduce.quality.ARMS), the decoder's depth, the batch timed and the variants (dense first).
Shape = collections.namedtuple('Shape', 'gin_file n_layers batch length variants',
                               defaults=(VARIANTS,))
SHAPES = {
    'tiny': Shape('tiny/train_step_{}.gin', n_layers=2, batch=8, length=128),
    '800m': Shape('paper/c4_800m_{}.gin', n_layers=2, batch=8, length=512),
    'gpu': Shape('reproduce/quality_gpu.gin', n_layers=4, batch=64, length=256,
                 variants=tuple(ARMS)),
}
_MACROS = ('VOCAB_SIZE', 'D_MODEL', 'D_FF', 'N_HEADS', 'MAX_LEN', 'FF_SPARSITY',
           'ATTENTION_SPARSITY', 'LOSS_SPARSITY', 'LENGTH_KERNEL_SIZE')
# What a one-file shape's config binds of ScalingTransformerLM (attention_conv: the quality
# files' control arm, layers/conv_attention.py).
_LM_ARGS = ('vocab_size', 'd_model', 'd_ff', 'n_heads', 'max_len', 'ff_sparsity',
            'attention_sparsity', 'loss_sparsity', 'attention_conv')
FLAGS = flags.FLAGS


def dimensions(shape, variant):
  """The model macros of the variant's gin file at `shape` (the config is cleared after:
  trax's Adafactor would take the file's bindings)."""
  if '{}' in shape.gin_file:
    common.parse_gin([shape.gin_file.format(variant)])
    dims = common.macros(_MACROS)
  else:
    common.parse_gin([shape.gin_file], ARMS[variant])
    dims = {name: common.resolve(gin.query_parameter(f'ScalingTransformerLM.{name}'))
            for name in _LM_ARGS}
  gin.clear_config()
  return dims


def build_model(shape, variant, dropout):
  """The ScalingTransformerLM of one variant, in train mode: its gin file's decoder with
  `shape.n_layers` layers."""
  return ScalingTransformerLM(n_layers=shape.n_layers, dropout=dropout, mode='train',
                              **dimensions(shape, variant))


def _trainer(model, batch):
  """trax's Trainer of `model` with the LM loss and Adafactor, weights on the device."""
  model_with_loss = tl.Serial(model, tl.WeightedCategoryCrossEntropy())
  model_with_loss.init(shapes.signature(batch), rng=jax.random.PRNGKey(0))
  # Committed to the device as the step's outputs are: trax then compiles the step once.
  model_with_loss.weights, model_with_loss.state = jax.device_put(
      (model_with_loss.weights, model_with_loss.state), jax.devices()[0])
  optimizer = optimizers.Adafactor()
  optimizer.tree_init(model_with_loss.weights)
  return optimizers.Trainer(model_with_loss, optimizer, n_devices=1)


def stepper(model, batch, kernels='auto'):
  """A function that runs one trax training step of `model` on `batch`, traced (in its first
  call) and run under the Pallas kernel choice `kernels`; it returns what the step wrote."""
  trainer = _trainer(model, batch)
  rng, steps = jax.random.PRNGKey(1), itertools.count()

  def one_step():
    with decode_kernels.use(kernels):
      loss, _ = trainer.one_step(batch, rng, step=next(steps))
    return loss, trainer.accelerated_model_with_loss.weights

  return one_step


@contextlib.contextmanager
def layer_scopes():
  """Within the block, every trax layer's forward runs under `jax.named_scope(layer.name)`,
  so that the op_name of each HLO instruction names the layers it was traced in."""
  pure_fn = base.Layer.pure_fn

  def scoped(self, *args, **kwargs):
    with jax.named_scope(self.name):
      return pure_fn(self, *args, **kwargs)

  base.Layer.pure_fn = scoped
  try:
    yield
  finally:
    base.Layer.pure_fn = pure_fn


def op_label(op_name):
  """'fwd Layer/operation' or 'bwd Layer/operation' from an instruction's op_name: the
  innermost layer scope and the JAX operation; the optimizer's update has no layer."""
  backward = 'transpose(' in op_name
  parts = [re.sub(r'^(?:\w+\()+([^()]*)\)+$', r'\1', part) for part in op_name.split('/')
           if part and not part.startswith('jit(')]
  operation = parts[-1] if parts else '(no op_name)'
  layers = [p for p in parts[:-1] if re.match(r'^[A-Z]', p)]
  where = layers[-1] if layers else 'optimizer'
  return f'{"bwd" if backward else "fwd"} {where}/{operation}'


def profile_step(model, batch, n_steps):
  """Device time of one training step by (layer, operation).

  Returns dict(device_s: the kernels' time per step, kernels: their number, wall_s: the
  compiled step called alone, groups: rows sorted by seconds, each dict(label, kernels,
  seconds, bytes)). Wall far above device time is time the device waits: for the host to
  launch kernels, or for trax's Python between steps (then wall_s is near device_s).
  """
  with layer_scopes():
    trainer = _trainer(model, batch)
    trained = trainer.accelerated_model_with_loss
    # trax's own step function, jitted here so that it can be lowered and compiled apart.
    # pylint: disable=protected-access
    update = jax.jit(trainer_lib._accelerate_update_fn(
        trainer._forward_and_backward_fn, trainer.optimizer, n_devices=1, accelerate=False))
    device = jax.devices()[0]
    slots, opt_params = jax.device_put((trainer._slots, trainer._opt_params), device)
    # pylint: enable=protected-access
    rng = jax.random.PRNGKey(1)
    holder = dict(weights=(trained.weights, slots), state=trained.state)
    lowered = update.lower(holder['weights'], 0, opt_params, batch, holder['state'], rng)
  default, compiled = decode_profile.compile_for_trace(lowered)
  text = compiled.as_text()
  info = decode_profile.kernels(text)
  module = re.search(r'HloModule ([\w.\-]+)', text).group(1)

  def runner(program):
    def run():
      holder['weights'], holder['state'], stats = program(
          holder['weights'], 0, opt_params, batch, holder['state'], rng)
      return stats['loss']
    return run

  # The step as trax compiles it, called alone: wall time without trax's Python around it.
  wall, _ = timing.time_call(runner(default), min_runs=n_steps, min_seconds=0.0)
  run = runner(compiled)
  jax.block_until_ready(run())
  kernel_rows = decode_profile.attribute(
      decode_profile.kernel_times(run, n_steps, module=module), info)
  groups = decode_profile.totals(
      kernel_rows, lambda row: op_label(row['op_name']) if row['attributed'] else 'unnamed kernels')
  rows = [dict(label=label, **group) for label, group in groups.items()]
  return dict(device_s=sum(r['seconds'] for r in kernel_rows), wall_s=wall,
              kernels=sum(r['launches'] for r in kernel_rows),
              groups=sorted(rows, key=lambda r: -r['seconds']))


def print_profile(variant, profile, top, trax_step_s):
  """The `top` rows of `profile_step`'s result as a table."""
  rows, total = profile['groups'], profile['device_s']
  print(f'\n{variant}: {total * 1e3:.2f} ms of device time per step in {profile["kernels"]:.0f} '
        f'kernels; the compiled step alone {profile["wall_s"] * 1e3:.2f} ms, trax\'s step '
        f'{trax_step_s * 1e3:.2f} ms (wall). {len(rows)} (layer, operation) groups, the {top} '
        'largest:')
  print(common.table_header(['layer/operation', 'kernels', 'ms/step', 'MB/step', 'share']))
  for row in rows[:top]:
    print(common.table_row([row['label'], f'{row["kernels"]:.0f}',
                            f'{row["seconds"] * 1e3:.3f}', f'{row["bytes"] / 1e6:.1f}',
                            f'{row["seconds"] / total:.1%}']), flush=True)


def measure(name, shape, dropout=DROPOUT, profile=0, kernels=('auto',), rounds=1,
            **timing_args):
  """Yields one row per variant at `shape`: params, ms/step (median, p90), tokens/s, vs dense.

  `kernels`: the Pallas kernel choices (`layers/decode_kernels.py`) each sparse variant is
  timed under, one row each, side by side; dense runs once, under the first. `timing_args` go
  to `timing.time_call`: min_runs, min_seconds, warmup. With `rounds` > 1 every (variant,
  choice) is built and compiled first, then timed in `rounds` alternating rounds
  (`timing.interleaved_times`, min_runs steps each in all; min_seconds is not used), so that
  a shared machine's drift falls on dense and the sparse variants alike. With `profile` > 0,
  each row also carries `profile`: the device time per step and the (layer, operation) rows
  of `profile_step` over min_runs steps.
  """
  vocab_size = dimensions(shape, shape.variants[0])['vocab_size']
  tokens = np.random.RandomState(0).randint(1, vocab_size, (shape.batch, shape.length))
  tokens = tokens.astype(np.int32)                             # [batch, length]
  batch = (tokens, tokens, np.ones(tokens.shape, np.float32))  # inputs, targets, weights
  arms = [(variant, choice) for variant in shape.variants  # dense first, under one choice
          for choice in (kernels[:1] if variant == 'dense' else kernels)]
  models, seconds = {}, {}  # with rounds > 1: per row, built and timed before any is yielded
  if rounds > 1:
    # One model per row: a trainer writes its step's weights into the model it was given.
    models = {arm: build_model(shape, arm[0], dropout) for arm in arms}
    runs = -(-timing_args.get('min_runs', 20) // rounds)
    times = timing.interleaved_times([stepper(models[arm], batch, arm[1]) for arm in arms],
                                     rounds, runs, timing_args.get('warmup', 3))
    seconds = dict(zip(arms, map(timing.median_p90, times)))
  dense = None
  for variant, choice in arms:
    if rounds > 1:
      model, (median, p90) = models.pop((variant, choice)), seconds[variant, choice]
    else:
      model = build_model(shape, variant, dropout)
      median, p90 = timing.time_call(stepper(model, batch, choice), **timing_args)
    params = parameter_counts(model, shapes.signature(tokens))['total']
    dense = dense or median
    row = dict(shape=name, variant=variant, kernels=choice, params=params,
               ms_per_step=median * 1e3, p90_ms_per_step=p90 * 1e3,
               tokens_per_s=tokens.size / median, ratio_to_dense=median / dense)
    if profile:
      with decode_kernels.use(choice):
        row['profile'] = profile_step(model, batch, timing_args.get('min_runs', 20))
      row['profile']['groups'] = row['profile']['groups'][:profile]
    yield row
    del model  # freed before the next row's model is built
    gc.collect()


def define_flags():
  """Defines the command line's flags; only when run as a program (others have namesakes)."""
  common.define_flags(json_output=True, shapes=SHAPES)
  flags.DEFINE_float('dropout', DROPOUT, 'Dropout rate of every variant, in [0, 1).')
  flags.register_validator('dropout', lambda rate: 0 <= rate < 1, message='must be in [0, 1)')
  flags.DEFINE_integer('steps', 20, 'Timed steps per variant, at least.', lower_bound=1)
  flags.DEFINE_list('variants', None, "Variants to time (default: the shape's all; dense "
                    'always runs first, as the reference).')
  flags.DEFINE_list('kernels', ['auto'], 'Pallas kernel choices (layers/decode_kernels.py: '
                    f'{", ".join(decode_kernels.CHOICES)}) to time each sparse variant under, '
                    'side by side.')
  flags.DEFINE_integer('rounds', 1, 'If > 1: compile every variant first, then time their '
                       '--steps steps in this many alternating rounds.', lower_bound=1)
  flags.DEFINE_integer('profile', 0, 'If > 0: also trace --steps steps of each variant and '
                       'print the PROFILE (layer, operation) pairs that take the most device '
                       'time.', lower_bound=0)


def main(argv):
  del argv
  unknown = set(FLAGS.kernels) - set(decode_kernels.CHOICES)
  if unknown or not FLAGS.kernels:
    raise app.UsageError(f'--kernels: {sorted(unknown)} must be among {list(decode_kernels.CHOICES)}')
  rows = []
  for name in (FLAGS.shapes or list(SHAPES)):
    shape = SHAPES[name]
    if FLAGS.variants:
      unknown = set(FLAGS.variants) - set(shape.variants)
      if unknown:
        raise app.UsageError(f'--variants: {sorted(unknown)} must be among {list(shape.variants)} '
                             f'at shape {name}')
      shape = shape._replace(variants=tuple(v for v in shape.variants
                                            if v == 'dense' or v in FLAGS.variants))
    dims = dimensions(shape, shape.variants[0])
    print(f'# Training step, {name} ScalingTransformerLM ({shape.n_layers} layers, d_model '
          f'{dims["d_model"]}, vocab {dims["vocab_size"]}), batch {shape.batch} x length '
          f'{shape.length}, float32, dropout {FLAGS.dropout}, Adafactor: '
          f'{timing.machine_description()}')
    print(common.table_header(['variant', 'params', 'ms/step', 'p90 ms', 'tokens/s',
                               'vs dense (goal <= 1.25x)']))
    for row in measure(name, shape, FLAGS.dropout, FLAGS.profile, FLAGS.kernels, FLAGS.rounds,
                       min_runs=FLAGS.steps):
      label = row['variant'] + (f' [{row["kernels"]}]' if len(FLAGS.kernels) > 1 else '')
      print(common.table_row([label, f'{row["params"] / 1e6:.1f}M',
                              f'{row["ms_per_step"]:.1f}', f'{row["p90_ms_per_step"]:.1f}',
                              f'{row["tokens_per_s"]:,.0f}', f'{row["ratio_to_dense"]:.2f}x']),
            flush=True)
      rows.append(row)
      if 'profile' in row:
        print_profile(label, row['profile'], FLAGS.profile, row['ms_per_step'] / 1e3)
    print()
  if FLAGS.json:
    print(json.dumps(rows))


if __name__ == '__main__':
  common.run(main, define_flags)
