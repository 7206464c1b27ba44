"""The compiled decoder: equal to trax's autoregressive sampling, EOS, sampling, errors."""

import functools

import jax
import numpy as np
import pytest
from trax import shapes
from trax.supervised import decoding as trax_decoding

from sparse_scaling.decoding import Decoder
from sparse_scaling.models import ScalingTransformer
from sparse_scaling.models import ScalingTransformerLM
from sparse_scaling.models import Terraformer

TINY = dict(vocab_size=32, d_model=16, d_ff=64, n_layers=2, n_heads=2, max_len=32, dropout=0.0,
            ff_sparsity=8)


@pytest.fixture(scope='module')
def model_and_weights():
  model_fn = functools.partial(ScalingTransformerLM, **TINY)
  model = model_fn(mode='eval')
  model.init(shapes.ShapeDtype((1, 8), np.int32), rng=jax.random.PRNGKey(0))
  return model_fn, model.weights


def test_greedy_equals_trax_autoregressive_sample(model_and_weights):
  model_fn, weights = model_and_weights
  prompt = np.array([[5, 6, 7], [9, 3, 2]], np.int32)
  ours = Decoder(model_fn, weights).generate(prompt, max_new_tokens=12)
  trax_model = model_fn(mode='predict')
  trax_model.init(shapes.signature(prompt))
  trax_model.weights = weights
  theirs = trax_decoding.autoregressive_sample(
      trax_model, inputs=prompt, batch_size=2, temperature=0.0, eos_id=-1, max_length=12)
  np.testing.assert_array_equal(ours, theirs)


def _greedy_by_the_eval_model(model_fn, weights, prompt, max_new_tokens):
  """Greedy continuation without caches: the eval-mode model run on the whole sequence."""
  model = model_fn(mode='eval')
  model.init(shapes.ShapeDtype((1, 8), np.int32))
  forward = jax.jit(lambda tokens: model.pure_fn(tokens, weights, model.state, None)[0])
  start, length = prompt.shape[1], prompt.shape[1] + max_new_tokens
  tokens = np.zeros((prompt.shape[0], length), np.int32)
  tokens[:, :start] = prompt
  for i in range(start, length):
    # Causal and shifted right inside: position i sees the start token and tokens[:, :i] only.
    tokens[:, i] = np.argmax(forward(tokens)[:, i], axis=-1)
  return tokens[:, start:]


def test_greedy_from_an_empty_prompt_equals_argmax_of_the_eval_model(model_and_weights):
  # From the start token alone; prompts are checked against trax's sampler above.
  model_fn, weights = model_and_weights
  prompt = np.zeros((2, 0), np.int32)
  tokens = Decoder(model_fn, weights).generate(prompt, max_new_tokens=8)
  assert tokens.shape == (2, 8)
  np.testing.assert_array_equal(tokens, _greedy_by_the_eval_model(model_fn, weights, prompt, 8))


def test_rows_stop_after_eos(model_and_weights):
  model_fn, weights = model_and_weights
  decoder = Decoder(model_fn, weights)
  prompt = np.array([[5, 6, 7], [9, 3, 2]], np.int32)
  free = decoder.generate(prompt, max_new_tokens=6)
  eos = int(free[0, 1])  # row 0's second token
  stopped = decoder.generate(prompt, max_new_tokens=6, eos_id=eos)
  np.testing.assert_array_equal(stopped[0, :2], free[0, :2])
  assert (stopped[0, 2:] == eos).all()
  first_eos = list(free[1]).index(eos) if eos in free[1] else 6
  np.testing.assert_array_equal(stopped[1, :first_eos], free[1, :first_eos])


def test_sampling_depends_on_the_seed_only(model_and_weights):
  model_fn, weights = model_and_weights
  decoder = Decoder(model_fn, weights)
  prompt = np.array([[5, 6, 7]], np.int32)
  a, b, c = (decoder.generate(prompt, 16, temperature=5.0, seed=s) for s in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


@pytest.mark.parametrize('kwargs, parameter', [(dict(max_new_tokens=0), 'max_new_tokens'),
                                               (dict(temperature=-1.0), 'temperature')])
def test_bad_arguments_raise_value_error(model_and_weights, kwargs, parameter):
  model_fn, weights = model_and_weights
  kwargs = dict(dict(max_new_tokens=4), **kwargs)
  with pytest.raises(ValueError, match=parameter):
    Decoder(model_fn, weights).generate(np.zeros((1, 2), np.int32), **kwargs)


ENCODER_DECODERS = {
    'scaling_transformer': functools.partial(
        ScalingTransformer, input_vocab_size=32, d_model=16, d_ff=64, n_encoder_layers=1,
        n_decoder_layers=2, n_heads=2, max_len=32, dropout=0.0, ff_sparsity=8,
        attention_sparsity=4, enc_dec_attention_sparsity=4, loss_sparsity=4),
    'terraformer': functools.partial(
        Terraformer, input_vocab_size=32, d_model=16, d_ff=64, n_encoder_layers=1,
        n_decoder_layers=1, n_heads=2, max_len=32, dropout=0.0, ff_sparsity=8,
        attention_sparsity=4, loss_sparsity=4, ff_use_sru=(1, 4)),
}


@pytest.mark.parametrize('name', sorted(ENCODER_DECODERS))
def test_encoder_decoder_greedy_equals_trax_autoregressive_sample(name):
  model_fn = ENCODER_DECODERS[name]
  inputs = np.array([[4, 5, 6, 7, 0], [8, 9, 3, 0, 0]], np.int32)
  model = model_fn(mode='eval')
  model.init(shapes.signature((inputs, inputs)), rng=jax.random.PRNGKey(0))
  ours = Decoder(model_fn, model.weights).generate(np.zeros((2, 0), np.int32), 10,
                                                   inputs=inputs)
  trax_model = model_fn(mode='predict')
  trax_model.init(shapes.signature((inputs, inputs[:, :1])))
  trax_model.weights = jax.tree.unflatten(jax.tree.structure(trax_model.weights),
                                          jax.tree.leaves(model.weights))
  theirs = trax_decoding.autoregressive_sample(
      trax_model, inputs=inputs, batch_size=2, temperature=0.0, eos_id=-1, max_length=10)
  np.testing.assert_array_equal(ours, theirs)
