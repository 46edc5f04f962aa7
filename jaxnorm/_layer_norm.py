"""Layer normalization (Ba et al., 2016) and RMS normalization (Zhang &
Sennrich, 2019)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxnorm import _checks, _stats
from jaxnorm._batch_norm import _as_shape
from jaxnorm._types import NormParams

Axes = int | Sequence[int]


def layer_norm_init(
  feature_shape: int | Sequence[int],
  *,
  use_scale: bool = True,
  use_bias: bool = True,
  param_dtype: Any = jnp.float32,
) -> NormParams:
  """Creates layer-norm parameters: ``scale`` ones and ``bias`` zeros.

  Args:
    feature_shape: shape of ``x`` at ``feature_axes`` (an int for one axis).
    use_scale: whether to create ``scale``; otherwise it is ``None``.
    use_bias: whether to create ``bias``; otherwise it is ``None``.
    param_dtype: dtype of the parameters.

  Returns:
    ``NormParams(scale, bias)`` of shape ``feature_shape``.

  Examples:
    >>> import jaxnorm as jn
    >>> jn.layer_norm_init(4).bias
    Array([0., 0., 0., 0.], dtype=float32)
  """
  shape = _as_shape(feature_shape, "feature_shape")
  return NormParams(
    scale=jnp.ones(shape, param_dtype) if use_scale else None,
    bias=jnp.zeros(shape, param_dtype) if use_bias else None,
  )


def rms_norm_init(
  feature_shape: int | Sequence[int],
  *,
  use_scale: bool = True,
  param_dtype: Any = jnp.float32,
) -> NormParams:
  """Creates RMS-norm parameters: ``scale`` ones and no bias.

  Args:
    feature_shape: shape of ``x`` at ``feature_axes`` (an int for one axis).
    use_scale: whether to create ``scale``; otherwise it is ``None``.
    param_dtype: dtype of ``scale``.

  Returns:
    ``NormParams(scale, bias=None)``.

  Examples:
    >>> import jaxnorm as jn
    >>> jn.rms_norm_init(2)
    NormParams(scale=Array([1., 1.], dtype=float32), bias=None)
  """
  shape = _as_shape(feature_shape, "feature_shape")
  return NormParams(
    scale=jnp.ones(shape, param_dtype) if use_scale else None, bias=None
  )


def _feature_norm(
  x,
  params,
  *,
  reduction_axes,
  feature_axes,
  epsilon,
  mask,
  use_mean,
  axis_name,
  axis_index_groups,
  dtype,
  force_float32_reductions,
):
  x = _checks.check_input(x)
  _checks.check_fields(params, "params", NormParams)
  raxes = _checks.canonicalize_axes(x.ndim, reduction_axes, "reduction_axes")
  faxes = _checks.canonicalize_axes(x.ndim, feature_axes, "feature_axes")
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
    use_mean=use_mean,
    epsilon=epsilon,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    dtype=_checks.compute_dtype(x.dtype, dtype, force_float32_reductions),
    out_dtype=x.dtype if dtype is None else jnp.dtype(dtype),
  )
  return y


def layer_norm(
  x: ArrayLike,
  params: NormParams,
  *,
  reduction_axes: Axes = -1,
  feature_axes: Axes = -1,
  epsilon: float = 1e-6,
  mask: ArrayLike | None = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Any = None,
  dtype: Any = None,
  force_float32_reductions: bool = True,
) -> jax.Array:
  r"""Layer normalization: per sample, over the feature axes.

  .. math::
    y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}
        \cdot \mathrm{scale} + \mathrm{bias}

  with the mean and biased variance over ``reduction_axes``, separately for
  every index of the other axes. ``scale`` and ``bias`` have the shape of
  ``x`` at ``feature_axes`` (flax's meaning). LN over C, H, W of an NHWC
  image is ``reduction_axes=(1, 2, 3)``; for a transformer ``(B, T, D)`` the
  default ``-1`` normalizes every token over ``D``.

  Stability: the two-pass variance (mean, then squared deviations), exact
  to float32 rounding however large the mean; the mean is float32's sum.

  Args:
    x: input, floating point.
    params: ``NormParams(scale, bias)`` of shape ``x.shape[feature_axes]``.
    reduction_axes: axes to take the statistics over.
    feature_axes: axes that ``scale`` and ``bias`` run along.
    epsilon: added to the variance inside the square root.
    mask: optional boolean array broadcastable to ``x``; ``False`` elements
      do not enter the statistics.
    axis_name: optional named axis to also reduce over (flax's argument,
      e.g. for sequence parallelism); ``None`` by default.
    axis_index_groups: optional groups of indices along ``axis_name``.
    dtype: output dtype (default: the dtype of ``x``).
    force_float32_reductions: when ``False``, statistics stay in the input
      dtype.

  Returns:
    An array of the shape of ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    >>> y = jn.layer_norm(x, jn.layer_norm_init(16))
    >>> bool(jnp.allclose(y.std(-1), 1.0, atol=1e-3))
    True
  """
  return _feature_norm(
    x,
    params,
    reduction_axes=reduction_axes,
    feature_axes=feature_axes,
    epsilon=epsilon,
    mask=mask,
    use_mean=True,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    dtype=dtype,
    force_float32_reductions=force_float32_reductions,
  )


def rms_norm(
  x: ArrayLike,
  params: NormParams,
  *,
  reduction_axes: Axes = -1,
  feature_axes: Axes = -1,
  epsilon: float = 1e-6,
  mask: ArrayLike | None = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Any = None,
  dtype: Any = None,
  force_float32_reductions: bool = True,
) -> jax.Array:
  r"""RMS normalization: layer norm without centering.

  .. math::
    y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot \mathrm{scale}

  with the mean of squares over ``reduction_axes``. ``params.bias`` is
  normally ``None`` (:func:`rms_norm_init` creates none); if given, it is
  added. The mean square has no cancellation, so it is exact to float32's
  summation error.

  Args:
    x: input, floating point.
    params: ``NormParams(scale, bias=None)``, ``scale`` of shape
      ``x.shape[feature_axes]``.
    reduction_axes: axes to take the mean square over.
    feature_axes: axes that ``scale`` runs along.
    epsilon: added to the mean square inside the square root.
    mask: optional boolean array broadcastable to ``x``.
    axis_name: optional named axis to also reduce over.
    axis_index_groups: optional groups of indices along ``axis_name``.
    dtype: output dtype (default: the dtype of ``x``).
    force_float32_reductions: when ``False``, statistics stay in the input
      dtype.

  Returns:
    An array of the shape of ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jnp.array([[1.0, 7.0]])  # mean square 25
    >>> jn.rms_norm(x, jn.rms_norm_init(2), epsilon=0.0)
    Array([[0.2, 1.4]], dtype=float32)
  """
  return _feature_norm(
    x,
    params,
    reduction_axes=reduction_axes,
    feature_axes=feature_axes,
    epsilon=epsilon,
    mask=mask,
    use_mean=False,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    dtype=dtype,
    force_float32_reductions=force_float32_reductions,
  )
