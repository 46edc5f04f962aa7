"""flax.nnx drop-ins for ``flax.nnx.{BatchNorm, LayerNorm, RMSNorm, GroupNorm,
InstanceNorm}``.

The modules hold the same attributes as flax (``scale``, ``bias`` as
``nnx.Param``; ``mean``, ``var`` as ``nnx.BatchStat``) with the same shapes
and dtypes, so ``nnx.state`` of a flax module loads into them unchanged, and
they call the functional core for every number they return.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

import jaxnorm as jn
from jaxnorm import _checks, _precise
from jaxnorm._batch_norm import check_running_stats
from jaxnorm._group_norm import resolve_groups
from jaxnorm.linen._core import _as_inexact

Axes = int | Sequence[int]
Dtype = Any
Initializer = Any
PromoteDtypeFn = Any

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})


def _make_param(
  init: Initializer,
  rngs: nnx.Rngs,
  shape: tuple[int, ...],
  dtype: Dtype,
  metadata: Mapping[str, Any],
) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), **metadata)


class BatchMoments(nnx.Variable):
  """``(3, C)`` rows ``count, mean, m2`` that ``recompute_batch_stats`` reads.

  Set on a layer only while ``recompute_batch_stats`` runs; not a
  ``BatchStat``, so filters of the model's state never see it.
  """


def record_moments(
  module: nnx.Module, x: jax.Array, axis: Axes, mask: Any, use_running_average: bool
) -> None:
  """Records the moments of a training call for ``recompute_batch_stats``."""
  sink = vars(module).get("_jaxnorm_moments")
  if use_running_average or sink is None:
    return
  rows = _precise.batch_moments(
    _as_inexact(x, jnp.float32),
    axis=axis,
    mask=mask,
    axis_name=module.axis_name,
    axis_index_groups=module.axis_index_groups,
  )
  sink[...] = _precise.merge_rows(sink[...], rows.astype(sink[...].dtype))


def _value(variable: Any) -> jax.Array | None:
  return None if variable is None else variable[...]


def _param_to(p: jax.Array | None, x: jax.Array, axes: Axes, name: str):
  """Reshapes a ``(num_features,)`` parameter to ``x``'s shape at ``axes``.

  flax.nnx stores LN/IN parameters flat as ``(num_features,)`` even for
  several feature axes; the functional core wants the feature shape.
  """
  if p is None:
    return None
  canonical = _checks.canonicalize_axes(x.ndim, axes, name)
  shape = tuple(x.shape[a] for a in canonical)
  if p.size != math.prod(shape):
    raise ValueError(
      f"`num_features`={p.size} does not match the input: `{name}`={axes} "
      f"selects a feature shape {shape} of an input of shape {x.shape}."
    )
  return p.reshape(shape)


class BatchNorm(nnx.Module):
  """Batch normalization, a drop-in for :class:`flax.nnx.BatchNorm`.

  Normalizes each channel (``axis``) over every other axis of the batch with
  :func:`jaxnorm.batch_norm`: per channel C over N, H, W of an image. The
  constructor and call arguments, defaults and attributes are flax's
  (``scale``, ``bias``: ``nnx.Param`` of shape ``(num_features,)``;
  ``mean``, ``var``: float32 ``nnx.BatchStat``), so ``nnx.state``,
  ``nnx.split``/``nnx.merge`` and checkpoints move between the two.
  ``model.train()`` / ``model.eval()`` and ``nnx.view(model,
  use_running_average=...)`` switch between batch and running statistics.

  The running update is ``new = momentum * old + (1 - momentum) * batch``
  with the biased batch variance (PyTorch's ``momentum=0.1`` is
  ``momentum=0.9`` here). ``use_fast_variance`` is accepted for
  compatibility and ignored: the variance is always jaxnorm's exact
  two-pass formula. A training call with a single value per channel
  raises ``ValueError`` (flax returns ``bias``): nnx modules start in
  training mode, so call ``model.eval()`` before a shape check such as
  ``model(jnp.ones((1, 784)))``.

  Args:
    num_features: the number of channels ``C``.
    use_running_average: if true, normalize with the stored running
      statistics; a value passed at call time takes precedence.
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    momentum: decay rate of the running averages.
    epsilon: added to the variance inside the square root.
    dtype: dtype of the output (default: promoted from the input, the
      statistics and the params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: whether to add ``bias`` (beta).
    use_scale: whether to multiply by ``scale`` (gamma).
    bias_init: initializer of ``bias``, zeros by default.
    scale_init: initializer of ``scale``, ones by default.
    axis_name: named axis (``pmap``, ``shard_map``) to compute the batch
      statistics over.
    axis_index_groups: groups of indices of ``axis_name`` that are
      normalized separately.
    use_fast_variance: accepted for compatibility; ignored.
    promote_dtype: flax's function that promotes ``(x, mean, var, scale,
      bias)`` to a common dtype before normalizing.
    rngs: random keys for the initializers.
    bias_metadata: metadata of the ``bias`` ``nnx.Param`` (e.g. sharding).
    scale_metadata: metadata of the ``scale`` ``nnx.Param``.
    force_float32_reductions: jaxnorm extension: if false, statistics are
      computed in the input dtype (the running averages stay float32).
    virtual_batch_size: jaxnorm extension: ``k`` for ghost batch norm
      (Hoffer et al. 2017); ``None`` for plain batch norm.
    running_stats: jaxnorm extension: ``"flax"`` (the default), or
      ``"torch"`` for PyTorch's running statistics (unbiased running
      variance, ``momentum`` as PyTorch's weight of the new batch, e.g.
      ``0.1``, or ``None`` for the cumulative average) with an int32
      ``num_batches_tracked`` ``nnx.BatchStat``; see
      :func:`jaxnorm.batch_norm`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> bn = jnx.BatchNorm(6, momentum=0.9, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (8, 6)) + 3.0
    >>> y = bn(x)  # training: batch statistics, running averages updated
    >>> bool(jnp.all(bn.mean[...] > 0.2))
    True
    >>> bn.eval()
    >>> y_eval = bn(x)  # running statistics, nothing updated
    >>> y_eval.shape
    (8, 6)
  """

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: int = -1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = nnx.initializers.zeros,
    scale_init: Initializer = nnx.initializers.ones,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    scale_metadata: Mapping[str, Any] = _NO_METADATA,
    force_float32_reductions: bool = True,
    virtual_batch_size: int | None = None,
    running_stats: str = "flax",
  ):
    shape = _checks.num_features_shape(num_features)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    if check_running_stats(running_stats) == "torch":
      self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.scale: nnx.Param | None
    if use_scale:
      self.scale = _make_param(scale_init, rngs, shape, param_dtype, scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = _make_param(bias_init, rngs, shape, param_dtype, bias_metadata)
    else:
      self.bias = nnx.data(None)
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
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.force_float32_reductions = force_float32_reductions
    self.virtual_batch_size = virtual_batch_size
    self.running_stats = running_stats

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
      use_running_average: if true, use the running statistics; if false,
        use and update the batch statistics. Takes precedence over the
        attribute of that name.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements
        do not enter the statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
        "No `use_running_average` was given to BatchNorm: pass it to the "
        "constructor, to the call, or set it with `model.train()` / "
        "`model.eval()` or `nnx.view(model, use_running_average=...)`."
      )
    x, mean, var, scale, bias = self.promote_dtype(
      (x, self.mean[...], self.var[...], _value(self.scale), _value(self.bias)),
      dtype=self.dtype,
    )
    out_dtype = nnx_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    x = _as_inexact(x, out_dtype)
    if not use_running_average:
      # Update the running averages from the stored float32 values, not
      # from copies promote_dtype may have rounded to a lower precision.
      mean, var = self.mean[...], self.var[...]
    extra = {}
    if self.virtual_batch_size is not None:
      extra["virtual_batch_size"] = self.virtual_batch_size
    state = jn.BatchNormState(mean, var)
    if self.running_stats == "torch":
      state = jn.TorchBatchNormState(mean, var, self.num_batches_tracked[...])
    y, new_state = jn.batch_norm(
      x,
      jn.NormParams(scale, bias),
      state,
      use_running_average=bool(use_running_average),
      axis=self.axis,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      mask=mask,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
      running_stats=self.running_stats,
      **extra,
    )
    if not use_running_average:
      # The running averages are state, never differentiated through.
      self.mean[...] = jax.lax.stop_gradient(new_state.mean)
      self.var[...] = jax.lax.stop_gradient(new_state.var)
      if self.running_stats == "torch":
        self.num_batches_tracked[...] = new_state.num_batches_tracked
    record_moments(self, x, self.axis, mask, bool(use_running_average))
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``.

    Args:
      use_running_average: if true, the running statistics are used instead
        of the statistics of the batch.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class LayerNorm(nnx.Module):
  """Layer normalization (Ba et al. 2016), a drop-in for
  :class:`flax.nnx.LayerNorm`.

  Normalizes every sample over ``reduction_axes`` with
  :func:`jaxnorm.layer_norm`:
  ``y = (x - E[x]) / sqrt(Var[x] + epsilon) * scale + bias``, with
  ``scale`` and ``bias`` (``nnx.Param`` of shape ``(num_features,)``) along
  ``feature_axes``. ``use_fast_variance`` is accepted for compatibility and
  ignored: the variance is always the exact two-pass formula.

  Args:
    num_features: the size of the feature axes (their product, for several).
    epsilon: added to the variance inside the square root.
    dtype: dtype of the output (default: promoted from ``x`` and the params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init: initializer of ``bias``, zeros by default.
    scale_init: initializer of ``scale``, ones by default.
    reduction_axes: axes the statistics are taken over.
    feature_axes: axes ``scale`` and ``bias`` run along.
    axis_name: optional named axis to also reduce over.
    axis_index_groups: optional groups of indices of ``axis_name``.
    use_fast_variance: accepted for compatibility; ignored.
    promote_dtype: flax's function that promotes ``(x, scale, bias)`` to a
      common dtype.
    rngs: random keys for the initializers.
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    scale_metadata: metadata of the ``scale`` ``nnx.Param``.
    force_float32_reductions: jaxnorm extension: if false, statistics stay
      in the input dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> ln = jnx.LayerNorm(16, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    >>> bool(jnp.allclose(ln(x).mean(-1), 0.0, atol=1e-5))
    True
  """

  def __init__(
    self,
    num_features: int,
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = nnx.initializers.zeros,
    scale_init: Initializer = nnx.initializers.ones,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    scale_metadata: Mapping[str, Any] = _NO_METADATA,
    force_float32_reductions: bool = True,
  ):
    shape = _checks.num_features_shape(num_features)
    self.scale: nnx.Param | None
    if use_scale:
      self.scale = _make_param(scale_init, rngs, shape, param_dtype, scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = _make_param(bias_init, rngs, shape, param_dtype, bias_metadata)
    else:
      self.bias = nnx.data(None)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.force_float32_reductions = force_float32_reductions

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Applies layer normalization to ``x``.

    Args:
      x: the input.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements
        do not enter the statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    x, scale, bias = self.promote_dtype(
      (x, _value(self.scale), _value(self.bias)), dtype=self.dtype
    )
    out_dtype = nnx_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    x = _as_inexact(x, out_dtype)
    return jn.layer_norm(
      x,
      jn.NormParams(
        _param_to(scale, x, self.feature_axes, "feature_axes"),
        _param_to(bias, x, self.feature_axes, "feature_axes"),
      ),
      reduction_axes=self.reduction_axes,
      feature_axes=self.feature_axes,
      epsilon=self.epsilon,
      mask=mask,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
    )


class RMSNorm(nnx.Module):
  """RMS normalization (Zhang & Sennrich 2019), a drop-in for
  :class:`flax.nnx.RMSNorm`.

  Normalizes every sample by the root mean square over ``reduction_axes``
  with :func:`jaxnorm.rms_norm`: ``y = x / sqrt(E[x^2] + epsilon) * scale``
  (``scale``: ``nnx.Param`` of shape ``(num_features,)``; no bias).
  ``use_fast_variance`` is accepted for compatibility and ignored.

  Args:
    num_features: the size of the feature axes (their product, for several).
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
    promote_dtype: flax's function that promotes ``(x, scale)`` to a common
      dtype.
    rngs: random keys for the initializer.
    scale_metadata: metadata of the ``scale`` ``nnx.Param``.
    force_float32_reductions: jaxnorm extension: if false, statistics stay
      in the input dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> rms = jnx.RMSNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))
    >>> rms(jnp.array([[1.0, 7.0]]))  # mean square 25
    Array([[0.2, 1.4]], dtype=float32)
  """

  def __init__(
    self,
    num_features: int,
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_scale: bool = True,
    scale_init: Initializer = nnx.initializers.ones,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
    rngs: nnx.Rngs,
    scale_metadata: Mapping[str, Any] = _NO_METADATA,
    force_float32_reductions: bool = True,
  ):
    self.scale: nnx.Param | None
    if use_scale:
      self.scale = _make_param(
        scale_init,
        rngs,
        _checks.num_features_shape(num_features),
        param_dtype,
        scale_metadata,
      )
    else:
      self.scale = nnx.data(None)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.force_float32_reductions = force_float32_reductions

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Applies RMS normalization to ``x``.

    Args:
      x: the input.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements
        do not enter the statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    x, scale = self.promote_dtype((x, _value(self.scale)), dtype=self.dtype)
    out_dtype = nnx_dtypes.canonicalize_dtype(x, scale, dtype=self.dtype)
    x = _as_inexact(x, out_dtype)
    return jn.rms_norm(
      x,
      jn.NormParams(_param_to(scale, x, self.feature_axes, "feature_axes"), None),
      reduction_axes=self.reduction_axes,
      feature_axes=self.feature_axes,
      epsilon=self.epsilon,
      mask=mask,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
    )


class GroupNorm(nnx.Module):
  """Group normalization (Wu & He 2018), a drop-in for
  :class:`flax.nnx.GroupNorm`.

  Splits the ``C`` channels into groups and normalizes every sample and
  group over the group's channels and every other non-batch axis (H, W and
  C/G) with :func:`jaxnorm.group_norm`; ``scale`` and ``bias`` are
  per-channel ``nnx.Param`` of shape ``(num_features,)``. One group is layer
  norm over C, H, W; ``group_size=1`` is instance norm. Give exactly one of
  ``num_groups`` and ``group_size`` (pass ``num_groups=None`` to give
  ``group_size``); like flax, the attributes ``num_groups`` and
  ``group_size`` hold both resolved values. ``use_fast_variance`` is
  accepted for compatibility and ignored.

  Args:
    num_features: the number of channels ``C``.
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
      Default: every axis but the leading (batch) one.
    axis_name: optional named axis to also reduce over.
    axis_index_groups: optional groups of indices of ``axis_name``.
    use_fast_variance: accepted for compatibility; ignored.
    promote_dtype: flax's function that promotes ``(x, scale, bias)`` to a
      common dtype.
    rngs: random keys for the initializers.
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    scale_metadata: metadata of the ``scale`` ``nnx.Param``.
    force_float32_reductions: jaxnorm extension: if false, statistics stay
      in the input dtype.
    axis: jaxnorm extension: the channel axis, ``-1`` (NHWC, flax's only
      choice, also kept as the attribute ``feature_axis``) or ``1`` (NCHW).

  Raises:
    ValueError: both or neither of ``num_groups`` and ``group_size``, or
      ``num_features`` not divisible by them.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> gn = jnx.GroupNorm(6, num_groups=3, axis=1, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (2, 6, 4, 4))  # NCHW
    >>> y = gn(x).reshape(2, 3, 2, 4, 4)  # groups of 2 channels
    >>> bool(jnp.allclose(y.mean((2, 3, 4)), 0.0, atol=1e-5))
    True
  """

  def __init__(
    self,
    num_features: int,
    num_groups: int | None = 32,
    group_size: int | None = None,
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = nnx.initializers.zeros,
    scale_init: Initializer = nnx.initializers.ones,
    reduction_axes: Axes | None = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    scale_metadata: Mapping[str, Any] = _NO_METADATA,
    force_float32_reductions: bool = True,
    axis: int = -1,
  ):
    # Checked here, like flax, so a bad configuration fails at construction.
    self.num_groups = resolve_groups(num_features, num_groups, group_size)
    self.group_size = num_features // self.num_groups
    self.feature_axis = axis
    shape = _checks.num_features_shape(num_features)
    self.scale: nnx.Param | None
    if use_scale:
      self.scale = _make_param(scale_init, rngs, shape, param_dtype, scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = _make_param(bias_init, rngs, shape, param_dtype, bias_metadata)
    else:
      self.bias = nnx.data(None)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.force_float32_reductions = force_float32_reductions

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
    x, scale, bias = self.promote_dtype(
      (x, _value(self.scale), _value(self.bias)), dtype=self.dtype
    )
    out_dtype = nnx_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    return jn.group_norm(
      _as_inexact(x, out_dtype),
      jn.NormParams(scale, bias),
      num_groups=self.num_groups,
      group_size=None,
      axis=self.feature_axis,
      epsilon=self.epsilon,
      mask=mask,
      reduction_axes=self.reduction_axes,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
    )


class InstanceNorm(nnx.Module):
  """Instance normalization (Ulyanov et al. 2016), a drop-in for
  :class:`flax.nnx.InstanceNorm`.

  Normalizes every sample and channel over the remaining axes (H, W) with
  :func:`jaxnorm.instance_norm`; ``scale`` and ``bias`` (``nnx.Param`` of
  shape ``(num_features,)``) run along ``feature_axes``. Axis 0 is the batch
  axis; ``feature_axes=1`` handles NCHW. ``use_fast_variance`` is accepted
  for compatibility and ignored.

  Args:
    num_features: the number of channels (the product of the feature axes).
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
    promote_dtype: flax's function that promotes ``(x, scale, bias)`` to a
      common dtype.
    rngs: random keys for the initializers.
    bias_metadata: metadata of the ``bias`` ``nnx.Param``.
    scale_metadata: metadata of the ``scale`` ``nnx.Param``.
    force_float32_reductions: jaxnorm extension: if false, statistics stay
      in the input dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> inorm = jnx.InstanceNorm(3, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))  # NHWC
    >>> bool(jnp.allclose(inorm(x).mean((1, 2)), 0.0, atol=1e-5))
    True
  """

  def __init__(
    self,
    num_features: int,
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = nnx.initializers.zeros,
    scale_init: Initializer = nnx.initializers.ones,
    feature_axes: Axes = -1,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    scale_metadata: Mapping[str, Any] = _NO_METADATA,
    force_float32_reductions: bool = True,
  ):
    shape = _checks.num_features_shape(num_features)
    self.scale: nnx.Param | None
    if use_scale:
      self.scale = _make_param(scale_init, rngs, shape, param_dtype, scale_metadata)
    else:
      self.scale = None
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = _make_param(bias_init, rngs, shape, param_dtype, bias_metadata)
    else:
      self.bias = None
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.force_float32_reductions = force_float32_reductions

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Applies instance normalization to ``x``.

    Args:
      x: input ``(N, ..., C)``, batch axis first.
      mask: optional boolean array broadcastable to ``x``; ``False`` elements
        do not enter the statistics.

    Returns:
      The normalized input, of the shape of ``x``.
    """
    x, scale, bias = self.promote_dtype(
      (x, _value(self.scale), _value(self.bias)), dtype=self.dtype
    )
    out_dtype = nnx_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    x = _as_inexact(x, out_dtype)
    feature_axes = _checks.canonicalize_axes(x.ndim, self.feature_axes, "feature_axes")
    if 0 in feature_axes:
      raise ValueError(
        f"`feature_axes`={self.feature_axes} includes axis 0, the batch axis of "
        "instance norm."
      )
    return jn.instance_norm(
      x,
      jn.NormParams(
        _param_to(scale, x, feature_axes, "feature_axes"),
        _param_to(bias, x, feature_axes, "feature_axes"),
      ),
      axis=feature_axes,
      epsilon=self.epsilon,
      mask=mask,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
    )
