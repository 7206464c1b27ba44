"""Terraformer: shapes, predict == eval, trax parity, reversible gradients, errors."""

import functools
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes
from trax.layers.research import efficient_attention
from trax.layers.research import sparsity as trax_sparsity
from trax.models.research import terraformer as trax_terraformer

from sparse_scaling import convert
from sparse_scaling.layers import terraformer_blocks
from sparse_scaling.models import Terraformer
from tests.utils import assert_predict_equals_eval
from tests.utils import random_inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 48
TINY = dict(d_model=32, d_ff=64, n_heads=4, max_len=32, dropout=0.0)
SETTINGS = {
    'dense': dict(),
    'sparse': dict(ff_sparsity=(4, 16), attention_sparsity=4, loss_sparsity=2,
                   ff_use_sru=(1, 8)),
    'averaged_encoder': dict(ff_use_sru=2, reversible_encoder=False),
}


def _model(**kwargs):
  return functools.partial(Terraformer, VOCAB, n_encoder_layers=1, n_decoder_layers=2,
                           **dict(TINY, **kwargs))


def _tokens(lengths=(6, 9), length=9, seed=0):
  """Encoder ids [len(lengths), length], padded with 0 after each row's true length."""
  tokens = np.random.RandomState(seed).randint(1, VOCAB, (len(lengths), length))
  tokens[np.arange(length)[None, :] >= np.array(lengths)[:, None]] = 0
  return tokens.astype(np.int32)


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_logits_have_decoder_length_and_vocab(mode):
  model = _model(**SETTINGS['sparse'])(mode=mode)
  inputs, targets = _tokens(), _tokens((7, 7), 7, seed=1)
  model.init(shapes.signature((inputs, targets)), rng=jax.random.PRNGKey(0))
  logits, passed = model((inputs, targets), rng=jax.random.PRNGKey(1))
  assert logits.shape == (2, 7, VOCAB)
  np.testing.assert_array_equal(passed, targets)


def test_output_ignores_encoder_padding():
  model = _model(**SETTINGS['sparse'])(mode='eval')
  inputs, targets = _tokens((6, 6), 6), _tokens((5, 5), 5, seed=1)
  padded = np.pad(inputs, [(0, 0), (0, 4)])
  model.init(shapes.signature((padded, targets)), rng=jax.random.PRNGKey(0))
  # One jitted program for both lengths: the same outputs as `model(...)`, compiled in a few
  # seconds where eager calls at these shapes of no other test compile each operation apart
  # (~20 s on 2 CPU cores).
  forward = jax.jit(lambda x, weights, state: model.pure_fn(x, weights, state, None)[0][0])
  np.testing.assert_allclose(forward((inputs, targets), model.weights, model.state),
                             forward((padded, targets), model.weights, model.state), atol=1e-5)


# A prompt of 3 tokens in the first predict call for the dense and sparse settings. The
# averaged_encoder setting's with -m slow: its encoder is fed whole at every step (the prompt's
# length does not reach it), and its decoder's SRU beside the FF (2 layers) is also in the
# sparse setting's decoder (1 layer), which takes a prompt of 3 by default.
@pytest.mark.parametrize('setting, init_tokens', [
    (setting, init_tokens) if (setting, init_tokens) != ('averaged_encoder', 3) else
    pytest.param(setting, init_tokens, marks=pytest.mark.slow)
    for setting in sorted(SETTINGS) for init_tokens in (1, 3)])
def test_predict_equals_eval_for_a_batch_of_different_lengths(setting, init_tokens):
  inputs, targets = _tokens(), _tokens((7, 7), 7, seed=1)
  assert_predict_equals_eval(_model(**SETTINGS[setting]), (inputs, targets),
                             init_tokens=init_tokens, shifted=True, seq_input=1)


@pytest.mark.parametrize('setting', sorted(SETTINGS))
def test_eval_matches_trax_configurable_terraformer(setting):
  kwargs = SETTINGS[setting]
  inputs, targets = _tokens(), _tokens((7, 7), 7, seed=1)
  attention = tl.CausalAttention
  if kwargs.get('attention_sparsity'):
    attention = functools.partial(trax_sparsity.MultiplicativeConvCausalAttention,
                                  sparsity=kwargs['attention_sparsity'], length_kernel_size=3)
  theirs = trax_terraformer.ConfigurableTerraformer(
      VOCAB, n_encoder_layers=1, n_decoder_layers=2, encoder_attention_type=tl.Attention,
      encoder_decoder_attention_type=attention, pos_type=None,
      ff_sparsity=kwargs.get('ff_sparsity', 0), loss_sparsity=kwargs.get('loss_sparsity', 0),
      ff_use_sru=kwargs.get('ff_use_sru', 0),
      reversible_encoder=kwargs.get('reversible_encoder', True), mode='eval', **TINY)
  theirs.init(shapes.signature((inputs, targets)), rng=jax.random.PRNGKey(3))
  ours = _model(**kwargs)(mode='eval')
  ours.init(shapes.signature((inputs, targets)))
  convert.load_trax_weights(ours, theirs.weights)
  np.testing.assert_allclose(ours((inputs, targets))[0], theirs((inputs, targets))[0],
                             atol=1e-5)


@pytest.mark.parametrize('block', ['encoder', 'decoder'])
def test_reversible_gradients_equal_autodiff(block):
  # The memory-efficient trainer's path: reverse_and_grad recomputes inputs from outputs.
  if block == 'encoder':
    blocks = [terraformer_blocks.EncoderBlock(32, 64, 4, ff_sparsity=(4, 8),
                                              ff_use_sru=(1, 8)) for _ in range(2)]
  else:
    blocks = [terraformer_blocks.DecoderBlock(32, 64, 4, attention_sparsity=4,
                                              ff_sparsity=(4, 8), ff_use_sru=(1, 8))
              for _ in range(2)]
  layer = tl.ReversibleSerial(blocks)
  x1, x2 = random_inputs(2, 10, 32, seed=1), random_inputs(2, 10, 32, seed=2)
  mask = np.ones((2, 10), np.float32)
  mask[0, 7:] = 0
  inputs = (x1, x2, mask)
  weights, state = layer.init(shapes.signature(inputs), rng=jax.random.PRNGKey(0))
  rng = jax.random.PRNGKey(4)
  grad_out = (random_inputs(2, 10, 32, seed=5), random_inputs(2, 10, 32, seed=6),
              np.zeros_like(mask))
  outputs, vjp, new_state = jax.vjp(lambda x, w: layer.pure_fn(x, w, state, rng), inputs,
                                    weights, has_aux=True)
  grad_inputs, grad_weights = vjp(grad_out)
  reconstructed, (rev_grad_inputs, rev_grad_weights) = layer.reverse_and_grad(
      outputs, grad_out, weights, state, new_state, rng)
  for ours, expected in [(reconstructed, inputs), (rev_grad_inputs[:2], grad_inputs[:2]),
                         (rev_grad_weights, grad_weights)]:
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, atol=1e-4)


def _layers(layer, cls):
  """`layer` and its sublayers, at any depth, that are instances of `cls`."""
  found = [layer] if isinstance(layer, cls) else []
  return found + [l for sub in layer.sublayers for l in _layers(sub, cls)]


def test_lsh_attention_trains_on_long_inputs():
  # Encoder 256 and decoder 128 tokens: LSH chunks of 128, so attention spans chunks.
  model = functools.partial(Terraformer, VOCAB, n_encoder_layers=1, n_decoder_layers=1,
                            encoder_attention_type='lsh', decoder_attention_type='lsh',
                            ff_sparsity=4, **dict(TINY, max_len=512))(mode='train')
  inputs, targets = _tokens((200, 256), 256), _tokens((128, 128), 128, seed=1)
  batch = (inputs, targets, (targets > 0).astype(np.float32))
  model_with_loss = tl.Serial(model, tl.WeightedCategoryCrossEntropy())
  model_with_loss.init(shapes.signature(batch), rng=jax.random.PRNGKey(0))
  lsh = _layers(model_with_loss, efficient_attention.LSHSelfAttention)
  assert len(lsh) == 3  # one in the encoder block, two in the decoder block
  before = [jax.tree.map(np.array, layer.weights) for layer in lsh]
  state, rng = model_with_loss.state, jax.random.PRNGKey(1)  # the same LSH hashes and noise
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda weights: model_with_loss.pure_fn(batch, weights, state, rng)[0]))
  loss, grads = loss_and_grad(model_with_loss.weights)
  assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  model_with_loss.weights = jax.tree.map(lambda w, g: w - 0.1 * g, model_with_loss.weights,
                                         grads)  # one step of gradient descent
  assert loss_and_grad(model_with_loss.weights)[0] < loss
  for layer, old in zip(lsh, before):  # the gradient reached every LSH attention's weights
    for new_w, old_w in zip(jax.tree.leaves(layer.weights), jax.tree.leaves(old)):
      assert not np.allclose(new_w, old_w)


@pytest.mark.parametrize('kwargs, parameter', [
    (dict(n_heads=5), 'n_heads'),
    (dict(encoder_attention_type='sparse'), 'encoder_attention_type'),
    (dict(attention_sparsity=5), 'attention_sparsity'),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(kwargs, parameter):
  with pytest.raises(ValueError, match=parameter):
    _model(**kwargs)(mode='train')


@pytest.mark.parametrize('kwargs, lengths, message', [
    (dict(encoder_attention_type='lsh'), (200, 128),
     "inputs: chunked and LSH attention read chunks of 128 positions, so the encoder's length "
     'must be a multiple of 128, got 200'),
    (dict(decoder_attention_type='chunked'), (128, 100),
     "targets: chunked and LSH attention read chunks of 128 positions, so the encoder's and the "
     "decoder's lengths together must be a multiple of 128, got 228"),
])
def test_lengths_that_fill_no_whole_chunks_are_refused_naming_them(kwargs, lengths, message):
  """Chunked and LSH attention read chunks of 128 positions (trax's layers failed to reshape
  otherwise): the encoder's inputs, and where the decoder's attention is one of them, the
  packed [encoder; decoder]. Sparse QKV in the decoder takes any length."""
  signature = tuple(shapes.ShapeDtype((1, length), np.int32) for length in lengths)
  kwargs = dict(kwargs, max_len=512)
  with pytest.raises(tl.LayerError) as info:
    _model(**kwargs)(mode='train').init(signature)
  assert re.findall(r'^ValueError: (.*)$', str(info.value), flags=re.MULTILINE)[-1] == message
  if 'decoder_attention_type' in kwargs:
    _model(**dict(kwargs, attention_sparsity=4))(mode='train').init(signature)


def test_lsh_decoder_cannot_predict():
  with pytest.raises(ValueError, match="attention_type='lsh'"):
    _model(decoder_attention_type='lsh')(mode='predict')


# 800 steps (~2 minutes on 2 CPU cores): slow. By default the notebook's test trains the same
# gin file for a few steps and decodes from it (tests/test_notebook.py).
@pytest.mark.slow
def test_copy_task_learns_to_copy_through_main(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / 'main.py'), '--gin_file=tiny/terraformer_copy.gin',
       f'--output_dir={tmp_path / "copy"}'], cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  accuracies = [float(line.split('|')[-1]) for line in result.stdout.splitlines()
                if 'eval' in line and 'accuracy' in line]
  assert accuracies and accuracies[-1] > 0.9, result.stdout[-2000:]


def test_encoder_and_decoder_layers_compile_apart_in_the_memory_efficient_trainer():
  # trax's ReversibleSerialTrainer caches compiled layers by repr; causal and bidirectional LSH
  # layers print alike, so the half-residuals must not.
  encoder = terraformer_blocks.EncoderBlock(32, 64, 4, 'lsh')
  decoder = terraformer_blocks.DecoderBlock(32, 64, 4, 'lsh', n_attention_layers=1)
  assert repr(encoder[0][0]) != repr(decoder[0][0])
