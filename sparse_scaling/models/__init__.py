"""Models of the paper: `ScalingTransformerLM`, `ScalingTransformer` (§3) and `Terraformer` (§4).

The names here are plain Python functions: a call takes its arguments and the defaults, whatever
gin file was parsed. gin knows them as `sparse_scaling.models.<name>` (`mode` is not gin's):
importing this module registers them, and the configurable functions gin builds from a file
(`train.model = @sparse_scaling.models.ScalingTransformerLM`, `configs.configured_model()`)
are kept in `_GIN_CONFIGURABLES`, apart from the Python names.
"""
import gin

from sparse_scaling.models.scaling_transformer import ScalingTransformer
from sparse_scaling.models.scaling_transformer import ScalingTransformerLM
from sparse_scaling.models.terraformer import Terraformer

_GIN_CONFIGURABLES = {
    fn.__name__: gin.external_configurable(fn, module='sparse_scaling.models', denylist=['mode'])
    for fn in (ScalingTransformer, ScalingTransformerLM, Terraformer)}
