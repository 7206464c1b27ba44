"""Checks shared by the tests."""

import contextlib
import functools
import importlib
import importlib.util
import os
import pathlib

from absl import flags
import gin
import jax
import numpy as np
import pytest
from trax import shapes

from sparse_scaling import configs
from sparse_scaling import training
from sparse_scaling.models import ScalingTransformer
from sparse_scaling.models import Terraformer


# Tiny sparse encoder-decoders, as decoding tests build them, and encoder inputs for them
# (rows of true length 4 and 3, padded with 0).
ENCODER_DECODERS = {
    'scaling_transformer': functools.partial(
        ScalingTransformer, input_vocab_size=32, d_model=16, d_ff=64, n_encoder_layers=1,
        n_decoder_layers=2, n_heads=2, max_len=32, dropout=0.0, ff_sparsity=8,
        attention_sparsity=4, enc_dec_attention_sparsity=4, loss_sparsity=4),
    'terraformer': functools.partial(
        Terraformer, input_vocab_size=32, d_model=16, d_ff=64, n_encoder_layers=1,
        n_decoder_layers=1, n_heads=2, max_len=32, dropout=0.0, ff_sparsity=8,
        attention_sparsity=4, loss_sparsity=4, ff_use_sru=(1, 4)),
}
ENCODER_INPUTS = np.array([[4, 5, 6, 7, 0], [8, 9, 3, 0, 0]], np.int32)


def initialized(layer, x, seed=0):
  """`layer`, initialized for input `x` with weights of `seed`."""
  layer.init(shapes.signature(x), rng=jax.random.PRNGKey(seed))
  return layer


def gpu_marks(reason):
  """The marks of a check that needs a GPU (`pytest.param(..., marks=gpu_marks(...))`): skipped
  elsewhere for `reason`, and marked `gpu`, so that on a GPU machine `pytest -o addopts=""
  -m gpu` runs every check that a CPU skips."""
  return [pytest.mark.gpu, pytest.mark.skipif(jax.default_backend() != 'gpu', reason=reason)]


def needs_gpu(reason):
  """`gpu_marks(reason)` as a test's decorator."""
  return lambda test: functools.reduce(lambda marked, mark: mark(marked), gpu_marks(reason), test)


def compiled_or_lowered(fn, *args):
  """A kernel's compiled case (marked `gpu`): on a GPU, jit(fn)(*args); elsewhere None, once
  jit(fn) lowered for an H200 (`lowered_for_an_h200`) holds a Triton kernel: Pallas' Triton
  lowering runs there, so its rules (such as arrays of power-of-2 sizes) are checked on any
  machine, for each case a GPU would compile."""
  if jax.default_backend() == 'gpu':
    return jax.jit(fn)(*args)
  assert 'xla.gpu.triton' in lowered_for_an_h200(fn, *args)
  return None


def lowered_for_an_h200(fn, *args):
  """The text of jit(fn)(*args) lowered for CUDA on any machine. The Triton lowering of jax
  >= 0.11 asks the default device which GPU it is; without one an abstract H200 answers (jax
  0.10 asks nothing and ignores it), and on a GPU the GPU itself (under an abstract device
  jax 0.11.2 cannot lower some reductions there). The abstract mesh's axis is Auto: under
  jax 0.12's default, Explicit, a reduction inside a kernel fails to lower. Lower inside
  `decode_kernels.use(...)` to pick kernels."""
  if jax.default_backend() == 'gpu':
    return jax.jit(fn).trace(*args).lower().as_text()
  h200 = jax.sharding.AbstractDevice(device_kind='NVIDIA H200', num_cores=None, platform='cuda')
  with jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ('x',), axis_types=(jax.sharding.AxisType.Auto,),
                                abstract_device=h200)):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()


def random_inputs(*shape, seed=0):
  """Standard normal float32 array of `shape`."""
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def assert_predict_equals_eval(model_fn, inputs, init_tokens=3, atol=1e-5, rng_seed=0,
                               shifted=False, seq_input=None):
  """Decoding token by token in predict mode gives the eval-mode outputs.

  Args:
    model_fn: `mode -> layer`.
    inputs: [batch, length, ...] input of the layer, or a tuple of inputs of which
      `seq_input` is decoded along axis 1 (the others are fed whole at every step).
    init_tokens: How many tokens the first predict call gets (a prompt).
    atol: Tolerance on every output element.
    rng_seed: Seed of the weights.
    shifted: The model shifts its input right in eval but not in predict mode (trax's LMs):
      predict mode is fed the shifted tokens, as a decoder does.
    seq_input: Index of the decoded input when `inputs` is a tuple.
  """
  signature = shapes.signature(inputs)
  model_eval, model_predict = model_fn(mode='eval'), model_fn(mode='predict')
  rng = jax.random.PRNGKey(rng_seed)
  model_eval.init(signature, rng=rng)
  model_predict.init(signature, rng=rng)
  # Flat copy: predict mode wraps cached parts (encoder, K/V) in extra layers.
  model_predict.weights = jax.tree.unflatten(jax.tree.structure(model_predict.weights),
                                             jax.tree.leaves(model_eval.weights))
  expected = _as_list(model_eval(inputs))
  inputs = list(inputs) if seq_input is not None else [inputs]
  seq = inputs[seq_input or 0]
  if shifted:
    seq = np.concatenate([np.zeros_like(seq[:, :1]), seq[:, :-1]], axis=1)
  length = seq.shape[1]
  assert length >= init_tokens + 2, 'need a prompt and at least two decoded tokens'
  starts = [0] + list(range(init_tokens, length))
  for start, end in zip(starts, starts[1:] + [length]):
    inputs[seq_input or 0] = seq[:, start:end]
    got = _as_list(model_predict(tuple(inputs) if seq_input is not None else inputs[0]))
    for i, (g, e) in enumerate(zip(got, expected)):
      if shifted and seq_input is not None and i > 0:
        continue  # the pass-through decoder tokens: shifted by construction
      np.testing.assert_allclose(g, e[:, start:end], atol=atol, rtol=0,
                                 err_msg=f'output {i}, positions {start}:{end}')


def _as_list(outputs):
  outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
  return [np.asarray(o) for o in outputs]


def primitives_reading(fn, args, is_target):
  """Names of the primitives that read the arguments selected by `is_target`.

  Traces `fn(*args)` to a jaxpr and follows each selected argument through reshapes and into
  nested jitted calls, returning every primitive that consumes it (a Pallas kernel counts as
  one consumer, 'pallas_call': what it does with its refs is its own).

  Args:
    fn: A function of `args`.
    args: Its arguments (pytrees of arrays).
    is_target: `abstract value -> bool`, selects the arguments (leaves) to follow.
  """
  closed = jax.make_jaxpr(fn)(*args)
  found = set()

  def follow(jaxpr, variables):
    for eqn in jaxpr.eqns:
      for position, var in enumerate(eqn.invars):
        if not any(var is v for v in variables):
          continue
        inner = eqn.params.get('jaxpr')
        if inner is not None and eqn.primitive.name != 'pallas_call':
          follow(getattr(inner, 'jaxpr', inner), [inner_invar(inner, position)])
        elif eqn.primitive.name == 'reshape':
          follow(jaxpr, eqn.outvars)
        else:
          found.add(eqn.primitive.name)

  def inner_invar(inner, position):
    return getattr(inner, 'jaxpr', inner).invars[position]

  jaxpr = closed.jaxpr
  follow(jaxpr, [v for v in jaxpr.invars if is_target(v.aval)])
  return found


# main.py's tiny LM (gin_configs/tiny/lm.gin) shrunk to train a step in about a second.
TINY_LM = ['train.eval_frequency=2', 'train.eval_steps=1', 'train.log_frequency=1',
           'embedded_lm_inputs.batch_size=4', 'embedded_lm_inputs.seq_len=32',
           'ScalingTransformerLM.n_layers=1', 'sample.max_new_tokens=4']


def parse_tiny_lm(cache_dir, *bindings, steps=1):
  """Parses the TINY_LM's gin config (and `bindings`), its vocabulary cached in `cache_dir`."""
  gin.clear_config()
  cache = [f'embedded_lm_inputs.cache_dir = {str(cache_dir)!r}',
           f'embedded_vocab.cache_dir = {str(cache_dir)!r}']
  configs.parse(['tiny/lm.gin'], TINY_LM + cache + [f'train.steps={steps}', *bindings])


def train_tiny_lm(output_dir, cache_dir, *bindings, steps, evaluate_only=False):
  """Trains (or evaluates) the TINY_LM in this process, as main.py does; returns the Loop."""
  parse_tiny_lm(cache_dir, *bindings, steps=steps)
  return training.train(str(output_dir), evaluate_only=evaluate_only)


def snapshot(directory):
  """{path: bytes} of every file below `directory`."""
  return {p: p.read_bytes() for p in pathlib.Path(directory).rglob('*') if p.is_file()}


# --- command lines ----------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_FLAGS = ('help', 'helpshort', 'helpfull', 'helpxml', 'only_check_args')


@contextlib.contextmanager
def _defining_into(flag_values):
  """absl's DEFINE_* functions and validators define into `flag_values`, not the process's
  FLAGS."""
  saved = {name: getattr(flags, name) for name in dir(flags)
           if name.startswith('DEFINE') or name == 'register_validator'}
  try:
    for name, define in saved.items():
      setattr(flags, name, functools.partial(define, flag_values=flag_values))
    yield
  finally:
    for name, define in saved.items():
      setattr(flags, name, define)


@functools.lru_cache(maxsize=None)
def program_flags(program):
  """A FlagValues with the flags `program` defines: a module's `define_flags` or
  `_define_flags`, main.py's when it is loaded."""
  flag_values = flags.FlagValues()
  with _defining_into(flag_values):
    if program in ('main.py', 'sparse_scaling'):
      spec = importlib.util.spec_from_file_location('_main_flags', os.path.join(ROOT, 'main.py'))
      spec.loader.exec_module(importlib.util.module_from_spec(spec))
    else:
      module = importlib.import_module(program)
      define = getattr(module, 'define_flags', None) or getattr(module, '_define_flags')
      define()
  return flag_values


def parsed_flags(program, *args):
  """`program`'s flags parsed from the command line `args`, for a program's own checks of
  flags that parse but do not go together (`check_flags`; that such an error is one line and
  a failing status, through `bench.common.run`, tests/test_command_lines.py runs)."""
  flag_values = program_flags(program)   # one per process
  flag_values.unparse_flags()
  flag_values(['program', *args])
  return flag_values


def flag_error(program, args):
  """Why `program args` would not parse, or None (absl.app's --help and the like aside)."""
  flag_values = program_flags(program)
  flag_values.unparse_flags()
  args = [a for a in args if a.lstrip('-').split('=')[0] not in APP_FLAGS]
  try:
    flag_values(['program'] + args)
  except Exception as error:  # pylint: disable=broad-except
    return str(error).splitlines()[0]
  return None
