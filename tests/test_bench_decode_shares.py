"""The sweep of the fused blocks' shares (`bench/decode_shares.py`)."""

import functools
import re
from unittest import mock

from absl import app
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_scaling import decoding
from sparse_scaling.bench import decode_shares
from sparse_scaling.layers import sparse_ff_kernel
from sparse_scaling.layers import sparse_qkv_block_kernel
from tests import utils


def _constants():
  return {name: getattr(*place) for name, place in decode_shares.SHARES.items()}


def test_each_setting_is_in_force_while_it_is_measured_and_undone_after():
  before = _constants()
  seen = []

  def measure(dims, depth):   # what a measurement's trace would see
    del dims, depth
    seen.append(_constants())
    return 1e-3 * len(seen)

  settings = ['default', 'WIDTH=16+CONV_WARPS=8', 'DOT=0+MIXED_CHANNELS=32',
              'MODULES=4+FF_GROUP=1+MAX_PARTS=144', 'MIXED_CHANNELS=all',
              'STATS_IN_KERNEL=0+MAX_D_MODEL=16384', 'CPU_TOP_K=0', 'CUBLAS_BYTES=0',
              'GRAPHS=0', 'EARLY=1', 'SHARED=2', 'PREFETCH=1+CACHES=1+STATE=1',
              'PERSIST=3+KEEP_BYTES=1000', 'CHUNK=0', 'FF_MOSAIC=1+CHAIN=0',
              'QKV_MOSAIC=1+FF_MOSAIC=1+MOSAIC_ATTEND=0', 'QKV_MOSAIC=1+MOSAIC_CHANNELS=64+MOSAIC_WIDTH=32',
              'DOT_MERGER=0+TILING_SEARCH=1+TRITON_GEMM=0', 'LATE=none', 'LATE=1024',
              'FIELDS_MIN=0+RELU_MAX=0', 'FIELDS_MIN=none',
              'FIELDS_PARTS=16+FIELDS_WARPS=8']
  results = decode_shares.sweep('800m', 'ffqkv', 1, settings, measure=measure)
  assert [text for text, _ in results] == settings
  assert seen == [before, dict(before, WIDTH=16, CONV_WARPS=8),
                  dict(before, DOT=False, MIXED_CHANNELS=32),
                  dict(before, MODULES=4, FF_GROUP=1, MAX_PARTS=144),
                  dict(before, MIXED_CHANNELS=None),
                  dict(before, STATS_IN_KERNEL=0, MAX_D_MODEL=16384),
                  dict(before, CPU_TOP_K=False), dict(before, CUBLAS_BYTES=0),
                  dict(before, GRAPHS=False), dict(before, EARLY=True),
                  dict(before, SHARED=2), dict(before, PREFETCH=True, CACHES=True, STATE=True),
                  dict(before, PERSIST=3, KEEP_BYTES=1000), dict(before, CHUNK=0),
                  dict(before, FF_MOSAIC=True, CHAIN=False),
                  dict(before, QKV_MOSAIC=True, FF_MOSAIC=True, MOSAIC_ATTEND=False),
                  dict(before, QKV_MOSAIC=True, MOSAIC_CHANNELS=64, MOSAIC_WIDTH=32),
                  dict(before, DOT_MERGER=False, TILING_SEARCH=True, TRITON_GEMM=False),
                  dict(before, LATE=None), dict(before, LATE=1024),
                  dict(before, FIELDS_MIN=0, RELU_MAX=False), dict(before, FIELDS_MIN=None),
                  dict(before, FIELDS_PARTS=16, FIELDS_WARPS=8)]
  assert _constants() == before


def test_xla_settings_change_the_gpu_programs_options_while_in_force():
  """DOT_MERGER=0 adds XLA's dot-merger to the passes the decoding programs turn off (after
  those `decoding.COMPILER_OPTIONS` already does), TILING_SEARCH=1 and TRITON_GEMM=0 set
  their options, every program compiled in the block gets them, and they are undone after."""
  before = decoding.COMPILER_OPTIONS
  with decode_shares.shares(decode_shares.parse_setting('default')):
    assert decoding.COMPILER_OPTIONS == before
  with decode_shares.shares(decode_shares.parse_setting(
      'DOT_MERGER=0+TILING_SEARCH=1+TRITON_GEMM=0')):
    gpu = decoding.COMPILER_OPTIONS['gpu']
    assert gpu['xla_disable_hlo_passes'].split(',') == [
        *before['gpu']['xla_disable_hlo_passes'].split(','), 'dot-merger']
    assert gpu['xla_gpu_exhaustive_tiling_search'] is True
    assert gpu['xla_gpu_enable_triton_gemm'] is False
    with mock.patch.object(jax, 'default_backend', return_value='gpu'):
      assert decoding.compiler_options()['xla_gpu_exhaustive_tiling_search'] is True
  assert decoding.COMPILER_OPTIONS is before
  assert 'xla_gpu_exhaustive_tiling_search' not in before['gpu']


def test_the_kernels_alone_are_timed_with_the_setting_in_force(monkeypatch):
  """`--measure kernels` on a tiny shape, in Pallas' interpreter: both blocks' kernels run
  in the timed loops, traced with the setting's shares, and each block gets a time."""
  traced = []
  for module, name in ((sparse_qkv_block_kernel, 'decode_step'),
                       (sparse_ff_kernel, 'sparse_units')):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: (
        traced.append((name, sparse_qkv_block_kernel.MODULES, sparse_ff_kernel.GROUP)),
        real(*a, **k))[1])
  dims = dict(d_model=32, d_ff=64, n_heads=2, attention_sparsity=4, ff_sparsity=(8, 4),
              length_kernel_size=3)
  monkeypatch.setattr(decode_shares.decoders, 'dimensions', lambda shape, variant: dims)
  measure = lambda dims, depth: decode_shares.kernels(dims, depth, interpret=True, steps=(1, 2))
  [(_, (attention, ff))] = decode_shares.sweep('800m', 'ffqkv', 1, ['MODULES=2+FF_GROUP=2'],
                                               measure)
  assert sorted(set(traced)) == [('decode_step', 2, 2), ('sparse_units', 2, 2)]
  assert np.isfinite(attention) and np.isfinite(ff)


@pytest.mark.parametrize('text', ['WIDTH', 'WIDTH=12', 'DOT=2', 'CHAIN=2', 'STATS_IN_KERNEL=-1',
                                  'SPEED=4', 'WIDTH=8+', '', 'MAX_PARTS=0', 'FF_GROUP=3',
                                  'ROWS=all', 'CPU_TOP_K=2', 'CUBLAS_BYTES=-1',
                                  'SHARED=3', 'PREFETCH=2', 'DOT_MERGER=2', 'PERSIST=5',
                                  'CACHES=2', 'STATE=2', 'KEEP_BYTES=-1', 'CHUNK=-1',
                                  'PACK_ELEMENTS=0', 'FF_MOSAIC=2', 'QKV_MOSAIC=2',
                                  'MOSAIC_WIDTH=24', 'CACHE=0', 'ATTN_SKIP=2',
                                  'MULT_PRECISION=3', 'MULT_LOOP=2', 'FILLED_BLOCK=48',
                                  'LATE=all', 'MODULES=none', 'LATE=-1',
                                  'FIELDS_PARTS=24', 'FIELDS_WARPS=none'])
def test_a_bad_setting_is_refused_naming_the_rule(text):
  with pytest.raises(ValueError, match='--settings: '):
    decode_shares.parse_setting(text)


def test_a_trace_gives_each_blocks_time_and_each_kernels(monkeypatch):
  """`--measure trace` on a tiny shape, in Pallas' interpreter (on the CPU the trace holds
  XLA's thunks, named by instruction): both blocks take device time, their kernels' times add
  up to the blocks', slowest first; the attention block's state and caches are fed back from
  call to call into its donated arguments."""
  dims = dict(d_model=32, d_ff=64, n_heads=2, attention_sparsity=4, ff_sparsity=(8, 4),
              length_kernel_size=3)
  monkeypatch.setattr(decode_shares.decoders, 'dimensions', lambda shape, variant: dims)
  measure = lambda dims, depth: decode_shares.trace(dims, depth, interpret=True, steps=3)
  [(_, (attention, ff, per_kernel))] = decode_shares.sweep('800m', 'ffqkv', 1, ['default'],
                                                           measure)
  assert attention > 0 and ff > 0
  assert sum(per_kernel.values()) == pytest.approx(attention + ff)
  assert list(per_kernel.values()) == sorted(per_kernel.values(), reverse=True)


def test_the_fused_blocks_take_the_dtype_asked_for_and_agree_with_float32():
  """`--measure kernels` and `trace` in bfloat16 time the blocks the bfloat16 decoder runs:
  every array of `fused_blocks` in that dtype, the same draw as float32's, each block's output
  (Pallas' interpreter) within bfloat16's rounding of float32's."""
  dims = dict(d_model=32, d_ff=64, n_heads=2, attention_sparsity=4, ff_sparsity=(8, 4),
              length_kernel_size=3)
  outputs = {}
  for dtype in ('float32', 'bfloat16'):
    attention, feed_forward, (attention_w, ff_w), x, carry = decode_shares.fused_blocks(
        dims, interpret=True, dtype=dtype)
    arrays = jax.tree.leaves((attention_w, ff_w, x, carry))
    assert {a.dtype for a in arrays} == {jnp.dtype(dtype)}
    outputs[dtype] = (attention(attention_w, x, *carry)[0], feed_forward(ff_w, x))
  for f32, bf16 in zip(outputs['float32'], outputs['bfloat16']):
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, rtol=0.05,
                               atol=0.05 * float(jnp.max(jnp.abs(f32))))


def test_a_trace_in_bfloat16_gives_each_blocks_time(monkeypatch):
  dims = dict(d_model=32, d_ff=64, n_heads=2, attention_sparsity=4, ff_sparsity=(8, 4),
              length_kernel_size=3)
  monkeypatch.setattr(decode_shares.decoders, 'dimensions', lambda shape, variant: dims)
  measure = lambda dims, depth: decode_shares.trace(dims, depth, interpret=True, steps=2,
                                                    dtype='bfloat16')
  [(_, (attention, ff, per_kernel))] = decode_shares.sweep('800m', 'ffqkv', 1, ['default'],
                                                           measure)
  assert attention > 0 and ff > 0 and per_kernel


@pytest.mark.parametrize('name', ['kernels', 'trace'])
def test_a_sweep_of_kernels_or_a_trace_prints_microseconds_in_any_dtype(name, monkeypatch,
                                                                       capsys):
  """`main` hands `sweep` the measure with its dtype bound (a partial): its rows are still in
  µs, as the header says (they came out in ms, every kernel 0.0, after --dtype came in)."""
  monkeypatch.setattr(decode_shares, name,
                      lambda dims, depth, dtype: (2.5e-6, 1.5e-6, {'_conv_kernel': 2.5e-6}))
  measure = functools.partial(getattr(decode_shares, name), dtype='bfloat16')
  decode_shares.sweep('800m', 'ffqkv', 1, ['default'], measure)
  assert capsys.readouterr().out.strip() == '| default | 2.5000 | 1.5000 | `_conv_kernel` 2.5 |'


def test_a_table_cell_lists_each_kernels_time():
  assert decode_shares._cell(2.5e-6, 1e6) == '2.5000'
  assert decode_shares._cell({'_conv_kernel': 6.3e-6, 'copy.1': 1.3e-6}, 1e6) == (
      '`_conv_kernel` 6.3, `copy.1` 1.3')


def test_a_generation_and_a_block_are_timed_in_the_dtype_asked_for(monkeypatch):
  """Each measure times in the dtype asked for, with the setting's SHARED weights, and after
  its PROMPT (a generation's prompt; where a block's steps start), Table 1's 128 by default,
  in caches of its CACHE positions."""
  seen = []
  monkeypatch.setattr(decode_shares.table1, 'seconds_per_token_program',
                      lambda model_fn, dtype, prompt, n, weights_fn: seen.append(
                          ('token', dtype, weights_fn and weights_fn.keywords, prompt,
                           model_fn.args[-1])) or 1.0)
  monkeypatch.setattr(decode_shares.table1, 'seconds_per_block_program',
                      lambda model, dtype, n, position: seen.append(
                          ('block', dtype, position, model)) or 1.0)
  monkeypatch.setattr(decode_shares.table1, 'seconds_per_block',
                      lambda model, dtype, n, position: seen.append(
                          ('call', dtype, n, position, model)) or (1.0, 2.0))
  monkeypatch.setattr(decode_shares.decoders, 'build', lambda *args, **kwargs: args[-1])
  for measure in (decode_shares.per_token, decode_shares.per_block, decode_shares.per_call):
    decode_shares.sweep('800m', 'dense', 2, ['CUBLAS_BYTES=0', 'CACHE=2048+PROMPT=1920'],
                        functools.partial(measure, dtype='bfloat16'))
  decode_shares.sweep('800m', 'dense', 2, ['default', 'SHARED=1', 'SHARED=2'],
                      decode_shares.per_token)
  assert seen == [('token', 'bfloat16', None, 128, 168), ('token', 'bfloat16', None, 1920, 2048),
                  ('block', 'bfloat16', 128, 168), ('block', 'bfloat16', 1920, 2048),
                  ('call', 'bfloat16', decode_shares.CALLS, 128, 168),
                  ('call', 'bfloat16', decode_shares.CALLS, 1920, 2048),
                  ('token', 'float32', None, 128, 168),
                  ('token', 'float32', {'keep_large': False}, 128, 168),
                  ('token', 'float32', {'keep_large': True}, 128, 168)]


def test_shared_weights_give_each_block_block_0s_arrays(monkeypatch):
  """SHARED=1: every block's attention and FF layers hold block 0's arrays; SHARED=2: but
  the large ones (at this size W1 and W2, 4096 elements each); the other layers their own."""
  monkeypatch.setattr(decode_shares, 'LARGE', 4096)
  dims = dict(d_model=32, d_ff=128, n_heads=2, vocab_size=64, ff_sparsity=(8, 4),
              attention_sparsity=4, loss_sparsity=0, length_kernel_size=3)
  model = decode_shares.decoders.build('ours', dims, 3, 16)
  weights, _ = decode_shares.decoders.random_weights_and_state(model, 'float32')
  labels = decode_shares.decoders.scope_labels(model)
  block0 = {labels.index(f'block0/{kind}') for kind in ('attention', 'ff')}
  for keep_large in (False, True):
    shared = decode_shares.shared_block_weights(model, weights, keep_large=keep_large)
    for i, label in enumerate(labels):
      own = jax.tree.leaves(weights[i])
      if i in block0 or '/' not in label:
        assert all(a is b for a, b in zip(jax.tree.leaves(shared[i]), own))
        continue
      first = jax.tree.leaves(weights[labels.index('block0/' + label.partition('/')[2])])
      assert any(np.size(a) >= 4096 for a in own) == label.endswith('/ff')
      for a, mine, theirs in zip(jax.tree.leaves(shared[i]), own, first):
        assert a is (mine if keep_large and np.size(a) >= 4096 else theirs)


def test_alternating_generations_are_each_compiled_under_their_setting(monkeypatch, capsys):
  """--alternate: every setting's generation is built and compiled (both lengths) while its
  constants are in force, a setting named twice twice, and all are timed in the same rounds."""
  built, calls = [], []

  def generation_run(model_fn, dtype, prompt, weights_fn=None):
    i = len(built)
    built.append((_constants(), dtype, prompt, weights_fn and weights_fn.keywords))
    return lambda n: calls.append((i, n, _constants()['PREFETCH'])) or np.zeros(1)

  def seconds_of(fn):   # a clock of our own: run i's n tokens take n * (i + 1) * 0.1 ms
    fn()
    i, n, _ = calls[-1]
    return n * (i + 1) * 1e-4

  monkeypatch.setattr(decode_shares.table1, 'generation_run', generation_run)
  monkeypatch.setattr(decode_shares.decoders, 'build', lambda *args, **kwargs: None)
  monkeypatch.setattr(decode_shares.timing, 'seconds_of', seconds_of)
  before = _constants()
  settings = ['default', 'PREFETCH=1', 'SHARED=1', 'default']
  results = decode_shares.sweep_alternating('800m', 'ffqkv', 2, settings, rounds=3)
  assert [text for text, _ in results] == settings
  assert [b[0] for b in built] == [before, dict(before, PREFETCH=True),
                                   dict(before, SHARED=1), before]
  assert [b[1:] for b in built] == [('float32', 128, None)] * 2 + [
      ('float32', 128, {'keep_large': False}), ('float32', 128, None)]
  assert _constants() == before
  compiles = calls[:8]   # each run's two lengths right after it is built, its setting in force
  assert compiles == [(i, n, i == 1) for i in range(4) for n in (8, 32)]
  timed = calls[8:]      # then all in the same rounds, with the constants as they were
  assert {(i, n) for i, n, _ in timed} == {(i, n) for i in range(4) for n in (8, 32)}
  assert not any(prefetch for _, _, prefetch in timed)
  assert all(sum(1 for c in timed if c[:2] == (i, n)) >= 3 for i in range(4) for n in (8, 32))
  assert [seconds for _, seconds in results] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
  out = capsys.readouterr().out
  rows, spread = out.split('\n\n')
  assert rows.splitlines() == ['| default | 0.1000 |', '| PREFETCH=1 | 0.2000 |',
                               '| SHARED=1 | 0.3000 |', '| default | 0.4000 |']
  # the setting named twice: its two copies' lowest and highest
  assert spread.splitlines()[2:] == ['| default | 2 | 0.1000 | 0.4000 | 300.0% |']


def test_a_spread_needs_a_positive_lowest_time():
  """A time per token is a difference of two timed lengths, which noise can make zero or
  less: its spread is then 'n/a', not a crash at the end of a sweep."""
  assert decode_shares._spread([1e-4, 1.5e-4]) == '50.0%'
  assert decode_shares._spread([0.0, 1e-4]) == 'n/a'
  assert decode_shares._spread([-1e-5, 1e-4]) == 'n/a'


_flags = functools.partial(utils.parsed_flags, 'sparse_scaling.bench.decode_shares')


def test_copies_need_alternate():
  with pytest.raises(app.UsageError, match='--copies 2: compiles copies for --alternate only'):
    decode_shares.check_flags(_flags('--copies', '2'))
  decode_shares.check_flags(_flags('--copies', '2', '--alternate'))


def test_a_prompt_the_caches_cannot_hold_with_the_tokens_is_refused():
  with pytest.raises(app.UsageError, match=re.escape(
      '--settings: PROMPT=2020 needs caches of at least PROMPT + 32 positions (CACHE, 2048 '
      'here)')):
    decode_shares.check_flags(_flags('--settings', 'default,CACHE=2048+PROMPT=2020'))
  decode_shares.check_flags(_flags('--settings', 'default,CACHE=2048+PROMPT=2016'))


def test_alternate_times_generations_and_calls_only():
  with pytest.raises(app.UsageError, match=re.escape(
      '--alternate: times generations (--measure token) or calls of a block (--measure '
      'call), not --measure block')):
    decode_shares.check_flags(_flags('--alternate', '--measure', 'block'))


def test_alternating_calls_of_a_block_are_each_compiled_under_their_setting(monkeypatch,
                                                                            capsys):
  """--alternate --measure call: every setting's block is compiled while its constants are in
  force, on one draw of the weights and a state of its own, then all are called in the same
  rounds, ROUND_CALLS a round each, with the constants as they were; each row is the median
  of its calls."""
  built, calls, drawn = [], [], []

  def block_call(model, dtype, drawn_here, position):
    assert position == decode_shares.PROMPT
    i = len(built)
    built.append((_constants()['CHUNK'], dtype))
    drawn.append(drawn_here)
    return lambda: calls.append((i, _constants()['CHUNK'])) or np.zeros(1)

  def random_weights_and_state(model, dtype):   # one draw, at most
    assert not draws
    draws.append(({'w': np.ones(2)}, {'cache': jnp.zeros(3)}))
    return draws[-1]

  draws = []
  monkeypatch.setattr(decode_shares.decoders, 'random_weights_and_state',
                      random_weights_and_state)

  def seconds_of(fn):   # a clock of our own: a call of block i takes (i + 1) ms
    fn()
    return (calls[-1][0] + 1) * 1e-3

  monkeypatch.setattr(decode_shares.table1, 'block_call', block_call)
  monkeypatch.setattr(decode_shares.decoders, 'build', lambda *args, **kwargs: None)
  monkeypatch.setattr(decode_shares.timing, 'seconds_of', seconds_of)
  before = _constants()['CHUNK']
  settings = ['default', 'CHUNK=0', 'default']
  results = decode_shares.sweep_alternating('17b', 'ffqkv', 1, settings, rounds=4,
                                            measure='call')
  assert built == [(before, 'float32'), (0, 'float32'), (before, 'float32')]
  (weights, state), = draws
  assert all(w is weights for w, _ in drawn)   # the weights shared, each state a copy
  assert len({id(s['cache']) for _, s in drawn} | {id(state['cache'])}) == 4
  assert {c for _, c in calls} == {before}   # every call timed with the constants as they were
  for i in range(3):
    assert sum(1 for j, _ in calls if j == i) >= 4 * decode_shares.ROUND_CALLS
  assert results == [('default', 1e-3), ('CHUNK=0', 2e-3), ('default', 3e-3)]
  rows, spread = capsys.readouterr().out.split('\n\n')
  assert rows.splitlines() == ['| default | 1.0000 |', '| CHUNK=0 | 2.0000 |',
                               '| default | 3.0000 |']
  assert spread.splitlines()[0] == ('| setting | copies | lowest ms/call | highest ms/call | '
                                    'spread |')
  assert spread.splitlines()[2:] == ['| default | 2 | 1.0000 | 3.0000 | 200.0% |']
