"""Property-based tests (Hypothesis) of the normalization layers.

Across layers (batch norm in training and evaluation, batch renorm,
switchable norm, layer norm, RMS norm, group norm, instance norm), dtypes
(float16, bfloat16, float32, float64), shapes of rank 2 to 4 (batch 0..6,
other axes 1..6), channel and reduction axes, masks (none, random, all
False, all True, of every broadcastable shape), offsets and epsilons, these
check:

- outputs are finite and agree with a float64 NumPy reference (mean and
  biased variance, epsilon inside the square root, flax's momentum) within
  the bound that the dtype implies (see :func:`tolerance`);
- an empty batch (size 0, or every element masked) returns the running
  state exactly as it was;
- an invalid draw raises a ``ValueError`` or ``TypeError`` naming the
  argument, eagerly and under ``jit``, never another exception or a NaN.

Every test is derandomized (CI is deterministic) and has no deadline (each
new shape compiles).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxnorm as jn

SETTINGS = dict(
  deadline=None,
  derandomize=True,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = ("float16", "bfloat16", "float32", "float64")
LOW = ("float16", "bfloat16")
# Unit roundoff 2^-p of each dtype (p significand bits, the implicit one
# included): one rounding moves a value by at most U * |value|.
U = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


# --- drawing cases ------------------------------------------------------------


def draw_shape(data, min_dims=2, max_dims=4):
  ndim = data.draw(st.integers(min_dims, max_dims), label="ndim")
  batch = data.draw(st.integers(0, 6), label="batch")
  rest = data.draw(st.lists(st.integers(1, 6), min_size=ndim - 1, max_size=ndim - 1))
  return (batch, *rest)


def draw_x(data, dtype, shape):
  """``offset + spread * z``, z normal (or rounded to integers: ties and
  constant rows), as ``dtype``, and the NumPy generator the rest is drawn with.

  Offsets up to 1e4 for float32 and float64; low-precision dtypes get small
  ones (their own rounding of x is exact in the reference, which reads the
  rounded x, but a large offset would leave too few digits for the spread,
  and x / sqrt(epsilon) of a wholly masked row must stay finite).
  """
  if dtype in LOW:
    offset = data.draw(st.sampled_from([0.0, 1.0, -4.0, 10.0]), label="offset")
    spread = data.draw(st.sampled_from([0.5, 1.0, 4.0]), label="spread")
  else:
    offset = data.draw(st.sampled_from([0.0, 1e2, -1e4, 1e4]), label="offset")
    spread = data.draw(st.sampled_from([0.1, 1.0, 10.0]), label="spread")
  rounded = data.draw(st.booleans(), label="rounded")
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
  z = rng.standard_normal(shape)
  if rounded:
    z = np.round(z)
  x = offset + spread * z
  if dtype != "float64":
    x = x.astype(np.float32)
  return jnp.asarray(x, dtype), rng, offset, spread


def draw_epsilon(data, dtype):
  # No 0: a constant row (or one of a single element) would be 0 / 0.
  values = [1e-5, 1e-3, 0.1, 1.0] if dtype in LOW else [1e-6, 1e-5, 1e-3, 0.1, 1.0]
  return data.draw(st.sampled_from(values), label="epsilon")


# Random masks first and twice: Hypothesis favours the first choices.
MASKS = ("random", "none", "all_false", "random", "all_true")


def draw_mask(data, rng, shape, kinds=MASKS):
  """None, or a boolean mask of a shape that broadcasts to ``shape``: fewer
  leading axes, and any axis of size 1."""
  kind = data.draw(st.sampled_from(kinds), label="mask")
  if kind == "none":
    return None
  drop = data.draw(st.integers(0, len(shape)), label="mask_dropped_axes")
  keep = data.draw(
    st.lists(st.booleans(), min_size=len(shape) - drop, max_size=len(shape) - drop)
  )
  mshape = tuple(s if k else 1 for s, k in zip(shape[drop:], keep, strict=True))
  if kind == "random":
    m = rng.random(mshape) < 0.6
  else:
    m = np.full(mshape, kind == "all_true")
  return jnp.asarray(m)


def draw_affine(data, rng, fshape, dtype, *, bias=True):
  """Random ``scale`` and ``bias`` (either may be None), as float32 or as
  the dtype of x."""
  pdtype = data.draw(st.sampled_from(["float32", dtype]), label="param_dtype")
  use_scale = data.draw(st.booleans(), label="use_scale")
  use_bias = bias and data.draw(st.booleans(), label="use_bias")
  scale = rng.uniform(-2.0, 2.0, fshape).astype(np.float32) if use_scale else None
  b = rng.uniform(-1.0, 1.0, fshape).astype(np.float32) if use_bias else None
  return jn.NormParams(
    scale=None if scale is None else jnp.asarray(scale, pdtype),
    bias=None if b is None else jnp.asarray(b, pdtype),
  )


def draw_axes(data, ndim, label, *, min_size=1, exclude=()):
  """A set of axes, given as an int or a tuple, each positive or negative."""
  pool = [a for a in range(ndim) if a not in exclude]
  axes = data.draw(
    st.lists(st.sampled_from(pool), min_size=min_size, max_size=len(pool), unique=True),
    label=label,
  )
  signed = [a - ndim if data.draw(st.booleans()) else a for a in axes]
  if len(signed) == 1 and data.draw(st.booleans()):
    return signed[0], tuple(axes)
  return tuple(signed), tuple(sorted(axes))


def jitted(fn, **kw):
  """``fn`` under ``jit``, with ``kw`` (Python hyperparameters, the mask)
  closed over: one compile per example, where eager dispatch compiles every
  primitive for every new shape (~8x slower here)."""
  return jax.jit(lambda *args: fn(*args, **kw))


# --- float64 NumPy references -------------------------------------------------


def f64(a):
  return None if a is None else np.asarray(a).astype(np.float64)


def ref_moments(x, axes, mask, *, center=True):
  """Count, mean and biased variance over ``axes`` of the elements that the
  mask keeps (keepdims; a row with nothing in it gets 0 and 0)."""
  w = np.ones(x.shape) if mask is None else np.broadcast_to(f64(mask), x.shape)
  count = w.sum(axis=axes, keepdims=True)
  safe = np.maximum(count, 1.0)
  mean = (w * x).sum(axis=axes, keepdims=True) / safe if center else 0.0 * count
  var = (w * (x - mean) ** 2).sum(axis=axes, keepdims=True) / safe
  return count, mean, var


def bcast(p, shape, axes):
  """A per-feature parameter (shape ``x.shape[axes]``) shaped to broadcast."""
  return p.reshape(tuple(s if a in axes else 1 for a, s in enumerate(shape)))


def affine(xhat, params, shape, axes):
  scale = f64(params.scale)
  bias = f64(params.bias)
  s = np.ones(()) if scale is None else bcast(scale, shape, axes)
  b = np.zeros(()) if bias is None else bcast(bias, shape, axes)
  return xhat * s + b, np.abs(s), np.abs(b)


# --- tolerances ---------------------------------------------------------------


def tolerance(dtype, ref, *, n, xmax, spread_scale, std, bias):
  """The bound on ``|y - ref|``, per element, for a normalization layer.

  Statistics are accumulated in at least float32 (unit roundoff ``uc``:
  2^-24, or 2^-53 for float64) and the output is rounded to ``dtype`` (unit
  roundoff ``uo``). Then:

  - the mean of ``n`` values of magnitude up to ``xmax`` is off by
    ``d = 4 uc (sqrt(n) + 1) xmax`` (float32 summation: sqrt(n) roundings of
    partial sums ~ the offset, with a margin), which shifts every output by
    ``|scale| d / sqrt(var + eps)``; in a constant row (var = 0) that is
    ``|scale| d / sqrt(eps)``;
  - the sum of squares, the rsqrt and the affine are good to
    ``8 uc (sqrt(n) + 2)`` relative;
  - the final rounding to ``dtype`` adds ``uo |y|``, twice for margin
    (float16 ~1e-3, bfloat16 ~8e-3 relative).

  For float32 with offset 0 this is ~1e-5 for outputs of order 1: tight
  enough to see the unbiased variance or epsilon outside the square root.
  """
  uc = U["float64" if dtype == "float64" else "float32"]
  uo = U[dtype]
  d = 4 * uc * (math.sqrt(n) + 1) * xmax
  rel = 8 * uc * (math.sqrt(n) + 2)
  return spread_scale * d / std + rel * (np.abs(ref) + bias + 1) + 2 * uo * np.abs(ref)


def mean_error(dtype, n, xmax):
  uc = U["float64" if dtype == "float64" else "float32"]
  return 4 * uc * (math.sqrt(n) + 1) * xmax


def assert_close(y, ref, tol, valid, what):
  """``|y - ref| <= tol`` where ``valid``, and ``y`` finite everywhere."""
  y = f64(y)
  assert y.shape == ref.shape, (what, y.shape, ref.shape)
  assert np.all(np.isfinite(y)), f"{what}: non-finite output {y}"
  valid = np.broadcast_to(valid, ref.shape)
  err = np.where(valid, np.abs(y - ref), 0.0)
  excess = err - np.broadcast_to(tol, ref.shape)
  if np.any(excess > 0):
    i = np.unravel_index(np.argmax(excess), ref.shape)
    raise AssertionError(
      f"{what}: |y - ref| = {err[i]:.3g} > tol {np.broadcast_to(tol, ref.shape)[i]:.3g}"
      f" at {i}: y={y[i]!r}, ref={ref[i]!r} ({int(np.sum(excess > 0))} elements)"
    )


# --- batch norm and batch renorm, training -----------------------------------


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_batch_norm_training_matches_float64_reference(data):
  dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
  with jax.enable_x64(dtype == "float64"):
    shape = draw_shape(data)
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    c = axis % ndim
    red = tuple(a for a in range(ndim) if a != c)
    x, rng, offset, spread = draw_x(data, dtype, shape)
    mask = draw_mask(data, rng, shape)
    eps = draw_epsilon(data, dtype)
    momentum = data.draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]), label="momentum")
    fshape = (shape[c],)
    params = draw_affine(data, rng, fshape, dtype)
    state = jn.BatchNormState(
      mean=jnp.asarray(offset + spread * rng.standard_normal(fshape), jnp.float32),
      var=jnp.asarray(spread**2 * rng.uniform(0.25, 4.0, fshape), jnp.float32),
    )
    kw = dict(use_running_average=False, axis=axis, epsilon=eps, mask=mask)
    if mask is None and math.prod(shape[a] for a in red) == 1:
      # A single value per channel: an invalid draw, refused by name.
      with pytest.raises(ValueError, match="value per channel"):
        jn.batch_norm(x, params, state, momentum=momentum, **kw)
      return
    y, new = jitted(jn.batch_norm, momentum=momentum, **kw)(x, params, state)
    renorm = data.draw(st.sampled_from([None, (1.0, 0.0), (1.5, 0.5), (3.0, 5.0)]))
    if renorm is not None:
      y_rn, new_rn = jitted(
        jn.batch_renorm, momentum=momentum, r_max=renorm[0], d_max=renorm[1], **kw
      )(x, params, state)

  assert y.dtype == x.dtype and y.shape == x.shape
  assert new.mean.dtype == jnp.float32 and new.var.dtype == jnp.float32
  xf = f64(x)
  count, mean, var = ref_moments(xf, red, mask)
  seen = count > 0
  n = max(1.0, float(count.max(initial=0.0)))
  xmax = float(np.abs(xf).max(initial=0.0))
  std = np.sqrt(var + eps)
  ref, s_abs, b_abs = affine((xf - mean) / std, params, shape, (c,))
  tol = tolerance(dtype, ref, n=n, xmax=xmax, spread_scale=s_abs, std=std, bias=b_abs)
  # A channel with nothing in it is normalized with statistics 0 and 0: only
  # finite (its values are the implementation's choice, not the reference's).
  assert_close(y, ref, tol, seen, "batch_norm y")

  # State: flax's new = m * old + (1 - m) * batch, float32, exactly the old
  # value where the channel saw nothing.
  d = mean_error(dtype, n, xmax)
  rel = 8 * U["float32"] * (math.sqrt(n) + 2)
  old_m, old_v = f64(state.mean), f64(state.var)
  mb, vb, cnt = mean.reshape(fshape), var.reshape(fshape), count.reshape(fshape)
  ref_m = momentum * old_m + (1 - momentum) * mb
  ref_v = momentum * old_v + (1 - momentum) * vb
  u32 = U["float32"]
  tol_m = (1 - momentum) * d + 4 * u32 * (np.abs(momentum * old_m) + np.abs(mb))
  tol_v = (1 - momentum) * (d**2 + rel * vb) + 4 * u32 * (momentum * old_v + vb)
  for got, want, old, t, name in (
    (new.mean, ref_m, state.mean, tol_m, "mean"),
    (new.var, ref_v, state.var, tol_v, "var"),
  ):
    assert_close(got, want, t, cnt > 0, f"batch_norm state.{name}")
    np.testing.assert_array_equal(
      np.asarray(got)[cnt == 0], np.asarray(old)[cnt == 0], f"unseen {name}"
    )
  assert np.all(f64(new.var) >= 0), "negative running variance"

  if renorm is None:
    return
  # Batch renorm: ((x - mu_B) / sigma_B * r + d) * scale + bias with
  # r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - mu) / sigma,
  # +-d_max), and the same state update as batch norm.
  r_max, d_max = renorm
  sigma = np.sqrt(bcast(old_v, shape, (c,)) + eps)
  r = np.clip(std / sigma, 1 / r_max, r_max)
  dd = np.clip((mean - bcast(old_m, shape, (c,))) / sigma, -d_max, d_max)
  xhat_r = (xf - mean) / std * r
  ref_rn, _, _ = affine(xhat_r + dd, params, shape, (c,))
  shift = d / std
  # r_max times batch norm's shift, the shift of d, and r's own relative
  # error (that of sigma_B, second order in the mean's error).
  tol_rn = s_abs * (r_max * shift + d / sigma + np.abs(xhat_r) * (shift**2 + rel))
  tol_rn = tol_rn + tolerance(
    dtype, ref_rn, n=n, xmax=0.0, spread_scale=s_abs, std=std, bias=b_abs + s_abs * dd
  )
  assert_close(y_rn, ref_rn, tol_rn, seen, f"batch_renorm{renorm} y")
  for got, want in ((new_rn.mean, new.mean), (new_rn.var, new.var)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --- batch norm, evaluation ---------------------------------------------------


@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_batch_norm_evaluation_matches_float64_reference(data):
  dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
  with jax.enable_x64(dtype == "float64"):
    shape = draw_shape(data)
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    c = axis % ndim
    x, rng, offset, spread = draw_x(data, dtype, shape)
    mask = draw_mask(data, rng, shape)  # evaluation ignores it
    eps = draw_epsilon(data, dtype)
    fshape = (shape[c],)
    params = draw_affine(data, rng, fshape, dtype)
    state = jn.BatchNormState(
      mean=jnp.asarray(offset + spread * rng.standard_normal(fshape), jnp.float32),
      var=jnp.asarray(spread**2 * rng.uniform(0.25, 4.0, fshape), jnp.float32),
    )
    y, new = jitted(
      jn.batch_norm, use_running_average=True, axis=axis, epsilon=eps, mask=mask
    )(x, params, state)

  assert y.dtype == x.dtype
  for got, old in zip(new, state, strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(old))
  xf = f64(x)
  m = bcast(f64(state.mean), shape, (c,))
  std = np.sqrt(bcast(f64(state.var), shape, (c,)) + eps)
  ref, s_abs, b_abs = affine((xf - m) / std, params, shape, (c,))
  # No statistics: x - mean rounds once in float32 (|x - mean| u), then
  # the rsqrt, the affine and the cast to dtype.
  uc = U["float64" if dtype == "float64" else "float32"]
  tol = 4 * uc * (s_abs * np.abs(xf - m) / std + np.abs(ref) + b_abs + 1)
  tol = tol + 2 * U[dtype] * np.abs(ref)
  assert_close(y, ref, tol, True, "batch_norm eval y")


# --- switchable norm ----------------------------------------------------------


def softmax(w):
  e = np.exp(w - w.max())
  return e / e.sum()


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_switchable_norm_matches_float64_reference(data):
  dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
  train = data.draw(st.booleans(), label="train")
  with jax.enable_x64(dtype == "float64"):
    shape = draw_shape(data)
    ndim = len(shape)
    c = data.draw(st.integers(1, ndim - 1), label="channel_axis")  # never axis 0
    axis = c - ndim if data.draw(st.booleans()) else c
    bn_axes = tuple(a for a in range(ndim) if a != c)
    x, rng, offset, spread = draw_x(data, dtype, shape)
    mask = draw_mask(data, rng, shape)
    eps = draw_epsilon(data, dtype)
    momentum = data.draw(st.sampled_from([0.0, 0.9, 1.0]), label="momentum")
    fshape = (shape[c],)
    aff = draw_affine(data, rng, fshape, dtype)
    params = jn.SwitchableNormParams(
      scale=aff.scale,
      bias=aff.bias,
      mean_weights=jnp.asarray(rng.normal(0.0, 2.0, 3), jnp.float32),
      var_weights=jnp.asarray(rng.normal(0.0, 2.0, 3), jnp.float32),
    )
    state = jn.BatchNormState(
      mean=jnp.asarray(offset + spread * rng.standard_normal(fshape), jnp.float32),
      var=jnp.asarray(spread**2 * rng.uniform(0.25, 4.0, fshape), jnp.float32),
    )
    kw = dict(use_running_average=not train, axis=axis, epsilon=eps, mask=mask)
    if train and mask is None and math.prod(shape[a] for a in bn_axes) == 1:
      with pytest.raises(ValueError, match="value per channel"):
        jn.switchable_norm(x, params, state, momentum=momentum, **kw)
      return
    y, new = jitted(jn.switchable_norm, momentum=momentum, **kw)(x, params, state)

  assert y.dtype == x.dtype and y.shape == x.shape
  xf = f64(x)
  # IN (over every axis but 0 and the channel), LN (every axis but 0) and BN
  # (every axis but the channel; the running statistics in evaluation),
  # mixed by softmax weights in that order.
  c_in, m_in, v_in = ref_moments(xf, tuple(a for a in bn_axes if a != 0), mask)
  c_ln, m_ln, v_ln = ref_moments(xf, tuple(range(1, ndim)), mask)
  if train:
    c_bn, m_bn, v_bn = ref_moments(xf, bn_axes, mask)
  else:
    c_bn = np.ones(())
    m_bn = bcast(f64(state.mean), shape, (c,))
    v_bn = bcast(f64(state.var), shape, (c,))
  wm, wv = softmax(f64(params.mean_weights)), softmax(f64(params.var_weights))
  mean = wm[0] * m_in + wm[1] * m_ln + wm[2] * m_bn
  var = wv[0] * v_in + wv[1] * v_ln + wv[2] * v_bn
  # A row with nothing in it gets statistics 0 and 0: finite only.
  seen = (c_in > 0) & (c_ln > 0) & (c_bn > 0)
  n = max(1.0, float(max(np.max(c_in, initial=0), np.max(c_ln, initial=0))))
  n = max(n, float(np.max(c_bn, initial=0)))
  xmax = max(float(np.abs(xf).max(initial=0.0)), float(np.abs(m_bn).max(initial=0)))
  std = np.sqrt(var + eps)
  xhat = (xf - mean) / std
  ref, s_abs, b_abs = affine(xhat, params, shape, (c,))
  # Each mean is off by at most d, and so is their convex mix; each
  # variance by d^2 (second order, relative to var + eps).
  shift = mean_error(dtype, n, xmax) / std
  tol = tolerance(dtype, ref, n=n, xmax=xmax, spread_scale=s_abs, std=std, bias=b_abs)
  tol = tol + s_abs * np.abs(xhat) * shift**2
  assert_close(y, ref, tol, seen, f"switchable_norm(train={train})")
  if not train:
    for got, old in zip(new, state, strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(old))
    return
  d = mean_error(dtype, n, xmax)
  u32 = U["float32"]
  cnt = c_bn.reshape(fshape)
  for got, old, batch in (
    (new.mean, state.mean, m_bn.reshape(fshape)),
    (new.var, state.var, v_bn.reshape(fshape)),
  ):
    old = f64(old)
    want = momentum * old + (1 - momentum) * batch
    err = (1 - momentum) * (d + d**2 + 8 * u32 * (math.sqrt(n) + 2) * np.abs(batch))
    t = err + 4 * u32 * (np.abs(momentum * old) + np.abs(batch))
    assert_close(got, want, t, cnt > 0, "switchable_norm state")
    np.testing.assert_array_equal(f64(got)[cnt == 0], old[cnt == 0])


# --- layer norm and RMS norm --------------------------------------------------


@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_layer_and_rms_norm_match_float64_reference(data):
  layer = data.draw(st.sampled_from(["layer_norm", "rms_norm"]), label="layer")
  dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
  with jax.enable_x64(dtype == "float64"):
    shape = draw_shape(data)
    ndim = len(shape)
    raxes_arg, raxes = draw_axes(data, ndim, "reduction_axes")
    faxes_arg, faxes = draw_axes(data, ndim, "feature_axes", min_size=0)
    x, rng, _, _ = draw_x(data, dtype, shape)
    mask = draw_mask(data, rng, shape)
    eps = draw_epsilon(data, dtype)
    fshape = tuple(shape[a] for a in faxes)
    # rms_norm_init makes no bias, but a given one is added: draw both.
    params = draw_affine(data, rng, fshape, dtype)
    y = jitted(
      getattr(jn, layer),
      reduction_axes=raxes_arg,
      feature_axes=faxes_arg,
      epsilon=eps,
      mask=mask,
    )(x, params)

  assert y.dtype == x.dtype
  xf = f64(x)
  center = layer == "layer_norm"
  count, mean, var = ref_moments(xf, raxes, mask, center=center)
  n = max(1.0, float(count.max(initial=0.0)))
  std = np.sqrt(var + eps)
  ref, s_abs, b_abs = affine((xf - mean) / std, params, shape, faxes)
  # RMS norm has no mean to be off: only the relative terms.
  xmax = float(np.abs(xf).max(initial=0.0)) if center else 0.0
  tol = tolerance(dtype, ref, n=n, xmax=xmax, spread_scale=s_abs, std=std, bias=b_abs)
  assert_close(y, ref, tol, count > 0, layer)


# --- group norm and instance norm ---------------------------------------------


@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_group_and_instance_norm_match_float64_reference(data):
  layer = data.draw(st.sampled_from(["group_norm", "instance_norm"]), label="layer")
  dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
  with jax.enable_x64(dtype == "float64"):
    shape = draw_shape(data)
    ndim = len(shape)
    x, rng, _, _ = draw_x(data, dtype, shape)
    mask = draw_mask(data, rng, shape)
    eps = draw_epsilon(data, dtype)
    if layer == "group_norm":
      # The channel axis is never the batch axis 0: group_norm accepts
      # axis=0 where instance_norm refuses it (see the report), so it is
      # left out here.
      c = data.draw(st.integers(1, ndim - 1), label="channel_axis")
      axis = c - ndim if data.draw(st.booleans()) else c
      channels = shape[c]
      groups = data.draw(
        st.sampled_from([g for g in range(1, channels + 1) if channels % g == 0])
      )
      by_size = data.draw(st.booleans(), label="by_group_size")
      kw = (
        dict(num_groups=None, group_size=channels // groups)
        if by_size
        else dict(num_groups=groups)
      )
      faxes = (c,)
      params = draw_affine(data, rng, (channels,), dtype)
      y = jitted(jn.group_norm, axis=axis, epsilon=eps, mask=mask, **kw)(x, params)
    else:
      axis, faxes = draw_axes(data, ndim, "axis", exclude=(0,))
      params = draw_affine(data, rng, tuple(shape[a] for a in faxes), dtype)
      y = jitted(jn.instance_norm, axis=axis, epsilon=eps, mask=mask)(x, params)

  assert y.dtype == x.dtype
  xf = f64(x)
  if layer == "group_norm":
    # Channels last, split into (groups, channels // groups), and reduce
    # every axis but the batch and the group.
    xg = np.moveaxis(xf, c, -1)
    gshape = xg.shape[:-1] + (groups, channels // groups)
    mg = None
    if mask is not None:
      mg = np.moveaxis(np.broadcast_to(f64(mask), shape), c, -1).reshape(gshape)
    red = tuple(range(1, ndim - 1)) + (ndim,)
    count, mean, var = ref_moments(xg.reshape(gshape), red, mg)
    xhat = (xg.reshape(gshape) - mean) / np.sqrt(var + eps)
    xhat = np.moveaxis(xhat.reshape(xg.shape), -1, c)
    count, var = [
      np.moveaxis(np.broadcast_to(v, gshape).reshape(xg.shape), -1, c)
      for v in (count, var)
    ]
  else:
    red = tuple(a for a in range(1, ndim) if a not in faxes)
    count, mean, var = ref_moments(xf, red, mask)
    xhat = (xf - mean) / np.sqrt(var + eps)
  n = max(1.0, float(count.max(initial=0.0)))
  xmax = float(np.abs(xf).max(initial=0.0))
  std = np.sqrt(var + eps)
  ref, s_abs, b_abs = affine(xhat, params, shape, faxes)
  tol = tolerance(dtype, ref, n=n, xmax=xmax, spread_scale=s_abs, std=std, bias=b_abs)
  assert_close(y, ref, tol, count > 0, layer)


# --- empty batches ------------------------------------------------------------


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_empty_batch_leaves_state_exactly_unchanged(data):
  layer = data.draw(
    st.sampled_from(["batch_norm", "ghost_batch_norm", "batch_renorm", "switchable"]),
    label="layer",
  )
  dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
  empty = data.draw(st.sampled_from(["size_0", "all_masked"]), label="empty")
  # Mostly under jit (eager dispatch compiles every primitive: slow).
  use_jit = data.draw(st.sampled_from([True, True, True, False]), label="jit")
  with jax.enable_x64(dtype == "float64"):
    shape = list(draw_shape(data))
    if empty == "size_0":
      shape[0] = 0
    else:
      shape[0] = max(shape[0], 1)
    shape = tuple(shape)
    ndim = len(shape)
    # The channel axis is not the batch axis: ghost BN and switchable norm
    # refuse that, and an empty batch axis would leave no channels.
    c = data.draw(st.integers(1, ndim - 1), label="channel_axis")
    axis = c - ndim if data.draw(st.booleans()) else c
    x, rng, _, _ = draw_x(data, dtype, shape)
    if empty == "all_masked":
      mask = draw_mask(data, rng, shape, kinds=("all_false",))
    else:
      mask = draw_mask(data, rng, shape, kinds=("none", "random", "all_false"))
    eps = draw_epsilon(data, dtype)
    fshape = (shape[c],)
    # A state far from what any update would give, and momentum 0: any
    # update at all would replace it.
    state = jn.BatchNormState(
      mean=jnp.full(fshape, 5.0, jnp.float32), var=jnp.full(fshape, 4.0, jnp.float32)
    )
    kw = dict(
      use_running_average=False, axis=axis, epsilon=eps, mask=mask, momentum=0.0
    )
    if layer == "switchable":
      params, _ = jn.switchable_norm_init(shape[c])
      f = lambda x: jn.switchable_norm(x, params, state, **kw)
    else:
      params = draw_affine(data, rng, fshape, dtype)
      if layer == "batch_norm":
        f = lambda x: jn.batch_norm(x, params, state, **kw)
      elif layer == "batch_renorm":
        f = lambda x: jn.batch_renorm(x, params, state, r_max=2.0, d_max=1.0, **kw)
      else:
        n = shape[0]
        # k = 1 with nothing else reduced is one value per ghost batch, refused
        # whatever the batch size: draw k >= 2 when the batch is empty.
        ks = [k for k in range(1, n + 1) if n % k == 0] if n else [2, 3]
        k = data.draw(st.sampled_from(ks), label="virtual_batch_size")
        f = lambda x: jn.batch_norm(x, params, state, virtual_batch_size=k, **kw)
    y, new = (jax.jit(f) if use_jit else f)(x)

  assert y.shape == x.shape and y.dtype == x.dtype
  assert np.all(np.isfinite(f64(y))), f"{layer}: non-finite output on an empty batch"
  for got, old in zip(new, state, strict=True):
    assert got.dtype == old.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(old), layer)


# --- invalid draws ------------------------------------------------------------

INVALID = (
  "num_groups",
  "group_size",
  "both_groups",
  "neither_group",
  "axis",
  "layer_axes",
  "in_batch_axis",
  "mask_dtype",
  "mask_shape",
  "epsilon",
  "momentum",
  "int_x",
  "param_shape",
  "param_dtype",
  "state_dtype",
  "single_value",
  "use_running_average",
)


def invalid_call(data, kind, x, rng):
  """``(f, name, arg)``: ``f(arg)`` must raise, naming ``name``."""
  shape, ndim = x.shape, x.ndim
  c = data.draw(st.integers(1, ndim - 1), label="channel_axis")
  channels = shape[c]
  gn = jn.group_norm_init(channels)
  bn_params, bn_state = jn.batch_norm_init(channels)
  train = data.draw(st.booleans(), label="train")
  ln = jn.NormParams(jnp.ones(shape[-1:]), None)

  def bn(xx, params=bn_params, state=bn_state, **kw):
    kw.setdefault("use_running_average", train)
    return jn.batch_norm(xx, params, state, axis=c, **kw)

  def any_layer(**kw):
    """One of the layers, drawn now, as a function of x with ``kw`` added."""
    name = data.draw(
      st.sampled_from(
        ["batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm"]
      ),
      label="layer",
    )
    if name == "batch_norm":
      return lambda xx: bn(xx, **kw)
    if name in ("layer_norm", "rms_norm"):
      return lambda xx: getattr(jn, name)(xx, ln, **kw)
    if name == "group_norm":
      return lambda xx: jn.group_norm(xx, gn, num_groups=1, axis=c, **kw)
    return lambda xx: jn.instance_norm(xx, gn, axis=c, **kw)

  bad_groups = [g for g in range(-1, channels + 3) if g <= 0 or channels % g]
  if kind == "num_groups":
    g = data.draw(st.sampled_from(bad_groups), label="num_groups")
    return lambda xx: jn.group_norm(xx, gn, num_groups=g, axis=c), kind, x
  if kind == "group_size":
    g = data.draw(st.sampled_from(bad_groups), label="group_size")
    f = lambda xx: jn.group_norm(xx, gn, num_groups=None, group_size=g, axis=c)
    return f, kind, x
  if kind == "both_groups":
    f = lambda xx: jn.group_norm(xx, gn, num_groups=1, group_size=channels, axis=c)
    return f, "num_groups", x
  if kind == "neither_group":
    return lambda xx: jn.group_norm(xx, gn, num_groups=None, axis=c), "num_groups", x
  if kind == "axis":
    a = data.draw(st.sampled_from([ndim, ndim + 2, -ndim - 1]), label="bad_axis")
    name = data.draw(st.sampled_from(["batch_norm", "group_norm", "instance_norm"]))
    if name == "batch_norm":
      f = lambda xx: jn.batch_norm(
        xx, bn_params, bn_state, axis=a, use_running_average=train
      )
    elif name == "group_norm":
      f = lambda xx: jn.group_norm(xx, gn, num_groups=1, axis=a)
    else:
      f = lambda xx: jn.instance_norm(xx, gn, axis=a)
    return f, "axis", x
  if kind == "layer_axes":
    a = data.draw(st.sampled_from([ndim, -ndim - 1, (0, ndim)]), label="bad_axis")
    arg = data.draw(st.sampled_from(["reduction_axes", "feature_axes"]))
    name = data.draw(st.sampled_from(["layer_norm", "rms_norm"]))
    return lambda xx: getattr(jn, name)(xx, ln, **{arg: a}), arg, x
  if kind == "in_batch_axis":
    a = data.draw(st.sampled_from([0, -ndim, (0, c)]), label="bad_axis")
    p = jn.NormParams(jnp.ones((shape[0],)), None)
    return lambda xx: jn.instance_norm(xx, p, axis=a), "axis", x
  if kind == "mask_dtype":
    mdt = data.draw(st.sampled_from(["int32", "uint8", "float32"]), label="mask_dtype")
    return any_layer(mask=jnp.asarray(rng.random(shape) < 0.5, mdt)), "mask", x
  if kind == "mask_shape":
    how = data.draw(st.sampled_from(["axis", "rank"]), label="how")
    if how == "axis":
      i = data.draw(st.integers(0, ndim - 1), label="mask_axis")
      mshape = list(shape)
      mshape[i] = shape[i] + 1 if shape[i] else 2
    else:
      mshape = [2, *shape]
    return any_layer(mask=jnp.ones(mshape, bool)), "mask", x
  if kind == "epsilon":
    e = data.draw(st.sampled_from([-1e-5, -1.0, math.nan, math.inf, -math.inf]))
    return any_layer(epsilon=e), "epsilon", x
  if kind == "momentum":
    m = data.draw(st.sampled_from([1.5, 1.0 + 1e-6, -0.1, math.nan, math.inf]))
    # Training only: in evaluation momentum is unused and not checked (see
    # the report), so that draw is left out.
    name = data.draw(st.sampled_from(["batch_norm", "batch_renorm", "switchable"]))
    if name == "batch_norm":
      f = lambda xx: bn(xx, use_running_average=False, momentum=m)
    elif name == "batch_renorm":
      p, s = jn.batch_renorm_init(channels)
      f = lambda xx: jn.batch_renorm(
        xx, p, s, axis=c, use_running_average=False, momentum=m
      )
    else:
      p, _ = jn.switchable_norm_init(channels)
      f = lambda xx: jn.switchable_norm(
        xx, p, bn_state, axis=c, use_running_average=False, momentum=m
      )
    return f, "momentum", x
  if kind == "int_x":
    xi = jnp.asarray(np.round(np.asarray(x, np.float32)), jnp.int32)
    return any_layer(), "`x`", xi
  if kind == "param_shape":
    wrong = jn.NormParams(jnp.ones((channels + 1,)), None)
    return lambda xx: bn(xx, params=wrong), "params.scale", x
  if kind == "param_dtype":
    pdt = data.draw(st.sampled_from(["int32", "bool", "complex64"]), label="pdt")
    p = jn.NormParams(jnp.ones((channels,), pdt), None)
    return lambda xx: bn(xx, params=p), "params.scale", x
  if kind == "state_dtype":
    sdt = data.draw(st.sampled_from(["int32", "complex64"]), label="sdt")
    s = jn.BatchNormState(bn_state.mean, jnp.ones((channels,), sdt))
    return lambda xx: bn(xx, state=s), "state.var", x
  if kind == "single_value":
    p, s = jn.batch_norm_init(1)
    f = lambda xx: jn.batch_norm(xx, p, s, use_running_average=False, axis=c)
    return f, "`x`", jnp.ones((1,) * ndim, x.dtype)
  assert kind == "use_running_average"
  v = data.draw(st.sampled_from([None, 1, 0, "yes"]), label="use_running_average")
  return lambda xx: bn(xx, use_running_average=v), kind, x


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_invalid_draws_raise_value_or_type_error_naming_the_argument(data):
  kind = data.draw(st.sampled_from(INVALID), label="kind")
  dtype = data.draw(st.sampled_from(["float16", "bfloat16", "float32"]), label="dtype")
  # Batch >= 2: every draw has exactly one thing wrong (a single value per
  # channel in training is refused first, and is a kind of its own).
  shape = draw_shape(data)
  x, rng, _, _ = draw_x(data, dtype, (max(shape[0], 2), *shape[1:]))
  f, name, arg = invalid_call(data, kind, x, rng)
  for how, g in (("eager", f), ("jit", jax.jit(f))):
    with pytest.raises((ValueError, TypeError)) as info:
      g(arg)
    err = info.value
    # Not JAX's own error from a crash inside (a ConcretizationTypeError is a
    # TypeError too): the library's, at trace time, naming the argument.
    assert not isinstance(err, jax.errors.JAXTypeError), (kind, how, err)
    assert name in str(err), (kind, how, name, str(err))
