"""sparse_scaling's command line: train a gin-configured model, then decode a sample.

  python main.py --gin_file=tiny/lm.gin --output_dir=runs/tiny_lm \
      [--gin_file=more.gin] [--gin_param='train.steps=100']

A --gin_file is a path or a path under gin_configs/.

Training is trax's own `trainer_lib.train` (its `Loop` path), so gin names are trax's:
`train.steps`, `train.eval_frequency`, `train.optimizer`, `num_devices.value`, ..., and the models'
own (`ScalingTransformerLM.d_model`, ...). Training resumes from a checkpoint in output_dir.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import gin
from trax.supervised import trainer_lib

import sparse_scaling  # pylint: disable=unused-import  (applies the JAX compatibility shims)
from sparse_scaling import configs
from sparse_scaling import data  # pylint: disable=unused-import  (gin registrations)
from sparse_scaling import decoding
from sparse_scaling import models  # pylint: disable=unused-import  (gin registrations)

_GIN_FILE = flags.DEFINE_multi_string('gin_file', [], 'Gin config files; later ones win.')
_GIN_PARAM = flags.DEFINE_multi_string('gin_param', [], "Gin bindings, e.g. 'train.steps=10'.")
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Checkpoints, metrics and config.gin.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _OUTPUT_DIR.value:
    raise app.UsageError('--output_dir is required')
  logging.set_verbosity(logging.WARNING)  # trax's Loop prints its metrics itself
  try:
    configs.parse(_GIN_FILE.value, _GIN_PARAM.value)
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUTPUT_DIR.value, 'config.gin'), 'w') as f:
      f.write(gin.config_str())
    loop = trainer_lib.train(_OUTPUT_DIR.value)
    print(decoding.sample(configs.configured_model(), loop.model.weights))
  except (OSError, ValueError) as e:
    sys.exit('error: ' + ' '.join(str(e).split()))  # gin's messages span several lines


if __name__ == '__main__':
  app.run(main)
