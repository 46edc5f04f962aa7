"""Moving Average Batch Normalization, MABN (Yan et al., 2020)."""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.typing import ArrayLike

from jaxnorm import _checks, _stats
from jaxnorm._batch_norm import _as_shape
from jaxnorm._types import NormParams


class MovingAverageBatchNormState(NamedTuple):
  """State of :func:`moving_average_batch_norm`: fixed-size float32 arrays.

  Attributes:
    var: ``(C,)`` exponential moving average of the batch second moment
      ``E[x^2]``, used in evaluation; starts at 1.
    second_moments: ``(buffer_size, C)`` ring buffer of the last batch
      second moments ``E[x^2]`` (forward statistic); starts at 0.
    grad_moments: ``(buffer_size, C)`` ring buffer of the last batch
      gradient statistics ``mean(g * x_hat)`` (backward statistic); starts at
      0. It is written by the *backward* pass: see
      :func:`moving_average_batch_norm`.
    count: ``()`` int32, the number of training steps taken.
  """

  var: jax.Array
  second_moments: jax.Array
  grad_moments: jax.Array
  count: jax.Array


def moving_average_batch_norm_init(
  num_features: int,
  *,
  buffer_size: int = 16,
  use_scale: bool = True,
  use_bias: bool = True,
  param_dtype: Any = jnp.float32,
) -> tuple[NormParams, MovingAverageBatchNormState]:
  """Creates MABN parameters and state.

  Args:
    num_features: ``C``, the size of the channel axis.
    buffer_size: how many past batches the simple moving averages span (the
      paper's window; its reference code uses the simulated batch size over
      the real one).
    use_scale: whether to create ``scale`` (ones).
    use_bias: whether to create ``bias`` (zeros).
    param_dtype: dtype of ``scale`` and ``bias``. The state is float32.

  Returns:
    ``(NormParams(scale, bias), MovingAverageBatchNormState)``.

  Examples:
    >>> import jaxnorm as jn
    >>> params, state = jn.moving_average_batch_norm_init(3, buffer_size=4)
    >>> state.second_moments.shape, state.var
    ((4, 3), Array([1., 1., 1.], dtype=float32))
  """
  shape = _as_shape(num_features, "num_features")
  buffer_size = _checks.as_int(buffer_size, "buffer_size", least=1)
  params = NormParams(
    scale=jnp.ones(shape, param_dtype) if use_scale else None,
    bias=jnp.zeros(shape, param_dtype) if use_bias else None,
  )
  state = MovingAverageBatchNormState(
    var=jnp.ones(shape, jnp.float32),
    second_moments=jnp.zeros((buffer_size, *shape), jnp.float32),
    grad_moments=jnp.zeros((buffer_size, *shape), jnp.float32),
    count=jnp.zeros((), jnp.int32),
  )
  return params, state


def _real(x: jax.Array, name: str) -> jax.Array:
  if jnp.iscomplexobj(x):
    raise TypeError(f"`{name}` must be real floating point, got dtype {x.dtype}.")
  return x


class _Config(NamedTuple):
  axes: tuple[int, ...]
  sync: Any
  dtype: Any
  out_dtype: Any
  replicas: int


# --- MABN's derivatives ------------------------------------------------------
#
# Forward mode (jvp, jacfwd, linearize) gets the derivative of the forward
# formula with r held constant: chi_t depends on x, so
#
#   dy = mul * scale * (dx - x_hat * S / n) + dscale * mul * x + dbias,
#   S = sum(mask * x_hat * dx) / count            (over the batch and devices)
#
# Reverse mode gets the paper's backward pass, which is the transpose of that
# map plus two terms that depend on the optimizer state rather than on the
# cotangent: the older batches' psi (psi_bar replaces psi_t / n) and the
# increment that writes psi_t into state.grad_moments (see
# moving_average_batch_norm). A backward pass that is affine in the
# cotangent is no transpose of a linear map, so neither a custom_vjp (which
# has no forward mode) nor the transpose JAX derives from a custom_jvp can
# express it. The linear part is plain JAX inside a custom_jvp; the affine
# part is a primitive, _stale_p, whose forward value is zero (y does not
# depend on the buffer) and whose transpose rule returns those two terms.


def _apply(cfg, x, scale, bias, mul):
  y = x.astype(cfg.dtype) * mul
  if scale is not None:
    y = y * scale.astype(cfg.dtype)
  if bias is not None:
    y = y + bias.astype(cfg.dtype)
  return y.astype(cfg.out_dtype)


def _batch_sum(cfg, v):
  """Sums ``v`` over the batch axes and the devices of ``cfg.sync``."""
  return _stats.psum_in_groups(jnp.sum(v, cfg.axes, keepdims=True), cfg.sync)


def _given(t) -> bool:
  return t is not None and not isinstance(t, SymbolicZero)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _mabn_apply(
  cfg, x, scale, bias, mask, mul, inv, grad_moments, old_sum, slot, n, count
):
  del mask, inv, grad_moments, old_sum, slot, n, count
  return _apply(cfg, x, scale, bias, mul)


def _mabn_jvp(cfg, primals, tangents):
  x, scale, bias, mask, mul, inv, grad_moments, old_sum, slot, n, count = primals
  tx, tscale, tbias, tgm = tangents[0], tangents[1], tangents[2], tangents[6]
  dtype = cfg.dtype
  y = _apply(cfg, x, scale, bias, mul)
  xf = x.astype(dtype)
  gain = mul if scale is None else mul * scale.astype(dtype)
  ty = jnp.zeros_like(y, dtype)
  if _given(tx):
    t = tx.astype(dtype)
    s = _batch_sum(cfg, t * (xf if mask is None else jnp.where(mask, xf, 0.0)))
    # d chi_t = 2 * sum(mask * x * dx) / count, and chi_bar holds chi_t / n.
    ty = ty + gain * t - xf * (gain * inv * inv / (n * jnp.maximum(count, 1.0)) * s)
  if _given(tscale):
    ty = ty + xf * (mul * tscale.astype(dtype))
  if _given(tbias):
    ty = ty + tbias.astype(dtype)
  if _given(tx) or _given(tgm):
    present = (_given(tx), _given(tgm), scale is not None, mask is not None)
    args = [t for t, p in zip((tx, tgm, scale, mask), present, strict=True) if p]
    ty = ty + _stale_p.bind(
      *args,
      x,
      mul,
      inv,
      grad_moments,
      old_sum,
      slot,
      n,
      count,
      cfg=cfg,
      present=present,
      vmapped=(),
    ).astype(dtype)
  return y, ty.astype(y.dtype)


_mabn_apply.defjvp(_mabn_jvp, symbolic_zeros=True)


# --- _stale_p: zero forward, the state-dependent terms of the backward -------

_stale_p = Primitive("jaxnorm_mabn_stale")


def _unpack(args, present):
  args = list(args)
  tx, tgm, scale, mask = (args.pop(0) if p else None for p in present)
  return tx, tgm, scale, mask, args


def _stale_zeros(*args, cfg, present, vmapped):
  del vmapped
  x = _unpack(args, present)[4][0]
  return jnp.zeros_like(x, cfg.out_dtype)


def _stale_abstract(*avals, cfg, present, vmapped):
  del vmapped
  x = _unpack(avals, present)[4][0]
  return x.update(dtype=jnp.dtype(cfg.out_dtype), weak_type=False)


def _stale_terms(
  cfg, present, ct, scale, mask, x, mul, inv, gm, old_sum, slot, n, count
):
  """MABN's backward minus the transpose of the forward-mode map, unbatched:
  ``(dx, d grad_moments)``, each ``None`` where not asked for."""
  has_tx, has_tgm = present[:2]
  dtype = cfg.dtype
  xf = x.astype(dtype)
  dx = dgm = None
  if has_tx:
    # The older batches' share of psi_bar = (old_sum + psi_t) / n.
    corr = xf * (inv * old_sum.reshape(inv.shape) / n)
    if mask is not None:
      corr = jnp.where(mask, corr, 0.0)
    dx = _stats.like((-inv * corr).astype(x.dtype), x)
  if has_tgm:
    # psi_t = sum(g * r * scale * x_hat) / count, and r * x_hat = mul * x.
    # Written as sum(g * x), the reduction that the transpose of the forward
    # map takes too, so that XLA computes it once.
    gain = mul if scale is None else mul * scale.astype(dtype)
    psi = _batch_sum(cfg, ct.astype(dtype) * xf) * gain / jnp.maximum(count, 1.0)
    onehot = (jnp.arange(gm.shape[0]) == slot).astype(dtype)
    onehot = onehot.reshape((-1,) + (1,) * (gm.ndim - 1))
    delta = onehot * (psi.reshape(old_sum.shape) - gm.astype(dtype))
    dgm = _stats.like((delta / cfg.replicas).astype(gm.dtype), gm)
  return dx, dgm


def _stale_transpose(ct, *args, cfg, present, vmapped):
  tx, tgm, scale, mask, rest = _unpack(args, present)
  if type(ct) is ad.Zero:
    return [None] * len(args)
  fn = functools.partial(_stale_terms, cfg, present)
  # A batched _stale_p (see _stale_batch) carries its vmapped axes in front.
  for name, size in reversed(vmapped):
    fn = jax.vmap(fn, axis_name=name, axis_size=size)
  dx, dgm = fn(ct, scale, mask, *rest)
  cts = [dx, dgm, None, None]
  out = [c for c, p in zip(cts, present, strict=True) if p]
  return out + [None] * len(rest)


def _stale_jvp(primals, tangents, **params):
  out = _stale_p.bind(*primals, **params)
  return out, jnp.zeros_like(out)


def _stale_batch(axis_data, args, dims, *, cfg, present, vmapped):
  size = axis_data.size
  name = axis_data.name if isinstance(axis_data.name, Hashable) else None
  if present[1] and dims[int(present[0])] is None:
    # A state shared by the rows of a vmap over the very axis MABN syncs
    # over (equinox's way, and pmap's with in_axes=None) gets the same
    # increment from every row, and the transpose of its broadcast sums
    # them: as under shard_map, each row carries 1/size of it.
    sync = cfg.sync.axis_name
    if name is not None and name in (sync if isinstance(sync, tuple) else (sync,)):
      cfg = cfg._replace(replicas=cfg.replicas * size)
  args = [
    jnp.broadcast_to(a, (size, *jnp.shape(a))) if d is None else jnp.moveaxis(a, d, 0)
    for a, d in zip(args, dims, strict=True)
  ]
  out = _stale_p.bind(*args, cfg=cfg, present=present, vmapped=((name, size), *vmapped))
  return out, 0


_stale_p.def_impl(_stale_zeros)
_stale_p.def_abstract_eval(_stale_abstract)
ad.primitive_jvps[_stale_p] = _stale_jvp
ad.primitive_transposes[_stale_p] = _stale_transpose
batching.fancy_primitive_batchers[_stale_p] = _stale_batch
mlir.register_lowering(_stale_p, mlir.lower_fun(_stale_zeros, multiple_results=False))


def moving_average_batch_norm(
  x: ArrayLike,
  params: NormParams,
  state: MovingAverageBatchNormState,
  *,
  use_running_average: bool,
  axis: int = -1,
  momentum: float = 0.98,
  epsilon: float = 1e-5,
  axis_name: Hashable | None = None,
  axis_index_groups: Any = None,
  mask: ArrayLike | None = None,
  renorm_warmup_steps: int = 1000,
  r_max: float = 5.0,
  dtype: Any = None,
) -> tuple[jax.Array, MovingAverageBatchNormState]:
  r"""Moving Average Batch Normalization (MABN).

  Batch norm for small batches (Yan et al., 2020): both the forward batch
  statistic and the two extra batch statistics of the backward pass are
  replaced by moving averages over the last ``buffer_size`` batches. In
  training, per channel, over every axis but ``axis``:

  .. math::
    \chi_t = \mathrm{E}[x^2], \qquad
    \bar\chi_t = \tfrac{1}{n}\textstyle\sum_{s<n} \chi_{t-s}, \qquad
    \hat x = \frac{x}{\sqrt{\bar\chi_t + \epsilon}}, \qquad
    y = \mathrm{scale} \cdot r \cdot \hat x + \mathrm{bias}

  with no centering (the paper drops the mean to drop one of the backward
  statistics), ``n = min(t + 1, buffer_size)`` (the average covers the
  batches seen so far until the buffer is full) and the renormalization
  factor :math:`r = \mathrm{sg}(\mathrm{clip}(\sqrt{\bar\chi_t + \epsilon} /
  \sqrt{\mathrm{var} + \epsilon}, 1/r_{max}, r_{max}))`, which is 1 during
  the first ``renorm_warmup_steps`` training steps (the paper's warm-up; its
  code uses 1000). ``var`` is the running EMA of :math:`\chi_t`:
  ``var' = momentum * var + (1 - momentum) * chi_t``, starting at 1 (the
  reference code feeds it the moving average instead), and evaluation is
  ``y = scale * x / sqrt(var + epsilon) + bias``.

  **Derivatives.** With :math:`g = \partial L / \partial \hat x`, the
  exact gradient of the formula above is :math:`(g - \hat x\,\psi_t / n) /
  \sqrt{\bar\chi_t + \epsilon}` with :math:`\psi_t = \sum g \hat x /
  \mathrm{count}` (summed over every output, so over the batch whenever the
  loss leaves out the masked-out positions). MABN's backward pass replaces
  :math:`\psi_t / n` by the simple moving average :math:`\bar\psi_t` of
  :math:`\psi` over the same window, the current one included. That adds a
  term which depends on the state rather than on :math:`g` (the older
  batches' :math:`\psi`), as does the increment of ``grad_moments`` below,
  so the backward pass is the transpose of no linear map. Hence:

  - forward mode (``jax.jvp``, ``jacfwd``, ``linearize``) is the exact
    derivative of the formula above, with :math:`r` constant;
  - reverse mode (``grad``, ``vjp``) is the paper's backward pass: the
    transpose of forward mode plus the two state terms;
  - on a fresh state (one batch in the window) the two agree; later
    ``jacfwd`` and ``jacrev`` differ, by design;
  - second-order derivatives (``hessian``, grad of grad) run, and hold
    :math:`\bar\chi_t` and :math:`r` constant.

  **How the backward buffer is carried.** :math:`\psi_t` exists only in the
  backward pass, so it cannot come back in ``new_state``. It comes back as
  the *gradient with respect to* ``state.grad_moments``: that cotangent is
  the increment which writes :math:`\psi_t` into this step's slot of the
  ring buffer. Differentiate the loss with respect to the state too and add
  that gradient to ``new_state.grad_moments``, e.g. with
  :func:`apply_mabn_grad_moments`, which does it for every MABN layer of a
  pytree (a linen ``batch_stats`` dict, an nnx ``State``, a NamedTuple)::

    (loss, new_state), (g_params, g_state) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True, allow_int=True)(params, state)
    new_state = jn.apply_mabn_grad_moments(new_state, g_state)

  (``allow_int`` because ``count`` is an int32 step counter.) Without that
  step the buffer keeps its old values, which is harmless but means the
  backward averages stale statistics. Use each state once per step: the
  gradient of a state used twice is the sum of two increments. Under
  ``shard_map`` a replicated state is handled (its increment is divided by
  the number of replicas it is summed over); under ``pmap`` or a named
  ``vmap`` pass a per-device state (``in_axes=0``), and with
  ``axis_index_groups`` a per-device state too, since groups have different
  statistics.

  With ``axis_name``, :math:`\chi_t` and :math:`\psi_t` are taken over every
  device's elements, weighted by count; ``mask`` leaves elements out of both
  statistics (they are still normalized). Unlike batch norm, training with
  a single value per channel (a batch of one ``(1, C)``) is allowed: the
  uncentred :math:`\chi_t = x^2` of one value is well defined, and small
  batches are what the layer is for.

  Stability: the second moment ``E[x^2]`` has no cancellation; it is
  exact to the summation error of its dtype (float32, float64 for float64
  ``x``). The moving averages are taken in that dtype too; the state keeps
  its own (float32 from :func:`moving_average_batch_norm_init`).

  Args:
    x: input ``(N, ..., C, ...)``, floating point.
    params: ``NormParams(scale, bias)`` of shape ``(C,)`` (either may be
      ``None``).
    state: :class:`MovingAverageBatchNormState`.
    use_running_average: ``True`` for evaluation (EMA ``var``; the state
      comes back unchanged), ``False`` for training.
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    momentum: weight of the old value in the EMA ``var`` (paper: 0.98).
    epsilon: added to the second moment inside the square root.
    axis_name: named axis to synchronize the statistics over, or ``None``.
    axis_index_groups: optional groups of indices along ``axis_name``.
    mask: optional boolean array broadcastable to ``x``.
    renorm_warmup_steps: training steps during which ``r`` is 1.
    r_max: clip of the renormalization factor ``r`` to
      ``[1/r_max, r_max]``.
    dtype: output dtype (default: that of ``x``).

  Returns:
    ``(y, new_state)``; ``new_state.grad_moments`` is ``state.grad_moments``
    (it is updated through the gradient, see above).

  Raises:
    TypeError: ``x`` not floating point, ``use_running_average`` not a bool.
    ValueError: ``axis`` out of range, shapes of ``params``/``state`` that do
      not match ``x``, a bad ``mask``, an unbound ``axis_name``.

  References:
    Yan, Wan, Zhang, Zhang, Wei, Sun. *Towards Stabilizing Batch Statistics
    in Backward Propagation of Batch Normalization*. ICLR 2020.
    arXiv:2001.06838.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> params, state = jn.moving_average_batch_norm_init(3, buffer_size=4)
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    >>> def loss_fn(params, state):
    ...   y, new_state = jn.moving_average_batch_norm(
    ...       x, params, state, use_running_average=False)
    ...   return jnp.sum(y ** 3), new_state
    >>> grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True, allow_int=True)
    >>> (g_params, g_state), state = grad_fn(params, state)
    >>> state = jn.apply_mabn_grad_moments(state, g_state)
    >>> int(state.count), bool(jnp.all(state.grad_moments[0] != 0))
    (1, True)
    >>> y, _ = jn.moving_average_batch_norm(x, params, state,
    ...                                     use_running_average=True)
  """
  x = _real(_checks.check_input(x), "x")
  _checks.check_fields(params, "params", NormParams)
  _checks.check_fields(state, "state", MovingAverageBatchNormState)
  use_running_average = _checks.as_bool(use_running_average, "use_running_average")
  c = _checks.single_axis(x.ndim, axis, "axis")
  epsilon = _checks.check_hyper(epsilon, "epsilon")
  momentum = _checks.check_hyper(momentum, "momentum", high=1.0)
  r_max = _checks.check_hyper(r_max, "r_max", low=1.0)
  renorm_warmup_steps = _checks.as_int(renorm_warmup_steps, "renorm_warmup_steps")
  fshape = (x.shape[c],)
  bshape = _checks.broadcast_shape(x.ndim, x.shape, (c,))
  scale = _checks.check_param(params.scale, fshape, "params.scale", x.dtype)
  bias = _checks.check_param(params.bias, fshape, "params.bias", x.dtype)
  var = _checks.check_param(state.var, fshape, "state.var", x.dtype, required=True)
  if jnp.ndim(state.second_moments) != 2:
    raise ValueError(
      "`state.second_moments` must have shape (buffer_size, C), got "
      f"{jnp.shape(state.second_moments)}."
    )
  buffer_size = jnp.shape(state.second_moments)[0]
  second_moments = _checks.check_param(
    state.second_moments, (buffer_size, *fshape), "state.second_moments", x.dtype
  )
  grad_moments = _checks.check_param(
    state.grad_moments, (buffer_size, *fshape), "state.grad_moments", x.dtype
  )
  _checks.check_param(state.count, (), "state.count", required=True)
  mask = _checks.check_mask(mask, x.shape)
  stats_dtype = _checks.compute_dtype(x.dtype, dtype)
  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  scale_b = None if scale is None else scale.reshape(bshape)
  bias_b = None if bias is None else bias.reshape(bshape)

  if use_running_average:
    inv = lax.rsqrt(var.astype(stats_dtype) + epsilon).reshape(bshape)
    cfg = _Config((), None, stats_dtype, out_dtype, 1)
    y = _stats.guard_padding(lambda x: _apply(cfg, x, scale_b, bias_b, inv), x, mask)
    return y, state

  sync = _stats.make_sync(axis_name, axis_index_groups)
  axes = tuple(a for a in range(x.ndim) if a != c)
  m = _stats.moments(x, axes, mask=mask, use_mean=False, sync=sync, dtype=stats_dtype)
  # The moving averages are taken in the statistics' dtype (float32, or
  # float64 for float64 input), whatever the state's.
  chi = lax.stop_gradient(m.var.reshape(fshape).astype(stats_dtype))
  # A negative count (a hand-made state) counts as a fresh one.
  step = jnp.maximum(jnp.asarray(state.count).astype(jnp.int32), 0)
  slot = step % buffer_size
  n = jnp.minimum(step + 1, buffer_size).astype(stats_dtype)
  index = jnp.arange(buffer_size)
  # Entries older than the batches seen so far are not part of the average.
  valid = ((index < n) & (index != slot)).astype(stats_dtype)[:, None]
  # A select rather than a scatter: chi may be sharded over the channels
  # (an Explicit mesh refuses a scatter into a replicated buffer).
  new_second = _stats.select(
    (index == slot)[:, None], chi[None], second_moments.astype(stats_dtype)
  )
  chi_bar = jnp.sum(new_second * (index < n)[:, None], axis=0) / n
  old_psi_sum = jnp.sum(grad_moments.astype(stats_dtype) * valid, axis=0)
  inv_c = lax.rsqrt(chi_bar + epsilon)
  r = jnp.clip(
    jnp.sqrt(chi_bar + epsilon) * lax.rsqrt(var.astype(stats_dtype) + epsilon),
    1 / r_max,
    r_max,
  )
  r = jnp.where(step < renorm_warmup_steps, 1.0, r)
  inv = lax.stop_gradient(inv_c.astype(stats_dtype).reshape(bshape))
  mul = lax.stop_gradient((inv_c * r).astype(stats_dtype).reshape(bshape))

  # A replicated state under shard_map gets its cotangent summed over the
  # devices it is replicated on; divide the (identical) increments back.
  replicas = 1
  missing = [
    a for a in _stats.varying_axes(x) if a not in _stats.varying_axes(grad_moments)
  ]
  for a in missing:
    replicas *= lax.axis_size(a)
  cfg = _Config(axes, sync, stats_dtype, out_dtype, replicas)
  scale_v, bias_v = _stats.match_vma(scale_b, x), _stats.match_vma(bias_b, x)
  y = _stats.guard_padding(
    lambda x: _mabn_apply(
      cfg,
      x,
      scale_v,
      bias_v,
      mask,
      mul,
      inv,
      _stats.match_vma(grad_moments, x),
      lax.stop_gradient(old_psi_sum),
      slot,
      n,
      lax.stop_gradient(jnp.broadcast_to(m.count, m.var.shape).astype(stats_dtype)),
    ),
    x,
    mask,
    value=lambda x: _apply(cfg, x, scale_v, bias_v, mul),
  )
  # An empty batch (all masked, on every device) leaves the state as it was,
  # its step count included.
  seen = jnp.broadcast_to(m.count, m.var.shape).reshape(fshape) > 0
  any_seen = jnp.any(seen)
  new_state = MovingAverageBatchNormState(
    var=_stats.select(
      seen, (momentum * var + (1.0 - momentum) * chi).astype(var.dtype), var
    ),
    second_moments=_stats.select(
      any_seen, new_second.astype(second_moments.dtype), second_moments
    ),
    grad_moments=grad_moments,
    count=jnp.where(any_seen, step + 1, state.count).astype(
      jnp.asarray(state.count).dtype
    ),
  )
  return y, new_state


def apply_mabn_grad_moments(state: Any, state_grad: Any) -> Any:
  """Writes MABN's backward statistics, returned as gradients, into a state.

  Adds the gradient of every leaf named ``grad_moments`` (a field of
  :class:`MovingAverageBatchNormState`, a key of a linen ``batch_stats``
  dict or an attribute of an nnx module) to that leaf of ``state``; every
  other leaf of ``state`` is returned as is. ``state_grad`` is the gradient
  of the loss with respect to the state passed to
  :func:`moving_average_batch_norm`, and ``state`` is usually the
  ``new_state`` that call returned (same tree structure).

  Args:
    state: a pytree holding MABN states.
    state_grad: its gradient (same structure; ``float0`` leaves for the
      integer counters are ignored).

  Returns:
    ``state`` with every ``grad_moments`` leaf updated.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> _, state = jn.moving_average_batch_norm_init(2, buffer_size=2)
    >>> grads = jax.tree.map(jnp.ones_like, state)
    >>> jn.apply_mabn_grad_moments(state, grads).grad_moments
    Array([[1., 1.],
           [1., 1.]], dtype=float32)
  """

  def is_grad_moments(path) -> bool:
    last = path[-1] if path else None
    for attr in ("name", "key"):
      if getattr(last, attr, None) == "grad_moments":
        return True
    # nnx states end their paths in the variable's name then `value`.
    return any(
      getattr(k, a, None) == "grad_moments" for k in path for a in ("name", "key")
    )

  paths_and_grads = dict(jax.tree_util.tree_flatten_with_path(state_grad)[0])

  def update(path, leaf):
    if not is_grad_moments(path) or path not in paths_and_grads:
      return leaf
    return leaf + paths_and_grads[path].astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(update, state)
