"""Autoregressive decoding as one compiled XLA program.

`trax.supervised.decoding` runs a Python loop that calls the jitted model once per token; at
batch 1 the host overhead per call is of the order of the whole sparse model's step. Here the
prompt pass and a `lax.while_loop` over the model's pure predict-mode function (weights in,
KV, convolution and encoder caches carried as state) are jitted together, so a whole
generation is a single device call.
"""

import functools

import gin
import jax
import jax.numpy as jnp
from trax import shapes


class Decoder:
  """Greedy or temperature sampling from a trax LM or encoder-decoder in predict mode.

  Attributes:
    model: The predict-mode model; its weights are the ones decoded with.
  """

  def __init__(self, model_fn, weights, start_id=0):
    """Builds the predict-mode model.

    Args:
      model_fn: `mode -> layer`: a decoder-only LM (token ids [batch, length] -> logits
        [batch, length, vocab]) or an encoder-decoder ((inputs [batch, length_e], targets
        [batch, length_d]) -> (logits, ...)), shifting targets right inside, as trax's
        models do.
      weights: Trained weights of that model (from any mode: they are matched by order, so
        predict mode's extra cache wrappers do not matter).
      start_id: Token fed before the prompt; trax's models see 0 there in training.
    """
    self.model = model_fn(mode='predict')
    self._leaves = jax.tree.leaves(weights)
    self._weights = None
    self._start_id = start_id
    self._compiled = {}
    self._states = {}

  def generate(self, prompt, max_new_tokens, temperature=0.0, eos_id=None, seed=0,
               inputs=None):
    """Continues every prompt of the batch.

    Args:
      prompt: Token ids [batch, prompt_length] that the output continues (may be empty).
      max_new_tokens: How many tokens to generate at most.
      temperature: 0 for greedy (argmax); otherwise logits are divided by it and sampled.
      eos_id: Generation of a row stops after this token; the rest of the row is eos_id.
      seed: Seed of the sampling noise.
      inputs: Encoder token ids [batch, length_e], for an encoder-decoder model only.

    Returns:
      Generated token ids [batch, max_new_tokens] (int32), as a numpy array.
    """
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
    if temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {temperature}')
    if (inputs is None) != (self.model.n_in == 1):
      raise ValueError('inputs (the encoder tokens) must be given for an encoder-decoder '
                       'model and only for one')
    prompt = jnp.asarray(prompt, jnp.int32)
    inputs = None if inputs is None else jnp.asarray(inputs, jnp.int32)
    shape_key = (prompt.shape[0], None if inputs is None else inputs.shape)
    if shape_key not in self._states:
      self._states[shape_key] = self._initial_state(prompt.shape[0], inputs)
    key = (prompt.shape, shape_key, max_new_tokens, float(temperature), eos_id)
    if key not in self._compiled:
      self._compiled[key] = jax.jit(functools.partial(
          self._generate, max_new_tokens=max_new_tokens, temperature=temperature,
          eos_id=eos_id))
    tokens = self._compiled[key](self._weights, self._states[shape_key], prompt, inputs,
                                 jax.random.PRNGKey(seed))
    return jax.device_get(tokens)

  def _initial_state(self, batch_size, inputs):
    """Empty caches for `batch_size` rows (init draws throw-away weights; they are dropped)."""
    signature = shapes.ShapeDtype((batch_size, 1), jnp.int32)
    if inputs is not None:
      signature = (shapes.signature(inputs), signature)
    _, state = self.model.init(signature, use_cache=False)
    if self._weights is None:
      self._weights = jax.tree.unflatten(jax.tree.structure(self.model.weights), self._leaves)
      self._leaves = None
    self.model.weights = self._weights
    return state

  def _step(self, weights, state, tokens, inputs):
    """Logits of the last position [batch, vocab] after feeding tokens [batch, n]."""
    x = tokens if inputs is None else (inputs, tokens)
    out, state = self.model.pure_fn(x, weights, state, None)
    logits = out if inputs is None else out[0]
    return logits[:, -1], state

  def _generate(self, weights, state, prompt, inputs, rng, max_new_tokens, temperature,
                eos_id):
    """Pure generation: prompt [batch, p] -> tokens [batch, max_new_tokens]."""
    batch_size = prompt.shape[0]
    start = jnp.full((batch_size, 1), self._start_id, jnp.int32)
    logits, state = self._step(weights, state, jnp.concatenate([start, prompt], axis=1),
                               inputs)

    def pick(logits, rng):
      if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
      return jax.random.categorical(rng, logits / temperature).astype(jnp.int32)

    def cond(carry):
      i, _, _, _, done, _ = carry
      return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      i, logits, state, tokens, done, rng = carry
      rng, sample_rng = jax.random.split(rng)
      token = pick(logits, sample_rng)
      if eos_id is not None:
        token = jnp.where(done, eos_id, token)
        done = done | (token == eos_id)
      tokens = tokens.at[:, i].set(token)
      logits, state = self._step(weights, state, token[:, None], inputs)
      return i + 1, logits, state, tokens, done, rng

    fill = 0 if eos_id is None else eos_id
    tokens = jnp.full((batch_size, max_new_tokens), fill, jnp.int32)
    done = jnp.zeros((batch_size,), bool)
    carry = (jnp.int32(0), logits, state, tokens, done, rng)
    return jax.lax.while_loop(cond, body, carry)[3]


@gin.configurable(module='sparse_scaling', denylist=['model_fn', 'weights'])
def sample(model_fn, weights, vocab=gin.REQUIRED, prompt='', max_new_tokens=64,
           temperature=0.0, seed=0):
  """Decodes one sample as printable text: an LM continues `prompt`; an encoder-decoder
  reads `prompt` as its input document (ended by EOS) and writes its output from scratch.

  Args:
    model_fn: `mode -> layer`, an LM or an encoder-decoder.
    weights: Its trained weights.
    vocab: A `sentencepiece.SentencePieceProcessor` (`encode`, `decode`, `eos_id`).
    prompt: The text continued (LM) or the input document (encoder-decoder).
    max_new_tokens: Length limit; the sample also stops at EOS.
    temperature: 0 for greedy decoding, else the sampling temperature.
    seed: Seed of the sampling noise.
  """
  decoder = Decoder(model_fn, weights)
  ids = vocab.encode(prompt)
  if decoder.model.n_in == 1:
    prefix, inputs, shown = [ids], None, prompt
  else:
    prefix, inputs, shown = [[]], [ids + [vocab.eos_id()]], f'{prompt}\n=> '
  tokens = decoder.generate(prefix, max_new_tokens, temperature=temperature,
                            eos_id=vocab.eos_id(), seed=seed, inputs=inputs)[0].tolist()
  if vocab.eos_id() in tokens:
    tokens = tokens[:tokens.index(vocab.eos_id())]
  return f'--- sample (temperature {temperature}) ---\n{shown}{vocab.decode(tokens)}'
