"""What one decoding step runs, kernel by kernel: the fixed cost per block behind Table 1.

  python -m sparse_scaling.bench.decode_profile [--shapes 800m] [--variants dense,ffqkv]
      [--layers 24] [--steps 20] [--loop 8] [--dtype float32] [--kernels auto] [--json]
      [--nowrite]

Builds each Table 1 variant as our `ScalingTransformerLM` in predict mode (random weights,
batch 1, KV caches of 168 positions as in Table 1), compiles a decoding step (state donated)
with every top-level layer under a named scope (`embed`, `block<i>/attention`, `block<i>/ff`,
`output`), in a loop of `--loop` steps as a generation runs it (`looped_step`: each step's
greedy token the next one's input; 1: one step a program), and reads three things:

- the optimized HLO of the step (the loop's body): every instruction that runs as a kernel
  (a fusion, a library call, a copy), the scope it belongs to (its `op_name` metadata), and
  the bytes it moves: its operands and outputs, except that an operand its fused computation
  only slices, gathers or updates in place counts only the part it touches, and that a Pallas
  kernel counts what its programs load and store (`block_profile.pallas_bytes`, from the
  step's jaxpr: Sparse FF's chosen rows, not W1 and W2 whole);
- a `jax.profiler` trace of at least `--steps` steps: the time of each of those kernels on
  the device per step (on a GPU the CUDA kernels that CUPTI records, on the CPU the thunks
  XLA's runtime runs);
- the wall time of a step (a program's time over its steps), measured apart from the trace.

On a GPU the traced program is compiled without XLA's command buffers: kernels that run
inside a CUDA graph reach the trace without the name of their HLO instruction. A trace's
kernel name is matched to its instruction by `kernel_key`.

The summary gives, per variant: wall and device-busy time per step, kernels per step and per
block, time and bytes per block, and the block's bandwidth floor. The detail lists one block's
kernels (block 1: block 0 can differ where XLA fuses across the embedding), each with what it
computes (`operation`: a Pallas kernel's function, else the operation XLA made it from). Device time far
above bytes / bandwidth with many kernels of a few microseconds each is launch-bound: the
step's cost is its number of kernels, not what they read. `--kernels` chooses the Pallas
decoding kernels (`layers/decode_kernels.py`: auto, pallas, interpret or xla). Writes
docs/results/decode_profile_<backend>.md unless --nowrite (shapes other than 800m and
--kernels other than auto add themselves to the name: decode_profile_gpu_17b.md,
decode_profile_gpu_pallas.md).
"""

import collections
import glob
import json
import re
import statistics
import tempfile

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sparse_scaling import decoding
from sparse_scaling.bench import block_profile
from sparse_scaling.bench import common
from sparse_scaling.bench import decoders
from sparse_scaling.bench import table1
from sparse_scaling.bench import timing
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import fused_residual

_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
             'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
# Instructions that are no kernel of their own.
_FREE = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'after-all',
         'partition-id', 'replica-id'}
_SLICING = {'dynamic-slice', 'gather', 'slice'}
# Steps per compiled program (`--loop`): the step runs in a loop of LOOP steps, as a generation
# runs its steps, so that the kernels are those of a loop's body. A program of one step also
# copies state that it both reads and updates in place, which no loop does (17B attention's
# position, read by its kernel: 1.3 µs a block on an H100; docs/decoding_gpu.md).
LOOP = 8


def looped_step(step, n_steps):
  """`(weights, state, tokens) -> (token, state)`: `step` (`scoped_step`'s) n_steps times in
  Table 1's loop (`table1.block_loop`), each step's token the next one's input, as a
  generation runs its steps. (Named so that its XLA module's name holds 'step', as
  `kernel_times` asks.)"""
  loop = table1.block_loop(step)

  def steps(weights, state, tokens):
    state, token = loop(weights, state, tokens, n_steps)
    return token, state
  return steps


def scoped_step(model):
  """`(weights, state, tokens) -> (next tokens, state)`: one greedy step of an LM, each
  top-level layer under a named scope (the model's layers take and give one array each),
  the blocks chained as in decoding (`fused_residual.run_layers`), each half under its own."""
  labels = decoders.scope_labels(model)

  def step(weights, state, tokens):
    x, new_state = fused_residual.run_layers(model.sublayers, tokens, weights, state,
                                             scope=lambda i: jax.named_scope(labels[i]))
    token = jnp.argmax(x[:, -1:], axis=-1).astype(jnp.int32)
    return token, new_state

  return step


# --- the optimized HLO -------------------------------------------------------------------

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$')
_COMPUTATION = re.compile(r'^%?([\w.\-]+) \(.*\) -> .* \{$|^ENTRY %?([\w.\-]+) ')


def _split_type(rest):
  """'TYPE opcode(operands), attrs' -> (TYPE, 'opcode(operands), attrs')."""
  if rest.startswith('('):
    depth = 0
    for i, c in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(c, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(' ')
  return head, tail


def _call(text):
  """'opcode(arguments), attrs' -> (opcode, arguments text, attrs)."""
  opcode, _, rest = text.partition('(')
  depth, i = 1, 0
  while depth and i < len(rest):
    depth += {'(': 1, ')': -1}.get(rest[i], 0)
    i += 1
  return opcode, rest[:i - 1], rest[i:]


def shape_bytes(type_text):
  """Bytes of an HLO type: 'f32[1,1024]{1,0}' or a tuple of such."""
  total = 0
  for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', type_text):
    total += _ITEMSIZE.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(',') if d]))
  return total


def parse_hlo(text):
  """Computations of an HLO module: name -> list of instruction dicts, and the entry's name."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1) or header.group(2)
      if line.startswith('ENTRY'):
        entry = current
      computations[current] = []
      continue
    match = _INSTRUCTION.match(line)
    if current is None or not match:
      continue
    type_text, call = _split_type(match.group(2))
    opcode, arguments, attrs = _call(call)
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    calls = re.search(r'calls=%?([\w.\-]+)', attrs)
    body = re.search(r'\bbody=%?([\w.\-]+)', attrs)   # a while loop's
    target = re.search(r'custom_call_target="([^"]*)"', attrs)
    kind = re.search(r'kind=(\w+)', attrs)
    grid = [int(n) for n in re.findall(r'grid_[xyz] = (\d+)', attrs)]
    names = re.findall(r'\bname = "(\w+)"', attrs)   # a Triton kernel's function (last)
    cycles = re.search(r'"estimated_cycles":"(\d+)"', attrs)   # a TPU compiler's estimate
    computations[current].append(dict(
        name=match.group(1), type=type_text, opcode=opcode,
        operands=re.findall(r'%([\w.\-]+)', arguments),
        index=int(arguments) if opcode == 'parameter' else None,
        op_name=op_name.group(1) if op_name else '', calls=calls and calls.group(1),
        body=body and body.group(1),
        target=target and target.group(1), kind=kind and kind.group(1),
        kernel=(names[-1], int(np.prod(grid))) if grid and names else None,
        cycles=cycles and int(cycles.group(1)), root=line.lstrip().startswith('ROOT')))
  return computations, entry


def _touched_bytes(fused, position, whole):
  """Bytes of parameter `position` of a fused computation that its body reads or writes."""
  param = next((i for i in fused if i['index'] == position), None)
  if param is None:
    return whole
  users = [i for i in fused if param['name'] in i['operands']]
  if not users:
    return 0
  touched = 0
  for user in users:
    if user['opcode'] in _SLICING and user['operands'][0] == param['name']:
      touched += shape_bytes(user['type'])
    elif user['opcode'] == 'dynamic-update-slice' and user['operands'][0] == param['name']:
      update = next((i for i in fused if i['name'] == user['operands'][1]), None)
      touched += shape_bytes(update['type']) if update else whole
    else:
      return whole
  return min(touched, whole)


def _output_bytes(inst, fused):
  """Bytes a kernel writes: its outputs, or the update of an in-place dynamic-update-slice.
  A cuBLAS call's outputs are its result and, last, a workspace (s8[...]) it may use; only
  the result counts."""
  if not fused:
    outputs = re.findall(r'\w+\[[\d,]*\]', inst['type'])
    if (inst['target'] or '').startswith('__cublas') and outputs and outputs[-1][:3] == 's8[':
      outputs = outputs[:-1]
    return shape_bytes(' '.join(outputs))
  by_name = {i['name']: i for i in fused}
  root = next((i for i in fused if i['root']), None)
  roots = [by_name.get(o) for o in root['operands']] if root and root['opcode'] == 'tuple' \
      else [root]
  total = 0
  for out in roots:
    while out and out['opcode'] in ('bitcast', 'copy') and out['operands']:
      out = by_name.get(out['operands'][0], out) if out['operands'][0] in by_name else None
    if out and out['opcode'] == 'dynamic-update-slice':
      total += shape_bytes(by_name[out['operands'][1]]['type'])
    elif out:
      total += shape_bytes(out['type'])
  return total


def loop_body(text):
  """The name of the body computation of the first while loop in HLO text."""
  computations, _ = parse_hlo(text)
  return next(inst['body'] for insts in computations.values() for inst in insts
              if inst['opcode'] == 'while')


def kernels(text, pallas=None, computation=None):
  """The entry computation's instructions that run (or `computation`'s, by its name: a loop's
  body): name -> dict(scope, category, bytes, op_name, function: a Triton kernel's function
  name, else None; cycles: the cycles a TPU's compiler estimates for it, else None).

  A custom call's bytes are its operands and outputs whole, except a Pallas kernel's found in
  `pallas` ({(function name, programs): bytes}, `block_profile.pallas_bytes`): what its
  programs load and store.
  """
  computations, entry = parse_hlo(text)
  entry = computation or entry
  types = {i['name']: i['type'] for i in computations[entry]}
  out = {}
  for inst in computations[entry]:
    if inst['opcode'] in _FREE:
      continue
    fused = computations.get(inst['calls']) if inst['opcode'] == 'fusion' else None
    moved = _output_bytes(inst, fused)
    for position, operand in enumerate(inst['operands']):
      whole = shape_bytes(types.get(operand, ''))
      moved += _touched_bytes(fused, position, whole) if fused else whole
    if inst['opcode'] == 'dynamic-update-slice':   # in place: the update only
      moved = 2 * shape_bytes(types.get(inst['operands'][1], ''))
    if pallas and inst['kernel'] in pallas:
      moved = pallas[inst['kernel']]
    category = inst['opcode']
    if fused:
      root = next((i for i in fused if i['root']), None)
      category = f'fusion {inst["kind"] or ""} ({root["opcode"] if root else "?"})'
    elif inst['target']:
      category = f'custom-call {inst["target"]}'
    op_name = _op_name(inst, fused)
    out[inst['name']] = dict(scope=_scope(op_name), category=category, bytes=moved,
                             op_name=op_name, function=inst['kernel'] and inst['kernel'][0],
                             cycles=inst['cycles'])
  # Instructions XLA made without metadata (the CPU's dots, a GPU's product over a KV cache)
  # belong where their users are, found through instructions that run no kernel (bitcasts).
  users = collections.defaultdict(list)
  for inst in computations[entry]:
    for operand in inst['operands']:
      users[operand].append(inst['name'])

  def user_scopes(name):
    for user in users[name]:
      if user not in out:
        yield from user_scopes(user)
      elif out[user]['scope'] != 'other':
        yield out[user]['scope']

  # Until nothing changes: a user may itself find its scope only through its own users.
  changed = True
  while changed:
    changed = False
    for name, meta in out.items():
      if meta['scope'] == 'other':
        meta['scope'] = next(user_scopes(name), 'other')
        changed = changed or meta['scope'] != 'other'
  return out


def _op_name(inst, fused):
  """The kernel's op_name: its own, or its fused computation's root's (fusions often carry
  none of their own)."""
  if inst['op_name'] or not fused:
    return inst['op_name']
  root = next((i for i in fused if i['root']), None)
  named = [i['op_name'] for i in ([root] if root else []) + fused if i['op_name']]
  return named[0] if named else ''


_SCOPES = r'(embed|block\d+/(?:attention|ff)|output)'   # `scoped_step`'s scopes in an op_name


def _scope(op_name):
  match = re.search(_SCOPES, op_name)
  return match.group(1) if match else 'other'


# --- the trace ---------------------------------------------------------------------------

def kernel_times(run, n_steps, module='step'):
  """Seconds per step of each HLO instruction's kernels: name -> (launches, seconds).

  Runs `run()` `n_steps` times under `jax.profiler.trace` and reads the trace: device
  planes' events (GPU kernels) on an accelerator, the host's XLA thunks on the CPU; only those
  of XLA modules whose name holds `module`.
  """
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(n_steps):
        jax.block_until_ready(run())
    paths = glob.glob(f'{log_dir}/**/*.xplane.pb', recursive=True)
    data = jax.profiler.ProfileData.from_file(paths[0])
  # On the CPU the host's planes: a GPU machine's trace has (empty) GPU planes also when JAX
  # runs on its CPU (JAX_PLATFORMS=cpu).
  on_device = jax.default_backend() != 'cpu'
  device_planes = [p for p in data.planes if on_device and p.name.startswith('/device:')]
  planes = device_planes or [p for p in data.planes if p.name.startswith('/host:')]
  totals = collections.defaultdict(lambda: [0, 0.0])
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        stats = {key: value for key, value in event.stats}
        name = stats.get('hlo_op') or (event.name if device_planes else None)
        if not name or event.name.startswith('end: '):
          continue
        if 'hlo_module' in stats and module not in str(stats['hlo_module']):
          continue
        totals[name][0] += 1
        totals[name][1] += event.duration_ns * 1e-9
  return {name: (count / n_steps, seconds / n_steps)
          for name, (count, seconds) in totals.items()}


def kernel_key(name):
  """What a trace's kernel name and an HLO instruction's name have in common: XLA names a GPU
  kernel after its instruction with '.' and '-' made '_' ('loop_add_fusion.3' runs as
  'loop_add_fusion_3'); the CPU's thunks may carry a ':suffix'."""
  return re.sub(r'[.\-]', '_', name.split(':')[0])


def attribute(times, info):
  """Rows of the traced kernels, each with the scope, category and bytes of its instruction;
  kernels no instruction names (a library's helper kernels) stay in scope 'other'."""
  by_key = {kernel_key(name): meta for name, meta in info.items()}
  rows = []
  for name, (launches, seconds) in times.items():
    meta = info.get(name) or by_key.get(kernel_key(name)) or {}
    rows.append(dict(kernel=name, launches=launches, seconds=seconds,
                     scope=meta.get('scope', 'other'), category=meta.get('category', '?'),
                     bytes=meta.get('bytes', 0), op_name=meta.get('op_name', ''),
                     function=meta.get('function'), attributed=bool(meta)))
  return rows


def operation(row):
  """What an `attribute` row's kernel computes, for a reader: a Pallas kernel's function
  name, else its instruction's op_name from its scope on ('jit(step)/block1/attention/
  ...i,si,im->...sm/dot_general' -> '...i,si,im->...sm/dot_general'); '' where XLA recorded
  none (the CPU's dots)."""
  if row.get('function'):
    return row['function']
  name = row.get('op_name', '')
  match = re.search(_SCOPES + '/(.*)', name)
  return match.group(2) if match else name.rpartition('jit(step)/')[2]


# On a GPU, XLA records runs of kernels as CUDA graphs (command buffers), whose kernels a trace
# sees without their instructions' names; the profiled step is compiled without them.
_PROFILE_OPTIONS = {'gpu': {'xla_gpu_enable_command_buffer': ''}}


def compile_traced(lowered):
  """The program to trace: on a GPU compiled without command buffers (`_PROFILE_OPTIONS`),
  elsewhere as XLA compiles it by default."""
  return lowered.compile(compiler_options=_PROFILE_OPTIONS.get(jax.default_backend()))


def compile_for_trace(lowered, traced=None):
  """(the program as XLA compiles it by default, the program to trace): the same one except on
  a GPU, where the traced one is `traced` (or `lowered`, both lowered) by `compile_traced`."""
  compiled = lowered.compile()
  if jax.default_backend() not in _PROFILE_OPTIONS:
    return compiled, compiled
  return compiled, compile_traced(traced or lowered)


def totals(rows, key):
  """`attribute`'s rows added up by `key(row)`: group -> dict(kernels, seconds, bytes)."""
  groups = collections.defaultdict(lambda: dict(kernels=0.0, seconds=0.0, bytes=0))
  for row in rows:
    group = groups[key(row)]
    group['kernels'] += row['launches']
    group['seconds'] += row['seconds']
    group['bytes'] += row['bytes']
  return groups


# --- one variant -------------------------------------------------------------------------

def profile_variant(shape, variant, n_layers, n_steps, dtype, bandwidth, loop=LOOP,
                    early=False):
  """Summary and per-kernel rows of one decoding step of a Table 1 variant."""
  summary, detail = profile(decoders.dimensions(shape, variant), n_layers, n_steps, dtype,
                            bandwidth, loop, early)
  summary.update(shape=shape, variant=variant)
  return summary, detail


def profile(dims, n_layers, n_steps, dtype, bandwidth, loop=LOOP, early=False):
  """Summary and per-kernel rows of one decoding step of our LM with dimensions `dims`: the
  step compiled in a loop of `loop` steps (`looped_step`; 1: a program of one step), its
  kernels those of the loop's body, times and launches per step. On a GPU the traced
  program's kernels let the next launch early only with `early`
  (`decode_kernels.launching_early`); the timed one's as decoding's do."""
  model = decoders.build('ours', dims, n_layers, decoders.MAX_LEN)
  weights, state = decoders.random_weights_and_state(model, dtype)
  weights = decoding.laid_out(model, weights)   # as a generation reads them
  tokens = jnp.ones((1, 1), jnp.int32)

  def trace():   # a new function each time, traced with the constants of the moment
    step = scoped_step(model) if loop == 1 else looped_step(scoped_step(model), loop)
    return decoding.jit(step, weights, donate_argnums=(1,)).trace(weights, state, tokens)

  program = traced_program = trace()
  if not early and jax.default_backend() in _PROFILE_OPTIONS:
    with decode_kernels.launching_early(False):
      traced_program = trace()
  compiled, traced = compile_for_trace(
      program.lower(), None if traced_program is program else traced_program.lower())
  text = traced.as_text()
  info = kernels(text, block_profile.pallas_bytes(traced_program.jaxpr),
                 computation=None if loop == 1 else loop_body(text))
  holder = {'state': state}

  def runner(program):
    def run():
      token, holder['state'] = program(weights, holder['state'], tokens)
      return token
    return run

  calls = -(-n_steps // loop)
  wall, _ = timing.time_call(runner(compiled), min_runs=max(20, calls), min_seconds=0.5,
                             warmup=3)
  wall /= loop
  run = runner(traced)
  jax.block_until_ready(run())
  # Per step; of a loop, without what the program runs once around it (the loop itself, the
  # copies into and out of its carry).
  once = set() if loop == 1 else {kernel_key(name) for name in kernels(text)}
  times = {name: (launches / loop, seconds / loop)
           for name, (launches, seconds) in kernel_times(run, calls).items()
           if kernel_key(name) not in once}
  rows = attribute(times, info)
  by_scope = totals(rows, lambda row: row['scope'])
  blocks = sorted({int(re.search(r'\d+', s).group()) for s in by_scope if s.startswith('block')})
  later = blocks[1:] or blocks

  def per_block(part, key):
    return statistics.median(by_scope[f'block{b}/{part}'][key] for b in later) if later else 0

  summary = dict(
      layers=n_layers, dtype=dtype, loop=loop, early=early,
      wall_s=wall, device_s=sum(r['seconds'] for r in rows),
      kernels=sum(r['launches'] for r in rows),
      unattributed_s=sum(r['seconds'] for r in rows if not r['attributed']),
      outside_s=sum(r['seconds'] for r in rows if not r['scope'].startswith('block')),
      block_kernels=per_block('attention', 'kernels') + per_block('ff', 'kernels'),
      block_s=per_block('attention', 'seconds') + per_block('ff', 'seconds'),
      block_bytes=per_block('attention', 'bytes') + per_block('ff', 'bytes'),
      attention_kernels=per_block('attention', 'kernels'),
      ff_kernels=per_block('ff', 'kernels'), bandwidth=bandwidth)
  summary['block_floor_s'] = summary['block_bytes'] / bandwidth
  detail = [r for r in rows if r['scope'] in (f'block{later[0]}/attention',
                                              f'block{later[0]}/ff', 'output')] if later else []
  return summary, sorted(detail, key=lambda r: (r['scope'], -r['seconds']))


def markdown(summaries, details, bandwidth, probe):
  """The summary table and each variant's block detail."""
  lines = [f'Machine: {timing.machine_description()}; read bandwidth {bandwidth / 1e9:.0f} GB/s '
           f'({probe}, measured in this run). Batch 1, one token per step, KV caches of '
           f'{decoders.MAX_LEN}. {_programs(summaries)} Device time: the kernels\' own time in '
           'a `jax.profiler` trace, per step; wall: a program\'s time over its steps, '
           'dispatch included. Bytes: what each kernel\'s '
           'operands and outputs hold in the optimized HLO (a slice, gather or in-place '
           'update counts only what it touches; a Pallas kernel counts what its programs '
           'load and store, each program\'s accesses, so data several programs read counts '
           'each time: as Sparse FF\'s, the chosen rows of W1 and W2, not the whole '
           'arrays); floor = block bytes / bandwidth.', '',
           'On a GPU the traced program is compiled without command buffers (CUDA graphs), '
           'so that every kernel carries its instruction\'s name, and '
           f'{_early(summaries)}; wall is the default compilation, as decoding runs it. '
           'Unnamed: device time of kernels no instruction names (a '
           'library\'s helpers), counted in the step but in no block. Outside blocks: the '
           'embedding, the output layer, the argmax and unnamed kernels. Op: what a kernel '
           'computes, a Pallas kernel\'s function or the operation its instruction was made '
           'from (its op_name within its block; blank where XLA recorded none).', '',
           common.table_header(['shape', 'variant', 'layers', 'wall ms/step', 'device ms/step',
                                'unnamed ms/step', 'outside blocks ms/step', 'kernels/step',
                                'kernels/block (attn + ff)', 'µs/block', 'MB/block',
                                'floor µs/block'])]
  for s in summaries:
    lines.append(common.table_row([
        s['shape'], s['variant'], s['layers'], f'{s["wall_s"] * 1e3:.3f}',
        f'{s["device_s"] * 1e3:.3f}', f'{s.get("unattributed_s", 0) * 1e3:.3f}',
        f'{s.get("outside_s", 0) * 1e3:.3f}',
        f'{s["kernels"]:.0f}',
        f'{s["block_kernels"]:.0f} ({s["attention_kernels"]:.0f} + {s["ff_kernels"]:.0f})',
        f'{s["block_s"] * 1e6:.1f}', f'{s["block_bytes"] / 1e6:.2f}',
        f'{s["block_floor_s"] * 1e6:.2f}']))
  for s, detail in zip(summaries, details):
    lines += ['', f'### {s["shape"]} {s["variant"]}: the kernels of one block, and the output '
              'layer\'s', '',
              common.table_header(['scope', 'kernel', 'what', 'op', 'launches', 'µs', 'MB'])]
    for r in detail:
      op = operation(r)
      lines.append(common.table_row([
          r['scope'].split('/')[-1], f'`{r["kernel"]}`', r['category'], op and f'`{op}`',
          f'{r["launches"]:.0f}', f'{r["seconds"] * 1e6:.1f}', f'{r["bytes"] / 1e6:.3f}']))
  return '\n'.join(lines)


def _programs(summaries):
  """The sentence that says how the profiled steps were compiled."""
  loops = sorted({s.get('loop', 1) for s in summaries})
  if loops == [1]:
    return 'Each step one jitted program.'
  return (f'The step compiled in a loop of {"/".join(map(str, loops))} steps, as a generation '
          'runs its steps (`--loop`): the kernels of the loop\'s body, the loop\'s counter '
          'among them.')


def _early(summaries):
  """The clause that says whether the traced kernels launched the next early."""
  if all(s.get('early') for s in summaries):
    return ('its kernels let the next launch early, as decoding\'s do (`--early_launch`: a '
            'kernel launched early is traced from its launch, its wait for the kernel before '
            'it included)')
  return ('its kernels do not let the next launch early, as decoding\'s do (each kernel\'s '
          'time its own; a kernel launched early would be traced from its launch, its wait '
          'for the kernel before it included)')


def results_name(backend, shapes, kernels, dtype):
  """The results file of a run: decode_profile_<backend>.md for the defaults (800m, 'auto',
  float32), each other choice adding its suffix, so that runs of one kind replace each other."""
  suffix = ''.join(['' if shapes == ['800m'] else '_' + '_'.join(shapes),
                    '' if kernels == 'auto' else f'_{kernels}',
                    '' if dtype == 'float32' else f'_{dtype}'])
  return f'decode_profile_{backend}{suffix}.md'


def define_flags():
  """Defines the command line's flags; only when run as a program (others have namesakes)."""
  common.define_flags(
      json_output=True, shapes=decoders.SHAPES,
      writes='docs/results/decode_profile_<backend>[_<shapes>][_<kernels>][_<dtype>].md')
  flags.DEFINE_list('variants', list(decoders.VARIANTS), 'Table 1 variants to profile.')
  flags.DEFINE_integer('layers', None, "Blocks of the decoder (default: the shape's whole "
                       'depth, 24 at 800m).', lower_bound=1)
  flags.DEFINE_integer('steps', 20, 'Steps traced.', lower_bound=1)
  flags.DEFINE_integer('loop', LOOP, 'Steps per compiled program: the step in a loop of this '
                       'many, as a generation runs it; 1: one jitted step a call.',
                       lower_bound=1)
  flags.DEFINE_bool('early_launch', False, "On a GPU, trace the kernels as decoding runs them, "
                    'each letting the next launch early (layers/decode_kernels.py), so that a '
                    "kernel launched early is traced from its launch, its wait for the one "
                    'before included; by default each kernel\'s own time.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Weights and activations.')
  flags.DEFINE_enum('kernels', 'auto', list(decode_kernels.CHOICES),
                    'Where decoding runs Pallas kernels (layers/decode_kernels.py).')


def main(argv):
  del argv
  args = flags.FLAGS
  shapes = args.shapes or ['800m']
  if not set(args.variants) <= set(decoders.VARIANTS):
    raise app.UsageError(f'--variants: {args.variants} must be among {list(decoders.VARIANTS)}')
  bandwidth, probe = timing.memory_bandwidth(with_probe=True)
  summaries, details = [], []
  for shape in shapes:
    for variant in args.variants:
      with decode_kernels.use(args.kernels):
        summary, detail = profile_variant(shape, variant,
                                          args.layers or decoders.SHAPES[shape][3], args.steps,
                                          args.dtype, bandwidth, args.loop,
                                          args.early_launch)
      summaries.append(summary)
      details.append(detail)
      print(json.dumps(summary), flush=True)
  text = markdown(summaries, details, bandwidth, probe)
  print(text, flush=True)
  if args.write:
    path = common.RESULTS_DIR / results_name(jax.default_backend(), shapes, args.kernels,
                                             args.dtype)
    path.write_text('# One decoding step, kernel by kernel\n\n'
                    f'`{common.command_line("sparse_scaling.bench.decode_profile")}`\n\n'
                    + text + '\n')
  if args.json:
    print(json.dumps(dict(summaries=summaries, details=details)))


if __name__ == '__main__':
  common.run(main, define_flags)
