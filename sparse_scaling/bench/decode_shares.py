"""How the fused blocks' work is shared among programs: a sweep, side by side.

  python -m sparse_scaling.bench.decode_shares [--shape 800m] [--variant ffqkv] [--depth 6]
      [--measure token] [--alternate] [--dtype float32]
      [--settings default,DOT=0,WIDTH=16,ROWS=32,...]

A setting is NAME=value pairs joined by '+' ('default' changes nothing); each name is a module
constant, set while the setting is measured and restored after it. The names, by module:

  layers/sparse_qkv_block_kernel.py (how a token's Sparse QKV block is split over programs)
    ROWS, SPLIT, MIXED_CHANNELS  input rows, modules and channels per multiplicative program
    WIDTH, MODULES               channels and modules per convolution program
    VALUE_WIDTH                  value columns per attention program
    MIXED_WARPS, CONV_WARPS, ATTEND_WARPS   warps per program of each kernel
    DOT                          1: the multiplicative product as one matrix product
    STATS_IN_KERNEL              the largest d_model at which each multiplicative program
                                 computes its row's LayerNorm statistics itself
    MAX_D_MODEL                  the largest d_model the attention block takes (`--measure
                                 block` at 17B with 16384 times the block where it declines)
    MAX_PARTS                    the most partial sums the convolutions add themselves
    ATTEND_FILLED                `FILLED_MIN_LEN`: the fewest cache positions at which the
                                 attention programs read the caches in a loop, only the
                                 blocks up to the token's position (100000: never, every
                                 block loaded first)
    ATTEND_POSITIONS             `POSITIONS`: cache positions per block of those programs
    ATTEND_FIRST                 `FILLED_FIRST`: the blocks they load first before the loop
                                 (0: every block in the loop)
    ATTEND_STEP                  `FILLED_STEP`: the blocks the loop reads a step, loaded
                                 first
    LATE                         `LATE_POSITION`: a generation's tokens from this cache
                                 position on decline the block, as does a block timed
                                 after a PROMPT that reaches it (none: never; token,
                                 block, call)
    CACHES                       `PREFETCH_CACHES`, 1: the multiplicative programs ask the
                                 L2 cache for the KV caches that attention reads
    STATE                        `PREFETCH_STATE`, 1: they ask for the convolution's state
                                 too
    QKV_MOSAIC                   `MOSAIC`, 1: the multiplicative, convolution and attention
                                 programs as Mosaic GPU kernels (`sparse_qkv_mosaic.py`) where
                                 the shapes fit (token, block, trace)
    MOSAIC_ATTEND                with QKV_MOSAIC=1, 0: the attention programs Triton's
  layers/sparse_qkv_mosaic.py (with QKV_MOSAIC=1)
    MOSAIC_CHANNELS              `CHANNELS`: channels of M per multiplicative program
    MOSAIC_WIDTH                 `WIDTH`: output channels per convolution program
    (MODULES=all and MIXED_CHANNELS=all: None, the kernel's choice and all of M; LATE=none:
    None)
  layers/sparse_ff_kernel.py
    FF_GROUP, FF_WARPS           blocks of N units and warps per units program
    FF_ROWS                      rows of C1 per LayerNorm-controller program
    FF_PARTS_BYTES               the most bytes of parts the units programs write (each its
                                 rows of W2 times their activations); beyond, a second kernel
                                 multiplies W2's rows (0: always)
    FF_COLUMNS, FF_GATHER        columns of d_model per program of that kernel, rows it
                                 gathers a load
    FF_MOSAIC                    `MOSAIC`, 1: the LayerNorm-controller and units programs
                                 as Mosaic GPU kernels (`sparse_ff_mosaic.py`) where the
                                 shapes fit (token, block, trace)
  layers/sparse_qkv.py
    CONV_LAYOUT                  `DECODE_LAYOUT`, 0: the convolutions' kernels as trax lays
                                 them out, 1: laid out once per generation (rows padded; one
                                 product, or one per module kernel size with CONV_ONE=0; by
                                 default on GPUs), where XLA's ops take the attention block
                                 (17B; token, block, call)
    CONV_ONE                     `ONE_PRODUCT`, 0: that layout as one product per module
                                 kernel size, 1: as one product of all three convolutions,
                                 V's kernel among zeros (the default; token, block, call)
    CONV_STATE                   `STATE_FROM_FIELDS`, 0: a laid-out token's new convolution
                                 state from the window (XLA copies the old state first),
                                 1: from the receptive fields (the default; token, block,
                                 call)
  layers/feed_forward.py
    RELU_MAX                     `RELU_AS_MAXIMUM`, 0: a dense FF's ReLU as trax's select, 1:
                                 as max(x, 0) (the default; dense variants)
  layers/layer_norm.py
    LN_ONE_PASS                  `ONE_PASS`, 0: a decoded token's LayerNorm statistics as
                                 trax's two reductions, 1: as one pass (the default; where
                                 XLA's ops take the LayerNorm: 17B's attention block on a
                                 GPU, dense blocks, the final LayerNorm)
  layers/multiplicative_dense.py
    MULT_FORM                    `DECODE_FORM`: a few tokens' multiplicative product as 0,
                                 one einsum (the default), 1, D @ (x·E), 2, one reduction,
                                 or 0 on the tensor cores as six bfloat16 products (3) or
                                 three TF32 (4, GPUs only) (where XLA's ops take it: 17B on a
                                 GPU, every CPU path; token, block, call)
  layers/multiplicative_kernel.py (a few tokens' multiplicative product as one kernel)
    MULT_MIN                     `MIN_D_IN`: the least d_in at which 'auto' takes the kernel
                                 on a GPU (by default never; 8192: at 17B)
    MULT_ROWS, MULT_STEP         input rows per program, and per step of its loop
    MULT_MODULES, MULT_CHANNELS  modules and channels per program
    MULT_WARPS, MULT_STAGES      warps per program; Triton's pipeline stages (0: its own)
    MULT_LOOP                    `LOOP`, 0: the steps unrolled, every load first
    MULT_PRECISION               `PRECISION` of a float32 product: 0 IEEE, 1 three TF32
                                 products, 2 one
  layers/sparse_qkv_fields_kernel.py (a token's receptive fields from the multiplicative
  layer's parts, where XLA's ops take the attention block)
    FIELDS_MIN                   `MIN_D_MODEL`: the least d_model at which 'auto' takes the
                                 kernel on a GPU (by default 8192: 17B's; 0: wherever the
                                 block declines and its convolutions are laid out as one
                                 product; none: never; token, block, call)
    FIELDS_PARTS, FIELDS_WARPS   `PARTS`: the slices of d_in the multiplicative product is
                                 split into (P), `WARPS`: warps per program
  layers/attention_kernel.py (attention over the KV cache, where the layer's own kernel runs)
    ATTN_ROWS                    `MIN_ROWS`: the fewest rows·heads a step attends from for
                                 'auto' to take the kernel on a GPU (100000: never)
    ATTN_SPLIT                   `SPLIT`, 0: programs by value columns, 1: by blocks of
                                 positions (the default)
    ATTN_SKIP                    `SKIP`, 0: with ATTN_SPLIT, blocks past the token's position
                                 load and mask all of the cache, as XLA's path reads it (1,
                                 the default: they load nothing)
    ATTN_POSITIONS               `POSITIONS`: cache positions per block
    ATTN_LEN                     `MIN_LEN`: the fewest cache positions at which 'auto' takes
                                 the kernel on a GPU whatever the rows·heads (512; 100000:
                                 never, as 800M's dense blocks before)
    ATTN_WIDTH, ATTN_WARPS       `VALUE_WIDTH` (value columns per program with ATTN_SPLIT=0)
                                 and warps per program
  layers/causal_attention.py
    FILLED_MIN                   `FILLED_MIN_LEN`: on a CPU, the fewest cache positions at which
                                 a one-token step reads only the caches' filled blocks
                                 (100000: never)
    FILLED_BLOCK                 `FILLED_BLOCK`: the positions of such a block
    FILLED_UNTIL                 `FILLED_UNTIL`: the percent of the caches up to which the
                                 token's position takes that loop, the whole-cache
                                 products past it (100: the loop at every position)
  layers/sparse_ff.py
    CHUNK                        `CPU_CHUNK_BYTES`: on a CPU, the most bytes of W1's float32
                                 chosen rows a token gathers at once, 0 all (token, block,
                                 call)
  layers/fused_residual.py
    CHAIN                        1: each attention block hands the FF block after it its
                                 LayerNorm's partial sums, one kernel fewer a layer (token,
                                 block)
  decoding.py
    CPU_TOP_K                    1: on a CPU, the controller's and greedy decoding's argmax
                                 as `lax.top_k` (token, block)
    CUBLAS_BYTES                 `CUBLAS_MAX_BYTES`: on a GPU, bfloat16 programs whose weights
                                 are at most that many bytes each multiply with cuBLAS's
                                 kernels, 0 none (token, block, with --dtype bfloat16; any
                                 variant, dense included)
    GRAPHS                       `GRAPH_LOOPS`, 0: a generation's loop is not one CUDA graph
                                 (token)
  layers/decode_kernels.py
    EARLY                        `LAUNCH_EARLY`, 1: every kernel's programs let the next
                                 kernel launch as they start
    PREFETCH                     1: the kernels ask the L2 cache for the next kernel's fixed
                                 weights as they start (`decode_kernels.prefetch`; token,
                                 block; chained blocks, and FF blocks unchained, as at 17B)
    PERSIST                      `L2_PERSIST`, 1: each kernel asks the L2 cache for its own
                                 fixed weights with the evict_last priority, the L2 set aside
                                 for such lines for the rest of the process; 2: the same
                                 requests with no priority; 3 and 4: 1 and 2 with one
                                 request a program and array; 0: none (by default 3 in
                                 bfloat16, 0 in float32: `persist_level`; token, block)
    KEEP_BYTES                   `KEEP_MAX_BYTES`: the most bytes of fixed weights a kernel
                                 asks the L2 cache to keep (token, block)
  XLA's options for every decoding program on a GPU (`xla_options`; token, block, trace)
    DOT_MERGER                   0: XLA's `dot-merger` pass (one product of two that share an
                                 operand) off
    TILING_SEARCH                1: `xla_gpu_exhaustive_tiling_search`, every tiling of
                                 XLA's Triton products timed as it compiles
    TRITON_GEMM                  0: cuBLAS's product kernels in place of XLA's Triton ones
  bench/decoders.py
    CACHE                        `MAX_LEN`: the KV caches' positions (168 by default, Table
                                 1's; e.g. 2048, the gin files' MAX_LEN, for a long cache)
  this module
    SHARED                       `SHARED_WEIGHTS` (token): 1 gives every block block 0's
                                 arrays of its kind, so that on a GPU they stay in the L2
                                 cache; 2 all but those of LARGE elements or more (W1 and W2,
                                 whose chosen rows a token reads): what reading the weights
                                 from the card's memory costs a token
    PROMPT                       the positions the caches hold before timing (128 by
                                 default): token's prompt, and where block's and call's
                                 block starts (its caches filled by one prompt pass); with
                                 CACHE, e.g. CACHE=2048+PROMPT=1920 times tokens late in
                                 the gin files' caches

For each setting this builds the Table 1 decoder of `--variant` at `--shape` with `--depth`
blocks (`decoders.py`, random weights, batch 1, `--dtype`: float32 unless said) and times
  token    one compiled generation (`table1.seconds_per_token_program`: a 128-token prompt,
           32 tokens);
  block    one block looped in a compiled program (`table1.seconds_per_block_program`, where
           the 17B shape's output layer would hide the blocks), from the prompt's position;
  call     one block jitted alone, timed a call at a time (`table1.seconds_per_block`: Table
           1's per-block column, the one #12's CPU goals are stated in), from there too;
  kernels  on random weights, the fused blocks' kernels alone, looped in a compiled program;
  trace    one call of each block traced, each kernel's device time (a second or two per
           setting, where a generation takes over a minute on an H200 at 800M).
It prints one Markdown row per setting as it is measured. One-shot timings of the same
generation have moved 15% from run to run (docs/decoding_gpu.md, "Prefetching the next
kernel's weights"): `--alternate` compiles every setting first (a setting named twice is
compiled twice; `--copies N` compiles each N times, in turn, each generation on its own draw
of the random weights, the blocks of `call` all on one) and times them in the same
alternating rounds, printing the rows at the end, then each repeated setting's copies' lowest
and highest time: compiled copies of one 800M generation have run up to ~3% apart, once 8%
(docs/decoding_gpu.md, "Compiled copies side by side"), so a setting is told apart from
another only by more than its copies' spread.
The kernels run on GPUs only: elsewhere `token` and `block` time XLA's path, and the program
says so. Results: stdout (docs/decoding_gpu.md quotes runs on an H200).
"""

import collections
import contextlib
import functools
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sparse_scaling import decoding
from sparse_scaling.bench import common
from sparse_scaling.bench import decode_profile
from sparse_scaling.bench import decoders
from sparse_scaling.bench import table1
from sparse_scaling.bench import timing
from sparse_scaling.layers import attention_kernel
from sparse_scaling.layers import causal_attention
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import feed_forward
from sparse_scaling.layers import fused_residual
from sparse_scaling.layers import layer_norm
from sparse_scaling.layers import sparse_ff
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers import multiplicative_dense
from sparse_scaling.layers import multiplicative_kernel
from sparse_scaling.layers import sparse_qkv
from sparse_scaling.layers import sparse_qkv_block_kernel
from sparse_scaling.layers import sparse_qkv_fields_kernel
from sparse_scaling.layers import sparse_qkv_mosaic

# Setting name -> (module, constant).
SHARES = {**{name: (sparse_qkv_block_kernel, name)
             for name in ('ROWS', 'WIDTH', 'VALUE_WIDTH', 'MIXED_WARPS', 'CONV_WARPS',
                          'ATTEND_WARPS', 'DOT', 'MODULES', 'MAX_PARTS',
                          'SPLIT', 'MIXED_CHANNELS', 'STATS_IN_KERNEL',
                          'MAX_D_MODEL')},
          'CACHES': (sparse_qkv_block_kernel, 'PREFETCH_CACHES'),
          'STATE': (sparse_qkv_block_kernel, 'PREFETCH_STATE'),
          'QKV_MOSAIC': (sparse_qkv_block_kernel, 'MOSAIC'),
          'MOSAIC_ATTEND': (sparse_qkv_block_kernel, 'MOSAIC_ATTEND'),
          'MOSAIC_CHANNELS': (sparse_qkv_mosaic, 'CHANNELS'),
          'MOSAIC_WIDTH': (sparse_qkv_mosaic, 'WIDTH'),
          'FF_GROUP': (sparse_ff_kernel, 'GROUP'), 'FF_WARPS': (sparse_ff_kernel, 'WARPS'),
          'FF_ROWS': (sparse_ff_kernel, 'NORM_ROWS'),
          'FF_PARTS_BYTES': (sparse_ff_kernel, 'MAX_PARTS_BYTES'),
          'FF_COLUMNS': (sparse_ff_kernel, 'COLUMNS'), 'FF_GATHER': (sparse_ff_kernel, 'GATHER'),
          'FF_MOSAIC': (sparse_ff_kernel, 'MOSAIC'),
          'CHAIN': (fused_residual, 'CHAIN'), 'CPU_TOP_K': (decoding, 'CPU_TOP_K'),
          'CHUNK': (sparse_ff, 'CPU_CHUNK_BYTES'),
          'CONV_LAYOUT': (sparse_qkv, 'DECODE_LAYOUT'),
          'CONV_ONE': (sparse_qkv, 'ONE_PRODUCT'),
          'CONV_STATE': (sparse_qkv, 'STATE_FROM_FIELDS'),
          'MULT_FORM': (multiplicative_dense, 'DECODE_FORM'),
          **{f'MULT_{name}': (multiplicative_kernel, name)
             for name in ('ROWS', 'STEP', 'MODULES', 'CHANNELS', 'WARPS', 'STAGES', 'LOOP',
                          'PRECISION')},
          'MULT_MIN': (multiplicative_kernel, 'MIN_D_IN'),
          'FIELDS_MIN': (sparse_qkv_fields_kernel, 'MIN_D_MODEL'),
          'FIELDS_PARTS': (sparse_qkv_fields_kernel, 'PARTS'),
          'FIELDS_WARPS': (sparse_qkv_fields_kernel, 'WARPS'),
          'FILLED_MIN': (causal_attention, 'FILLED_MIN_LEN'),
          'FILLED_BLOCK': (causal_attention, 'FILLED_BLOCK'),
          'FILLED_UNTIL': (causal_attention, 'FILLED_UNTIL'),
          'ATTN_ROWS': (attention_kernel, 'MIN_ROWS'),
          'ATTN_WIDTH': (attention_kernel, 'VALUE_WIDTH'),
          'ATTN_WARPS': (attention_kernel, 'WARPS'),
          'ATTN_SPLIT': (attention_kernel, 'SPLIT'), 'ATTN_SKIP': (attention_kernel, 'SKIP'),
          'ATTN_LEN': (attention_kernel, 'MIN_LEN'),
          'LN_ONE_PASS': (layer_norm, 'ONE_PASS'),
          'RELU_MAX': (feed_forward, 'RELU_AS_MAXIMUM'),
          'ATTEND_FILLED': (sparse_qkv_block_kernel, 'FILLED_MIN_LEN'),
          'ATTEND_POSITIONS': (sparse_qkv_block_kernel, 'POSITIONS'),
          'ATTEND_FIRST': (sparse_qkv_block_kernel, 'FILLED_FIRST'),
          'ATTEND_STEP': (sparse_qkv_block_kernel, 'FILLED_STEP'),
          'LATE': (sparse_qkv_block_kernel, 'LATE_POSITION'),
          'CACHE': (decoders, 'MAX_LEN'),
          'ATTN_POSITIONS': (attention_kernel, 'POSITIONS'),
          'CUBLAS_BYTES': (decoding, 'CUBLAS_MAX_BYTES'), 'GRAPHS': (decoding, 'GRAPH_LOOPS'),
          'EARLY': (decode_kernels, 'LAUNCH_EARLY'),
          'PREFETCH': (decode_kernels, 'PREFETCH'),
          'PERSIST': (decode_kernels, 'L2_PERSIST'),
          'KEEP_BYTES': (decode_kernels, 'KEEP_MAX_BYTES'),
          'SHARED': (sys.modules[__name__], 'SHARED_WEIGHTS'),
          'PROMPT': (sys.modules[__name__], 'PROMPT'),
          **{name: (sys.modules[__name__], f'XLA_{name}')
             for name in ('DOT_MERGER', 'TILING_SEARCH', 'TRITON_GEMM')}}
_SWITCHES = ('DOT', 'CHAIN', 'CPU_TOP_K', 'GRAPHS', 'EARLY', 'PREFETCH', 'DOT_MERGER',
             'TILING_SEARCH', 'TRITON_GEMM', 'CACHES', 'STATE', 'FF_MOSAIC',
             'QKV_MOSAIC', 'MOSAIC_ATTEND', 'CONV_LAYOUT', 'CONV_ONE', 'CONV_STATE',
             'ATTN_SPLIT', 'ATTN_SKIP', 'LN_ONE_PASS', 'RELU_MAX', 'MULT_LOOP')   # 0 or 1
SHARED_WEIGHTS = 0   # 0, 1 or 2: see the module's note
# XLA's options for a GPU program, on top of `decoding.COMPILER_OPTIONS` (`xla_options`).
XLA_DOT_MERGER, XLA_TILING_SEARCH, XLA_TRITON_GEMM = True, False, True
LARGE = 1 << 22      # elements: SHARED=2 keeps arrays this large each block's own
_ALL = ('MODULES', 'MIXED_CHANNELS')   # also 'all': None, the kernel's own choice
_NONE = ('LATE', 'FIELDS_MIN')          # also 'none': None, never
_ANY = ('FF_PARTS_BYTES', 'STATS_IN_KERNEL', 'MAX_D_MODEL', 'CUBLAS_BYTES',
        'KEEP_BYTES', 'CHUNK', 'MULT_FORM', 'ATTN_ROWS', 'MULT_MIN', 'FIELDS_MIN',
        'MULT_STAGES', 'FILLED_MIN', 'ATTN_LEN', 'ATTEND_FILLED',
        'ATTEND_FIRST', 'PROMPT', 'FILLED_UNTIL', 'LATE')   # any int >= 0
PROMPT, TOKENS = 128, 32   # a generation's (`--measure token`); PROMPT also block's and call's
CALLS = 32                 # calls of a block timed (`--measure call`)
ROUND_CALLS = 5            # with --alternate, a round's
ROUNDS = 9                 # `--alternate`'s rounds
DEFAULT_SETTINGS = ['default', 'DOT=0', 'MIXED_CHANNELS=32', 'WIDTH=16', 'MIXED_WARPS=8',
                    'ATTEND_WARPS=1', 'ROWS=32', 'VALUE_WIDTH=32', 'WIDTH=16+CONV_WARPS=8']


def parse_setting(text):
  """'WIDTH=16+CONV_WARPS=8' -> {'WIDTH': 16, 'CONV_WARPS': 8}; 'default' -> {}. One-line
  ValueError naming the rule for anything else."""
  if text == 'default':
    return {}
  setting = {}
  for pair in text.split('+'):
    name, _, value = pair.partition('=')
    if (name in _ALL and value == 'all') or (name in _NONE and value == 'none'):
      setting[name] = None
      continue
    if name not in SHARES or not value.isdigit():
      raise ValueError(f'--settings: {pair!r} must be NAME=integer with NAME one of '
                       f'{list(SHARES)} (MODULES and MIXED_CHANNELS also =all, LATE and '
                       'FIELDS_MIN =none)')
    value = int(value)
    if (name in _SWITCHES and value not in (0, 1)) or (
        name in ('MAX_PARTS', 'CACHE') and value < 1) or (name == 'SHARED' and value > 2) or (
        name == 'PERSIST' and value > 4) or (name == 'MULT_PRECISION' and value > 2) or (
        name not in (*_SWITCHES, 'MAX_PARTS', 'CACHE', 'SHARED', 'PERSIST', 'MULT_PRECISION',
                     *_ANY)
        and not decode_kernels.is_power_of_2(value)):
      raise ValueError(f'--settings: {pair!r}: {", ".join(_SWITCHES)} are 0 or 1, SHARED 0, 1 or '
                       f'2, PERSIST 0 to 4, MULT_PRECISION 0 to 2, MAX_PARTS and CACHE positive, '
                       f'{", ".join(_ANY)} '
                       'any, the others powers of 2')
    setting[name] = bool(value) if name in _SWITCHES else value
  return setting


def _check_positions(setting):
  """One-line ValueError where a setting's caches (CACHE) cannot hold its PROMPT and the
  TOKENS after it."""
  prompt = setting.get('PROMPT', PROMPT)
  max_len = setting.get('CACHE', decoders.MAX_LEN)
  if prompt + TOKENS > max_len:
    raise ValueError(f'--settings: PROMPT={prompt} needs caches of at least PROMPT + '
                     f'{TOKENS} positions (CACHE, {max_len} here)')


def xla_options():
  """`decoding.COMPILER_OPTIONS` with the XLA switches' values in its GPU options: without
  XLA_DOT_MERGER the `dot-merger` pass is off too, with XLA_TILING_SEARCH XLA times every
  tiling of its Triton products as it compiles, without XLA_TRITON_GEMM cuBLAS's kernels
  multiply."""
  gpu = dict(decoding.COMPILER_OPTIONS.get('gpu', {}))
  if not XLA_DOT_MERGER:
    passes = gpu.get('xla_disable_hlo_passes', '')
    gpu['xla_disable_hlo_passes'] = f'{passes},dot-merger' if passes else 'dot-merger'
  if XLA_TILING_SEARCH:
    gpu['xla_gpu_exhaustive_tiling_search'] = True
  if not XLA_TRITON_GEMM:
    gpu['xla_gpu_enable_triton_gemm'] = False
  return {**decoding.COMPILER_OPTIONS, 'gpu': gpu}


@contextlib.contextmanager
def shares(setting):
  """Within the block, the kernels' constants take the setting's values, and decoding
  programs compile with `xla_options`."""
  before = {name: getattr(*SHARES[name]) for name in SHARES}
  options = decoding.COMPILER_OPTIONS
  try:
    for name, value in setting.items():
      setattr(*SHARES[name], value)
    decoding.COMPILER_OPTIONS = xla_options()
    yield
  finally:
    decoding.COMPILER_OPTIONS = options
    for name, value in before.items():
      setattr(*SHARES[name], value)


def shared_block_weights(model, weights, keep_large):
  """`model`'s weights with every block's attention and FF layers given block 0's arrays
  (`decoders.scope_labels` names the blocks' layers); with `keep_large`, arrays of LARGE
  elements or more stay the layer's own."""
  first, out = {}, []
  for label, w in zip(decoders.scope_labels(model), weights):
    kind = label.partition('/')[2]   # 'attention' or 'ff' in a block, else ''
    if kind:
      w = jax.tree.map(lambda own, b: own if keep_large and np.size(own) >= LARGE else b,
                       w, first.setdefault(kind, w))
    out.append(w)
  return type(weights)(out)


def per_token(dims, depth, dtype='float32'):
  """Seconds per token of one compiled generation of the decoder (`depth` blocks, weights
  of `dtype`; with SHARED_WEIGHTS, the blocks' weights shared)."""
  return table1.seconds_per_token_program(_model_fn(dims, depth), dtype, PROMPT, TOKENS,
                                         weights_fn=_weights_fn())


def _one_block(dims):
  """The Table 1 decoder of `dims` with one block, whose first block `block` and `call`
  time."""
  return decoders.build('ours', dims, 1, decoders.MAX_LEN)


def _model_fn(dims, depth):
  return functools.partial(decoders.build, 'ours', dims, depth, decoders.MAX_LEN)


def _weights_fn():
  if SHARED_WEIGHTS:
    return functools.partial(shared_block_weights, keep_large=SHARED_WEIGHTS == 2)
  return None


def compiled_generation(dims, depth, dtype='float32'):
  """run(n) of `table1.generation_run` for the decoder of `per_token`, both of its lengths
  compiled now, with the constants in force now."""
  run = table1.generation_run(_model_fn(dims, depth), dtype, PROMPT, weights_fn=_weights_fn())
  for n in (TOKENS // 4, TOKENS):
    jax.block_until_ready(run(n))
  return run


def compiled_call(dims, depth, dtype='float32', drawn=None):
  """call() of `table1.block_call` for the first block of `per_call`, compiled now with the
  constants in force now; on `drawn`'s weights and a copy of its state, where given."""
  del depth
  if drawn:
    drawn = drawn[0], jax.tree.map(jnp.copy, drawn[1])   # each call donates its own state
  return table1.block_call(_one_block(dims), dtype, drawn, position=PROMPT)


def _alternating_token(runs, rounds):
  """Seconds per token of each generation's run(n), timed in the same rounds."""
  return timing.per_steps(runs, TOKENS // 4, TOKENS, min_runs=rounds)


def _alternating_call(calls, rounds):
  """Median seconds of each call(), ROUND_CALLS of each a round, in the same rounds."""
  times = timing.interleaved_times(calls, rounds, runs_per_round=ROUND_CALLS)
  return [float(np.median(t)) for t in times]


def sweep_alternating(shape, variant, depth, settings, dtype='float32', rounds=ROUNDS,
                      measure='token'):
  """Each setting's `measure`: seconds per token of its generation (`compiled_generation`,
  'token') or seconds of one call of its first block (`compiled_call`, 'call'). Every setting
  is compiled first (a setting named twice is compiled twice) and then all are timed in the
  same alternating rounds (`timing.interleaved_times`), so that neither the machine's drift
  nor the order falls on one setting: [(text, seconds)], each row printed. Each generation
  draws its own random weights; the blocks of 'call' share one draw (a 17B block's ~5 GB
  each would not fit four settings in a 23 GB machine)."""
  compile_one, time_all = {'token': (compiled_generation, _alternating_token),
                           'call': (compiled_call, _alternating_call)}[measure]
  unit = _UNITS[measure][0]
  dims = decoders.dimensions(shape, variant)
  if measure == 'call':
    compile_one = functools.partial(compile_one, drawn=decoders.random_weights_and_state(
        _one_block(dims), dtype))
  runs = []
  for text in settings:
    with shares(parse_setting(text)):
      runs.append(compile_one(dims, depth, dtype))
    print(f'compiled {text}', file=sys.stderr, flush=True)
  results = list(zip(settings, time_all(runs, rounds)))
  for text, seconds in results:
    print(common.table_row([text, _cell(seconds, 1e3)]), flush=True)
  copies = collections.defaultdict(list)
  for text, seconds in results:
    copies[text].append(seconds)
  repeated = {text: times for text, times in copies.items() if len(times) > 1}
  if repeated:
    print('\n' + common.table_header(['setting', 'copies', f'lowest {unit}', f'highest {unit}',
                                      'spread']))
    for text, times in repeated.items():
      print(common.table_row([text, len(times), _cell(min(times), 1e3), _cell(max(times), 1e3),
                              _spread(times)]), flush=True)
  return results


def _spread(times):
  """How much the highest of `times` exceeds the lowest, as a percentage; 'n/a' where the
  lowest is not positive (a difference of two timed lengths can be, on a noisy machine)."""
  return f'{max(times) / min(times) - 1:.1%}' if min(times) > 0 else 'n/a'


def per_block(dims, depth, dtype='float32'):
  """Seconds of the first block looped on its own output in a compiled program."""
  del depth
  return table1.seconds_per_block_program(_one_block(dims), dtype, 32, position=PROMPT)


def per_call(dims, depth, dtype='float32'):
  """Median seconds of one call of the first block, jitted alone (`table1.seconds_per_block`:
  Table 1's per-block column on a CPU)."""
  del depth
  return table1.seconds_per_block(_one_block(dims), dtype, CALLS, position=PROMPT)[0]


def fused_blocks(dims, interpret=False, dtype='float32'):
  """The fused blocks of `dims` on random weights (drawn in float32 and cast to `dtype` with x,
  the state and the caches, as `decoding.Decoder` casts them; KV caches of MAX_LEN, the position
  fixed at 100, Q and K's module kernels of 3 and V's of 1, as `SparseQKVAttention`'s):
  (attention(weights, x, state, k_cache, v_cache) -> (out, state, k_cache, v_cache),
  feed_forward(weights, x) -> out, (attention's weights, FF's weights), x [1, d_model],
  (state, k_cache, v_cache))."""
  d_model, n_heads, lks = dims['d_model'], dims['n_heads'], dims['length_kernel_size']
  n_modules, (block, rank) = dims['attention_sparsity'], dims['ff_sparsity']
  n_channels, d_head, n_blocks = d_model // n_modules, d_model // n_heads, dims['d_ff'] // block
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 24))
  normal = lambda *shape: 0.02 * jax.random.normal(next(keys), shape, jnp.float32)
  x, norm = normal(1, d_model), (1 + normal(d_model), normal(d_model))
  mixed = (normal(n_modules, d_model), normal(d_model, n_channels), normal(d_model))
  conv = tuple((normal(lks, size, n_channels, n_channels), normal(n_channels))
               for size in (3, 3, 1))
  state = normal(1, lks - 1, n_modules, n_channels)
  caches = (normal(n_heads, decoders.MAX_LEN, d_head), normal(n_heads, decoders.MAX_LEN, d_head))
  controller = (normal(d_model, rank), normal(rank, n_blocks, block), normal(n_blocks, block))
  units = (normal(n_blocks, block, d_model), normal(n_blocks, block),
           normal(n_blocks, block, d_model), normal(d_model))
  x, norm, mixed, conv, state, caches, controller, units = jax.tree.map(
      lambda a: a.astype(dtype), (x, norm, mixed, conv, state, caches, controller, units))

  def attention(weights, x, state, k_cache, v_cache):
    norm, mixed, conv = weights
    out, state, k_cache, v_cache, _ = sparse_qkv_block_kernel.decode_step(
        x, norm, mixed, conv, state, k_cache, v_cache, jnp.int32(100), n_heads=n_heads,
        sizes=(3, 3, 1), epsilon=1e-6, interpret=interpret)
    return out, state, k_cache, v_cache

  def feed_forward(weights, x):
    norm, controller, units = weights
    return sparse_ff_kernel.ff_block(x, *norm, controller, units, 1e-6, interpret)

  return (attention, feed_forward, ((norm, mixed, conv), (norm, controller, units)), x,
          (state, *caches))


def fused_block_programs(dims, interpret=False, dtype='float32'):
  """[(name, fn, args, donated argument numbers)] of the fused blocks (`fused_blocks`), as a
  generation's program takes them: 'attention' with its state and caches donated, 'FF'."""
  attention, feed_forward, (attention_w, ff_w), x, carry = fused_blocks(dims, interpret, dtype)
  return [('attention', attention, (attention_w, x, *carry), (2, 3, 4)),
          ('FF', feed_forward, (ff_w, x), ())]


def kernels(dims, depth, interpret=False, steps=(8, 40), dtype='float32'):
  """(attention, FF): seconds per iteration of the fused blocks' kernels alone
  (`fused_blocks`), each block's looped on its own output in one compiled program:
  `timing.per_step` of the `steps` iterations. The loop's own cost per iteration (on the
  H200 ~18 µs) is included."""
  del depth
  attention, feed_forward, (attention_w, ff_w), x, carry = fused_blocks(dims, interpret, dtype)

  def attention_loop(weights, x, carry, n):
    def body(_, c):
      out, *carry = attention(weights, *c)
      return (0.5 * out, *carry)
    return jax.lax.fori_loop(0, n, body, (x, *carry))[0]

  def ff_loop(weights, x, n):
    return jax.lax.fori_loop(0, n, lambda _, x: 0.5 * feed_forward(weights, x), x)

  def seconds(fn, *args):
    fn = jax.jit(fn)   # traced anew: the shares in force now
    return timing.per_step(lambda n: fn(*args, jnp.int32(n)), *steps)

  return seconds(attention_loop, attention_w, x, carry), seconds(ff_loop, ff_w, x)


def trace(dims, depth, interpret=False, steps=20, dtype='float32'):
  """(attention, FF, {kernel: seconds}): device seconds of one call of each fused block alone
  (`fused_blocks`), and of each kernel, named by its Pallas function ('_conv_kernel') or, for
  XLA's, its instruction. Each block is jitted as a generation's program (`decoding.jit`) with
  its state donated and fed back, so caches and states are written in place as in a
  generation, compiled without command buffers, and traced over `steps` calls
  (`decode_profile.kernel_times`). A block's weights stay in the
  GPU's L2 cache between calls, as they do not in a generation of many blocks: kernels that
  wait on memory take longer there (at 800M the units kernel 2.4 µs here, 4.1 in a
  generation's profile)."""
  del depth
  per_kernel = collections.Counter()

  def seconds(fn, args, donate, feed):
    # Traced anew (the shares in force now) and compiled as a generation compiles a block.
    program = decoding.jit(fn, donate_argnums=donate).trace(*args)
    compiled = decode_profile.compile_traced(program.lower())
    names = {name: meta['function'] or name
             for name, meta in decode_profile.kernels(compiled.as_text()).items()}
    args = list(args)

    def run():
      out = compiled(*args)
      feed(args, out)
      return out

    jax.block_until_ready(run())
    times = decode_profile.kernel_times(run, steps, module='')
    for name, (_, s) in times.items():
      per_kernel[names.get(name, name)] += s
    return sum(s for _, s in times.values())

  def carry_on(args, out):   # the new state and caches, in the donated buffers' place
    args[2:] = out[1:]

  (_, *attention), (_, *feed_forward) = fused_block_programs(dims, interpret, dtype)
  attention_s = seconds(*attention, carry_on)
  ff_s = seconds(*feed_forward, lambda args, out: None)
  return attention_s, ff_s, dict(per_kernel.most_common())


MEASURES = {'token': per_token, 'block': per_block, 'call': per_call, 'kernels': kernels,
            'trace': trace}
_UNITS = {'token': ['ms/token'], 'block': ['ms/block'], 'call': ['ms/call'],
          'kernels': ['attention µs/iteration', 'FF µs/iteration'],
          'trace': ['attention µs', 'FF µs', 'kernels µs']}


def sweep(shape, variant, depth, settings, measure=per_token):
  """What `measure(dims, depth)` gives for each setting (seconds, or a tuple of them and of
  {name: seconds}): [(text, result)], each printed as measured (milliseconds; microseconds for
  `kernels` and `trace`)."""
  dims = decoders.dimensions(shape, variant)
  results = []
  for text in settings:
    with shares(parse_setting(text)):   # traced anew by each measurement
      result = measure(dims, depth)
    results.append((text, result))
    scale = 1e6 if getattr(measure, 'func', measure) in (kernels, trace) else 1e3
    values = result if isinstance(result, tuple) else (result,)
    print(common.table_row([text] + [_cell(v, scale) for v in values]), flush=True)
  return results


def _cell(value, scale):
  """A table cell: seconds scaled, or {name: seconds} as 'name 6.3, name 3.5' (scaled)."""
  if isinstance(value, dict):
    return ', '.join(f'`{name}` {v * scale:.1f}' for name, v in value.items())
  return f'{value * scale:.4f}'


def define_flags():
  """Defines the command line's flags; only when run as a program."""
  flags.DEFINE_enum('shape', '800m', list(decoders.SHAPES), 'Table 1 shape.')
  flags.DEFINE_enum('variant', 'ffqkv', list(decoders.VARIANTS),
                    'Table 1 variant (with Sparse QKV for --measure kernels and trace).')
  flags.DEFINE_integer('depth', 6, 'Blocks of the decoder timed (--measure token).',
                       lower_bound=1)
  flags.DEFINE_enum('measure', 'token', list(MEASURES), 'Time one compiled generation per '
                    'token, the first block looped in a compiled program, the first block '
                    "jitted alone a call at a time, the fused blocks' kernels alone looped "
                    '(random weights), or one call of each fused block traced, kernel by '
                    'kernel.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                    'Weights, state and caches (every --measure).')
  flags.DEFINE_list('settings', DEFAULT_SETTINGS,
                    f'Settings: NAME=value pairs joined by "+", NAME one of {list(SHARES)}; '
                    '"default" for the constants as they are.')
  flags.DEFINE_bool('alternate', False, '--measure token or call: compile every setting '
                    'first, then time them all in the same alternating rounds (rows printed '
                    'at the end).')
  flags.DEFINE_integer('copies', 1, '--alternate: compile each setting this many times, the '
                       'settings in turn, and give each one\'s spread.', lower_bound=1)


def check_flags(args):
  """Raises app.UsageError, naming the flag and its rule, where `args` (the parsed flags)
  ask for what the benchmark cannot run."""
  try:
    for text in args.settings:
      _check_positions(parse_setting(text))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if args.alternate and args.measure not in ('token', 'call'):
    raise app.UsageError(f'--alternate: times generations (--measure token) or calls of a '
                         f'block (--measure call), not --measure {args.measure}')
  if args.copies > 1 and not args.alternate:
    raise app.UsageError(f'--copies {args.copies}: compiles copies for --alternate only')
  if args.measure in ('kernels', 'trace'):
    if jax.default_backend() != 'gpu':
      raise app.UsageError(f'--measure {args.measure}: the kernels compile for GPUs only '
                           f'(here: {jax.default_backend()})')
    if 'qkv' not in args.variant:
      raise app.UsageError(f'--measure {args.measure}: times the fused blocks of a variant '
                           f'with Sparse QKV, not {args.variant}')


def main(argv):
  del argv
  args = flags.FLAGS
  check_flags(args)
  timed = {'token': f'{args.depth} blocks, {args.dtype}, one compiled generation of 32 '
                   'tokens after 128 (or a setting\'s PROMPT)',
           'block': f'{args.dtype}, one block looped in a compiled program',
           'call': f'{args.dtype}, one block jitted alone, timed a call at a time',
           'kernels': f"{args.dtype}, the fused blocks' kernels alone looped in a compiled "
                      'program',
           'trace': f'{args.dtype}, one call of each fused block alone, device time of its '
                    'kernels'}[args.measure]
  print(f'Machine: {timing.machine_description()}. {args.variant} at {args.shape}, {timed}.')
  if jax.default_backend() != 'gpu':
    print('Not a GPU: the fused blocks do not run here, every setting times XLA\'s path.')
  print(common.table_header(['setting'] + _UNITS[args.measure]))
  if args.alternate:
    sweep_alternating(args.shape, args.variant, args.depth, args.settings * args.copies,
                      args.dtype, measure=args.measure)
    return
  measure = functools.partial(MEASURES[args.measure], dtype=args.dtype)
  sweep(args.shape, args.variant, args.depth, args.settings, measure)


if __name__ == '__main__':
  common.run(main, define_flags)
