"""Parameter and state containers: plain NamedTuple pytrees."""

from __future__ import annotations

from typing import NamedTuple

import jax


class NormParams(NamedTuple):
  """Learned affine parameters of a normalization layer.

  Attributes:
    scale: per-feature multiplier ``gamma``, or ``None`` for no scale.
    bias: per-feature offset ``beta``, or ``None`` for no bias.
  """

  scale: jax.Array | None
  bias: jax.Array | None = None


class BatchNormState(NamedTuple):
  """Running statistics of batch normalization (float32).

  Attributes:
    mean: running mean, initialised to 0.
    var: running biased variance, initialised to 1.
  """

  mean: jax.Array
  var: jax.Array
