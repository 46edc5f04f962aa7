"""jaxnorm: normalization layers for JAX as pure functions over explicit
parameter and state pytrees, with thin flax.linen and flax.nnx wrappers."""

from jaxnorm._batch_norm import batch_norm as batch_norm
from jaxnorm._batch_norm import batch_norm_init as batch_norm_init
from jaxnorm._group_norm import group_norm as group_norm
from jaxnorm._group_norm import group_norm_init as group_norm_init
from jaxnorm._group_norm import instance_norm as instance_norm
from jaxnorm._layer_norm import layer_norm as layer_norm
from jaxnorm._layer_norm import layer_norm_init as layer_norm_init
from jaxnorm._layer_norm import rms_norm as rms_norm
from jaxnorm._layer_norm import rms_norm_init as rms_norm_init
from jaxnorm._normalize import normalize as normalize
from jaxnorm._types import BatchNormState as BatchNormState
from jaxnorm._types import NormParams as NormParams

__version__ = "0.1.0"

__all__ = [
  "BatchNormState",
  "NormParams",
  "batch_norm",
  "batch_norm_init",
  "group_norm",
  "group_norm_init",
  "instance_norm",
  "layer_norm",
  "layer_norm_init",
  "normalize",
  "rms_norm",
  "rms_norm_init",
]
