"""Scaling Transformer LM and encoder-decoder: shapes, predict == eval, trax parity, errors."""

import functools
import itertools

import jax
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes
from trax.layers.research import sparsity as trax_sparsity
from trax.models.research import configurable_transformer as trax_ct

from sparse_scaling import convert
from sparse_scaling.models import ScalingTransformer
from sparse_scaling.models import ScalingTransformerLM
from tests.utils import assert_predict_equals_eval

VOCAB = 32
TINY = dict(d_model=16, d_ff=64, n_heads=2, max_len=16, dropout=0.1)
SPARSITY = [dict(ff_sparsity=ff, attention_sparsity=qkv, loss_sparsity=loss)
            for ff, qkv, loss in itertools.product([0, 8], [0, 4], [0, 4])]


def _tokens(batch=2, length=9, seed=0):
  return np.random.RandomState(seed).randint(1, VOCAB, (batch, length)).astype(np.int32)


def _lm(**kwargs):
  return functools.partial(ScalingTransformerLM, vocab_size=VOCAB, n_layers=2,
                           **dict(TINY, **kwargs))


def _enc_dec(**kwargs):
  return functools.partial(ScalingTransformer, input_vocab_size=VOCAB, n_encoder_layers=1,
                           n_decoder_layers=2, **dict(TINY, **kwargs))


@pytest.mark.parametrize('ff_sparsity', [0, 8, (8, 4)])
def test_lm_logits_have_vocab_size(ff_sparsity):
  model = _lm(ff_sparsity=ff_sparsity, attention_sparsity=4, loss_sparsity=4)(mode='train')
  tokens = _tokens()
  model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(0))
  assert model(tokens, rng=jax.random.PRNGKey(1)).shape == (2, 9, VOCAB)


@pytest.mark.parametrize('sparsity', SPARSITY, ids=lambda s: '-'.join(map(str, s.values())))
def test_lm_predict_equals_eval(sparsity):
  assert_predict_equals_eval(_lm(**sparsity), _tokens(), shifted=True)


@pytest.mark.parametrize('sparsity', SPARSITY, ids=lambda s: '-'.join(map(str, s.values())))
def test_encoder_decoder_predict_equals_eval(sparsity):
  inputs = _tokens(length=7, seed=1)
  inputs[0, 5:] = 0  # padding in the encoder input
  targets = _tokens(length=8, seed=2)
  model_fn = _enc_dec(enc_dec_attention_sparsity=sparsity['attention_sparsity'], **sparsity)
  assert_predict_equals_eval(model_fn, (inputs, targets), shifted=True, seq_input=1)


def test_encoder_decoder_output_ignores_encoder_padding():
  model = _enc_dec(ff_sparsity=8, attention_sparsity=4)(mode='eval')
  inputs, targets = _tokens(length=7), _tokens(length=5)
  model.init(shapes.signature((inputs, targets)), rng=jax.random.PRNGKey(0))
  padded = np.pad(inputs, [(0, 0), (0, 3)])
  # One jitted program for both lengths: the same outputs as `model(...)`, compiled faster
  # than eager calls at these shapes of no other test, which compile each operation apart.
  forward = jax.jit(lambda x, weights, state: model.pure_fn(x, weights, state, None)[0][0])
  logits = forward((inputs, targets), model.weights, model.state)
  logits_padded = forward((padded, targets), model.weights, model.state)
  np.testing.assert_allclose(logits, logits_padded, atol=1e-5)


@pytest.mark.parametrize('ff_sparsity, attention_sparsity, loss_sparsity',
                         [(0, 0, 0), (8, 0, 0), (8, 4, 4)])
def test_lm_matches_trax_configurable_transformer_lm(ff_sparsity, attention_sparsity,
                                                     loss_sparsity):
  tokens = _tokens()
  attention = (functools.partial(trax_sparsity.MultiplicativeConvCausalAttention,
                                 sparsity=attention_sparsity, length_kernel_size=3)
               if attention_sparsity else tl.CausalAttention)
  theirs = trax_ct.ConfigurableTransformerLM(
      VOCAB, n_layers=2, ff_sparsity=(ff_sparsity, 4) if ff_sparsity else 0,
      loss_sparsity=loss_sparsity, attention_type=attention, mode='eval', **TINY)
  theirs.init(shapes.signature(tokens), rng=jax.random.PRNGKey(5))
  ours = _lm(ff_sparsity=(ff_sparsity, 4) if ff_sparsity else 0,
             attention_sparsity=attention_sparsity, loss_sparsity=loss_sparsity)(mode='eval')
  ours.init(shapes.signature(tokens))
  convert.load_trax_weights(ours, theirs.weights)
  np.testing.assert_allclose(ours(tokens), theirs(tokens), atol=1e-4)


ENC_DEC_SETTINGS = {  # dense: one embedding shared by encoder and decoder, as trax's default
    'dense': dict(),
    'sparse_own_decoder_vocab': dict(ff_sparsity=(8, 4), attention_sparsity=4,
                                     enc_dec_attention_sparsity=4, loss_sparsity=4,
                                     output_vocab_size=VOCAB + 8),
}


@pytest.mark.parametrize('setting', sorted(ENC_DEC_SETTINGS))
def test_encoder_decoder_matches_trax_configurable_transformer(setting):
  kwargs = ENC_DEC_SETTINGS[setting]
  inputs = _tokens(length=7, seed=1)
  inputs[0, 5:] = 0  # padding in the encoder input
  targets = _tokens(length=8, seed=2)
  attention = tl.CausalAttention
  if kwargs.get('attention_sparsity'):
    attention = functools.partial(trax_sparsity.MultiplicativeConvCausalAttention,
                                  sparsity=kwargs['attention_sparsity'], length_kernel_size=3)
  theirs = trax_ct.ConfigurableTransformer(
      VOCAB, output_vocab_size=kwargs.get('output_vocab_size'), n_encoder_layers=1,
      n_decoder_layers=2, ff_sparsity=kwargs.get('ff_sparsity', 0),
      loss_sparsity=kwargs.get('loss_sparsity', 0), encoder_decoder_attention_type=attention,
      enc_dec_attention_sparsity=kwargs.get('enc_dec_attention_sparsity', 0), mode='eval',
      **TINY)
  theirs.init(shapes.signature((inputs, targets)), rng=jax.random.PRNGKey(5))
  ours = _enc_dec(**kwargs)(mode='eval')
  ours.init(shapes.signature((inputs, targets)))
  convert.load_trax_weights(ours, theirs.weights)
  np.testing.assert_allclose(ours((inputs, targets))[0], theirs((inputs, targets))[0],
                             atol=1e-4)


def test_trax_checkpoint_loads_into_our_model(tmp_path):
  tokens = _tokens()
  theirs = trax_ct.ConfigurableTransformerLM(VOCAB, n_layers=2, ff_sparsity=(8, 4),
                                             loss_sparsity=4, mode='eval', **TINY)
  theirs.init(shapes.signature(tokens), rng=jax.random.PRNGKey(5))
  path = str(tmp_path / 'model')
  theirs.save_to_file(path + '.pkl.gz', weights_only=True)
  ours = _lm(ff_sparsity=(8, 4), loss_sparsity=4)(mode='eval')
  ours.init(shapes.signature(tokens))
  convert.load_trax_checkpoint(ours, path + '.pkl.gz')
  np.testing.assert_allclose(ours(tokens), theirs(tokens), atol=1e-4)


def test_converter_rejects_a_model_of_another_configuration():
  tokens = _tokens()
  theirs = trax_ct.ConfigurableTransformerLM(VOCAB, n_layers=2, mode='eval', **TINY)
  theirs.init(shapes.signature(tokens))
  ours = _lm(ff_sparsity=8)(mode='eval')
  ours.init(shapes.signature(tokens))
  with pytest.raises(ValueError, match='configuration'):
    convert.load_trax_weights(ours, theirs.weights)


@pytest.mark.parametrize('make, parameter', [
    (lambda: _lm(n_heads=3)(), 'n_heads'),
    (lambda: _lm(attention_sparsity=3)(), 'attention_sparsity'),
    (lambda: _lm(loss_sparsity=5)(), 'loss_sparsity'),
    (lambda: _lm(ff_sparsity=7)(), 'd_ff'),
    (lambda: _lm()(mode='decode'), 'mode'),
    (lambda: _enc_dec(enc_dec_attention_sparsity=5)(), 'enc_dec_attention_sparsity'),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(make, parameter):
  with pytest.raises(ValueError, match=parameter):
    make()
