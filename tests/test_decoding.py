"""The compiled decoder: equal to trax's autoregressive sampling, EOS, sampling options,
prompts of different lengths, errors."""

import collections
import functools
import json
import os
import subprocess
import sys
import warnings
from unittest import mock

import jax
import numpy as np
import pytest
import jax.numpy as jnp
from trax import shapes
from trax.layers.research import sparsity as trax_sparsity
from trax.models.research import configurable_transformer as trax_ct
from trax.supervised import decoding as trax_decoding

from sparse_scaling import decoding
from sparse_scaling.decoding import Decoder
from sparse_scaling.decoding import filter_logits
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import fused_residual
from sparse_scaling.layers import ModuleConv
from sparse_scaling.layers import sparse_ff
from sparse_scaling.layers import sparse_qkv
from sparse_scaling.layers import sparse_qkv_block_kernel
from sparse_scaling.layers.causal_attention import CausalAttentionCore
from sparse_scaling.models import ScalingTransformerLM

from tests.utils import ENCODER_DECODERS
from tests.utils import ENCODER_INPUTS
from tests.utils import needs_gpu

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


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="the chunks are a CPU's")
def test_sparse_ff_rows_in_chunks_decode_the_eval_models_tokens(model_and_weights, monkeypatch):
  """The whole compiled generation with Sparse FF's rows taken a chunk at a time (on a CPU
  past `sparse_ff.CPU_CHUNK_BYTES`; here 2 of the 8 blocks' rows a chunk, so a scan inside the
  generation's loop): greedy tokens equal the eval model's."""
  monkeypatch.setattr(sparse_ff, 'CPU_CHUNK_BYTES', 2 * TINY['d_model'] * 4)
  chunks, real = [], sparse_ff._cpu_chunks
  monkeypatch.setattr(sparse_ff, '_cpu_chunks', lambda *a: chunks.append(real(*a)) or chunks[-1])
  model_fn, weights = model_and_weights
  prompt = np.array([[5, 6, 7], [9, 3, 2]], np.int32)
  with decode_kernels.use('xla'):
    tokens = Decoder(model_fn, weights).generate(prompt, max_new_tokens=8)
  np.testing.assert_array_equal(tokens, _greedy_by_the_eval_model(model_fn, weights, prompt, 8))
  assert chunks and set(chunks) == {4}   # every Sparse FF call traced took 4 chunks


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


@pytest.mark.parametrize('kwargs, parameter', [
    (dict(max_new_tokens=0), 'max_new_tokens'), (dict(temperature=-1.0), 'temperature'),
    (dict(top_k=0), 'top_k'), (dict(top_p=0.0), 'top_p'), (dict(top_p=1.5), 'top_p'),
    (dict(seed=[1, 2, 3]), 'seed')])
def test_bad_arguments_raise_value_error(model_and_weights, kwargs, parameter):
  model_fn, weights = model_and_weights
  kwargs = dict(dict(max_new_tokens=4, temperature=1.0), **kwargs)
  with pytest.raises(ValueError, match=parameter) as error:
    Decoder(model_fn, weights).generate(np.zeros((1, 2), np.int32), **kwargs)
  assert '\n' not in str(error.value)


def test_a_generation_longer_than_the_model_holds_is_refused(model_and_weights):
  """A prompt and new tokens up to max_len (32) decode the eval model's tokens, the last
  position fed at the caches' and the positional encoding's last slot; one token more would
  be fed at that slot again, silently, and is refused in one line naming max_new_tokens."""
  model_fn, weights = model_and_weights
  decoder = Decoder(model_fn, weights)
  prompt = np.array([[5, 6, 7], [9, 3, 2]], np.int32)
  # The positional encoding and the two layers' KV caches.
  assert decoding.position_limits(decoder.model) == [(32, False)] * 3
  tokens = decoder.generate(prompt, 29)
  np.testing.assert_array_equal(tokens, _greedy_by_the_eval_model(model_fn, weights, prompt, 29))
  with pytest.raises(ValueError, match='max_new_tokens: .* need 33 positions; .* 32') as error:
    decoder.generate(prompt, 30)
  assert '\n' not in str(error.value)


def test_unknown_sampling_option_is_named(model_and_weights):
  model_fn, weights = model_and_weights
  with pytest.raises(TypeError, match='top_q'):
    Decoder(model_fn, weights).generate(np.zeros((1, 2), np.int32), 4, top_q=0.5)


@pytest.mark.parametrize('backend', ['cpu', 'gpu'])
def test_argmax_takes_the_lowest_index_of_the_largest_as_jnp_argmax(backend, monkeypatch):
  # On a CPU it is lax.top_k (faster there); the same indices, ties included, in every form.
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  logits = np.random.RandomState(0).randn(2, 3, 5, 7).astype(np.float32)
  logits[0, 1, 2, 4] = logits[0, 1, 2, 1] = 9.0                   # a tie: index 1 wins
  logits[1, 2, 3] = 0.5                                           # a whole row equal: 0
  for x in (logits, logits[0, 0, 0], jnp.asarray(logits, jnp.bfloat16)):
    got = decoding.argmax(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.argmax(np.asarray(x, np.float32), axis=-1))
  assert decoding.argmax(logits)[0, 1, 2] == 1 and (decoding.argmax(logits)[1, 2, 3] == 0)
  primitive = 'top_k' if backend == 'cpu' else 'argmax'
  assert primitive in str(jax.make_jaxpr(lambda x: decoding.argmax(x))(logits))   # traced anew


# Sampling options.

def test_filter_logits_keeps_the_top_k_and_the_nucleus():
  logits = np.log(np.array([[0.05, 0.5, 0.1, 0.3, 0.05]], np.float32))
  allowed = lambda **kw: set(np.flatnonzero(np.isfinite(filter_logits(logits, 1.0, **kw)[0])))
  assert allowed() == {0, 1, 2, 3, 4}
  assert allowed(top_k=1) == {1}
  assert allowed(top_k=3) == {1, 2, 3}
  assert allowed(top_p=0.45) == {1}         # the most likely token alone reaches 0.45
  assert allowed(top_p=0.7) == {1, 3}       # 0.5 before 0.3: not yet 0.7
  assert allowed(top_p=0.85) == {1, 2, 3}
  assert allowed(top_p=1e-9) == {1}
  assert allowed(top_k=2, top_p=0.99) == {1, 3}
  np.testing.assert_allclose(filter_logits(logits, 2.0)[0], logits[0] / 2)


@pytest.mark.parametrize('options', [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_equal_greedy(model_and_weights, options):
  model_fn, weights = model_and_weights
  decoder = Decoder(model_fn, weights)
  prompt = np.array([[5, 6, 7], [9, 3, 2]], np.int32)
  greedy = decoder.generate(prompt, 12)
  np.testing.assert_array_equal(decoder.generate(prompt, 12, temperature=3.0, **options),
                                greedy)


def _teacher_forced_logits(model_fn, weights, prompt, generated):
  """Eval-mode logits [batch, new, vocab] of each generated token (the model shifts right)."""
  model = model_fn(mode='eval')
  tokens = np.concatenate([prompt, generated], axis=1)
  model.init(shapes.signature(tokens))
  model.weights = weights
  return np.asarray(model(tokens))[:, prompt.shape[1]:]


# Both filters at once by default; each alone (a decoder compiled for each) with -m slow. By
# default test_top_k_1_and_tiny_top_p_equal_greedy has the decoder apply each filter alone (one
# dropped or misapplied there samples other tokens than greedy's), and
# test_filter_logits_keeps_the_top_k_and_the_nucleus checks the set each one gives.
@pytest.mark.parametrize('options', [
    pytest.param(dict(top_k=3), marks=pytest.mark.slow),
    pytest.param(dict(top_p=0.6), marks=pytest.mark.slow),
    dict(top_k=4, top_p=0.8)])
def test_samples_fall_in_the_allowed_set(model_and_weights, options):
  model_fn, weights = model_and_weights
  prompt = np.array([[5, 6, 7], [9, 3, 2], [1, 1, 4]], np.int32)
  unfiltered, filtered = (Decoder(model_fn, weights).generate(
      prompt, 16, temperature=4.0, seed=1, **kw) for kw in ({}, options))
  logits = _teacher_forced_logits(model_fn, weights, prompt, filtered)
  # The allowed set from logits recomputed in eval mode (predict == eval to 1e-5, so a
  # picked token's logit is given 1e-4 of slack).
  picked = np.take_along_axis(logits, filtered[..., None], axis=-1)
  allowed = filter_logits(np.where(np.arange(logits.shape[-1]) == filtered[..., None],
                                   picked + 1e-4, logits), 4.0, **options)
  assert np.isfinite(np.take_along_axis(np.asarray(allowed), filtered[..., None], -1)).all()
  # At temperature 4 the unfiltered samples leave the set somewhere; the filter is not a no-op.
  logits = _teacher_forced_logits(model_fn, weights, prompt, unfiltered)
  allowed = filter_logits(logits, 4.0, **options)
  assert not np.isfinite(np.take_along_axis(np.asarray(allowed), unfiltered[..., None], -1)).all()


# Prompts of different lengths.

DENSE = dict(TINY, ff_sparsity=0)
SPARSE = dict(TINY, attention_sparsity=4, loss_sparsity=4)  # Sparse FF + QKV + loss


SAMPLED = dict(temperature=1.5, top_k=8, seed=7)


# Sampled decoding of the sparse model by default (the suite's time budget): each row's own
# position, prompt length and stop go through the same code when decoding is greedy, whose
# tokens test_greedy_equals_trax_autoregressive_sample checks. The other three pairs run with
# -m slow.
@pytest.mark.parametrize('config, sampling', [
    pytest.param(DENSE, {}, id='greedy-dense', marks=pytest.mark.slow),
    pytest.param(SPARSE, SAMPLED, id='sampled-sparse_ff_qkv_loss'),
    pytest.param(DENSE, SAMPLED, id='sampled-dense', marks=pytest.mark.slow),
    pytest.param(SPARSE, {}, id='greedy-sparse_ff_qkv_loss', marks=pytest.mark.slow)])
def test_each_row_of_a_ragged_batch_equals_that_prompt_alone(config, sampling):
  model_fn = functools.partial(ScalingTransformerLM, **config)
  model = model_fn(mode='eval')
  model.init(shapes.ShapeDtype((1, 8), np.int32), rng=jax.random.PRNGKey(1))
  decoder = Decoder(model_fn, model.weights)
  prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [4, 12, 13, 2], [], [7, 7, 1, 30, 2]]
  batch = decoder.generate(prompts, 8, eos_id=5, **sampling)
  seed = sampling.pop('seed', 0)
  for r, prompt in enumerate(prompts):
    alone = decoder.generate(np.array([prompt], np.int32).reshape(1, -1), 8, eos_id=5,
                             seed=seed + r, **sampling)
    np.testing.assert_array_equal(batch[r], alone[0], err_msg=f'row {r}, prompt {prompt}')


def test_equal_length_rows_given_as_a_list_equal_the_array(model_and_weights):
  model_fn, weights = model_and_weights
  decoder = Decoder(model_fn, weights)
  prompt = [[5, 6, 7], [9, 3, 2]]
  np.testing.assert_array_equal(decoder.generate(prompt, 6, temperature=2.0),
                                decoder.generate(np.array(prompt), 6, temperature=2.0))


def test_other_prompt_lengths_reuse_the_compiled_generation(model_and_weights):
  model_fn, weights = model_and_weights
  decoder = Decoder(model_fn, weights)
  traces = []
  step = decoder._step  # pylint: disable=protected-access
  decoder._step = lambda *args: traces.append(1) or step(*args)  # pylint: disable=protected-access
  decoder.generate([[5, 6, 7, 8], [9, 3]], 6)
  n_traced = len(traces)  # prompt pass, the step before the loop, the loop body
  assert n_traced == 3
  decoder.generate([[1, 2], [4, 5, 6, 7]], 6, seed=3)  # same padded shape and shortest row
  assert len(traces) == n_traced


@pytest.mark.parametrize('name', sorted(ENCODER_DECODERS))
def test_encoder_decoder_greedy_equals_trax_autoregressive_sample(name):
  model_fn = ENCODER_DECODERS[name]
  inputs = ENCODER_INPUTS
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


def _module_convs(layer):
  """How many `ModuleConv` layers `layer` holds."""
  return isinstance(layer, ModuleConv) + sum(_module_convs(sub) for sub in layer.sublayers)


def _layouts(weights):
  return sum(isinstance(w, sparse_qkv.DecodeLayout) for w in jax.tree.leaves(
      weights, is_leaf=lambda w: isinstance(w, sparse_qkv.DecodeLayout)))


# The Scaling Transformer encoder-decoder's case (~30 s on 2 CPU cores; its decoder's
# convolutions are the LM's) with -m slow.
@pytest.mark.parametrize('name', [
    pytest.param(name, marks=pytest.mark.slow) if name == 'scaling_transformer' else name
    for name in ['lm', *sorted(ENCODER_DECODERS)]])
def test_convolutions_laid_out_once_a_generation_decode_the_same_tokens(name, monkeypatch):
  """Sparse QKV's convolution kernels laid out once a generation (`sparse_qkv.DECODE_LAYOUT`,
  a GPU's default, forced here; every `ModuleConv` is, XLA's ops taking the token), one
  product per module kernel size or with ONE_PRODUCT one: the greedy tokens of trax's
  layout, in the LM and both encoder-decoders (the Terraformer's convolutions masked over
  [encoder; decoder])."""
  model_fn = (functools.partial(ScalingTransformerLM, **dict(TINY, attention_sparsity=4))
              if name == 'lm' else ENCODER_DECODERS[name])
  inputs = ENCODER_INPUTS
  model = model_fn(mode='eval')
  model.init(shapes.signature(inputs if name == 'lm' else (inputs, inputs)),
             rng=jax.random.PRNGKey(2))
  prompt, encoder = (inputs[:, :3], None) if name == 'lm' else (inputs[:, :0], inputs)
  tokens = {}
  with decode_kernels.use('xla'):
    for layout, one_product in ((False, False), (True, False), (True, True)):
      monkeypatch.setattr(sparse_qkv, 'DECODE_LAYOUT', layout)
      monkeypatch.setattr(sparse_qkv, 'ONE_PRODUCT', one_product)
      decoder = Decoder(model_fn, model.weights)
      tokens[layout, one_product] = decoder.generate(prompt, 10, inputs=encoder)
      laid = decoding.laid_out(decoder.model, decoder.model.weights)
      assert _layouts(laid) == (_module_convs(decoder.model) if layout else 0)
  assert _module_convs(decoder.model) > 0
  np.testing.assert_array_equal(tokens[True, False], tokens[False, False])
  np.testing.assert_array_equal(tokens[True, True], tokens[False, False])


def test_a_fused_block_that_takes_the_token_keeps_its_convolutions_layout(monkeypatch):
  """`decoding.laid_out` leaves a Sparse QKV block's weights as trax's where its kernels take
  the token (they read that layout) and lays out its convolution where XLA's ops do."""
  monkeypatch.setattr(sparse_qkv, 'DECODE_LAYOUT', True)
  model_fn = functools.partial(ScalingTransformerLM, **dict(TINY, attention_sparsity=4))
  model = model_fn(mode='predict')
  weights, _ = model.init(shapes.ShapeDtype((1, 1), np.int32))
  for kernel, layouts in (('interpret', 0), ('xla', 2)):
    with decode_kernels.use(kernel):
      laid = decoding.laid_out(model, weights)
    assert _layouts(laid) == layouts
    if not layouts:
      assert all(a is b for a, b in zip(jax.tree.leaves(laid), jax.tree.leaves(weights)))


# ~25 s each on 2 CPU cores: by default prompts of 5 and 7, whose steps run both before and
# from the late position, and the encoder-decoder; the others with -m slow.
@pytest.mark.parametrize('name, lengths', [
    pytest.param('lm', (3,), marks=pytest.mark.slow), ('lm', (5, 7)),
    pytest.param('lm', (9, 11), marks=pytest.mark.slow), ('scaling_transformer', (4, 6))])
def test_tokens_from_the_late_position_on_decline_the_attention_kernels(name, lengths,
                                                                        monkeypatch):
  """Caches of 16 read in a loop (here from 8 positions in blocks of 4), LATE_POSITION 9:
  the generation's tokens at positions before 9 go through the attention blocks' kernels,
  those at 9 or after through XLA's attention, in a loop traced within
  `fused_residual.late()` (prompts of 3; of 5 and 7, the longer row forced past 9; of 9 and
  11: every step late; in the encoder-decoder, whose decoder's self-attention caches hold
  its own positions, prompts of 4 and 6 after 3 encoder inputs). Greedy tokens equal those
  of XLA's path and of the kernels throughout (LATE_POSITION None)."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'POSITIONS', 4)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'FILLED_MIN_LEN', 8)
  if name == 'lm':
    model_fn = functools.partial(ScalingTransformerLM,
                                 **dict(TINY, attention_sparsity=4, max_len=16))
    encoder, signature = None, shapes.ShapeDtype((1, 8), np.int32)
  else:
    model_fn = functools.partial(ENCODER_DECODERS[name], max_len=16)
    encoder = np.array([[4, 5, 6], [8, 9, 3]], np.int32)
    signature = shapes.signature((encoder, encoder))
  model = model_fn(mode='eval')
  model.init(signature, rng=jax.random.PRNGKey(3))
  rng = np.random.RandomState(5)
  prompt = [rng.randint(1, TINY['vocab_size'], n).tolist() for n in lengths]
  steps = collections.defaultdict(set)   # (path, within late()) -> cache positions run

  def spy(where, wrapped):
    def call(*args, **kwargs):
      if where == 'kernels':   # decode_step(x, norm, mixed, conv, state, k, v, index, ...)
        index = args[7]
      elif args[0]._mode == 'predict' and args[1][0].shape[1] == 1:   # forward((q, k, v))
        index = args[0].state[2]
      else:
        return wrapped(*args, **kwargs)
      key = (where, fused_residual.is_late())
      jax.debug.callback(lambda i: steps[key].add(int(i)), index)
      return wrapped(*args, **kwargs)
    return call

  monkeypatch.setattr(sparse_qkv_block_kernel, 'decode_step',
                      spy('kernels', sparse_qkv_block_kernel.decode_step))
  monkeypatch.setattr(CausalAttentionCore, 'forward', spy('xla', CausalAttentionCore.forward))
  first, last = min(lengths) + 1, 15   # the one-token steps' positions (after the start token)
  tokens = {}
  for kernel, late, expected in (
      ('xla', 9, {('xla', False): range(first, last)}),
      ('interpret', None, {('kernels', False): range(first, last)}),
      ('interpret', 9, {('kernels', False): range(first, 9),
                        ('xla', True): range(max(first, 9), last)})):
    monkeypatch.setattr(sparse_qkv_block_kernel, 'LATE_POSITION', late)
    steps.clear()
    with decode_kernels.use(kernel):
      decoder = Decoder(model_fn, model.weights)
      assert fused_residual.late_position(decoder.model) == (late if kernel != 'xla' else None)
      tokens[kernel, late] = decoder.generate(prompt, last - max(lengths), inputs=encoder)
    assert dict(steps) == {key: set(r) for key, r in expected.items() if r}
  np.testing.assert_array_equal(tokens['interpret', None], tokens['xla', 9])
  np.testing.assert_array_equal(tokens['interpret', 9], tokens['xla', 9])


def test_the_late_position_needs_caches_read_in_a_loop_that_reach_it(monkeypatch):
  """`sparse_qkv_block_kernel.late_position`: LATE_POSITION where the caches are read in a
  loop (FILLED_MIN_LEN) and hold positions past it; None otherwise, or with it None."""
  late_position = sparse_qkv_block_kernel.late_position
  monkeypatch.setattr(sparse_qkv_block_kernel, 'LATE_POSITION', 768)
  assert late_position(2048) == 768
  assert late_position(768) is None   # no position past it
  assert late_position(168) is None   # Table 1's caches, every block loaded first
  monkeypatch.setattr(sparse_qkv_block_kernel, 'LATE_POSITION', None)
  assert late_position(2048) is None


@pytest.mark.parametrize('name, longest', [('scaling_transformer', 32),
                                           ('terraformer', 32 - 5)])
def test_encoder_decoders_refuse_generations_longer_than_they_hold(name, longest):
  """max_len 32: the encoder-decoder with cross-attention decodes 32 tokens after 5 inputs;
  the Terraformer's decoder caches hold [encoder; decoder], so 27 (its packed first call
  writes the 5 inputs' positions, the start token's after them). One more is refused, the
  Terraformer's error counting the encoder's positions."""
  model_fn = ENCODER_DECODERS[name]
  inputs = ENCODER_INPUTS
  model = model_fn(mode='eval')
  model.init(shapes.signature((inputs, inputs)), rng=jax.random.PRNGKey(0))
  decoder = Decoder(model_fn, model.weights)
  prompt = np.zeros((2, 0), np.int32)
  assert decoder.generate(prompt, longest, inputs=inputs).shape == (2, longest)
  needed = longest + 1 + (5 if name == 'terraformer' else 0)
  with pytest.raises(ValueError, match=f'max_new_tokens: .* need {needed} positions') as error:
    decoder.generate(prompt, longest + 1, inputs=inputs)
  assert ("after the encoder's 5 inputs" in str(error.value)) == (name == 'terraformer')


@pytest.mark.parametrize('name', ['lm', *sorted(ENCODER_DECODERS)])
def test_the_first_state_is_the_inits_without_making_its_weights(name):
  """`init_state` gives the state that the predict model's init gives, leaf by leaf, and
  compiles to a program that makes the state only: the weights that init draws (here an
  output layer of 16 MB) are left out by XLA. The model's rng is what it was."""
  if name == 'lm':
    model_fn = functools.partial(ScalingTransformerLM, **dict(TINY, vocab_size=8192,
                                                              d_model=512, attention_sparsity=4))
    signature = shapes.ShapeDtype((2, 1), np.int32)
  else:
    model_fn = ENCODER_DECODERS[name]
    signature = (shapes.ShapeDtype((2, 5), np.int32), shapes.ShapeDtype((2, 1), np.int32))
  model = model_fn(mode='predict')
  rng = model.rng
  state = decoding.init_state(model, signature)
  np.testing.assert_array_equal(model.rng, rng)
  weights, theirs = model_fn(mode='predict').init(signature, use_cache=False)
  assert jax.tree.structure(state) == jax.tree.structure(theirs)
  for ours, expected in zip(jax.tree.leaves(state), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(ours, expected)
  made = decoding.state_program(model_fn(mode='predict'), signature).lower().compile()
  memory = made.memory_analysis()
  state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  weight_bytes = sum(w.nbytes for w in jax.tree.leaves(weights))
  assert memory.output_size_in_bytes <= state_bytes + 1024
  assert memory.temp_size_in_bytes < weight_bytes / 10


# A JAX without Pallas' Triton backend (jax 0.11 deprecates it): its modules fail to import.
_WITHOUT_TRITON = """
import importlib.abc, json, sys
class Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.startswith(('jax._src.lib.triton', 'jax._src.pallas.triton',
                        'jax.experimental.pallas.triton')):
      raise ImportError(f'No module named {name!r}')
sys.meta_path.insert(0, Absent())
import functools
import jax, numpy as np
from trax import shapes
from sparse_scaling.decoding import Decoder
from sparse_scaling.layers import decode_kernels
from sparse_scaling.models import ScalingTransformerLM
model_fn = functools.partial(ScalingTransformerLM, **json.loads(sys.argv[1]))
model = model_fn(mode='eval')
model.init(shapes.ShapeDtype((1, 8), np.int32), rng=jax.random.PRNGKey(0))
cpu, jax.default_backend = jax.default_backend, lambda: 'gpu'
auto_on_a_gpu = sorted({decode_kernels.active(k) for k in decode_kernels.KERNELS})
jax.default_backend = cpu
try:
  with decode_kernels.use('pallas'):
    pass
except ValueError as e:
  refused = str(e)
try:
  decode_kernels.triton_params(4)
except RuntimeError as e:
  direct = str(e)
tokens = Decoder(model_fn, model.weights).generate(np.array([[1, 2, 3]], np.int32), 8)
print(json.dumps(dict(auto_on_a_gpu=auto_on_a_gpu, refused=refused, direct=direct,
                      tokens=np.asarray(tokens).tolist())))
"""


def test_a_jax_without_pallas_triton_backend_decodes_through_xlas_ops(model_and_weights):
  out = subprocess.run([sys.executable, '-c', _WITHOUT_TRITON, json.dumps(TINY)],
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  child = json.loads(out.stdout.splitlines()[-1])
  assert child['auto_on_a_gpu'] == ['xla']
  # Said once, not once per kernel.
  assert out.stderr.count('Decoding on a GPU through XLA\'s ops') == 1, out.stderr[-2000:]
  assert child['refused'].startswith("decode kernel 'pallas': this JAX (")
  assert "has no Pallas Triton backend (No module named 'jax._src" in child['refused']
  # A kernel called directly, bypassing `use`, stops in one line too.
  assert child['direct'].startswith('the Pallas decoding kernels need Triton: this JAX (')
  model_fn, weights = model_and_weights
  ours = Decoder(model_fn, weights).generate(np.array([[1, 2, 3]], np.int32), 8)
  np.testing.assert_array_equal(child['tokens'], ours)


def test_model_whose_state_changes_shape_after_the_prompt_decodes_as_trax():
  # trax's MultiplicativeConvCausalAttention keeps the inputs of its last call as state
  # (and renames its cache dict after the first call): the state after the prompt pass
  # differs from the state after a step.
  attention = functools.partial(trax_sparsity.MultiplicativeConvCausalAttention, sparsity=4,
                                length_kernel_size=3, max_inference_length=32)
  model_fn = functools.partial(trax_ct.ConfigurableTransformerLM, 32, d_model=16, d_ff=32,
                               n_layers=1, n_heads=2, max_len=32, dropout=0.0,
                               attention_type=attention)
  model = model_fn(mode='eval')
  model.init(shapes.ShapeDtype((1, 8), np.int32), rng=jax.random.PRNGKey(0))
  prompt = np.array([[5, 6, 7, 8]], np.int32)
  ours = Decoder(model_fn, model.weights).generate(prompt, max_new_tokens=6)
  trax_model = model_fn(mode='predict')
  trax_model.init(shapes.signature(prompt))
  trax_model.weights = jax.tree.unflatten(jax.tree.structure(trax_model.weights),
                                          jax.tree.leaves(model.weights))
  theirs = trax_decoding.autoregressive_sample(
      trax_model, inputs=prompt, batch_size=1, temperature=0.0, eos_id=-1, max_length=6)
  np.testing.assert_array_equal(ours, theirs)
  # trax's reference model (Table 1's trax column) is held to its max_len through its
  # positional encoding.
  with pytest.raises(ValueError, match='need 33 positions; the model holds 32'):
    Decoder(model_fn, model.weights).generate(prompt, max_new_tokens=29)


def _trained_on_a_cycle(model_fn, steps=150, period=7):
  """Weights of `model_fn` fitted (Adam, in process) to the token cycle 1, 2, ..., period."""
  tokens = jnp.asarray((np.arange(24) % period + 1)[None].repeat(4, 0), jnp.int32)
  model = model_fn(mode='eval')
  weights, state = model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(0))

  def loss(w):
    logits, _ = model.pure_fn(tokens, w, state, None)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

  @jax.jit
  def step(w, m, v, i):
    g = jax.grad(loss)(w)
    m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
    v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
    lr = 0.01 / (1 - 0.9 ** i) * jnp.sqrt(1 - 0.999 ** i)
    return jax.tree.map(lambda w, m, v: w - lr * m / (jnp.sqrt(v) + 1e-8), w, m, v), m, v

  zeros = jax.tree.map(jnp.zeros_like, weights)
  m, v = zeros, zeros
  for i in range(1, steps + 1):
    weights, m, v = step(weights, m, v, i)
  assert float(loss(weights)) < 0.5  # it learned the cycle
  return weights


@pytest.fixture(scope='module')
def trained_on_a_cycle():
  """(model_fn, weights): the sparse LM below fitted to a cycle, once for both kernels."""
  model_fn = functools.partial(ScalingTransformerLM, **dict(TINY, attention_sparsity=2,
                                                            loss_sparsity=2))
  return model_fn, _trained_on_a_cycle(model_fn)


def _prompt_pass(decoder, prompt, inputs=None):
  """(logits [batch, vocab] in float32, the state before, the state after) of `decoder`'s
  model fed the start token and `prompt` [batch, p] in one compiled step (encoder `inputs`
  for an encoder-decoder)."""
  # pylint: disable=protected-access
  state = decoder._initial_state(prompt.shape[0], inputs)
  tokens = jnp.concatenate([jnp.zeros((prompt.shape[0], 1), jnp.int32), prompt], axis=1)
  inputs = None if inputs is None else jnp.asarray(inputs)
  step = decoding.jit(lambda w, s, t: decoder._step(w, s, t, inputs), decoder.model.weights)
  out, after = step(decoder.model.weights, state, tokens)
  return np.asarray(out, np.float32), state, after


# 'interpret' with -m slow (~30 s on 2 CPU cores): by default the kernels' bfloat16 decoding is
# held to float32's in test_fused_residual.py (test_fused_blocks_decode_bfloat16_weights_...).
@pytest.mark.parametrize('kernel', ['auto', pytest.param('interpret', marks=pytest.mark.slow)])
def test_bfloat16_decoding_equals_float32_on_a_trained_model(kernel, trained_on_a_cycle,
                                                             monkeypatch):
  """Weights and caches in bfloat16 (half the bytes a token reads): greedy tokens as in
  float32, and last-step logits within half the float32 logits' spread. bfloat16 keeps 8
  significant bits, and the logits (of magnitude ~10 here) move by as much as the program
  rounds: 0.05 of the spread on the CPU at XLA's default optimization level, which skips
  some of the step's bfloat16 roundings, and 0.33-0.34 where every product's output is
  rounded: the CPU at level 0, and an H200 against the suite's full-precision float32
  (tests/conftest.py; one H200, 2026-12-03, 0.331 in two runs of the suite; at JAX's default
  precision there, TF32 for float32, the two decoders' logits were 0.014-0.022 apart). A
  wrong kernel moves them by the whole spread. 'auto' decodes Sparse FF as the backend does
  (the Pallas kernel on a GPU), 'interpret' runs that kernel on any backend. The programs
  compile at XLA's default optimization level, as users' do (the suite's CPU programs skip
  LLVM's optimizations: tests/conftest.py)."""
  monkeypatch.setitem(decoding.COMPILER_OPTIONS, 'cpu', {'xla_backend_optimization_level': 3})
  model_fn, weights = trained_on_a_cycle
  prompt = np.array([[1, 2, 3], [5, 6, 7]], np.int32)
  with decode_kernels.use(kernel):
    f32, bf16 = Decoder(model_fn, weights), Decoder(model_fn, weights, dtype='bfloat16')
    np.testing.assert_array_equal(bf16.generate(prompt, 16), f32.generate(prompt, 16))
    assert {str(w.dtype) for w in jax.tree.leaves(bf16.model.weights)} <= {'bfloat16',
                                                                          'int32'}
    logits = [_prompt_pass(decoder, prompt)[0] for decoder in (f32, bf16)]
  assert np.abs(logits[1] - logits[0]).max() < 0.5 * logits[0].std()


@pytest.mark.parametrize('name', sorted(ENCODER_DECODERS))
def test_an_encoder_decoder_decodes_in_bfloat16_its_state_kept_in_bfloat16(name):
  """bfloat16 decoding of an encoder-decoder: the prompt pass (in a Terraformer, the
  encoder's output packed with the decoder's inputs) leaves every bfloat16 piece of the state
  bfloat16 (a Terraformer's mask cache refused the packed mask, and its SRU state came out
  float32, as did the whole packed pass, its encoder handing on float32), the generation
  warns of no mixed-dtype update, and the logits are float32's within half their spread (the
  bound of the LM's test above; random weights here)."""
  model_fn = ENCODER_DECODERS[name]
  inputs = ENCODER_INPUTS
  model = model_fn(mode='eval')
  model.init(shapes.signature((inputs, inputs)), rng=jax.random.PRNGKey(0))
  prompt = np.array([[1, 2, 3], [5, 6, 7]], np.int32)
  logits = []
  for dtype in (None, 'bfloat16'):
    decoder = Decoder(model_fn, model.weights, dtype=dtype)
    out, state, after = _prompt_pass(decoder, prompt, inputs)
    logits.append(out)
    if dtype:
      before = dict(jax.tree_util.tree_leaves_with_path(state))
      changed = [jax.tree_util.keystr(path) for path, a in
                 jax.tree_util.tree_leaves_with_path(after)
                 if path in before and before[path].dtype == jnp.bfloat16 != a.dtype]
      assert not changed
      with warnings.catch_warnings():
        warnings.simplefilter('error', FutureWarning)
        assert decoder.generate(prompt, 4, inputs=inputs).shape == (2, 4)
  assert np.abs(logits[1] - logits[0]).max() < 0.5 * logits[0].std()


def test_decoding_dtype_must_be_a_float():
  with pytest.raises(ValueError, match='dtype must be a floating-point dtype'):
    Decoder(functools.partial(ScalingTransformerLM, **TINY), {}, dtype='int8')


def test_decoding_programs_keep_matrix_vector_products_and_graph_loops_on_gpus_only(
    monkeypatch):
  options = {**decoding.COMPILER_OPTIONS['gpu'], **decoding.COMPILER_OPTIONS_LOOPS['gpu']}
  # XLA knows the options' names and values (it refuses one it does not, on any backend) ...
  x, w = jnp.arange(8.0)[None], jnp.ones((8, 4))
  np.testing.assert_allclose(jax.jit(jnp.dot, compiler_options=options)(x, w), x @ w)
  # ... and decoding programs get them on GPUs only, the loops' with GRAPH_LOOPS.
  assert decoding.compiler_options() == (options if jax.default_backend() == 'gpu' else None)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert decoding.compiler_options() == options
  # A program whose loop repeats one block or product, not a token, keeps XLA's loops.
  assert decoding.compiler_options(loops=False) == decoding.COMPILER_OPTIONS['gpu']
  monkeypatch.setattr(decoding, 'GRAPH_LOOPS', False)
  assert decoding.compiler_options() == decoding.COMPILER_OPTIONS['gpu']
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert decoding.compiler_options() is None


def test_16bit_programs_of_weights_up_to_a_size_multiply_with_cublas_on_gpus_only(monkeypatch):
  cublas = decoding.COMPILER_OPTIONS_16BIT['gpu']
  gpu = {**decoding.COMPILER_OPTIONS['gpu'], **decoding.COMPILER_OPTIONS_LOOPS['gpu']}
  x, w = jnp.arange(8.0)[None], jnp.ones((8, 4))   # XLA knows the option's name
  np.testing.assert_allclose(jax.jit(jnp.dot, compiler_options=cublas)(x, w), x @ w)
  monkeypatch.setattr(decoding, 'CUBLAS_MAX_BYTES', 64)
  small = (jnp.ones((4, 8), jnp.bfloat16), jnp.ones(3), jnp.arange(100))   # 64 bytes at most
  large = (jnp.ones((4, 8), jnp.bfloat16), jnp.ones((5, 8), jnp.float16))   # 80 bytes
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert decoding.compiler_options(small) == {**gpu, **cublas}
  assert decoding.compiler_options(large) == gpu
  assert decoding.compiler_options((jnp.ones((4, 8)),)) == decoding.compiler_options() == gpu
  assert decoding.compiler_options((jnp.ones((4, 8)), small)) == gpu   # float32's is largest
  monkeypatch.setattr(decoding, 'CUBLAS_MAX_BYTES', 0)
  assert decoding.compiler_options(small) == gpu
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  monkeypatch.setattr(decoding, 'CUBLAS_MAX_BYTES', 64)
  assert decoding.compiler_options(small) is None


@pytest.mark.parametrize('dtype, weights_dtype', [('bfloat16', None), (None, 'bfloat16')])
def test_the_decoder_compiles_its_programs_for_the_weights_it_decodes_with(monkeypatch, dtype,
                                                                          weights_dtype):
  model_fn = functools.partial(ScalingTransformerLM, **TINY)
  weights = model_fn().init(shapes.ShapeDtype((1, 8), jnp.int32))[0]
  if weights_dtype:
    weights = jax.tree.map(lambda w: jnp.asarray(w, weights_dtype), weights)
  compiled_for = []
  real_jit = decoding.jit
  monkeypatch.setattr(decoding, 'jit', lambda fn, weights=None, **kwargs: (
      compiled_for.append({w.dtype for w in jax.tree.leaves(weights)}),
      real_jit(fn, weights, **kwargs))[1])
  Decoder(model_fn, weights, dtype=dtype).generate(np.ones((1, 3), np.int32), 2)
  assert compiled_for == [{jnp.dtype('bfloat16')}]   # cast, or kept


@pytest.mark.parametrize('backend, dtype, warned', [('cpu', 'bfloat16', True),
                                                    ('cpu', None, False),
                                                    ('gpu', 'bfloat16', False)])
def test_bfloat16_decoding_on_a_cpu_warns_that_it_is_slower(monkeypatch, backend, dtype,
                                                            warned):
  """XLA's CPU compiler converts a bfloat16 product's weight to float32 at every call
  (docs/speed.md): a Decoder asked for bfloat16 on a CPU says so, once, as it is built."""
  model_fn = functools.partial(ScalingTransformerLM, **TINY)
  weights = model_fn().init(shapes.ShapeDtype((1, 8), jnp.int32))[0]
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  with mock.patch.object(decoding.logging, 'warning') as warning:
    Decoder(model_fn, weights, dtype=dtype)
  assert warning.call_count == int(warned)
  if warned:
    assert 'bfloat16 on a CPU' in warning.call_args[0][0]


_PRODUCT_KERNELS = """
import jax.numpy as jnp
from sparse_scaling import decoding
x, w = jnp.ones((1, 1024), jnp.bfloat16), jnp.ones((1024, 4096), jnp.bfloat16)   # 800M's W1
print('__cublas' in decoding.jit(jnp.dot, w).lower(x, w).compile().as_text())
"""


@needs_gpu("XLA's GPU compiler")
def test_a_bfloat16_decoding_product_runs_as_cublas_on_a_gpu():
  # In a process of its own: the tests' XLA_FLAGS (deterministic ops) make every product
  # cuBLAS's, and XLA reads them once. Without the option this product was XLA's Triton
  # kernel on the H200 (`gemm_fusion_dot`: docs/decoding_gpu.md, "bfloat16: cuBLAS's
  # products up to 256 MiB"). The child takes GPU memory as it needs it (tests/conftest.py).
  env = {name: value for name, value in os.environ.items() if name != 'XLA_FLAGS'}
  child = subprocess.run([sys.executable, '-c', _PRODUCT_KERNELS], env=env,
                         capture_output=True, text=True)
  assert child.returncode == 0, child.stderr[-2000:]
  assert child.stdout.split() == ['True']


@needs_gpu("XLA's GPU compiler")
def test_a_decoding_matrix_vector_product_compiles_to_a_matrix_product_on_a_gpu():
  x, w = jnp.ones((1, 1024)), jnp.ones((1024, 4096))   # the 800M decoder's FF, one token
  xla = jax.jit(jnp.dot).lower(x, w).compile().as_text()
  ours = decoding.jit(jnp.dot).lower(x, w).compile().as_text()
  assert ' reduce(' in xla and ' dot(' not in xla   # XLA's rewrite, which the option stops
  assert ' dot(' in ours or '__cublas' in ours   # (a split-K product may add a reduction)
  np.testing.assert_allclose(decoding.jit(jnp.dot)(x, w), jnp.dot(x, w), rtol=1e-3)
