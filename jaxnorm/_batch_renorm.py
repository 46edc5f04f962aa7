"""Batch renormalization (Ioffe, 2017)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxnorm import _checks, _stats
from jaxnorm._batch_norm import (
  _ema,
  batch_norm_init,
  check_batch_size,
  check_flax_state,
)
from jaxnorm._types import BatchNormState, NormParams


def batch_renorm_init(
  num_features: int | Sequence[int],
  *,
  use_scale: bool = True,
  use_bias: bool = True,
  param_dtype: Any = jnp.float32,
) -> tuple[NormParams, BatchNormState]:
  """Creates batch-renorm parameters and running statistics.

  The same as :func:`jaxnorm.batch_norm_init`.

  Args:
    num_features: ``C``, the number of channels.
    use_scale: whether to create ``scale`` (ones).
    use_bias: whether to create ``bias`` (zeros).
    param_dtype: dtype of ``scale`` and ``bias``. The state is float32.

  Returns:
    ``(NormParams(scale, bias), BatchNormState(mean=zeros, var=ones))``, all
    of shape ``(C,)``.

  Examples:
    >>> import jaxnorm as jn
    >>> params, state = jn.batch_renorm_init(2)
    >>> state.var
    Array([1., 1.], dtype=float32)
  """
  return batch_norm_init(
    num_features, use_scale=use_scale, use_bias=use_bias, param_dtype=param_dtype
  )


def batch_renorm_schedule(
  step: ArrayLike,
  *,
  r_max: float = 3.0,
  d_max: float = 5.0,
  r_max_steps: tuple[int, int] = (5_000, 40_000),
  d_max_steps: tuple[int, int] = (5_000, 25_000),
) -> tuple[jax.Array, jax.Array]:
  """The warm-up of ``r_max`` and ``d_max`` from the batch-renorm paper.

  ``r_max`` is 1 until ``r_max_steps[0]``, then grows linearly to its final
  value at ``r_max_steps[1]`` and stays there; ``d_max`` is 0 until
  ``d_max_steps[0]`` and grows linearly to its final value at
  ``d_max_steps[1]``. A ramp with ``start == end`` is a step: the final
  value from that step on. The defaults are the paper's (section 4: ``r_max``
  from 1 to 3 between 5k and 40k steps, ``d_max`` from 0 to 5 between 5k and
  25k steps); scale the step ranges to your run length. Before the warm-up
  starts batch renorm is exactly batch norm.

  ``step`` may be traced (an optimizer step counter, say), and the results
  are float32 arrays to pass as ``r_max``/``d_max`` of :func:`batch_renorm`.

  Args:
    step: the training step, an int or an integer/float array.
    r_max: the final ``r_max``.
    d_max: the final ``d_max``.
    r_max_steps: ``(start, end)`` of the linear ramp of ``r_max``.
    d_max_steps: ``(start, end)`` of the linear ramp of ``d_max``.

  Returns:
    ``(r_max, d_max)`` at ``step``, float32 scalars.

  Raises:
    ValueError: a ramp whose end is before its start, or ``r_max < 1``, or
      ``d_max < 0``, or either not finite.

  Examples:
    >>> import jaxnorm as jn
    >>> [tuple(float(v) for v in jn.batch_renorm_schedule(s))
    ...  for s in (0, 15_000, 40_000)]
    [(1.0, 0.0), (1.5714285373687744, 2.5), (3.0, 5.0)]
  """
  for name, (a, b) in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
    if b < a:
      raise ValueError(f"`{name}`=({a}, {b}) must be (start, end) with end >= start.")
  # Finite, like batch_renorm's own bounds: an infinite final value would
  # give 0 * inf = NaN before the ramp starts.
  r_max = _checks.check_hyper(r_max, "r_max", low=1.0)
  d_max = _checks.check_hyper(d_max, "d_max", low=0.0)
  step = jnp.asarray(step, jnp.float32)

  def ramp(start_value, end_value, steps):
    start, end = steps
    if end == start:  # a step: the final value from `end` on
      return jnp.where(step >= end, end_value, start_value).astype(jnp.float32)
    frac = jnp.clip((step - start) / (end - start), 0.0, 1.0)
    return start_value + (end_value - start_value) * frac

  return ramp(1.0, r_max, r_max_steps), ramp(0.0, d_max, d_max_steps)


def batch_renorm(
  x: ArrayLike,
  params: NormParams,
  state: BatchNormState,
  *,
  use_running_average: bool,
  axis: int | Sequence[int] = -1,
  momentum: float = 0.99,
  epsilon: float = 1e-5,
  r_max: ArrayLike = 3.0,
  d_max: ArrayLike = 5.0,
  axis_name: Hashable | None = None,
  axis_index_groups: Any = None,
  mask: ArrayLike | None = None,
  dtype: Any = None,
) -> tuple[jax.Array, BatchNormState]:
  r"""Batch renormalization: batch norm corrected toward the running statistics.

  In training, with the batch statistics ``mu_B``, ``var_B`` (per channel,
  over every other axis, synchronized over ``axis_name``) and the running
  ones ``mu``, ``var`` from ``state``:

  .. math::
    \sigma_B = \sqrt{\mathrm{var}_B + \epsilon}, \quad
    \sigma = \sqrt{\mathrm{var} + \epsilon}, \\
    r = \mathrm{sg}\big(\mathrm{clip}(\sigma_B / \sigma,
        1/r_{max}, r_{max})\big), \quad
    d = \mathrm{sg}\big(\mathrm{clip}((\mu_B - \mu) / \sigma,
        -d_{max}, d_{max})\big), \\
    y = \Big(\frac{x - \mu_B}{\sigma_B} \cdot r + d\Big) \cdot \mathrm{scale}
        + \mathrm{bias}

  where ``sg`` is ``stop_gradient``: gradients flow through ``mu_B`` and
  ``sigma_B`` as in batch norm, not through ``r`` and ``d`` (so none
  reaches the running state). The running
  statistics are then updated as in :func:`jaxnorm.batch_norm` (``new =
  momentum * old + (1 - momentum) * batch``; the running *variance* is
  averaged, where the paper averages ``sigma``). In evaluation it is batch
  norm with the running statistics, and the state comes back unchanged.
  ``r_max=1, d_max=0`` gives exactly :func:`jaxnorm.batch_norm`.

  ``r_max`` and ``d_max`` may be traced arrays, so a warm-up schedule such as
  :func:`batch_renorm_schedule` can run inside a jitted train step without
  recompiling.

  Stability: the batch statistics are batch norm's two-pass ones, exact to
  float32 rounding however large the mean.

  Args:
    x: input ``(N, ..., C, ...)``, floating point.
    params: ``NormParams(scale, bias)`` of shape ``(C,)`` (either may be
      ``None``).
    state: ``BatchNormState(mean, var)`` of shape ``(C,)``.
    use_running_average: ``True`` for evaluation, ``False`` for training.
    axis: the channel axis (or axes): ``-1`` for NHWC, ``1`` for NCHW.
    momentum: weight of the old running statistics.
    epsilon: added to both variances inside the square roots.
    r_max: bound of the scale correction ``r``, at least 1 (scalar, may be
      traced).
    d_max: bound of the shift correction ``d``, at least 0 (scalar, may be
      traced).
    axis_name: named axis to reduce the batch statistics over, or ``None``.
    axis_index_groups: optional groups of indices along ``axis_name``.
    mask: optional boolean array broadcastable to ``x``; ``False`` elements
      do not enter the statistics.
    dtype: output dtype (default: the dtype of ``x``). Statistics use at
      least float32.

  Returns:
    ``(y, new_state)``: ``y`` of the shape of ``x`` and the updated state.

  Raises:
    TypeError: ``x`` is not floating point (or is complex, in training), or
      ``use_running_average`` is not a Python or NumPy bool.
    ValueError: ``axis`` out of range, parameter or state shapes that do not
      match ``x``, non-scalar ``r_max``/``d_max`` (or, when they are Python
      numbers, ``r_max < 1`` or ``d_max < 0``), a ``mask`` that does not
      broadcast, an unbound ``axis_name``, or a single value per channel in
      training.

  References:
    Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
    Batch-Normalized Models", NeurIPS 2017, arXiv:1702.03275.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 2.0 + 1.0
    >>> params, state = jn.batch_renorm_init(3)
    >>> r_max, d_max = jn.batch_renorm_schedule(10_000)
    >>> y, new_state = jn.batch_renorm(
    ...     x, params, state, use_running_average=False, r_max=r_max, d_max=d_max)
    >>> y_bn, _ = jn.batch_norm(x, params, state, use_running_average=False)
    >>> y_rn, _ = jn.batch_renorm(
    ...     x, params, state, use_running_average=False, r_max=1.0, d_max=0.0)
    >>> bool((y_rn == y_bn).all())
    True
  """
  x = _checks.check_input(x)
  _checks.check_fields(params, "params", NormParams)
  _checks.check_fields(state, "state", BatchNormState)
  check_flax_state(state)
  use_running_average = _checks.as_bool(use_running_average, "use_running_average")
  momentum = _checks.check_hyper(momentum, "momentum", high=1.0)
  faxes = _checks.canonicalize_axes(x.ndim, axis, "axis")
  raxes = tuple(a for a in range(x.ndim) if a not in faxes)
  fshape = _checks.feature_shape(x.shape, faxes)
  bshape = _checks.broadcast_shape(x.ndim, x.shape, faxes)
  scale = _checks.check_param(params.scale, fshape, "params.scale", x.dtype)
  bias = _checks.check_param(params.bias, fshape, "params.bias", x.dtype)
  mean_state = _checks.check_param(
    state.mean, fshape, "state.mean", x.dtype, required=True
  )
  var_state = _checks.check_param(
    state.var, fshape, "state.var", x.dtype, required=True
  )
  r_max = _check_bound(r_max, "r_max", 1.0)
  d_max = _check_bound(d_max, "d_max", 0.0)
  mask = _checks.check_mask(mask, x.shape)
  stats_dtype = _checks.compute_dtype(x.dtype, dtype)
  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  scale_b = None if scale is None else scale.reshape(bshape)
  bias_b = None if bias is None else bias.reshape(bshape)
  mu_run = mean_state.reshape(bshape).astype(stats_dtype)
  var_run = var_state.reshape(bshape).astype(stats_dtype)

  if use_running_average:
    y = _stats.normalize_with(
      x,
      mu_run,
      var_run,
      scale=scale_b,
      bias=bias_b,
      epsilon=epsilon,
      dtype=stats_dtype,
      out_dtype=out_dtype,
      mask=mask,
    )
    return y, state

  check_batch_size(x.shape, raxes, axis_name, axis_index_groups, mask)
  if jnp.iscomplexobj(x):
    raise TypeError(
      f"`x` must be real floating point in training, got dtype {x.dtype}: "
      "batch renorm clips (mu_B - mu) / sigma, which has no order for complex "
      "numbers. (Evaluation, batch norm with the running statistics, takes "
      "complex `x`.)"
    )

  def renorm_affine(mean, var, scale_b, bias_b, mu_run, var_run):
    # r and d come from the batch statistics and carry no gradient.
    # ((x - mu_B) / sigma_B * r + d) * scale + bias is batch norm with the
    # affine (r * scale, d * scale + bias), from the same statistics (so one
    # set of collectives). With r = 1, d = 0 it is batch norm bit for bit.
    # Nor does the running state (which would otherwise get a gradient
    # through them).
    inv_sigma = lax.rsqrt(var_run + epsilon)
    r = jnp.clip(jnp.sqrt(var + epsilon) * inv_sigma, 1.0 / r_max, r_max)
    d = jnp.clip((mean - mu_run) * inv_sigma, -d_max, d_max)
    r, d = lax.stop_gradient(r), lax.stop_gradient(d)
    s = r if scale_b is None else r * scale_b.astype(stats_dtype)
    b = d if scale_b is None else d * scale_b.astype(stats_dtype)
    b = b if bias_b is None else b + bias_b.astype(stats_dtype)
    return s, b

  y, mean, var, count = _stats.normalize_over(
    x,
    axes=raxes,
    scale=scale_b,
    bias=bias_b,
    mask=mask,
    use_mean=True,
    epsilon=epsilon,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    dtype=stats_dtype,
    out_dtype=out_dtype,
    affine=renorm_affine,
    affine_args=(mu_run, var_run),
  )
  seen = jnp.broadcast_to(count, mean.shape).reshape(fshape) > 0
  new_state = BatchNormState(
    mean=_ema(mean_state, mean.reshape(fshape), momentum, seen),
    var=_ema(var_state, var.reshape(fshape), momentum, seen),
  )
  return y, new_state


def _check_bound(v: ArrayLike, name: str, least: float) -> jax.Array | float:
  """A scalar clip bound: concrete ones must be finite and ``>= least``."""
  v = _checks.check_hyper(v, name, low=least)
  return v if isinstance(v, float) else jnp.asarray(v, jnp.float32)
