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
      [--steps 20]
"""

import collections
import gc
import itertools
import json

import gin
import jax
import numpy as np
from absl import flags
from trax import layers as tl
from trax import optimizers
from trax import shapes

from sparse_scaling.bench import common
from sparse_scaling.bench import timing
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


def step_seconds(model, batch, **timing_args):
  """Median and p90 seconds of one trax training step of `model` on `batch`."""
  model_with_loss = tl.Serial(model, tl.WeightedCategoryCrossEntropy())
  model_with_loss.init(shapes.signature(batch), rng=jax.random.PRNGKey(0))
  # Committed to the device as the step's outputs are: trax then compiles the step once.
  model_with_loss.weights, model_with_loss.state = jax.device_put(
      (model_with_loss.weights, model_with_loss.state), jax.devices()[0])
  optimizer = optimizers.Adafactor()
  optimizer.tree_init(model_with_loss.weights)
  trainer = optimizers.Trainer(model_with_loss, optimizer, n_devices=1)
  rng, steps = jax.random.PRNGKey(1), itertools.count()

  def one_step():
    loss, _ = trainer.one_step(batch, rng, step=next(steps))
    return loss, trainer.accelerated_model_with_loss.weights

  return timing.time_call(one_step, **timing_args)


def measure(name, shape, dropout=DROPOUT, **timing_args):
  """Yields one row per variant at `shape`: params, ms/step (median, p90), tokens/s, vs dense.

  `timing_args` go to `timing.time_call`: min_runs, min_seconds, warmup.
  """
  vocab_size = dimensions(shape, shape.variants[0])['vocab_size']
  tokens = np.random.RandomState(0).randint(1, vocab_size, (shape.batch, shape.length))
  tokens = tokens.astype(np.int32)                             # [batch, length]
  batch = (tokens, tokens, np.ones(tokens.shape, np.float32))  # inputs, targets, weights
  dense = None
  for variant in shape.variants:  # dense first
    model = build_model(shape, variant, dropout)
    params = parameter_counts(model, shapes.signature(tokens))['total']
    median, p90 = step_seconds(model, batch, **timing_args)
    dense = dense or median
    yield dict(shape=name, variant=variant, params=params, ms_per_step=median * 1e3,
               p90_ms_per_step=p90 * 1e3, tokens_per_s=tokens.size / median,
               ratio_to_dense=median / dense)
    del model  # freed before the next variant is built
    gc.collect()


def define_flags():
  """Defines the command line's flags; only when run as a program (others have namesakes)."""
  common.define_flags(json_output=True, shapes=True)
  flags.DEFINE_float('dropout', DROPOUT, 'Dropout rate of every variant.')
  flags.DEFINE_integer('steps', 20, 'Timed steps per variant, at least.')


def main(argv):
  del argv
  rows = []
  for name in (FLAGS.shapes or list(SHAPES)):
    shape = SHAPES[name]
    dims = dimensions(shape, shape.variants[0])
    print(f'# Training step, {name} ScalingTransformerLM ({shape.n_layers} layers, d_model '
          f'{dims["d_model"]}, vocab {dims["vocab_size"]}), batch {shape.batch} x length '
          f'{shape.length}, float32, dropout {FLAGS.dropout}, Adafactor: '
          f'{timing.machine_description()}')
    print(common.table_header(['variant', 'params', 'ms/step', 'p90 ms', 'tokens/s',
                               'vs dense (goal <= 1.25x)']))
    for row in measure(name, shape, FLAGS.dropout, min_runs=FLAGS.steps):
      print(common.table_row([row['variant'], f'{row["params"] / 1e6:.1f}M',
                              f'{row["ms_per_step"]:.1f}', f'{row["p90_ms_per_step"]:.1f}',
                              f'{row["tokens_per_s"]:,.0f}', f'{row["ratio_to_dense"]:.2f}x']),
            flush=True)
      rows.append(row)
    print()
  if FLAGS.json:
    print(json.dumps(rows))


if __name__ == '__main__':
  common.run(main, define_flags)
