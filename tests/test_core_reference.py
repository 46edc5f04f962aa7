"""The functional core against independent references.

Forward values are compared with float64 NumPy written out here; gradients
with ``jax.grad`` of the plain textbook formula in float64 ``jnp`` (never
with jaxnorm itself).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn

RNG = np.random.default_rng(0)


def _randn(*shape, loc=0.0, scale=1.0):
  return (loc + scale * RNG.standard_normal(shape)).astype(np.float32)


def _mask(shape, p=0.75):
  # Seeded by the shape, so that a test sees the same mask whichever tests
  # ran before it (none of these leaves a reduced row entirely masked out).
  return np.random.default_rng(list(shape)).random(shape) < p


# ----------------------------------------------------------------------------
# float64 NumPy references
# ----------------------------------------------------------------------------


def np_moments(x, axes, mask=None, use_mean=True):
  """Mean and biased variance over ``axes`` of the unmasked elements."""
  x = np.asarray(x, np.float64)
  m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape) * 1.0
  count = m.sum(axis=axes, keepdims=True)
  mean = (x * m).sum(axis=axes, keepdims=True) / count if use_mean else 0.0 * count
  var = (((x - mean) ** 2) * m).sum(axis=axes, keepdims=True) / count
  return mean, var


def np_norm(x, axes, eps, mask=None, use_mean=True):
  mean, var = np_moments(x, axes, mask, use_mean)
  return (np.asarray(x, np.float64) - mean) / np.sqrt(var + eps)


def np_group_norm(x, groups, axis, eps, scale, bias, mask=None):
  """GN by moving channels last and splitting them into (groups, C/groups)."""
  shape = np.shape(x)
  x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  n, c = x.shape[0], x.shape[-1]
  spatial = x.shape[1:-1]
  xg = x.reshape((n,) + spatial + (groups, c // groups))
  axes = tuple(range(1, 1 + len(spatial))) + (xg.ndim - 1,)
  mg = None
  if mask is not None:
    mg = np.moveaxis(np.broadcast_to(mask, shape), axis, -1)
    mg = mg.reshape(xg.shape)
  y = np_norm(xg, axes, eps, mg).reshape(x.shape) * scale + bias
  return np.moveaxis(y, -1, axis)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------
# batch norm
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "shape,axis",
  [
    ((8, 4, 4, 3), -1),  # NHWC
    ((8, 3, 4, 4), 1),  # NCHW
    ((6, 5), -1),  # dense
    ((4, 3, 5, 2), (1, 3)),  # several channel axes
  ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_train_eval_and_state(shape, axis, masked):
  x = _randn(*shape, loc=3.0, scale=2.0)
  mask = _mask(shape) if masked else None
  axes_kept = tuple(a % x.ndim for a in np.atleast_1d(axis))
  red = tuple(a for a in range(x.ndim) if a not in axes_kept)
  fshape = tuple(x.shape[a] for a in axes_kept)
  bshape = tuple(x.shape[a] if a in axes_kept else 1 for a in range(x.ndim))
  scale = _randn(*fshape, loc=1.0, scale=0.3)
  bias = _randn(*fshape)
  old_mean, old_var = _randn(*fshape), np.abs(_randn(*fshape)) + 0.5
  params = jn.NormParams(scale, bias)
  state = jn.BatchNormState(old_mean, old_var)
  eps, mom = 1e-3, 0.8

  y, new = jn.batch_norm(
    x,
    params,
    state,
    use_running_average=False,
    axis=axis,
    momentum=mom,
    epsilon=eps,
    mask=mask,
  )
  mean, var = np_moments(x, red, mask)
  ref = (x - mean) / np.sqrt(var + eps) * scale.reshape(bshape) + bias.reshape(bshape)
  close(y, ref)
  close(new.mean, mom * old_mean + (1 - mom) * mean.reshape(fshape))
  close(new.var, mom * old_var + (1 - mom) * var.reshape(fshape))
  assert new.mean.dtype == new.var.dtype == jnp.float32

  y_eval, same = jn.batch_norm(
    x, params, new, use_running_average=True, axis=axis, epsilon=eps, mask=mask
  )
  rm = np.asarray(new.mean, np.float64).reshape(bshape)
  rv = np.asarray(new.var, np.float64).reshape(bshape)
  ref_eval = (x - rm) / np.sqrt(rv + eps) * scale.reshape(bshape) + bias.reshape(bshape)
  close(y_eval, ref_eval)
  assert same is new  # rule 6: state unchanged in evaluation


def test_batch_norm_masked_entries_do_not_enter_statistics():
  x = _randn(10, 3)
  mask = np.ones((10, 1), bool)
  mask[7:] = False
  garbage = x.copy()
  garbage[7:] = 1e6  # masked rows: any value gives the same statistics
  p, s = jn.batch_norm_init(3)
  y1, s1 = jn.batch_norm(x, p, s, use_running_average=False, mask=mask, momentum=0.0)
  y2, s2 = jn.batch_norm(
    garbage, p, s, use_running_average=False, mask=mask, momentum=0.0
  )
  close(s1.var, x[:7].astype(np.float64).var(0))
  close(s2.var, x[:7].astype(np.float64).var(0))
  close(y1[:7], np.asarray(y2[:7]))


# ----------------------------------------------------------------------------
# layer norm and RMS norm
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "shape,reduction_axes,feature_axes",
  [
    ((3, 7, 16), -1, -1),  # transformer tokens
    ((2, 4, 4, 3), (1, 2, 3), -1),  # LN over C,H,W of NHWC, per-channel affine
    ((2, 4, 4, 3), (1, 2, 3), (1, 2, 3)),  # elementwise affine
    ((2, 3, 4, 5), (1, 2), 1),  # odd choice: reduce C,H; affine along C
    ((5, 6), (0, 1), -1),
  ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_layer_and_rms_norm(shape, reduction_axes, feature_axes, masked):
  x = _randn(*shape, loc=-2.0, scale=3.0)
  mask = _mask(shape) if masked else None
  red = tuple(a % x.ndim for a in np.atleast_1d(reduction_axes))
  fa = tuple(a % x.ndim for a in np.atleast_1d(feature_axes))
  fshape = tuple(x.shape[a] for a in fa)
  bshape = tuple(x.shape[a] if a in fa else 1 for a in range(x.ndim))
  scale, bias = _randn(*fshape, loc=1.0), _randn(*fshape)
  eps = 1e-4
  y = jn.layer_norm(
    x,
    jn.NormParams(scale, bias),
    reduction_axes=reduction_axes,
    feature_axes=feature_axes,
    epsilon=eps,
    mask=mask,
  )
  ref = np_norm(x, red, eps, mask) * scale.reshape(bshape) + bias.reshape(bshape)
  close(y, ref)

  y = jn.rms_norm(
    x,
    jn.NormParams(scale, None),
    reduction_axes=reduction_axes,
    feature_axes=feature_axes,
    epsilon=eps,
    mask=mask,
  )
  m = np.ones(x.shape) if mask is None else mask * 1.0
  ms = ((x.astype(np.float64) ** 2) * m).sum(red, keepdims=True) / m.sum(
    red, keepdims=True
  )
  close(y, x / np.sqrt(ms + eps) * scale.reshape(bshape))


def test_layer_norm_without_params():
  x = _randn(4, 9)
  y = jn.layer_norm(x, jn.layer_norm_init(9, use_scale=False, use_bias=False))
  close(y, np_norm(x, (1,), 1e-6))


# ----------------------------------------------------------------------------
# group norm and instance norm
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "shape,axis,kw",
  [
    ((2, 4, 4, 8), -1, dict(num_groups=4)),
    ((2, 4, 4, 8), -1, dict(num_groups=None, group_size=2)),
    ((2, 8, 3, 5), 1, dict(num_groups=2)),  # NCHW
    ((3, 6, 6), -1, dict(num_groups=3)),  # rank 3: (N, L, C)
    ((2, 6, 5), 1, dict(num_groups=None, group_size=3)),  # rank 3, (N, C, L)
  ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_group_norm(shape, axis, kw, masked):
  x = _randn(*shape, loc=5.0, scale=2.0)
  mask = _mask(shape) if masked else None
  c = shape[axis]
  groups = kw.get("num_groups") or c // kw["group_size"]
  scale, bias = _randn(c, loc=1.0), _randn(c)
  y = jn.group_norm(
    x, jn.NormParams(scale, bias), axis=axis, epsilon=1e-4, mask=mask, **kw
  )
  close(y, np_group_norm(x, groups, axis, 1e-4, scale, bias, mask))


def test_group_norm_rank_one_is_one_unbatched_sample():
  x = _randn(8, loc=1.0)
  scale, bias = _randn(8), _randn(8)
  y = jn.group_norm(x, jn.NormParams(scale, bias), num_groups=2, epsilon=1e-5)
  xg = x.astype(np.float64).reshape(2, 4)
  ref = np_norm(xg, (1,), 1e-5).reshape(8) * scale + bias
  close(y, ref)


@pytest.mark.parametrize(
  "shape,axis", [((2, 5, 5, 3), -1), ((2, 3, 5, 5), 1), ((3, 7, 4), -1)]
)
@pytest.mark.parametrize("masked", [False, True])
def test_instance_norm(shape, axis, masked):
  x = _randn(*shape, loc=-4.0, scale=0.5)
  mask = _mask(shape) if masked else None
  c = shape[axis]
  scale, bias = _randn(c, loc=1.0), _randn(c)
  bshape = [1] * x.ndim
  bshape[axis] = c
  y = jn.instance_norm(x, jn.NormParams(scale, bias), axis=axis, mask=mask)
  a = axis % x.ndim
  red = tuple(i for i in range(1, x.ndim) if i != a)
  ref = np_norm(x, red, 1e-6, mask) * scale.reshape(bshape) + bias.reshape(bshape)
  close(y, ref)


def test_normalize_broadcasts_like_tf_batch_normalization():
  x = _randn(4, 3, 2)
  mean, var = _randn(3, 1), np.abs(_randn(1, 2)) + 0.1
  scale, bias = _randn(2), _randn(4, 1, 1)
  y = jn.normalize(x, mean, var, scale=scale, bias=bias, epsilon=1e-3)
  x64 = x.astype(np.float64)
  close(y, (x64 - mean) / np.sqrt(var + 1e-3) * scale + bias)
  close(jn.normalize(x, mean, var), (x64 - mean) / np.sqrt(var + 1e-5))


# ----------------------------------------------------------------------------
# gradients against autodiff of the plain formula, in float64
# ----------------------------------------------------------------------------


def jnp_norm(x, axes, eps, mask=None, use_mean=True):
  """The textbook formula in plain jnp: autodiff of this is the reference."""
  m = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape) * 1.0
  count = m.sum(axes, keepdims=True)
  mean = (x * m).sum(axes, keepdims=True) / count if use_mean else 0.0
  var = (((x - mean) ** 2) * m).sum(axes, keepdims=True) / count
  return (x - mean) / jnp.sqrt(var + eps), mean, var


def _grad_check(f_lib, f_ref, args, tol=1e-9):
  """Compares gradients of a scalar loss w.r.t. every argument, in float64."""
  argnums = tuple(range(len(args)))
  g_lib = jax.jit(jax.grad(f_lib, argnums))(*args)
  g_ref = jax.jit(jax.grad(f_ref, argnums))(*args)
  for a, b in zip(g_lib, g_ref, strict=True):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_gradients_including_running_state(axis, masked):
  with jax.enable_x64(True):
    shape = (6, 4, 3, 5)
    x = jnp.asarray(RNG.standard_normal(shape) * 2 + 1)
    w = jnp.asarray(RNG.standard_normal(shape))
    a = axis % 4
    c = shape[a]
    bshape = tuple(c if i == a else 1 for i in range(4))
    red = tuple(i for i in range(4) if i != a)
    scale = jnp.asarray(RNG.standard_normal(c) * 0.3 + 1)
    bias = jnp.asarray(RNG.standard_normal(c))
    mask = jnp.asarray(_mask(shape)) if masked else None
    wm, wv = jnp.asarray(RNG.standard_normal(c)), jnp.asarray(RNG.standard_normal(c))
    state = jn.BatchNormState(jnp.zeros(c), jnp.ones(c))

    def lib(x, scale, bias):
      y, new = jn.batch_norm(
        x,
        jn.NormParams(scale, bias),
        state,
        use_running_average=False,
        axis=axis,
        momentum=0.9,
        epsilon=1e-3,
        mask=mask,
      )
      # The loss also reads the new running state: its gradient flows to x.
      return (y * w).sum() + (new.mean * wm).sum() + (new.var * wv).sum()

    def ref(x, scale, bias):
      xhat, mean, var = jnp_norm(x, red, 1e-3, mask)
      y = xhat * scale.reshape(bshape) + bias.reshape(bshape)
      new_mean = 0.1 * mean.reshape(c)  # 0.9 * 0 + 0.1 * batch
      new_var = 0.9 + 0.1 * var.reshape(c)
      return (y * w).sum() + (new_mean * wm).sum() + (new_var * wv).sum()

    # The running state is stored in float32, so its path is float32-exact.
    _grad_check(lib, ref, (x, scale, bias), tol=1e-6)

    def lib_y(x, scale, bias):
      return (lib_out(x, scale, bias) * w).sum()

    def lib_out(x, scale, bias):
      return jn.batch_norm(
        x,
        jn.NormParams(scale, bias),
        state,
        use_running_average=False,
        axis=axis,
        epsilon=1e-3,
        mask=mask,
      )[0]

    def ref_y(x, scale, bias):
      xhat, _, _ = jnp_norm(x, red, 1e-3, mask)
      return ((xhat * scale.reshape(bshape) + bias.reshape(bshape)) * w).sum()

    _grad_check(lib_y, ref_y, (x, scale, bias))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
  "reduction_axes,feature_axes", [(-1, -1), ((1, 2, 3), -1), ((1, 2), (1, 2))]
)
def test_layer_and_rms_norm_gradients(masked, reduction_axes, feature_axes):
  with jax.enable_x64(True):
    shape = (3, 4, 5, 6)
    x = jnp.asarray(RNG.standard_normal(shape) * 3 - 1)
    w = jnp.asarray(RNG.standard_normal(shape))
    red = tuple(a % 4 for a in np.atleast_1d(reduction_axes))
    fa = tuple(a % 4 for a in np.atleast_1d(feature_axes))
    fshape = tuple(shape[a] for a in fa)
    bshape = tuple(shape[a] if a in fa else 1 for a in range(4))
    scale = jnp.asarray(RNG.standard_normal(fshape) * 0.3 + 1)
    bias = jnp.asarray(RNG.standard_normal(fshape))
    mask = jnp.asarray(_mask(shape)) if masked else None
    kw = dict(
      reduction_axes=reduction_axes, feature_axes=feature_axes, epsilon=1e-4, mask=mask
    )

    def lib_ln(x, scale, bias):
      return (jn.layer_norm(x, jn.NormParams(scale, bias), **kw) * w).sum()

    def ref_ln(x, scale, bias):
      xhat = jnp_norm(x, red, 1e-4, mask)[0]
      return ((xhat * scale.reshape(bshape) + bias.reshape(bshape)) * w).sum()

    _grad_check(lib_ln, ref_ln, (x, scale, bias))

    def lib_rms(x, scale):
      return (jn.rms_norm(x, jn.NormParams(scale, None), **kw) * w).sum()

    def ref_rms(x, scale):
      xhat = jnp_norm(x, red, 1e-4, mask, use_mean=False)[0]
      return (xhat * scale.reshape(bshape) * w).sum()

    _grad_check(lib_rms, ref_rms, (x, scale))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("axis", [-1, 1])
def test_group_and_instance_norm_gradients(masked, axis):
  with jax.enable_x64(True):
    shape = (3, 6, 4, 6)
    x = jnp.asarray(RNG.standard_normal(shape) + 2)
    w = jnp.asarray(RNG.standard_normal(shape))
    a = axis % 4
    c = shape[a]
    scale = jnp.asarray(RNG.standard_normal(c) * 0.3 + 1)
    bias = jnp.asarray(RNG.standard_normal(c))
    mask = jnp.asarray(_mask(shape)) if masked else None
    bshape = tuple(c if i == a else 1 for i in range(4))

    def ref_gn(x, scale, bias, groups):
      # channels last, split into (groups, C / groups), reduce all but batch
      xl = jnp.moveaxis(x, a, -1)
      xg = xl.reshape(xl.shape[:-1] + (groups, c // groups))
      mg = None
      if mask is not None:
        mg = jnp.moveaxis(mask, a, -1).reshape(xg.shape)
      xhat = jnp_norm(xg, (1, 2, 4), 1e-5, mg)[0].reshape(xl.shape)
      xhat = jnp.moveaxis(xhat, -1, a)
      return ((xhat * scale.reshape(bshape) + bias.reshape(bshape)) * w).sum()

    def lib_gn(x, scale, bias):
      p = jn.NormParams(scale, bias)
      y = jn.group_norm(x, p, num_groups=3, axis=axis, epsilon=1e-5, mask=mask)
      return (y * w).sum()

    _grad_check(lib_gn, lambda x, s, b: ref_gn(x, s, b, 3), (x, scale, bias))

    def lib_in(x, scale, bias):
      p = jn.NormParams(scale, bias)
      return (jn.instance_norm(x, p, axis=axis, epsilon=1e-5, mask=mask) * w).sum()

    _grad_check(lib_in, lambda x, s, b: ref_gn(x, s, b, c), (x, scale, bias))


def test_normalize_gradients():
  with jax.enable_x64(True):
    x = jnp.asarray(RNG.standard_normal((4, 3)))
    mean, var = jnp.asarray(RNG.standard_normal(3)), jnp.asarray(RNG.random(3) + 0.5)
    scale, bias = jnp.asarray(RNG.standard_normal(3)), jnp.asarray(RNG.random(3))

    def lib(x, mean, var, scale, bias):
      return (jn.normalize(x, mean, var, scale=scale, bias=bias) ** 2).sum()

    def ref(x, mean, var, scale, bias):
      return (((x - mean) / jnp.sqrt(var + 1e-5) * scale + bias) ** 2).sum()

    _grad_check(lib, ref, (x, mean, var, scale, bias))


def test_float32_gradients_close_to_float64_formula():
  """The float32 custom VJP agrees with float64 autodiff to float32 accuracy."""
  shape = (16, 5, 5, 8)
  x32 = _randn(*shape, loc=50.0, scale=3.0)
  w32 = _randn(*shape)
  p, s = jn.batch_norm_init(8)

  def lib(x):
    return (jn.batch_norm(x, p, s, use_running_average=False)[0] * w32).sum()

  g32 = jax.grad(lib)(jnp.asarray(x32))
  with jax.enable_x64(True):

    def ref(x):
      return (jnp_norm(x, (0, 1, 2), 1e-5)[0] * jnp.asarray(w32, jnp.float64)).sum()

    g64 = np.asarray(jax.grad(ref)(jnp.asarray(x32, jnp.float64)))
  np.testing.assert_allclose(np.asarray(g32), g64, rtol=1e-3, atol=1e-4)
