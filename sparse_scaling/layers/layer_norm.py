"""trax's LayerNorm, whose decoding calls take both statistics from one pass over x.

trax's `LayerNorm` takes the mean of x [..., d], then the mean of (x − mean)²: two reductions,
the second waiting on the first, so two kernels on a GPU before anything reads LayerNorm(x).
Decoding one token each is a kernel of a microsecond or two, costing what it does however
little it reads (docs/decoding_gpu.md). With ONE_PASS a call of one position per row
(x [batch, 1, d], a decoded token) takes

  mean = Σx / d,   variance = Σx² / d − mean²

both sums as one reduction of [x; x²] [2, ..., d]: one kernel wherever x comes from. As two
reductions of x (the form timed first), XLA joined them into one kernel where x was a
program's input but not where a product had made it: an 800M dense block, compiled for an
H100 (`bench/compile_only.py --blocks model`), is 14 kernels with the one reduction, 15 with
two and 16 with trax's, and looped in 0.0417-0.0446 ms against 0.0460-0.0463 with trax's on
an H100; one 17B FF+QKV block, whose attention block XLA's ops decode (16 kernels in both
forms), in 0.0531-0.0539 against 0.0557-0.0561 (docs/decoding_gpu.md, "A LayerNorm's
statistics in one pass"). Every other call, training's and a prompt's, is trax's own.

Rounding: the sums are float32's (x's dtype where wider), so the variance's error is about
float32's ε times log2(d) times Σx²/d, relative to the variance ε·log2(d)·(1 + mean²/variance):
about 1e-6 for a mean of up to a standard deviation, 1e-4 at ten. The variance is kept ≥ 0.
The weights are trax's (scale, bias), so checkpoints, `convert.py` and `params.py` see
trax's layer.
"""

import jax.numpy as jnp
from trax.layers import normalization

# Whether a call of one position per row takes its statistics in one pass (the note above).
ONE_PASS = True


class LayerNorm(normalization.LayerNorm):
  """trax's `LayerNorm(center, epsilon)`; one position per row in one pass (ONE_PASS)."""

  def forward(self, x):
    if not (ONE_PASS and self._center and x.ndim == 3 and x.shape[1] == 1):
      return super().forward(x)
    scale, bias = self.weights
    wide = jnp.promote_types(x.dtype, jnp.float32)
    wide_x = x.astype(wide)
    mean, square = jnp.mean(jnp.stack([wide_x, jnp.square(wide_x)]), axis=-1, keepdims=True)
    variance = jnp.maximum(square - mean * mean, 0.0)
    norm_inputs = (x - mean) / jnp.sqrt(variance + self._epsilon)
    return (norm_inputs * scale + bias).astype(jnp.result_type(x, scale, bias))
