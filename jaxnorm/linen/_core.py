"""flax.linen drop-ins for ``flax.linen.{BatchNorm, LayerNorm, RMSNorm,
GroupNorm, InstanceNorm}``.

The modules create the same variables as flax (``params``: ``scale``,
``bias``; ``batch_stats``: ``mean``, ``var``) with the same shapes and dtypes,
and call the functional core for every number they return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes as flax_dtypes
from jax.nn import initializers

import jaxnorm as jn
from jaxnorm import _checks, _precise
from jaxnorm._batch_norm import check_running_stats

Axes = int | Sequence[int]
Dtype = Any
Initializer = Any


def _as_inexact(x: Any, out_dtype: Any) -> jax.Array:
  """``x`` as an array; integers are promoted to the output dtype, as flax does."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(out_dtype)
  return x


def _affine_params(module: nn.Module, shape: tuple[int, ...]) -> tuple[Any, Any]:
  """Creates flax's ``params/scale`` and ``params/bias`` (or ``None``), in order."""
  scale = (
    module.param("scale", module.scale_init, shape, module.param_dtype)
    if module.use_scale
    else None
  )
  bias = (
    module.param("bias", module.bias_init, shape, module.param_dtype)
    if module.use_bias
    else None
  )
  return scale, bias


def _out_dtype(x: Any, *params: Any, dtype: Dtype | None) -> Any:
  """Flax's output dtype: ``dtype`` or the promotion of ``x`` and the params."""
  return flax_dtypes.canonicalize_dtype(x, *params, dtype=dtype)


def _reduced_size(shape: tuple[int, ...], feature_axes: tuple[int, ...]) -> int:
  """How many values per channel batch norm reduces over (on one device)."""
  return math.prod(d for a, d in enumerate(shape) if a not in feature_axes)


def record_moments(
  module: nn.Module, x: jax.Array, axis: Axes, mask: Any, use_running_average: bool
) -> None:
  """Records the moments of a training call for ``recompute_batch_stats``.

  Only when the caller made the moments collection mutable: an ordinary
  training step computes nothing more.
  """
  if (
    use_running_average
    or module.is_initializing()
    or not module.is_mutable_collection(_precise.COLLECTION)
  ):
    return
  rows = _precise.batch_moments(
    _as_inexact(x, jnp.float32),
    axis=axis,
    mask=mask,
    axis_name=module.axis_name,
    axis_index_groups=module.axis_index_groups,
  )
  previous = None
  if module.has_variable(_precise.COLLECTION, "moments"):
    previous = module.get_variable(_precise.COLLECTION, "moments")
  module.put_variable(_precise.COLLECTION, "moments", _precise.record(previous, rows))


def _feature_shape(x: jax.Array, axes: Axes, name: str) -> tuple[int, ...]:
  canonical = _checks.canonicalize_axes(x.ndim, axes, name)
  return tuple(x.shape[a] for a in canonical)


class BatchNorm(nn.Module):
  """Batch normalization, a drop-in for :class:`flax.linen.BatchNorm`.

  Normalizes each channel (``axis``) over every other axis of the batch with
  :func:`jaxnorm.batch_norm`: per channel C over N, H, W of an image. The
  fields, call arguments, defaults and variables are flax's, so swapping
  ``flax.linen.BatchNorm`` for ``jaxnorm.linen.BatchNorm`` keeps training
  loops and checkpoints working::

    params:      scale (C,) param_dtype, bias (C,) param_dtype
    batch_stats: mean (C,) float32, var (C,) float32

  (the running statistics are in ``param_dtype`` when
  ``force_float32_reductions=False``, as in flax). The running update is
  ``new = momentum * old + (1 - momentum) * batch`` with the biased batch
  variance, so PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here.

  Differences from flax, all on purpose:

  * ``use_fast_variance`` is accepted for compatibility and ignored: the
    variance is always jaxnorm's exact two-pass formula, which does not
    lose digits when the mean is large (flax's default ``E[x^2] - E[x]^2``
    loses every digit on ``x = 1e4 + N(0, 1)`` in float32).
  * During ``init`` the statistics are thrown away (as in flax) and the
    named axis is not needed; when ``x`` holds a single value per channel
    (``model.init(key, jnp.ones((1, 784)))``) ``init`` normalizes with the
    running averages instead, so it still works. A real training call with
    a single value per channel raises ``ValueError``, since batch
    statistics of one value are meaningless. ``virtual_batch_size`` is also
    ignored during ``init``.
  * Statistics across devices (``axis_name``) are count-weighted, so masks
    and uneven shards are exact; the backward pass keeps only ``x`` and
    per-channel statistics.

  Attributes:
    use_running_average: if true, normalize with the stored ``batch_stats``
      instead of the statistics of the batch. Pass it here or at call time,
      not both.
    axis: the channel (feature) axis, or a tuple of axes: ``-1`` for NHWC,
      ``1`` for NCHW.
    momentum: decay rate of the running averages.
    epsilon: added to the variance inside the square root.
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: whether to add ``bias`` (beta).
    use_scale: whether to multiply by ``scale`` (gamma).
    bias_init: initializer of ``bias``, zeros by default.
    scale_init: initializer of ``scale``, ones by default.
    axis_name: named axis (``pmap``, ``shard_map``) to compute the batch
      statistics over; not needed under ``jit`` with sharded arrays.
    axis_index_groups: groups of indices of ``axis_name`` that are
      normalized separately, e.g. ``[[0, 1], [2, 3]]``.
    use_fast_variance: accepted for compatibility; see above.
    force_float32_reductions: if false, statistics are computed in the
      input dtype and the running averages are kept in ``param_dtype``.
    virtual_batch_size: jaxnorm extension: ``k`` for ghost batch norm
      (Hoffer et al. 2017), statistics of each group of ``k`` samples;
      ``None`` for plain batch norm.
    running_stats: jaxnorm extension: ``"flax"`` (the default), or
      ``"torch"`` for PyTorch's running statistics (unbiased running
      variance, ``momentum`` as PyTorch's weight of the new batch, e.g.
      ``0.1``, or ``None`` for the cumulative average), with an int32
      ``batch_stats/num_batches_tracked``; see :func:`jaxnorm.batch_norm`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> bn = jnn.BatchNorm(momentum=0.9)
    >>> x = jax.random.normal(jax.random.key(0), (8, 6))
    >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, variables["batch_stats"])
    {'mean': (6,), 'var': (6,)}
    >>> y, updates = bn.apply(
    ...     variables, x, use_running_average=False, mutable=["batch_stats"])
    >>> variables = {**variables, **updates}
    >>> y_eval = bn.apply(variables, x, use_running_average=True)
    >>> y.shape, y_eval.dtype
    ((8, 6), dtype('float32'))
  """

  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  virtual_batch_size: int | None = None
  running_stats: str = "flax"

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x`` with batch (training) or running (evaluation) statistics.

    Args:
      x: input ``(N, ..., C, ...)``.
      use_running_average: if true, use the stored ``batch_stats``; if false,
        use and update the batch statistics (``batch_stats`` must then be
        mutable). Pass it here or to the constructor, not both.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements
        do not enter the statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    use_running_average = bool(
      nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
      )
    )
    x = jnp.asarray(x)
    feature_axes = _checks.canonicalize_axes(x.ndim, self.axis, "axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable(
      "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape
    )
    ra_var = self.variable(
      "batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape
    )
    state = jn.BatchNormState(ra_mean.value, ra_var.value)
    torch_stats = check_running_stats(self.running_stats) == "torch"
    if torch_stats:
      tracked = self.variable(
        "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
      )
      state = jn.TorchBatchNormState(*state, tracked.value)
    scale, bias = _affine_params(self, feature_shape)
    out_dtype = _out_dtype(x, scale, bias, dtype=self.dtype)
    x = _as_inexact(x, out_dtype)

    initializing = self.is_initializing()
    extra = {}
    if self.virtual_batch_size is not None and not initializing:
      extra["virtual_batch_size"] = self.virtual_batch_size
    if initializing and _reduced_size(x.shape, feature_axes) <= 1:
      # init only needs shapes and throws the statistics away, and batch
      # statistics of one value are an error in jaxnorm: use the running ones.
      use_running_average = True
    y, new_state = jn.batch_norm(
      x,
      jn.NormParams(scale, bias),
      state,
      use_running_average=use_running_average,
      axis=feature_axes,
      momentum=self.momentum,
      epsilon=self.epsilon,
      # Like flax, init needs no bound named axis.
      axis_name=None if initializing else self.axis_name,
      axis_index_groups=None if initializing else self.axis_index_groups,
      mask=mask,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
      running_stats=self.running_stats,
      **extra,
    )
    if not use_running_average and not initializing:
      ra_mean.value = new_state.mean
      ra_var.value = new_state.var
      if torch_stats:
        tracked.value = new_state.num_batches_tracked
    record_moments(self, x, feature_axes, mask, use_running_average)
    return y


class LayerNorm(nn.Module):
  """Layer normalization (Ba et al. 2016), a drop-in for
  :class:`flax.linen.LayerNorm`.

  Normalizes every sample over ``reduction_axes`` with
  :func:`jaxnorm.layer_norm`:
  ``y = (x - E[x]) / sqrt(Var[x] + epsilon) * scale + bias``, with ``scale``
  and ``bias`` of the shape of ``x`` at ``feature_axes`` (``params``:
  ``scale``, ``bias``). For a transformer ``(B, T, D)`` the defaults
  normalize every token over ``D``; LN over C, H, W of an NHWC image is
  ``reduction_axes=(1, 2, 3)``.

  ``use_fast_variance`` is accepted for compatibility and ignored: the
  variance is always the exact two-pass formula.

  Attributes:
    epsilon: added to the variance inside the square root.
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init: initializer of ``bias``, zeros by default.
    scale_init: initializer of ``scale``, ones by default.
    reduction_axes: axes the statistics are taken over.
    feature_axes: axes ``scale`` and ``bias`` run along.
    axis_name: optional named axis to also reduce over (when the normalized
      axes are split across devices).
    axis_index_groups: optional groups of indices of ``axis_name``.
    use_fast_variance: accepted for compatibility; ignored.
    force_float32_reductions: if false, statistics stay in the input dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    >>> ln = jnn.LayerNorm()
    >>> variables = ln.init(jax.random.key(1), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (16,), 'scale': (16,)}}
    >>> y = ln.apply(variables, x)
    >>> bool(jnp.allclose(y.mean(-1), 0.0, atol=1e-5))
    True
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Applies layer normalization to ``x``.

    Args:
      x: the input.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements
        do not enter the statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    x = jnp.asarray(x)
    feature_shape = _feature_shape(x, self.feature_axes, "feature_axes")
    scale, bias = _affine_params(self, feature_shape)
    out_dtype = _out_dtype(x, scale, bias, dtype=self.dtype)
    return jn.layer_norm(
      _as_inexact(x, out_dtype),
      jn.NormParams(scale, bias),
      reduction_axes=self.reduction_axes,
      feature_axes=self.feature_axes,
      epsilon=self.epsilon,
      mask=mask,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
    )


class RMSNorm(nn.Module):
  """RMS normalization (Zhang & Sennrich 2019), a drop-in for
  :class:`flax.linen.RMSNorm`.

  Normalizes every sample by the root mean square over ``reduction_axes``
  with :func:`jaxnorm.rms_norm`: ``y = x / sqrt(E[x^2] + epsilon) * scale``.
  There is no bias (``params``: ``scale`` only).

  ``use_fast_variance`` is accepted for compatibility and ignored.

  Attributes:
    epsilon: added to the mean square inside the square root.
    dtype: dtype of the output (default: promoted from ``x`` and ``scale``).
    param_dtype: dtype of ``scale``.
    use_scale: whether to multiply by ``scale``.
    scale_init: initializer of ``scale``, ones by default.
    reduction_axes: axes the mean square is taken over.
    feature_axes: axes ``scale`` runs along.
    axis_name: optional named axis to also reduce over.
    axis_index_groups: optional groups of indices of ``axis_name``.
    use_fast_variance: accepted for compatibility; ignored.
    force_float32_reductions: if false, statistics stay in the input dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> x = jnp.array([[1.0, 7.0]])  # mean square 25
    >>> rms = jnn.RMSNorm(epsilon=0.0)
    >>> variables = rms.init(jax.random.key(0), x)
    >>> rms.apply(variables, x)
    Array([[0.2, 1.4]], dtype=float32)
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Applies RMS normalization to ``x``.

    Args:
      x: the input.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements
        do not enter the statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    x = jnp.asarray(x)
    feature_shape = _feature_shape(x, self.feature_axes, "feature_axes")
    scale = (
      self.param("scale", self.scale_init, feature_shape, self.param_dtype)
      if self.use_scale
      else None
    )
    out_dtype = _out_dtype(x, scale, dtype=self.dtype)
    return jn.rms_norm(
      _as_inexact(x, out_dtype),
      jn.NormParams(scale, None),
      reduction_axes=self.reduction_axes,
      feature_axes=self.feature_axes,
      epsilon=self.epsilon,
      mask=mask,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
    )


class GroupNorm(nn.Module):
  """Group normalization (Wu & He 2018), a drop-in for
  :class:`flax.linen.GroupNorm`.

  Splits the ``C`` channels into groups and normalizes every sample and
  group over the group's channels and every other non-batch axis (H, W and
  C/G), with :func:`jaxnorm.group_norm`; ``scale`` and ``bias`` are per
  channel (``params``: ``scale``, ``bias`` of shape ``(C,)``). One group is
  layer norm over C, H, W; ``group_size=1`` is instance norm.

  Give exactly one of ``num_groups`` and ``group_size`` (to give
  ``group_size``, pass ``num_groups=None``: the default of ``num_groups`` is
  32, the paper's). ``use_fast_variance`` is accepted for compatibility and
  ignored.

  Attributes:
    num_groups: number of groups ``G``, or ``None``.
    group_size: channels per group, or ``None``.
    epsilon: added to the variance inside the square root.
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init: initializer of ``bias``, zeros by default.
    scale_init: initializer of ``scale``, ones by default.
    reduction_axes: axes to reduce, which must include the channel axis.
      Default: every axis but the leading (batch) one. Give it explicitly
      when ``x`` has extra leading axes.
    axis_name: optional named axis to also reduce over.
    axis_index_groups: optional groups of indices of ``axis_name``.
    use_fast_variance: accepted for compatibility; ignored.
    force_float32_reductions: if false, statistics stay in the input dtype.
    axis: jaxnorm extension: the channel axis, ``-1`` (NHWC, flax's only
      choice) or ``1`` for NCHW.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    >>> gn = jnn.GroupNorm(num_groups=3)
    >>> variables = gn.init(jax.random.key(1), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (6,), 'scale': (6,)}}
    >>> y = gn.apply(variables, x)
    >>> y_nchw = jnn.GroupNorm(num_groups=3, axis=1).apply(
    ...     variables, x.transpose(0, 3, 1, 2))
    >>> bool(jnp.allclose(y_nchw, y.transpose(0, 3, 1, 2), atol=1e-5))
    True
  """

  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes | None = None
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  axis: int = -1

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Applies group normalization to ``x``.

    Args:
      x: input ``(N, ..., C)`` (or ``(N, C, ...)`` with ``axis=1``); an input
        of rank 1 is a single unbatched sample.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements
        do not enter the statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    x = jnp.asarray(x)
    feature_shape = _feature_shape(x, self.axis, "axis")
    scale, bias = _affine_params(self, feature_shape)
    out_dtype = _out_dtype(x, scale, bias, dtype=self.dtype)
    return jn.group_norm(
      _as_inexact(x, out_dtype),
      jn.NormParams(scale, bias),
      num_groups=self.num_groups,
      group_size=self.group_size,
      axis=self.axis,
      epsilon=self.epsilon,
      mask=mask,
      reduction_axes=self.reduction_axes,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
    )


class InstanceNorm(nn.Module):
  """Instance normalization (Ulyanov et al. 2016), a drop-in for
  :class:`flax.linen.InstanceNorm`.

  Normalizes every sample and channel over the remaining axes (H, W) with
  :func:`jaxnorm.instance_norm`; ``scale`` and ``bias`` have the shape of
  ``x`` at ``feature_axes`` (``params``: ``scale``, ``bias``). Axis 0 is the
  batch axis. ``feature_axes=1`` handles NCHW. ``use_fast_variance`` is
  accepted for compatibility and ignored.

  Attributes:
    epsilon: added to the variance inside the square root.
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init: initializer of ``bias``, zeros by default.
    scale_init: initializer of ``scale``, ones by default.
    feature_axes: the channel axis or axes (not 0, the batch axis).
    axis_name: optional named axis to also reduce over.
    axis_index_groups: optional groups of indices of ``axis_name``.
    use_fast_variance: accepted for compatibility; ignored.
    force_float32_reductions: if false, statistics stay in the input dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 3, 5, 5))  # NCHW
    >>> inorm = jnn.InstanceNorm(feature_axes=1)
    >>> variables = inorm.init(jax.random.key(1), x)
    >>> y = inorm.apply(variables, x)
    >>> bool(jnp.allclose(y.mean((2, 3)), 0.0, atol=1e-5))
    True
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Applies instance normalization to ``x``.

    Args:
      x: input ``(N, ..., C)``, batch axis first.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements
        do not enter the statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    x = jnp.asarray(x)
    feature_axes = _checks.canonicalize_axes(x.ndim, self.feature_axes, "feature_axes")
    if 0 in feature_axes:
      raise ValueError(
        f"`feature_axes`={self.feature_axes} includes axis 0, the batch axis of "
        "instance norm."
      )
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    scale, bias = _affine_params(self, feature_shape)
    out_dtype = _out_dtype(x, scale, bias, dtype=self.dtype)
    return jn.instance_norm(
      _as_inexact(x, out_dtype),
      jn.NormParams(scale, bias),
      axis=feature_axes,
      epsilon=self.epsilon,
      mask=mask,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
    )
