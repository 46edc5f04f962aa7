"""Precise BN for nnx: running statistics recomputed over many batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnorm import _precise
from jaxnorm._progress import progress as _progress
from jaxnorm.nnx._build import BatchMoments
from jaxnorm.nnx._normalization import (
  BatchNorm,
  BatchRenorm,
  EvoNormB0,
  MovingAverageBatchNorm,
  SwitchableNorm,
)

_LAYERS = (BatchNorm, BatchRenorm, SwitchableNorm, EvoNormB0, MovingAverageBatchNorm)


def recompute_batch_stats(
  model: nnx.Module,
  batches: Iterable[Any],
  *,
  progress: bool = True,
  forward: Callable[[nnx.Module, Any], Any] | None = None,
  **call_kwargs: Any,
) -> None:
  r"""Sets every running statistic to that of all the batches together, in place.

  Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3):
  the running averages kept during training lag behind the weights, since
  they average the statistics of many past models. This calls
  ``model(batch, **call_kwargs)`` (jitted) on every batch with the jaxnorm
  layers that have running statistics in training mode, and sets those
  statistics to the mean and biased variance of the *union* of all the
  activations each layer saw:

  .. math::
    \mu = \frac{1}{n} \sum_i x_i, \qquad
    \sigma^2 = \frac{1}{n} \sum_i (x_i - \mu)^2

  over every element ``i`` of every batch (what one batch of all of them
  would give), merged per batch exactly (Chan et al.) in float64. fvcore's
  ``PreciseBN`` and ``torch.optim.swa_utils.update_bn`` instead average the
  per-batch means and variances, which leaves out the spread of the batch
  means and weights a short last batch like a full one.

  The layers: ``BatchNorm`` (ghost batches included: the union of every
  sample), ``SwitchableNorm``, ``BatchRenorm``, ``EvoNormB0`` (its
  variance) and ``MovingAverageBatchNorm`` (its ``var``, the second moment
  ``E[x^2]``). A ``BatchNorm(running_stats="torch")`` gets the unbiased
  variance, as PyTorch's running variance is. Every other module keeps its
  mode (dropout stays off if it was off), every batch runs with the
  running statistics as they were (so the order of the batches does not
  matter), and afterwards every module is in the mode it was in, with its
  parameters and its other state (``num_batches_tracked``, MABN's buffers)
  untouched. flax's own ``nnx.BatchNorm`` is not recomputed. Under SPMD
  ``jit``, with the batches sharded over a mesh, the union spans the
  devices as it is; for layers with ``axis_name``, pass a ``forward`` that
  runs the model under ``nnx.shard_map`` (the statistics are then summed
  over the named axis).

  Args:
    model: an nnx module holding jaxnorm layers with running statistics.
    batches: an iterable of model inputs, each passed as the first argument.
    progress: show a tqdm progress bar (if tqdm is installed).
    forward: ``forward(model, batch, **call_kwargs)`` runs the model on one
      batch (traced under ``jax.jit``); by default
      ``model(batch, **call_kwargs)``.
    **call_kwargs: passed to every call of ``model``.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``.
    ValueError: ``batches`` is empty, the model holds no such layer, or
      none of them ran.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> bn = jnx.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> bn.eval()
    >>> batches = [jax.random.normal(jax.random.key(i), (n, 3)) * 2 + 1
    ...            for i, n in enumerate((16, 16, 5))]
    >>> jnx.recompute_batch_stats(bn, batches, progress=False)
    >>> union = jnp.concatenate(batches)
    >>> bool(jnp.allclose(bn.var[...], union.var(0))), bn.use_running_average
    (True, True)
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
  layers = {
    path: module
    for path, module in nnx.iter_modules(model)
    if isinstance(module, _LAYERS)
  }
  if not layers:
    raise ValueError(
      "`model` holds no jaxnorm layer with running statistics (BatchNorm, "
      "SwitchableNorm, BatchRenorm, EvoNormB0, MovingAverageBatchNorm)."
    )
  modes = {path: module.use_running_average for path, module in layers.items()}
  try:
    for module in layers.values():
      module.use_running_average = False
      module._jaxnorm_moments = BatchMoments(jnp.zeros((3, module.var.size)))
    graphdef, state = nnx.split(model)

    @jax.jit
    def moments(state, batch):
      copy = nnx.merge(graphdef, state)
      if forward is None:
        copy(batch, **call_kwargs)
      else:
        forward(copy, batch, **call_kwargs)
      return {
        path: module._jaxnorm_moments[...]
        for path, module in nnx.iter_modules(copy)
        if path in layers
      }

    acc = _precise.Accumulator()
    seen = 0
    for batch in _progress(batches, enabled=progress, desc="recompute_batch_stats"):
      for path, rows in moments(state, batch).items():
        acc.add(path, rows)
      seen += 1
  finally:
    for path, module in layers.items():
      module.use_running_average = modes[path]
      del module._jaxnorm_moments
  _precise.check_batches(seen)
  if all(float(rows[0].real.sum()) == 0 for rows in acc.rows.values()):
    raise ValueError(
      "No jaxnorm layer with running statistics ran: check that `model` calls "
      "them on the batches."
    )
  for path, module in layers.items():
    if float(acc.rows[path][0].real.sum()) == 0:
      continue  # a layer this model never called keeps its statistics
    _, mean, var = acc.statistics(
      path,
      module.var.shape,
      unbiased=getattr(module, "running_stats", "flax") == "torch",
      second_moment=isinstance(module, MovingAverageBatchNorm),
    )
    module.var[...] = jnp.asarray(var, module.var.dtype)
    if hasattr(module, "mean"):
      module.mean[...] = jnp.asarray(mean, module.mean.dtype)
