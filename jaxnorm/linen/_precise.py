"""Precise BN for linen: running statistics recomputed over many batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import unfreeze

from jaxnorm import _precise
from jaxnorm._progress import progress as _progress


def recompute_batch_stats(
  apply_fn: Callable[..., Any],
  variables: Mapping[str, Any],
  batches: Iterable[Any],
  *,
  progress: bool = True,
  **apply_kwargs: Any,
) -> dict[str, Any]:
  r"""Sets every running statistic to that of all the batches together.

  Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", §3):
  the running averages kept during training lag behind the weights, since
  they average the statistics of many past models. This runs the model in
  training mode over ``batches``, one jitted ``apply_fn(variables, batch,
  mutable=[...], **apply_kwargs)`` per batch, and sets the running
  statistics of every jaxnorm layer that has them to the mean and biased
  variance of the *union* of all the activations that layer saw:

  .. math::
    \mu = \frac{1}{n} \sum_i x_i, \qquad
    \sigma^2 = \frac{1}{n} \sum_i (x_i - \mu)^2

  over every element ``i`` of every batch (what one batch of all of them
  would give), merged per batch exactly (Chan et al.) in float64. fvcore's
  ``PreciseBN`` and ``torch.optim.swa_utils.update_bn`` instead average the
  per-batch means and variances, which leaves out the spread of the batch
  means and weights a short last batch like a full one.

  The layers: ``BatchNorm`` (ghost batches included: the union of every
  sample), ``SwitchableNorm``, ``BatchRenorm`` and ``EvoNormB0`` (mean and
  variance, or the variance alone for EvoNorm-B0), and
  ``MovingAverageBatchNorm``, whose running ``var`` is the second moment
  ``E[x^2]`` of the union. A ``BatchNorm(running_stats="torch")`` gets the
  unbiased variance, as PyTorch's running variance is. Every other
  variable (parameters, ``num_batches_tracked``, MABN's buffers) is left
  as it was, and every batch runs with the running statistics given, so
  the order of the batches does not matter. Masks passed by the model are
  honoured; with ``axis_name`` (under ``shard_map`` or ``pmap``) or under
  SPMD ``jit`` with the batches sharded, the union spans the devices.

  Args:
    apply_fn: ``model.apply``, or any function with its signature that
      forwards ``mutable``; wrap it to run under ``jax.shard_map``.
    variables: the model's variables, with a ``batch_stats`` collection.
    batches: an iterable of model inputs, each passed as the argument after
      ``variables`` (e.g. ``(x for x, _ in loader)``).
    progress: show a tqdm progress bar (if tqdm is installed).
    **apply_kwargs: passed to every call: what puts the model in training
      mode (``train=True``, ``use_running_average=False``...) and any other
      argument it needs.

  Returns:
    A new variables dict, with the recomputed statistics in
    ``batch_stats`` and every other collection as given.

  Raises:
    ValueError: ``batches`` is empty, ``variables`` has no ``batch_stats``,
      or no jaxnorm layer with running statistics ran in training mode.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> bn = jnn.BatchNorm(use_running_average=False)
    >>> batches = [jax.random.normal(jax.random.key(i), (n, 3)) * 2 + 1
    ...            for i, n in enumerate((16, 16, 5))]
    >>> variables = bn.init(jax.random.key(0), batches[0])
    >>> variables = jnn.recompute_batch_stats(
    ...     bn.apply, variables, batches, progress=False)
    >>> union = jnp.concatenate(batches)
    >>> bool(jnp.allclose(variables["batch_stats"]["var"], union.var(0)))
    True
  """
  variables = unfreeze(variables)
  if not isinstance(variables, dict) or "batch_stats" not in variables:
    raise ValueError(
      "`variables` has no 'batch_stats' collection: there are no running "
      "statistics to recompute."
    )

  @jax.jit
  def moments(variables, batch):
    _, updates = apply_fn(
      variables, batch, mutable=["batch_stats", _precise.COLLECTION], **apply_kwargs
    )
    return updates.get(_precise.COLLECTION, {})

  acc = _precise.Accumulator()
  seen = 0
  for batch in _progress(batches, enabled=progress, desc="recompute_batch_stats"):
    with _precise.recording():  # (the trace happens at the first call)
      updates = moments(variables, batch)
    flat = traverse_util.flatten_dict(unfreeze(updates))
    for path, rows in flat.items():
      acc.add(path[:-1], rows)  # path ends with the variable's name
    seen += 1
  _precise.check_batches(seen)
  if not acc.rows:
    raise ValueError(
      "No jaxnorm layer with running statistics ran in training mode: pass "
      "what puts the model in training mode in `apply_kwargs` (e.g. "
      "`train=True` or `use_running_average=False`)."
    )
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  for path in acc.rows:
    names = {key[-1] for key in stats if key[:-1] == path}
    var = stats[path + ("var",)]
    _, mean, new_var = acc.statistics(
      path,
      var.shape,
      unbiased="num_batches_tracked" in names,
      second_moment="second_moments" in names,
    )
    stats[path + ("var",)] = jnp.asarray(new_var, var.dtype)
    if "mean" in names:
      old = stats[path + ("mean",)]
      stats[path + ("mean",)] = jnp.asarray(mean, old.dtype)
  return {**variables, "batch_stats": traverse_util.unflatten_dict(stats)}
