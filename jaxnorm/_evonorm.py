"""EvoNorm-B0 and EvoNorm-S0 (Liu et al., 2020)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxnorm import _checks, _stats
from jaxnorm._batch_norm import _as_shape, _ema, check_batch_size
from jaxnorm._group_norm import resolve_groups


class EvoNormParams(NamedTuple):
  """Parameters of EvoNorm-B0 and -S0, each of shape ``(C,)``.

  Attributes:
    scale: ``gamma``, ones at init.
    bias: ``beta``, zeros at init.
    v: the learned coefficient ``v_1`` of the layer's nonlinearity, ones.
  """

  scale: jax.Array | None
  bias: jax.Array | None
  v: jax.Array


class EvoNormB0State(NamedTuple):
  """Running batch variance of EvoNorm-B0, ``(C,)`` float32, ones at init."""

  var: jax.Array


def _params(num_features, param_dtype, use_scale=True, use_bias=True):
  shape = _as_shape(num_features, "num_features")
  return EvoNormParams(
    scale=jnp.ones(shape, param_dtype) if use_scale else None,
    bias=jnp.zeros(shape, param_dtype) if use_bias else None,
    v=jnp.ones(shape, param_dtype),
  )


def evonorm_b0_init(
  num_features: int,
  *,
  use_scale: bool = True,
  use_bias: bool = True,
  param_dtype: Any = jnp.float32,
) -> tuple[EvoNormParams, EvoNormB0State]:
  """Creates EvoNorm-B0 parameters (``scale``, ``v`` ones, ``bias`` zeros) and state.

  Args:
    num_features: ``C``, the size of the channel axis.
    use_scale: whether to create ``scale``.
    use_bias: whether to create ``bias``.
    param_dtype: dtype of the parameters; the state is float32.

  Returns:
    ``(EvoNormParams(scale, bias, v), EvoNormB0State(var=ones))``.

  Examples:
    >>> import jaxnorm as jn
    >>> params, state = jn.evonorm_b0_init(2)
    >>> params.v, state.var
    (Array([1., 1.], dtype=float32), Array([1., 1.], dtype=float32))
  """
  params = _params(num_features, param_dtype, use_scale, use_bias)
  return params, EvoNormB0State(var=jnp.ones(params.v.shape, jnp.float32))


def evonorm_s0_init(
  num_features: int,
  *,
  use_scale: bool = True,
  use_bias: bool = True,
  param_dtype: Any = jnp.float32,
) -> EvoNormParams:
  """Creates EvoNorm-S0 parameters: ``scale`` and ``v`` ones, ``bias`` zeros.

  Args:
    num_features: ``C``, the size of the channel axis.
    use_scale: whether to create ``scale``.
    use_bias: whether to create ``bias``.
    param_dtype: dtype of the parameters.

  Returns:
    ``EvoNormParams(scale, bias, v)`` of shape ``(C,)``.

  Examples:
    >>> import jaxnorm as jn
    >>> jn.evonorm_s0_init(2).bias
    Array([0., 0.], dtype=float32)
  """
  return _params(num_features, param_dtype, use_scale, use_bias)


def _check_bool(use_running_average):
  use_running_average = _checks.as_bool(use_running_average, "use_running_average")


def _affine(y, scale, bias, dtype):
  if scale is not None:
    y = y * scale.astype(dtype)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


def evonorm_b0(
  x: ArrayLike,
  params: EvoNormParams,
  state: EvoNormB0State,
  *,
  use_running_average: bool,
  axis: int = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-5,
  axis_name: Hashable | None = None,
  axis_index_groups: Any = None,
  mask: ArrayLike | None = None,
  dtype: Any = None,
) -> tuple[jax.Array, EvoNormB0State]:
  r"""EvoNorm-B0: a batch-dependent normalization-activation layer.

  .. math::
    y = \frac{x}{\max\left(\sqrt{s^2_B + \epsilon},\;
        v \cdot x + \sqrt{s^2_{I} + \epsilon}\right)} \cdot \mathrm{scale}
        + \mathrm{bias}

  :math:`s^2_B` is the biased variance per channel over every other axis
  (batch and spatial), synchronized over ``axis_name`` (count-weighted) and
  replaced by the running ``state.var`` in evaluation; :math:`s^2_I` is the
  instance variance, per sample and channel over the spatial axes (every
  axis but 0 and ``axis``). The running variance moves as in batch norm:
  ``var' = momentum * var + (1 - momentum) * s2_B``.

  Stability: both variances (per sample and per batch) are two-pass,
  exact to float32 rounding however large the mean.

  Args:
    x: input ``(N, ..., C, ...)`` of rank at least 2, floating point.
    params: ``EvoNormParams(scale, bias, v)`` of shape ``(C,)``.
    state: ``EvoNormB0State(var)`` of shape ``(C,)``.
    use_running_average: ``True`` for evaluation (state unchanged).
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    momentum: weight of the old running variance.
    epsilon: added to both variances inside the square roots.
    axis_name: named axis to synchronize the batch variance over.
    axis_index_groups: optional groups of indices along ``axis_name``.
    mask: optional boolean array broadcastable to ``x``; ``False`` elements
      do not enter either variance.
    dtype: output dtype (default: that of ``x``).

  Returns:
    ``(y, new_state)``.

  Raises:
    TypeError: ``x`` not floating point, ``use_running_average`` not a bool.
    ValueError: ``axis`` out of range or equal to 0, shapes that do not
      match, a bad ``mask``, an unbound ``axis_name``.

  References:
    Liu, Brock, Simonyan, Le. *Evolving Normalization-Activation Layers*.
    NeurIPS 2020. arXiv:2004.02967.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
    >>> params, state = jn.evonorm_b0_init(8)
    >>> y, state = jn.evonorm_b0(x, params, state, use_running_average=False)
    >>> y.shape, state.var.shape
    ((4, 6, 6, 8), (8,))
  """
  x = _real(_checks.check_input(x))
  _checks.check_fields(params, "params", EvoNormParams)
  _checks.check_fields(state, "state", EvoNormB0State)
  _check_bool(use_running_average)
  momentum = _checks.check_hyper(momentum, "momentum", high=1.0)
  c, fshape, bshape = _channel_axis(x, axis)
  scale = _checks.check_param(params.scale, fshape, "params.scale", x.dtype)
  bias = _checks.check_param(params.bias, fshape, "params.bias", x.dtype)
  v = _checks.check_param(params.v, fshape, "params.v", x.dtype, required=True)
  var_state = _checks.check_param(
    state.var, fshape, "state.var", x.dtype, required=True
  )
  mask = _checks.check_mask(mask, x.shape)
  cdtype = _checks.compute_dtype(x.dtype, dtype)
  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  sync = _stats.make_sync(axis_name, axis_index_groups)
  no_sync = _stats.make_sync(None, None)

  inst_axes = tuple(a for a in range(1, x.ndim) if a != c)
  # (N, C) input: the instance variance is over no axis, 0 whatever x; as a
  # constant, so that sqrt(0 + epsilon) at epsilon = 0 gives no 0 * inf in
  # the gradient.
  inst_var = 0.0
  if inst_axes:
    inst_var = _stats.moments(
      x, inst_axes, mask=mask, use_mean=True, sync=no_sync, dtype=cdtype
    ).var
  if use_running_average:
    var_b = var_state.astype(cdtype).reshape(bshape)
    new_state = state
  else:
    batch_axes = tuple(a for a in range(x.ndim) if a != c)
    check_batch_size(x.shape, batch_axes, axis_name, axis_index_groups, mask)
    m_b = _stats.moments(
      x, batch_axes, mask=mask, use_mean=True, sync=sync, dtype=cdtype
    )
    var_b = m_b.var
    seen = jnp.broadcast_to(m_b.count, var_b.shape).reshape(fshape) > 0
    new_state = EvoNormB0State(
      var=_ema(var_state, var_b.reshape(fshape), momentum, seen)
    )
  epsilon = _checks.check_hyper(epsilon, "epsilon")

  def formula(xf):
    den = jnp.maximum(
      jnp.sqrt(var_b + epsilon),
      v.astype(cdtype).reshape(bshape) * xf + jnp.sqrt(inst_var + epsilon),
    )
    return _affine(xf / den, _b(scale, bshape), _b(bias, bshape), cdtype)

  y = _stats.guard_padding(formula, x.astype(cdtype), mask)
  return y.astype(out_dtype), new_state


def _real(x: jax.Array) -> jax.Array:
  if jnp.iscomplexobj(x):
    raise TypeError(f"`x` must be real floating point, got dtype {x.dtype}.")
  return x


def _b(p, bshape):
  return None if p is None else p.reshape(bshape)


def _channel_axis(x, axis):
  c = _checks.single_axis(x.ndim, axis, "axis")
  if x.ndim < 2 or c == 0:
    raise ValueError(
      f"`axis`={axis} must name a channel axis other than the batch axis 0 of "
      f"`x` (got `x` of shape {x.shape})."
    )
  if any(x.shape[a] == 0 for a in range(1, x.ndim)):
    raise ValueError(
      f"`x` of shape {x.shape} has an empty axis besides the batch axis: "
      "there is nothing to normalize over."
    )
  return c, (x.shape[c],), _checks.broadcast_shape(x.ndim, x.shape, (c,))


def evonorm_s0(
  x: ArrayLike,
  params: EvoNormParams,
  *,
  num_groups: int | None = 32,
  group_size: int | None = None,
  axis: int = -1,
  epsilon: float = 1e-5,
  mask: ArrayLike | None = None,
  dtype: Any = None,
) -> jax.Array:
  r"""EvoNorm-S0: a batch-independent normalization-activation layer.

  .. math::
    y = \frac{x \cdot \sigma(v \cdot x)}{\sqrt{s^2_{G} + \epsilon}}
        \cdot \mathrm{scale} + \mathrm{bias}

  :math:`\sigma` is the logistic sigmoid and :math:`s^2_G` the biased group
  variance: per sample and group of ``C // num_groups`` consecutive
  channels, over the group's channels and every axis but 0 and ``axis``
  (group norm's statistic).

  Stability: the group variance is two-pass, exact to float32 rounding
  however large the mean.

  Args:
    x: input ``(N, ..., C, ...)`` of rank at least 2, floating point.
    params: ``EvoNormParams(scale, bias, v)`` of shape ``(C,)``.
    num_groups: ``G``; pass ``None`` to give ``group_size`` instead.
    group_size: channels per group.
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    epsilon: added to the group variance inside the square root.
    mask: optional boolean array broadcastable to ``x``; ``False`` elements
      do not enter the variance.
    dtype: output dtype (default: that of ``x``).

  Returns:
    ``y`` of the shape of ``x``.

  Raises:
    ValueError: both or neither of ``num_groups``/``group_size``, channels
      not divisible, and the checks of every layer.

  References:
    Liu, Brock, Simonyan, Le. *Evolving Normalization-Activation Layers*.
    NeurIPS 2020. arXiv:2004.02967.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
    >>> jn.evonorm_s0(x, jn.evonorm_s0_init(8), num_groups=2).shape
    (2, 3, 3, 8)
  """
  x = _real(_checks.check_input(x))
  _checks.check_fields(params, "params", EvoNormParams)
  c, fshape, bshape = _channel_axis(x, axis)
  channels = x.shape[c]
  groups = resolve_groups(channels, num_groups, group_size)
  scale = _checks.check_param(params.scale, fshape, "params.scale", x.dtype)
  bias = _checks.check_param(params.bias, fshape, "params.bias", x.dtype)
  v = _checks.check_param(params.v, fshape, "params.v", x.dtype, required=True)
  mask = _checks.check_mask(mask, x.shape)
  cdtype = _checks.compute_dtype(x.dtype, dtype)
  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  # The group variance, per channel (see _stats._reducer's channel groups).
  m = _stats.moments(
    x,
    tuple(a for a in range(1, x.ndim) if a != c),
    mask=mask,
    use_mean=True,
    sync=_stats.NO_SYNC,
    dtype=cdtype,
    groups=(c, groups),
  )
  inv = lax.rsqrt(m.var + _checks.check_hyper(epsilon, "epsilon"))

  def formula(xf):
    y = xf * jax.nn.sigmoid(v.astype(cdtype).reshape(bshape) * xf) * inv
    return _affine(y, _b(scale, bshape), _b(bias, bshape), cdtype)

  return _stats.guard_padding(formula, x.astype(cdtype), mask).astype(out_dtype)
