"""Switchable normalization (Luo et al., 2018)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxnorm import _checks, _stats
from jaxnorm._batch_norm import _as_shape, _ema, check_batch_size, check_flax_state
from jaxnorm._types import BatchNormState


class SwitchableNormParams(NamedTuple):
  """Parameters of switchable normalization.

  Attributes:
    scale: per-channel multiplier ``gamma`` of shape ``(C,)`` (ones), or
      ``None``.
    bias: per-channel offset ``beta`` of shape ``(C,)`` (zeros), or ``None``.
    mean_weights: ``(3,)`` logits of the IN, LN and BN means (ones).
    var_weights: ``(3,)`` logits of the IN, LN and BN variances (ones).
  """

  scale: jax.Array | None
  bias: jax.Array | None
  mean_weights: jax.Array
  var_weights: jax.Array


def switchable_norm_init(
  num_features: int | Sequence[int],
  *,
  use_scale: bool = True,
  use_bias: bool = True,
  param_dtype: Any = jnp.float32,
) -> tuple[SwitchableNormParams, BatchNormState]:
  """Creates switchable-norm parameters and running BN statistics.

  Args:
    num_features: ``C``, the number of channels.
    use_scale: whether to create ``scale`` (ones).
    use_bias: whether to create ``bias`` (zeros).
    param_dtype: dtype of the parameters. The state is float32.

  Returns:
    ``(params, state)``: ``SwitchableNormParams(scale, bias, mean_weights,
    var_weights)`` with ``scale``/``bias`` of shape ``(C,)`` and the two
    weight vectors of shape ``(3,)`` (ones, so the three statistics start
    equally weighted), and ``BatchNormState(mean=zeros, var=ones)`` of shape
    ``(C,)``.

  Examples:
    >>> import jaxnorm as jn
    >>> params, state = jn.switchable_norm_init(4)
    >>> params.mean_weights, state.mean.shape
    (Array([1., 1., 1.], dtype=float32), (4,))
  """
  shape = _as_shape(num_features, "num_features")
  params = SwitchableNormParams(
    scale=jnp.ones(shape, param_dtype) if use_scale else None,
    bias=jnp.zeros(shape, param_dtype) if use_bias else None,
    mean_weights=jnp.ones((3,), param_dtype),
    var_weights=jnp.ones((3,), param_dtype),
  )
  state = BatchNormState(
    mean=jnp.zeros(shape, jnp.float32), var=jnp.ones(shape, jnp.float32)
  )
  return params, state


def switchable_norm(
  x: ArrayLike,
  params: SwitchableNormParams,
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
) -> tuple[jax.Array, BatchNormState]:
  r"""Switchable normalization: a learned mix of IN, LN and BN statistics.

  Three sets of statistics of ``x`` are taken, for an ``(N, H, W, C)``
  input:

  - IN: per sample and channel, over H, W (every axis but 0 and ``axis``);
  - LN: per sample, over H, W, C (every axis but 0);
  - BN: per channel, over N, H, W (every axis but ``axis``), synchronized
    over ``axis_name``, and replaced by the running statistics in ``state``
    when ``use_running_average`` is true.

  They are mixed with softmax weights and applied as in batch norm:

  .. math::
    \mu = \sum_{k \in \{IN, LN, BN\}} \mathrm{softmax}(w^\mu)_k \mu_k, \quad
    \sigma^2 = \sum_k \mathrm{softmax}(w^\sigma)_k \sigma^2_k, \quad
    y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot \mathrm{scale}
        + \mathrm{bias}

  In training the running BN statistics are updated as in
  :func:`jaxnorm.batch_norm`: ``new = momentum * old + (1 - momentum) *
  batch``, with the biased variance. The IN and LN statistics are per
  sample, so they are computed from ``x`` in evaluation too.

  Stability: the IN, LN and BN statistics are each the two-pass mean and
  variance, exact to float32 rounding however large the mean.

  Args:
    x: input ``(N, ..., C, ...)``, floating point; ``axis=1`` for NCHW.
    params: ``SwitchableNormParams(scale, bias, mean_weights,
      var_weights)``: ``(C,)``, ``(C,)``, ``(3,)``, ``(3,)``, in the order
      IN, LN, BN.
    state: ``BatchNormState(mean, var)`` of shape ``(C,)``.
    use_running_average: ``True`` to use the running BN statistics
      (evaluation), ``False`` to use and update the batch ones (training).
    axis: the channel axis (or axes); it may not include axis 0.
    momentum: weight of the old running statistics.
    epsilon: added to the mixed variance inside the square root.
    axis_name: named axis over which the BN statistics are synchronized.
    axis_index_groups: optional groups of indices along ``axis_name``.
    mask: optional boolean array broadcastable to ``x``; ``False`` elements
      enter none of the three statistics.
    dtype: output dtype (default: the dtype of ``x``). Statistics use at
      least float32.

  Returns:
    ``(y, new_state)``: ``y`` of the shape of ``x``; ``new_state`` is
    ``state`` itself when ``use_running_average`` is true.

  Raises:
    TypeError: ``x`` is not floating point or ``use_running_average`` is not
      a Python or NumPy bool.
    ValueError: ``axis`` out of range or including axis 0, parameter or
      state shapes that do not match ``x``, a ``mask`` that does not
      broadcast, an unbound ``axis_name``, or a single value per channel in
      training.

  References:
    Luo, Ren, Peng, Zhang & Li, "Differentiable Learning-to-Normalize via
    Switchable Normalization", ICLR 2019, arXiv:1806.10779.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3)) + 2.0
    >>> params, state = jn.switchable_norm_init(3)
    >>> y, state = jn.switchable_norm(x, params, state, use_running_average=False)
    >>> y.shape, state.mean.shape
    ((4, 5, 5, 3), (3,))
    >>> y_eval, _ = jn.switchable_norm(x, params, state, use_running_average=True)
  """
  x = _checks.check_input(x)
  _checks.check_fields(params, "params", SwitchableNormParams)
  _checks.check_fields(state, "state", BatchNormState)
  check_flax_state(state)
  use_running_average = _checks.as_bool(use_running_average, "use_running_average")
  momentum = _checks.check_hyper(momentum, "momentum", high=1.0)
  faxes = _checks.canonicalize_axes(x.ndim, axis, "axis")
  if 0 in faxes:
    raise ValueError(
      f"`axis`={axis} includes axis 0, the batch axis of switchable norm."
    )
  fshape = _checks.feature_shape(x.shape, faxes)
  bshape = _checks.broadcast_shape(x.ndim, x.shape, faxes)
  scale = _checks.check_param(params.scale, fshape, "params.scale", x.dtype)
  bias = _checks.check_param(params.bias, fshape, "params.bias", x.dtype)
  mean_w = _checks.check_param(
    params.mean_weights, (3,), "params.mean_weights", x.dtype
  )
  var_w = _checks.check_param(params.var_weights, (3,), "params.var_weights", x.dtype)
  mean_state = _checks.check_param(
    state.mean, fshape, "state.mean", x.dtype, required=True
  )
  var_state = _checks.check_param(
    state.var, fshape, "state.var", x.dtype, required=True
  )
  mask = _checks.check_mask(mask, x.shape)
  stats_dtype = _checks.compute_dtype(x.dtype, dtype)
  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  bn_axes = tuple(a for a in range(x.ndim) if a not in faxes)
  in_axes = tuple(a for a in bn_axes if a != 0)
  ln_axes = tuple(range(1, x.ndim))
  local = _stats.make_sync(None, None)

  def stats(axes, s):
    return _stats.moments(x, axes, mask=mask, use_mean=True, sync=s, dtype=stats_dtype)

  m_in, m_ln = stats(in_axes, local), stats(ln_axes, local)
  if use_running_average:
    mu_bn = mean_state.reshape(bshape).astype(stats_dtype)
    var_bn = var_state.reshape(bshape).astype(stats_dtype)
    new_state = state
  else:
    check_batch_size(x.shape, bn_axes, axis_name, axis_index_groups, mask)
    m_bn = stats(bn_axes, _stats.make_sync(axis_name, axis_index_groups))
    mu_bn, var_bn = m_bn.mean, m_bn.var
    seen = jnp.broadcast_to(m_bn.count, m_bn.mean.shape).reshape(fshape) > 0
    new_state = BatchNormState(
      mean=_ema(mean_state, mu_bn.reshape(fshape), momentum, seen),
      var=_ema(var_state, var_bn.reshape(fshape), momentum, seen),
    )
  wm = jax.nn.softmax(mean_w.astype(stats_dtype))
  wv = jax.nn.softmax(var_w.astype(stats_dtype))
  mean = wm[0] * m_in.mean + wm[1] * m_ln.mean + wm[2] * mu_bn
  var = wv[0] * m_in.var + wv[1] * m_ln.var + wv[2] * var_bn
  y = _stats.normalize_with(
    x,
    mean,
    var,
    scale=None if scale is None else scale.reshape(bshape),
    bias=None if bias is None else bias.reshape(bshape),
    epsilon=epsilon,
    dtype=stats_dtype,
    out_dtype=out_dtype,
    mask=mask,
  )
  return y, new_state
