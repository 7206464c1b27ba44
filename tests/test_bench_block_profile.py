"""The block profile walks a model's layer tree and prices each layer against its floor."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np
import pytest

from sparse_scaling.bench import block_profile
from sparse_scaling.bench import table1
from sparse_scaling.layers import decode_kernels

TINY = dict(d_model=32, d_ff=128, n_heads=2, vocab_size=64, ff_sparsity=(8, 4),
            attention_sparsity=4, loss_sparsity=4, length_kernel_size=3)


FAST = dict(min_runs=1, min_seconds=0.0)  # timing is not what these tests check


@pytest.mark.parametrize('impl,depth,kernel', [('ours', 4, 'auto'), ('ours', 4, 'interpret'),
                                               ('trax', 1, 'auto')])
def test_walk_passes_each_layer_its_inputs_and_ends_with_the_step_output(impl, depth, kernel):
  # kernel: how Sparse FF decodes ('auto': as on this backend, the Pallas kernel on a GPU;
  # 'interpret': that kernel on any backend).
  model = table1.build(impl, TINY, 1, 16)
  model.weights, model.state = table1.random_weights_and_state(model, 'float32')
  tokens = jnp.ones((1, 1), jnp.int32)
  with decode_kernels.use(kernel):
    rows, stack = block_profile.profile(model, (tokens,), depth, **FAST)
  # Layer by layer, the walk ends where the whole step does: a layer given wrong inputs is off
  # by O(1). The tolerance leaves room for the rounding of other fusions (each layer compiled
  # alone against the whole step), which on a GPU exceeds the CPU's 1e-6.
  with decode_kernels.use(kernel):
    logits = model.pure_fn(tokens, model.weights, model.state, jax.random.PRNGKey(0))[0]
  np.testing.assert_allclose(stack[0], logits, rtol=1e-4, atol=1e-4)
  assert stack[0].shape == (1, 1, TINY['vocab_size'])
  assert rows[0]['level'] == 0 and all(r['level'] > 0 for r in rows[1:])
  assert not [r for r in rows[1:] if r['layer'] in block_profile.PLUMBING]
  for key, low in (('seconds', 1e-12), ('flops', 0), ('bytes', 0)):
    assert all(r[key] >= low for r in rows), [(r['layer'], r[key]) for r in rows]
  assert rows[0]['bytes'] > 0
  if impl == 'ours':
    level = {r['layer']: r['level'] for r in reversed(rows)}  # first occurrences
    assert level['SparseQKVAttention_4'] < level['MultiplicativeDense_4'] == level['ModuleConv']
    # Predict mode's Sparse FF is one layer. W1 and W2 are 16 KB each; one token reads 16 of
    # their 128 rows, by gathers or in the kernel's loads.
    assert next(r['bytes'] for r in rows if r['layer'] == 'SparseFF_128_8') < 12 * 1024


def test_markdown_names_the_bound_of_each_shown_layer():
  rows = [dict(shape='17b', variant='ffqkv', impl='ours', layer=name, level=level,
               seconds=seconds, flops=flops, bytes=nbytes, floor_seconds=floor)
          for name, level, seconds, flops, nbytes, floor in [
              ('ScalingTransformerLM', 0, 1e-2, 2e8, 1e8, 2e-3),
              ('MultiplicativeDense_64', 2, 5e-3, 1.7e8, 1e7, 1.7e-3),
              ('LayerNorm', 2, 1e-5, 1e4, 1e4, 1e-7)]]
  text = block_profile.markdown(rows, 0.02, bandwidth=50e9, rate=100e9)
  assert '| &nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;&nbsp;MultiplicativeDense_64 | 5.000 |' in text
  assert 'compute | 2.9x |' in text
  assert 'LayerNorm' not in text  # under 2% of the step


def test_flops_unknown_to_the_compiled_count_come_from_the_lowered_program():
  # On GPUs XLA's compiled cost analysis gives -1 for a product run by cuBLAS; the count of the
  # program before compilation stands in.
  class Lowered:
    def __init__(self, compiled, lowered):
      self._costs = compiled, lowered

    def compile(self):
      return type('Compiled', (), {'cost_analysis': lambda _: self._costs[0]})()

    def cost_analysis(self):
      return self._costs[1]

  assert block_profile.flop_count(Lowered({'flops': 8.0}, {'flops': 9.0})) == 8.0
  assert block_profile.flop_count(Lowered({'flops': -1.0}, {'flops': 9.0})) == 9.0
  assert block_profile.flop_count(Lowered({'flops': -1.0}, None)) == 0.0
  f = jax.jit(lambda a, b: a @ b).lower(jnp.ones((4, 8)), jnp.ones((8, 2)))
  assert block_profile.flop_count(f) == 2 * 4 * 8 * 2


def test_matmul_rate_is_positive():
  assert block_profile.matmul_rate(128) > 1e6


def test_bytes_read_counts_only_the_gathered_rows_of_a_gathered_array():
  table, rows, x = jnp.ones((1000, 8)), jnp.array([3, 7]), jnp.ones((8,))
  gather = lambda t, r: jnp.take(t.reshape(1000, 8), r, axis=0)  # through a reshape and a jit
  assert block_profile.bytes_read(gather, table, rows) == 2 * 8 * 4 + 2 * 4
  assert block_profile.bytes_read(lambda t, r: gather(t, r) + t[:2], table, rows) == (
      1000 * 8 * 4 + 2 * 4)  # also read another way: whole
  assert block_profile.bytes_read(jnp.dot, table, x) == (1000 * 8 + 8) * 4


def test_bytes_read_of_a_program_with_compiler_options():
  """Decoding programs carry XLA options on a GPU (`decoding.jit`), and JAX refuses to nest
  such a jit in another trace: the profile traces the program itself."""
  table, rows = jnp.ones((1000, 8)), jnp.array([3, 7])
  program = jax.jit(lambda t, r: jnp.take(t, r, axis=0),
                    compiler_options={'xla_backend_optimization_level': 0})
  assert block_profile.bytes_read(program, table, rows) == 2 * 8 * 4 + 2 * 4


def test_pallas_bytes_count_what_a_kernels_programs_load_and_store():
  # 4 programs: each loads its 8 floats of x, one row of a 1000-row table (a gather), and in
  # program 0 only (pl.when, counted as if every program took it) all of y; each stores 8.
  def kernel(x_ref, table_ref, rows_ref, y_ref, out_ref):
    i = pl.program_id(0)
    out_ref[pl.ds(i * 8, 8)] = x_ref[pl.ds(i * 8, 8)] + table_ref[rows_ref[i], :]

    @pl.when(i == 0)
    def _():
      out_ref[pl.ds(0, 8)] = y_ref[pl.ds(0, 8)] + jnp.sum(y_ref[...])

  def call(x, table, rows, y):
    return pl.pallas_call(kernel, grid=(4,), out_shape=jax.ShapeDtypeStruct((32,), x.dtype),
                          interpret=True)(x, table, rows, y)

  found = block_profile.pallas_bytes(jax.make_jaxpr(jax.jit(call))(
      jnp.ones(32), jnp.ones((1000, 8)), jnp.arange(4), jnp.ones(32)))
  x, table, rows = 32 * 4, 4 * 8 * 4, 4 * 4     # x whole, 4 rows of the table, the indices
  y = min(4 * (32 + 8) * 4, 32 * 4)              # capped at what y holds
  out = min(4 * (8 + 8) * 4, 32 * 4)
  assert found == {('kernel', 4): x + table + rows + y + out}
