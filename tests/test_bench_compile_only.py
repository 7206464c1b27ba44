"""The fused blocks compiled for a Hopper GPU without one, and the blocks for a TPU without one
(`bench/compile_only.py`)."""

import importlib.util
import os
import shutil
import subprocess
import sys

import jax
import pytest

from sparse_scaling.bench import compile_only
from sparse_scaling.layers import decode_kernels


def _has_plugin():
  try:
    return importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
  except ModuleNotFoundError:   # no jax_plugins package at all
    return False


PLUGIN = _has_plugin()
LIBTPU = importlib.util.find_spec('libtpu') is not None
REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_attend_kernel' for 'sm_90a'
ptxas info    : Function properties for _attend_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers
ptxas info    : Compiling entry function 'wide' for 'sm_90a'
ptxas info    : Function properties for wide
    48 bytes stack frame, 40 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 8320 bytes smem
"""


def _program(*flags, env=None):
  return subprocess.run([sys.executable, '-m', 'sparse_scaling.bench.compile_only', *flags],
                        capture_output=True, text=True, env=env)


def test_ptxas_report_gives_each_kernel_its_registers_and_spilled_bytes():
  assert compile_only.parse_ptxas(REPORT) == {'_attend_kernel': (128, 0), 'wide': (255, 64)}
  assert compile_only.parse_ptxas('ptxas fatal   : Missing .version directive') == {}


def test_a_variant_without_sparse_qkv_is_refused():
  out = _program('--variant', 'ff')
  assert out.returncode != 0 and not out.stdout
  assert out.stderr.splitlines()[-1] == (
      'error: --variant ff: --blocks fused compiles the fused blocks of a variant with Sparse '
      'QKV')


def test_as_on_a_gpu_answers_gpu_within_and_restores_the_backend():
  real = jax.default_backend()
  with pytest.raises(ValueError):
    with compile_only.as_on():
      assert jax.default_backend() == 'gpu'
      assert decode_kernels.active('attention', True) == 'pallas'   # 'auto', as on a GPU
      raise ValueError
  assert jax.default_backend() == real


def test_without_ptxas_it_stops_with_one_line():
  env = dict(os.environ, PATH=os.path.dirname(sys.executable))
  out = _program(env=env)
  assert out.returncode != 0 and not out.stdout
  assert out.stderr.splitlines()[-1] == (
      'error: ptxas: not on the PATH (CUDA 12.8 or newer, for sm_90a)')


@pytest.mark.skipif(PLUGIN, reason='this machine has the CUDA plugin')
def test_without_the_cuda_plugin_no_device_is_made():
  with pytest.raises(RuntimeError, match='--gpu h200: no CUDA plugin to compile with'):
    compile_only.compile_only_device('h200')


@pytest.mark.skipif(not (PLUGIN and shutil.which('ptxas')),
                    reason='needs the CUDA plugin and ptxas')
def test_the_800m_blocks_compile_to_their_kernels_with_registers_and_no_spills():
  """Where the plugin and ptxas are (not in CI): the 800M FF+QKV attention block is the
  multiplicative, convolution and attention kernels, the FF block its LayerNorm-controller
  and units kernels, each with its registers and no spills."""
  out = _program('--settings', 'default')
  assert out.returncode == 0, out.stderr
  rows = [[cell.strip() for cell in line.strip('|').split('|')]
          for line in out.stdout.splitlines() if line.startswith('| default')]
  kernels = {row[3].strip('`'): (int(row[4]), int(row[5])) for row in rows if row[3]}
  assert set(kernels) == {'_mixed_kernel', '_conv_kernel', '_attend_kernel', '_norm_kernel',
                          '_units_kernel'}
  assert all(0 < registers <= 255 and spills == 0 for registers, spills in kernels.values())


@pytest.mark.skipif(not (PLUGIN and shutil.which('ptxas')),
                    reason='needs the CUDA plugin and ptxas')
def test_the_17b_block_as_a_generation_runs_it_has_one_layernorm_kernel():
  """--blocks model: the 17B FF+QKV block a GPU's generation runs (XLA's attention block with
  attention's own kernel, the FF block's three kernels); the LayerNorm's statistics one
  kernel with ONE_PASS and two without, nothing else changed."""
  out = _program('--blocks', 'model', '--shape', '17b', '--settings', 'default,LN_ONE_PASS=0')
  assert out.returncode == 0, out.stderr
  settings = ('default', 'LN_ONE_PASS=0')
  rows = [row for row in ([cell.strip() for cell in line.strip('|').split('|')]
                          for line in out.stdout.splitlines()) if row[0] in settings]
  listed = {setting: [row[2] for row in rows if row[0] == setting] for setting in settings}
  assert len(listed['LN_ONE_PASS=0']) == len(listed['default']) + 1
  kernels = {row[3].strip('`') for row in rows if row[3]}
  assert kernels == {'_split_kernel', '_norm_kernel', '_units_kernel', '_down_kernel'}


@pytest.mark.skipif(not (PLUGIN and shutil.which('ptxas')),
                    reason='needs the CUDA plugin and ptxas')
def test_the_800m_dense_block_loses_a_kernel_to_each_of_relu_and_layernorm():
  """--blocks model, dense: XLA takes the ReLU as a maximum into the product after it
  (`feed_forward.RELU_AS_MAXIMUM`), and each LayerNorm's statistics are one reduction
  (`layer_norm.ONE_PASS`; trax's two are two kernels)."""
  settings = ('default', 'RELU_MAX=0', 'LN_ONE_PASS=0+RELU_MAX=0')
  out = _program('--blocks', 'model', '--variant', 'dense', '--settings', ','.join(settings))
  assert out.returncode == 0, out.stderr
  rows = [[cell.strip() for cell in line.strip('|').split('|')]
          for line in out.stdout.splitlines()]
  counts = [sum(row[0] == setting for row in rows) for setting in settings]
  assert counts == [13, 14, 16]


@pytest.mark.skipif(not (PLUGIN and shutil.which('ptxas')),
                    reason='needs the CUDA plugin and ptxas')
def test_the_17b_block_in_a_loop_copies_nothing_that_its_one_step_program_copies():
  """--blocks loop: in Table 1's loop of one block the 17B FF+QKV block runs the one-step
  program's instructions but the copy of the position that attention's kernel reads, and
  the loop's counter beside them; the same kernels."""
  listed = {}
  for blocks in ('model', 'loop'):
    out = _program('--blocks', blocks, '--shape', '17b', '--settings', 'default')
    assert out.returncode == 0, out.stderr
    listed[blocks] = [row for row in ([cell.strip() for cell in line.strip('|').split('|')]
                                      for line in out.stdout.splitlines())
                      if row[0] == 'default']
  copies = lambda rows: [row for row in rows if row[2].startswith('`copy')]
  assert len(copies(listed['model'])) == 1 and not copies(listed['loop'])
  assert len(listed['loop']) == len(listed['model'])   # the loop's counter for the copy
  kernels = lambda rows: sorted(row[3] for row in rows if row[3])
  assert kernels(listed['loop']) == kernels(listed['model'])


def test_a_tpu_compiles_no_fused_blocks():
  out = _program('--tpu', 'v5e')
  assert out.returncode != 0 and not out.stdout
  assert out.stderr.splitlines()[-1] == (
      'error: --tpu: compiles --blocks model or loop (the fused blocks are GPU kernels)')


@pytest.mark.skipif(LIBTPU, reason='this machine has libtpu')
def test_without_libtpu_no_tpu_chip_is_made():
  with pytest.raises(RuntimeError, match='--tpu v5e: no TPU compiler'):
    compile_only.compile_only_tpu('v5e')


@pytest.mark.skipif(not LIBTPU, reason='needs libtpu')
def test_the_800m_blocks_compile_for_a_tpu_through_xlas_ops_with_the_compilers_estimates():
  """Where libtpu is (not in CI): Table 1's 800M block in its loop, compiled for a v5e chip,
  runs XLA's instructions only (no kernel of ours), most with the compiler's estimated
  cycles, and FF+QKV's add up to fewer than dense's."""
  summaries = {}
  for variant in ('dense', 'ffqkv'):
    out = _program('--tpu', 'v5e', '--blocks', 'loop', '--variant', variant)
    assert out.returncode == 0, out.stderr
    rows = [[cell.strip() for cell in line.strip('|').split('|')]
            for line in out.stdout.splitlines() if line.startswith('| default')]
    listed = [row for row in rows if row[2].startswith('`')]
    assert not [row for row in listed if 'tpu_custom_call' in row[3]]   # Pallas' kernels
    assert sum(bool(row[4]) for row in listed) > len(listed) / 2
    instructions, cycles = rows[-1][2:]
    assert int(instructions) == len(listed)
    assert int(cycles) == sum(int(row[4] or 0) for row in listed)
    summaries[variant] = int(cycles)
  assert summaries['ffqkv'] < summaries['dense']
