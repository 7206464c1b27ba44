"""The fused blocks compiled for a Hopper GPU on a machine without one: each kernel's registers
and spills, and the instructions XLA runs; or Table 1's blocks compiled for a TPU chip.

  python -m sparse_scaling.bench.compile_only [--gpu h100 | --tpu v5e] [--shape 800m]
      [--variant ffqkv] [--settings CACHE=2048,CACHE=2048+ATTEND_STEP=2]
      [--blocks fused|model|loop]

GPU time is scarce; what a kernel compiles to is not. This compiles the fused blocks as
`decode_shares --measure trace` does (`decode_shares.fused_blocks`, each block jitted as a
generation's program, its state donated: `decode_shares.fused_block_programs`), with
`decode_shares`' settings, for a compile-only device that XLA builds from a description of
the GPU (`TARGET` with `GPUS`' figures: an H100's or H200's, from XLA's target
configurations; both Hopper, sm_90a, so their kernels compile alike). Per
setting and block it prints the instructions of the program that run, copies included
(`decode_profile.kernels`), each kernel with its registers a thread and the bytes it spills
(ptxas -v on the PTX that XLA writes). Nothing runs and nothing is timed.

With `--blocks model` it compiles instead one decoding step of the model's first block
(attention and FF) as a generation on a GPU runs it (`compiled_model_block`): the paths a GPU
takes, XLA's ops among them (17B's attention block), so that what XLA makes of them can be
counted offline (the 17B FF+QKV block: 16 instructions that run, 17 with `LN_ONE_PASS=0`, as
an H100's trace of the step found 16; docs/decoding_gpu.md). Any variant. A step compiled
as a program of its own is not quite what a loop runs: XLA copies state that the step both
reads and updates in place (17B attention's position, read by its kernel). `--blocks loop`
compiles the block in Table 1's loop of one block (`table1.block_loop`, as its per-block
program column runs it) and lists its body's instructions, the loop's counter among them: the
17B FF+QKV block runs 15 kernels there, no copy.

Needs, beside this package: this jaxlib's CUDA plugin without the CUDA libraries it would
load on a GPU (`pip install --no-deps jax-cuda12-plugin==V jax-cuda12-pjrt==V`, V the
jaxlib version) and ptxas for sm_90a on the PATH (CUDA 12.8 or newer). Without them it stops
with a one-line error.

`--tpu v5e` (or v6e, v4) compiles `--blocks model` or `loop` for one chip of that TPU instead,
with the TPU's own compiler (libtpu, jax[tpu]'s: `pip install --no-deps libtpu==V`, V the
version jax[tpu] pins), on a machine without a TPU: the paths a TPU takes (XLA's ops; the
fused blocks are GPU kernels). Per instruction it prints the cycles the compiler estimates
for it, and per block the instructions and their estimated cycles, a step. These are the
compiler's figures, not timings.
"""

import contextlib
import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile

from absl import app
from absl import flags
import jax
from jax.experimental import topologies

from sparse_scaling import decoding
from sparse_scaling.bench import common
from sparse_scaling.bench import decode_profile
from sparse_scaling.bench import decode_shares
from sparse_scaling.bench import decoders
from sparse_scaling.bench import table1

# The figures of XLA's target configurations (xla/backends/gpu/target_config/specs) that
# differ between the two cards: name, memory bytes, memory bytes a second.
GPUS = {'h100': ('NVIDIA H100 80GB HBM3', 84942979072, 3352320000000),
        'h200': ('NVIDIA H200 141GB HBM3e', 151397597184, 4800000000000)}
# TPU chips by a topology of one host that holds them (`--tpu`); a program compiles for its
# first chip. v5e and v6e are the chips of Colab's TPU runtimes.
TPUS = {'v5e': 'v5e:2x2', 'v6e': 'v6e:2x2', 'v4': 'v4:2x2x1'}
# Steps of `--blocks loop`'s loop: any above 1 (XLA inlines a loop of one step).
LOOP_STEPS = 4
TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{name}"
"""


def compile_only_device(gpu):
  """A device of the `gpu` (a key of GPUS) that programs compile for but never run on.
  One-line RuntimeError where this jaxlib has no CUDA plugin."""
  name, memory, bandwidth = GPUS[gpu]
  target = TARGET.format(name=name, memory=memory, bandwidth=bandwidth)
  try:
    topology = topologies.get_topology_desc(
        'compile_only', 'cuda', target_config=target, topology='1x1x1')
  except (RuntimeError, NotImplementedError) as e:
    raise RuntimeError(f'--gpu {gpu}: no CUDA plugin to compile with (pip install --no-deps '
                       f'jax-cuda12-plugin=={jax.__version__} jax-cuda12-pjrt=='
                       f'{jax.__version__}): {str(e).splitlines()[0]}') from e
  return topology.devices[0]


def compile_only_tpu(chip):
  """A chip of the TPU `chip` (a key of TPUS) that programs compile for but never run on.
  One-line RuntimeError where no TPU compiler (libtpu) is installed."""
  try:
    topology = topologies.get_topology_desc(topology_name=TPUS[chip], platform='tpu')
  except Exception as e:   # pylint: disable=broad-except   # no libtpu: the error varies
    raise RuntimeError(f'--tpu {chip}: no TPU compiler (libtpu) to compile with (pip install '
                       f'--no-deps libtpu, the version jax[tpu]=={jax.__version__} pins): '
                       f'{str(e).splitlines()[0]}') from e
  return topology.devices[0]


def ptxas_usage(ptx_path, ptxas='ptxas'):
  """{kernel: (registers a thread, spill bytes stored + loaded)} of the kernels in a PTX
  file, as `ptxas -v` reports them for sm_90a ({} for a file of no kernel: XLA writes some
  empty)."""
  out = subprocess.run([ptxas, '-arch=sm_90a', '-v', ptx_path, '-o', os.devnull],
                       capture_output=True, text=True, check=False).stderr
  return parse_ptxas(out)


def parse_ptxas(text):
  """{kernel: (registers, spill bytes)} from `ptxas -v`'s report (its 'Compiling entry
  function', 'bytes spill stores, ... spill loads' and 'Used N registers' lines)."""
  usage, kernel, spills = {}, None, 0
  for line in text.splitlines():
    entry = re.search(r"Compiling entry function '(\w+)'", line)
    if entry:
      kernel, spills = entry.group(1), 0
    spill = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', line)
    if spill:
      spills = int(spill.group(1)) + int(spill.group(2))
    used = re.search(r'Used (\d+) registers', line)
    if used and kernel:
      usage[kernel] = (int(used.group(1)), spills)
      kernel = None
  return usage


def _compiled(fn, args, donate, device, loops=True):
  """(the HLO text, {kernel: (registers, spill bytes)}) of `decoding.jit(fn, loops=loops)` on
  args (arrays or shapes) with `donate` donated, compiled for `device` (a GPU's, or a TPU's:
  no registers there)."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  platform = 'tpu' if device.platform == 'tpu' else 'cuda'
  with tempfile.TemporaryDirectory() as dump:
    program = decoding.jit(fn, loops=loops, donate_argnums=donate).trace(
        *jax.tree.map(spec, args))
    compiled = program.lower(lowering_platforms=(platform,)).compile(
        compiler_options={'xla_dump_to': dump})
    usage = {}
    for path in sorted(glob.glob(os.path.join(dump, '*.ptx'))):
      usage.update(ptxas_usage(path))
  return compiled.as_text(), usage


def compiled_blocks(dims, device, dtype='float32'):
  """{'attention' | 'FF': (the compiled program's HLO text, {kernel: (registers, spill
  bytes)})}: each fused block of `dims` compiled for `device` as a generation compiles it."""
  return {name: _compiled(fn, args, donate, device)
          for name, fn, args, donate in decode_shares.fused_block_programs(dims, dtype=dtype)}


@contextlib.contextmanager
def as_on(backend='gpu'):
  """Within: code that asks `jax.default_backend()` which path to take (`decode_kernels`'
  'auto', the convolutions' decoding layout, ...) is answered `backend` ('gpu' or 'tpu'), so
  that a block is built and traced as a generation there builds and traces it, on a machine
  without one."""
  real = jax.default_backend
  jax.default_backend = lambda: backend
  try:
    yield
  finally:
    jax.default_backend = real


def compiled_model_block(dims, device, dtype='float32', loop=False):
  """{'block': (the compiled program's HLO text, {kernel: (registers, spill bytes)})}: one
  decoding step of Table 1's first block of `dims` (attention and FF, `table1._first_block`)
  as a generation on the `device`'s backend runs it at cache position 0 (`as_on`: on a GPU
  17B's attention block through XLA's ops and attention's own kernel, 800M's through the
  fused kernels; on a TPU XLA's ops), its state donated, compiled for `device`; with `loop`,
  {'loop': ...}: the block in Table 1's loop of LOOP_STEPS steps (`table1.block_loop`, XLA's
  loops as that column compiles them). The weights are shapes only: nothing is drawn."""
  with as_on('tpu' if device.platform == 'tpu' else 'gpu'):
    model = decoders.build('ours', dims, 1, decoders.MAX_LEN)
    weights, state = jax.eval_shape(lambda: decoders.random_weights_and_state(model, dtype))
    built = {}

    def laid_out(weights, state):
      built['step'], weights, state, x = table1._first_block(  # pylint: disable=protected-access
          model, dtype, drawn=(weights, state))
      return weights, state, x

    args = jax.eval_shape(laid_out, weights, state)
    if loop:
      looped = functools.partial(table1.block_loop(built['step']), n_steps=LOOP_STEPS)
      return {'loop': _compiled(looped, args, 1, device, loops=False)}
    return {'block': _compiled(built['step'], args, 1, device)}


def rows(setting, blocks):
  """Table rows (setting, block, instruction, kernel, registers, spill bytes) of
  `compiled_blocks`' or `compiled_model_block`'s result: every instruction that runs, a
  Pallas kernel's by its function; of a 'loop', those of the loop's body."""
  out = []
  for block, (hlo, usage) in blocks.items():
    computation = decode_profile.loop_body(hlo) if block == 'loop' else None
    for name, meta in decode_profile.kernels(hlo, computation=computation).items():
      kernel = meta['function'] or ''
      registers, spills = usage.get(kernel, ('', ''))
      out.append([setting, block, f'`{name}`', f'`{kernel}`' if kernel else '', registers,
                  spills])
  return out


def tpu_rows(setting, blocks):
  """(rows, summaries) of `compiled_model_block`'s result compiled for a TPU: rows (setting,
  block, instruction, what, estimated cycles) of every instruction that runs (of a 'loop',
  its body's); a summary (setting, block, instructions, estimated cycles) of each block."""
  rows, summaries = [], []
  for block, (hlo, _) in blocks.items():
    computation = decode_profile.loop_body(hlo) if block == 'loop' else None
    listed = decode_profile.kernels(hlo, computation=computation)
    for name, meta in listed.items():
      rows.append([setting, block, f'`{name}`', meta['category'],
                   '' if meta['cycles'] is None else meta['cycles']])
    summaries.append([setting, block, len(listed),
                      sum(m['cycles'] or 0 for m in listed.values())])
  return rows, summaries


def define_flags():
  """Defines the command line's flags; only when run as a program."""
  flags.DEFINE_enum('gpu', 'h100', list(GPUS), 'The GPU to compile for.')
  flags.DEFINE_enum('tpu', None, list(TPUS), 'Compile for one chip of this TPU instead '
                    '(--blocks model or loop).')
  flags.DEFINE_enum('shape', '800m', list(decoders.SHAPES), 'Table 1 shape.')
  flags.DEFINE_enum('variant', 'ffqkv', list(decoders.VARIANTS),
                    'Table 1 variant (with --blocks fused, one with Sparse QKV).')
  flags.DEFINE_list('settings', ['default'], "decode_shares' settings, each compiled.")
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Weights and caches.')
  flags.DEFINE_enum('blocks', 'fused', ['fused', 'model', 'loop'],
                    "fused: the fused blocks' kernels alone; model: one step of the model's "
                    'first block as a generation on a GPU runs it; loop: that block in '
                    "Table 1's loop of one block, the loop body's instructions.")


def main(argv):
  del argv
  args = flags.FLAGS
  if args.blocks == 'fused' and 'qkv' not in args.variant:
    raise app.UsageError(f'--variant {args.variant}: --blocks fused compiles the fused blocks '
                         'of a variant with Sparse QKV')
  try:
    settings = [(text, decode_shares.parse_setting(text)) for text in args.settings]
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if args.tpu:
    return main_tpu(args, settings)
  if not shutil.which('ptxas'):
    raise app.UsageError('ptxas: not on the PATH (CUDA 12.8 or newer, for sm_90a)')
  # Compiles only: the CUDA plugin loads without the CUDA libraries a GPU would need.
  os.environ['JAX_SKIP_CUDA_CONSTRAINTS_CHECK'] = '1'
  jax.config.update('jax_platforms', 'cpu')
  try:
    device = compile_only_device(args.gpu)
  except RuntimeError as e:
    raise app.UsageError(str(e)) from e
  what = {'fused': 'each fused block as a generation compiles it',
          'model': "the model's first block, one step as a generation on a GPU runs it",
          'loop': "the model's first block as a generation on a GPU runs it, in Table 1's "
                  'loop of one block (the instructions of its body)'}[args.blocks]
  print(f'{GPUS[args.gpu][0]}, compiled only (jax {jax.__version__}). {args.variant} at '
        f'{args.shape}, {args.dtype}, {what}.')
  print(common.table_header(['setting', 'block', 'instruction', 'kernel', 'registers',
                             'spill bytes']))
  dims = decoders.dimensions(args.shape, args.variant)
  for text, setting in settings:
    with decode_shares.shares(setting):
      blocks = (compiled_blocks(dims, device, args.dtype) if args.blocks == 'fused' else
                compiled_model_block(dims, device, args.dtype, loop=args.blocks == 'loop'))
    for row in rows(text, blocks):
      print(common.table_row(row), flush=True)


def main_tpu(args, settings):
  """`--tpu`: the model's first block compiled for a TPU chip, instruction by instruction,
  then each block's sums."""
  if args.blocks == 'fused':
    raise app.UsageError('--tpu: compiles --blocks model or loop (the fused blocks are GPU '
                         'kernels)')
  # The program runs nothing: no TPU is sought, and libtpu's lock on the chips (held by any
  # other process that loaded it) is not taken.
  jax.config.update('jax_platforms', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    device = compile_only_tpu(args.tpu)
  except RuntimeError as e:
    raise app.UsageError(str(e)) from e
  what = ('one step, as a generation runs it' if args.blocks == 'model' else
          "in Table 1's loop of one block (the instructions of its body)")
  print(f'TPU {device.device_kind}, compiled only (jax {jax.__version__}). {args.variant} at '
        f'{args.shape}, {args.dtype}: the first block {what}. Cycles: the compiler\'s '
        'estimates, not timings.')
  print(common.table_header(['setting', 'block', 'instruction', 'what', 'estimated cycles']))
  dims = decoders.dimensions(args.shape, args.variant)
  summaries = []
  for text, setting in settings:
    with decode_shares.shares(setting):
      blocks = compiled_model_block(dims, device, args.dtype, loop=args.blocks == 'loop')
    rows, sums = tpu_rows(text, blocks)
    for row in rows:
      print(common.table_row(row), flush=True)
    summaries += sums
  print()
  print(common.table_header(['setting', 'block', 'instructions', 'estimated cycles']))
  for row in summaries:
    print(common.table_row(row), flush=True)


if __name__ == '__main__':
  common.run(main, define_flags)
