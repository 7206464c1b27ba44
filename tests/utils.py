"""Checks shared by the tests."""

import jax
import numpy as np
from trax import shapes


def assert_predict_equals_eval(model_fn, inputs, init_tokens=3, atol=1e-5, rng_seed=0,
                               shifted=False):
  """Decoding token by token in predict mode gives the eval-mode outputs.

  Args:
    model_fn: `mode -> layer`.
    inputs: [batch, length, ...] input of the layer.
    init_tokens: How many tokens the first predict call gets (a prompt).
    atol: Tolerance on every output element.
    rng_seed: Seed of the weights.
    shifted: The model shifts its input right in eval but not in predict mode (trax's LMs):
      predict mode is fed the shifted tokens, as a decoder does.
  """
  signature = shapes.signature(inputs)
  model_eval, model_predict = model_fn(mode='eval'), model_fn(mode='predict')
  rng = jax.random.PRNGKey(rng_seed)
  model_eval.init(signature, rng=rng)
  model_predict.init(signature, rng=rng)
  model_predict.weights = model_eval.weights
  expected = np.asarray(model_eval(inputs))
  if shifted:
    inputs = np.concatenate([np.zeros_like(inputs[:, :1]), inputs[:, :-1]], axis=1)
  length = inputs.shape[1]
  assert length >= init_tokens + 2, 'need a prompt and at least two decoded tokens'
  starts = [0] + list(range(init_tokens, length))
  for start, end in zip(starts, starts[1:] + [length]):
    got = np.asarray(model_predict(inputs[:, start:end]))
    np.testing.assert_allclose(got, expected[:, start:end], atol=atol, rtol=0,
                               err_msg=f'positions {start}:{end}')


def primitives_reading(fn, args, is_target):
  """Names of the primitives that read the arguments selected by `is_target`.

  Traces `fn(*args)` to a jaxpr and follows each selected argument through reshapes and into
  nested jitted calls, returning every primitive that consumes it.

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
        if inner is not None:
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
