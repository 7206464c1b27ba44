"""Where the layers run their Pallas kernels: one switch for all of them.

Decoding a token reads little and runs many small XLA kernels; on a GPU, the layers can
decode through Pallas kernels instead. A Scaling Transformer's sparse blocks in predict mode
decode a token through kernels fused across the block (`fused_residual.py`): the Sparse QKV
attention block in three (`sparse_qkv_block_kernel.py`) and the Sparse FF block in two and a
reduction, or in three (`sparse_ff_kernel.py`). The layers also have kernels of their own, used
where a block's do not apply: Sparse FF (`sparse_ff_kernel.py`), Sparse QKV's convolutions
(`sparse_qkv_kernel.py`), the multiplicative layer (`multiplicative_kernel.py`), attention
over the KV cache (`attention_kernel.py`), and, where XLA's ops take the attention block
(17B's), the receptive fields from the multiplicative layer's parts
(`sparse_qkv_fields_kernel.py`). In training, Sparse FF's controller can run as two
(`sparse_ff_controller_kernel.py`). Each layer asks `active(kernel)` when it is traced:

  'auto'       on a GPU the kernels measured faster there (AUTO_ON_GPU: the two blocks',
               Sparse FF's and its controller's training kernels, and attention's own where
               a step has many heads, `attention_kernel.pays`, as at 17B; Sparse QKV's own
               cut a block's kernels but not the time of a whole generation, and the
               multiplicative layer's, asked with `multiplicative_kernel.pays`, was slower at
               17B, docs/decoding_gpu.md; the receptive fields', asked with
               `sparse_qkv_fields_kernel.pays`, from 17B's d_model), XLA's ops elsewhere;
  'pallas'     every kernel, compiled (GPUs only);
  'interpret'  every kernel, run by Pallas' interpreter on any backend (the tests' CPU check);
  'xla'        XLA's ops everywhere (`table1 --impls ours-xla`, `train_step --kernels xla`).

Load order. A GPU thread waits for a load where its value is first used, and the compiler
moves no load across a barrier (a reduction across a program's warps has one), so the
kernels issue every load that waits on nothing computed first, together, and a load whose
address is computed (a chosen unit's rows) as soon as its address is known: their latencies
overlap instead of adding up. In a generation each block's weights come from the GPU's
memory, not its L2 cache, and a load waits about a microsecond.

Launching the next kernel early. On Hopper, XLA launches its kernels and Pallas' with
Programmatic Dependent Launch (`xla_gpu_enable_pdl`, on by default in jax 0.11.2) and begins
each with `griddepcontrol.wait`, which holds a program until the kernels before it have
finished and their writes are visible. A kernel that never says otherwise lets the next one
launch only as its last program exits. With LAUNCH_EARLY every program of the decoding
kernels (the blocks' and the layers' own) first runs `griddepcontrol.launch_dependents`
(`launch_dependents`): the next kernel's programs are placed on the GPU while this one runs
and wait at their start, so that its launch overlaps this kernel's work. What the kernels
read and write, and in which order, is unchanged: the wait still guards it. In one H200
sitting (docs/decoding_gpu.md, "Launching the next kernel early; `bench.decode_shares
--settings EARLY=0,default,...`) the 24-layer 800M FF+QKV generation took 0.370-0.397 ms a
token with it against 0.416-0.427 without. The training controller's kernels do not: a launch
is small beside a training step's kernels, and the early launch was not measured there.
"""

import contextlib
import ctypes
import functools
import math

from absl import logging
import jax
from jax._src import core as jax_core
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith as arith_dialect
from jax._src.state import discharge as state_discharge
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Pallas' Triton backend, which every decoding kernel (`*_kernel.py`) compiles through
# (`triton_params`). jax 0.11 deprecates it; a JAX without it still imports the layers, which
# then run XLA's ops only (MISSING says why; `use` refuses 'pallas' and 'interpret').
try:
  from jax._src.lib.triton import dialect as tt_dialect
  from jax._src.pallas.triton import lowering as triton_lowering
  from jax._src.pallas.triton import primitives as triton_primitives
  from jax.experimental.pallas import triton as plgpu
except ImportError as error:
  tt_dialect = triton_lowering = triton_primitives = plgpu = None
  MISSING = f'this JAX ({jax.__version__}) has no Pallas Triton backend ({error})'
else:
  MISSING = None

CHOICES = ('auto', 'pallas', 'interpret', 'xla')
KERNELS = ('sparse_ff', 'sparse_qkv', 'attention', 'sparse_ff_controller', 'sparse_ff_block',
           'sparse_qkv_block', 'multiplicative', 'sparse_qkv_fields')
AUTO_ON_GPU = ('sparse_ff', 'sparse_ff_controller', 'sparse_ff_block', 'sparse_qkv_block',
               'attention', 'multiplicative', 'sparse_qkv_fields')
_CHOICE = ['auto']


@contextlib.contextmanager
def use(name):
  """Within the block, layers traced anew use `name`: one of CHOICES."""
  if name not in CHOICES:
    raise ValueError(f'decode kernel must be one of {CHOICES}, got {name!r}')
  if MISSING and name in ('pallas', 'interpret'):
    raise ValueError(f"decode kernel {name!r}: {MISSING}; use 'auto' or 'xla'")
  previous, _CHOICE[0] = _CHOICE[0], name
  try:
    yield
  finally:
    _CHOICE[0] = previous


def active(kernel, pays=True):
  """'pallas', 'interpret' or 'xla': what calls of `kernel` (one of KERNELS) use; with
  'auto', a kernel of AUTO_ON_GPU where the caller's shapes also say it `pays` there."""
  if kernel not in KERNELS:
    raise ValueError(f'kernel must be one of {KERNELS}, got {kernel!r}')
  if _CHOICE[0] == 'auto':
    if jax.default_backend() != 'gpu' or kernel not in AUTO_ON_GPU or not pays:
      return 'xla'
    if MISSING:
      _warn_missing()
      return 'xla'
    return 'pallas'
  return _CHOICE[0]


@functools.cache
def _warn_missing():
  """Logs once a process that 'auto' runs XLA's ops on a GPU for want of the kernels."""
  logging.warning('Decoding on a GPU through XLA\'s ops, not the Pallas kernels (at 800M on an '
                  'H200 more than twice as slow: docs/decoding_gpu.md): %s', MISSING)


LAUNCH_EARLY = True


@contextlib.contextmanager
def launching_early(on):
  """Within: the kernels traced let the next launch early (LAUNCH_EARLY) as `on` says. JAX's
  caches are cleared on the way in and out: Pallas (jax 0.11) keeps a kernel function's
  traced body, which would carry the instruction, or its absence, across the change."""
  global LAUNCH_EARLY
  before, LAUNCH_EARLY = LAUNCH_EARLY, on
  jax.clear_caches()
  try:
    yield
  finally:
    LAUNCH_EARLY = before
    jax.clear_caches()


def launch_dependents():
  """Inside a kernel, with LAUNCH_EARLY: PTX's `griddepcontrol.launch_dependents` (the module's
  note) where the kernel is compiled for an NVIDIA GPU of compute capability 9.0 (Hopper) or
  more; nothing on older GPUs and ROCm's, which lack the instruction, or in Pallas'
  interpreter."""
  if LAUNCH_EARLY:
    ptx('griddepcontrol.launch_dependents;', min_capability=90)


def ptx(instructions, min_capability):
  """Inside a kernel: the PTX `instructions`, run by every thread of the program, where the
  kernel is compiled for an NVIDIA GPU of compute capability `min_capability` (x10: 90 is
  9.0) or more; nothing on older GPUs, ROCm's (whose capability Pallas gives as 0) or in
  Pallas' interpreter."""
  ptx_p.bind(instructions=instructions, min_capability=min_capability)


def triton_params(num_warps, num_stages=None):
  """A kernel's `compiler_params`: Triton's (not Mosaic GPU's), `num_warps` to a program and
  `num_stages` stages of its loops' pipelines (None: Triton's own).
  Where the backend is missing, a kernel called directly (not through `use`) stops here."""
  if MISSING:
    raise RuntimeError(f'the Pallas decoding kernels need Triton: {MISSING}')
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _triton_lowering(primitive):
  """Decorator: the function is `primitive`'s lowering in Pallas' Triton backend (registered
  where this JAX has one)."""
  return triton_lowering.register_lowering(primitive) if triton_lowering else lambda f: f


# An effect, so that tracing keeps a call whose result nothing uses (Triton's barrier's).
_KEPT = {triton_primitives.barrier_effect} if triton_primitives else set()

ptx_p = jax_core.Primitive('ptx')
ptx_p.multiple_results = True
ptx_p.def_effectful_abstract_eval(lambda **_: ((), _KEPT))
mlir.register_lowering(ptx_p, lambda ctx, **_: [])   # Pallas' interpreter: nothing


@_triton_lowering(ptx_p)
def _ptx_lowering(ctx, instructions, min_capability):
  if (ctx.context.compute_capability or 0) < max(min_capability, 1):   # ROCm's: 0
    return []
  # Triton's inline assembly is elementwise: a dummy int32 goes in and out around the instructions.
  i32 = ir.IntegerType.get_signless(32)
  zero = arith_dialect.constant(i32, ir.IntegerAttr.get(i32, 0))
  tt_dialect.elementwise_inline_asm(
      [i32], 'mov.b32 $0, $1;\n\t' + instructions, constraints='=r,r',
      pure=False, packed_element=1, args=[zero])
  return []


# Off by default: on an H200 an 800M generation was 2.7% slower with it, timed side by side
# (docs/decoding_gpu.md, "Prefetching the next kernel's weights"), and on an H100 one 17B
# FF+QKV block looped 0.0539 ms against 0.0527-0.0533 ("The FF block's next reads asked for
# a kernel ahead"). With PREFETCH the decoding blocks' kernels ask the L2 cache for the next
# kernel's fixed weights as they start (`prefetch_all`): the multiplicative programs for the
# convolutions' kernels, the attention programs for the FF block's controller and biases,
# the units programs for the next attention block's LayerNorm and multiplicative layer (at
# 17B, where XLA's ops take that block, for its kernels; `fused_residual.run_layers`).
PREFETCH = False


def prefetch_all(refs, grid, keep=False, bulk=False):
  """Inside a kernel of `grid` (static sizes): every program asks the L2 cache for its part
  of each of `refs`' arrays (`prefetch`; with `keep`, to keep; with `bulk`, in one request),
  parts numbered over the whole grid."""
  part, parts = 0, 1
  for axis, size in enumerate(grid):
    part, parts = part * size + pl.program_id(axis), parts * size
  for ref in refs:
    prefetch(ref, part, parts, keep, bulk)


def prefetch(ref, part, parts, keep=False, bulk=False):
  """Inside a kernel: asks the GPU's L2 cache for part `part` (an int32, e.g. the program's
  id) of `parts` equal parts of `ref`'s whole array (a kernel's input, not sliced), one request
  per 128-byte line, and goes on: nothing waits for the lines (PTX's `prefetch.global.L2`), so
  a kernel can have what the next kernel reads brought from the card's memory while it works.
  Parts past the array's end ask for its last line. With `keep`, the lines come with the
  `evict_last` priority (`prefetch.global.L2::evict_last`): they persist in the part of the L2
  cache set aside for such lines, which compiling the request for a GPU sets aside, the most
  that CUDA allows, once a process (`set_aside_l2`). With `bulk`, one thread of the program
  asks for its whole part in one request (Hopper's `cp.async.bulk.prefetch.L2`, parts of 16
  bytes or more; `keep` as a cache policy of `evict_last`), where the lines would take one
  instruction each. Nothing on ROCm's GPUs, before Hopper with `bulk`, or in Pallas'
  interpreter."""
  prefetch_p.bind(ref, jnp.asarray(part, jnp.int32), parts=parts, keep=keep, bulk=bulk)


prefetch_p = jax_core.Primitive('prefetch_l2')
prefetch_p.multiple_results = True
prefetch_p.def_effectful_abstract_eval(lambda ref, part, **_: ((), _KEPT))   # as ptx_p's


@state_discharge.register_discharge_rule(prefetch_p)
def _prefetch_discharge(context, *args, **params):
  """Pallas' interpreter: reads nothing, writes nothing. `context`: jax 0.12's DischargeContext,
  which holds the input avals; before 0.12 the avals themselves (then the output avals)."""
  in_avals = getattr(context, 'in_avals', context)
  del args, params
  return (None,) * len(in_avals), []


def prefetch_shares(size, itemsize, parts):
  """(elements a 128-byte line, lines a part, requests a part: the power of 2 at or above)
  for `prefetch` of `parts` parts of an array of `size` elements; part p asks for lines
  p·share .. p·share + requests − 1, each clamped to the array's last element."""
  per_line = max(128 // itemsize, 1)
  share = -(-(-(-size // per_line)) // parts)
  return per_line, share, 1 << (share - 1).bit_length()


def bulk_shares(size, itemsize, parts):
  """(elements a part, bytes a part) for `prefetch` with `bulk` of `parts` parts of an array
  of `size` elements: whole multiples of 16 bytes; part p asks for bytes p·share ..
  min((p + 1)·share, the array's) − 1, rounded down to 16 bytes (none past the end)."""
  share = -(-(-(-size * itemsize // parts)) // 16) * 16
  return share // itemsize, share


# One thread of the program asks for bytes [$1, $1 + $2) where $2 > 0 ($2: a multiple of 16).
_BULK = ('{{\n\t.reg .pred pf_go, pf_some;\n\t.reg .b32 pf_tid;\n\t{policy}'
         'mov.u32 pf_tid, %tid.x;\n\tsetp.eq.u32 pf_go, pf_tid, 0;\n\t'
         'setp.gt.s32 pf_some, $2, 0;\n\tand.pred pf_go, pf_go, pf_some;\n\t'
         '@pf_go cp.async.bulk.prefetch.L2.global{hint} [$1], $2{operand};\n\t'
         'mov.b32 $0, 0;\n\t}}')
BULK_PTX = {
    False: _BULK.format(policy='', hint='', operand=''),
    True: _BULK.format(policy='.reg .b64 pf_policy;\n\t'
                       'createpolicy.fractional.L2::evict_last.b64 pf_policy, 1.0;\n\t',
                       hint='.L2::cache_hint', operand=', pf_policy'),
}


@_triton_lowering(prefetch_p)
def _prefetch_lowering(ctx, ptr, part, *, parts, keep, bulk):
  if (ctx.context.compute_capability or 0) < (90 if bulk else 1):   # ROCm's: 0
    return []
  aval = ctx.avals_in[0]
  size = math.prod(aval.shape)
  itemsize = jnp.dtype(aval.dtype).itemsize
  i32 = ir.IntegerType.get_signless(32)
  constant = lambda v: arith_dialect.constant(i32, ir.IntegerAttr.get(i32, v))
  if keep and jax.default_backend() == 'gpu':   # not where lowered for an abstract GPU
    _set_aside_most_of_l2()
  if bulk:
    elements, share = bulk_shares(size, itemsize, parts)
    start = arith_dialect.muli(part, constant(share))
    remaining = arith_dialect.subi(constant(size * itemsize), start)
    nbytes = arith_dialect.andi(arith_dialect.minsi(remaining, constant(share)), constant(-16))
    address = tt_dialect.addptr(ptr.type, ptr, arith_dialect.muli(part, constant(elements)))
    tt_dialect.elementwise_inline_asm(
        [i32], BULK_PTX[keep], constraints='=r,l,r', pure=False, packed_element=1,
        args=[address, nbytes])
    return []
  per_line, share, n = prefetch_shares(size, itemsize, parts)
  vector = ir.RankedTensorType.get([n], i32)
  splat = lambda v: tt_dialect.splat(vector, v)
  lines = arith_dialect.addi(splat(arith_dialect.muli(part, constant(share))),
                             tt_dialect.make_range(vector, 0, n))
  offsets = arith_dialect.minsi(arith_dialect.muli(lines, splat(constant(per_line))),
                                splat(constant(size - 1)))
  pointers = tt_dialect.addptr(ir.RankedTensorType.get([n], ptr.type),
                               tt_dialect.splat(ir.RankedTensorType.get([n], ptr.type), ptr),
                               offsets)
  tt_dialect.elementwise_inline_asm(
      [vector], f'prefetch.global.L2{"::evict_last" if keep else ""} [$1];\n\tmov.b32 $0, 0;',
      constraints='=r,l', pure=False, packed_element=1, args=[pointers])
  return []


# A token reads each block's fixed weights (the LayerNorms, the multiplicative layer, the
# convolutions' kernels, the controller and the biases: ~1.2 MB a block at 800M, 29 MB for 24
# blocks) and streams the KV caches, W1's and W2's chosen rows and the output layer through the
# L2 cache, which evict them before the next token reads them: given every block the same
# arrays, a generation is 6-9% faster. With L2_PERSIST each kernel's programs ask the L2 cache
# for the kernel's fixed weights (`keep`), after their own loads of them: 1 with PTX's
# `evict_last` priority, so that the lines persist in the part of the L2 cache set aside for
# such lines (`set_aside_l2`, the most that CUDA allows, once a process, as the first such
# request is compiled: a device setting; other lines use the part that persisting ones do
# not); 2 the same requests with no priority, nothing set aside: what the requests cost. Line
# by line, as 1 and 2 ask, the requests cost what they save (0.406 against 0.409 ms a token
# on an H200, within the spread). 3 and 4 are 1 and 2 with each program's part of an array
# asked for in one request (`prefetch` with `bulk`, Hopper and later; nothing on older GPUs):
# they cost nothing measurable, and save nothing measurable either. Compiled copies of the
# 800M FF+QKV generation on the same weights, timed in the same rounds on one H200, took
# 0.392-0.399 ms a token with 3 (three copies) and 0.394-0.405 with 0 (two), the copies of one
# setting as far apart as the settings (docs/decoding_gpu.md, "Compiled copies side by
# side"). In bfloat16, where the fixed weights take half the bytes (~15 MB for 24 blocks), 3
# paid: three compiled copies of that generation took 0.3556-0.3621 ms a token with it and
# 0.3724-0.3896 without, every copy with it faster than every copy without ("The fixed
# weights in the L2 cache, in bfloat16"). So the default, None, is 3 for a kernel whose fixed
# weights are all 16-bit floats and 0 otherwise (`persist_level`): a float32 decoder asks for
# nothing and changes no device setting; a bfloat16 decoder on a GPU sets aside the L2 for
# persisting lines in its process, as the first kernel asking is compiled.
L2_PERSIST = None
# A kernel asks to keep its fixed weights only where they are at most KEEP_MAX_BYTES: at 800M
# every kernel's are (at most 455 KB in float32, the units kernel's; 29 MB for 24 blocks,
# within the 39 MB an H200 sets aside), at 17B none (the FF units kernel's controller: 4.2 MB
# in bfloat16; the attention blocks decline there). One 17B float32 block looped in a program
# with every kernel asking (`decode_shares` setting KEEP_BYTES=67108864, PERSIST=3) took
# 0.0664 and 0.0697 ms against 0.0613 and 0.0664 without, on one H200.
KEEP_MAX_BYTES = 1 << 19


def persist_level(refs):
  """L2_PERSIST for a kernel whose fixed weights are `refs`: its value where set, else (None)
  3 where every array is a 16-bit float (bfloat16 decoding) and 0 otherwise."""
  if L2_PERSIST is not None:
    return L2_PERSIST
  return 3 if all(jnp.dtype(ref.dtype).itemsize == 2 for ref in refs) else 0


def keep(refs, grid):
  """Inside a kernel of `grid`, with a `persist_level` of `refs` above 0: every program asks
  the L2 cache for its part of each of `refs`' arrays (the kernel's fixed weights), to keep
  there (`prefetch_all`). Nothing at level 0, where the arrays are more than KEEP_MAX_BYTES
  together, on ROCm's GPUs or in Pallas' interpreter."""
  level = persist_level(refs)
  if not level:
    return
  nbytes = sum(math.prod(ref.shape) * jnp.dtype(ref.dtype).itemsize for ref in refs)
  if nbytes <= KEEP_MAX_BYTES:
    prefetch_all(refs, grid, keep=level in (1, 3), bulk=level > 2)


@functools.cache
def _set_aside_most_of_l2():
  """`set_aside_l2` of the device's maximum, once a process."""
  return set_aside_l2(1 << 30)


def set_aside_l2(nbytes):
  """Sets aside `nbytes` of the L2 cache (at most the device's maximum) for persisting lines
  in the current device's primary context, JAX's (CUDA's driver); returns (bytes set aside,
  maximum)."""
  cuda = ctypes.CDLL('libcuda.so.1')

  def check(status, call):
    if status:
      raise RuntimeError(f'{call} failed: CUresult {status}')

  check(cuda.cuInit(0), 'cuInit')
  device, maximum = ctypes.c_int(), ctypes.c_int()
  check(cuda.cuDeviceGet(ctypes.byref(device), jax.devices()[0].id), 'cuDeviceGet')
  check(cuda.cuDeviceGetAttribute(ctypes.byref(maximum), 108, device),   # MAX_PERSISTING_L2
        'cuDeviceGetAttribute')
  context, limit = ctypes.c_void_p(), ctypes.c_size_t()
  check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), 'cuDevicePrimaryCtxRetain')
  check(cuda.cuCtxPushCurrent_v2(context), 'cuCtxPushCurrent')
  try:
    check(cuda.cuCtxSetLimit(6, ctypes.c_size_t(min(nbytes, maximum.value))), 'cuCtxSetLimit')
    check(cuda.cuCtxGetLimit(ctypes.byref(limit), 6), 'cuCtxGetLimit')   # 6: PERSISTING_L2
  finally:
    check(cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p())), 'cuCtxPopCurrent')
    check(cuda.cuDevicePrimaryCtxRelease_v2(device), 'cuDevicePrimaryCtxRelease')
  return limit.value, maximum.value


def is_power_of_2(*values):
  """Whether every value is a positive power of 2 (Triton's block shapes must be)."""
  return all(isinstance(v, int) and v > 0 and v & (v - 1) == 0 for v in values)


def f32(a):
  """Inside a kernel: `a` in float32, in which the kernels compute whatever the weights' dtype."""
  return a.astype(jnp.float32)


def pieces(size, largest=None):
  """(start, length) of the power-of-2 pieces that cover range(size), largest first: how a
  kernel loads a side that is not a power of 2 (144 -> ((0, 128), (128, 16))); with
  `largest` (a power of 2), none longer (144, 64 -> ((0, 64), (64, 64), (128, 16)))."""
  out, start = [], 0
  for bit in reversed(range(size.bit_length())):
    length = 1 << bit
    if size & length:
      step = min(length, largest or length)
      out.extend((start + i, step) for i in range(0, length, step))
      start += length
  return tuple(out)


def load_pieces(load, size):
  """Inside a kernel: `load(pl.ds(start, length))` for each power-of-2 piece of range(size),
  rows to be added by `sum_rows` once everything else a program needs is loaded too."""
  return [load(pl.ds(start, length)) for start, length in pieces(size)]


def sum_rows(loaded):
  """Inside a kernel: the sum along axis 0 of `load_pieces`' rows, in float32."""
  return sum(jnp.sum(part.astype(jnp.float32), axis=0) for part in loaded)


def largest_share(limit, *sides):
  """The largest power of 2 up to `limit` that divides every side: a program's share of them."""
  share = 1
  while 2 * share <= limit and all(side % (2 * share) == 0 for side in sides):
    share *= 2
  return share


def row_chunk(width, largest=1024):
  """The widest power of 2 up to `largest` that divides `width`: how a kernel loads a row."""
  return largest_share(largest, width)


def layer_norm_stats(x_ref, row, epsilon):
  """Inside a kernel: (mean, 1 / √(variance + ε)) of x_ref[row, :], in float32.

  trax's `LayerNorm` statistics; the row [d] is loaded in power-of-2 chunks.
  """
  width = x_ref.shape[1]
  chunk = row_chunk(width)
  parts = [x_ref[row, pl.ds(i * chunk, chunk)].astype(jnp.float32)
           for i in range(width // chunk)]
  mean = sum(jnp.sum(part) for part in parts) / width
  variance = sum(jnp.sum((part - mean) * (part - mean)) for part in parts) / width
  return mean, 1.0 / jnp.sqrt(variance + epsilon)


def load_norm_slice(x_ref, scale_ref, bias_ref, row, cols):
  """Inside a kernel: (x_ref[row, cols], scale_ref[cols], bias_ref[cols]), what
  `layer_norm_slice` normalizes, loaded before the row's statistics are known (the module's
  note on load order)."""
  return x_ref[row, cols], scale_ref[cols], bias_ref[cols]


def layer_norm_slice(loaded, stats):
  """Inside a kernel: LayerNorm(x)[cols] in x's dtype, from `load_norm_slice`'s loads and
  `layer_norm_stats`' statistics."""
  x, scale, bias = loaded
  mean, inv = stats
  normed = (x.astype(jnp.float32) - mean) * inv * scale.astype(jnp.float32)
  return (normed + bias.astype(jnp.float32)).astype(x.dtype)


def cache_blocks(max_len, positions=64):
  """(block, starts): how a kernel reads a KV cache of `max_len` positions, in blocks of the
  largest power of 2 up to `positions` that fits, the last block overlapping the one before
  (a kernel masks each position it reads twice in one of them)."""
  block = 1 << (min(positions, max_len).bit_length() - 1)
  return block, tuple(min(i * block, max_len - block)
                      for i in range((max_len + block - 1) // block))
