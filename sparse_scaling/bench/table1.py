"""The paper's Table 1: unbatched decoding time per token, ours and trax's, side by side.

  python -m sparse_scaling.bench.table1 [--shapes 800m,17b] [--impls ours,trax] [--program]
      [--copies 3] [--alternate | --cold] [--nostep] [--dtype bfloat16] [--depth 15] [--json]
      [--tokens 32] [--max_len 2048]
  python -m sparse_scaling.bench.table1 --batch_curve    # where sparsity stops paying

Rows: dense, +Sparse FF, +Sparse QKV, +Sparse FF+QKV, +FF+QKV+loss, with the dimensions of
`gin_configs/paper/c4_800m_*.gin` (800M: the 24-layer decoder) and
`gin_configs/paper/timing_17b_*.gin` (17B: two blocks of d_model 9216), float32 unless
`--dtype` says otherwise (XLA's CPU matrix-vector product in bfloat16 is compute-bound, ~1.3
GB/s, which would flatter sparsity), each built as our `ScalingTransformerLM` and as trax's
`ConfigurableTransformerLM` (ff_sparsity, `MultiplicativeConvCausalAttention`,
loss_sparsity) with the same shapes (`decoders.py`). Ours decodes as `layers/decode_kernels.py`
chooses: `ours` by default (on GPUs the sparse blocks through fused Pallas kernels,
`layers/fused_residual.py`), `ours-pallas` with every Pallas kernel (also attention over the
KV cache of dense attention), `ours-xla` by XLA's ops only.

Method: batch 1, random weights (timing only). Per block: the first block's attention and FF
layers jitted together (weights as arguments, state donated), its caches filled by a prompt
of `--prompt` positions, and fed one token's activations per step, median (p90) of
`--tokens` steps after 3 warm-up steps (with `--alternate`, the
blocks of all of a shape's rows called in the same rounds, four calls of each a round; with
`--cold`, the caches flushed before each step: called over and over, a small block's weights
stay in the processor's cache, as a decoded token's do not). Per token (step): a prompt
of `--prompt` tokens fills the caches, then `--tokens` greedy tokens are decoded by one jitted
predict step each, every step blocked until ready. Per token (program, `--program`): whole
generations compiled as one program (`decoding.Decoder`), the dispatch cost per step gone
(with `--copies N`, the median of N Decoders on the same weights, each compiled apart and all
timed in the same rounds: copies of one program have run a few percent apart on a GPU); per
block (program, `--program`): the first block looped on its own output in one compiled
program (with `--copies N`, the median of N loops, each compiled apart). Every program is
compiled as the `Decoder` compiles its own (`decoding.jit`: on a GPU, XLA's matrix-vector
products stay matrix products, in bfloat16 up to 256 MiB a weight cuBLAS's kernels), the
dense rows included.
Both implementations size their KV caches to the sequence timed (XLA's attention reads the
whole cache at every step), or to `--max_len` positions (as the gin files' 2048, where our
kernels read the caches as far as they are filled and XLA's ops all of them; such rows are
kept apart from Table 1's, as are rows of a `--prompt` other than Table 1's 128: with
`--max_len 2048 --prompt 1920`, tokens late in the gin files' caches). The floor is the
weight and KV-cache bytes a token must read, over the bandwidth measured in the same run
(`timing.memory_bandwidth`); a floor that its row beat is marked (the probe read slower than
the row). Every row is printed as it is measured, and each
part of a row (block, step, programs) as a line on stderr with the seconds it took; a
measurement that fails is reported with its error, not dropped. Writes
docs/results/table1.md and table1.png (table1_<backend> elsewhere than the CPU) as each shape's
rows are all measured, and the run's rows so far, as each is measured, to the same name with
`_partial` (.json and .md, removed when the run ends), so that a run cut off keeps them and
leaves the saved rows whole.
"""

import contextlib
import functools
import gc
import json
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sparse_scaling import decoding
from sparse_scaling.bench import common
from sparse_scaling.bench import timing
from sparse_scaling.bench.decoders import SHAPES
from sparse_scaling.bench.decoders import VARIANTS
from sparse_scaling.bench.decoders import build
from sparse_scaling.bench.decoders import dimensions
from sparse_scaling.bench.decoders import random_weights_and_state
from sparse_scaling.bench.decoders import scope_labels
from sparse_scaling.layers import attention_kernel
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import fused_residual
from sparse_scaling.layers import multiplicative_kernel
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers import sparse_qkv_block_kernel
from sparse_scaling.layers import sparse_qkv_kernel

MODULE = 'sparse_scaling.bench.table1'
# Table 1 of the paper: (s/token, s/block); None where it has no row.
PAPER = {
    ('800m', 'dense'): (0.160, 0.0059), ('800m', 'ff'): (0.093, 0.0031),
    ('800m', 'qkv'): (0.152, 0.0062), ('800m', 'ffqkv'): (0.061, 0.0019),
    ('17b', 'dense'): (3.690, 0.581), ('17b', 'ff'): (1.595, 0.259),
    ('17b', 'qkv'): (3.154, 0.554), ('17b', 'ffqkv'): (0.183, 0.014),
}
def kernel_choice(impl):
  """What decoding uses for `impl` (`layers/decode_kernels.py`): 'ours' the default (on GPUs
  the Sparse FF kernel), 'ours-pallas' every Pallas kernel, 'ours-xla' XLA's ops only."""
  return decode_kernels.use({'ours-xla': 'xla', 'ours-pallas': 'pallas'}.get(impl, 'auto'))


def kernels_used(dims, max_len=0):
  """'xla', or 'pallas: ' and the Pallas kernels a model of `dims` with caches of `max_len`
  positions decodes through now: a fused block (ffblock, qkvblock) where it takes the shapes,
  in place of its layer's own kernel (ff; qkv, mult and attn, at batch 1; mult also for the
  sparse loss)."""
  on = lambda kernel, pays=True: decode_kernels.active(kernel, pays) != 'xla'
  d_model, used = dims['d_model'], []
  if dims['ff_sparsity']:
    n, rank = dims['ff_sparsity']
    if on('sparse_ff_block') and sparse_ff_kernel.fits(rank, n):
      used.append('ffblock')
    elif on('sparse_ff') and sparse_ff_kernel.fits(rank, n):
      used.append('ff')
  s = dims['attention_sparsity']
  block = s and on('sparse_qkv_block') and sparse_qkv_block_kernel.fits(
      d_model, s, dims['n_heads'], (3, 3, 1), dims['length_kernel_size'])
  if block:
    used.append('qkvblock')
  elif s and on('sparse_qkv') and sparse_qkv_kernel.fits(d_model // s,
                                                          dims['length_kernel_size']):
    used.append('qkv')
  if ((s and not block) or dims.get('loss_sparsity')) and on(
      'multiplicative', multiplicative_kernel.pays(d_model)):
    used.append('mult')
  if not block and on('attention', attention_kernel.pays(1, dims['n_heads'], max_len)):
    used.append('attn')
  return 'pallas: ' + '+'.join(used) if used else 'xla'


def _stepper(step, weights, state, x):
  """call(): one `x, state = step(weights, state, x)`, jitted with the weights as arguments
  and the state donated, each call fed the last one's output; returns x."""
  step = decoding.jit(step, weights, donate_argnums=(1,))
  carry = [x, state]

  def call():
    carry[:] = step(weights, carry[1], carry[0])
    return carry[0]
  return call


def _timed_steps(step, weights, state, x, n_steps, warmup=3, flush=None):
  """Median and p90 seconds of `x, state = step(weights, state, x)`, state donated; with
  `flush`, called untimed before each step."""
  call = _stepper(step, weights, state, x)
  times = []
  for _ in range(n_steps + warmup):
    if flush:
      flush()
    times.append(timing.seconds_of(call))
  return timing.median_p90(times[warmup:])


def seconds_per_token(model, dtype, prompt, n_tokens, batch=1):
  """Median and p90 seconds of one greedy decoding step (of `batch` rows) after a prompt."""
  weights, state = random_weights_and_state(model, dtype, batch)
  weights = decoding.laid_out(model, weights)   # as a generation reads them

  def step(weights, state, tokens):
    logits, state = model.pure_fn(tokens, weights, state, None)
    return jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32), state

  tokens = jnp.ones((batch, prompt), jnp.int32)
  tokens, state = decoding.jit(step, weights)(weights, state, tokens)   # fill the caches
  return _timed_steps(step, weights, state, tokens, n_tokens)


def _first_block(model, dtype, drawn=None, position=0):
  """(step, weights, state, x): the first block's layers (attention and feed-forward,
  `scope_labels`) of `model` as `x, state = step(weights, state, x)`, with random weights
  laid out as a generation reads them (`decoding.laid_out`), fresh state (`drawn`, the
  model's (weights, state), where given) and one token's activations x [1, 1, d_model].
  With `position`, the state is the block's after a prompt of that many random activations
  [1, position, d_model] (one call, as a generation's prompt pass): its caches hold that
  many positions and the next token comes after them. From the model's late position on
  (`fused_residual.late_position`) the block runs as a generation's late loop runs it,
  within `fused_residual.late()`. Looped, the block comes after itself (`run_layers`'
  `wrap`): with `decode_kernels.PREFETCH` its last kernels ask the L2 cache for its own first
  kernel's weights, as a generation's ask for the next block's."""
  weights, state = drawn or random_weights_and_state(model, dtype)
  labels = scope_labels(model)
  index = [i for i, label in enumerate(labels) if label.startswith('block0/')]
  layers = [model.sublayers[i] for i in index]
  late_position = fused_residual.late_position(model)
  late = (fused_residual.late if late_position is not None and position >= late_position
          else contextlib.nullcontext)

  def step(weights, state, x):   # chained as in decoding where CHAIN lets (`run_layers`);
    with late():                 # looped, the block after it is itself
      return fused_residual.run_layers(layers, x, weights, state, wrap=True)

  d_model = jax.tree.leaves(weights[index[0]])[0].shape[0]
  x = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (1, 1, d_model), dtype)
  with late():
    weights = tuple(decoding.laid_out(model.sublayers[i], weights[i]) for i in index)
  state = tuple(state[i] for i in index)
  if position:
    prompt = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (1, position, d_model), dtype)
    _, state = decoding.jit(step, weights=weights, donate_argnums=1)(weights, state, prompt)
  return step, weights, state, x


def block_call(model, dtype, drawn=None, position=0):
  """call(): one decoding step of `model`'s first block (`_first_block`, on `drawn` where
  given, after `position` positions) as `seconds_per_block` times it, fed its own output;
  compiled now (the first call made). The call donates the state: `drawn`'s state is its own
  from then on."""
  call = _stepper(*_first_block(model, dtype, drawn, position))
  jax.block_until_ready(call())
  return call


def seconds_per_block(model, dtype, n_tokens, cold=False, position=0):
  """Median and p90 seconds of one block's decoding step, the block timed alone.

  The first block of `model` (`_first_block`, its caches filled to `position`) is jitted,
  weights as arguments and state donated, and fed one token's activations [1, 1, d_model] at
  a time, each step a position further on (up to the caches' last, where the rest stay).
  Where attention reads its whole cache at every step (XLA's path below
  `causal_attention.FILLED_MIN_LEN` positions), the cost does not depend on how full it is;
  the GPU kernels' and the CPU's loop over long caches read only the filled part. Called over and
  over, a small block's weights stay in the processor's cache from one step to the next, as
  in a decoded token they do not (the other blocks' weights evict them): with `cold`, the
  caches are flushed before each step (`timing.cache_flusher`).
  """
  return _timed_steps(*_first_block(model, dtype, position=position), n_tokens,
                      flush=timing.cache_flusher() if cold else None)


def seconds_per_block_side_by_side(make_calls, n_tokens, per_round=4):
  """`seconds_per_block` of several blocks, side by side: each of `make_calls` (no arguments)
  builds and compiles one (`block_call`, under whatever it needs in force), all before any is
  timed; then all are called in the same alternating rounds (`per_round` calls of each a
  round, the order reversed every other round: `timing.interleaved_times`), so that a drift of
  the machine falls on all of them alike. [(median, p90) seconds of a call, or the exception
  that building or compiling that block raised]."""
  calls = []
  for make in make_calls:
    try:
      calls.append(make())
    except Exception as e:  # pylint: disable=broad-except
      calls.append(e)
  timed = [call for call in calls if not isinstance(call, Exception)]
  times = iter(timing.interleaved_times(timed, rounds=max(1, n_tokens // per_round),
                                        runs_per_round=per_round))
  return [call if isinstance(call, Exception) else timing.median_p90(next(times))
          for call in calls]


def seconds_per_block_program(model, dtype, n_tokens, position=0):
  """Seconds of one block's decoding step in a compiled program: the first block of `model`
  (`_first_block`) applied to its own output `n_tokens` and 4·`n_tokens` times in one loop
  (`lax.fori_loop`, state donated), the difference over the difference in steps
  (`timing.per_step`: the fastest of 5 runs each, the lengths alternating). What a block
  costs inside a compiled generation, without the dispatch of a call that
  `seconds_per_block` pays per step (most of it on a GPU). Its loop is compiled as XLA
  compiles loops by default (`loops=False`), as in every run of this column before
  `decoding.GRAPH_LOOPS`: a generation's loop recorded as a CUDA graph costs a few µs an
  iteration, which a token hides and one block would not. `position`: as
  `seconds_per_block`'s."""
  return seconds_per_block_programs(model, dtype, n_tokens, position=position)[0]


def seconds_per_block_programs(model, dtype, n_tokens, copies=1, position=0):
  """`seconds_per_block_program` of `copies` loops of the block, each compiled apart, all on
  one draw of the weights and timed in the same alternating rounds (`timing.per_steps`): on
  an H200 two loops of one 800M block have run 9% apart (docs/decoding_gpu.md, "Where it
  stands"). [seconds per step] of each copy."""
  step, weights, state, x = _first_block(model, dtype, position=position)
  # Each loop donates its state: every copy gets its own, made before any runs.
  states = [state] + [jax.tree.map(jnp.copy, state) for _ in range(copies - 1)]
  runs = [_block_loop(step, weights, state, x) for state in states]
  return timing.per_steps(runs, n_tokens, 4 * n_tokens)


def block_loop(step):
  """`(weights, state, x, n_steps) -> (state, x)`: `x, state = step(weights, state, x)`
  n_steps times in one `lax.fori_loop`, the loop of the per-block program column, not yet
  compiled (`_block_loop` compiles it; `compile_only --blocks loop` for a GPU without one)."""
  def loop(weights, state, x, n_steps):
    def body(_, carry):
      x, state = carry
      return step(weights, state, x)
    x, state = jax.lax.fori_loop(0, n_steps, body, (x, state))
    return state, x
  return loop


def _block_loop(step, weights, state, x):
  """run(n_steps): `block_loop(step)` compiled anew for this run (XLA's loops; the state
  donated and carried from run to run); returns the last x."""
  loop = decoding.jit(block_loop(step), weights=weights, loops=False, static_argnums=3,
                      donate_argnums=1)
  holder = {'state': state}

  def run(n_steps):
    holder['state'], out = loop(weights, holder['state'], x, n_steps)
    return out
  return run


def generation_run(model_fn, dtype, prompt, weights_fn=None):
  """run(n): a greedy generation of n new tokens after `prompt` tokens, compiled whole
  (`decoding.Decoder`, compiled anew for each n the first time), batch 1, on random weights
  (`weights_fn(model, weights)` if given)."""
  return generation_runs(model_fn, dtype, prompt, weights_fn)[0]


def generation_runs(model_fn, dtype, prompt, weights_fn=None, copies=1):
  """`copies` runs of `generation_run`, each its own Decoder (and so its own compiled
  programs), all on one draw of the random weights."""
  model = model_fn()
  weights, _ = random_weights_and_state(model, dtype)
  weights = weights_fn(model, weights) if weights_fn else weights
  prompt_ids = np.ones((1, prompt), np.int32)
  runs = []
  for _ in range(copies):
    decoder = decoding.Decoder(model_fn, weights, dtype=dtype)
    runs.append(lambda n, decoder=decoder: decoder.generate(prompt_ids, n))
  return runs


def seconds_per_token_program(model_fn, dtype, prompt, n_tokens, weights_fn=None):
  """Seconds per token of greedy generations compiled whole (`generation_run`).

  The difference of `n_tokens` and `n_tokens // 4` new tokens (`timing.per_step`: the
  fastest of 5 generations each, the lengths alternating) over the difference in tokens: the
  prompt pass cancels out.
  """
  return seconds_per_token_programs(model_fn, dtype, prompt, n_tokens, weights_fn)[0]


def seconds_per_token_programs(model_fn, dtype, prompt, n_tokens, weights_fn=None, copies=1):
  """`seconds_per_token_program` of `copies` compiled copies of one generation
  (`generation_runs`), all timed in the same alternating rounds (`timing.per_steps`): on an
  H200 copies of one 800M generation have run up to ~3% apart (docs/decoding_gpu.md,
  "Compiled copies side by side"). [seconds per token] of each copy."""
  runs = generation_runs(model_fn, dtype, prompt, weights_fn, copies)
  return timing.per_steps(runs, max(1, n_tokens // 4), n_tokens)


def bytes_per_token(dims, n_layers, kv_len, itemsize):
  """Weight and KV-cache bytes one decoded token reads: the floor of its time."""
  d, d_ff, vocab = dims['d_model'], dims['d_ff'], dims['vocab_size']
  s, loss = dims['attention_sparsity'], dims['loss_sparsity']
  if s:
    m, lks = d // s, dims['length_kernel_size']
    attention = d * s + d * m + d + 2 * (lks * 3 * m * m + m) + lks * m * m + m
  else:
    attention = 4 * d * d + 4 * d
  if dims['ff_sparsity']:
    n, rank = dims['ff_sparsity']
    ff = d * rank + rank * d_ff + d_ff + 2 * (d_ff // n) * d + d_ff // n + d
  else:
    ff = 2 * d * d_ff + d_ff + d
  block = attention + ff + 4 * d + 2 * kv_len * d
  output = d * loss + d * vocab // loss + vocab if loss else d * vocab + vocab
  return itemsize * (n_layers * block + 2 * d + output)


def measure(shape, variants, impls, prompt, n_tokens, bandwidth, program=False, step=True,
            dtype=None, depth=None, on_row=None, copies=1, alternate=False, cold=False,
            probe=None, max_len=None):
  """Rows of one shape: each variant and implementation, one block timed alone and (with
  `step`) the whole decoder's jitted step and (with `program`) its compiled generation, of
  `depth` blocks (default: the shape's, `SHAPES`); with `copies`, the median of that many
  compiled copies of the generation and of the block's loop (each copy's time in
  `s_per_token_program_copies` and `s_per_block_program_copies`); with `alternate`, the
  per-block column of every variant and implementation measured side by side first
  (`seconds_per_block_side_by_side`: all their blocks in memory at once); with `cold`, each
  block's step timed after the caches are flushed (`seconds_per_block`). Each
  row is printed (flushed) and given to `on_row` as soon as it is measured, so that a run cut
  off keeps the rows it finished.

  A measurement that fails (a column an implementation cannot fill) gives a row with the
  error instead, and the others go on. `probe` names the bandwidth probe that read
  `bandwidth` (`timing.memory_bandwidth`), kept in each row. `max_len`: the KV caches'
  positions (None: prompt + n_tokens + 8, Table 1's 168), kept in each row where given;
  `prompt`, kept in each row where it is not Table 1's PROMPT, also fills the caches of the
  per-block columns' block before its steps are timed (`_first_block`).
  """
  _, shape_dtype, _, whole = SHAPES[shape]
  dtype, whole = dtype or shape_dtype, depth or whole
  caches = ({} if max_len is None else dict(max_len=max_len)) | (
      {} if prompt == PROMPT else dict(prompt=prompt))
  max_len = max_len or prompt + n_tokens + 8
  settings = [(variant, impl) for variant in variants for impl in impls]
  side_by_side = {}
  if alternate:
    def block(variant, impl):
      with kernel_choice(impl):
        return block_call(build(impl, dimensions(shape, variant), 1, max_len), dtype,
                          position=prompt)
    side_by_side = dict(zip(settings, seconds_per_block_side_by_side(
        [functools.partial(block, *setting) for setting in settings], n_tokens)))
    gc.collect()
  rows = []
  for variant in variants:
    dims = dimensions(shape, variant)
    for impl in impls:
      read = bytes_per_token(dims, whole, prompt + n_tokens // 2, jnp.dtype(dtype).itemsize)
      row = dict(shape=shape, variant=variant, impl=impl, dtype=dtype, depth=whole,
                 machine=timing.machine_description(), floor_s_per_token=read / bandwidth,
                 bytes_per_token=read, bandwidth=bandwidth, probe=probe, s_per_token=None,
                 p90_s_per_token=None, s_per_token_program=None, **caches)
      with kernel_choice(impl):
        row['kernel'] = kernels_used(dims, max_len)
        for name, run in [
            ('block', lambda: _raised(side_by_side[variant, impl]) if alternate else
             seconds_per_block(build(impl, dims, 1, max_len), dtype, n_tokens, cold,
                               prompt)),
            ('step', lambda: seconds_per_token(build(impl, dims, whole, max_len), dtype,
                                               prompt, n_tokens) if step else None),
            ('block_program', lambda: seconds_per_block_programs(
                build(impl, dims, 1, max_len), dtype, n_tokens, copies, prompt)
                if program else None),
            ('program', lambda: seconds_per_token_programs(
                functools.partial(build, impl, dims, whole, max_len), dtype, prompt,
                n_tokens, copies=copies) if program else None)]:
          start = time.perf_counter()
          try:
            result = run()
          except Exception as e:  # pylint: disable=broad-except
            row.setdefault('errors', {})[name] = f'{type(e).__name__}: {str(e)[:300]}'
            result = None
          _progress(row, name, result, time.perf_counter() - start)
          if name == 'block':
            row['s_per_block'], row['p90_s_per_block'] = result or (None, None)
            if alternate:
              row['block_side_by_side'] = True
            if cold:
              row['block_cold'] = True
          elif name == 'step' and result:
            row['s_per_token'], row['p90_s_per_token'] = result
          elif name == 'program' and result:
            row['s_per_token_program'] = float(np.median(result))
            if copies > 1:
              row['s_per_token_program_copies'] = result
          elif name == 'block_program':
            row['s_per_block_program'] = float(np.median(result)) if result else None
            if result and copies > 1:
              row['s_per_block_program_copies'] = result
          if result is not None or name in row.get('errors', {}):   # the part ran: frees its
            gc.collect()   # model and buffers (a full pass, ~0.3 s in a test process)
      rows.append(row)
      print(json.dumps(row), flush=True)
      if on_row:
        on_row(row)
  return rows


def _progress(row, part, result, seconds):
  """One line on stderr as each part of a row is measured (flushed): a run cut off before
  its row is complete (a large shape compiling for minutes) still says what it measured and
  how long each part took."""
  if result is None:
    value = 'skipped' if not row.get('errors', {}).get(part) else 'failed'
  else:
    times = [t for t in np.ravel(result) if t is not None]
    value = ', '.join(f'{t * 1e3:.4f}' for t in times) + ' ms'
  print(f'table1: {_setting_label(*_setting(row))} '
        f'{row["variant"]} {row["impl"]}, {part}: {value} (measured in {seconds:.0f} s)',
        file=sys.stderr, flush=True)


def _raised(result):
  """`result`, or raises it where it is an exception (a block that failed to build or compile
  in `seconds_per_block_side_by_side`)."""
  if isinstance(result, Exception):
    raise result
  return result


def batch_curve(prompt, n_tokens, batches=(1, 2, 4, 8, 16, 32, 64)):
  """Seconds per decoding step of the whole 800M decoder, dense and FF+QKV, per batch size."""
  _, dtype, _, depth = SHAPES['800m']
  curve = []
  for batch in batches:
    seconds = {v: seconds_per_token(build('ours', dimensions('800m', v), depth,
                                          prompt + n_tokens + 8), dtype, prompt, n_tokens,
                                    batch)[0] for v in ('dense', 'ffqkv')}
    curve.append(dict(batch=batch, dense_s=seconds['dense'], ffqkv_s=seconds['ffqkv'],
                      speedup=seconds['dense'] / seconds['ffqkv']))
    print(json.dumps(curve[-1]), flush=True)
    gc.collect()
  return curve


def write_batch_curve(curve, path_md, path_png):
  """The batch curve as a Markdown table and a plot."""
  text = common.table(['batch', 'dense s/step', 'FF+QKV s/step', 'speedup'],
                      [[c['batch'], f'{c["dense_s"]:.4f}', f'{c["ffqkv_s"]:.4f}',
                        f'{c["speedup"]:.2f}x'] for c in curve])
  path_md.write_text('# Where sparsity stops paying: speedup of FF+QKV over dense by batch\n\n'
                     f'`{common.command_line(MODULE)}` ({timing.machine_description()}; the '
                     '24-layer 800M decoder, ours, float32; one step decodes a token for every '
                     'row)\n\n' + text + '\n')
  fig, ax = common.pyplot().subplots(figsize=(5, 3.5))
  ax.plot([c['batch'] for c in curve], [c['speedup'] for c in curve], 'o-')
  ax.axhline(1.0, color='gray', lw=0.8)
  ax.set_xscale('log', base=2)
  ax.set_xlabel('batch size')
  ax.set_ylabel('dense time / FF+QKV time')
  ax.set_title('800M decoder: speedup of Sparse FF+QKV')
  common.save_figure(fig, path_png)


IMPLS = ('ours', 'ours-pallas', 'ours-xla', 'trax')
PROMPT = 128   # Table 1's prompt (`--prompt`'s default); rows of other prompts keep theirs


def _setting(row):
  """What a row's speedups are relative to: its shape, depth, dtype, caches (None: the run's
  prompt and tokens and 8 spare positions, Table 1's) and prompt (None: Table 1's PROMPT)."""
  return (row['shape'], row.get('depth', SHAPES[row['shape']][3]), row['dtype'],
          row.get('max_len'), row.get('prompt'))


def _setting_order(setting):
  """Where a `_setting` comes in the tables and figures: by shape as SHAPES lists them,
  depth, float32 before other dtypes, then Table 1's caches before longer ones, and Table
  1's prompt before longer ones."""
  shape, depth, dtype, caches, prompt = setting
  return (list(SHAPES).index(shape), depth, dtype != 'float32', dtype, caches or 0,
          prompt or 0)


def _copies_cell(row, key, scale, digits):
  """A program column's cell: row[key] scaled, and its copies' range where there were several
  (`measure`'s `copies`; to the microsecond: copies of an 800M generation on a GPU differ by a
  few)."""
  if not row.get(key):
    return ''
  copies = row.get(key + '_copies')
  spread = (f' ({min(copies) * scale:.{digits}f}-{max(copies) * scale:.{digits}f}, '
            f'{len(copies)} copies)' if copies else '')
  return f'{row[key] * scale:.{digits}f}{spread}'


def markdown(rows, n_tokens):
  """The results as a Markdown table: one row per variant and implementation, the paper's
  figures beside ours; speedups against the same implementation's dense row. Rows that keep
  no prompt were measured after Table 1's (PROMPT)."""
  bandwidths = ', '.join(sorted({
      f'{_setting_label(*_setting(r))}: {r["bandwidth"] / 1e9:.0f} GB/s'
      + (f' by the {r["probe"]}' if r.get('probe') else '') for r in rows}))
  by_key = {(*_setting(r), r['variant'], r['impl']): r for r in rows}
  lines = [
      f'Machine: {_machines(rows)}; bandwidth '
      f'measured in each run ({bandwidths}). Batch 1, prompt {PROMPT} tokens unless the '
      f'shape column names another, {n_tokens} decoded tokens (KV caches of '
      f'{PROMPT + n_tokens + 8} unless the shape column names others). ms/block: one '
      'block (attention and FF) timed alone, median (p90) of its steps, each step a call '
      '(program: the block looped in one compiled program, no dispatch per step); s/token: '
      'the whole '
      'decoder, one jitted step per token (step) or the whole generation as one compiled '
      'program (program); in a program column where several compiled copies were timed, '
      'their median and, in brackets, their range; floor: the weight and KV bytes a token '
      'reads over the bandwidth. '
      'Speedups are against the dense row of the same implementation, shape, depth and '
      'dtype. Implementations: ours (the default: on a GPU the sparse blocks decode through '
      'fused Pallas kernels, the kernel column names them; XLA\'s ops otherwise), ours-pallas '
      '(every Pallas kernel, also attention over the KV cache of dense attention), ours-xla '
      '(XLA\'s ops only), trax (trax 1.4.1\'s `ConfigurableTransformerLM`).'
      + (' ms/block marked *: the blocks of the shape\'s rows so marked compiled first and '
         'then called in the same alternating rounds (`--alternate`), their speedups measured '
         'side by side.' if any(r.get('block_side_by_side') for r in rows) else '')
      + (' floor marked †: its row decoded a token in less than the floor, reading '
         + ', '.join(f'{_setting_label(*_setting(r))} {r["variant"]} '
                     f'{r["impl"]} at '
                     f'{r["bytes_per_token"] / _fastest_token(r) / 1e9:.0f} GB/s'
                     for r in rows if _beats_floor(r))
         + ', above the run\'s bandwidth probe: there the probe understates the memory\'s '
         'rate and the floor is an upper bound.' if any(_beats_floor(r) for r in rows) else '')
      + (' ms/block marked "cold": each step timed after the caches were flushed (a 256 MB '
         'buffer read and written, `--cold`), as a decoded token\'s block finds its weights '
         'evicted by the other blocks\'; unmarked, the block\'s weights may stay in the cache '
         'from step to step.' if any(r.get('block_cold') for r in rows) else ''),
      '',
      common.table_header(['shape', 'variant', 'impl', 'dtype', 'ms/block (p90)',
                           'speedup/block', 'ms/block, program', 'speedup/block, program',
                           's/token, step', 's/token, program',
                           'speedup/token, program', 'floor s/token', 'paper s/token',
                           'paper speedup/block'])]
  order = lambda kv: (*_setting_order(kv[0][:5]), VARIANTS.index(kv[0][5]),
                      IMPLS.index(kv[0][6]))
  ratio = lambda a, b: f'{a / b:.2f}x' if a and b else ''
  for (*setting, variant, impl), row in sorted(by_key.items(), key=order):
    shape, depth, dtype, caches, prompt = setting
    dense = (by_key.get((*setting, 'dense', impl))
             or by_key.get((*setting, 'dense', 'ours'), {}))
    paper, paper_dense = PAPER.get((shape, variant)), PAPER.get((shape, 'dense'))
    block = row.get('s_per_block')
    cells = [_setting_label(shape, depth, caches=caches, prompt=prompt), variant,
             impl + (f' ({row["kernel"]})' if row.get('kernel') and impl != 'trax' else ''),
             row['dtype'],
             (f'{block * 1e3:.3f} ({row["p90_s_per_block"] * 1e3:.3f})'
              + ('*' if row.get('block_side_by_side') else '')
              + (' cold' if row.get('block_cold') else '')) if block else 'failed',
             ratio(dense.get('s_per_block'), block),
             _copies_cell(row, 's_per_block_program', 1e3, 4),
             ratio(dense.get('s_per_block_program'), row.get('s_per_block_program')),
             f'{row["s_per_token"]:.5f}' if row.get('s_per_token') else '',
             _copies_cell(row, 's_per_token_program', 1, 6),
             ratio(dense.get('s_per_token_program'), row.get('s_per_token_program')),
             f'{row["floor_s_per_token"]:.5f}' + ('†' if _beats_floor(row) else ''),
             f'{paper[0]:.3f}' if paper else '',
             ratio(paper_dense[1], paper[1]) if paper else '']
    lines.append(common.table_row(cells))
  errors = [f'- {r["shape"]} {r["variant"]} {r["impl"]}, {part}: {message}'
            for r in rows for part, message in r.get('errors', {}).items()]
  if errors:
    lines += ['', 'Measurements that failed:', ''] + errors
  return '\n'.join(lines)


def _machines(rows):
  """The machine the rows were measured on; where they were measured on several, each with
  the settings it measured ('A (800m, caches of 2048); B (17b, 800m)')."""
  settings = {}
  for r in rows:
    settings.setdefault(r.get('machine', ''), set()).add(_setting_label(*_setting(r)))
  if len(settings) == 1:
    return next(iter(settings))
  return '; '.join(f'{machine} ({", ".join(sorted(labels))})'
                   for machine, labels in sorted(settings.items()))


def _fastest_token(row):
  """The row's fastest measured seconds per token (step or program), or None."""
  times = [t for t in (row.get('s_per_token'), row.get('s_per_token_program')) if t]
  return min(times) if times else None


def _beats_floor(row):
  """Whether the row decoded a token in less than its floor: it read faster than the run's
  bandwidth probe (on an H100 the dense 17B generation read 3.0 TB/s, its probe 2.8)."""
  fastest = _fastest_token(row)
  return bool(fastest) and fastest < row['floor_s_per_token']


def _setting_label(shape, depth, dtype='float32', caches=None, prompt=None):
  """'17b', '17b (15 blocks)', '800m, bfloat16', '800m, caches of 2048', '800m, caches of
  2048, prompt of 1920': a setting as the tables (their shape column, dtype apart) and
  figures name it."""
  return (shape + (f' ({depth} blocks)' if depth != SHAPES[shape][3] else '')
          + (f', {dtype}' if dtype != 'float32' else '') + _positions_label(caches, prompt))


def _positions_label(caches, prompt):
  """', caches of 2048, prompt of 1920': a setting's caches and prompt where they are not
  Table 1's (None), as labels end."""
  return (f', caches of {caches}' if caches else '') + (f', prompt of {prompt}' if prompt else '')


def plot(rows, path):
  """Bar chart of ms/block per variant, ours and trax's, one panel per shape, depth and
  dtype."""
  settings = sorted({_setting(r) for r in rows}, key=_setting_order)
  fig, axes = common.pyplot().subplots(1, len(settings), figsize=(6 * len(settings), 4),
                                       squeeze=False)
  for ax, setting in zip(axes[0], settings):
    shape = setting[0]
    for i, impl in enumerate(['ours', 'trax']):
      values = [next(((r.get('s_per_block') or 0) * 1e3 for r in rows if _setting(r) == setting
                      and r['variant'] == v and r['impl'] == impl), 0) for v in VARIANTS]
      ax.bar(np.arange(len(VARIANTS)) + 0.4 * i, values, 0.4, label=impl)
    paper = [PAPER.get((shape, v), (0, 0))[1] * 1e3 for v in VARIANTS]
    ax.scatter(np.arange(len(VARIANTS)) + 0.2, paper, color='k', marker='_', s=300,
               label='paper', zorder=3)
    ax.set_xticks(np.arange(len(VARIANTS)) + 0.2, VARIANTS)
    ax.set_yscale('log')
    ax.set_ylabel('ms per block per token')
    ax.set_title(f'{_setting_label(*setting)}: unbatched decoding')
    ax.legend()
  common.save_figure(fig, path)


def define_flags():
  """Defines the command line's flags; only when run as a program (others have namesakes)."""
  common.define_flags(json_output=True, shapes=SHAPES,
                      writes='docs/results/table1.md and table1.png')
  flags.DEFINE_integer('prompt', PROMPT, 'Prompt length (KV cache filled before timing).',
                       lower_bound=1)
  flags.DEFINE_integer('tokens', 32, 'Decoded tokens timed per measurement.', lower_bound=1)
  flags.DEFINE_list('impls', ['ours', 'trax'], f'Implementations to time, of {list(IMPLS)}.')
  flags.DEFINE_string('dtype', None, "Weights' dtype (default: the shape's, float32).")
  flags.DEFINE_bool('step', True, 'Also time the whole decoder as one jitted step per token.')
  flags.DEFINE_list('variants', list(VARIANTS),
                    'Variants to time (dense first: speedups are against it).')
  flags.DEFINE_bool('render_only', False,
                    'Only rewrite table1.md and .png from the saved table1.json.')
  flags.DEFINE_bool('batch_curve', False, 'Instead: FF+QKV vs dense speedup by batch size at '
                    '800M (docs/results/batch_curve.md, .png).')
  flags.DEFINE_bool('program', False, 'Also time whole generations compiled as one program '
                    '(our Decoder), for both implementations: the per-step dispatch cost that '
                    'dominates on a GPU is then gone.')
  flags.DEFINE_integer('copies', 1, '--program: compile each generation and each block\'s loop '
                       'this many times (one draw of the weights) and give the median of the '
                       'copies, timed in the same rounds.', lower_bound=1)
  flags.DEFINE_bool('alternate', False, 'Time the per-block column of a shape\'s variants '
                    'side by side: every block compiled first, then all called in the same '
                    'alternating rounds (all of them in memory at once: at 17B about 7 GB a '
                    'variant).')
  flags.DEFINE_bool('cold', False, 'Time the per-block column with the caches flushed before '
                    'each step (a 256 MB buffer read and written, untimed): the block\'s '
                    'weights then come from memory, as in a decoded token.')
  flags.DEFINE_integer('depth', None, "Blocks of the whole decoder timed per token (default: "
                       "the shape's, 24 at 800m and 2 at 17b; 15 at 17b is the whole "
                       '~17B-weight decoder).', lower_bound=1)
  flags.DEFINE_integer('max_len', None, "The KV caches' positions (default: --prompt + "
                       '--tokens + 8, Table 1\'s 168; e.g. 2048, the gin files\' MAX_LEN: '
                       'rows of their own in the results).')
  flags.DEFINE_string('results', None, 'Base name of the result files in docs/results/ '
                      '(default: table1 on CPU, table1_<backend> elsewhere).')


def write_results(name, rows, n_tokens):
  """docs/results/<name>.json, .md and .png: `rows` (a shape's, all measured) in place of the
  saved rows of their setting (`_setting`: shape, depth, dtype, caches and prompt), so that
  each setting's speedups stay side by side in one run."""
  merged = common.merge_json(common.RESULTS_DIR / f'{name}.json', rows, key=_setting)
  (common.RESULTS_DIR / f'{name}.md').write_text(
      '# Table 1, reproduced: unbatched decoding time\n\n'
      + commands(merged, name) + '\n\n' + markdown(merged, n_tokens) + '\n')
  plot(merged, common.RESULTS_DIR / f'{name}.png')


def measure_and_write(name, shapes, variants, impls, prompt, n_tokens, bandwidth, write=True,
                      **options):
  """`measure`'s rows of each of `shapes` (`options`: its keyword arguments), each with the
  command line that measured it. With `write`, a shape's rows go into `write_results` once
  all of them are measured, and the run's rows so far into docs/results/<name>_partial.json
  and .md as each is measured: a run cut off (a time limit) keeps its rows there and leaves
  the saved rows of a shape it did not finish as they were. The partial files are removed as
  the run ends."""
  rows, command = [], common.command_line(MODULE)
  partial = [common.RESULTS_DIR / f'{name}_partial.{suffix}' for suffix in ('json', 'md')]

  def on_row(row):
    rows.append(dict(row, command=command))
    if write:
      common.write_json(partial[0], rows)
      partial[1].write_text(f'# Table 1: the rows of a run not finished\n\n`{command}`\n\n'
                            + markdown(rows, n_tokens) + '\n')

  for shape in shapes:
    done = len(rows)
    measure(shape, variants, impls, prompt, n_tokens, bandwidth, on_row=on_row, **options)
    if write and rows[done:]:
      write_results(name, rows[done:], n_tokens)
  if write and rows:   # this run's own partial files (a render leaves a cut-off run's)
    for path in partial:
      path.unlink(missing_ok=True)
  return rows


def commands(rows, name):
  """The commands that measured `rows` (each row keeps its run's), as Markdown lines: which
  rows each made, in the order they were saved."""
  made = {}
  for row in rows:
    shape, depth, dtype, *positions = _setting(row)
    made.setdefault(row.get('command'), {})[
        f'{shape} ({depth} blocks) {dtype}' + _positions_label(*positions)] = None
  lines = [f'The rows, by the command that measured them (a run\'s rows replace the saved rows '
           f'of the same shape, depth, dtype, caches and prompt in `{name}.json`):', '']
  lines += [(f'- `{command}`' if command else '- a command not recorded (a run before runs '
             'recorded theirs)') + ': ' + ', '.join(settings)
            for command, settings in made.items()]
  return '\n'.join(lines)


def check_flags(args):
  """Raises app.UsageError, naming the flag and its rule, where `args` (the parsed flags)
  ask for what the benchmark cannot run."""
  if not set(args.variants) <= set(VARIANTS) or args.variants[:1] != ['dense']:
    raise app.UsageError(f'--variants: {args.variants} must start with dense and name only '
                         f'{list(VARIANTS)}')
  if not set(args.impls) <= set(IMPLS):
    raise app.UsageError(f'--impls: {args.impls} must name only {list(IMPLS)}')
  if args.copies > 1 and not args.program:
    raise app.UsageError(f'--copies {args.copies}: copies of the compiled generation need '
                         '--program')
  if args.alternate and args.cold:
    raise app.UsageError('--alternate and --cold: choose one (the alternating rounds flush '
                         'no cache)')
  if args.max_len is not None and args.max_len < args.prompt + args.tokens:
    raise app.UsageError(f'--max_len: {args.max_len} must hold the prompt and the decoded '
                         f'tokens (at least --prompt + --tokens = {args.prompt + args.tokens})')
  if args.dtype not in (None, 'float32', 'bfloat16'):
    raise app.UsageError(f'--dtype: {args.dtype!r} must be float32 or bfloat16')


def main(argv):
  del argv
  args = flags.FLAGS
  if args.batch_curve:
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    write_batch_curve(batch_curve(args.prompt, args.tokens),
                      common.RESULTS_DIR / 'batch_curve.md', common.RESULTS_DIR / 'batch_curve.png')
    return
  shapes_measured = [] if args.render_only else (args.shapes or list(SHAPES))
  check_flags(args)
  name = args.results or ('table1' if jax.default_backend() == 'cpu'
                            else f'table1_{jax.default_backend()}')
  bandwidth, probe = (None, None) if args.render_only else timing.memory_bandwidth(True)
  rows = measure_and_write(name, shapes_measured, args.variants, args.impls, args.prompt,
                           args.tokens, bandwidth, args.write, probe=probe,
                           program=args.program,
                           step=args.step, dtype=args.dtype, depth=args.depth,
                           copies=args.copies, alternate=args.alternate, cold=args.cold,
                           max_len=args.max_len)
  if rows:
    print(markdown(rows, args.tokens))
  elif args.write:   # --render_only
    write_results(name, rows, args.tokens)
  if args.json:
    print(json.dumps([{k: r.get(k) for k in ('shape', 'variant', 'impl', 's_per_token',
                                             's_per_block', 's_per_token_program',
                                             'floor_s_per_token')} for r in rows]))


if __name__ == '__main__':
  common.run(main, define_flags)
