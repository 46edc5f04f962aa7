"""``make_norm``: pick a linen normalization layer by name."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from jaxnorm.linen import _frozen
from jaxnorm.linen import _normalization as _layers


def _sync_batch(**kwargs: Any) -> nn.Module:
  if kwargs.get("axis_name") is None:
    raise ValueError(
      "make_norm('sync_batch') needs `axis_name`, the named device axis the "
      "batch statistics are reduced over."
    )
  return _layers.BatchNorm(**kwargs)


def _ghost_batch(**kwargs: Any) -> nn.Module:
  if kwargs.get("virtual_batch_size") is None:
    raise ValueError("make_norm('ghost_batch') needs `virtual_batch_size`.")
  return _layers.BatchNorm(**kwargs)


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


def make_norm(name: str, /, **kwargs: Any) -> nn.Module:
  """Creates a linen normalization layer from its name, for configurable models.

  Like detectron2's ``get_norm`` and timm's ``create_norm_layer``: a model
  takes a string from its configuration and switches norms without code
  changes. Keyword arguments go to the layer's constructor.

  Names: ``"batch"``, ``"sync_batch"`` (needs ``axis_name``),
  ``"ghost_batch"`` (needs ``virtual_batch_size``), ``"layer"``, ``"rms"``,
  ``"group"``, ``"instance"``, ``"frn"``, ``"switchable"``,
  ``"batch_renorm"``, ``"mabn"``, ``"evonorm_b0"``, ``"evonorm_s0"``,
  ``"frozen_batch"`` (:class:`jaxnorm.linen.FrozenBatchNorm`: fixed
  statistics and affine, all in ``batch_stats``; it takes ``"batch"``'s
  arguments, so a config can switch between the two; load trained
  variables with :func:`jaxnorm.linen.freeze_batch_norm`, and name the
  layer, since flax's automatic names differ between the two classes).

  Args:
    name: one of the names above (case-insensitive, ``-`` or ``_``);
      positional, so that ``name=`` in ``kwargs`` names the flax module.
    **kwargs: constructor arguments of the chosen module.

  Returns:
    An unbound ``flax.linen.Module``.

  Raises:
    ValueError: an unknown ``name``; the message lists the known ones.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> norm = jnn.make_norm("group", num_groups=4)
    >>> variables = norm.init(jax.random.key(0), jnp.ones((2, 8, 8, 16)))
    >>> variables["params"]["scale"].shape
    (16,)
    >>> frozen = jnn.make_norm("frozen_batch", momentum=0.9)  # no params
    >>> sorted(frozen.init(jax.random.key(0), jnp.ones((2, 16))))
    ['batch_stats']
  """
  key = str(name).lower().replace("-", "_")
  if key not in _LAYERS:
    raise ValueError(
      f"Unknown normalization `name`={name!r}; known names: {', '.join(NORM_NAMES)}."
    )
  return _LAYERS[key](**kwargs)
