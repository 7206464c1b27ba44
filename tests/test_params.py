"""models.params: weights counted by component, the components found by layer class."""

import numpy as np
import pytest
from trax import shapes

from sparse_scaling import models
from sparse_scaling.models.params import parameter_counts

TOKENS = shapes.ShapeDtype((2, 8), np.int32)
SMALL = dict(input_vocab_size=64, d_model=32, d_ff=64, n_encoder_layers=1, n_decoder_layers=1,
             n_heads=2, max_len=64, ff_sparsity=8, attention_sparsity=4, mode='eval')
# Counted when components were found by layer names (before layers/components.py).
MODELS = {
    'scaling_transformer': (
        lambda: models.ScalingTransformer(enc_dec_attention_sparsity=4, loss_sparsity=4,
                                          **SMALL),
        {'decoder/embedding': 2048, 'decoder/enc_dec_attention': 3112,
         'decoder/feed_forward': 4192, 'decoder/ff_controller': 448, 'decoder/layer_norm': 256,
         'decoder/output': 704, 'decoder/self_attention': 1784, 'encoder/embedding': 4096,
         'encoder/feed_forward': 4192, 'encoder/ff_controller': 448, 'encoder/layer_norm': 192,
         'encoder/self_attention': 4224, 'total': 25696}),
    'terraformer': (
        lambda: models.Terraformer(ff_use_sru=(1, 8), reversible_encoder=False, **SMALL),
        {'decoder/embedding': 6144, 'decoder/feed_forward': 4192, 'decoder/ff_controller': 448,
         'decoder/layer_norm': 320, 'decoder/output': 2112, 'decoder/self_attention': 3568,
         'decoder/sru': 768, 'encoder/feed_forward': 4192, 'encoder/ff_controller': 448,
         'encoder/layer_norm': 256, 'encoder/output': 1056, 'encoder/self_attention': 4224,
         'encoder/sru': 768, 'total': 28496}),
}


def _layers(layer):
  yield layer
  for sub in layer.sublayers:
    yield from _layers(sub)


@pytest.mark.parametrize('name', list(MODELS))
def test_renamed_layers_keep_their_weights_in_their_component(name):
  # The counts of the model as built, though every layer is named after another component:
  # classes decide, not names.
  build, expected = MODELS[name]
  model = build()
  for i, layer in enumerate(_layers(model)):
    layer._name = ('Encoder', 'Embedder', 'SparseFF_64_8', 'SelfAttention')[i % 4]  # pylint: disable=protected-access
  assert parameter_counts(model, (TOKENS, TOKENS)) == expected
