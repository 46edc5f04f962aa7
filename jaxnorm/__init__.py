"""jaxnorm: normalization layers for JAX as pure functions over explicit
parameter and state pytrees, with thin flax.linen and flax.nnx wrappers."""

import importlib.metadata as _metadata  # noqa: I001

# Registers the NamedTuples imported below for jax.export serialization.
from jaxnorm import _export  # noqa: E402, F401, I001
from jaxnorm._batch_norm import batch_norm as batch_norm
from jaxnorm._batch_norm import batch_norm_init as batch_norm_init
from jaxnorm._batch_renorm import batch_renorm as batch_renorm
from jaxnorm._batch_renorm import batch_renorm_init as batch_renorm_init
from jaxnorm._batch_renorm import batch_renorm_schedule as batch_renorm_schedule
from jaxnorm._benchmark import BenchmarkResult as BenchmarkResult
from jaxnorm._benchmark import benchmark as benchmark
from jaxnorm._checks import checkify_checks as checkify_checks
from jaxnorm._evonorm import EvoNormB0State as EvoNormB0State
from jaxnorm._evonorm import EvoNormParams as EvoNormParams
from jaxnorm._evonorm import evonorm_b0 as evonorm_b0
from jaxnorm._evonorm import evonorm_b0_init as evonorm_b0_init
from jaxnorm._evonorm import evonorm_s0 as evonorm_s0
from jaxnorm._evonorm import evonorm_s0_init as evonorm_s0_init
from jaxnorm._frn import FilterResponseNormParams as FilterResponseNormParams
from jaxnorm._frn import filter_response_norm as filter_response_norm
from jaxnorm._frn import filter_response_norm_init as filter_response_norm_init
from jaxnorm._group_norm import group_norm as group_norm
from jaxnorm._group_norm import group_norm_init as group_norm_init
from jaxnorm._group_norm import instance_norm as instance_norm
from jaxnorm._layer_norm import layer_norm as layer_norm
from jaxnorm._layer_norm import layer_norm_init as layer_norm_init
from jaxnorm._layer_norm import rms_norm as rms_norm
from jaxnorm._layer_norm import rms_norm_init as rms_norm_init
from jaxnorm._mabn import MovingAverageBatchNormState as MovingAverageBatchNormState
from jaxnorm._mabn import apply_mabn_grad_moments as apply_mabn_grad_moments
from jaxnorm._mabn import moving_average_batch_norm as moving_average_batch_norm
from jaxnorm._mabn import (
  moving_average_batch_norm_init as moving_average_batch_norm_init,
)
from jaxnorm._normalize import normalize as normalize
from jaxnorm._spectral_norm import SpectralNormState as SpectralNormState
from jaxnorm._spectral_norm import spectral_norm as spectral_norm
from jaxnorm._spectral_norm import spectral_norm_init as spectral_norm_init
from jaxnorm._switchable_norm import SwitchableNormParams as SwitchableNormParams
from jaxnorm._switchable_norm import switchable_norm as switchable_norm
from jaxnorm._switchable_norm import switchable_norm_init as switchable_norm_init
from jaxnorm._types import BatchNormState as BatchNormState
from jaxnorm._types import NormParams as NormParams
from jaxnorm._weight_norm import weight_norm as weight_norm
from jaxnorm._weight_norm import weight_norm_init as weight_norm_init
from jaxnorm._fold import fold_batch_norm as fold_batch_norm
from jaxnorm._torch_port import from_torch_state_dict as from_torch_state_dict
from jaxnorm._types import TorchBatchNormState as TorchBatchNormState

# One source for the version: the package metadata (pyproject.toml).
try:
  __version__ = _metadata.version("jaxnorm")
except _metadata.PackageNotFoundError:  # imported from a source tree
  __version__ = "0+unknown"

__all__ = [
  "BatchNormState",
  "BenchmarkResult",
  "EvoNormB0State",
  "EvoNormParams",
  "FilterResponseNormParams",
  "MovingAverageBatchNormState",
  "NormParams",
  "SpectralNormState",
  "SwitchableNormParams",
  "TorchBatchNormState",
  "apply_mabn_grad_moments",
  "batch_norm",
  "batch_norm_init",
  "batch_renorm",
  "batch_renorm_init",
  "batch_renorm_schedule",
  "benchmark",
  "checkify_checks",
  "evonorm_b0",
  "evonorm_b0_init",
  "evonorm_s0",
  "evonorm_s0_init",
  "filter_response_norm",
  "filter_response_norm_init",
  "fold_batch_norm",
  "from_torch_state_dict",
  "group_norm",
  "group_norm_init",
  "instance_norm",
  "layer_norm",
  "layer_norm_init",
  "moving_average_batch_norm",
  "moving_average_batch_norm_init",
  "normalize",
  "rms_norm",
  "rms_norm_init",
  "spectral_norm",
  "spectral_norm_init",
  "switchable_norm",
  "switchable_norm_init",
  "weight_norm",
  "weight_norm_init",
]
