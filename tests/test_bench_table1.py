"""The Table 1 benchmark reads the paper's gin files and times both implementations."""

import functools
import json
import re
import sys
import time

from absl import app
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_scaling import decoding
from sparse_scaling.bench import common
from sparse_scaling.bench import table1
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import sparse_qkv_block_kernel
from tests import utils


@pytest.fixture(autouse=True)
def short_prompts(monkeypatch):
  """The tests' runs take prompts of 4 as Table 1's (its rows keep no prompt of their own)."""
  monkeypatch.setattr(table1, 'PROMPT', 4)


def test_dimensions_come_from_the_paper_gin_files():
  dims = table1.dimensions('800m', 'ffqkv')
  assert (dims['d_model'], dims['d_ff'], dims['n_heads']) == (1024, 6144, 16)
  assert dims['ff_sparsity'] == (64, 16) and dims['attention_sparsity'] == 16
  dims = table1.dimensions('17b', 'ffqkvloss')
  assert (dims['d_model'], dims['d_ff'], dims['ff_sparsity']) == (9216, 65536, (256, 32))
  assert dims['loss_sparsity'] == 4


def test_sparse_variants_read_fewer_bytes_per_token():
  read = {v: table1.bytes_per_token(table1.dimensions('800m', v), 24, 128, 4)
          for v in table1.VARIANTS}
  assert read['ffqkvloss'] < read['ffqkv'] < read['ff'] < read['dense']
  assert read['dense'] > 24 * (4 * 1024**2 + 2 * 1024 * 4096) * 4  # all dense block weights


# Ours with -m slow: by default test_depth_sets_the_whole_decoders_blocks_and_the_table_says_so
# times our whole decoder's step (`seconds_per_token`, through `measure`).
@pytest.mark.parametrize('impl', [pytest.param('ours', marks=pytest.mark.slow), 'trax'])
def test_decoding_step_is_timed_for_both_implementations(impl):
  dims = dict(d_model=32, d_ff=128, n_heads=2, vocab_size=64, ff_sparsity=(8, 4),
              attention_sparsity=4, loss_sparsity=4, length_kernel_size=3)
  median, p90 = table1.seconds_per_token(table1.build(impl, dims, 1, 32), 'float32',
                                         prompt=4, n_tokens=3)
  assert 0 < median <= p90 < 5 and np.isfinite(median)


def test_whole_generation_is_timed_as_one_program():
  # Per-token time is a difference of two generation lengths (256 and 64 tokens): the model is
  # sized so that 192 tokens' work (~0.1-0.5 ms each here) stands well above timing noise.
  dims = dict(d_model=256, d_ff=1024, n_heads=4, vocab_size=512, ff_sparsity=0,
              attention_sparsity=0, loss_sparsity=0, length_kernel_size=3)
  n_tokens, short = 256, 64
  start = time.perf_counter()
  seconds = table1.seconds_per_token_program(
      functools.partial(table1.build, 'ours', dims, 2, 4 + n_tokens + 8), 'float32', prompt=4,
      n_tokens=n_tokens)
  wall = time.perf_counter() - start
  # Floor: no device reads a token's weights and KV cache faster than 10 TB/s.
  assert seconds > table1.bytes_per_token(dims, 2, 4 + n_tokens, 4) / 1e13
  # Ceiling: the 5 timed generations of n_tokens each take at least the fastest of them, and
  # all ran within this call; the fastest one's share of n_tokens - short tokens is above the
  # result (bounded here by 3 of the 5, with room to spare).
  assert seconds < wall / (3 * (n_tokens - short))


TINY = dict(d_model=32, d_ff=128, n_heads=2, vocab_size=64, ff_sparsity=(8, 4),
            attention_sparsity=4, loss_sparsity=4, length_kernel_size=3)


def tiny_dimensions(shape, variant):
  """TINY as `table1.dimensions` gives a shape's variants: dense has no sparse layer (with
  Sparse QKV it would decode through the QKV block's kernels on a GPU)."""
  del shape
  if variant == 'dense':
    return dict(TINY, ff_sparsity=0, attention_sparsity=0, loss_sparsity=0)
  return dict(TINY, attention_sparsity=0, loss_sparsity=0) if variant == 'ff' else TINY


@pytest.mark.parametrize('impl', ['ours', 'trax'])
def test_one_block_is_timed_alone_for_both_implementations(impl):
  model = table1.build(impl, TINY, 2, 32)
  labels = table1.scope_labels(model)
  assert labels.count('block0/attention') == labels.count('block0/ff') == 1
  assert labels.index('block0/ff') == labels.index('block0/attention') + 1
  assert labels[-1] == 'output' and labels[0] == 'embed'
  start = time.perf_counter()
  median, p90 = table1.seconds_per_block(table1.build(impl, TINY, 1, 32), 'float32', 5)
  assert 0 < median <= p90 and 8 * median < time.perf_counter() - start


def test_one_block_is_timed_in_a_compiled_loop():
  # As the whole generation's test: a block sized so that 96 steps' work stands well above
  # timing noise, its time the difference of 128 and 32 steps.
  dims = dict(d_model=256, d_ff=1024, n_heads=4, vocab_size=512, ff_sparsity=0,
              attention_sparsity=0, loss_sparsity=0, length_kernel_size=3)
  start = time.perf_counter()
  seconds = table1.seconds_per_block_program(table1.build('ours', dims, 1, 64), 'float32', 32)
  wall = time.perf_counter() - start
  weights = (4 * 256 * 256 + 2 * 256 * 1024) * 4
  assert weights / 1e13 < seconds < wall / (3 * 96)


@pytest.mark.parametrize('dims', [TINY, dict(TINY, ff_sparsity=0, attention_sparsity=0)])
def test_a_bfloat16_block_keeps_its_dtype_and_is_timed_in_a_compiled_loop(dims):
  # The state's caches in the weights' dtype, as the Decoder keeps them: a block's output then
  # has its input's dtype, which the compiled loop needs (its carry).
  model = table1.build('ours', dims, 1, 32)
  step, weights, state, x = table1._first_block(model, 'bfloat16')  # pylint: disable=protected-access
  out, new_state = step(weights, state, x)
  assert x.dtype == out.dtype == jnp.bfloat16
  floats = [a for a in jax.tree.leaves(new_state) if jnp.issubdtype(a.dtype, jnp.floating)]
  assert floats and {a.dtype for a in floats} == {jnp.dtype(jnp.bfloat16)}
  # The loop compiles and runs (at this size its time is noise: no bound asserted).
  assert np.isfinite(table1.seconds_per_block_program(model, 'bfloat16', 4))


def test_a_block_looped_in_a_program_keeps_xlas_loops_where_a_generation_does_not(
    monkeypatch):
  # On a GPU a generation's loop is a CUDA graph (decoding.GRAPH_LOOPS), whose conditional
  # node would add its cost to each iteration of a loop of one block.
  compiled = []
  real_jit = decoding.jit
  monkeypatch.setattr(decoding, 'jit', lambda fn, weights=None, loops=True, **kwargs: (
      compiled.append(loops), real_jit(fn, weights, loops, **kwargs))[1])
  model_fn = functools.partial(table1.build, 'ours', TINY, 1, 32)
  table1.seconds_per_block_program(model_fn(), 'float32', 1)
  assert compiled == [False]
  table1.seconds_per_token_program(model_fn, 'float32', 4, 4)
  assert compiled[1:] and all(compiled[1:])


def test_a_measurement_that_fails_is_reported_and_the_others_go_on(monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError('no such column')

  monkeypatch.setattr(table1, 'dimensions', tiny_dimensions)
  monkeypatch.setattr(table1, 'seconds_per_token_programs', broken)
  # The measurements that work stand in (the other tests here time blocks for real): what is
  # checked is what `measure` makes of them and of the one that fails.
  built = []
  monkeypatch.setattr(table1, 'seconds_per_block',
                      lambda model, dtype, n_tokens, cold, position: built.append(model)
                      or (1e-3, 2e-3))
  monkeypatch.setattr(table1, 'seconds_per_block_programs',
                      lambda model, dtype, n_tokens, copies, position: built.append(model)
                      or [5e-4])
  rows = table1.measure('800m', ['dense', 'ff'], ['ours', 'ours-xla'], prompt=4, n_tokens=3,
                        bandwidth=30e9, program=True, step=False)
  assert len(built) == 2 * 4  # each row's block and its loop: the rows after a failure go on
  # ours-xla decodes dense attention by XLA too (ours: by the attention kernel on a GPU).
  assert [(r['variant'], r['impl']) for r in rows] == [('dense', 'ours'), ('dense', 'ours-xla'),
                                                      ('ff', 'ours'), ('ff', 'ours-xla')]
  assert all((r['s_per_block'], r['p90_s_per_block'], r['s_per_block_program']) ==
             (1e-3, 2e-3, 5e-4) and r['s_per_token_program'] is None for r in rows)
  # A dense model decodes by XLA by default everywhere (the attention kernel is opt-in).
  assert rows[3]['kernel'] == 'xla' and rows[0]['kernel'] == 'xla'
  assert rows[2]['errors'] == {'program': 'RuntimeError: no such column'}
  text = table1.markdown(rows, 3)
  assert 'Measurements that failed:' in text and 'ff ours, program: RuntimeError' in text
  assert '| 800m | ff | ours-xla (xla) | float32 |' in text


def test_a_run_cut_off_keeps_its_rows_apart_and_the_saved_rows_whole(monkeypatch, tmp_path):
  """Each shape's rows replace the saved rows of its setting once all are measured; until
  then they are in <name>_partial.json and .md alone, which the end of a run removes."""
  monkeypatch.setattr(common, 'RESULTS_DIR', tmp_path)
  monkeypatch.setattr(table1, 'dimensions', tiny_dimensions)
  monkeypatch.setattr(sys, 'argv', ['table1.py', '--shapes', '800m,17b'])
  real_block = table1.seconds_per_block

  def block_then_cut_off(*args, **kwargs):
    if len(timed) == cut_after:   # the run's time is up
      raise KeyboardInterrupt
    timed.append(1)
    return real_block(*args, **kwargs)

  earlier = lambda shape, variant: dict(
      shape=shape, variant=variant, impl='ours', dtype='float32', s_per_block=1e-3,
      p90_s_per_block=2e-3, floor_s_per_token=1e-3, bandwidth=30e9, command='an earlier run')
  common.write_json(tmp_path / 't.json', [earlier('800m', 'ff'), earlier('17b', 'dense'),
                                          earlier('17b', 'ff')])
  monkeypatch.setattr(table1, 'seconds_per_block', block_then_cut_off)
  run = functools.partial(table1.measure_and_write, 't', ['800m', '17b'], ['dense', 'ff'],
                          ['ours'], 4, 3, 30e9, step=False)
  timed, cut_after = [], 3   # cut off in 17b's second variant
  with pytest.raises(KeyboardInterrupt):
    run()
  saved = [(r['shape'], r['variant'], r['command']) for r in
           json.loads((tmp_path / 't.json').read_text())]
  command = 'python -m sparse_scaling.bench.table1 --shapes 800m,17b'
  # 800m, measured whole, replaced its setting's saved row; 17b's saved rows stay whole.
  assert saved == [('17b', 'dense', 'an earlier run'), ('17b', 'ff', 'an earlier run'),
                   ('800m', 'dense', command), ('800m', 'ff', command)]
  partial = json.loads((tmp_path / 't_partial.json').read_text())
  assert [(r['shape'], r['variant'], r['s_per_block'] > 0) for r in partial] == [
      ('800m', 'dense', True), ('800m', 'ff', True), ('17b', 'dense', True)]
  text = (tmp_path / 't_partial.md').read_text()
  assert f'`{command}`' in text and '| 17b | dense | ours (xla) |' in text
  assert '| 800m | dense | ours (xla) |' in (tmp_path / 't.md').read_text()
  assert (tmp_path / 't.png').stat().st_size > 0
  timed, cut_after = [], None
  run(write=False)   # a run that writes nothing leaves the cut-off run's rows too
  table1.measure_and_write('t', [], ['dense'], ['ours'], 4, 3, None)   # nor does a render
  assert (tmp_path / 't_partial.json').read_text() == json.dumps(partial, indent=1) + '\n'
  timed = []   # a run that ends: every shape saved, no partial files left
  rows = run()
  assert len(rows) == 4 and not list(tmp_path.glob('t_partial.*'))
  assert [r['command'] for r in json.loads((tmp_path / 't.json').read_text())] == [command] * 4


def test_the_results_header_gives_each_rows_command(monkeypatch, tmp_path):
  monkeypatch.setattr(common, 'RESULTS_DIR', tmp_path)
  monkeypatch.setattr(table1, 'plot', lambda rows, path: None)
  row = lambda shape, dtype, variant, command=None: dict(
      shape=shape, dtype=dtype, variant=variant, impl='ours', depth=table1.SHAPES[shape][3],
      s_per_block=1e-3, p90_s_per_block=2e-3, floor_s_per_token=1e-3, bandwidth=30e9,
      **({'command': command} if command else {}))
  common.write_json(tmp_path / 't.json', [row('17b', 'float32', 'dense')])   # before commands
  table1.write_results('t', [row('800m', 'float32', v, 'python -m m --a')
                             for v in table1.VARIANTS[:2]], 3)
  table1.write_results('t', [row('800m', 'bfloat16', 'dense', "python -m m --b 'x y'")], 3)
  header = (tmp_path / 't.md').read_text().split('| shape |')[0]
  assert ('- a command not recorded (a run before runs recorded theirs): 17b (2 blocks) float32\n'
          '- `python -m m --a`: 800m (24 blocks) float32\n'
          "- `python -m m --b 'x y'`: 800m (24 blocks) bfloat16\n") in header
  # Measured again, a setting's rows carry the new command, and the old one is gone with them.
  table1.write_results('t', [row('17b', 'float32', 'dense', 'python -m m --c')], 3)
  header = (tmp_path / 't.md').read_text().split('| shape |')[0]
  assert 'not recorded' not in header and '- `python -m m --c`: 17b (2 blocks) float32' in header


def test_the_figure_has_a_panel_for_each_shape_depth_and_dtype(monkeypatch, tmp_path):
  """Rows of one shape at two depths and dtypes are three panels, each with its own rows'
  bars (a panel per shape showed whichever setting's rows came first)."""
  figures = []
  monkeypatch.setattr(common, 'save_figure', lambda fig, path: figures.append(fig))
  row = lambda shape, dtype, depth, block: dict(
      shape=shape, dtype=dtype, depth=depth, variant='dense', impl='ours', s_per_block=block)
  table1.plot([row('17b', 'bfloat16', 15, 4e-3), row('800m', 'float32', 24, 1e-3),
               row('17b', 'float32', 2, 2e-3)], tmp_path / 't.png')
  axes = figures[0].axes
  assert [ax.get_title() for ax in axes] == [
      '800m: unbatched decoding', '17b: unbatched decoding',
      '17b (15 blocks), bfloat16: unbatched decoding']
  # the first bar of each panel: ours, dense, in ms
  assert [ax.patches[0].get_height() for ax in axes] == pytest.approx([1.0, 2.0, 4.0])
  common.pyplot().close(figures[0])


def test_a_command_line_is_the_programs_arguments_quoted(monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['table1.py', '--shapes', '800m', '--results', 'a b'])
  assert common.command_line('sparse_scaling.bench.table1') == (
      "python -m sparse_scaling.bench.table1 --shapes 800m --results 'a b'")
  assert common.command_line('m', ['CUDA_VISIBLE_DEVICES=0']) == (
      "CUDA_VISIBLE_DEVICES=0 python -m m --shapes 800m --results 'a b'")


def _dense_builds(monkeypatch):
  """Makes every variant table1 builds the tiny dense decoder; returns its dimensions and the
  list into which each build puts its (blocks, cache positions)."""
  dense = dict(TINY, ff_sparsity=0, attention_sparsity=0, loss_sparsity=0)
  monkeypatch.setattr(table1, 'dimensions', lambda shape, variant: dense)
  built = []
  real_build = table1.build
  monkeypatch.setattr(table1, 'build', lambda impl, dims, n, max_len, **kw: (
      built.append((n, max_len)), real_build(impl, dims, n, max_len, **kw))[1])
  return dense, built


def test_depth_sets_the_whole_decoders_blocks_and_the_table_says_so(monkeypatch):
  dense, built = _dense_builds(monkeypatch)
  rows = table1.measure('17b', ['dense'], ['ours'], prompt=4, n_tokens=3, bandwidth=30e9,
                        step=True, depth=3, probe='full reduction')
  # one block, then the whole decoder
  assert rows[0]['depth'] == 3 and sorted({n for n, _ in built}) == [1, 3]
  assert rows[0]["bytes_per_token"] > 1.4 * table1.bytes_per_token(dense, 2, 6, 4)
  text = table1.markdown(rows, 3)
  assert '| 17b (3 blocks) | dense | ours (xla) |' in text
  # the rows keep the probe that read the bandwidth, and the header names it
  assert rows[0]['probe'] == 'full reduction'
  assert '(17b (3 blocks): 30 GB/s by the full reduction)' in text


_flags = functools.partial(utils.parsed_flags, 'sparse_scaling.bench.table1')


def test_max_len_sizes_the_caches_and_its_rows_stay_apart_from_table_1s(monkeypatch, tmp_path):
  """`--max_len` builds every model with caches of that many positions, keeps it in each row,
  and such rows replace only rows of the same caches: Table 1's (the default, 4 + 3 + 8) and
  the long caches' are two settings, each with its own speedups, both in the results; so is
  a longer prompt in the long caches, kept in its rows: the per-block columns' block starts
  after it too (`_first_block`'s position)."""
  monkeypatch.setattr(common, 'RESULTS_DIR', tmp_path)
  monkeypatch.setattr(table1, 'plot', lambda rows, path: None)
  _, built = _dense_builds(monkeypatch)
  positions = []
  first_block = table1._first_block   # pylint: disable=protected-access
  monkeypatch.setattr(table1, '_first_block', lambda *a, position=0: (
      positions.append(position), first_block(*a, position=position))[1])
  run = lambda prompt=4, **kw: table1.measure_and_write(
      't', ['800m'], ['dense'], ['ours'], prompt, 3, 30e9, step=True, depth=1, **kw)
  long, short, late = run(max_len=64)[0], run()[0], run(prompt=50, max_len=64)[0]
  # the block, then the whole decoder, of each run
  assert [max_len for _, max_len in built] == [64, 64, 15, 15, 64, 64]
  assert positions == [4, 4, 50]
  assert long['max_len'] == 64 and 'max_len' not in short
  assert 'prompt' not in long and late['prompt'] == 50
  settings = {table1._setting(r) for r in (long, short, late)}   # pylint: disable=protected-access
  assert len(settings) == 3
  text = (tmp_path / 't.md').read_text()
  assert '| 800m (1 blocks) | dense |' in text
  assert '| 800m (1 blocks), caches of 64 | dense |' in text
  assert '| 800m (1 blocks), caches of 64, prompt of 50 | dense |' in text
  assert '800m (1 blocks) float32, caches of 64' in text.split('| shape |')[0]
  assert '800m (1 blocks) float32, caches of 64, prompt of 50' in text.split('| shape |')[0]
  # the header's prompt is that of the rows that keep none, whatever the last run's
  assert 'Batch 1, prompt 4 tokens unless the shape column names another' in text
  # rows of two machines: the header says which measured which
  other = dict(long, machine='B')
  assert table1.markdown([dict(short, machine='A'), other], 3).startswith(
      'Machine: A (800m (1 blocks)); B (800m (1 blocks), caches of 64); bandwidth')
  assert table1.markdown([other], 3).startswith('Machine: B; bandwidth')
  with pytest.raises(app.UsageError, match=re.escape(
      '--max_len: 100 must hold the prompt and the decoded tokens (at least --prompt + '
      '--tokens = 160)')):
    table1.check_flags(_flags('--max_len', '100', '--prompt', '128', '--tokens', '32'))


def test_a_block_from_the_late_position_on_runs_as_a_generations_late_loop(monkeypatch):
  """Caches of 16 read in a loop from 8 positions (blocks of 4), LATE_POSITION 9: the block
  timed after a prompt of 8 takes the attention block's kernels, after one of 9 or 12 XLA's
  attention, as a generation's tokens there do (`decoding.Decoder`'s late loop)."""
  monkeypatch.setattr(sparse_qkv_block_kernel, 'POSITIONS', 4)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'FILLED_MIN_LEN', 8)
  monkeypatch.setattr(sparse_qkv_block_kernel, 'LATE_POSITION', 9)
  calls, decode_step = [], sparse_qkv_block_kernel.decode_step
  monkeypatch.setattr(sparse_qkv_block_kernel, 'decode_step',
                      lambda *a, **k: (calls.append(a[0].shape), decode_step(*a, **k))[1])
  with decode_kernels.use('interpret'):
    model = table1.build('ours', dict(TINY, attention_sparsity=4), 1, 16)
    for position, kernels in ((8, True), (9, False), (12, False)):
      step, weights, state, x = table1._first_block(model, 'float32', position=position)  # pylint: disable=protected-access
      calls.clear()
      jax.make_jaxpr(step)(weights, state, x)
      assert bool(calls) == kernels, position


def test_the_kernel_column_names_the_pallas_kernels_a_model_decodes_through(monkeypatch):
  dims = dict(TINY, attention_sparsity=4, loss_sparsity=0)
  with decode_kernels.use('xla'):
    assert table1.kernels_used(dims) == 'xla'
  with decode_kernels.use('interpret'):
    assert table1.kernels_used(dims) == 'pallas: ffblock+qkvblock'
    assert table1.kernels_used(dict(dims, ff_sparsity=0, attention_sparsity=0)) == \
        'pallas: attn'
  with decode_kernels.use('auto'):   # on a GPU, at 800M: attention's kernel from 512 positions
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    monkeypatch.setattr(decode_kernels, 'MISSING', None)
    dense = dict(dims, d_model=1024, n_heads=16, ff_sparsity=0, attention_sparsity=0)
    assert table1.kernels_used(dense, 2048) == 'pallas: attn'
    assert table1.kernels_used(dense, 168) == table1.kernels_used(dense) == 'xla'
  with decode_kernels.use('interpret'):
    # 17B's shapes (d_model 9216, 144 channels per module, heads of 96): the FF block, the
    # multiplicative layer's and attention's own kernels load them in power-of-2 pieces; the
    # attention block would, but declines above MAX_D_MODEL, and 144 channels fit not Sparse
    # QKV's own kernel.
    big = dict(dims, d_model=9216, n_heads=96, ff_sparsity=(256, 32), attention_sparsity=64)
    assert table1.kernels_used(big) == 'pallas: ffblock+mult+attn'
    # the sparse loss is a multiplicative layer too, also beside the attention block
    assert table1.kernels_used(dict(dims, loss_sparsity=4)) == 'pallas: ffblock+qkvblock+mult'
    # d_model 4096, MAX_D_MODEL: the attention block; a controller of rank 12 fits no Sparse
    # FF kernel.
    assert table1.kernels_used(dict(big, d_model=4096, n_heads=64, ff_sparsity=(256, 12))) == \
        'pallas: qkvblock'


def test_copies_of_a_generation_share_one_draw_of_weights_and_compile_apart(monkeypatch):
  """`generation_runs`: each copy is its own Decoder, compiled for each length it runs, and
  all decode the same tokens from the one draw of random weights."""
  drawn, compiled = [], []
  real_draw, real_jit = table1.random_weights_and_state, decoding.jit
  monkeypatch.setattr(table1, 'random_weights_and_state',
                      lambda *a, **k: drawn.append(1) or real_draw(*a, **k))
  monkeypatch.setattr(decoding, 'jit', lambda *a, **k: compiled.append(1) or real_jit(*a, **k))
  model_fn = functools.partial(table1.build, 'ours', TINY, 1, 16)
  runs = table1.generation_runs(model_fn, 'float32', prompt=4, copies=3)
  tokens = [np.asarray(run(n)) for n in (2, 5) for run in runs]
  assert len(runs) == 3 and len(drawn) == 1 and len(compiled) == 3 * 2
  for got in tokens[1:3]:
    np.testing.assert_array_equal(got, tokens[0])
  for got in tokens[4:]:
    np.testing.assert_array_equal(got, tokens[3])


def test_copies_of_a_blocks_loop_share_one_draw_of_weights_and_compile_apart(monkeypatch):
  """`seconds_per_block_programs`: each copy is a loop compiled apart (once: its lengths are a
  static argument of one jit) with a state of its own, all on one draw of random weights, and
  all timed in the same rounds."""
  drawn, compiled, timed = [], [], []
  real_draw, real_jit = table1.random_weights_and_state, decoding.jit
  monkeypatch.setattr(table1, 'random_weights_and_state',
                      lambda *a, **k: drawn.append(1) or real_draw(*a, **k))
  monkeypatch.setattr(decoding, 'jit', lambda *a, **k: compiled.append(1) or real_jit(*a, **k))
  monkeypatch.setattr(table1.timing, 'per_steps',
                      lambda runs, short, long: timed.append([run(short) for run in runs])
                      or [1e-5, 2e-5, 3e-5][:len(runs)])
  model = table1.build('ours', TINY, 1, 16)
  assert table1.seconds_per_block_programs(model, 'float32', 2, copies=3) == [1e-5, 2e-5, 3e-5]
  assert len(drawn) == 1 and len(compiled) == 3
  (first, *others), = timed   # each copy ran from its own fresh state: the same output
  for got in others:
    np.testing.assert_array_equal(np.asarray(got), np.asarray(first))


def test_the_program_columns_are_the_median_of_their_copies_and_the_table_gives_their_range(
    monkeypatch):
  monkeypatch.setattr(table1, 'dimensions', tiny_dimensions)
  monkeypatch.setattr(table1, 'seconds_per_block', lambda *a: (1e-3, 2e-3))
  asked = []
  monkeypatch.setattr(table1, 'seconds_per_block_programs',
                      lambda model, dtype, n_tokens, copies, position: asked.append(
                          ('block', copies))
                      or [6e-5, 4e-5, 5e-5][:copies])
  monkeypatch.setattr(table1, 'seconds_per_token_programs',
                      lambda *a, copies: asked.append(('token', copies))
                      or [3e-4, 1e-4, 2e-4][:copies])
  rows = table1.measure('800m', ['dense', 'ff'], ['ours'], prompt=4, n_tokens=3,
                        bandwidth=30e9, program=True, step=False, copies=3)
  assert asked == [('block', 3), ('token', 3)] * 2
  assert [r['s_per_token_program'] for r in rows] == [2e-4, 2e-4]
  assert [r['s_per_block_program'] for r in rows] == [5e-5, 5e-5]
  assert rows[0]['s_per_token_program_copies'] == [3e-4, 1e-4, 2e-4]
  assert rows[0]['s_per_block_program_copies'] == [6e-5, 4e-5, 5e-5]
  text = table1.markdown(rows, 3)
  assert ('| 0.0500 (0.0400-0.0600, 3 copies) | 1.00x |  | 0.000200 (0.000100-0.000300, '
          '3 copies) | 1.00x |') in text
  one = table1.measure('800m', ['dense'], ['ours'], prompt=4, n_tokens=3, bandwidth=30e9,
                       program=True, step=False)
  assert one[0]['s_per_token_program'] == 3e-4 and 's_per_token_program_copies' not in one[0]
  assert one[0]['s_per_block_program'] == 6e-5 and 's_per_block_program_copies' not in one[0]
  assert '| 0.0600 | 1.00x |  | 0.000300 | 1.00x |' in table1.markdown(one, 3)


def test_a_row_faster_than_its_floor_is_marked_with_the_rate_it_read():
  """A floor is bytes over the run's probe; a row that decodes faster read faster than the
  probe (the dense 17B generation on an H100), so its floor is marked and the rate named."""
  row = lambda variant, floor, program: dict(
      shape='17b', variant=variant, impl='ours', dtype='float32', depth=2, machine='m',
      bandwidth=2.8e12, bytes_per_token=9.96e9, floor_s_per_token=floor, s_per_token=None,
      s_per_token_program=program, s_per_block=1e-3, p90_s_per_block=1e-3)
  rows = [row('dense', 3.56e-3, 3.30e-3), row('ffqkv', 4.6e-4, 5.2e-4)]
  text = table1.markdown(rows, 3)
  assert '| 0.00356† |' in text and '| 0.00046 |' in text
  assert 'floor marked †: its row decoded a token in less than the floor, reading 17b dense ours '\
      'at 3018 GB/s, above the run\'s bandwidth probe' in text
  assert '†' not in table1.markdown(rows[1:], 3)


def test_each_part_of_a_row_says_what_it_measured_as_it_is_measured(monkeypatch, capsys):
  """A run cut off inside a row (a large shape compiling for minutes) still leaves a line for
  every part it measured, its figures and how long the part took; a part that failed or was
  not asked for says so."""
  monkeypatch.setattr(table1, 'dimensions', tiny_dimensions)
  monkeypatch.setattr(table1, 'seconds_per_block', lambda *a: (1e-3, 2e-3))
  monkeypatch.setattr(table1, 'seconds_per_block_programs', lambda *a, **k: [5e-5, 4e-5])

  def program(*args, **kwargs):
    raise RuntimeError('out of memory')
  monkeypatch.setattr(table1, 'seconds_per_token_programs', program)
  table1.measure('800m', ['dense'], ['ours'], prompt=4, n_tokens=3, bandwidth=30e9,
                 program=True, step=False, copies=2)
  lines = capsys.readouterr().err.splitlines()
  assert [line.split(' (measured in ')[0] for line in lines] == [
      'table1: 800m dense ours, block: 1.0000, 2.0000 ms',
      'table1: 800m dense ours, step: skipped',
      'table1: 800m dense ours, block_program: 0.0500, 0.0400 ms',
      'table1: 800m dense ours, program: failed']
  assert all(line.endswith(' s)') for line in lines)


def test_alternate_times_every_rows_block_side_by_side(monkeypatch):
  """--alternate: every row's block is built and compiled (under its implementation's kernel
  choice) before any is timed, then all are called in the same rounds; a block that fails to
  build gives its row an error and the others go on."""
  monkeypatch.setattr(table1, 'dimensions', tiny_dimensions)
  monkeypatch.setattr(table1, 'seconds_per_block',
                      lambda *a: pytest.fail('timed alone under --alternate'))
  events = []

  def block_call(model, dtype, position):
    assert position == 4
    i = len([e for e in events if e[0] == 'built'])
    events.append(('built', i, decode_kernels.active('sparse_ff'), dtype))
    if i == 2:
      raise RuntimeError('no such block')
    return lambda: events.append(('called', i)) or np.zeros(1)

  def seconds_of(fn):   # a clock of our own: a call of block i takes (i + 1) ms
    fn()
    return (events[-1][1] + 1) * 1e-3

  monkeypatch.setattr(table1, 'block_call', block_call)
  monkeypatch.setattr(table1.timing, 'seconds_of', seconds_of)
  rows = table1.measure('800m', ['dense', 'ff'], ['ours', 'ours-pallas'], prompt=4,
                        n_tokens=8, bandwidth=30e9, step=False, alternate=True)
  built = [e for e in events if e[0] == 'built']
  with decode_kernels.use('auto'):   # 'ours': XLA's ops on a CPU, the kernels on a GPU
    ours = decode_kernels.active('sparse_ff')
  assert built == [('built', 0, ours, 'float32'), ('built', 1, 'pallas', 'float32'),
                   ('built', 2, ours, 'float32'), ('built', 3, 'pallas', 'float32')]
  assert events.index(('called', 0)) > events.index(built[-1])   # all built, then timed
  called = [e[1] for e in events if e[0] == 'called']
  assert set(called) == {0, 1, 3} and all(called.count(i) == 3 + 2 * 4 for i in (0, 1, 3))
  assert [(r['variant'], r['impl'], r['s_per_block']) for r in rows] == [
      ('dense', 'ours', 1e-3), ('dense', 'ours-pallas', 2e-3), ('ff', 'ours', None),
      ('ff', 'ours-pallas', 4e-3)]
  assert rows[2]['errors'] == {'block': 'RuntimeError: no such block'}
  assert all(r['block_side_by_side'] for r in rows)
  text = table1.markdown(rows, 8)
  assert '| 1.000 (1.000)* | 1.00x |' in text and 'ms/block marked *' in text
  assert 'ms/block marked *' not in table1.markdown(
      [dict(r, block_side_by_side=False) for r in rows], 8)


def test_a_block_call_steps_the_first_block_on_its_own_output():
  """`block_call` (what `decode_shares --measure call` times): compiled by a first call, each
  call then runs the first block once more on the last output and state, as
  `seconds_per_block` does."""
  model = table1.build('ours', TINY, 2, 16)
  call = table1.block_call(model, 'float32')
  second, third = np.asarray(call()), np.asarray(call())
  step, weights, state, x = table1._first_block(table1.build('ours', TINY, 2, 16), 'float32')
  step = jax.jit(step)
  for _ in range(2):
    x, state = step(weights, state, x)
  np.testing.assert_allclose(second, x, rtol=1e-5, atol=1e-6)
  x, state = step(weights, state, x)
  np.testing.assert_allclose(third, x, rtol=1e-5, atol=1e-6)
  assert not np.allclose(second, third)


def test_the_defaults_pass_the_checks():
  table1.check_flags(_flags())


def test_copies_need_the_program_column():
  with pytest.raises(app.UsageError,
                     match='--copies 3: copies of the compiled generation need --program'):
    table1.check_flags(_flags('--copies', '3'))
  table1.check_flags(_flags('--copies', '3', '--program'))


def test_alternate_and_cold_are_refused_together():
  with pytest.raises(app.UsageError, match='--alternate and --cold: choose one'):
    table1.check_flags(_flags('--alternate', '--cold'))


def test_cold_flushes_the_caches_before_every_timed_step(monkeypatch):
  """--cold: `seconds_per_block` runs the flusher, untimed, before each step (warm-up
  included), and the rows and the table say the column was timed so."""
  events = []
  real_flusher = table1.timing.cache_flusher

  def flusher(nbytes=1 << 20):   # the real flusher, smaller, recording its calls
    flush = real_flusher(nbytes)
    return lambda: events.append('flush') or flush()

  real_seconds_of = table1.timing.seconds_of
  monkeypatch.setattr(table1.timing, 'cache_flusher', flusher)
  monkeypatch.setattr(table1.timing, 'seconds_of',
                      lambda fn: events.append('step') or real_seconds_of(fn))
  median, p90 = table1.seconds_per_block(table1.build('ours', TINY, 1, 16), 'float32', 4,
                                         cold=True)
  assert 0 < median <= p90
  assert events == ['flush', 'step'] * (4 + 3)
  events.clear()
  table1.seconds_per_block(table1.build('ours', TINY, 1, 16), 'float32', 4)
  assert events == ['step'] * (4 + 3)

  monkeypatch.setattr(table1, 'dimensions', tiny_dimensions)
  asked = []
  monkeypatch.setattr(table1, 'seconds_per_block',
                      lambda model, dtype, n_tokens, cold, position: asked.append(cold)
                      or (1e-3, 2e-3))
  rows = table1.measure('800m', ['dense', 'ff'], ['ours'], prompt=4, n_tokens=3,
                        bandwidth=30e9, step=False, cold=True)
  assert asked == [True, True] and all(r['block_cold'] for r in rows)
  text = table1.markdown(rows, 3)
  assert '| 1.000 (2.000) cold | 1.00x |' in text and 'ms/block marked "cold"' in text


def test_the_cache_flusher_reads_and_writes_its_whole_buffer():
  flush = table1.timing.cache_flusher(1 << 16)
  flush()
  np.testing.assert_array_equal(np.asarray(flush()), np.full(1 << 14, 2.0, np.float32))
