"""Folding a flax.linen batch norm into the ``Dense`` or ``Conv`` before it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax.core import meta

from jaxnorm._fold import fold


def _collection(
  variables: Any, arg: str, name: str, *, required: bool
) -> Mapping[str, Any]:
  """``variables[name]``, or ``ValueError`` naming ``arg`` when required."""
  if not isinstance(variables, Mapping):
    raise TypeError(
      f"`{arg}` must be a mapping of flax variable collections (what "
      f"`module.init` returns), got {type(variables).__name__}."
    )
  if name not in variables:
    if not required:
      return {}
    raise ValueError(
      f'`{arg}` has no "{name}" collection (it has {sorted(variables)}).'
    )
  collection = variables[name]
  if not isinstance(collection, Mapping):
    raise TypeError(
      f'`{arg}["{name}"]` must be a mapping, got {type(collection).__name__}.'
    )
  return collection


def _check_keys(
  collection: Mapping[str, Any],
  arg: str,
  name: str,
  allowed: tuple[str, ...],
  required: tuple[str, ...],
) -> None:
  for key in required:
    if key not in collection:
      raise ValueError(
        f'`{arg}["{name}"]` has no "{key}" (it has {sorted(collection)}).'
      )
  unknown = sorted(set(collection) - set(allowed))
  if unknown:
    raise ValueError(
      f'`{arg}["{name}"]` has unexpected entries {unknown}: expected only '
      f"{list(allowed)}. Only a plain Dense or Conv and a BatchNorm fold."
    )


def _unbox(v: Any) -> Any:
  return v.unbox() if isinstance(v, meta.AxisMetadata) else v


def _rebox(box: Any, value: Any) -> Any:
  """``value`` in the metadata box ``box`` had (``nn.with_partitioning``)."""
  return box.replace_boxed(value) if isinstance(box, meta.AxisMetadata) else value


def fold_batch_norm(
  layer_variables: Mapping[str, Any],
  bn_variables: Mapping[str, Any],
  *,
  epsilon: float = 1e-5,
) -> dict[str, dict[str, Any]]:
  r"""Folds a linen batch norm into the ``Dense`` or ``Conv`` layer before it.

  Returns the variables of the same layer built with ``use_bias=True``
  whose output equals the batch norm's evaluation output
  (``use_running_average=True``) on the layer's output:
  ``bn.apply(bn_variables, layer.apply(layer_variables, x))``. The formula
  is :func:`jaxnorm.fold_batch_norm`'s:

  .. math::
    s = \mathrm{scale} / \sqrt{\mathrm{var} + \epsilon}, \quad
    \mathrm{kernel}' = \mathrm{kernel} \cdot s, \quad
    \mathrm{bias}' = (\mathrm{bias} - \mathrm{mean}) \cdot s + \beta.

  The batch norm (:class:`flax.linen.BatchNorm` or
  :class:`jaxnorm.linen.BatchNorm`) must normalize the layer's output
  features, the last axis (``axis=-1``, the default): variables do not
  record the axis, nor ``epsilon``, so pass the batch norm's. Parameters
  boxed with metadata (``nn.with_partitioning``) keep their boxes. Dtypes
  are those of :func:`jaxnorm.fold_batch_norm`.

  Args:
    layer_variables: ``{"params": {"kernel": (..., out), "bias": (out,)}}``
      of a linen ``Dense`` or ``Conv`` (``"bias"`` absent with
      ``use_bias=False``). Other collections are ignored.
    bn_variables: ``{"params": {"scale", "bias"}, "batch_stats": {"mean",
      "var"}}`` of the batch norm; ``"scale"``, ``"bias"`` (or the whole
      ``"params"``) may be absent (``use_scale``/``use_bias=False``).
    epsilon: the batch norm's ``epsilon`` (flax's default, ``1e-5``).

  Returns:
    ``{"params": {"kernel": kernel', "bias": bias'}}``, plain dicts, for
    the layer with ``use_bias=True``.

  Raises:
    TypeError: the arguments or their collections are not mappings; a
      parameter is not a real floating-point array.
    ValueError: a missing ``kernel``, ``batch_stats``, ``mean`` or ``var``;
      entries a plain ``Dense``/``Conv``/``BatchNorm`` does not have;
      shapes that do not match the kernel's output features; a bad
      ``epsilon``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import jaxnorm.linen as jnl
    >>> x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    >>> conv = nn.Conv(5, (3, 3), use_bias=False)
    >>> bn = nn.BatchNorm(use_running_average=True)
    >>> conv_vars = conv.init(jax.random.key(1), x)
    >>> bn_vars = bn.init(jax.random.key(2), conv.apply(conv_vars, x))
    >>> bn_vars = {**bn_vars, "batch_stats": {"mean": jnp.full(5, 0.3),
    ...                                       "var": jnp.full(5, 2.0)}}
    >>> folded = jnl.fold_batch_norm(conv_vars, bn_vars)
    >>> y = nn.Conv(5, (3, 3)).apply(folded, x)  # use_bias=True
    >>> y_ref = bn.apply(bn_vars, conv.apply(conv_vars, x))
    >>> bool(jnp.allclose(y, y_ref, atol=1e-5))
    True
  """
  layer_params = _collection(
    layer_variables, "layer_variables", "params", required=True
  )
  _check_keys(
    layer_params, "layer_variables", "params", ("kernel", "bias"), ("kernel",)
  )
  bn_params = _collection(bn_variables, "bn_variables", "params", required=False)
  _check_keys(bn_params, "bn_variables", "params", ("scale", "bias"), ())
  stats = _collection(bn_variables, "bn_variables", "batch_stats", required=True)
  # num_batches_tracked (running_stats="torch") plays no part in the fold.
  allowed = ("mean", "var", "num_batches_tracked")
  _check_keys(stats, "bn_variables", "batch_stats", allowed, ("mean", "var"))

  kernel_box = layer_params["kernel"]
  bias_box = layer_params.get("bias")
  kernel, bias = fold(
    _unbox(kernel_box),
    _unbox(bias_box),
    _unbox(bn_params.get("scale")),
    _unbox(bn_params.get("bias")),
    _unbox(stats["mean"]),
    _unbox(stats["var"]),
    epsilon,
    names={
      "kernel": 'layer_variables["params"]["kernel"]',
      "bias": 'layer_variables["params"]["bias"]',
      "scale": 'bn_variables["params"]["scale"]',
      "bn_bias": 'bn_variables["params"]["bias"]',
      "mean": 'bn_variables["batch_stats"]["mean"]',
      "var": 'bn_variables["batch_stats"]["var"]',
      "epsilon": "epsilon",
    },
  )
  return {
    "params": {"kernel": _rebox(kernel_box, kernel), "bias": _rebox(bias_box, bias)}
  }
