"""Autoregressive decoding as one compiled XLA program.

`trax.supervised.decoding` runs a Python loop that calls the jitted model once per token; at
batch 1 the host overhead per call is of the order of the whole sparse model's step. Here the
prompt pass and a `lax.while_loop` over the model's pure predict-mode function (weights in,
KV, convolution and encoder caches carried as state) are jitted together, so a whole
generation is a single device call.

Prompts of different lengths: every row is fed one token per step, so all rows stay at the
same position of their caches (KV cache, Sparse QKV's convolution window, SRU state) and no
row ever sees padding. The prompt pass feeds the first min(lengths) tokens of every row at
once; after it, a row whose prompt is longer takes its own next prompt token (teacher
forcing) until its prompt is used up, and its own samples after that. Row r so goes through
exactly the calls it would alone, up to how its prompt is split between the prompt pass and
single steps (predict == eval). A long prompt beside a short one costs one step per token of
the difference.

Sampling: logits / temperature, then top_k (keep the k largest), then top_p (keep the
smallest set of most likely tokens whose probability reaches top_p); temperature 0 is greedy.
The noise of row r's j-th new token is drawn from `fold_in(PRNGKey(seeds[r]), j)`, where
`seeds[r] = seed + r` for an int seed: a row depends on its own prompt and seed only, never
on the rest of the batch.

Late tokens: where a fused block pays only up to a cache position (`fused_residual.
late_position`: the Sparse QKV block's kernels, long caches), a generation runs its tokens
from that position on in a second loop, traced within `fused_residual.late()`,
where the block runs its layers one by one: no per-token choice at run time.
"""

import functools

from absl import logging
import gin
import jax
import jax.numpy as jnp
import numpy as np
from trax import shapes
from trax.layers import attention as trax_attention

from sparse_scaling.layers import fused_residual

# XLA's GPU compiler rewrites a product of a vector and a matrix of up to ten million elements
# as an elementwise product and a reduction (its 'dot-strength-reduction' pass). Decoding one
# token of one row makes every dense layer such a product (800M: [1024] x [1024, 4096]), and
# the rewrite materializes the products of a layer or reduces down the matrix's columns, at
# half the card's rate or less. Without it these are XLA's matrix-product kernels: the dense
# 800M decoder's generation took 1.18 ms a token on an H200 instead of 1.62
# (docs/results/table1_gpu.md; docs/decoding_gpu.md). Batched decoding and the prompt
# pass multiply matrices and are not rewritten either way.
COMPILER_OPTIONS = {'gpu': {'xla_disable_hlo_passes': 'dot-strength-reduction'}}

# Options added for a program whose largest weight is a 16-bit float (bfloat16) array of at
# most CUBLAS_MAX_BYTES: cuBLAS's product kernels in place of XLA's Triton ones. In one H200
# sitting (docs/decoding_gpu.md, "bfloat16: cuBLAS's products up to 256 MiB"), the dense 800M
# bfloat16 generation (largest weight: the 65.5 MB output layer) took 0.99-1.00 ms a token
# with them against 1.19-1.21 without; the dense 17B one of 15 blocks (weights of 170-755 MB)
# 8.45 against 7.70, XLA's kernels reading 17B's FF weights at 4.38 TB/s against cuBLAS's
# 4.09. Where between the two sizes they cross was not measured. float32's programs were
# faster with XLA's kernels at 800M (1.11 against 1.25 ms a token, a scratch run).
# CUBLAS_MAX_BYTES = 0: none does (`bench.decode_shares`' CUBLAS_BYTES).
COMPILER_OPTIONS_16BIT = {'gpu': {'xla_gpu_enable_triton_gemm': False}}
CUBLAS_MAX_BYTES = 256 << 20

# XLA records a GPU program's runs of kernels as CUDA graphs (command buffers), but by default
# not its loops: each pass of a generation's while loop, one token, is launched from the host,
# which first reads the loop's condition back from the device. With WHILE and CONDITIONAL
# among the recorded commands the loop itself is a graph (CUDA's conditional nodes), the
# condition stays on the device and no token waits for the host. In one H200 sitting
# (docs/decoding_gpu.md, "The generation's loop as a CUDA graph") the 800M FF+QKV generation
# took 0.374-0.396 ms a token in bfloat16 with them against 0.398-0.422 without, 0.423-0.427
# against 0.434-0.436 in float32; dense, whose kernels are long enough to hide the host, was
# unchanged (0.999 against 0.978, 1.097 against 1.100). A loop of one block, though, got
# slower: in Table 1's run of that sitting one 800M block looped in a compiled program took
# 0.0213 ms (FF+QKV) and 0.0403 (dense) against 0.0149 and 0.0363 in the run before, a few µs
# an iteration, likely the graph's conditional node, which a token of 24 blocks hides. So the
# benchmarks whose loop repeats one block or product compile without it (`loops=False`).
# GRAPH_LOOPS = False: XLA's default everywhere (`bench.decode_shares`' GRAPHS=0).
COMPILER_OPTIONS_LOOPS = {'gpu': {
    'xla_gpu_enable_command_buffer':
        'FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL',
    'xla_gpu_graph_min_graph_size': 1}}
GRAPH_LOOPS = True


def compiler_options(weights=None, loops=True):
  """XLA's options for a decoding program on the default backend that reads `weights` (a
  pytree of arrays; None: float32 weights): COMPILER_OPTIONS, COMPILER_OPTIONS_LOOPS where
  `loops` (its loop is a generation's, over tokens) and GRAPH_LOOPS, and
  COMPILER_OPTIONS_16BIT where the largest weight is a 16-bit array of at most
  CUBLAS_MAX_BYTES. None: XLA's defaults."""
  backend = jax.default_backend()
  options = dict(COMPILER_OPTIONS.get(backend, {}))
  if loops and GRAPH_LOOPS:
    options.update(COMPILER_OPTIONS_LOOPS.get(backend, {}))
  floats = [(np.size(w) * jnp.result_type(w).itemsize, jnp.result_type(w).itemsize)
            for w in jax.tree.leaves(weights)
            if jnp.issubdtype(jnp.result_type(w), jnp.floating)]
  nbytes, itemsize = max(floats, default=(0, 4))   # the largest weight's
  if itemsize == 2 and 0 < nbytes <= CUBLAS_MAX_BYTES:
    options.update(COMPILER_OPTIONS_16BIT.get(backend, {}))
  return options or None


def jit(fn, weights=None, loops=True, **kwargs):
  """`jax.jit` of a decoding program (`kwargs` are jit's) that reads `weights`, compiled
  with `compiler_options(weights, loops)`: the `Decoder`'s generations and the decoding
  benchmarks' steps. The weights are only looked at (dtypes and sizes), not bound."""
  return jax.jit(fn, compiler_options=compiler_options(weights, loops), **kwargs)


# Whether `argmax` is `lax.top_k` on a CPU (`bench.decode_shares`' CPU_TOP_K).
CPU_TOP_K = True


def argmax(logits):
  """jnp.argmax(logits, axis=-1) as int32: each row's largest entry, the lowest index among
  equals. On a CPU it is `lax.top_k(logits, 1)`, which picks the same index (equals in index
  order, as documented) and which XLA's CPU compiler runs several times faster than its argmax
  reduction (Sparse FF's choice at 800M: 13.5 against 64.4 µs in a step's profile on a 2-core
  Xeon; an 800M generation 7-11% faster: docs/speed.md, "Table 1"). Elsewhere it is jnp.argmax."""
  if CPU_TOP_K and jax.default_backend() == 'cpu':
    return jax.lax.top_k(logits, 1)[1][..., 0].astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def filter_logits(logits, temperature, top_k=None, top_p=None):
  """Logits of the tokens that sampling may pick; the others are -inf.

  Args:
    logits: [..., vocab] float logits.
    temperature: > 0; the logits are divided by it first.
    top_k: Keep only the `top_k` largest logits (ties with the k-th are kept); None: all.
    top_p: Keep the most likely tokens, in order, until the probability of those before
      the next one reaches `top_p` (the most likely token is always kept); None or 1: all.

  Returns:
    float32 [..., vocab]: the tempered logits, -inf outside the allowed set.
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]                   # [..., 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1:
    ranked = -jnp.sort(-logits, axis=-1)                              # [..., vocab], descending
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs                  # 0 for the first
    threshold = jnp.min(jnp.where(mass_before < top_p, ranked, jnp.inf), axis=-1,
                        keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
  """Raises ValueError naming the first sampling option outside its range."""
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be an integer >= 1, got {max_new_tokens!r}')
  if not temperature >= 0:
    raise ValueError(f'temperature must be >= 0, got {temperature!r}')
  if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
    raise ValueError(f'top_k must be None or an integer >= 1, got {top_k!r}')
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f'top_p must be None or in (0, 1], got {top_p!r}')


def _padded(prompt):
  """Prompt rows -> (token ids [batch, max length] int32, lengths [batch] int32).

  `prompt` is an array [batch, length] (every row that long) or a list of rows of token ids
  of any lengths, which are right-padded with 0.
  """
  if isinstance(prompt, (np.ndarray, jax.Array)):
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 2:
      raise ValueError(f'prompt must be [batch, length] or a list of rows, got shape '
                       f'{prompt.shape}')
    return prompt, np.full((prompt.shape[0],), prompt.shape[1], np.int32)
  rows = [np.asarray(row, np.int32) for row in prompt]
  if not rows or any(row.ndim != 1 for row in rows):
    raise ValueError('prompt must be [batch, length] or a non-empty list of rows of token ids')
  lengths = np.array([len(row) for row in rows], np.int32)
  padded = np.zeros((len(rows), lengths.max()), np.int32)
  for i, row in enumerate(rows):
    padded[i, :len(row)] = row
  return padded, lengths


def position_limits(model):
  """[(positions, whether the encoder's count too)]: what each layer of the predict-mode
  `model` that keeps one entry per position holds: trax's positional encodings (their
  max_len, decoder positions) and every layer with a `positions_held()` (the KV caches of
  `layers/causal_attention.py`, and of `layers/concat_decoder.py`, which also hold the
  encoder's positions). Past its last position such a layer would take every further token
  at that last position, silently (`dynamic_slice` and `dynamic_update_slice` clamp their
  start), so `Decoder.generate` refuses a generation longer than any of them holds."""
  limits, seen, layers = [], set(), [model]
  while layers:
    layer = layers.pop()
    if id(layer) in seen:
      continue
    seen.add(id(layer))
    # The class itself: `tl.PositionalEncoding` is gin's configurable wrapper of it, whose
    # instances are the class's, not the wrapper's.
    if isinstance(layer, trax_attention.PositionalEncoding):
      # trax keeps these two private; its predict-mode encoding reads its weights at the
      # state's position, past max_len at the last one.
      if layer._mode == 'predict':   # pylint: disable=protected-access
        limits.append((layer._max_len, False))   # pylint: disable=protected-access
    else:
      held = getattr(layer, 'positions_held', lambda: None)()
      if held:
        limits.append(held)
    layers.extend(layer.sublayers)
  return limits


def _check_positions(limits, prompt_length, max_new_tokens, encoder_length):
  """Raises ValueError where a generation of `max_new_tokens` after a (padded) prompt of
  `prompt_length` needs more positions than one of `limits` (`position_limits`) holds: the
  start token, the prompt and every new token but the last are fed, prompt_length +
  max_new_tokens positions, and a cache of [encoder; decoder] also holds the encoder's
  `encoder_length`."""
  for held, with_encoder in limits:
    needed = prompt_length + max_new_tokens + (encoder_length if with_encoder else 0)
    if needed > held:
      encoder = f" after the encoder's {encoder_length} inputs" if with_encoder else ''
      raise ValueError(f'max_new_tokens: a prompt of {prompt_length} tokens and '
                       f'{max_new_tokens} new ones{encoder} need {needed} positions; the '
                       f'model holds {held} (its max_len)')


def init_state(model, signature):
  """The state that `model.init(signature)` makes (a predict model's empty caches and
  positions), without the weights it draws: the init runs compiled and returns its state
  alone (`state_program`), so that XLA drops those throw-away weights instead of making them
  (a 17B model's: 68 GB in float32; an 800M decoder's first state took 7.5 s and 1.3 GB more
  on a 2-core Xeon with them, 1.8 s without). As trax's `weights_and_state_signature` does, the
  model's rng is put back after; its weights and state hold the init's tracers until set."""
  rng = model.rng
  state = state_program(model, signature)()
  model.rng = rng
  return state


def state_program(model, signature):
  """jit(() -> the state of `model.init(signature)`), its weights left out."""
  return jax.jit(lambda: model.init(signature, use_cache=False)[1])


def laid_out(layer, weights):
  """`weights` of a predict-mode `layer` as a generation reads them, made once per generation
  outside its loop over tokens: where a layer lays its weights out for decoding (its
  `decode_weights(weights)`; None leaves it to its sublayers), its laid-out weights
  (`sparse_qkv.ModuleConv`'s on a GPU); everything else, shared weights' markers too, as
  it is."""
  if isinstance(weights, dict):   # a shared layer's later place: the layer holds its weights
    return weights
  lay_out = getattr(layer, 'decode_weights', None)
  laid = lay_out(weights) if lay_out else None
  if laid is not None:
    return laid
  if not layer.sublayers:
    return weights
  return type(weights)(laid_out(sub, w) for sub, w in zip(layer.sublayers, weights))


class Decoder:
  """Greedy or sampled generation from a trax LM or encoder-decoder in predict mode.

  Attributes:
    model: The predict-mode model; its weights are the ones decoded with.
  """

  def __init__(self, model_fn, weights, start_id=0, dtype=None):
    """Builds the predict-mode model.

    Args:
      model_fn: `mode -> layer`: a decoder-only LM (token ids [batch, length] -> logits
        [batch, length, vocab]) or an encoder-decoder ((inputs [batch, length_e], targets
        [batch, length_d]) -> (logits, ...)), shifting targets right inside, as trax's
        models do.
      weights: Trained weights of that model (from any mode: they are matched by order, so
        predict mode's extra cache wrappers do not matter).
      start_id: Token fed before the prompt; trax's models see 0 there in training.
      dtype: None keeps the weights' dtype; 'bfloat16' (or another float dtype) casts the
        floating-point weights and caches to it: half the bytes a token reads. Matrix
        products and reductions of bfloat16 accumulate in float32 on GPUs and TPUs; the
        sampling runs on float32 logits. On a GPU, programs of 16-bit weights up to
        CUBLAS_MAX_BYTES each multiply with cuBLAS's kernels (`compiler_options`), and
        the fused blocks' kernels ask the L2 cache to keep their fixed weights, setting
        aside part of it for such lines in this process's CUDA context
        (`decode_kernels.persist_level`; L2_PERSIST = 0 turns it off). On a
        CPU, bfloat16 decodes several times slower than float32: XLA's CPU compiler
        converts a bfloat16 product's weight to float32 at every call (docs/speed.md,
        "bfloat16 on a CPU").
    """
    self.model = model_fn(mode='predict')
    self._dtype = None if dtype is None else jnp.dtype(dtype)
    if self._dtype is not None and not jnp.issubdtype(self._dtype, jnp.floating):
      raise ValueError(f'dtype must be a floating-point dtype, got {dtype!r}')
    if self._dtype == jnp.bfloat16 and jax.default_backend() == 'cpu':
      logging.warning('Decoding in bfloat16 on a CPU: several times slower than float32 '
                      '(docs/speed.md, "bfloat16 on a CPU").')
    self._leaves = [self._cast(w) for w in jax.tree.leaves(weights)]
    self._weights = None
    self._start_id = start_id
    self._compiled = {}
    self._states = {}
    self._limits = position_limits(self.model)

  def generate(self, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
               eos_id=None, seed=0, inputs=None):
    """Continues every prompt of the batch.

    Args:
      prompt: Token ids: an array [batch, length] (may be empty), or a list of rows of
        different lengths; each row continues its own prompt.
      max_new_tokens: How many tokens to generate per row at most.
      temperature: 0 for greedy (argmax); otherwise logits are divided by it and sampled.
      top_k: Sample only among the `top_k` most likely tokens (None: all).
      top_p: Nucleus sampling: only among the most likely tokens whose probability
        reaches `top_p`, in (0, 1] (None or 1: all).
      eos_id: Generation of a row stops after this token; the rest of the row is eos_id.
      seed: Seed of the sampling noise: an int (row r uses seed + r) or one int per row.
      inputs: Encoder token ids [batch, length_e], for an encoder-decoder model only.

    Returns:
      Generated token ids [batch, max_new_tokens] (int32), as a numpy array.

    Raises:
      ValueError: an option outside its range, named in the message; a generation longer
        than the model's caches or positional encodings hold (prompt length +
        max_new_tokens, and in a Terraformer the encoder's length too, at most max_len).
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if (inputs is None) != (self.model.n_in == 1):
      raise ValueError('inputs (the encoder tokens) must be given for an encoder-decoder '
                       'model and only for one')
    prompt, lengths = _padded(prompt)
    batch_size = prompt.shape[0]
    seeds = np.asarray(seed, np.int64)
    seeds = seed + np.arange(batch_size) if seeds.ndim == 0 else seeds
    if seeds.shape != (batch_size,):
      raise ValueError(f'seed must be an int or one per row ({batch_size}), got {seed!r}')
    inputs = None if inputs is None else jnp.asarray(inputs, jnp.int32)
    _check_positions(self._limits, prompt.shape[1], max_new_tokens,
                     0 if inputs is None else inputs.shape[1])
    shape_key = (batch_size, None if inputs is None else inputs.shape)
    if shape_key not in self._states:
      self._states[shape_key] = self._initial_state(batch_size, inputs)
    if temperature == 0:
      top_k = top_p = None  # greedy: the filters change nothing
    options = dict(n_shared=int(lengths.min()), max_new_tokens=int(max_new_tokens),
                   temperature=float(temperature), top_k=top_k, top_p=top_p, eos_id=eos_id)
    key = (prompt.shape, shape_key, tuple(sorted(options.items())))
    if key not in self._compiled:
      self._compiled[key] = jit(functools.partial(self._generate, **options),
                                self._weights)
    tokens = self._compiled[key](self._weights, self._states[shape_key], prompt, lengths,
                                 inputs, seeds.astype(np.uint32))
    return jax.device_get(tokens)

  def _initial_state(self, batch_size, inputs):
    """Empty caches for `batch_size` rows (`init_state`: no throw-away weights made)."""
    signature = shapes.ShapeDtype((batch_size, 1), jnp.int32)
    if inputs is not None:
      signature = (shapes.signature(inputs), signature)
    model = self.model
    state = jax.tree.map(self._cast, init_state(model, signature))
    if self._weights is None:
      self._weights = jax.tree.unflatten(jax.tree.structure(model.weights), self._leaves)
      self._leaves = None
    model.weights, model.state = self._weights, state
    return state

  def _cast(self, array):
    """A floating-point array in the decoding dtype; anything else as it is."""
    if self._dtype is None or not jnp.issubdtype(jnp.result_type(array), jnp.floating):
      return array
    return jnp.asarray(array, self._dtype)

  def _step(self, weights, state, tokens, inputs):
    """Logits of the last position [batch, vocab] after feeding tokens [batch, n]."""
    x = tokens if inputs is None else (inputs, tokens)
    out, state = self.model.pure_fn(x, weights, state, None)
    logits = out if inputs is None else out[0]
    return logits[:, -1], state

  def _generate(self, weights, state, prompt, lengths, inputs, seeds, n_shared,
                max_new_tokens, temperature, top_k, top_p, eos_id):
    """Pure generation: prompts [batch, p] of `lengths` -> tokens [batch, max_new_tokens].

    Step i (from 0) chooses the token at position n_shared + i of every row: its prompt's
    token while the row has one there, else a new token from the logits of the last step.
    The caches take that token at position n_shared + i + 1 (after the start token), in
    step i + 1: the steps from the model's late position on (`fused_residual.late_position`)
    are traced within `fused_residual.late()`, a loop of their own.
    """
    batch_size, prompt_length = prompt.shape
    n_steps = prompt_length - n_shared + max_new_tokens  # until the longest row is complete
    # The first step whose token is at the late position or past it. The fused blocks'
    # caches hold the decoder's own positions (the LM's, and the Scaling Transformer
    # encoder-decoder's self-attention). A fused block over caches of [encoder; decoder]
    # (none today) would reach its late position sooner than this step: that would move
    # only where the second loop should start, since a step decodes the same tokens in
    # either loop.
    late = fused_residual.late_position(self.model)
    first_late = n_steps if late is None else max(late - n_shared, 1)
    late_weights = None
    if first_late < n_steps:
      with fused_residual.late():
        late_weights = laid_out(self.model, weights)
    weights = laid_out(self.model, weights)
    rows = jnp.arange(batch_size)
    keys = jax.vmap(jax.random.PRNGKey)(seeds)                        # [batch, 2]
    prompt = jnp.pad(prompt, ((0, 0), (0, 1)))  # a column to read past the end of every row

    def choose(i, logits, tokens, done):
      new_index = n_shared + i - lengths                              # [batch]; < 0: prompt
      if temperature == 0.0:
        new = argmax(logits)
      else:
        row_keys = jax.vmap(jax.random.fold_in)(keys, jnp.maximum(new_index, 0))
        new = jax.vmap(jax.random.categorical)(
            row_keys, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)
      if eos_id is not None:
        new = jnp.where(done, eos_id, new)
        done = done | ((new_index >= 0) & (new == eos_id))
      token = jnp.where(new_index < 0, prompt[:, jnp.minimum(n_shared + i, prompt_length)],
                        new)
      # Forced tokens, and rows already complete, write to a spare last column: every index
      # stays in bounds. (Out-of-bounds writes dropped by the scatter itself landed in the
      # next row's first column on a GPU under --xla_gpu_deterministic_ops.)
      kept = (new_index >= 0) & (new_index < max_new_tokens)
      tokens = tokens.at[rows, jnp.where(kept, new_index, max_new_tokens)].set(token)
      return token, tokens, done

    def body(carry, weights=weights):
      i, token, state, tokens, done = carry
      logits, state = self._step(weights, state, token[:, None], inputs)
      token, tokens, done = choose(i, logits, tokens, done)
      return i + 1, token, state, tokens, done

    def late_body(carry):
      with fused_residual.late():
        return body(carry, late_weights)

    def cond(carry):
      i, _, _, _, done = carry
      complete = n_shared + i - lengths >= max_new_tokens
      return (i < n_steps) & ~jnp.all(done | complete)

    start = jnp.full((batch_size, 1), self._start_id, jnp.int32)
    logits, state = self._step(weights, state,
                               jnp.concatenate([start, prompt[:, :n_shared]], axis=1), inputs)
    fill = 0 if eos_id is None else eos_id
    tokens = jnp.full((batch_size, max_new_tokens + 1), fill, jnp.int32)  # + a spare column
    token, tokens, done = choose(0, logits, tokens, jnp.zeros((batch_size,), bool))
    carry = (jnp.int32(1), token, state, tokens, done)
    if n_steps > 1:
      # One step before the loop: some layers' state changes shape or structure after the
      # prompt pass (trax's MultiplicativeConvCausalAttention keeps the inputs of its last
      # call), and a while_loop's carry must keep one shape.
      carry = (body if first_late > 1 else late_body)(carry)
    if first_late > 2:   # without a late loop, the one loop as before it (no extra bound)
      early = cond if first_late >= n_steps else (lambda c: cond(c) & (c[0] < first_late))
      carry = jax.lax.while_loop(early, body, carry)
    if first_late < n_steps:
      carry = jax.lax.while_loop(cond, late_body, carry)
    return carry[3][:, :max_new_tokens]


@gin.configurable(module='sparse_scaling', denylist=['model_fn', 'weights'])
def sample(model_fn, weights, vocab=gin.REQUIRED, prompt='', max_new_tokens=64,
           temperature=0.0, top_k=None, top_p=None, seed=0, dtype=None):
  """Decodes one sample as printable text: an LM continues `prompt`; an encoder-decoder
  reads `prompt` as its input document (ended by EOS) and writes its output from scratch.

  Args:
    model_fn: `mode -> layer`, an LM or an encoder-decoder.
    weights: Its trained weights.
    vocab: A `sentencepiece.SentencePieceProcessor` (`encode`, `decode`, `eos_id`).
    prompt: The text continued (LM) or the input document (encoder-decoder).
    max_new_tokens: Length limit; the sample also stops at EOS.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: Sample among the `top_k` most likely tokens only (None: all).
    top_p: Nucleus sampling, in (0, 1] (None: all tokens).
    seed: Seed of the sampling noise.
    dtype: Decode with the weights and caches in this dtype ('bfloat16'); None: as trained.
  """
  _check_sampling(max_new_tokens, temperature, top_k, top_p)  # before the model is built
  decoder = Decoder(model_fn, weights, dtype=dtype)
  ids = vocab.encode(prompt)
  if decoder.model.n_in == 1:
    prefix, inputs, shown = [ids], None, prompt
  else:
    prefix, inputs, shown = [[]], [ids + [vocab.eos_id()]], f'{prompt}\n=> '
  tokens = decoder.generate(prefix, max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, eos_id=vocab.eos_id(), seed=seed,
                            inputs=inputs)[0].tolist()
  if vocab.eos_id() in tokens:
    tokens = tokens[:tokens.index(vocab.eos_id())]
  options = ''.join(f', {name} {value}' for name, value in (('top_k', top_k), ('top_p', top_p))
                    if value is not None and temperature)
  return f'--- sample (temperature {temperature}{options}) ---\n{shown}{vocab.decode(tokens)}'
