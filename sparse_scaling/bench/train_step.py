"""Training-step time of the Scaling Transformer LM: dense vs Sparse FF, +QKV, +loss.

The variants are the 800M rows of Table 1 at equal parameters (gin_configs/paper/
c4_800m_<variant>.gin: N=64, S=16, loss 4, d_ff 6144 with Sparse QKV), as a 2-layer
decoder-only LM, and a tiny twin (gin_configs/tiny/lm.gin's model). Only ff_qkv_loss has
fewer weights: the paper keeps its d_ff, and the multiplicative output layer is smaller.

A step is trax's own: `optimizers.Trainer.one_step`, which `training.Loop` runs, on
tl.Serial(model in train mode, WeightedCategoryCrossEntropy) with Adafactor (trax's defaults:
factored, no momentum), float32; the data pipeline and learning-rate schedule are left out.
Each variant is warmed up (compilation included), then timed as the median and p90 of at
least --steps steps, each blocked until ready. The issue's goal: a sparse step takes <= 1.25x
the dense one. The tiny shape takes about 2 minutes on 2 CPU cores, mostly compilation.

  python -m sparse_scaling.bench.train_step [--json] [--shapes tiny,800m] [--dropout 0.1]
      [--steps 20]
"""

import collections
import gc
import itertools
import json

import jax
import numpy as np
from absl import app
from absl import flags
from trax import layers as tl
from trax import optimizers
from trax import shapes

from sparse_scaling.bench import timing
from sparse_scaling.models import ScalingTransformerLM
from sparse_scaling.models.params import parameter_counts

DROPOUT = 0.1  # the paper's 800M (gin_configs/models/scaling_transformer_800m.gin)
VARIANTS = ('dense', 'ff', 'ff_qkv', 'ff_qkv_loss')  # gin_configs/paper/c4_800m_<variant>.gin

Shape = collections.namedtuple(
    'Shape', 'vocab_size d_model n_heads n_layers max_len d_ff d_ff_qkv n s loss batch length')
SHAPES = {
    'tiny': Shape(vocab_size=4096, d_model=128, n_heads=4, n_layers=2, max_len=512, d_ff=512,
                  d_ff_qkv=768, n=16, s=4, loss=4, batch=8, length=128),
    '800m': Shape(vocab_size=32000, d_model=1024, n_heads=16, n_layers=2, max_len=2048,
                  d_ff=4096, d_ff_qkv=6144, n=64, s=16, loss=4, batch=8, length=512),
}

_DROPOUT = flags.DEFINE_float('dropout', DROPOUT, 'Dropout rate of every variant.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per variant, at least.')


def build_model(shape, variant, dropout):
  """The ScalingTransformerLM of one variant, in train mode."""
  parts = variant.split('_')
  return ScalingTransformerLM(
      vocab_size=shape.vocab_size, d_model=shape.d_model, n_layers=shape.n_layers,
      n_heads=shape.n_heads, max_len=shape.max_len, dropout=dropout,
      d_ff=shape.d_ff_qkv if 'qkv' in parts else shape.d_ff,
      ff_sparsity=shape.n if 'ff' in parts else 0,
      attention_sparsity=shape.s if 'qkv' in parts else 0,
      loss_sparsity=shape.loss if 'loss' in parts else 0, mode='train')


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
  tokens = np.random.RandomState(0).randint(1, shape.vocab_size, (shape.batch, shape.length))
  tokens = tokens.astype(np.int32)                             # [batch, length]
  batch = (tokens, tokens, np.ones(tokens.shape, np.float32))  # inputs, targets, weights
  dense = None
  for variant in VARIANTS:  # dense first
    model = build_model(shape, variant, dropout)
    params = parameter_counts(model, shapes.signature(tokens))['total']
    median, p90 = step_seconds(model, batch, **timing_args)
    dense = dense or median
    yield dict(shape=name, variant=variant, params=params, ms_per_step=median * 1e3,
               p90_ms_per_step=p90 * 1e3, tokens_per_s=tokens.size / median,
               ratio_to_dense=median / dense)
    del model  # freed before the next variant is built
    gc.collect()


def main(argv):
  del argv
  rows = []
  for name in (timing.SHAPES.value or list(SHAPES)):
    shape = SHAPES[name]
    print(f'# Training step, {name} ScalingTransformerLM ({shape.n_layers} layers, d_model '
          f'{shape.d_model}, vocab {shape.vocab_size}), batch {shape.batch} x length '
          f'{shape.length}, float32, dropout {_DROPOUT.value}, Adafactor: '
          f'{timing.machine_description()}')
    print('| variant | params | ms/step | p90 ms | tokens/s | vs dense (goal <= 1.25x) |')
    print('|---|---|---|---|---|---|')
    for row in measure(name, shape, _DROPOUT.value, min_runs=_STEPS.value):
      print(f'| {row["variant"]} | {row["params"] / 1e6:.1f}M | {row["ms_per_step"]:.1f} '
            f'| {row["p90_ms_per_step"]:.1f} | {row["tokens_per_s"]:,.0f} '
            f'| {row["ratio_to_dense"]:.2f}x |', flush=True)
      rows.append(row)
    print()
  if timing.JSON.value:
    print(json.dumps(rows))


if __name__ == '__main__':
  app.run(main)
