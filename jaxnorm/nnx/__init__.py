"""flax.nnx modules: drop-in replacements for flax's normalization layers.

Every module holds no maths: it creates nnx variables and calls the
functional core in :mod:`jaxnorm`.
"""

# Re-exports only. Each family lives in a private module of this package.

from jaxnorm.nnx._build import GradMoments as GradMoments
from jaxnorm.nnx._factory import NORM_NAMES as NORM_NAMES
from jaxnorm.nnx._factory import make_norm as make_norm
from jaxnorm.nnx._fold import fold_batch_norm as fold_batch_norm
from jaxnorm.nnx._frozen import FrozenBatchNorm as FrozenBatchNorm
from jaxnorm.nnx._frozen import freeze_batch_norm as freeze_batch_norm
from jaxnorm.nnx._frozen import unfreeze_batch_norm as unfreeze_batch_norm
from jaxnorm.nnx._normalization import BatchNorm as BatchNorm
from jaxnorm.nnx._normalization import BatchRenorm as BatchRenorm
from jaxnorm.nnx._normalization import EvoNormB0 as EvoNormB0
from jaxnorm.nnx._normalization import EvoNormS0 as EvoNormS0
from jaxnorm.nnx._normalization import FilterResponseNorm as FilterResponseNorm
from jaxnorm.nnx._normalization import GroupNorm as GroupNorm
from jaxnorm.nnx._normalization import InstanceNorm as InstanceNorm
from jaxnorm.nnx._normalization import LayerNorm as LayerNorm
from jaxnorm.nnx._normalization import MovingAverageBatchNorm as MovingAverageBatchNorm
from jaxnorm.nnx._normalization import RMSNorm as RMSNorm
from jaxnorm.nnx._normalization import SwitchableNorm as SwitchableNorm
from jaxnorm.nnx._precise import recompute_batch_stats as recompute_batch_stats
from jaxnorm.nnx._weights import SpectralNorm as SpectralNorm
from jaxnorm.nnx._weights import WeightNorm as WeightNorm

__all__ = [
  "BatchNorm",
  "BatchRenorm",
  "EvoNormB0",
  "EvoNormS0",
  "FilterResponseNorm",
  "FrozenBatchNorm",
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
  "fold_batch_norm",
  "freeze_batch_norm",
  "make_norm",
  "recompute_batch_stats",
  "unfreeze_batch_norm",
]
