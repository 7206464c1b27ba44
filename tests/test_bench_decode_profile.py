"""The decode profile: one step's kernels, attributed to blocks, priced by the bytes they move."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_scaling.bench import decode_profile
from sparse_scaling.bench import table1

TINY = dict(d_model=32, d_ff=128, n_heads=2, vocab_size=64, ff_sparsity=(8, 4),
            attention_sparsity=4, loss_sparsity=4, length_kernel_size=3)
DENSE = dict(TINY, ff_sparsity=0, attention_sparsity=0, loss_sparsity=0)


def test_scoped_step_is_the_models_greedy_step():
  model = table1.build('ours', TINY, 2, 16)
  weights, state = table1.random_weights_and_state(model, 'float32')
  tokens = jnp.ones((1, 1), jnp.int32)
  token, _ = decode_profile.scoped_step(model)(weights, state, tokens)
  logits, _ = model.pure_fn(tokens, weights, state, None)
  assert int(token[0, 0]) == int(jnp.argmax(logits[0, -1]))


def test_looped_step_runs_the_greedy_steps_one_after_another():
  model = table1.build('ours', TINY, 2, 16)
  weights, state = table1.random_weights_and_state(model, 'float32')
  step = decode_profile.scoped_step(model)
  tokens = jnp.ones((1, 1), jnp.int32)
  looped, looped_state = jax.jit(decode_profile.looped_step(step, 3))(weights, state, tokens)
  for _ in range(3):
    tokens, state = step(weights, state, tokens)
  assert int(looped[0, 0]) == int(tokens[0, 0])
  # The caches hold the three steps' keys and values, the positions moved on by three.
  for got, want in zip(jax.tree.leaves(looped_state), jax.tree.leaves(state)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_loops_body_is_found_and_its_instructions_listed():
  """The instructions of a loop's body, not the entry's (a CPU program here: the parsing is
  the same for a GPU's)."""
  def program(x):
    return jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x) * 2.0 + i, x)

  hlo = jax.jit(program).lower(jnp.ones(8)).compile().as_text()
  body = decode_profile.loop_body(hlo)
  assert body != decode_profile.parse_hlo(hlo)[1]   # not the entry
  listed = decode_profile.kernels(hlo, computation=body)
  text = hlo[hlo.index(f'\n%{body} '):]
  text = text[:text.index('\n}\n')]
  assert listed and all(f'%{name} = ' in text for name in listed)
  assert any(meta['category'].startswith('fusion') for meta in listed.values())
  assert not set(listed) & set(decode_profile.kernels(hlo))   # the entry's: the loop


@pytest.mark.parametrize('dims,loop', [(TINY, 4), (DENSE, 4), (TINY, 1)],
                         ids=['ffqkvloss', 'dense', 'ffqkvloss-one-step'])
def test_every_block_runs_its_kernels_and_the_summary_adds_them_up(dims, loop):
  summary, detail = decode_profile.profile(dims, 3, 3, 'float32', bandwidth=30e9, loop=loop)
  assert summary['loop'] == loop
  # Per step: each of the block's kernels runs once a step, in a loop as in one step.
  assert all(r['launches'] == 1 for r in detail)
  assert summary['kernels'] > 3 * summary['block_kernels'] > 0
  assert 0 < summary['block_s'] < summary['device_s']
  assert summary['block_bytes'] > 0
  assert {r['scope'] for r in detail} == {'block1/attention', 'block1/ff', 'output'}
  # The detail is block 1 and the output layer; the summary the median block (XLA may fuse
  # blocks differently). Outside the blocks: the output layer's kernels and more.
  block = [r for r in detail if r['scope'] != 'output']
  assert sum(r['launches'] for r in block) == pytest.approx(summary['block_kernels'], rel=0.2)
  output = sum(r['seconds'] for r in detail if r['scope'] == 'output')
  assert 0 < output <= summary['outside_s'] < summary['device_s'] - summary['block_s']
  # The block's weights are all read at least once.
  model = table1.build('ours', dims, 1, 16)
  block_weights = sum(w.size * 4 for w in jax.tree.leaves(
      table1.random_weights_and_state(model, 'float32')[0][2:4]))
  gathered = dims['ff_sparsity'] and 2 * (dims['d_ff'] - dims['d_ff'] // 8) * dims['d_model'] * 4
  assert summary['block_bytes'] >= block_weights - (gathered or 0)


def test_hlo_bytes_count_what_slices_gathers_and_in_place_updates_touch():
  def step(table, cache, rows, i, x):
    cache = jax.lax.dynamic_update_slice_in_dim(cache, x[None], i, 0)   # in place: one row
    return jnp.take(table, rows, axis=0).sum(0) + x, cache              # two rows of 1000
  table, cache = jnp.ones((1000, 256)), jnp.zeros((512, 256))
  hlo = jax.jit(step, donate_argnums=(1,)).lower(table, cache, jnp.array([3, 9]), 5,
                                                  jnp.ones((256,))).compile().as_text()
  moved = sum(k['bytes'] for k in decode_profile.kernels(hlo).values())
  assert moved < 20 * 256 * 4  # a few rows, never a whole table or cache


def test_a_kernel_without_metadata_belongs_to_its_users_block_through_bitcasts():
  # As XLA's GPU compiler leaves a product over the KV cache: no op_name, used by a bitcast.
  hlo = """HloModule step

ENTRY %main (p0: f32[4,8], p1: f32[8]) -> f32[4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  %dot.1 = f32[4,1]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %bitcast.2 = f32[4]{0} bitcast(%dot.1)
  ROOT %exponential.3 = f32[4]{0} exponential(%bitcast.2), metadata={op_name="jit(step)/block1/attention/exp"}
}
"""
  info = decode_profile.kernels(hlo)
  assert info['dot.1']['scope'] == info['exponential.3']['scope'] == 'block1/attention'


def test_a_kernel_finds_its_block_from_its_fused_root_or_through_users_found_later():
  # As a GPU loop's body: a fusion with no op_name of its own whose root has one, and a chain
  # of two without metadata listed before the user that names their block.
  hlo = """HloModule steps

%fused_max (q0: f32[8]) -> f32[8] {
  %q0 = f32[8]{0} parameter(0)
  %c = f32[] constant(0)
  %b = f32[8]{0} broadcast(%c), dimensions={}
  ROOT %max.1 = f32[8]{0} maximum(%q0, %b), metadata={op_name="jit(steps)/while/body/block1/ff/max"}
}

ENTRY %main (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %fusion.1 = f32[8]{0} fusion(%p0), kind=kLoop, calls=%fused_max
  %negate.2 = f32[8]{0} negate(%p0)
  %sine.3 = f32[8]{0} sine(%negate.2)
  ROOT %exponential.4 = f32[8]{0} exponential(%sine.3), metadata={op_name="jit(steps)/while/body/block2/attention/exp"}
}
"""
  info = decode_profile.kernels(hlo)
  assert info['fusion.1']['scope'] == 'block1/ff'
  assert info['negate.2']['scope'] == info['sine.3']['scope'] == 'block2/attention'


def test_a_gpu_kernels_name_finds_its_instruction():
  # XLA's GPU kernels are named after their instructions with '.' and '-' made '_'; a
  # library's helper kernel matches none and is counted as unnamed, in no block.
  info = {'loop_add_fusion.3': dict(scope='block1/ff', category='fusion', bytes=8),
          'custom-call.12': dict(scope='block1/attention', category='gemm', bytes=4)}
  times = {'loop_add_fusion_3': (1.0, 2e-6), 'custom_call_12': (1.0, 3e-6),
           'sm90_xmma_gemm_f32f32': (1.0, 5e-6)}
  rows = {r['kernel']: r for r in decode_profile.attribute(times, info)}
  assert rows['loop_add_fusion_3']['scope'] == 'block1/ff'
  assert rows['custom_call_12']['bytes'] == 4
  assert rows['sm90_xmma_gemm_f32f32']['scope'] == 'other'
  assert not rows['sm90_xmma_gemm_f32f32']['attributed']


def test_a_pallas_kernels_bytes_are_what_its_programs_move_not_its_operands():
  # A Triton custom call as XLA's GPU program has it: operands whole (a 256 MB table of which
  # the kernel gathers rows); its function's name and grid find what its programs move.
  hlo = """HloModule step

ENTRY %main (p0: f32[65536,1024], p1: f32[1,1024]) -> f32[1,1024] {
  %p0 = f32[65536,1024]{1,0} parameter(0)
  %p1 = f32[1,1024]{1,0} parameter(1)
  ROOT %pallas_call.7 = f32[1,1024]{1,0} custom-call(%p0, %p1), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/block1/ff/pallas_call"}, backend_config={debug = false, grid_x = 1 : i32, grid_y = 96 : i32, grid_z = 1 : i32, ir = "ML\\EFR\\00name = \\22x\\22", name = "_units_kernel", num_stages = 3 : i32, num_warps = 4 : i32}
}
"""
  whole = decode_profile.kernels(hlo)['pallas_call.7']
  assert whole['bytes'] == (65536 + 2) * 1024 * 4 and whole['scope'] == 'block1/ff'
  moved = decode_profile.kernels(hlo, {('_units_kernel', 96): 1234, ('_units_kernel', 48): 9})
  assert moved['pallas_call.7']['bytes'] == 1234


def test_each_kernel_row_names_the_operation_it_computes():
  # A fusion carries the op_name of the operation it was made from; a Pallas kernel its
  # function's name; a kernel with neither (the CPU's dots) none.
  info = {'gemm_fusion_dot.8': dict(
              scope='block1/attention', category='fusion', bytes=8, function=None,
              op_name='jit(step)/block1/attention/...i,si,im->...sm/dot_general'),
          'pallas_call.24': dict(scope='block1/ff', category='custom-call', bytes=4,
                                 function='_units_kernel',
                                 op_name='jit(step)/block1/ff/pallas_call'),
          'dot.3': dict(scope='block1/ff', category='dot', bytes=4, function=None, op_name='')}
  times = {name.replace('.', '_'): (1.0, 1e-6) for name in info}
  rows = {r['kernel']: r for r in decode_profile.attribute(times, info)}
  assert decode_profile.operation(rows['gemm_fusion_dot_8']) == '...i,si,im->...sm/dot_general'
  assert decode_profile.operation(rows['pallas_call_24']) == '_units_kernel'
  assert decode_profile.operation(rows['dot_3']) == ''
  summary = dict(shape='17b', variant='ffqkv', layers=2, wall_s=0, device_s=0, kernels=3,
                 block_kernels=3, attention_kernels=1, ff_kernels=2, block_s=0,
                 block_bytes=0, block_floor_s=0)
  text = decode_profile.markdown([summary], [list(rows.values())], 1e12, 'a probe')
  assert '| `...i,si,im->...sm/dot_general` |' in text and '| `_units_kernel` |' in text


def test_a_cublas_calls_workspace_is_not_counted_as_bytes_moved():
  # One bfloat16 row times an 800M FF weight as XLA's GPU program runs it through cuBLAS:
  # (result, 32 MiB of workspace).
  hlo = """HloModule step

ENTRY %main (p0: bf16[1,1024], p1: bf16[1024,4096]) -> bf16[4096] {
  %p0 = bf16[1,1024]{1,0} parameter(0)
  %p1 = bf16[1024,4096]{1,0} parameter(1)
  ROOT %custom-call.1 = (bf16[4096]{0}, s8[33554432]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/block1/ff/dot_general"}
}
"""
  kernel = decode_profile.kernels(hlo)['custom-call.1']
  assert kernel['bytes'] == 2 * (1024 + 1024 * 4096 + 4096)
  assert kernel['category'] == 'custom-call __cublas$lt$matmul'


def test_each_kind_of_run_writes_its_own_results_file():
  name = decode_profile.results_name
  assert name('gpu', ['800m'], 'auto', 'float32') == 'decode_profile_gpu.md'
  assert name('gpu', ['17b'], 'auto', 'float32') == 'decode_profile_gpu_17b.md'
  assert name('gpu', ['800m'], 'pallas', 'float32') == 'decode_profile_gpu_pallas.md'
  assert name('gpu', ['800m'], 'auto', 'bfloat16') == 'decode_profile_gpu_bfloat16.md'
  assert name('cpu', ['800m', '17b'], 'xla', 'bfloat16') == (
      'decode_profile_cpu_800m_17b_xla_bfloat16.md')
