"""What a TPU runs, lowered for one on any machine: the compiled decoder's generations and a
training step's gradients take XLA's ops there (no GPU kernel, no GPU compiler option), and
every op of them lowers for a TPU. Compiling them needs a TPU's compiler (libtpu), which the
suite does not install; `python -m sparse_scaling.bench.compile_only --tpu v5e` compiles
Table 1's blocks with it where it is (tests/test_bench_compile_only.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax import shapes

from sparse_scaling import decoding
from sparse_scaling.decoding import Decoder
from sparse_scaling.models import ScalingTransformerLM
from tests.utils import ENCODER_DECODERS
from tests.utils import ENCODER_INPUTS

MODELS = {
    'lm': functools.partial(
        ScalingTransformerLM, vocab_size=32, d_model=32, d_ff=64, n_layers=2, n_heads=2,
        max_len=32, dropout=0.0, ff_sparsity=8, attention_sparsity=4, loss_sparsity=4),
    **ENCODER_DECODERS,
}
# A kernel in a lowered program: Pallas' Triton and Mosaic GPU calls, and Mosaic TPU's.
KERNELS = ('triton', 'mosaic_gpu', 'tpu_custom_call')


def _lowered_for_a_tpu(fn, *args):
  """The text of jit(fn)(*args) lowered for a TPU (no TPU needed)."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=('tpu',)).as_text()


def _signature(name):
  tokens = shapes.ShapeDtype((2, 8), jnp.int32)
  return tokens if name == 'lm' else (shapes.signature(ENCODER_INPUTS), tokens)


def _generation(name, dtype, backend, monkeypatch):
  """(jaxpr text, text lowered for a TPU or None) of a greedy generation of MODELS[name] in
  `dtype`, traced as on `backend` (what `jax.default_backend()` answers); lowered where that
  is 'tpu', its compiler options then checked to be XLA's defaults."""
  model_fn = MODELS[name]
  weights = model_fn().init(_signature(name), rng=jax.random.PRNGKey(0))[0]
  programs = []

  def jit(fn, weights=None, loops=True, **kwargs):
    assert not kwargs   # the Decoder passes none: the helper lowers fn as it is
    def trace(*args):
      lowered = None
      if backend == 'tpu':
        assert decoding.compiler_options(weights, loops) is None
        lowered = _lowered_for_a_tpu(fn, *args)
      programs.append((str(jax.make_jaxpr(fn)(*args)), lowered))
      return np.zeros((2, 4), np.int32)
    return trace

  monkeypatch.setattr(decoding, 'jit', jit)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  inputs = None if name == 'lm' else ENCODER_INPUTS
  Decoder(model_fn, weights, dtype=dtype).generate(np.array([[1, 2], [3, 4]], np.int32), 4,
                                                   inputs=inputs)
  assert len(programs) == 1
  return programs[0]


@pytest.mark.parametrize('dtype', [None, 'bfloat16'])
@pytest.mark.parametrize('name', sorted(MODELS))
def test_a_generation_lowers_for_a_tpu_through_xlas_ops(name, dtype, monkeypatch):
  jaxpr, text = _generation(name, dtype, 'tpu', monkeypatch)
  assert 'pallas_call' not in jaxpr
  assert 'stablehlo.while' in text                    # the loop over tokens, on the device
  assert not [kernel for kernel in KERNELS if kernel in text]
  if dtype:
    assert 'bf16' in text


def test_the_lm_traced_as_on_a_gpu_holds_its_kernels(monkeypatch):
  """The check above can fail: traced as on a GPU, the same LM's generation holds the fused
  blocks' Pallas kernels (Triton's, which do not lower for a TPU)."""
  assert 'pallas_call' in _generation('lm', None, 'gpu', monkeypatch)[0]


@pytest.mark.parametrize('name', sorted(MODELS))
def test_a_training_steps_gradients_lower_for_a_tpu(name, monkeypatch):
  """The loss and its gradients (Terraformer: through its reversible layers' own backward)
  of a batch, as a training step computes them."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  model = MODELS[name](mode='train')
  weights, state = model.init(_signature(name), rng=jax.random.PRNGKey(0))
  targets = jnp.ones((2, 8), jnp.int32)
  batch = targets if name == 'lm' else (jnp.asarray(ENCODER_INPUTS), targets)

  def loss(w):
    out, _ = model.pure_fn(batch, w, state, jax.random.PRNGKey(1))
    logits = out if name == 'lm' else out[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  text = _lowered_for_a_tpu(jax.value_and_grad(loss), weights)
  assert not [kernel for kernel in KERNELS if kernel in text]
