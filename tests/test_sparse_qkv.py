"""Sparse QKV (paper §3.2): multiplicative layer, causal module convolution, attention."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes
from trax.layers.research import sparsity as trax_sparsity

from sparse_scaling import convert
from sparse_scaling import decoding
from sparse_scaling.layers import ModuleConv
from sparse_scaling.layers import attention_kernel
from sparse_scaling.layers import decode_kernels
from sparse_scaling.layers import multiplicative_dense
from sparse_scaling.layers import multiplicative_kernel
from sparse_scaling.layers import sparse_qkv
from sparse_scaling.layers import sparse_qkv_fields_kernel
from sparse_scaling.layers import MultiplicativeDense
from sparse_scaling.layers import SparseEncDecAttention
from sparse_scaling.layers import SparseLoss
from sparse_scaling.layers import SparseQKVAttention
from tests.utils import assert_predict_equals_eval
from tests.utils import compiled_or_lowered
from tests.utils import gpu_marks
from tests.utils import initialized as _init
from tests.utils import lowered_for_an_h200
from tests.utils import needs_gpu
from tests.utils import random_inputs as _inputs

D_MODEL, N_HEADS, S = 16, 2, 4


def test_multiplicative_dense_is_the_papers_formula():
  x = _inputs(3, 5, D_MODEL)
  layer = _init(MultiplicativeDense(S, 24), x)
  d, e, b = [np.asarray(w) for w in layer.weights]
  expected = np.einsum('bli,si,im->blsm', x, d, e).reshape(3, 5, 24) + b
  np.testing.assert_allclose(layer(x), expected, atol=1e-5)
  assert d.shape == (S, D_MODEL) and e.shape == (D_MODEL, 24 // S)


def test_multiplicative_dense_computes_one_function_for_few_and_many_tokens():
  # Up to M tokens the layer scales each input by D; more form the dense weight D ⊙ E once.
  x = _inputs(2, 7, D_MODEL)                      # 14 tokens > M = 24 / 4 = 6
  layer = _init(MultiplicativeDense(S, 24), x)
  many = np.asarray(layer(x))
  few = np.concatenate([np.asarray(layer(x[:, i:i + 1])) for i in range(7)], axis=1)  # 2 each
  np.testing.assert_allclose(many, few, atol=1e-5)
  grads = [jax.grad(lambda w, xs=xs: layer.pure_fn(xs, w, (), None)[0].sum())(layer.weights)
           for xs in (x, x[:1, :3])]
  for g in grads:  # both paths pass gradients to D, E and the bias
    assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(g))


@pytest.mark.parametrize('form', [0, 1, 2, 3, pytest.param(4, marks=gpu_marks(
    "three TF32 products: XLA's CPU has no TF32"))])
def test_every_decode_form_of_the_multiplicative_product_is_the_formula(form, monkeypatch):
  # 3 and 4 multiply on tensor cores as six bfloat16 or three TF32 products: about float32's
  # accuracy.
  monkeypatch.setattr(multiplicative_dense, 'DECODE_FORM', form)
  x = _inputs(3, 2 * D_MODEL)
  layer = _init(MultiplicativeDense(S, 24), x)
  d, e, b = [np.asarray(w, np.float64) for w in layer.weights]
  expected = np.einsum('bi,si,im->bsm', x, d, e).reshape(3, 24) + b
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form, precision, products', [(3, 'bf16', 6), (4, 'tf32', 3),
                                                       (0, None, None)])
def test_the_tensor_core_forms_lower_to_their_dot_algorithm(form, precision, products,
                                                            monkeypatch):
  # 4 runs on GPUs only (XLA's CPU has no TF32): lowered for one, as is 3.
  monkeypatch.setattr(multiplicative_dense, 'DECODE_FORM', form)
  x = _inputs(1, 2 * D_MODEL)
  layer = _init(MultiplicativeDense(S, 24), x)
  text = lowered_for_an_h200(lambda x, w: layer.pure_fn(x, w, (), None)[0], x, layer.weights)
  algorithms = re.findall(r'algorithm = <lhs_precision_type = (\w+),.*'
                          r'num_primitive_operations = (\d+)', text)
  assert algorithms == ([(precision, str(products))] if precision else [])


def test_multiplicative_dense_matches_trax_factored_dense():
  x = _inputs(3, D_MODEL)
  theirs = _init(trax_sparsity.FactoredDense(S, D_MODEL, 24), x, seed=3)
  ours = _init(MultiplicativeDense(S, 24), x)
  convert.load_trax_weights(ours, theirs.weights)
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)


# (rows, steps' loop, modules, channels) of a program; the shapes' d_in, S, M, batch, dtype.
_MULT_CASES = [
    # parts of 64 rows in one step; channels of 16 over M 24, the last slice overlapping
    ((64, True, 64, 16), (256, 4, 24, 1, jnp.float32)),
    # 2 rows of x; 2 parts of 2 steps unrolled; 8 modules as slices of 4, 36 channels of 16
    ((128, False, 4, 16), (256, 8, 36, 2, jnp.float32)),
    # 17B's sides scaled down: 144 channels, 16 modules, parts of 512 rows in 8 steps
    ((512, True, 64, 16), (1152, 16, 144, 1, jnp.float32)),
    # sides below Triton's 16 (3 modules, M 10, d_in 96): sums, not products; bfloat16
    ((512, True, 64, 16), (96, 3, 10, 1, jnp.bfloat16)),
]


@pytest.mark.parametrize('interpret', [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize('shares, shape', _MULT_CASES)
def test_the_multiplicative_kernel_is_the_layers_product(shares, shape, interpret,
                                                         monkeypatch):
  """`multiplicative_kernel.product` (in Pallas' interpreter, and compiled on a GPU; lowered
  for one elsewhere) equals the formula: every part of d_in summed once, every module and
  channel written, in the slices' overlaps too (which only the compiled kernel could get
  wrong: the interpreter clamps a slice past an array's end, a GPU does not)."""
  d_in, n_modules, n_channels, batch, dtype = shape
  for name, value in zip(('ROWS', 'LOOP', 'MODULES', 'CHANNELS'), shares):
    monkeypatch.setattr(multiplicative_kernel, name, value)
  x, d, e = (jnp.asarray(_inputs(*side, seed=i), dtype) for i, side in enumerate(
      [(batch, d_in), (n_modules, d_in), (d_in, n_channels)]))
  product = functools.partial(multiplicative_kernel.product, interpret=interpret)
  got = jax.jit(product)(x, d, e) if interpret else compiled_or_lowered(product, x, d, e)
  if got is None:
    return
  expected = np.einsum('bi,si,im->bsm', *(np.asarray(a, np.float64) for a in (x, d, e)))
  assert got.shape == (batch, n_modules, n_channels) and got.dtype == dtype
  tolerance = 1e-4 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float64), expected,
                             atol=tolerance * np.abs(expected).max())


def test_few_tokens_take_the_multiplicative_kernel_where_it_is_on(monkeypatch):
  """In the few-token path the layer calls the kernel as `decode_kernels` says (here in the
  interpreter) and gives XLA's output; more tokens than MAX_TOKENS, or than M, do not."""
  calls = []
  real = multiplicative_kernel.product
  monkeypatch.setattr(multiplicative_kernel, 'product', lambda *args, interpret: (
      calls.append(args[0].shape) or real(*args, interpret=interpret)))
  monkeypatch.setattr(multiplicative_kernel, 'MAX_TOKENS', 4)
  x = _inputs(2, 3, D_MODEL)
  layer = _init(MultiplicativeDense(S, 64), x)                 # M = 16
  for tokens in (x[:, :1], x[:, :2], x[:, :3], x):
    expected = layer(tokens)
    with decode_kernels.use('interpret'):
      np.testing.assert_allclose(layer(tokens), expected, atol=1e-5)
  assert calls == [(2, D_MODEL), (4, D_MODEL)]       # 2 and 4 tokens; not 6, not 6 again


def test_auto_takes_the_multiplicative_kernel_on_a_gpu_from_min_d_in(monkeypatch):
  """By default 'auto' never takes the kernel (measured slower); from MIN_D_IN 8192 it takes
  it at 17B's d_model (9216) on a GPU, not at 800M's (1024), and never off a GPU."""
  assert not multiplicative_kernel.pays(9216)
  monkeypatch.setattr(multiplicative_kernel, 'MIN_D_IN', 8192)
  assert multiplicative_kernel.pays(9216) and not multiplicative_kernel.pays(1024)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(decode_kernels, 'MISSING', None)
  assert decode_kernels.active('multiplicative', multiplicative_kernel.pays(9216)) == 'pallas'
  assert decode_kernels.active('multiplicative', multiplicative_kernel.pays(1024)) == 'xla'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert decode_kernels.active('multiplicative', multiplicative_kernel.pays(9216)) == 'xla'


@pytest.mark.parametrize('loop, precision, dtype', [
    (True, 0, jnp.float32), (False, 0, jnp.float32), (True, 1, jnp.float32),
    (True, 2, jnp.float32), (True, 0, jnp.bfloat16)])
def test_the_multiplicative_kernel_lowers_for_a_gpu_at_17b(loop, precision, dtype,
                                                          monkeypatch):
  """At 17B's shapes (d_in 9216, 64 modules of 144) the kernel lowers through Pallas'
  Triton rules to one call for a GPU, its steps as a loop or unrolled, in each precision."""
  monkeypatch.setattr(multiplicative_kernel, 'LOOP', loop)
  monkeypatch.setattr(multiplicative_kernel, 'PRECISION', precision)
  x, d, e = (jnp.zeros(shape, dtype) for shape in ((1, 9216), (64, 9216), (9216, 144)))
  text = lowered_for_an_h200(multiplicative_kernel.product, x, d, e)
  assert text.count('__gpu$xla.gpu.triton') == 1


@pytest.mark.parametrize('loss_sparsity, n_weights', [(0, D_MODEL * 32 + 32),
                                                      (4, D_MODEL * (4 + 8) + 32)])
def test_sparse_loss_is_dense_at_zero_and_multiplicative_otherwise(loss_sparsity, n_weights):
  x = _inputs(2, D_MODEL)
  layer = _init(SparseLoss(32, loss_sparsity), x)
  assert layer(x).shape == (2, 32)
  assert sum(w.size for w in jax.tree.leaves(layer.weights)) == n_weights


@pytest.mark.parametrize('length_kernel_size', [1, 3])
def test_module_conv_is_causal_along_the_length(length_kernel_size):
  x = _inputs(2, 7, D_MODEL)
  conv = _init(ModuleConv(D_MODEL, S, length_kernel_size, 3, mode='eval'), x)
  changed = x.copy()
  changed[:, 4:] += 1.0
  y, y_changed = np.asarray(conv(x)), np.asarray(conv(changed))
  np.testing.assert_allclose(y[:, :4], y_changed[:, :4], atol=1e-6)
  assert not np.allclose(y[:, 4], y_changed[:, 4])


def test_module_conv_mixes_neighbouring_modules_only():
  x = np.zeros((1, 1, D_MODEL), np.float32)
  conv = _init(ModuleConv(D_MODEL, S, 1, 3, mode='eval'), x)
  m = D_MODEL // S
  x[0, 0, :m] = 1.0  # only module 0 is non-zero: modules 0 and 1 see it, 2 and 3 do not
  y = np.asarray(conv(x)).reshape(S, m) - np.asarray(conv(np.zeros_like(x))).reshape(S, m)
  assert np.abs(y[:2]).max() > 0 and np.abs(y[2:]).max() == 0


@pytest.mark.parametrize('length_kernel_size', [1, 3])
def test_sparse_qkv_output_shape_matches_dense(length_kernel_size):
  x = _inputs(2, 6, D_MODEL)
  layer = _init(SparseQKVAttention(D_MODEL, N_HEADS, S, length_kernel_size, mode='train'), x)
  assert layer(x, rng=jax.random.PRNGKey(0)).shape == x.shape


@pytest.mark.parametrize('length_kernel_size, kernel', [(1, 'xla'), (3, 'xla'), (2, 'interpret'),
                                                       (3, 'interpret')])
def test_sparse_qkv_predict_equals_eval(length_kernel_size, kernel):
  # kernel 'interpret': a token decodes through the Pallas kernels (its convolutions and its
  # attention), run by Pallas' interpreter; the prompt goes through XLA.
  model_fn = functools.partial(SparseQKVAttention, D_MODEL, N_HEADS, S, length_kernel_size,
                               max_inference_length=16)
  with decode_kernels.use(kernel):
    assert_predict_equals_eval(model_fn, _inputs(2, 8, D_MODEL))


@pytest.mark.parametrize('d_model, n_heads, sparsity', [(64, 4, 8), (32, 4, 2)])
def test_decode_kernels_equal_xla_step_by_step(d_model, n_heads, sparsity):
  """Module and head sizes apart (8 modules of 8 against 4 heads of 16; 2 of 16 against 4 of
  8): each step's output and the whole state (convolution state, caches, index) as XLA's,
  with the layers' own kernels (the multiplicative product, the convolutions, attention)."""
  x = _inputs(3, 12, d_model)
  runs = {}
  for kernel in ('xla', 'interpret'):
    layer = _init(SparseQKVAttention(d_model, n_heads, sparsity, max_inference_length=16,
                                     mode='predict'), x[:, :2])
    outputs = [layer(x[:, :2])]
    with decode_kernels.use(kernel):
      step = jax.jit(lambda w, s, t: layer.pure_fn(t, w, s, None))  # traced in this block
      state = layer.state
      jaxpr = str(jax.make_jaxpr(step)(layer.weights, state, x[:, 2:3]))
      assert jaxpr.count('pallas_call') == (3 if kernel == 'interpret' else 0)
      for i in range(2, 12):
        out, state = step(layer.weights, state, x[:, i:i + 1])
        outputs.append(out)
    runs[kernel] = (np.concatenate(outputs, axis=1), state)
  np.testing.assert_allclose(runs['interpret'][0], runs['xla'][0], rtol=1e-5, atol=1e-5)
  for got, expected in zip(jax.tree.leaves(runs['interpret'][1]), jax.tree.leaves(runs['xla'][1])):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('split', [True, False])
@pytest.mark.parametrize('d_model, sparsity', [(1024, 16), (512, 8)])
def test_decode_kernels_lower_to_triton_for_a_gpu(d_model, sparsity, split, monkeypatch):
  """Lowered for CUDA on any machine (800M's and the quality runs' shapes, KV caches of 168):
  Triton's rules hold and the Triton backend is chosen, for both kernels, attention's in
  either form (`attention_kernel.SPLIT`)."""
  monkeypatch.setattr(attention_kernel, 'SPLIT', split)
  layer = SparseQKVAttention(d_model, sparsity, sparsity, max_inference_length=168,
                             mode='predict')
  x = jax.ShapeDtypeStruct((1, 1, d_model), jnp.float32)
  weights, state = layer.weights_and_state_signature(x)
  step = lambda w, s, t: layer.pure_fn(t, w, s, None)
  with decode_kernels.use('pallas'):
    text = lowered_for_an_h200(step, weights, state, x)
  assert text.count('xla.gpu.triton') >= 2   # the convolutions, the attention
  # The attention kernel writes the token into the caches in place: its last two outputs (1
  # and 2 after the output; split, 3 and 4 after the blocks' three parts) alias operands of
  # the call (no copy of a cache per step).
  first = 3 if split else 1
  assert f'output_operand_alias<output_tuple_indices = [{first}]' in text
  assert f'output_operand_alias<output_tuple_indices = [{first + 1}]' in text


@needs_gpu('compiles the kernels for a GPU')
def test_decode_kernels_compiled_for_the_gpu_equal_xla_at_the_800m_shape():
  x = _inputs(1, 6, 1024, seed=1)
  runs = {}
  for kernel in ('xla', 'pallas'):
    layer = _init(SparseQKVAttention(1024, 16, 16, max_inference_length=168, mode='predict'),
                  x[:, :2], seed=2)
    layer(x[:, :2])
    with decode_kernels.use(kernel):
      step = jax.jit(lambda w, s, t: layer.pure_fn(t, w, s, None))
      state, outputs = layer.state, []
      for i in range(2, 6):
        out, state = step(layer.weights, state, x[:, i:i + 1])
        outputs.append(np.asarray(out))
    runs[kernel] = np.concatenate(outputs, axis=1)
  np.testing.assert_allclose(runs['pallas'], runs['xla'], rtol=1e-4, atol=1e-4)


def test_sparse_qkv_is_causal():
  x = _inputs(1, 8, D_MODEL)
  layer = _init(SparseQKVAttention(D_MODEL, N_HEADS, S, mode='eval'), x)
  changed = x.copy()
  changed[:, 5:] -= 2.0
  np.testing.assert_allclose(layer(x)[:, :5], layer(changed)[:, :5], atol=1e-6)


def test_sparse_qkv_matches_trax_multiplicative_conv_causal_attention():
  x = _inputs(2, 7, D_MODEL)
  theirs = _init(trax_sparsity.MultiplicativeConvCausalAttention(
      D_MODEL, n_heads=N_HEADS, sparsity=S, length_kernel_size=3, mode='eval'), x, seed=7)
  ours = _init(SparseQKVAttention(D_MODEL, N_HEADS, S, 3, mode='eval'), x)
  convert.load_trax_weights(ours, theirs.weights)
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)


def test_sparse_enc_dec_attention_matches_trax_attention_qkv_with_a_sparse_query():
  # trax's encoder-decoder attention under ConfigurableTransformer(enc_dec_attention_sparsity=S):
  # AttentionQKV with a FactoredDense + LocallyConvDense query and no output Dense.
  decoder, encoder = _inputs(2, 5, D_MODEL, seed=1), _inputs(2, 7, D_MODEL, seed=2)
  mask = np.ones((2, 1, 1, 7), bool)
  mask[0, ..., 4:] = False                                  # padding in the first encoder row
  inputs = (decoder, encoder, encoder, mask)
  theirs = _init(tl.AttentionQKV(D_MODEL, n_heads=N_HEADS, q_sparsity=S, result_sparsity='noop',
                                 mode='eval'), inputs, seed=7)
  ours = _init(SparseEncDecAttention(D_MODEL, N_HEADS, S, mode='eval'), inputs)
  convert.load_trax_weights(ours, theirs.weights)
  (out, out_mask), (expected, expected_mask) = ours(inputs), theirs(inputs)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  np.testing.assert_array_equal(out_mask, expected_mask)


@pytest.mark.parametrize('make, parameter', [
    (lambda: SparseQKVAttention(D_MODEL, 3, S), 'n_heads'),
    (lambda: SparseQKVAttention(D_MODEL, N_HEADS, 5), 'sparsity'),
    (lambda: SparseQKVAttention(D_MODEL, N_HEADS, S, length_kernel_size=0),
     'length_kernel_size'),
    (lambda: SparseQKVAttention(D_MODEL, N_HEADS, S, module_kernel_size=2),
     'module_kernel_size'),
    (lambda: SparseQKVAttention(D_MODEL, N_HEADS, S, mode='decode'), 'mode'),
    (lambda: MultiplicativeDense(3, 16), 'n_modules'),
    (lambda: SparseLoss(30, 4), 'loss_sparsity'),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(make, parameter):
  with pytest.raises(ValueError, match=parameter):
    make()


@pytest.mark.parametrize('one_product', [False, True])
@pytest.mark.parametrize('sizes', [(3, 3, 1), (3,), (1, 5, 3)])
def test_module_conv_laid_out_for_decoding_equals_trax_layout_step_by_step(sizes, one_product,
                                                                          monkeypatch):
  """`decode_weights` (a GPU's default, forced here): one product per module kernel size (or
  with ONE_PRODUCT one, the smaller kernels among zeros), rows padded to PAD_ROWS; a prompt
  and each token then give trax's layout's outputs and state, the layout read as it was made
  whatever ONE_PRODUCT says by then."""
  monkeypatch.setattr(sparse_qkv, 'DECODE_LAYOUT', True)
  monkeypatch.setattr(sparse_qkv, 'ONE_PRODUCT', one_product)
  d, s, lks = 48, 4, 3   # M 12: rows 3·3·12 = 108 -> 128, 3·1·12 = 36 -> 64
  x = _inputs(2, 7, d)
  layer = _init(ModuleConv(d, s, lks, sizes, 'predict'), x[:, :3])
  keys = jax.random.split(jax.random.PRNGKey(3), len(sizes))   # biases apart (init's ~1e-6)
  weights = tuple((k, jax.random.normal(key, b.shape)) for (k, b), key in zip(layer.weights, keys))
  state = layer.state
  layout = layer.decode_weights(weights)
  assert isinstance(layout, sparse_qkv.DecodeLayout)
  groups = ({max(sizes): len(sizes)} if one_product
            else {size: sizes.count(size) for size in dict.fromkeys(sizes)})
  assert [k.shape for k in layout.kernels] == [
      (-(-lks * size * 12 // 64) * 64, n * 12) for size, n in groups.items()]
  for kernel, size in zip(layout.kernels, groups):
    assert not np.any(kernel[lks * size * 12:])   # the padded rows are zeros
  assert layer.decode_weights(layout) is layout
  monkeypatch.setattr(sparse_qkv, 'ONE_PRODUCT', not one_product)
  step = jax.jit(lambda w, s, t: layer.pure_fn(t, w, s, None))
  runs = []
  for w in (weights, layout):
    outs, st = [], state
    for start, stop in [(0, 3)] + [(i, i + 1) for i in range(3, 7)]:
      out, st = step(w, st, x[:, start:stop])
      outs.append(np.concatenate([np.asarray(o) for o in jax.tree.leaves(out)], axis=-1))
    runs.append((np.concatenate(outs, axis=1), st))
  np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(runs[1][1], runs[0][1])


def test_module_conv_keeps_trax_layout_off_gpus_and_in_train_mode(monkeypatch):
  x = _inputs(1, 4, D_MODEL)
  predict = _init(ModuleConv(D_MODEL, S, 3, (3, 3, 1), 'predict'), x)
  train = _init(ModuleConv(D_MODEL, S, 3, (3, 3, 1), 'train'), x)
  monkeypatch.setattr(sparse_qkv.jax, 'default_backend', lambda: 'cpu')
  assert predict.decode_weights(predict.weights) is predict.weights   # DECODE_LAYOUT None
  monkeypatch.setattr(sparse_qkv.jax, 'default_backend', lambda: 'gpu')
  assert isinstance(predict.decode_weights(predict.weights), sparse_qkv.DecodeLayout)
  assert train.decode_weights(train.weights) is train.weights
  monkeypatch.setattr(sparse_qkv, 'DECODE_LAYOUT', False)
  assert predict.decode_weights(predict.weights) is predict.weights


def test_a_shared_module_conv_is_laid_out_once_in_its_first_place(monkeypatch):
  """trax gives a layer used twice its weights at its first place and a marker at the next;
  `decoding.laid_out` lays out the first and leaves the marker, which the layer's own
  (laid-out) weights then answer."""
  monkeypatch.setattr(sparse_qkv, 'DECODE_LAYOUT', True)
  conv = ModuleConv(D_MODEL, S, 3, (3,), 'predict')
  model = tl.Serial(conv, conv)
  x = _inputs(1, 1, D_MODEL)
  weights, state = model.init(shapes.signature(x))
  assert isinstance(weights[1], dict)   # trax's marker for the shared layer
  laid = decoding.laid_out(model, weights)
  assert isinstance(laid[0], sparse_qkv.DecodeLayout) and laid[1] is weights[1]
  out, _ = model.pure_fn(x, laid, state, None)
  expected, _ = model.pure_fn(x, weights, state, None)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('lks', [2, 3])
def test_a_laid_out_token_writes_its_state_in_place_from_the_fields(lks, monkeypatch):
  """STATE_FROM_FIELDS: a laid-out token's new state comes from its receptive fields, so that
  XLA writes it into the donated state without copying the old one first (a copy kernel per
  block at every token without it, on a GPU as on the CPU); the state and outputs are those
  of the window's."""
  monkeypatch.setattr(sparse_qkv, 'DECODE_LAYOUT', True)
  x = _inputs(1, 4, D_MODEL)
  layer = _init(ModuleConv(D_MODEL, S, lks, (3, 3, 1), 'predict'), x[:, :3])
  layout = layer.decode_weights(layer.weights)
  results, copies = {}, {}
  for on in (True, False):
    monkeypatch.setattr(sparse_qkv, 'STATE_FROM_FIELDS', on)   # a new function: traced anew
    program = jax.jit(lambda w, s, t: layer.pure_fn(t, w, s, None), donate_argnums=1)
    hlo = program.lower(layout, layer.state, x[:, 3:]).compile().as_text()
    copies[on] = len(re.findall(r'= \S+ copy\(', hlo))
    results[on] = program(layout, jnp.array(layer.state), x[:, 3:])
  assert copies[True] < copies[False], copies
  np.testing.assert_array_equal(results[True][1], results[False][1])
  for a, b in zip(results[True][0], results[False][0]):
    np.testing.assert_array_equal(a, b)


def _fields_case(batch, n_parts, n_modules, channels, lks, dtype):
  """Parts [P, B, S, M] and bias [S, M] in float32, a state [B, lks − 1, S, M] in dtype."""
  return (jnp.asarray(_inputs(n_parts, batch, n_modules, channels)),
          jnp.asarray(_inputs(n_modules, channels, seed=1)),
          jnp.asarray(_inputs(batch, lks - 1, n_modules, channels, seed=2), dtype))


@pytest.mark.parametrize('interpret', [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize('batch, n_parts, n_modules, channels, lks, size, pad, dtype', [
    (1, 4, 6, 24, 3, 3, 8, jnp.float32),      # channels in pieces (16 + 8), rows padded
    (2, 1, 4, 8, 2, 3, 0, jnp.float32),       # a batch, one part, no padding
    (1, 4, 5, 12, 4, 5, 4, jnp.float32),      # a wider module kernel, a longer window
    (1, 64, 64, 144, 3, 3, 48, jnp.float32),  # 17B's: 64 parts, 64 modules of 144, R 1344
    (1, 4, 6, 24, 3, 3, 8, jnp.bfloat16)])
def test_the_fields_kernel_builds_the_layers_receptive_fields_and_state(
    batch, n_parts, n_modules, channels, lks, size, pad, dtype, interpret):
  """`sparse_qkv_fields_kernel.fields` against `ModuleConv`'s own receptive fields and state
  of the window [state; Σ parts + bias] (in the state's dtype, as the layer casts its input):
  every slot, the zeros past the modules and after lks·k·M, the state moved on. Compiled on a
  GPU; elsewhere that case lowers for one (Triton's rules: 3 parts failed there)."""
  parts, bias, state = _fields_case(batch, n_parts, n_modules, channels, lks, dtype)
  rows = lks * size * channels + pad
  conv = ModuleConv(n_modules * channels, n_modules, lks, (size,), 'predict')
  y = (parts.sum(0) + bias).astype(dtype)
  window = jnp.concatenate([state, y[:, None]], axis=1)            # [B, lks, S, M]
  view = jnp.pad(window, [(0, 0), (0, 0), (size // 2, size // 2), (0, 0)])
  expected = conv._receptive_fields(view, 1, rows)[:, 0]  # pylint: disable=protected-access
  kernel = functools.partial(sparse_qkv_fields_kernel.fields, size=size, rows=rows,
                             interpret=interpret)
  out = kernel(parts, bias, state) if interpret else compiled_or_lowered(kernel, parts, bias,
                                                                         state)
  if out is None:
    return
  fields, new_state = out
  assert fields.dtype == new_state.dtype == dtype
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(fields, np.float32), np.asarray(expected, np.float32),
                             rtol=tolerance, atol=tolerance)
  np.testing.assert_array_equal(np.asarray(new_state[:, :-1], np.float32),
                                np.asarray(state[:, 1:], np.float32))
  np.testing.assert_allclose(np.asarray(new_state[:, -1], np.float32),
                             np.asarray(y, np.float32), rtol=tolerance, atol=tolerance)


def test_the_fields_kernel_refuses_rows_short_of_the_window_and_parts_of_odd_counts():
  parts, bias, state = _fields_case(1, 2, 4, 8, 3, jnp.float32)
  with pytest.raises(ValueError, match='rows must be at least'):
    sparse_qkv_fields_kernel.fields(parts, bias, state, 3, 64, interpret=True)
  parts, bias, state = _fields_case(1, 3, 4, 8, 3, jnp.float32)   # Triton's lowering refuses
  with pytest.raises(ValueError, match='parts: P = 3 must be a power of two'):
    sparse_qkv_fields_kernel.fields(parts, bias, state, 3, 72, interpret=True)


@pytest.mark.parametrize('use_bias', [True, False])
def test_the_multiplicative_layers_parts_add_up_to_its_token(use_bias):
  """`MultiplicativeDense.decode_parts`: the P parts of a token's product, plus the bias, are
  the layer's output for it."""
  x = _inputs(2, 1, 48)
  layer = _init(MultiplicativeDense(4, 48, use_bias=use_bias), x)
  parts, bias = layer.decode_parts(x, layer.weights, 6)
  assert parts.shape == (6, 2, 4, 12) and parts.dtype == jnp.float32
  np.testing.assert_allclose(parts.sum(0) + bias, layer(x).reshape(2, 4, 12), rtol=1e-5,
                             atol=1e-5)


def test_auto_takes_the_fields_kernel_on_a_gpu_from_min_d_model(monkeypatch):
  """Timed faster at 17B on an H100 (docs/decoding_gpu.md): 'auto' takes it from d_model
  8192, on a GPU only; with MIN_D_MODEL None, never."""
  assert sparse_qkv_fields_kernel.pays(9216) and not sparse_qkv_fields_kernel.pays(1024)
  monkeypatch.setattr(decode_kernels.jax, 'default_backend', lambda: 'gpu')
  assert decode_kernels.active('sparse_qkv_fields', sparse_qkv_fields_kernel.pays(9216)) == 'pallas'
  assert decode_kernels.active('sparse_qkv_fields', sparse_qkv_fields_kernel.pays(1024)) == 'xla'
  monkeypatch.setattr(sparse_qkv_fields_kernel, 'MIN_D_MODEL', None)
  assert not sparse_qkv_fields_kernel.pays(9216)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_the_fields_kernel_lowers_to_triton_for_a_gpu_at_17b(dtype):
  """Lowered for CUDA on any machine at 17B's shapes (64 parts, 64 modules of 144 channels in
  pieces, R 1344): Triton's rules hold, the kernel lets the next launch early, and its state
  output aliases the state operand (moved on in place, no copy)."""
  parts = jax.ShapeDtypeStruct((64, 1, 64, 144), jnp.float32)
  bias = jax.ShapeDtypeStruct((64, 144), dtype)
  state = jax.ShapeDtypeStruct((1, 2, 64, 144), dtype)
  text = lowered_for_an_h200(
      lambda p, b, s: sparse_qkv_fields_kernel.fields(p, b, s, 3, 1344), parts, bias, state)
  assert text.count('xla.gpu.triton') == 1
  assert text.count('griddepcontrol.launch_dependents') == 1
  assert 'output_operand_alias<output_tuple_indices = [1]' in text
