"""flax.nnx modules for filter response norm, switchable norm and batch
renorm.

Flax has none of these layers; the modules follow the conventions of
``flax.nnx.BatchNorm`` (``num_features`` and ``rngs`` in the constructor,
``nnx.Param`` for learned parameters, ``nnx.BatchStat`` for running state,
``use_running_average`` from the call or the constructor, so ``.eval()`` and
``.train()`` switch it) and call the functional core in :mod:`jaxnorm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen import dtypes as flax_dtypes
from jax.nn import initializers

import jaxnorm as jn
from jaxnorm import _checks
from jaxnorm.linen._core import _as_inexact
from jaxnorm.nnx._core import _value, record_moments

Axes = int | Sequence[int]
Dtype = Any
Initializer = Any

# The paper's initial learned epsilon.
_EPS_INIT = initializers.constant(1e-4)


def _param(init: Initializer, use: bool, rngs: nnx.Rngs, shape, dtype):
  if not use:
    return nnx.data(None)
  return nnx.Param(init(rngs.params(), shape, dtype))


def _inputs(x, dtype, *params):
  """Flax's output dtype, and ``x`` as an inexact array of a usable dtype."""
  x = jnp.asarray(x)
  out_dtype = flax_dtypes.canonicalize_dtype(x, *params, dtype=dtype)
  return _as_inexact(x, out_dtype), out_dtype


def _use_running_average(call_value, own_value, name):
  value = call_value if call_value is not None else own_value
  if value is None:
    raise ValueError(
      f"No `use_running_average` was given to {name}: pass it to the "
      "constructor or the call, or switch with `.eval()` / `.train()`."
    )
  return bool(value)


class FilterResponseNorm(nnx.Module):
  """Filter response normalization + TLU (Singh & Krishnan 2019).

  Calls :func:`jaxnorm.filter_response_norm`: per sample and channel,
  ``y = max(scale * x / sqrt(mean_{H,W}(x^2) + eps) + bias, tau)``. No batch
  statistics, no state. Variables (``nnx.Param``, shape ``(C,)``):
  ``scale``, ``bias``, ``tau`` (if ``use_tlu``), ``eps`` (if
  ``learned_epsilon``, initialised to 1e-4).

  Args:
    num_features: ``C``, the number of channels.
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    epsilon: fixed epsilon; with ``learned_epsilon`` the epsilon is
      ``epsilon + |eps|``.
    use_tlu: whether to apply ``max(y, tau)``.
    learned_epsilon: whether to learn a per-channel ``eps``.
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of the parameters.
    use_bias, use_scale: whether to create ``bias``/``scale``.
    bias_init, scale_init, tau_init, eps_init: initializers.
    rngs: passed to the initializers.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnnx
    >>> frn = jnnx.FilterResponseNorm(3, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    >>> frn(x).shape, frn.tau.shape
    ((2, 4, 4, 3), (3,))
  """

  def __init__(
    self,
    num_features: int,
    *,
    axis: Axes = -1,
    epsilon: float = 1e-6,
    use_tlu: bool = True,
    learned_epsilon: bool = False,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = initializers.zeros,
    scale_init: Initializer = initializers.ones,
    tau_init: Initializer = initializers.zeros,
    eps_init: Initializer = _EPS_INIT,
    rngs: nnx.Rngs,
  ):
    shape = _checks.num_features_shape(num_features)
    self.scale = _param(scale_init, use_scale, rngs, shape, param_dtype)
    self.bias = _param(bias_init, use_bias, rngs, shape, param_dtype)
    self.tau = _param(tau_init, use_tlu, rngs, shape, param_dtype)
    self.eps = _param(eps_init, learned_epsilon, rngs, shape, param_dtype)
    self.num_features = num_features
    self.axis = axis
    self.epsilon = epsilon
    self.use_tlu = use_tlu
    self.learned_epsilon = learned_epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes ``x`` ``(N, ..., C, ...)``; ``mask`` hides padding from ``nu^2``."""
    params = jn.FilterResponseNormParams(
      _value(self.scale), _value(self.bias), _value(self.tau), _value(self.eps)
    )
    x, out_dtype = _inputs(x, self.dtype, *params)
    return jn.filter_response_norm(
      x,
      params,
      axis=self.axis,
      epsilon=self.epsilon,
      use_tlu=self.use_tlu,
      mask=mask,
      dtype=out_dtype,
    )


class _RunningStatsNorm(nnx.Module):
  """Shared constructor of the layers with running BN statistics."""

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None,
    axis: Axes,
    momentum: float,
    epsilon: float,
    dtype: Dtype | None,
    param_dtype: Dtype,
    use_bias: bool,
    use_scale: bool,
    bias_init: Initializer,
    scale_init: Initializer,
    axis_name: str | None,
    axis_index_groups: Any,
    rngs: nnx.Rngs,
  ):
    shape = _checks.num_features_shape(num_features)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.scale = _param(scale_init, use_scale, rngs, shape, param_dtype)
    self.bias = _param(bias_init, use_bias, rngs, shape, param_dtype)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups

  def _store(self, new_state, use_running_average):
    if not use_running_average:
      self.mean[...] = new_state.mean
      self.var[...] = new_state.var


class SwitchableNorm(_RunningStatsNorm):
  """Switchable normalization (Luo et al. 2018).

  Calls :func:`jaxnorm.switchable_norm`: mixes the IN, LN and BN means and
  variances with softmax weights, then ``y = (x - mean) / sqrt(var + eps) *
  scale + bias``; BN statistics from the batch (synchronized over
  ``axis_name``) in training, the running ones in evaluation. Variables:
  ``scale``, ``bias`` ``(C,)`` and ``mean_weights``, ``var_weights`` ``(3,)``
  (``nnx.Param``); ``mean``, ``var`` ``(C,)`` float32 (``nnx.BatchStat``).

  Args:
    num_features: ``C``, the number of channels.
    use_running_average: evaluation mode if true (the call may override).
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    momentum: decay rate of the running BN statistics.
    epsilon: added to the mixed variance inside the square root.
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of the parameters.
    use_bias, use_scale: whether to create ``bias``/``scale``.
    bias_init, scale_init: initializers (zeros, ones).
    weights_init: initializer of ``mean_weights``/``var_weights`` (ones).
    axis_name: named axis to synchronize the BN statistics over.
    axis_index_groups: groups of indices of ``axis_name``.
    rngs: passed to the initializers.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnnx
    >>> sn = jnnx.SwitchableNorm(3, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
    >>> y = sn(x)  # training: updates sn.mean, sn.var
    >>> sn.eval()  # use_running_average=True from now on
    >>> sn(x).shape
    (4, 4, 4, 3)
  """

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = initializers.zeros,
    scale_init: Initializer = initializers.ones,
    weights_init: Initializer = initializers.ones,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      num_features,
      use_running_average=use_running_average,
      axis=axis,
      momentum=momentum,
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=param_dtype,
      use_bias=use_bias,
      use_scale=use_scale,
      bias_init=bias_init,
      scale_init=scale_init,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      rngs=rngs,
    )
    self.mean_weights = nnx.Param(weights_init(rngs.params(), (3,), param_dtype))
    self.var_weights = nnx.Param(weights_init(rngs.params(), (3,), param_dtype))

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x`` ``(N, ..., C, ...)``; ``mask`` as in ``BatchNorm``."""
    use_ra = _use_running_average(
      use_running_average, self.use_running_average, "SwitchableNorm"
    )
    scale, bias = _value(self.scale), _value(self.bias)
    x, out_dtype = _inputs(x, self.dtype, scale, bias)
    y, new_state = jn.switchable_norm(
      x,
      jn.SwitchableNormParams(
        scale, bias, self.mean_weights[...], self.var_weights[...]
      ),
      jn.BatchNormState(self.mean[...], self.var[...]),
      use_running_average=use_ra,
      axis=self.axis,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      mask=mask,
      dtype=out_dtype,
    )
    self._store(new_state, use_ra)
    record_moments(self, x, self.axis, mask, use_ra)
    return y


class BatchRenorm(_RunningStatsNorm):
  """Batch renormalization (Ioffe 2017).

  Calls :func:`jaxnorm.batch_renorm`: in training, batch norm corrected
  toward the running statistics by ``r = clip(sigma_B / sigma, 1/r_max,
  r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)`` (both under
  ``stop_gradient``); in evaluation, batch norm with the running statistics.
  Variables as :class:`flax.nnx.BatchNorm`: ``scale``, ``bias``
  (``nnx.Param``), ``mean``, ``var`` (``nnx.BatchStat``), all ``(C,)``.

  Args:
    num_features: ``C``, the number of channels.
    use_running_average: evaluation mode if true (the call may override).
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    momentum: decay rate of the running statistics.
    epsilon: added to the variances inside the square roots.
    r_max: default bound of ``r``; the call may pass a traced value.
    d_max: default bound of ``d``; the call may pass a traced value.
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale: whether to create ``bias``/``scale``.
    bias_init, scale_init: initializers (zeros, ones).
    axis_name: named axis to synchronize the batch statistics over.
    axis_index_groups: groups of indices of ``axis_name``.
    rngs: passed to the initializers.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm as jn, jaxnorm.nnx as jnnx
    >>> brn = jnnx.BatchRenorm(3, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> r_max, d_max = jn.batch_renorm_schedule(20_000)
    >>> brn(x, r_max=r_max, d_max=d_max).shape
    (8, 3)
  """

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = initializers.zeros,
    scale_init: Initializer = initializers.ones,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    rngs: nnx.Rngs,
  ):
    super().__init__(
      num_features,
      use_running_average=use_running_average,
      axis=axis,
      momentum=momentum,
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=param_dtype,
      use_bias=use_bias,
      use_scale=use_scale,
      bias_init=bias_init,
      scale_init=scale_init,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      rngs=rngs,
    )
    self.r_max = r_max
    self.d_max = d_max

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    r_max: Any = None,
    d_max: Any = None,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x`` ``(N, ..., C, ...)``.

    Args:
      x: the input.
      use_running_average: evaluation mode if true.
      r_max: overrides the constructor's ``r_max`` (may be traced).
      d_max: overrides the constructor's ``d_max`` (may be traced).
      mask: optional boolean array broadcastable to ``x``.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    use_ra = _use_running_average(
      use_running_average, self.use_running_average, "BatchRenorm"
    )
    scale, bias = _value(self.scale), _value(self.bias)
    x, out_dtype = _inputs(x, self.dtype, scale, bias)
    y, new_state = jn.batch_renorm(
      x,
      jn.NormParams(scale, bias),
      jn.BatchNormState(self.mean[...], self.var[...]),
      use_running_average=use_ra,
      axis=self.axis,
      momentum=self.momentum,
      epsilon=self.epsilon,
      r_max=self.r_max if r_max is None else r_max,
      d_max=self.d_max if d_max is None else d_max,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      mask=mask,
      dtype=out_dtype,
    )
    self._store(new_state, use_ra)
    record_moments(self, x, self.axis, mask, use_ra)
    return y
