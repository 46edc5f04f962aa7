"""flax.linen modules for filter response norm, switchable norm and batch
renorm.

Flax has none of these layers; the modules follow the conventions of
``flax.linen.BatchNorm`` (``params`` for learned parameters, ``batch_stats``
for running state, ``use_running_average`` merged from the constructor and
the call) and call the functional core in :mod:`jaxnorm` for every number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.nn import initializers

import jaxnorm as jn
from jaxnorm import _checks
from jaxnorm.linen._core import (
  _affine_params,
  _as_inexact,
  _out_dtype,
  _reduced_size,
  record_moments,
)

Axes = int | Sequence[int]
Dtype = Any
Initializer = Any


def _feature_shape(x: jax.Array, axis: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
  axes = _checks.canonicalize_axes(x.ndim, axis, "axis")
  return axes, tuple(x.shape[a] for a in axes)


class FilterResponseNorm(nn.Module):
  """Filter response normalization + TLU (Singh & Krishnan 2019).

  Calls :func:`jaxnorm.filter_response_norm`: per sample and channel,
  ``y = max(scale * x / sqrt(mean_{H,W}(x^2) + eps) + bias, tau)``. No batch
  statistics, no state, the same in training and evaluation. Variables::

    params: scale (C,), bias (C,), tau (C,) [if use_tlu],
            eps (C,) [if learned_epsilon, initialised to 1e-4]

  Attributes:
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    epsilon: fixed epsilon added to ``nu^2``; with ``learned_epsilon`` the
      epsilon is ``epsilon + |eps|``.
    use_tlu: whether to apply the thresholded linear unit ``max(y, tau)``.
    learned_epsilon: whether to learn a per-channel ``eps``.
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of the parameters.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init, scale_init, tau_init, eps_init: initializers (zeros, ones,
      zeros, ``1e-4``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    >>> frn = jnn.FilterResponseNorm()
    >>> variables = frn.init(jax.random.key(1), x)
    >>> sorted(variables["params"])
    ['bias', 'scale', 'tau']
    >>> frn.apply(variables, x).shape
    (2, 4, 4, 3)
  """

  axis: Axes = -1
  epsilon: float = 1e-6
  use_tlu: bool = True
  learned_epsilon: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  tau_init: Initializer = initializers.zeros
  eps_init: Initializer = initializers.constant(1e-4)

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Normalizes ``x`` ``(N, ..., C, ...)``; ``mask`` hides padding from ``nu^2``."""
    x = jnp.asarray(x)
    _, fshape = _feature_shape(x, self.axis)

    def param(name, init, use):
      return self.param(name, init, fshape, self.param_dtype) if use else None

    params = jn.FilterResponseNormParams(
      scale=param("scale", self.scale_init, self.use_scale),
      bias=param("bias", self.bias_init, self.use_bias),
      tau=param("tau", self.tau_init, self.use_tlu),
      eps=param("eps", self.eps_init, self.learned_epsilon),
    )
    out_dtype = _out_dtype(x, *params, dtype=self.dtype)
    return jn.filter_response_norm(
      _as_inexact(x, out_dtype),
      params,
      axis=self.axis,
      epsilon=self.epsilon,
      use_tlu=self.use_tlu,
      mask=mask,
      dtype=out_dtype,
    )


class _RunningStatsNorm(nn.Module):
  """Shared fields and variables of the layers with running BN statistics."""

  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None

  def _variables(self, x, use_running_average):
    use_running_average = bool(
      nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
      )
    )
    axes, fshape = _feature_shape(x, self.axis)
    mean = self.variable(
      "batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), fshape
    )
    var = self.variable(
      "batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), fshape
    )
    scale, bias = _affine_params(self, fshape)
    initializing = self.is_initializing()
    if initializing and _reduced_size(x.shape, axes) <= 1:
      # init only needs shapes and discards the statistics (as flax does).
      use_running_average = True
    sync = {
      # Like flax, init needs no bound named axis.
      "axis_name": None if initializing else self.axis_name,
      "axis_index_groups": None if initializing else self.axis_index_groups,
    }
    return use_running_average, mean, var, scale, bias, sync

  def _store(self, mean, var, new_state, use_running_average):
    if not use_running_average and not self.is_initializing():
      mean.value = new_state.mean
      var.value = new_state.var


class SwitchableNorm(_RunningStatsNorm):
  """Switchable normalization (Luo et al. 2018).

  Calls :func:`jaxnorm.switchable_norm`: mixes the IN, LN and BN means and
  variances with softmax weights, then ``y = (x - mean) / sqrt(var + eps) *
  scale + bias``. The BN statistics are those of the batch (synchronized over
  ``axis_name``) in training and the running ones in evaluation.
  Variables::

    params:      scale (C,), bias (C,), mean_weights (3,), var_weights (3,)
    batch_stats: mean (C,) float32, var (C,) float32

  Attributes:
    use_running_average: evaluation mode if true; pass it here or at call
      time, not both.
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    momentum: decay rate of the running BN statistics.
    epsilon: added to the mixed variance inside the square root.
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of the parameters.
    use_bias, use_scale: whether to create ``bias``/``scale``.
    bias_init, scale_init: initializers (zeros, ones).
    weights_init: initializer of ``mean_weights`` and ``var_weights``
      (ones).
    axis_name: named axis to synchronize the BN statistics over.
    axis_index_groups: groups of indices of ``axis_name``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
    >>> sn = jnn.SwitchableNorm()
    >>> variables = sn.init(jax.random.key(1), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, variables["params"])["mean_weights"]
    (3,)
    >>> y, updates = sn.apply(
    ...     variables, x, use_running_average=False, mutable=["batch_stats"])
    >>> y_eval = sn.apply({**variables, **updates}, x, use_running_average=True)
  """

  weights_init: Initializer = initializers.ones

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x`` ``(N, ..., C, ...)``; ``mask`` as in ``BatchNorm``."""
    x = jnp.asarray(x)
    use_ra, mean, var, scale, bias, sync = self._variables(x, use_running_average)
    mean_w = self.param("mean_weights", self.weights_init, (3,), self.param_dtype)
    var_w = self.param("var_weights", self.weights_init, (3,), self.param_dtype)
    out_dtype = _out_dtype(x, scale, bias, dtype=self.dtype)
    y, new_state = jn.switchable_norm(
      _as_inexact(x, out_dtype),
      jn.SwitchableNormParams(scale, bias, mean_w, var_w),
      jn.BatchNormState(mean.value, var.value),
      use_running_average=use_ra,
      axis=self.axis,
      momentum=self.momentum,
      epsilon=self.epsilon,
      mask=mask,
      dtype=out_dtype,
      **sync,
    )
    self._store(mean, var, new_state, use_ra)
    record_moments(self, x, self.axis, mask, use_ra)
    return y


class BatchRenorm(_RunningStatsNorm):
  """Batch renormalization (Ioffe 2017).

  Calls :func:`jaxnorm.batch_renorm`: in training, batch norm corrected
  toward the running statistics by ``r = clip(sigma_B / sigma, 1/r_max,
  r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, both under
  ``stop_gradient``; in evaluation, batch norm with the running statistics.
  The variables are those of :class:`flax.linen.BatchNorm`::

    params:      scale (C,), bias (C,)
    batch_stats: mean (C,) float32, var (C,) float32

  ``r_max`` and ``d_max`` may also be passed at call time, as traced
  arrays: that is how a warm-up schedule
  (:func:`jaxnorm.batch_renorm_schedule`) runs inside a jitted step.

  Attributes:
    use_running_average: evaluation mode if true; pass it here or at call
      time, not both.
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    momentum: decay rate of the running statistics.
    epsilon: added to the variances inside the square roots.
    r_max: default bound of ``r`` (at least 1).
    d_max: default bound of ``d`` (at least 0).
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale: whether to create ``bias``/``scale``.
    bias_init, scale_init: initializers (zeros, ones).
    axis_name: named axis to synchronize the batch statistics over.
    axis_index_groups: groups of indices of ``axis_name``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn, jaxnorm.linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> brn = jnn.BatchRenorm()
    >>> variables = brn.init(jax.random.key(1), x, use_running_average=False)
    >>> r_max, d_max = jn.batch_renorm_schedule(20_000)
    >>> y, updates = brn.apply(variables, x, use_running_average=False,
    ...                        r_max=r_max, d_max=d_max, mutable=["batch_stats"])
    >>> y.shape
    (8, 3)
  """

  r_max: float = 3.0
  d_max: float = 5.0

  @nn.compact
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
      r_max: overrides the field ``r_max`` (may be a traced scalar).
      d_max: overrides the field ``d_max`` (may be a traced scalar).
      mask: optional boolean array broadcastable to ``x``.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    x = jnp.asarray(x)
    use_ra, mean, var, scale, bias, sync = self._variables(x, use_running_average)
    out_dtype = _out_dtype(x, scale, bias, dtype=self.dtype)
    y, new_state = jn.batch_renorm(
      _as_inexact(x, out_dtype),
      jn.NormParams(scale, bias),
      jn.BatchNormState(mean.value, var.value),
      use_running_average=use_ra,
      axis=self.axis,
      momentum=self.momentum,
      epsilon=self.epsilon,
      r_max=self.r_max if r_max is None else r_max,
      d_max=self.d_max if d_max is None else d_max,
      mask=mask,
      dtype=out_dtype,
      **sync,
    )
    self._store(mean, var, new_state, use_ra)
    record_moments(self, x, self.axis, mask, use_ra)
    return y
