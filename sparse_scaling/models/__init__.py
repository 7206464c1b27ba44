"""Models of the paper, registered with gin under `sparse_scaling.models` (mode is not gin's)."""
import gin

from sparse_scaling.models import scaling_transformer
from sparse_scaling.models import terraformer


def _configurable(fn):
  return gin.external_configurable(fn, module='sparse_scaling.models', denylist=['mode'])


ScalingTransformer = _configurable(scaling_transformer.ScalingTransformer)
ScalingTransformerLM = _configurable(scaling_transformer.ScalingTransformerLM)
Terraformer = _configurable(terraformer.Terraformer)
