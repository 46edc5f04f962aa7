"""Registers every public parameter and state NamedTuple for ``jax.export``.

``jax.export`` serializes a function whose inputs or outputs hold a
NamedTuple only if that type is registered, under a stable name; jaxnorm
does it once, at import, so that exporting a jitted layer needs nothing
from the user.
"""

from __future__ import annotations

import jax

from jaxnorm._evonorm import EvoNormB0State, EvoNormParams
from jaxnorm._frn import FilterResponseNormParams
from jaxnorm._mabn import MovingAverageBatchNormState
from jaxnorm._spectral_norm import SpectralNormState
from jaxnorm._switchable_norm import SwitchableNormParams
from jaxnorm._types import BatchNormState, NormParams, TorchBatchNormState

REGISTERED = (
  BatchNormState,
  EvoNormB0State,
  EvoNormParams,
  FilterResponseNormParams,
  MovingAverageBatchNormState,
  NormParams,
  SpectralNormState,
  SwitchableNormParams,
  TorchBatchNormState,
)

for _type in REGISTERED:
  jax.export.register_namedtuple_serialization(
    _type, serialized_name=f"jaxnorm.{_type.__name__}"
  )
