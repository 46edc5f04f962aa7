"""equinox modules: jaxnorm's normalization layers as ``eqx.Module``\\ s.

Every module holds no maths: it keeps its parameters as array fields and its
running statistics in an ``eqx.nn.State``, and calls the functional core in
:mod:`jaxnorm` on one unbatched, channels-first sample ``(C, *spatial)``.
Batch statistics are taken over the samples of a named ``jax.vmap``::

  model, state = eqx.nn.make_with_state(jaxnorm.equinox.BatchNorm)(
      64, axis_name="batch")
  y, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
                      out_axes=(0, None))(x, state)

equinox is an optional dependency: ``pip install jaxnorm[equinox]``.
"""

# Re-exports only. The classes are built in a private module of this package.

try:
  import equinox as _equinox  # noqa: F401
except ImportError as error:
  raise ImportError(
    "jaxnorm.equinox needs equinox, which is not installed: "
    "pip install jaxnorm[equinox]"
  ) from error

from jaxnorm.equinox._normalization import BatchNorm as BatchNorm
from jaxnorm.equinox._normalization import BatchRenorm as BatchRenorm
from jaxnorm.equinox._normalization import EvoNormB0 as EvoNormB0
from jaxnorm.equinox._normalization import EvoNormS0 as EvoNormS0
from jaxnorm.equinox._normalization import FilterResponseNorm as FilterResponseNorm
from jaxnorm.equinox._normalization import GroupNorm as GroupNorm
from jaxnorm.equinox._normalization import InstanceNorm as InstanceNorm
from jaxnorm.equinox._normalization import LayerNorm as LayerNorm
from jaxnorm.equinox._normalization import (
  MovingAverageBatchNorm as MovingAverageBatchNorm,
)
from jaxnorm.equinox._normalization import RMSNorm as RMSNorm
from jaxnorm.equinox._normalization import SwitchableNorm as SwitchableNorm

__all__ = [
  "BatchNorm",
  "BatchRenorm",
  "EvoNormB0",
  "EvoNormS0",
  "FilterResponseNorm",
  "GroupNorm",
  "InstanceNorm",
  "LayerNorm",
  "MovingAverageBatchNorm",
  "RMSNorm",
  "SwitchableNorm",
]
