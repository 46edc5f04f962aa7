"""flax.linen modules: drop-in replacements for flax's normalization layers.

Every module holds no maths: it creates flax variables and calls the
functional core in :mod:`jaxnorm`.
"""

# Re-exports only. Each family lives in a private module of this package.

from jaxnorm.linen._factory import NORM_NAMES as NORM_NAMES
from jaxnorm.linen._factory import make_norm as make_norm
from jaxnorm.linen._fold import fold_batch_norm as fold_batch_norm
from jaxnorm.linen._frozen import FrozenBatchNorm as FrozenBatchNorm
from jaxnorm.linen._frozen import freeze_batch_norm as freeze_batch_norm
from jaxnorm.linen._frozen import unfreeze_batch_norm as unfreeze_batch_norm
from jaxnorm.linen._normalization import BatchNorm as BatchNorm
from jaxnorm.linen._normalization import BatchRenorm as BatchRenorm
from jaxnorm.linen._normalization import EvoNormB0 as EvoNormB0
from jaxnorm.linen._normalization import EvoNormS0 as EvoNormS0
from jaxnorm.linen._normalization import FilterResponseNorm as FilterResponseNorm
from jaxnorm.linen._normalization import GroupNorm as GroupNorm
from jaxnorm.linen._normalization import InstanceNorm as InstanceNorm
from jaxnorm.linen._normalization import LayerNorm as LayerNorm
from jaxnorm.linen._normalization import (
  MovingAverageBatchNorm as MovingAverageBatchNorm,
)
from jaxnorm.linen._normalization import RMSNorm as RMSNorm
from jaxnorm.linen._normalization import SwitchableNorm as SwitchableNorm
from jaxnorm.linen._precise import recompute_batch_stats as recompute_batch_stats
from jaxnorm.linen._weights import SpectralNorm as SpectralNorm
from jaxnorm.linen._weights import WeightNorm as WeightNorm

__all__ = [
  "BatchNorm",
  "BatchRenorm",
  "EvoNormB0",
  "EvoNormS0",
  "FilterResponseNorm",
  "FrozenBatchNorm",
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
