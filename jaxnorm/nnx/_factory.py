"""``make_norm``: pick an nnx normalization layer by name."""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxnorm.nnx import _frozen
from jaxnorm.nnx import _normalization as _layers


def _sync_batch(num_features: int, **kwargs: Any) -> nnx.Module:
  if kwargs.get("axis_name") is None:
    raise ValueError(
      "make_norm('sync_batch') needs `axis_name`, the named device axis the "
      "batch statistics are reduced over."
    )
  return _layers.BatchNorm(num_features, **kwargs)


def _ghost_batch(num_features: int, **kwargs: Any) -> nnx.Module:
  if kwargs.get("virtual_batch_size") is None:
    raise ValueError("make_norm('ghost_batch') needs `virtual_batch_size`.")
  return _layers.BatchNorm(num_features, **kwargs)


_LAYERS = {
  "batch": _layers.BatchNorm,
  "sync_batch": _sync_batch,
  "ghost_batch": _ghost_batch,
  "layer": _layers.LayerNorm,
  "rms": _layers.RMSNorm,
  "group": _layers.GroupNorm,
  "instance": _layers.InstanceNorm,
  "frn": _layers.FilterResponseNorm,
  "switchable": _layers.SwitchableNorm,
  "batch_renorm": _layers.BatchRenorm,
  "mabn": _layers.MovingAverageBatchNorm,
  "evonorm_b0": _layers.EvoNormB0,
  "evonorm_s0": _layers.EvoNormS0,
  "frozen_batch": _frozen.FrozenBatchNorm,
}

NORM_NAMES = tuple(_LAYERS)


def make_norm(
  name: str, /, num_features: int, *, rngs: nnx.Rngs, **kwargs: Any
) -> nnx.Module:
  """Creates an nnx normalization layer from its name, for configurable models.

  Like detectron2's ``get_norm`` and timm's ``create_norm_layer``. Names are
  those of :func:`jaxnorm.linen.make_norm`: ``"batch"``, ``"sync_batch"``
  (needs ``axis_name``), ``"ghost_batch"`` (needs ``virtual_batch_size``),
  ``"layer"``, ``"rms"``, ``"group"``, ``"instance"``, ``"frn"``,
  ``"switchable"``, ``"batch_renorm"``, ``"mabn"``, ``"evonorm_b0"``,
  ``"evonorm_s0"``, ``"frozen_batch"`` (:class:`jaxnorm.nnx.FrozenBatchNorm`:
  fixed statistics and affine, all ``nnx.BatchStat``; it takes
  ``"batch"``'s arguments; :func:`jaxnorm.nnx.freeze_batch_norm` swaps the
  layers of a built model instead).

  Args:
    name: the layer's name (case-insensitive, ``-`` or ``_``).
    num_features: the number of channels (features) it normalizes.
    rngs: the ``nnx.Rngs`` every nnx layer takes.
    **kwargs: further constructor arguments of the chosen module.

  Returns:
    An ``nnx.Module``.

  Raises:
    ValueError: an unknown ``name``; the message lists the known ones.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> norm = jnx.make_norm("layer", 16, rngs=nnx.Rngs(0))
    >>> norm(jnp.ones((2, 16))).shape
    (2, 16)
    >>> frozen = jnx.make_norm("frozen_batch", 16, rngs=nnx.Rngs(0))
    >>> len(nnx.state(frozen, nnx.Param)), len(nnx.state(frozen, nnx.BatchStat))
    (0, 4)
  """
  key = str(name).lower().replace("-", "_")
  if key not in _LAYERS:
    raise ValueError(
      f"Unknown normalization `name`={name!r}; known names: {', '.join(NORM_NAMES)}."
    )
  return _LAYERS[key](num_features, rngs=rngs, **kwargs)
