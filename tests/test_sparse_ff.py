"""Sparse FF (paper §3.1): behaviour, predict == eval, parity with trax's reference layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax.layers.research import sparsity as trax_sparsity

from sparse_scaling import convert
from sparse_scaling.layers import SparseFF
from sparse_scaling.layers import sparse_ff
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import sparse_ff_controller_kernel
from sparse_scaling.layers import sparse_ff_kernel
from tests.utils import assert_predict_equals_eval
from tests.utils import initialized as _init
from tests.utils import lowered_for_an_h200
from tests.utils import needs_gpu
from tests.utils import primitives_reading
from tests.utils import random_inputs as _inputs

D_MODEL, D_FF, N = 16, 64, 8


def _reference(layer, x):
  """Eval-mode output computed unit by unit in numpy from the layer's weights."""
  c1, c2, cb, w1, b1, w2, b2 = [np.asarray(w) for w in jax.tree.leaves(layer.weights)]
  flat = x.reshape(-1, x.shape[-1])
  chosen = np.argmax(np.einsum('td,dr,rkn->tkn', flat, c1, c2) + cb, axis=-1)  # [T, d_ff/N]
  out = np.tile(b2, (flat.shape[0], 1))
  for t, units in enumerate(chosen):
    for k, n in enumerate(units):
      out[t] += max(0.0, flat[t] @ w1[k, n] + b1[k, n]) * w2[k, n]
  return out.reshape(x.shape), chosen


@pytest.mark.parametrize('shape', [(5, D_MODEL), (2, 5, D_MODEL)])
@pytest.mark.parametrize('mode', ['train', 'eval', 'predict'])
def test_output_shape_matches_input(shape, mode):
  x = _inputs(*shape)
  layer = _init(SparseFF(D_FF, N, mode=mode), x)
  assert layer(x, rng=jax.random.PRNGKey(1)).shape == shape


@pytest.mark.parametrize('mode, kernel', [('eval', 'xla'), ('predict', 'xla'),
                                          ('predict', 'interpret')])
def test_one_unit_active_per_block(mode, kernel):
  x = _inputs(2, 3, D_MODEL)  # 6 tokens < N: the gathered path in predict; dense under eval.
  layer = _init(SparseFF(D_FF, N, mode=mode), x)
  expected, chosen = _reference(layer, x)
  assert chosen.shape == (6, D_FF // N)
  with decode_kernels.use(kernel):  # the Pallas kernel, interpreted on the CPU
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize('parts_bytes', [None, 0])
@pytest.mark.parametrize('d_model, d_ff, n, group', [(16, 64, 8, 1), (48, 256, 4, 8),
                                                     (2048 + 1024, 512, 8, 2), (24, 768, 8, 1)])
def test_decode_kernel_equals_the_gathered_rows(d_model, d_ff, n, group, parts_bytes,
                                                monkeypatch):
  """The Pallas kernels (interpreted) on fresh random weights, W2's rows multiplied in the
  units programs (parts, the default at these sizes) and by a kernel of their own (0 bytes of
  parts: gathered 32 rows a load, so that 96 blocks take 32 + 32 + 32): groups of blocks, rows
  longer than one slice, ties broken toward the lowest unit as argmax does. Each case also
  lowers for a GPU (an abstract H200 off one) to as many Triton kernels: Triton's rules hold
  for its shapes, which Pallas' interpreter does not check."""
  if parts_bytes is not None:
    monkeypatch.setattr(sparse_ff_kernel, 'MAX_PARTS_BYTES', parts_bytes)
    monkeypatch.setattr(sparse_ff_kernel, 'GATHER', 32)
  x = _inputs(3, d_model, seed=d_model)
  layer = _init(SparseFF(d_ff, n, d_lowrank=4, mode='predict'), x, seed=d_ff)
  _, (c1, c2, cb), (w1, b1, w2, b2), _ = layer.weights
  cb = cb.at[0].set(0.0)
  c2 = c2.at[:, 0].set(0.0)  # block 0: all logits 0, a tie that unit 0 must win
  got = sparse_ff_kernel.sparse_units(x, x @ c1, c2, cb, w1, b1, w2, b2, interpret=True,
                                      group=group)
  layer.weights = ((), (c1, c2, cb), (w1, b1, w2, b2), ())
  expected, chosen = _reference(layer, x)
  assert (chosen[:, 0] == 0).all()
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  units = functools.partial(sparse_ff_kernel.sparse_units, group=group)
  text = lowered_for_an_h200(units, x, x @ c1, c2, cb, w1, b1, w2, b2)
  parts = sparse_ff_kernel._writes_parts(  # pylint: disable=protected-access
      3, d_ff // n // group, d_model)
  assert text.count('xla.gpu.triton') == 1 + (not parts)   # units (and down, W2's rows)


@pytest.mark.parametrize('d_model, d_ff, n, rank', [(1024, 6144, 64, 16), (9216, 65536, 256, 32)])
def test_decode_kernel_lowers_to_triton_for_a_gpu_at_table1_shapes(d_model, d_ff, n, rank):
  """Lowered for CUDA on any machine: Triton's rules (every loaded block a power of 2 in
  size) hold at the 800M and 17B shapes, and the Triton backend is the one chosen."""
  blocks = d_ff // n
  shapes = [(1, d_model), (1, rank), (rank, blocks, n), (blocks, n), (blocks, n, d_model),
            (blocks, n), (blocks, n, d_model), (d_model,)]
  args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
  assert 'xla.gpu.triton' in lowered_for_an_h200(sparse_ff_kernel.sparse_units, *args)


@needs_gpu('compiles the kernel for a GPU')
@pytest.mark.parametrize('d_model, d_ff, n, rank', [(1024, 6144, 64, 16), (9216, 65536, 256, 32)])
def test_decode_kernel_compiled_for_the_gpu_equals_xla_at_table1_shapes(d_model, d_ff, n, rank):
  x = _inputs(1, 1, d_model, seed=1)
  layer = _init(SparseFF(d_ff, n, d_lowrank=rank, mode='predict'), x, seed=2)
  step = lambda x, w: layer.pure_fn(x, w, layer.state, None)[0]
  run = lambda: jax.jit(lambda x, w: step(x, w))(x, layer.weights)
  with decode_kernels.use('xla'):  # a new function each time: traced anew, not cached
    expected = np.asarray(run())
  with decode_kernels.use('pallas'):
    got = np.asarray(run())
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_unknown_decode_kernel_is_refused_naming_the_choices():
  with pytest.raises(ValueError, match='decode kernel must be one of'):
    with decode_kernels.use('cuda'):
      pass


def test_gathered_and_masked_paths_agree():
  x = _inputs(4 * N, D_MODEL)  # N tokens or more take the masked dense path.
  layer = _init(SparseFF(D_FF, N, mode='predict'), x)
  full = np.asarray(layer(x))
  for t in range(0, 4 * N, N // 2):  # N/2 tokens at a time take the gathered path.
    np.testing.assert_allclose(layer(x[t:t + N // 2]), full[t:t + N // 2], atol=1e-5)


@pytest.mark.parametrize('init_tokens', [3, N + 1])  # prompt on the gathered / masked path
def test_predict_equals_eval(init_tokens):
  x = _inputs(2, N + 6, D_MODEL)
  assert_predict_equals_eval(functools.partial(SparseFF, D_FF, N), x, init_tokens=init_tokens)


def test_train_with_zero_temperature_and_hard_mask_equals_eval():
  x = _inputs(2, 5, D_MODEL)
  train = _init(SparseFF(D_FF, N, temperature=0.0, quant_prob=1.0, mode='train'), x)
  evaluate = _init(SparseFF(D_FF, N, mode='eval'), x)
  evaluate.weights = train.weights
  np.testing.assert_allclose(train(x, rng=jax.random.PRNGKey(3)), evaluate(x), atol=1e-6)


def test_gumbel_noise_changes_choices_in_training_only():
  x = _inputs(64, D_MODEL)
  noisy = _init(SparseFF(D_FF, N, temperature=10.0, quant_prob=1.0, mode='train'), x)
  outputs = [np.asarray(noisy(x, rng=jax.random.PRNGKey(s))) for s in range(2)]
  assert not np.allclose(outputs[0], outputs[1])
  evaluate = _init(SparseFF(D_FF, N, temperature=10.0, mode='eval'), x)
  np.testing.assert_array_equal(evaluate(x), evaluate(x))


@pytest.mark.parametrize('temperature', [0.1, 1.0])
def test_training_choices_follow_the_gumbel_max_distribution(temperature):
  # trax's argmax(logits + temperature·Gumbel) draws unit j with probability
  # softmax(logits / temperature)_j; the sampler must draw the same distribution.
  logits = np.array([0.0, 0.1, -0.05, 0.2, -0.3, 0.15, 0.05, -0.1], np.float32)
  tokens = 40_000
  choice = np.asarray(sparse_ff._sample_units(  # pylint: disable=protected-access
      jnp.broadcast_to(logits, (tokens, 1, N)), temperature, jax.random.PRNGKey(0)))
  assert choice.shape == (tokens, 1) and choice.dtype == np.int32
  frequencies = np.bincount(choice[:, 0], minlength=N) / tokens
  expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
  # 4.5 standard errors of a frequency: fails for a wrong temperature or an off-by-one unit.
  np.testing.assert_allclose(frequencies, expected,
                             atol=4.5 * np.sqrt(expected * (1 - expected) / tokens).max())
  gumbel = np.argmax(logits + temperature * np.random.RandomState(0).gumbel(size=(tokens, N)),
                     axis=-1)
  np.testing.assert_allclose(frequencies, np.bincount(gumbel, minlength=N) / tokens,
                             atol=6.5 * np.sqrt(expected * (1 - expected) / tokens).max())


def test_zero_temperature_takes_the_argmax():
  logits = _inputs(50, 4, N)
  np.testing.assert_array_equal(
      sparse_ff._sample_units(logits, 0.0, jax.random.PRNGKey(0)),  # pylint: disable=protected-access
      np.argmax(logits, axis=-1))


def test_reverse_pass_replays_the_forward_choice():
  # trax's ReversibleHalfResidual hands the forward pass's state back marked as the second run.
  x = _inputs(2, 5, D_MODEL)
  layer = _init(SparseFF(D_FF, N, temperature=10.0, quant_prob=1.0, mode='train'), x)
  first, state = layer.pure_fn(x, layer.weights, layer.state, jax.random.PRNGKey(1))
  (_, (choice, _), _, _) = state
  replay_state = (state[0], (choice, {'running_second_time_yes': ()}), state[2], state[3])
  # Different noise (another rng) would choose differently; the replay keeps the choice.
  replayed, _ = layer.pure_fn(x, layer.weights, replay_state, jax.random.PRNGKey(2))
  fresh, _ = layer.pure_fn(x, layer.weights, state, jax.random.PRNGKey(2))
  np.testing.assert_allclose(replayed, first, atol=1e-6)
  assert not np.allclose(fresh, first)


@pytest.mark.parametrize('quant_prob', [0.0, 1.0])  # soft mask / straight-through hard mask
def test_gradients_reach_the_controller(quant_prob):
  x = _inputs(2, 5, D_MODEL)
  layer = _init(SparseFF(D_FF, N, quant_prob=quant_prob, mode='train'), x)

  def loss(weights):
    y, _ = layer.pure_fn(x, weights, layer.state, jax.random.PRNGKey(0))
    return jnp.sum(y ** 2)

  (_, controller_grads, units_grads, _) = jax.grad(loss)(layer.weights)
  for name, g in zip(['C1', 'C2', 'c'], controller_grads):
    assert np.abs(g).max() > 0, f'no gradient reaches controller weight {name}'
  for name, g in zip(['W1', 'b1', 'W2', 'b2'], units_grads):
    assert np.abs(g).max() > 0, f'no gradient reaches {name}'


def _train_step_under(kernel, layer, x, state, rng):
  """Output, new state and gradients (weights, x) of a train-mode call under `kernel`."""
  def loss(weights, x):
    y, new_state = layer.pure_fn(x, weights, state, rng)
    return jnp.sum(jnp.sin(3 * y)), (y, new_state)

  with decode_kernels.use(kernel):  # a new function each time: traced anew
    grads, (y, new_state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(layer.weights, x)
  return y, new_state, grads


@pytest.mark.parametrize('quant_prob, temperature', [(0.0, 0.5), (1.0, 0.5), (1.0, 0.0)])
def test_training_controller_kernel_equals_xla_with_its_gradients(quant_prob, temperature):
  """The controller's Pallas kernels (interpreted on the CPU) against XLA's path: the same
  draws from the same random numbers, the same mask, and the same gradients for every
  weight and the input; the reverse pass's replay keeps the forward pass's choice."""
  x = _inputs(2, 24, 32, seed=5)  # 48 tokens: 3 programs of 16; rank 16, blocks of 16
  layer = _init(SparseFF(128, 16, d_lowrank=16, temperature=temperature,
                         quant_prob=quant_prob, mode='train'), x)
  assert sparse_ff_controller_kernel.fits(48, 16, 16)
  for seed in (1, 2):
    rng = jax.random.PRNGKey(seed)
    expected = _train_step_under('xla', layer, x, layer.state, rng)
    got = _train_step_under('interpret', layer, x, layer.state, rng)
    np.testing.assert_array_equal(got[1][1][0], expected[1][1][0])  # the choice kept as state
    for g, e in zip(jax.tree.leaves((got[0], got[2])), jax.tree.leaves((expected[0], expected[2]))):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
  choice = expected[1][1][0]
  replay = (layer.state[0], (choice, {'running_second_time_yes': ()}), *layer.state[2:])
  replayed = _train_step_under('interpret', layer, x, replay, jax.random.PRNGKey(9))
  np.testing.assert_array_equal(replayed[1][1][0], choice)
  np.testing.assert_allclose(replayed[0], expected[0], rtol=1e-5, atol=1e-5)


def test_training_controller_kernel_lowers_to_triton_at_the_gpu_size():
  """Forward and backward kernels lowered for CUDA at the quality reproduction's GPU size
  (16,384 tokens, rank 16, 64 blocks of 32): Triton's block rules hold there."""
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in [
      ((16384, 16), jnp.float32), ((16, 64, 32), jnp.float32), ((64, 32), jnp.float32),
      ((16384, 64), jnp.float32), ((), jnp.bool_)]]

  def loss(z, c2, cb, u, hard):
    mask, _ = sparse_ff_controller_kernel.controller_mask(z, c2, cb, u, hard, 0.1, False)
    return jnp.sum(mask * mask)

  text = lowered_for_an_h200(jax.grad(loss, argnums=(0, 1, 2)), *args)
  assert text.count('xla.gpu.triton') == 2  # the forward and backward kernels


@pytest.mark.parametrize('backend', ['gpu', 'cpu', 'tpu'])
def test_auto_runs_sparse_ff_s_kernels_on_a_gpu_only(backend, monkeypatch):
  # The choice measured on an H200 (docs/decoding_gpu.md; README, "Training step"): the sparse
  # blocks' decoding kernels, Sparse FF's own and its controller's training kernels, and
  # attention's own and the multiplicative layer's where its layer's shapes say it pays
  # (`attention_kernel.pays`, measured on an H100, `test_causal_attention.py`;
  # `multiplicative_kernel.pays`, never by default, `test_sparse_qkv.py`; the receptive
  # fields' where `sparse_qkv_fields_kernel.pays`, from 17B's d_model: `active` is asked
  # here without shapes); the others only when asked.
  monkeypatch.setattr(decode_kernels.jax, 'default_backend', lambda: backend)
  on = ({'sparse_ff', 'sparse_ff_controller', 'sparse_ff_block', 'sparse_qkv_block',
         'attention', 'multiplicative', 'sparse_qkv_fields'} if backend == 'gpu' else set())
  assert {k: decode_kernels.active(k) for k in decode_kernels.KERNELS} == {
      k: 'pallas' if k in on else 'xla' for k in decode_kernels.KERNELS}
  with decode_kernels.use('xla'):
    assert {decode_kernels.active(k) for k in decode_kernels.KERNELS} == {'xla'}
  with pytest.raises(ValueError, match='kernel must be one of'):
    decode_kernels.active('sparse_loss')


@needs_gpu('compiles the kernel for a GPU')
def test_training_controller_kernel_compiled_for_the_gpu_equals_xla():
  x = _inputs(4, 256, 512, seed=3)
  layer = _init(SparseFF(2048, 32, d_lowrank=16, temperature=0.1, quant_prob=0.0,
                         mode='train'), x)
  rng = jax.random.PRNGKey(4)
  expected = _train_step_under('xla', layer, x, layer.state, rng)
  got = _train_step_under('pallas', layer, x, layer.state, rng)
  # A draw within float32 rounding of a boundary between units may go either way.
  assert np.mean(np.asarray(got[1][1][0]) == np.asarray(expected[1][1][0])) > 0.999
  for g, e in zip(jax.tree.leaves((got[0], got[2])), jax.tree.leaves((expected[0], expected[2]))):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_eval_matches_trax_reference_sparse_ff():
  x = _inputs(2, 7, D_MODEL)
  theirs = _init(trax_sparsity.SparseFF(D_FF, N, d_lowrank=4, mode='eval'), x, seed=5)
  ours = _init(SparseFF(D_FF, N, d_lowrank=4, mode='eval'), x)
  convert.load_trax_weights(ours, theirs.weights)
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)


def test_converter_finds_sparse_ff_by_its_layers_not_its_name():
  x = _inputs(2, 7, D_MODEL)
  theirs = _init(trax_sparsity.SparseFF(D_FF, N, d_lowrank=4, mode='eval'), x, seed=5)
  ours = _init(SparseFF(D_FF, N, d_lowrank=4, mode='eval'), x)
  ours._name = 'Renamed'  # pylint: disable=protected-access
  convert.load_trax_weights(ours, theirs.weights)
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)


def test_converter_rejects_a_different_configuration():
  x = _inputs(2, 7, D_MODEL)
  theirs = _init(trax_sparsity.SparseFF(D_FF, N, d_lowrank=4, mode='eval'), x)
  ours = _init(SparseFF(D_FF, N, d_lowrank=2, mode='eval'), x)
  with pytest.raises(ValueError, match='do not fit'):
    convert.load_trax_weights(ours, theirs.weights)


def test_default_rank_is_d_model_over_n():
  x = _inputs(3, 256)
  layer = _init(SparseFF(1024, 32, mode='eval'), x)
  assert layer.weights[1][0].shape == (256, 256 // 32)


def test_predict_reads_the_big_weights_only_through_a_gather():
  """XLA's decoding path (CPUs, TPUs; `decode_kernels.use('xla')` anywhere) gathers the
  chosen rows of W1 and W2; the kernel's (GPUs by default) hands them to the Pallas call."""
  d_model, d_ff, n = 32, 512, 16
  x = _inputs(1, 1, d_model)
  layer = _init(SparseFF(d_ff, n, mode='predict'), x)
  # A new function for each trace: jax caches a function's trace, and the kernel choice is
  # read when tracing.
  step = lambda: lambda weights, x: layer.pure_fn(x, weights, layer.state, None)[0]
  is_w1_or_w2 = lambda aval: aval.shape == (d_ff // n, n, d_model)
  with decode_kernels.use('xla'):
    assert primitives_reading(step(), (layer.weights, x), is_w1_or_w2) == {'gather'}
  with decode_kernels.use('interpret'):  # the kernel reads its rows itself
    assert primitives_reading(step(), (layer.weights, x), is_w1_or_w2) == {'pallas_call'}
  many = _inputs(1, n, d_model)  # N tokens take the masked dense path: the check can fail.
  assert 'dot_general' in primitives_reading(step(), (layer.weights, many), is_w1_or_w2)


def test_a_cpu_gathers_large_rows_a_chunk_at_a_time(monkeypatch):
  """On a CPU, where a token's chosen rows of W1 pass CPU_CHUNK_BYTES, the gathered path takes
  the blocks a chunk at a time (a scan, every step of which gathers its rows): its output
  equals the rows gathered all at once, W1 and W2 are still read only by gathers, and predict
  equals eval."""
  d_model, d_ff, n = 32, 512, 16   # 32 blocks; a token's chosen rows of W1: 32 x 128 bytes
  x = _inputs(2, 1, d_model)
  layer = _init(SparseFF(d_ff, n, mode='predict'), x)
  step = lambda: lambda weights, x: layer.pure_fn(x, weights, layer.state, None)[0]
  is_w1_or_w2 = lambda aval: aval.shape == (d_ff // n, n, d_model)
  primitives = lambda: {e.primitive.name for e in jax.make_jaxpr(step())(layer.weights, x).eqns}
  with decode_kernels.use('xla'):
    assert 'scan' not in primitives()   # 4 KB a token: all at once
    whole = np.asarray(jax.jit(step())(layer.weights, x))
    monkeypatch.setattr(sparse_ff, 'CPU_CHUNK_BYTES', 1024)   # 8 blocks' rows a chunk
    assert sparse_ff._cpu_chunks(32, d_model, jnp.float32) == 4
    assert 'scan' in primitives()
    np.testing.assert_allclose(jax.jit(step())(layer.weights, x), whole, rtol=1e-6, atol=1e-6)
    assert primitives_reading(step(), (layer.weights, x), is_w1_or_w2) == {'gather'}
    monkeypatch.setattr(sparse_ff, 'CPU_CHUNK_BYTES', 2 * D_MODEL * 4)   # 2 of 8 blocks
    assert_predict_equals_eval(functools.partial(SparseFF, D_FF, N), _inputs(2, 7, D_MODEL))


@pytest.mark.parametrize('backend, limit, chunks', [
    ('cpu', 4 * 2**20, 4),   # the 17B shapes: 256 rows of 36 KB, chunks of 64 (2.4 MB)
    ('cpu', 2**20, 16),      # chunks of 16 rows (0.6 MB), the largest that fit
    ('cpu', 0, 1),           # off
    ('gpu', 4 * 2**20, 1),   # a CPU's only
    ('tpu', 4 * 2**20, 1)])
def test_chunks_are_the_fewest_that_fit_on_a_cpu_only(backend, limit, chunks, monkeypatch):
  monkeypatch.setattr(sparse_ff, 'CPU_CHUNK_BYTES', limit)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert sparse_ff._cpu_chunks(256, 9216, jnp.float32) == chunks
  assert sparse_ff._cpu_chunks(64, 1024, jnp.float32) == 1   # 800M: 256 KB a token, at once
  assert sparse_ff._cpu_chunks(256, 9216, jnp.bfloat16) == 1   # float32 rows only


@pytest.mark.parametrize('kwargs, parameter', [
    (dict(d_ff=60, n_elements_in_block=8), 'd_ff'),
    (dict(d_ff=64, n_elements_in_block=1), 'n_elements_in_block'),
    (dict(d_ff=64, n_elements_in_block=8, d_lowrank=0), 'd_lowrank'),
    (dict(d_ff=64, n_elements_in_block=8, quant_prob=1.5), 'quant_prob'),
    (dict(d_ff=64, n_elements_in_block=8, mode='decode'), 'mode'),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(kwargs, parameter):
  with pytest.raises(ValueError, match=parameter):
    SparseFF(**kwargs)
