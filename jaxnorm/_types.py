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


class TorchBatchNormState(NamedTuple):
  """Running statistics of batch norm with PyTorch's conventions.

  Used by :func:`jaxnorm.batch_norm` with ``running_stats="torch"``; the
  fields and their meaning are those of ``torch.nn.BatchNorm2d``'s buffers.

  Attributes:
    mean: running mean (``running_mean``), initialised to 0.
    var: running *unbiased* variance (``running_var``), initialised to 1.
    num_batches_tracked: int32 scalar, the number of training calls so far
      (``num_batches_tracked``); with ``momentum=None`` the running
      statistics are the cumulative average over these batches.
  """

  mean: jax.Array
  var: jax.Array
  num_batches_tracked: jax.Array
