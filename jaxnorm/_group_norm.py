"""Group normalization (Wu & He, 2018) and instance normalization (Ulyanov
et al., 2016)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxnorm import _checks, _stats
from jaxnorm._layer_norm import layer_norm_init
from jaxnorm._types import NormParams

Axes = int | Sequence[int]


def group_norm_init(
  num_features: int | Sequence[int],
  *,
  use_scale: bool = True,
  use_bias: bool = True,
  param_dtype: Any = jnp.float32,
) -> NormParams:
  """Creates group-norm (and instance-norm) parameters, per channel.

  Args:
    num_features: ``C``, the number of channels.
    use_scale: whether to create ``scale`` (ones).
    use_bias: whether to create ``bias`` (zeros).
    param_dtype: dtype of the parameters.

  Returns:
    ``NormParams(scale, bias)`` of shape ``(C,)``.

  Examples:
    >>> import jaxnorm as jn
    >>> jn.group_norm_init(8).scale.shape
    (8,)
  """
  return layer_norm_init(
    num_features, use_scale=use_scale, use_bias=use_bias, param_dtype=param_dtype
  )


def resolve_groups(
  channels: int,
  num_groups: int | None,
  group_size: int | None,
  *,
  what: str = "channels",
):
  """Returns ``num_groups`` from exactly one of ``num_groups``, ``group_size``.

  The messages start with flax's text (``what`` is the noun flax uses:
  linen says channels, nnx features), then name the argument.
  """
  if (num_groups is None) == (group_size is None):
    raise ValueError(
      "Either `num_groups` or `group_size` should be specified. If "
      "`group_size` is to be specified, pass `num_groups=None` as argument to "
      "override the default `num_groups` value of 32. Got "
      f"`num_groups`={num_groups}, `group_size`={group_size}: pass exactly one."
    )
  if group_size is not None:
    group_size = _checks.as_int(group_size, "group_size")
    if group_size == 0:
      raise _checks.GroupSizeError(
        f"integer modulo by zero: `group_size`=0 must be a positive divisor of "
        f"the {channels} {what}."
      )
    if channels % group_size:
      raise ValueError(
        f"Number of {what} ({channels}) is not multiple of the group size "
        f"({group_size}). `group_size`={group_size} must divide the {channels} "
        f"{what}."
      )
    # (a negative divisor gives a negative num_groups, refused below as flax
    # refuses it)
    num_groups = channels // group_size
    if num_groups > 0:
      return num_groups
    name = f"`group_size`={group_size} must be positive"
  else:
    num_groups = _checks.as_int(num_groups, "num_groups")
    name = f"`num_groups`={num_groups} must divide the {channels} {what}"
  if num_groups <= 0 or channels % num_groups:
    raise ValueError(
      f"Number of groups ({num_groups}) does not divide the number of channels "
      f"({channels}). {name}."
    )
  return num_groups


def group_norm(
  x: ArrayLike,
  params: NormParams,
  *,
  num_groups: int | None = 32,
  group_size: int | None = None,
  axis: int = -1,
  epsilon: float = 1e-6,
  mask: ArrayLike | None = None,
  reduction_axes: Axes | None = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Any = None,
  dtype: Any = None,
  force_float32_reductions: bool = True,
) -> jax.Array:
  r"""Group normalization: per sample, over H, W and C/G channels.

  The ``C`` channels at ``axis`` are split into ``G`` consecutive groups;
  the mean and biased variance are taken per sample and group, over the
  group's channels and every axis but the batch axis 0. ``scale`` and
  ``bias`` are per channel.

  .. math::
    y_{n,g} = \frac{x_{n,g} - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}}
              \cdot \mathrm{scale} + \mathrm{bias}

  One group is layer norm over all non-batch axes with a per-channel affine;
  ``group_size=1`` is instance norm.

  Stability: the two-pass variance over each whole group (no per-channel
  merge), exact to float32 rounding however large the mean, even for small
  groups (8 values at ``1e4 + N(0, 1)``: relative error below 1e-5).

  Args:
    x: input ``(N, ..., C, ...)``, floating point. An input of rank 1 is a
      single unbatched sample.
    params: ``NormParams(scale, bias)`` of shape ``(C,)``.
    num_groups: ``G``; pass ``None`` to give ``group_size`` instead.
    group_size: channels per group, ``C // G``.
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    epsilon: added to the variance inside the square root.
    mask: optional boolean array broadcastable to ``x``.
    reduction_axes: flax's argument: the axes to reduce, which must include
      ``axis``. Default: every axis except 0.
    axis_name: optional named axis to also reduce over.
    axis_index_groups: optional groups of indices along ``axis_name``.
    dtype: output dtype (default: the dtype of ``x``).
    force_float32_reductions: when ``False``, statistics stay in the input
      dtype.

  Returns:
    An array of the shape of ``x``.

  Raises:
    ValueError: both or neither of ``num_groups`` and ``group_size``, or
      channels not divisible by them; and the checks every layer makes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    >>> y = jn.group_norm(x, jn.group_norm_init(8), num_groups=2)
    >>> g = y.reshape(2, 4, 4, 2, 4)
    >>> bool(jnp.allclose(g.mean((1, 2, 4)), 0.0, atol=1e-5))
    True
  """
  x = _checks.check_input(x)
  _checks.check_fields(params, "params", NormParams)
  c = _checks.single_axis(x.ndim, axis, "axis")
  if c == 0 and x.ndim > 1:
    raise ValueError(f"`axis`={axis} is axis 0, the batch axis of group norm.")
  channels = x.shape[c]
  if reduction_axes is None:
    raxes = tuple(a for a in range(x.ndim) if a != c and (a != 0 or x.ndim == 1))
  else:
    raxes = _checks.canonicalize_axes(x.ndim, reduction_axes, "reduction_axes")
    if c not in raxes:
      raise ValueError(
        "The reduction axes must include the final dimension as this is assumed "
        f"to be the feature axis. `reduction_axes`={reduction_axes} must include "
        f"the channel axis `axis`={axis}."
      )
    raxes = tuple(a for a in raxes if a != c)
  groups = resolve_groups(channels, num_groups, group_size)
  if any(x.shape[a] == 0 for a in raxes):
    raise ValueError(
      f"`x` of shape {x.shape} is empty along a reduced axis {raxes}: there "
      "is nothing to normalize over."
    )
  scale = _checks.check_param(params.scale, (channels,), "params.scale", x.dtype)
  bias = _checks.check_param(params.bias, (channels,), "params.bias", x.dtype)
  mask = _checks.check_mask(mask, x.shape)

  bshape = _checks.broadcast_shape(x.ndim, x.shape, (c,))
  y, *_ = _stats.normalize_over(
    x,
    axes=raxes,
    scale=None if scale is None else scale.reshape(bshape),
    bias=None if bias is None else bias.reshape(bshape),
    mask=mask,
    use_mean=True,
    epsilon=epsilon,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    dtype=_checks.compute_dtype(x.dtype, dtype, force_float32_reductions),
    out_dtype=x.dtype if dtype is None else jnp.dtype(dtype),
    groups=(c, groups),
  )
  return y


def instance_norm(
  x: ArrayLike,
  params: NormParams,
  *,
  axis: Axes = -1,
  epsilon: float = 1e-6,
  mask: ArrayLike | None = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Any = None,
  dtype: Any = None,
  force_float32_reductions: bool = True,
) -> jax.Array:
  r"""Instance normalization: per sample and channel, over H, W.

  The mean and biased variance are taken over every axis except the batch
  axis 0 and the channel ``axis``; ``scale`` and ``bias`` are per channel.
  It equals :func:`group_norm` with ``group_size=1``. Stability: the
  two-pass variance, exact to float32 rounding however large the mean.

  .. math::
    y_{n,c} = \frac{x_{n,c} - \mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon}}
              \cdot \mathrm{scale}_c + \mathrm{bias}_c

  Args:
    x: input ``(N, ..., C, ...)``, floating point.
    params: ``NormParams(scale, bias)`` of shape ``x.shape[axis]``, as made
      by :func:`group_norm_init`.
    axis: the channel axis (or axes, like flax's ``feature_axes``); it may
      not include the batch axis 0.
    epsilon: added to the variance inside the square root.
    mask: optional boolean array broadcastable to ``x``.
    axis_name: optional named axis to also reduce over.
    axis_index_groups: optional groups of indices along ``axis_name``.
    dtype: output dtype (default: the dtype of ``x``).
    force_float32_reductions: when ``False``, statistics stay in the input
      dtype.

  Returns:
    An array of the shape of ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jax.random.normal(jax.random.key(0), (2, 3, 6, 6))  # NCHW
    >>> y = jn.instance_norm(x, jn.group_norm_init(3), axis=1)
    >>> bool(jnp.allclose(y.mean((2, 3)), 0.0, atol=1e-5))
    True
  """
  x = _checks.check_input(x)
  _checks.check_fields(params, "params", NormParams)
  faxes = _checks.canonicalize_axes(x.ndim, axis, "axis")
  if 0 in faxes:
    raise ValueError(f"`axis`={axis} includes axis 0, the batch axis of instance norm.")
  raxes = tuple(a for a in range(1, x.ndim) if a not in faxes)
  fshape = _checks.feature_shape(x.shape, faxes)
  bshape = _checks.broadcast_shape(x.ndim, x.shape, faxes)
  scale = _checks.check_param(params.scale, fshape, "params.scale", x.dtype)
  bias = _checks.check_param(params.bias, fshape, "params.bias", x.dtype)
  mask = _checks.check_mask(mask, x.shape)
  y, *_ = _stats.normalize_over(
    x,
    axes=raxes,
    scale=None if scale is None else scale.reshape(bshape),
    bias=None if bias is None else bias.reshape(bshape),
    mask=mask,
    use_mean=True,
    epsilon=epsilon,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    dtype=_checks.compute_dtype(x.dtype, dtype, force_float32_reductions),
    out_dtype=x.dtype if dtype is None else jnp.dtype(dtype),
  )
  return y
