"""Moments, masks and the cross-device reduction: the one place that talks to
``lax.psum``.

Every layer normalizes through :func:`normalize_over`, which computes the
statistics of ``x`` over some axes and applies them, with a custom VJP that
keeps only ``x`` and per-row statistics for the backward pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _checks


class Moments(NamedTuple):
  """Statistics of ``x`` over the reduced axes, kept with ``keepdims=True``."""

  mean: jax.Array
  var: jax.Array
  count: jax.Array


class _Sync(NamedTuple):
  """Static description of the cross-device reduction."""

  axis_name: Hashable | None
  axis_size: int
  groups: tuple[tuple[int, ...], ...] | None


def abs_sq(x: jax.Array) -> jax.Array:
  if jnp.iscomplexobj(x):
    return lax.square(lax.real(x)) + lax.square(lax.imag(x))
  return lax.square(x)


def _sum(x, axes):
  return jnp.sum(x, axis=axes, keepdims=True)


def _float_views(x, dtype, n):
  """``n`` copies of ``x`` in ``dtype``, each converted on its own.

  A bfloat16 ``x`` converted once and summed twice is written to memory in
  float32 and read back by each sum (XLA does not duplicate the conversion
  into several reduction fusions); converted once per sum, it fuses into
  each, which reads the narrow ``x``. The barrier only hides that the copies
  are the same array; it moves no data.
  """
  if jnp.dtype(x.dtype) == jnp.dtype(dtype):
    return [x] * n
  return [c.astype(dtype) for c in lax.optimization_barrier((x,) * n)]


def _local_moments(x, axes, mask, use_mean, dtype, separate=True, guard=False):
  """Count, mean and sum of squared deviations of this device's elements.

  Without a mask, statistics per sample (axis 0 not reduced) use a two-pass
  over each contiguous block, and others (batch norm) one pass over ``x``
  shifted by one of its own elements. Both avoid the cancellation of
  ``E[x^2] - E[x]^2`` (x = 1e4 + N(0, 1) loses every digit in float32
  otherwise). With a mask the shift element could be a padded value far from
  the data, so it takes the exact two-pass route instead. ``separate=False``
  (a forward pass that no backward pass follows) lets XLA share one
  conversion of a narrow ``x``.

  Returns ``(count, mean, m2, alt)``. With ``guard=True``, where the rows are
  strided (see :func:`_plain_moments`), ``mean`` and ``m2`` come from the
  plain sums and ``alt = (ok, exact)``: ``ok`` says whether they are
  accurate, ``exact(x)`` gives ``(mean, m2)`` by the exact route. Otherwise
  ``alt`` is ``None`` and the statistics are the exact ones.
  """
  xf = x.astype(dtype)
  if mask is None:
    n = float(math.prod(xf.shape[a] for a in axes))
    count = jnp.full((1,) * xf.ndim, n, dtype=jnp.real(xf).dtype)
    if not use_mean:
      m2 = _sum(abs_sq(xf), axes)
      return count, jnp.zeros_like(m2, dtype=xf.dtype), m2, None
    guard = guard and not jnp.iscomplexobj(xf)
    first = min(axes, default=0)
    if first > 0:
      # Per-sample statistics (layer, instance, group norm). Over the run of
      # consecutive axes from the first reduced one, a block of contiguous
      # memory, the mean and the squared deviations from it are two sums over
      # the same block, which XLA fuses with the output into one pass over x
      # (a slice of x as a shift would break that fusion). Two-pass: the
      # variance is that of x about a mean off by float32's rounding d, so
      # its error is (d / std)^2, far below float32's resolution however
      # large the mean is; the mean itself is as exact as float32's sum (a
      # correction sum would make it exact, but costs a third pass over
      # every row, about 30% of the layer's time on a CPU).
      block = (first,)
      while block[-1] + 1 in axes:
        block += (block[-1] + 1,)
      rest = tuple(a for a in axes if a not in block)
      n_block = float(math.prod(xf.shape[a] for a in block))
      # Over inner axes, or converted from a narrower x and reused by a
      # backward pass, the sums are separate fusions: each needs its own
      # conversion and its own copy of the mean, or XLA writes the shared
      # x - mean (or float32 x) to memory for the output to read back. Over
      # trailing axes in a forward pass only (or in float32), XLA fuses both
      # sums and the output as one.
      inner = block[-1] != xf.ndim - 1
      separate = inner or (xf is not x and separate)

      def merge(mean, m2):
        if not rest:
          return mean, m2
        # Group norm's channels within a group: the blocks have equal counts,
        # so Chan et al.'s merge is exact and runs on per-channel arrays.
        block_mean = mean
        mean = _sum(block_mean, rest) / (n / n_block)
        m2 = _sum(m2, rest) + n_block * _sum(abs_sq(block_mean - mean), rest)
        return mean, m2

      def two_pass(x):
        xa, xc = _float_views(x, dtype, 2) if separate else (x.astype(dtype),) * 2
        own = _own if separate else lambda v: (v,)
        mean = _sum(xa, block) / n_block
        return merge(mean, _sum(abs_sq(xc - own(mean)[0]), block))

      if guard and inner:
        mean, m2, ok = _plain_moments(x, block, dtype)
        return count, *merge(mean, m2), (ok, two_pass)
      return count, *two_pass(x), None

    def shifted(x):
      xf = x.astype(dtype)
      shift = lax.slice_in_dim(xf, 0, 1, axis=axes[0]) if axes else xf
      for a in axes[1:]:
        shift = lax.slice_in_dim(shift, 0, 1, axis=a)
      # x - shift is written two different ways on purpose. Written once,
      # CSE shares it between the two sums and XLA (YNN fusions on CPU)
      # writes the shifted copy of x to memory and reads it twice; written
      # differently, each sum is its own reduction fusion that reads x.
      xa, xb = _float_views(x, dtype, 2)
      neg_s1 = _sum(shift - xa, axes)
      s2 = _sum(abs_sq(xb + (-shift)), axes)
      m2 = jnp.maximum(s2 - jnp.real(neg_s1 * jnp.conj(neg_s1)) / n, 0.0)
      return shift - neg_s1 / n, m2

    if guard:
      mean, m2, ok = _plain_moments(x, axes, dtype)
      return count, mean, m2, (ok, shifted)
    return count, *shifted(x), None
  # A mask that broadcasts along a reduced axis counts once per element there.
  repeats = math.prod(xf.shape[a] for a in axes if mask.shape[a] == 1)
  count = _sum(mask.astype(jnp.real(xf).dtype), axes) * float(repeats)
  count = jnp.broadcast_to(count, jnp.broadcast_shapes(count.shape, (1,) * xf.ndim))
  safe = jnp.maximum(count, 1.0)
  if not use_mean:
    m2 = _sum(jnp.where(mask, abs_sq(xf), 0.0), axes)
    return count, jnp.zeros_like(m2, dtype=xf.dtype), m2, None
  mean = _sum(jnp.where(mask, xf, 0.0), axes) / safe
  m2 = _sum(jnp.where(mask, abs_sq(xf - mean), 0.0), axes)
  return count, mean, m2, None


# The plain sums are kept where the squared deviations are at least this
# fraction of the sum of squares, i.e. |mean| <= sqrt(15) std: then their
# cancellation costs at most 4 bits, and the variance's relative error stays
# within 16 times float32's summation error: at most 5e-6 measured at the
# threshold over 200k values per channel, 2e-7 at mean 0.
_GUARD = 1.0 / 16.0


def _plain_moments(x, axes, dtype):
  """Mean and m2 from ``sum(x)`` and ``sum(x^2)``, and whether they are exact.

  On a CPU, a sum whose operand is x minus a broadcast statistic (a shift or
  a mean) runs about 1.4 times slower than a plain sum of x or x^2 in XLA's
  reduction fusions, which batch, instance and group norm over NHWC need
  (their rows are strided, so their sums are separate fusions). So the
  fused layers take these plain sums first, and the exact route only when
  some row has ``|mean| > sqrt(15) std`` (``ok`` is false), where
  ``E[x^2] - E[x]^2`` would lose too many digits; see :func:`_cond_on_cpu`.
  """
  xa, xb = _float_views(x, dtype, 2)
  s1 = _sum(xa, axes)
  s2 = _sum(abs_sq(xb), axes)
  n = float(math.prod(x.shape[a] for a in axes))
  mean = s1 / n
  m2 = s2 - s1 * mean
  return mean, m2, jnp.all(m2 >= _GUARD * s2)


def _cond_on_cpu(ok, fast, exact, *args):
  """``fast(*args)`` if ``ok`` else ``exact(*args)``, on a CPU; else ``exact``.

  Other platforms take the exact route directly: the trade was measured on
  XLA:CPU only, and on a GPU XLA reads a conditional's predicate back to the
  host. Under ``vmap``, ``ok`` is taken over the whole batch, so one
  ``cond`` remains rather than a select of both routes. ``fast`` and
  ``exact`` must not close over traced values. Not differentiable by
  autodiff: only the fused layers, whose custom VJP does not differentiate
  their forward pass, use it.
  """

  def run(ok, *args):
    return lax.cond(ok, fast, exact, *args)

  run = jax.custom_batching.custom_vmap(run)

  @run.def_vmap
  def _run_batched(axis_size, in_batched, ok, *args):
    ok = jnp.all(ok)
    args = jax.tree.map(
      lambda a, b: a if b else jnp.broadcast_to(a, (axis_size,) + a.shape),
      args,
      tuple(in_batched[1:]),
    )
    out = lax.cond(ok, jax.vmap(fast), jax.vmap(exact), *args)
    return out, jax.tree.map(lambda _: True, out)

  def elsewhere(ok, *args):
    return exact(*args)

  return lax.platform_dependent(ok, *args, cpu=run, default=elsewhere)


def _group_weights(sync: _Sync) -> jax.Array:
  """Which devices are in this device's group (1.0) or not (0.0), shape (n,)."""
  group_of = [0] * sync.axis_size
  for k, g in enumerate(sync.groups):
    for i in g:
      group_of[i] = k
  group_of = jnp.asarray(group_of, jnp.int32)
  mine = group_of[lax.axis_index(sync.axis_name)]
  return (group_of == mine).astype(jnp.float32)


def _all_gather_by_psum(parts: jax.Array, sync: _Sync) -> jax.Array:
  """Stacks every device's ``parts`` along a new leading axis, in one psum.

  A psum of a one-hot slot is an all-gather that counts as a single
  all-reduce, the collective every backend fuses best.
  """
  index = lax.axis_index(sync.axis_name)
  slots = jax.nn.one_hot(index, sync.axis_size, dtype=jnp.real(parts).dtype)
  buf = slots.reshape((-1,) + (1,) * parts.ndim) * parts[None]
  return lax.psum(buf, sync.axis_name)


def _combine(count, mean, m2, sync: _Sync):
  """Merges every device's moments with one collective (Chan et al. 1979).

  Each device contributes its own count, so uneven shards and masks are
  exact, and deviations are taken from the global mean, so there is no
  cancellation however large the mean is.
  """
  if sync.axis_name is None:
    return count, mean, m2
  shape = jnp.broadcast_shapes(count.shape, mean.shape, m2.shape)
  parts = jnp.stack(
    [jnp.broadcast_to(v, shape).astype(mean.dtype) for v in (count, mean, m2)]
  )
  buf = _all_gather_by_psum(parts, sync)
  counts, means, m2s = jnp.real(buf[:, 0]), buf[:, 1], jnp.real(buf[:, 2])
  if sync.groups is not None:
    w = _group_weights(sync).reshape((-1,) + (1,) * (buf.ndim - 2))
    counts = counts * w.astype(counts.dtype)
  total = jnp.sum(counts, axis=0)
  safe = jnp.maximum(total, 1.0)
  gmean = jnp.sum(counts * means, axis=0) / safe
  gm2 = jnp.sum(
    jnp.where(counts > 0, m2s + counts * abs_sq(means - gmean), 0.0), axis=0
  )
  return total, gmean, gm2


def _psum(parts: jax.Array, sync: _Sync) -> jax.Array:
  """Sums ``parts`` over the devices of this device's group, in one psum."""
  if sync.axis_name is None:
    return parts
  if sync.groups is None:
    return lax.psum(parts, sync.axis_name)
  buf = _all_gather_by_psum(parts, sync)
  w = _group_weights(sync).reshape((-1,) + (1,) * parts.ndim)
  return jnp.sum(buf * w.astype(buf.dtype), axis=0)


def _psum_grads(sums, cotangents, x, sync: _Sync) -> tuple[jax.Array, ...]:
  """The backward pass's one collective: ``sums`` and per-device cotangents.

  Under ``pmap`` and named ``vmap`` every device returns its own copy of the
  mean and variance, so their cotangents are summed like ``sums``. Under
  ``shard_map`` the returned statistics are invariant (no groups) and their
  cotangent is already the total: summing it would count it once per device.
  """
  names = sync.axis_name if isinstance(sync.axis_name, tuple) else (sync.axis_name,)
  x_axes = _varying_axes(x)
  total = tuple(
    sync.axis_name is not None
    and all(a in x_axes for a in names)
    and not any(a in _varying_axes(c) for a in names)
    for c in cotangents
  )
  to_sum = list(sums) + [c for c, t in zip(cotangents, total, strict=True) if not t]
  summed = iter(_psum(jnp.stack(jnp.broadcast_arrays(*to_sum)), sync))
  out = [next(summed) for _ in sums]
  for c, t in zip(cotangents, total, strict=True):
    out.append(jnp.broadcast_to(c, out[0].shape) if t else next(summed))
  return tuple(out)


def make_sync(axis_name: Hashable | None, axis_index_groups: Any) -> _Sync:
  """Checks ``axis_name``/``axis_index_groups`` and describes the reduction.

  For layers that call :func:`moments` themselves.
  """
  size, groups = _checks.check_axis_name(axis_name, axis_index_groups)
  return _Sync(axis_name, size, groups)


def moments(
  x: jax.Array,
  axes: tuple[int, ...],
  *,
  mask: jax.Array | None,
  use_mean: bool,
  sync: _Sync,
  dtype: Any,
  separate: bool = True,
) -> Moments:
  """Mean and biased variance of ``x`` over ``axes`` (and across devices).

  ``separate=False`` lets XLA share one conversion of a narrow ``x`` between
  the sums: faster when nothing else (a backward pass) reads ``x``.
  """
  count, mean, m2, _ = _local_moments(x, axes, mask, use_mean, dtype, separate)
  return _merged(count, mean, m2, sync)


def _merged(count, mean, m2, sync: _Sync) -> Moments:
  """This device's moments merged across devices, as a mean and a variance."""
  count, mean, m2 = _combine(count, mean, m2, sync)
  var = m2 / jnp.maximum(count, 1.0)
  return Moments(mean, var.astype(jnp.real(mean).dtype), count)


class _Config(NamedTuple):
  axes: tuple[int, ...]
  use_mean: bool
  epsilon: float
  sync: _Sync
  dtype: Any
  out_dtype: Any


def _apply(x, scale, bias, mean, inv, out_dtype, dtype):
  xf = x.astype(dtype)
  mul = inv if scale is None else inv * scale.astype(dtype)
  y = (xf - mean) * mul
  if bias is not None:
    y = y + bias.astype(dtype)
  return y.astype(out_dtype)


def _finish(cfg: _Config, x, scale, bias, count, mean, m2, separate):
  """The output and statistics from this device's moments: merged across
  devices, then applied."""
  m = _merged(count, mean, m2, cfg.sync)
  inv = lax.rsqrt(m.var + cfg.epsilon).astype(m.var.dtype)
  if separate and jnp.dtype(x.dtype) != jnp.dtype(cfg.dtype):
    # Its own conversion of x, as the sums have theirs (see _float_views).
    (x,) = lax.optimization_barrier((x,))
  y = _apply(x, scale, bias, m.mean, inv, cfg.out_dtype, cfg.dtype)
  return y, m, inv


def _forward(cfg: _Config, x, scale, bias, mask, separate=True, guard=False):
  count, mean, m2, alt = _local_moments(
    x, cfg.axes, mask, cfg.use_mean, cfg.dtype, separate, guard
  )
  if alt is None:
    return _finish(cfg, x, scale, bias, count, mean, m2, separate)
  ok, exact = alt
  if cfg.sync.axis_name is not None:
    # Devices may take different routes, so the conditional holds only the
    # local statistics: a collective inside it would not match across them.
    mean, m2 = _cond_on_cpu(
      ok, lambda x, m, v: (m, v), lambda x, m, v: exact(x), x, mean, m2
    )
    return _finish(cfg, x, scale, bias, count, mean, m2, separate)

  # Without a collective the whole layer goes in the conditional: XLA:CPU
  # runs the large output fusion right after a conditional at full speed
  # only about half the time (measured: mean 1.2 times slower), and at full
  # speed every time when the fusion is inside it.
  def fast(x, scale, bias, count, mean, m2):
    return _finish(cfg, x, scale, bias, count, mean, m2, separate)

  def slow(x, scale, bias, count, mean, m2):
    return _finish(cfg, x, scale, bias, count, *exact(x), separate)

  return _cond_on_cpu(ok, fast, slow, x, scale, bias, count, mean, m2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, x, scale, bias, mask):
  y, m, _ = _forward(cfg, x, scale, bias, mask, separate=False, guard=True)
  return y, m.mean, m.var


def _fused_fwd(cfg, x, scale, bias, mask):
  y, m, inv = _forward(cfg, x, scale, bias, mask, guard=True)
  # Only x and per-row statistics are kept: x-hat is recomputed in the
  # backward pass, where it fuses with the rest of the gradient.
  return (y, m.mean, m.var), (x, scale, bias, mask, m.mean, inv, m.count)


def _reduce_to(v, shape):
  axes = tuple(
    i for i, (a, b) in enumerate(zip(v.shape, shape, strict=True)) if b == 1 and a != 1
  )
  return jnp.sum(v, axis=axes, keepdims=True) if axes else v


def _own(*small):
  """Copies of small arrays that CSE cannot merge with the originals.

  A full-size expression shared by two sums (``x - mean``, a broadcast
  ``scale``, ``dy`` converted to float32) is written to memory and read back
  by each, because XLA (its YNN reduction fusions on CPU) does not duplicate
  a producer into several reductions. Giving each sum its own copy of the
  per-row and per-channel operands makes its expression its own, so it fuses
  into that sum, which then reads only ``x`` and ``dy``.
  """
  return lax.optimization_barrier(small)


def _fused_bwd(cfg, res, cts):
  x, scale, bias, mask, mean, inv, count = res
  g, g_mean, g_var = cts
  dtype = cfg.dtype
  # One float view of x and dy per sum and one for dx (see _float_views).
  g_c1, g_c2, g_ds, g_db, gf = _float_views(g, dtype, 5)
  x_c2, x_ds, xf = _float_views(x, dtype, 3)
  sf = None if scale is None else scale.astype(dtype)
  # Masked-out elements are normalized too, so their cotangents reach the
  # statistics: c1 and c2 sum over every element; only the correction below
  # (d stats / dx) is restricted to the elements that entered the statistics.
  # Reduced axes along which scale and bias are constant: all of them in
  # batch and instance norm, the spatial ones in group norm, none in layer
  # norm. Summed over those first, two sums over x and dy give c1, c2 and the
  # parameter gradients at once; the rest runs on per-channel arrays.
  const_axes = tuple(
    a for a in cfg.axes if all(p is None or p.shape[a] == 1 for p in (scale, bias))
  )
  per_row = bool(const_axes)
  if per_row:
    (mean_c2,) = _own(mean)
    sum_g = _sum(g_c1, const_axes)
    sum_gx = _sum((x_c2 - mean_c2) * g_c2, const_axes)
    c1 = sum_g if sf is None else sum_g * sf
    c2 = sum_gx if sf is None else sum_gx * sf
    var_axes = tuple(a for a in cfg.axes if a not in const_axes)
    if var_axes:
      c1, c2 = _sum(c1, var_axes), _sum(c2, var_axes)
    c2 = c2 * inv
  else:
    if sf is None:
      c1 = _sum(g_c1, cfg.axes)
      (mean_c2,) = _own(mean)
      c2 = _sum((x_c2 - mean_c2) * g_c2, cfg.axes) * inv
    else:
      (sf_c1,) = _own(sf)
      c1 = _sum(g_c1 * sf_c1, cfg.axes)
      mean_c2, sf_c2 = _own(mean, sf)
      c2 = _sum((x_c2 - mean_c2) * sf_c2 * g_c2, cfg.axes) * inv
  if cfg.use_mean:
    c1, c2, g_mean, g_var = _psum_grads((c1, c2), (g_mean, g_var), x, cfg.sync)
  else:
    c2, g_var = _psum_grads((c2,), (g_var,), x, cfg.sync)
  # dx = inv * dxhat - [mask] * (a + xhat * b), the usual batch-norm gradient
  # with the cotangents of the returned mean and variance folded into a, b.
  rn = 1.0 / jnp.maximum(count, 1.0)
  b = (inv * c2 - 2.0 * g_var / inv) * rn
  corr = (xf - mean) * (inv * b)
  if cfg.use_mean:
    corr = corr + (inv * c1 - g_mean) * rn
  if mask is not None:
    corr = jnp.where(mask, corr, 0.0)
  dx = (gf * (inv if sf is None else inv * sf) - corr).astype(x.dtype)
  dscale = None
  if scale is not None:
    if per_row:
      dscale = _reduce_to(sum_gx * inv, scale.shape)
    else:
      mean_ds, inv_ds = _own(mean, inv)
      dscale = _reduce_to(g_ds * ((x_ds - mean_ds) * inv_ds), scale.shape)
    dscale = dscale.astype(scale.dtype)
  dbias = None
  if bias is not None:
    dbias = _reduce_to(sum_g if per_row else g_db, bias.shape).astype(bias.dtype)
  return dx, dscale, dbias, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _match_vma(v, x):
  """Marks a replicated parameter as device-varying like ``x`` under shard_map.

  The custom VJP returns per-device parameter gradients; the transpose of
  this cast is what sums them over the devices, as autodiff would.
  """
  if v is None:
    return None
  missing = tuple(a for a in _varying_axes(x) if a not in _varying_axes(v))
  return lax.pcast(v, missing, to="varying") if missing else v


def _varying_axes(v) -> frozenset:
  """The shard_map axes ``v`` varies over (empty outside shard_map).

  Older jax spells it ``aval.vma``, newer ``aval.mat.varying``.
  """
  aval = jax.typeof(v)
  mat = getattr(aval, "mat", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", ()))


def normalize_over(
  x: jax.Array,
  *,
  axes: tuple[int, ...],
  scale: jax.Array | None,
  bias: jax.Array | None,
  mask: jax.Array | None,
  use_mean: bool,
  epsilon: float,
  axis_name: Hashable | None,
  axis_index_groups: Any,
  dtype: Any,
  out_dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Normalizes ``x`` by its own statistics over ``axes``.

  ``scale`` and ``bias`` are already shaped to broadcast against ``x``.

  Returns:
    ``(y, mean, var)``, the statistics with ``keepdims=True``; ``mean`` is
    zero when ``use_mean`` is false (RMS normalization).
  """
  size, groups = _checks.check_axis_name(axis_name, axis_index_groups)
  sync = _Sync(axis_name, size, groups)
  cfg = _Config(
    axes, use_mean, float(epsilon), sync, jnp.dtype(dtype), jnp.dtype(out_dtype)
  )
  if jnp.iscomplexobj(x) or jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating):
    # Complex inputs take plain autodiff through the same forward maths.
    y, m, _ = _forward(cfg, x, scale, bias, mask)
    return y, m.mean, m.var
  scale, bias = _match_vma(scale, x), _match_vma(bias, x)
  return _fused(cfg, x, scale, bias, mask)


def normalize_with(
  x: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  *,
  scale: jax.Array | None,
  bias: jax.Array | None,
  epsilon: float,
  dtype: Any,
  out_dtype: Any,
) -> jax.Array:
  """Applies given statistics: ``(x - mean) * rsqrt(var + epsilon) * scale + bias``."""
  inv = lax.rsqrt(jnp.asarray(var, dtype) + epsilon)
  return _apply(x, scale, bias, jnp.asarray(mean, dtype), inv, out_dtype, dtype)
