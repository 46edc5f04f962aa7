"""Batch normalization (Ioffe & Szegedy, 2015)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm import _checks, _stats
from jaxnorm._types import BatchNormState, NormParams, TorchBatchNormState


def _as_shape(num_features: int | Sequence[int], name: str) -> tuple[int, ...]:
  if _checks.is_int(num_features):
    shape = (int(num_features),)
  else:
    try:
      shape = tuple(num_features)
    except TypeError:
      shape = None
    if shape is None or not all(_checks.is_int(d) for d in shape):
      raise TypeError(
        f"`{name}` must be an int or a tuple of ints, got {num_features!r}."
      )
    shape = tuple(int(d) for d in shape)
  if any(d <= 0 for d in shape):
    raise ValueError(f"`{name}` must be positive, got {num_features!r}.")
  return shape


def batch_norm_init(
  num_features: int | Sequence[int],
  *,
  use_scale: bool = True,
  use_bias: bool = True,
  param_dtype: Any = jnp.float32,
  running_stats: str = "flax",
) -> tuple[NormParams, BatchNormState | TorchBatchNormState]:
  """Creates batch-norm parameters and running statistics.

  Needs no RNG key, no data and no named axis.

  Args:
    num_features: ``C``, the size of the channel axis (a tuple when ``axis``
      of :func:`batch_norm` names several axes).
    use_scale: whether to create ``scale`` (ones); otherwise it is ``None``.
    use_bias: whether to create ``bias`` (zeros); otherwise it is ``None``.
    param_dtype: dtype of ``scale`` and ``bias``. The state is float32.
    running_stats: ``"flax"`` (the default) for a ``BatchNormState``;
      ``"torch"`` for a :class:`jaxnorm.TorchBatchNormState`, which also
      counts ``num_batches_tracked`` (int32, 0), for
      :func:`batch_norm` with ``running_stats="torch"``.

  Returns:
    ``(params, state)``: ``NormParams(scale, bias)`` of shape ``(C,)`` and
    ``BatchNormState(mean=zeros, var=ones)`` of shape ``(C,)`` (or the
    ``TorchBatchNormState`` with ``num_batches_tracked=0``).

  Examples:
    >>> import jaxnorm as jn
    >>> params, state = jn.batch_norm_init(3)
    >>> params.scale, state.var
    (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
  """
  shape = _as_shape(num_features, "num_features")
  params = NormParams(
    scale=jnp.ones(shape, param_dtype) if use_scale else None,
    bias=jnp.zeros(shape, param_dtype) if use_bias else None,
  )
  mean, var = jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32)
  if check_running_stats(running_stats) == "torch":
    return params, TorchBatchNormState(mean, var, jnp.zeros((), jnp.int32))
  return params, BatchNormState(mean, var)


def check_running_stats(running_stats: Any) -> str:
  """``"flax"`` or ``"torch"``, or raises naming ``running_stats``."""
  if running_stats not in ("flax", "torch"):
    raise ValueError(
      f'`running_stats` must be "flax" or "torch", got {running_stats!r}.'
    )
  return running_stats


def batch_norm(
  x: ArrayLike,
  params: NormParams,
  state: BatchNormState,
  *,
  use_running_average: bool,
  axis: int | Sequence[int] = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-5,
  axis_name: Hashable | None = None,
  axis_index_groups: Any = None,
  mask: ArrayLike | None = None,
  dtype: Any = None,
  force_float32_reductions: bool = True,
  virtual_batch_size: int | None = None,
  running_stats: str = "flax",
) -> tuple[jax.Array, BatchNormState | TorchBatchNormState]:
  r"""Batch normalization: per channel, over every other axis of the batch.

  In training (``use_running_average=False``) the mean ``mu`` and the biased
  variance ``sigma^2`` are taken over every axis of ``x`` except ``axis``:
  over N, H, W of an NHWC or NCHW image, per channel C.

  .. math::
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot \mathrm{scale}
        + \mathrm{bias}, \qquad
    \mathrm{state}' = m \cdot \mathrm{state} + (1 - m) \cdot (\mu, \sigma^2)

  The running variance is the biased one (flax's convention; PyTorch stores
  the unbiased one), and ``momentum`` is the weight of the old value, so
  PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here. In evaluation
  (``use_running_average=True``) the running statistics are used and the
  state comes back unchanged.

  Statistics are accumulated in at least float32 and do not lose digits
  when the mean is large: the variance is the corrected two-pass of Chan,
  Golub & LeVeque (a shift near the mean, then the squared deviations from
  it, corrected by their sum), within 1e-5 of float64 at ``1e6 + N(0, 1)``
  in float32, across devices too (``E[x^2] - E[x]^2`` loses every digit of
  ``1e4 + N(0, 1)``). The output has the dtype of ``x`` (or ``dtype``).
  Reverse mode keeps only ``x`` and per-channel statistics; derivatives of
  every order are exact. Under SPMD ``jit`` with the batch sharded it costs
  one collective forward and one backward, on Explicit and Auto meshes
  alike (see ``docs/parallel.md``).

  With ``axis_name`` (under ``pmap``, ``shard_map`` or a named ``vmap``)
  the statistics are those of the union of every device's elements, each
  device weighted by its count, in a single ``psum``; ``axis_index_groups``
  restricts that to groups of devices. Under ``jax.jit`` with sharded
  inputs no ``axis_name`` is needed.

  **PyTorch's running statistics** (``running_stats="torch"``, with a
  :class:`jaxnorm.TorchBatchNormState` from
  ``batch_norm_init(..., running_stats="torch")``) reproduce
  ``torch.nn.BatchNorm2d``'s buffers step for step. The normalization is the
  same; only the update differs:

  .. math::
    \mathrm{mean}' = (1 - f) \cdot \mathrm{mean} + f \cdot \mu, \qquad
    \mathrm{var}' = (1 - f) \cdot \mathrm{var}
        + f \cdot \sigma^2 \frac{n}{n - 1}

  with PyTorch's meaning of ``momentum``: ``f = momentum`` is the weight of
  the *new* batch (pass ``momentum=0.1``, PyTorch's default), and
  ``momentum=None`` is the cumulative average ``f = 1 / t`` over the
  ``t = num_batches_tracked`` training calls so far, counted in the state.
  The running variance is the unbiased one, with ``n`` the number of
  elements per channel (summed over the devices of ``axis_name`` and over
  the batch shards under SPMD ``jit``, as ``SyncBatchNorm`` does; masked
  elements do not count; a channel with ``n = 1`` adds its biased variance,
  0, where PyTorch would divide by zero). A batch with nothing in it counts
  no batch and leaves the state as it was. Ghost batches
  (``virtual_batch_size``) have no PyTorch counterpart and are refused.

  **Ghost batch norm** (Hoffer et al., 2017, "Train longer, generalize
  better"): with ``virtual_batch_size=k``, axis 0 is split into ``N // k``
  consecutive groups of ``k`` samples and each group is normalized with its
  own statistics (over its ``k`` samples and every non-channel axis). The
  running mean and variance move toward the mean, over the groups, of each
  group's mean and variance. Evaluation is unchanged. With ``axis_name``,
  each device's ghost batches are its own (groups never span devices, as
  when every device runs ghost BN on its shard); only the running-state
  update averages the group statistics of every device (of the group in
  ``axis_index_groups``), so the new state is identical on every device.
  With a ``mask``, a group whose elements are all masked out does not enter
  that average.

  Args:
    x: input ``(N, ..., C, ...)``, floating point.
    params: ``NormParams(scale, bias)``, each of shape ``(C,)`` or ``None``.
    state: ``BatchNormState(mean, var)`` of shape ``(C,)``.
    use_running_average: ``True`` to normalize with the running statistics
      (evaluation), ``False`` to use and update batch statistics (training).
    axis: the channel axis (or axes), kept; every other axis is reduced.
      ``-1`` for NHWC, ``1`` for NCHW.
    momentum: weight of the old running statistics (with
      ``running_stats="torch"``: PyTorch's weight of the new batch, or
      ``None`` for the cumulative average).
    epsilon: added to the variance inside the square root.
    axis_name: named axis to reduce the statistics over, or ``None``.
    axis_index_groups: optional groups of indices along ``axis_name``.
    mask: optional boolean array broadcastable to ``x``; ``False`` elements
      do not enter the statistics (they are still normalized).
    dtype: output dtype (default: the dtype of ``x``). Statistics use at
      least float32 and at least this dtype.
    force_float32_reductions: when ``False``, statistics are computed in the
      input dtype instead of at least float32 (flax's flag of that name).
    virtual_batch_size: ``k`` for ghost batch norm, or ``None`` (plain BN,
      the default). ``k`` must divide ``x.shape[0]``.
    running_stats: ``"flax"`` (the default; the conventions above) or
      ``"torch"`` (PyTorch's running statistics, described above; ``state``
      must then be a :class:`jaxnorm.TorchBatchNormState`).

  Returns:
    ``(y, new_state)``: ``y`` of the shape of ``x``, and the updated state
    (the same object as ``state`` when ``use_running_average`` is true).

  Raises:
    TypeError: ``x`` is not floating point, or ``use_running_average`` is
      not a Python or NumPy bool.
    ValueError: ``axis`` out of range, parameter or state shapes that do not
      match ``x``, a ``mask`` that does not broadcast, an unbound
      ``axis_name``, bad ``axis_index_groups``, a single value per
      channel in training, or a ``virtual_batch_size`` that does not divide
      the batch.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jax.random.normal(jax.random.key(0), (8, 5, 5, 3)) * 2.0 + 1.0
    >>> params, state = jn.batch_norm_init(3)
    >>> y, state = jn.batch_norm(x, params, state, use_running_average=False)
    >>> y.shape, bool(jnp.allclose(y.mean((0, 1, 2)), 0.0, atol=1e-5))
    ((8, 5, 5, 3), True)
    >>> y_eval, _ = jn.batch_norm(x, params, state, use_running_average=True)

    Ghost batch norm, two groups of four samples:

    >>> y, state = jn.batch_norm(
    ...     x, params, state, use_running_average=False, virtual_batch_size=4)
    >>> bool(jnp.allclose(y[:4].mean((0, 1, 2)), 0.0, atol=1e-5))
    True

    PyTorch's running statistics (``momentum=None``: cumulative average):

    >>> params, state = jn.batch_norm_init(3, running_stats="torch")
    >>> y, state = jn.batch_norm(x, params, state, use_running_average=False,
    ...                          momentum=None, running_stats="torch")
    >>> int(state.num_batches_tracked)
    1
  """
  x = _checks.check_input(x)
  _checks.check_fields(params, "params", NormParams)
  _checks.check_fields(state, "state", BatchNormState)
  use_running_average = _checks.as_bool(use_running_average, "use_running_average")
  torch_stats = check_running_stats(running_stats) == "torch"
  if torch_stats:
    _check_torch_state(state)
    if virtual_batch_size is not None:
      raise ValueError(
        '`running_stats="torch"` cannot be combined with `virtual_batch_size`: '
        "PyTorch has no ghost batch norm whose running statistics to match."
      )
  else:
    check_flax_state(state)
  if not (torch_stats and momentum is None):
    momentum = _checks.check_hyper(momentum, "momentum", high=1.0)
  feature_axes = _checks.canonicalize_axes(x.ndim, axis, "axis")
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  fshape = _checks.feature_shape(x.shape, feature_axes)
  bshape = _checks.broadcast_shape(x.ndim, x.shape, feature_axes)
  scale = _checks.check_param(params.scale, fshape, "params.scale", x.dtype)
  bias = _checks.check_param(params.bias, fshape, "params.bias", x.dtype)
  mean_state = _checks.check_param(
    state.mean, fshape, "state.mean", x.dtype, required=True
  )
  var_state = _checks.check_param(
    state.var, fshape, "state.var", x.dtype, required=True
  )
  mask = _checks.check_mask(mask, x.shape)
  stats_dtype = _checks.compute_dtype(x.dtype, dtype, force_float32_reductions)
  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  scale_b = None if scale is None else scale.reshape(bshape)
  bias_b = None if bias is None else bias.reshape(bshape)

  if use_running_average:
    y = _stats.normalize_with(
      x,
      mean_state.reshape(bshape),
      var_state.reshape(bshape),
      scale=scale_b,
      bias=bias_b,
      epsilon=epsilon,
      dtype=stats_dtype,
      out_dtype=out_dtype,
      mask=mask,
    )
    return y, state

  if virtual_batch_size is not None:
    return _ghost_batch_norm(
      x,
      scale_b,
      bias_b,
      mean_state,
      var_state,
      virtual_batch_size=virtual_batch_size,
      feature_axes=feature_axes,
      momentum=momentum,
      epsilon=epsilon,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      mask=mask,
      stats_dtype=stats_dtype,
      out_dtype=out_dtype,
    )
  check_batch_size(x.shape, reduction_axes, axis_name, axis_index_groups, mask)
  y, mean, var, count = _stats.normalize_over(
    x,
    axes=reduction_axes,
    scale=scale_b,
    bias=bias_b,
    mask=mask,
    use_mean=True,
    epsilon=epsilon,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    dtype=stats_dtype,
    out_dtype=out_dtype,
  )
  if isinstance(count, np.ndarray):
    # Known at trace time (no mask, no named axis): when every channel has
    # elements, the update needs no select.
    count = np.broadcast_to(count, mean.shape).reshape(fshape)
    seen = None if count.all() else count > 0
  else:
    count = jnp.broadcast_to(count, mean.shape).reshape(fshape)
    seen = count > 0
  mean, var = mean.reshape(fshape), var.reshape(fshape)
  if torch_stats:
    return y, _torch_update(state, mean, var, count, momentum)
  new_state = BatchNormState(
    mean=_ema(mean_state, mean, momentum, seen),
    var=_ema(var_state, var, momentum, seen),
  )
  return y, new_state


def check_flax_state(state: Any) -> None:
  """Refuses a :class:`TorchBatchNormState` where flax's convention applies:
  it would silently lose ``num_batches_tracked`` and mix a biased batch
  variance into its unbiased running one."""
  if isinstance(state, TorchBatchNormState):
    raise TypeError(
      "`state` is a jaxnorm.TorchBatchNormState (unbiased running variance, "
      "PyTorch's momentum), which only batch_norm with "
      '`running_stats="torch"` takes; this call keeps flax\'s statistics in a '
      "jaxnorm.BatchNormState."
    )


def _check_torch_state(state: Any) -> None:
  if not isinstance(state, TorchBatchNormState):
    raise TypeError(
      '`running_stats="torch"` needs `state` to be a jaxnorm.TorchBatchNormState '
      "(mean, var, num_batches_tracked), from "
      f'`batch_norm_init(..., running_stats="torch")`; got {type(state).__name__}.'
    )
  tracked = jnp.asarray(state.num_batches_tracked)
  if tracked.ndim != 0 or not jnp.issubdtype(tracked.dtype, jnp.integer):
    raise TypeError(
      "`state.num_batches_tracked` must be an integer scalar, got "
      f"{tracked.dtype} of shape {tracked.shape}."
    )


def _torch_update(
  state: TorchBatchNormState,
  mean: jax.Array,
  var: jax.Array,
  count: jax.Array,
  momentum: Any,
) -> TorchBatchNormState:
  """PyTorch's running-statistics update (see :func:`batch_norm`)."""
  seen = count > 0
  any_seen = jnp.any(seen)
  tracked = state.num_batches_tracked
  tracked = tracked + any_seen.astype(tracked.dtype)
  if momentum is None:
    # PyTorch's cumulative average: the t-th batch has weight 1/t.
    factor = 1.0 / jnp.maximum(tracked, 1).astype(jnp.float32)
  else:
    factor = momentum
  # Bessel's correction with the count over every device; n = 1 keeps the
  # biased variance (0) rather than dividing by zero.
  unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))
  old_weight = 1.0 - factor
  return TorchBatchNormState(
    mean=_ema(state.mean, mean, old_weight, seen),
    var=_ema(state.var, unbiased, old_weight, seen),
    num_batches_tracked=tracked,
  )


def check_batch_size(
  x_shape: tuple[int, ...],
  reduction_axes: tuple[int, ...],
  axis_name: Hashable | None,
  axis_index_groups: Any,
  mask: jax.Array | None,
) -> None:
  """Raises unless training statistics see more than one value per channel."""
  size, _ = _checks.check_axis_name(axis_name, axis_index_groups)
  per_device = math.prod(x_shape[a] for a in reduction_axes)
  group = size if axis_index_groups is None else len(axis_index_groups[0])
  try:
    single = per_device * group == 1
  except Exception:  # a symbolic batch size (jax.export): cannot be decided
    single = False
  if mask is None and single:
    raise ValueError(
      f"Expected more than 1 value per channel in training mode, got `x` of "
      f"shape {x_shape} reduced over axes {reduction_axes}: batch statistics "
      "of a single value are meaningless. Pass `use_running_average=True` or "
      "a larger batch."
    )


def _ghost_batch_norm(
  x,
  scale_b,
  bias_b,
  mean_state,
  var_state,
  *,
  virtual_batch_size,
  feature_axes,
  momentum,
  epsilon,
  axis_name,
  axis_index_groups,
  mask,
  stats_dtype,
  out_dtype,
):
  """Ghost BN: batch norm of each group of ``k`` consecutive samples."""
  k = virtual_batch_size
  k = _checks.as_int(k, "virtual_batch_size", least=1)
  if 0 in feature_axes:
    raise ValueError(
      "`virtual_batch_size` splits the batch axis 0, which `axis` names as a "
      "channel axis."
    )
  n = x.shape[0]
  if n % k:
    # A symbolic batch size (jax.export) b is not known to be a multiple of k.
    symbolic = (
      ""
      if isinstance(n, int)
      else (
        f" A symbolic batch size must be declared a multiple of {k}, e.g. "
        f'jax.export.symbolic_shape("{k}*b, ...").'
      )
    )
    raise ValueError(
      f"`virtual_batch_size`={k} does not divide the batch size {n} (axis 0 "
      f"of `x`, shape {x.shape}).{symbolic}"
    )
  sync = _stats.make_sync(axis_name, axis_index_groups)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  if (
    mask is None and math.prod(k if a == 0 else x.shape[a] for a in reduction_axes) <= 1
  ):
    raise ValueError(
      f"`virtual_batch_size`={k} leaves a single value per channel in each "
      f"ghost batch of `x` of shape {x.shape}: batch statistics of a single "
      "value are meaningless."
    )
  # Every sample gets the statistics of its own group of k (see
  # _stats._segment_sum: no reshape of the batch axis, which may be sharded).
  y, mean, var, _ = _stats.normalize_over(
    x,
    axes=reduction_axes,
    scale=scale_b,
    bias=bias_b,
    mask=mask,
    use_mean=True,
    epsilon=epsilon,
    axis_name=None,  # Ghost batches are per device: see the docstring.
    axis_index_groups=None,
    dtype=stats_dtype,
    out_dtype=out_dtype,
    segment=k,
  )
  # The running state moves toward the average over groups (of every
  # device) of each group's statistics. Every group has k samples, so that
  # is the average over samples, leaving out groups with nothing in them.
  fshape = mean_state.shape
  rows = (n, math.prod(fshape))
  if mask is None:
    weight = jnp.ones((n, 1), stats_dtype)
  else:
    inner = tuple(a for a in reduction_axes if a != 0)
    has = jnp.any(mask, axis=inner, keepdims=True) if inner else mask
    has = jnp.broadcast_to(has, mean.shape).reshape(rows).astype(stats_dtype)
    weight = (_stats._segment_sum(has, k) > 0).astype(stats_dtype)
  mean, var = mean.reshape(rows), var.reshape(rows)
  sums = jnp.stack(
    [
      jnp.sum(weight * mean, 0),
      jnp.sum(weight * var, 0),
      jnp.sum(weight * jnp.ones_like(var), 0),  # sharded like the others
    ]
  )
  sums = _stats.psum_in_groups(sums, sync)
  total = jnp.real(sums[2])
  seen = total > 0
  safe = jnp.maximum(total, 1.0)
  group_mean, group_var = (
    (sums[0] / safe).reshape(fshape),
    (sums[1] / safe).reshape(fshape),
  )
  # A device (or group of devices) with every group masked keeps its state.
  seen = seen.reshape(fshape)
  new_state = BatchNormState(
    mean=_ema(mean_state, group_mean, momentum, seen),
    var=_ema(var_state, group_var, momentum, seen),
  )
  return y, new_state


def _ema(
  old: jax.Array, new: jax.Array, momentum: Any, seen: jax.Array | None = None
) -> jax.Array:
  """``momentum * old + (1 - momentum) * new``, or ``old`` where nothing was
  ``seen`` (an empty or wholly masked batch leaves the state exactly as it
  was, rather than pulling it toward 0)."""
  momentum = _checks.check_hyper(momentum, "momentum", high=1.0)
  _checks.traced_check("momentum", momentum, low=0.0, high=1.0)
  dtype = old.dtype
  if jnp.iscomplexobj(new) and not jnp.iscomplexobj(old):
    # flax keeps the running mean of complex inputs complex: the float32
    # initial state becomes complex64 at the first update.
    dtype = jnp.result_type(old.dtype, jnp.complex64)
  out = (momentum * old + (1.0 - momentum) * new).astype(dtype)
  if seen is None:
    return out
  return _stats.select(jnp.reshape(seen, old.shape), out, old)
