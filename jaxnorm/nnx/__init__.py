"""flax.nnx modules: drop-in replacements for flax's normalization layers.

Every module holds no maths: it creates nnx variables and calls the
functional core in :mod:`jaxnorm`.
"""

# Re-exports only. Each family lives in a private module of this package.

from jaxnorm.nnx._core import BatchNorm as BatchNorm
from jaxnorm.nnx._core import GroupNorm as GroupNorm
from jaxnorm.nnx._core import InstanceNorm as InstanceNorm
from jaxnorm.nnx._core import LayerNorm as LayerNorm
from jaxnorm.nnx._core import RMSNorm as RMSNorm
from jaxnorm.nnx._factory import NORM_NAMES as NORM_NAMES
from jaxnorm.nnx._factory import make_norm as make_norm
from jaxnorm.nnx._zoo_a import BatchRenorm as BatchRenorm
from jaxnorm.nnx._zoo_a import FilterResponseNorm as FilterResponseNorm
from jaxnorm.nnx._zoo_a import SwitchableNorm as SwitchableNorm
from jaxnorm.nnx._zoo_b import EvoNormB0 as EvoNormB0
from jaxnorm.nnx._zoo_b import EvoNormS0 as EvoNormS0
from jaxnorm.nnx._zoo_b import GradMoments as GradMoments
from jaxnorm.nnx._zoo_b import MovingAverageBatchNorm as MovingAverageBatchNorm
from jaxnorm.nnx._zoo_b import SpectralNorm as SpectralNorm
from jaxnorm.nnx._zoo_b import WeightNorm as WeightNorm

__all__ = [
  "BatchNorm",
  "BatchRenorm",
  "EvoNormB0",
  "EvoNormS0",
  "FilterResponseNorm",
  "GradMoments",
  "GroupNorm",
  "InstanceNorm",
  "LayerNorm",
  "MovingAverageBatchNorm",
  "NORM_NAMES",
  "RMSNorm",
  "SpectralNorm",
  "SwitchableNorm",
  "WeightNorm",
  "make_norm",
]
