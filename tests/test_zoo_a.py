"""Filter response norm, switchable norm, batch renorm and ghost batch norm.

Every layer is checked against its paper's formula written out below in
float64 NumPy (forward, state) or in plain jnp (gradients), never against
jaxnorm itself.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnnx

EPS = 1e-5


def _rand(shape, seed=0, loc=0.0, scl=1.0):
  return np.random.default_rng(seed).normal(loc, scl, shape).astype(np.float32)


def _f64(*arrays):
  return [None if a is None else np.asarray(a, np.float64) for a in arrays]


def _mstats(x, axes, mask=None):
  """Float64 masked mean and biased variance, keepdims."""
  if mask is None:
    return x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
  w = np.broadcast_to(mask, x.shape).astype(np.float64)
  n = np.maximum(w.sum(axes, keepdims=True), 1.0)
  m = (w * x).sum(axes, keepdims=True) / n
  v = (w * (x - m) ** 2).sum(axes, keepdims=True) / n
  return m, v


# ---------------------------------------------------------------- references
# All references take channels-last x (N, ..., C) in float64.


def frn_ref(x, scale, bias, tau, eps_learned=None, epsilon=1e-6, tlu=True, mask=None):
  x = np.asarray(x, np.float64)
  axes = tuple(range(1, x.ndim - 1))
  if mask is None:
    nu2 = (x**2).mean(axes, keepdims=True)
  else:
    w = np.broadcast_to(mask, x.shape).astype(np.float64)
    nu2 = (w * x**2).sum(axes, keepdims=True) / np.maximum(
      w.sum(axes, keepdims=True), 1
    )
  e = epsilon if eps_learned is None else epsilon + np.abs(eps_learned)
  y = scale * x / np.sqrt(nu2 + e) + bias
  return np.maximum(y, tau) if tlu else y


def sn_ref(x, scale, bias, mw, vw, rm, rv, train, momentum=0.99, mask=None):
  x = np.asarray(x, np.float64)
  nd = x.ndim
  in_axes = tuple(range(1, nd - 1))
  ln_axes = tuple(range(1, nd))
  bn_axes = tuple(range(nd - 1))
  mu_in, v_in = _mstats(x, in_axes, mask)
  mu_ln, v_ln = _mstats(x, ln_axes, mask)
  if train:
    mu_bn, v_bn = _mstats(x, bn_axes, mask)
    new_m = momentum * rm + (1 - momentum) * mu_bn.ravel()
    new_v = momentum * rv + (1 - momentum) * v_bn.ravel()
  else:
    mu_bn, v_bn, new_m, new_v = rm, rv, rm, rv
  sm = np.exp(mw) / np.exp(mw).sum()
  sv = np.exp(vw) / np.exp(vw).sum()
  mean = sm[0] * mu_in + sm[1] * mu_ln + sm[2] * mu_bn
  var = sv[0] * v_in + sv[1] * v_ln + sv[2] * v_bn
  return (x - mean) / np.sqrt(var + EPS) * scale + bias, new_m, new_v


def brn_ref(x, scale, bias, rm, rv, r_max, d_max, train, momentum=0.99, mask=None):
  x = np.asarray(x, np.float64)
  if not train:
    return (x - rm) / np.sqrt(rv + EPS) * scale + bias, rm, rv
  mu_b, var_b = _mstats(x, tuple(range(x.ndim - 1)), mask)
  sigma_b = np.sqrt(var_b + EPS)
  sigma = np.sqrt(rv + EPS)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mu_b - rm) / sigma, -d_max, d_max)
  y = ((x - mu_b) / sigma_b * r + d) * scale + bias
  new_m = momentum * rm + (1 - momentum) * mu_b.ravel()
  new_v = momentum * rv + (1 - momentum) * var_b.ravel()
  return y, new_m, new_v


def ghost_ref(x, scale, bias, rm, rv, k, momentum=0.99, mask=None):
  """A loop over the ghost batches, as in Hoffer et al.'s algorithm."""
  x = np.asarray(x, np.float64)
  y = np.empty_like(x)
  means, vars_ = [], []
  axes = tuple(range(x.ndim - 1))
  for g in range(x.shape[0] // k):
    sl = slice(g * k, (g + 1) * k)
    mg = None if mask is None else np.broadcast_to(mask, x.shape)[sl]
    if mg is not None and not mg.any():
      m, v = np.zeros((1,) * (x.ndim - 1) + x.shape[-1:]), None
      y[sl] = (x[sl] - 0.0) / np.sqrt(0.0 + EPS) * scale + bias
      continue
    m, v = _mstats(x[sl], axes, mg)
    y[sl] = (x[sl] - m) / np.sqrt(v + EPS) * scale + bias
    means.append(m.ravel())
    vars_.append(v.ravel())
  new_m = momentum * rm + (1 - momentum) * np.mean(means, 0)
  new_v = momentum * rv + (1 - momentum) * np.mean(vars_, 0)
  return y, new_m, new_v


def _jit(f):
  # Jitted entry points keep the test file fast (one compile per case instead
  # of one per primitive); eager calls are tested in the transforms tests.
  names = ("use_running_average", "axis", "axis_name", "virtual_batch_size")
  names += ("use_tlu", "epsilon", "momentum")
  params = inspect.signature(f).parameters
  return jax.jit(f, static_argnames=[n for n in names if n in params])


frn_j = _jit(jn.filter_response_norm)
sn_j = _jit(jn.switchable_norm)
brn_j = _jit(jn.batch_renorm)
bn_j = _jit(jn.batch_norm)


def _grad(f, argnums=0):
  # Jitted: eager autodiff of shard_map and of three moments is slow.
  return jax.jit(jax.grad(f, argnums=argnums))


def _close(a, b, tol=1e-4):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def _nchw(x):
  return np.moveaxis(x, -1, 1)


# --------------------------------------------------------------------- FRN


def _frn_params(c, learned=False, seed=1):
  r = np.random.default_rng(seed)
  return jn.FilterResponseNormParams(
    scale=jnp.asarray(r.uniform(0.5, 1.5, c), jnp.float32),
    bias=jnp.asarray(r.normal(0, 0.3, c), jnp.float32),
    tau=jnp.asarray(r.normal(0, 0.3, c), jnp.float32),
    eps=jnp.asarray(r.uniform(-1e-2, 1e-2, c), jnp.float32) if learned else None,
  )


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("tlu", [False, True])
def test_frn_forward(learned, tlu):
  x = _rand((3, 4, 5, 6), loc=0.5, scl=2.0)
  p = _frn_params(6, learned)
  y = frn_j(x, p, use_tlu=tlu)
  ref = frn_ref(x, *_f64(p.scale, p.bias, p.tau, p.eps), tlu=tlu)
  _close(y, ref)
  # NCHW
  y1 = frn_j(_nchw(x), p, axis=1, use_tlu=tlu)
  _close(y1, _nchw(ref))


def test_frn_init():
  p = jn.filter_response_norm_init(4)
  assert p.eps is None
  np.testing.assert_array_equal(p.tau, np.zeros(4))
  p = jn.filter_response_norm_init(4, learned_epsilon=True)
  np.testing.assert_allclose(p.eps, np.full(4, 1e-4))
  assert p._fields == ("scale", "bias", "tau", "eps")


def test_frn_dense_input_and_mask():
  # (N, C): nu^2 = x^2, where the learned epsilon matters.
  x = _rand((5, 3))
  p = _frn_params(3, learned=True)
  _close(frn_j(x, p), frn_ref(x, *_f64(p.scale, p.bias, p.tau, p.eps)))
  x = _rand((2, 6, 3), seed=3)
  mask = np.ones((2, 6, 1), bool)
  mask[0, 4:] = False
  p = _frn_params(3)
  y = frn_j(x, p, mask=mask)
  _close(y, frn_ref(x, *_f64(p.scale, p.bias, p.tau), mask=mask))


@pytest.mark.parametrize("learned", [False, True])
def test_frn_grad(learned):
  x = jnp.asarray(_rand((2, 3, 3, 4), loc=0.3))
  p = _frn_params(4, learned)
  w = jnp.asarray(_rand((2, 3, 3, 4), seed=9))

  def plain(x, p):
    nu2 = jnp.mean(x**2, axis=(1, 2), keepdims=True)
    e = 1e-6 if p.eps is None else 1e-6 + jnp.abs(p.eps)
    y = p.scale * x / jnp.sqrt(nu2 + e) + p.bias
    return jnp.sum(jnp.maximum(y, p.tau) * w)

  def ours(x, p):
    return jnp.sum(jn.filter_response_norm(x, p) * w)

  g1 = _grad(ours, argnums=(0, 1))(x, p)
  g2 = _grad(plain, argnums=(0, 1))(x, p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), g1, g2)


def test_frn_transforms_and_bf16():
  x = _rand((2, 3, 3, 4))
  p = _frn_params(4)
  ref = frn_ref(x, *_f64(p.scale, p.bias, p.tau))
  f = functools.partial(jn.filter_response_norm, params=p)
  _close(jax.jit(f)(x), ref)
  _close(jax.vmap(lambda s: f(s[None])[0])(x), ref)
  out = jax.eval_shape(f, jax.ShapeDtypeStruct(x.shape, jnp.bfloat16))
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  yb = f(jnp.asarray(x, jnp.bfloat16))
  assert yb.dtype == jnp.bfloat16
  _close(yb, ref, tol=5e-2)


def test_frn_errors():
  p = jn.filter_response_norm_init(4)
  x = jnp.ones((2, 3, 4))
  with pytest.raises(ValueError, match="axis"):
    jn.filter_response_norm(x, p, axis=0)
  with pytest.raises(ValueError, match="params.scale"):
    jn.filter_response_norm(jnp.ones((2, 3, 5)), p)
  with pytest.raises(TypeError, match="`x`"):
    jn.filter_response_norm(jnp.ones((2, 3, 4), jnp.int32), p)
  with pytest.raises(ValueError, match="tau"):
    jn.filter_response_norm(x, p._replace(tau=None))
  with pytest.raises(ValueError, match="mask"):
    jn.filter_response_norm(x, p, mask=jnp.ones((3, 3), bool))


# -------------------------------------------------------------------- SN


def _sn_params(c, seed=2):
  r = np.random.default_rng(seed)
  params = jn.SwitchableNormParams(
    scale=jnp.asarray(r.uniform(0.5, 1.5, c), jnp.float32),
    bias=jnp.asarray(r.normal(0, 0.3, c), jnp.float32),
    mean_weights=jnp.asarray(r.normal(0, 1, 3), jnp.float32),
    var_weights=jnp.asarray(r.normal(0, 1, 3), jnp.float32),
  )
  state = jn.BatchNormState(
    mean=jnp.asarray(r.normal(0, 0.5, c), jnp.float32),
    var=jnp.asarray(r.uniform(0.5, 2, c), jnp.float32),
  )
  return params, state


@pytest.mark.parametrize("train", [True, False])
def test_sn_forward_and_state(train):
  x = _rand((4, 3, 5, 6), loc=1.0, scl=2.0)
  p, s = _sn_params(6)
  args = _f64(p.scale, p.bias, p.mean_weights, p.var_weights, s.mean, s.var)
  ref, rm, rv = sn_ref(x, *args, train=train)
  y, ns = sn_j(x, p, s, use_running_average=not train)
  _close(y, ref)
  _close(ns.mean, rm, 1e-5)
  _close(ns.var, rv, 1e-5)
  y1, ns1 = sn_j(_nchw(x), p, s, use_running_average=not train, axis=1)
  _close(y1, _nchw(ref))
  _close(ns1.mean, rm, 1e-5)


def test_sn_init():
  p, s = jn.switchable_norm_init(5)
  assert p._fields == ("scale", "bias", "mean_weights", "var_weights")
  np.testing.assert_array_equal(p.mean_weights, np.ones(3))
  np.testing.assert_array_equal(p.var_weights, np.ones(3))
  np.testing.assert_array_equal(s.var, np.ones(5))


def test_sn_mask():
  x = _rand((4, 6, 3), loc=0.5)
  mask = np.ones((4, 6, 1), bool)
  mask[1, 3:] = False
  mask[3] = False  # a fully masked sample: no NaN
  p, s = _sn_params(3)
  args = _f64(p.scale, p.bias, p.mean_weights, p.var_weights, s.mean, s.var)
  ref, rm, rv = sn_ref(x, *args, train=True, mask=mask)
  y, ns = sn_j(x, p, s, use_running_average=False, mask=mask)
  _close(y, ref)
  _close(ns.var, rv, 1e-5)
  assert np.isfinite(np.asarray(y)).all()


def test_sn_grad():
  x = jnp.asarray(_rand((3, 4, 2, 5), loc=0.5))
  p, s = _sn_params(5)
  w = jnp.asarray(_rand(x.shape, seed=7))

  def plain(x, p):
    def st(axes):
      m = x.mean(axes, keepdims=True)
      return m, ((x - m) ** 2).mean(axes, keepdims=True)

    (mi, vi), (ml, vl), (mb, vb) = st((1, 2)), st((1, 2, 3)), st((0, 1, 2))
    sm, sv = jax.nn.softmax(p.mean_weights), jax.nn.softmax(p.var_weights)
    mean = sm[0] * mi + sm[1] * ml + sm[2] * mb
    var = sv[0] * vi + sv[1] * vl + sv[2] * vb
    return jnp.sum(((x - mean) / jnp.sqrt(var + EPS) * p.scale + p.bias) * w)

  def ours(x, p):
    return jnp.sum(jn.switchable_norm(x, p, s, use_running_average=False)[0] * w)

  g1 = _grad(ours, argnums=(0, 1))(x, p)
  g2 = _grad(plain, argnums=(0, 1))(x, p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), g1, g2)


def test_sn_transforms_and_bf16():
  x = _rand((4, 3, 3, 2))
  p, s = _sn_params(2)
  args = _f64(p.scale, p.bias, p.mean_weights, p.var_weights, s.mean, s.var)
  ref, rm, _ = sn_ref(x, *args, train=True)
  f = functools.partial(jn.switchable_norm, use_running_average=False)
  y, ns = jax.jit(f)(x, p, s)
  _close(y, ref)
  _close(ns.mean, rm, 1e-5)
  # vmap over an outer axis: each slice is its own batch.
  xs = np.stack([x, x * 2.0 + 1.0])
  ys, _ = jax.jit(jax.vmap(f, in_axes=(0, None, None)))(xs, p, s)
  _close(ys[1], sn_ref(xs[1], *args, train=True)[0])
  assert jn.switchable_norm(x, p, s, use_running_average=True)[1] is s
  out = jax.eval_shape(f, jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), p, s)
  assert out[0].dtype == jnp.bfloat16 and out[1].mean.dtype == jnp.float32
  yb, nsb = f(jnp.asarray(x, jnp.bfloat16), p, s)
  assert yb.dtype == jnp.bfloat16 and nsb.var.dtype == jnp.float32
  _close(yb, ref, tol=6e-2)


def test_sn_errors():
  p, s = jn.switchable_norm_init(4)
  x = jnp.ones((2, 3, 4))
  with pytest.raises(ValueError, match="axis"):
    jn.switchable_norm(x, p, s, use_running_average=False, axis=0)
  with pytest.raises(ValueError, match="params.mean_weights"):
    jn.switchable_norm(
      x, p._replace(mean_weights=jnp.ones(2)), s, use_running_average=False
    )
  with pytest.raises(ValueError, match="state.var"):
    jn.switchable_norm(x, p, s._replace(var=jnp.ones(3)), use_running_average=False)
  with pytest.raises(ValueError, match="axis_name"):
    jn.switchable_norm(x, p, s, use_running_average=False, axis_name="batch")
  with pytest.raises(TypeError, match="use_running_average"):
    jn.switchable_norm(x, p, s, use_running_average=None)
  with pytest.raises(ValueError, match="more than 1 value"):
    jn.switchable_norm(jnp.ones((1, 4)), p, s, use_running_average=False)


# ------------------------------------------------------------------- BRN


def _bn_params(c, seed=4):
  r = np.random.default_rng(seed)
  params = jn.NormParams(
    scale=jnp.asarray(r.uniform(0.5, 1.5, c), jnp.float32),
    bias=jnp.asarray(r.normal(0, 0.3, c), jnp.float32),
  )
  state = jn.BatchNormState(
    mean=jnp.asarray(r.normal(0, 1.0, c), jnp.float32),
    var=jnp.asarray(r.uniform(0.2, 3, c), jnp.float32),
  )
  return params, state


@pytest.mark.parametrize("bounds", [(3.0, 5.0), (1.2, 0.3), (1.0, 0.0)])
@pytest.mark.parametrize("train", [True, False])
def test_brn_forward_and_state(bounds, train):
  x = _rand((6, 3, 4), loc=0.7, scl=1.8)
  p, s = _bn_params(4)
  ref, rm, rv = brn_ref(x, *_f64(p.scale, p.bias, s.mean, s.var), *bounds, train)
  y, ns = brn_j(
    x, p, s, use_running_average=not train, r_max=bounds[0], d_max=bounds[1]
  )
  _close(y, ref)
  _close(ns.mean, rm, 1e-5)
  _close(ns.var, rv, 1e-5)
  y1, _ = brn_j(
    _nchw(x), p, s, use_running_average=not train, axis=1, r_max=bounds[0],
    d_max=bounds[1],
  )  # fmt: skip
  _close(y1, _nchw(ref))


def test_brn_clipping_is_active():
  # Statistics far from the running ones: r and d both saturate.
  x = _rand((8, 3), loc=4.0, scl=3.0)
  p, s = jn.batch_renorm_init(3)
  ref, _, _ = brn_ref(x, *_f64(p.scale, p.bias, s.mean, s.var), 1.5, 0.5, True)
  bn_ref, _, _ = brn_ref(x, *_f64(p.scale, p.bias, s.mean, s.var), 1.0, 0.0, True)
  assert np.abs(ref - bn_ref).max() > 0.3
  y, _ = brn_j(x, p, s, use_running_average=False, r_max=1.5, d_max=0.5)
  _close(y, ref)


def test_brn_is_exactly_bn():
  x = jnp.asarray(_rand((5, 4, 3), loc=2.0, scl=3.0))
  p, s = _bn_params(3)
  mask = np.ones((5, 4, 1), bool)
  mask[2, 1:] = False
  p1, s1 = jn.batch_norm_init(4)
  cases = ((p, s, {}), (p, s, {"mask": mask}), (p1, s1, {"axis": 1}))
  for pk, sk, kw in cases:
    y_bn, s_bn = jn.batch_norm(x, pk, sk, use_running_average=False, **kw)
    y, ns = jn.batch_renorm(
      x, pk, sk, use_running_average=False, r_max=1.0, d_max=0.0, **kw
    )
    np.testing.assert_array_equal(y, y_bn)
    np.testing.assert_array_equal(ns.mean, s_bn.mean)
    np.testing.assert_array_equal(ns.var, s_bn.var)

  def loss(f, x, p):
    return jnp.sum(f(x, p)[0] * x)

  g_bn = _grad(
    lambda x, p: loss(
      lambda x, p: jn.batch_norm(x, p, s, use_running_average=False), x, p
    ),
    argnums=(0, 1),
  )(x, p)
  g_rn = _grad(
    lambda x, p: loss(
      lambda x, p: jn.batch_renorm(
        x, p, s, use_running_average=False, r_max=1.0, d_max=0.0
      ),
      x,
      p,
    ),
    argnums=(0, 1),
  )(x, p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_bn, g_rn)


def test_brn_mask():
  x = _rand((6, 5, 2), loc=1.0)
  mask = np.ones((6, 5, 1), bool)
  mask[4:, 2:] = False
  p, s = _bn_params(2)
  ref, rm, rv = brn_ref(
    x, *_f64(p.scale, p.bias, s.mean, s.var), 2.0, 1.0, True, mask=mask
  )
  y, ns = brn_j(x, p, s, use_running_average=False, r_max=2.0, d_max=1.0, mask=mask)
  _close(y, ref)
  _close(ns.mean, rm, 1e-5)
  _close(ns.var, rv, 1e-5)


def test_brn_grad():
  x = jnp.asarray(_rand((6, 3, 4), loc=1.0, scl=2.0))
  p, s = _bn_params(4)
  w = jnp.asarray(_rand(x.shape, seed=5))
  r_max, d_max = 1.5, 0.7

  # A running state away from the batch's, so that r and d depend on it.
  s = s._replace(mean=s.mean + 0.5, var=s.var * 2.0)

  def plain(x, p, s):
    mu = x.mean((0, 1))
    sb = jnp.sqrt(((x - mu) ** 2).mean((0, 1)) + EPS)
    sig = jnp.sqrt(s.var + EPS)
    r = jax.lax.stop_gradient(jnp.clip(sb / sig, 1 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((mu - s.mean) / sig, -d_max, d_max))
    return jnp.sum((((x - mu) / sb * r + d) * p.scale + p.bias) * w)

  def ours(x, p, s):
    y, _ = jn.batch_renorm(x, p, s, use_running_average=False, r_max=r_max, d_max=d_max)
    return jnp.sum(y * w)

  # The running state gets no gradient through r and d (it had one).
  g1 = _grad(ours, argnums=(0, 1, 2))(x, p, s)
  g2 = _grad(plain, argnums=(0, 1, 2))(x, p, s)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), g1, g2)


def test_brn_traced_bounds_and_transforms():
  x = _rand((6, 4), loc=1.0, scl=2.0)
  p, s = _bn_params(4)

  @jax.jit
  def step(x, p, s, t):
    r_max, d_max = jn.batch_renorm_schedule(t, r_max_steps=(0, 10), d_max_steps=(0, 5))
    return jn.batch_renorm(x, p, s, use_running_average=False, r_max=r_max, d_max=d_max)

  for t, bounds in ((0, (1.0, 0.0)), (5, (2.0, 5.0)), (20, (3.0, 5.0))):
    ref, rm, _ = brn_ref(x, *_f64(p.scale, p.bias, s.mean, s.var), *bounds, True)
    y, ns = step(x, p, s, jnp.asarray(t))
    _close(y, ref)
    _close(ns.mean, rm, 1e-5)
  f = functools.partial(jn.batch_renorm, use_running_average=False, r_max=2.0)
  xs = np.stack([x, -x])
  ys, _ = jax.vmap(f, in_axes=(0, None, None))(xs, p, s)
  _close(ys[1], brn_ref(-x, *_f64(p.scale, p.bias, s.mean, s.var), 2.0, 5.0, True)[0])
  out = jax.eval_shape(f, jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), p, s)
  assert out[0].dtype == jnp.bfloat16 and out[1].var.dtype == jnp.float32
  yb, _ = f(jnp.asarray(x, jnp.bfloat16), p, s)
  ref = brn_ref(x, *_f64(p.scale, p.bias, s.mean, s.var), 2.0, 5.0, True)[0]
  assert yb.dtype == jnp.bfloat16
  _close(yb, ref, tol=5e-2)


def test_brn_schedule():
  r, d = jn.batch_renorm_schedule(0)
  assert (float(r), float(d)) == (1.0, 0.0)
  r, d = jn.batch_renorm_schedule(5_000)
  assert (float(r), float(d)) == (1.0, 0.0)
  r, d = jn.batch_renorm_schedule(22_500)
  np.testing.assert_allclose([r, d], [1.0 + 2.0 * 17_500 / 35_000, 5.0 * 0.875])
  r, d = jn.batch_renorm_schedule(10**6)
  assert (float(r), float(d)) == (3.0, 5.0)
  r, d = jn.batch_renorm_schedule(
    50, r_max=2.0, d_max=1.0, r_max_steps=(0, 100), d_max_steps=(50, 60)
  )
  np.testing.assert_allclose([r, d], [1.5, 0.0])
  with pytest.raises(ValueError, match="r_max_steps"):
    jn.batch_renorm_schedule(0, r_max_steps=(10, 5))


def test_brn_errors():
  p, s = jn.batch_renorm_init(3)
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="r_max"):
    jn.batch_renorm(x, p, s, use_running_average=False, r_max=0.5)
  with pytest.raises(ValueError, match="d_max"):
    jn.batch_renorm(x, p, s, use_running_average=False, d_max=-1.0)
  with pytest.raises(ValueError, match="r_max"):
    jn.batch_renorm(x, p, s, use_running_average=False, r_max=jnp.ones(3))
  with pytest.raises(ValueError, match="state.mean"):
    jn.batch_renorm(x, p, s._replace(mean=jnp.ones(2)), use_running_average=False)
  with pytest.raises(ValueError, match="axis"):
    jn.batch_renorm(x, p, s, use_running_average=False, axis=2)
  with pytest.raises(ValueError, match="axis_name"):
    jn.batch_renorm(x, p, s, use_running_average=False, axis_name="i")
  # Complex x: refused in training (d has no order to clip), batch norm with
  # the running statistics in evaluation.
  xc = (jnp.arange(12.0).reshape(4, 3) + 1j).astype(jnp.complex64)
  with pytest.raises(TypeError, match="`x` must be real"):
    jn.batch_renorm(xc, p, s, use_running_average=False)
  y, _ = jn.batch_renorm(xc, p, s, use_running_average=True)
  np.testing.assert_allclose(y, np.asarray(xc) / np.sqrt(1.0 + 1e-5), rtol=1e-6)


# ---------------------------------------------------------------- Ghost BN


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_ghost_forward_and_state(k):
  x = _rand((8, 3, 4), loc=0.5, scl=1.5)
  p, s = _bn_params(4)
  ref, rm, rv = ghost_ref(x, *_f64(p.scale, p.bias, s.mean, s.var), k)
  y, ns = bn_j(x, p, s, use_running_average=False, virtual_batch_size=k)
  _close(y, ref)
  _close(ns.mean, rm, 1e-5)
  _close(ns.var, rv, 1e-5)
  y1, ns1 = bn_j(
    _nchw(x), p, s, use_running_average=False, axis=1, virtual_batch_size=k
  )
  _close(y1, _nchw(ref))
  _close(ns1.var, rv, 1e-5)
  # Eval is unchanged, and k = N is plain BN.
  ye, se = bn_j(x, p, s, use_running_average=True, virtual_batch_size=k)
  _close(ye, (x - _f64(s.mean)[0]) / np.sqrt(_f64(s.var)[0] + EPS) * p.scale + p.bias)
  jax.tree.map(np.testing.assert_array_equal, se, s)


def test_ghost_mask():
  x = _rand((6, 4, 2), loc=1.0)
  mask = np.ones((6, 4, 1), bool)
  mask[0, 2:] = False
  mask[2:4] = False  # the second ghost batch is fully masked
  p, s = _bn_params(2)
  ref, rm, rv = ghost_ref(x, *_f64(p.scale, p.bias, s.mean, s.var), 2, mask=mask)
  y, ns = bn_j(x, p, s, use_running_average=False, virtual_batch_size=2, mask=mask)
  _close(y, ref, 1e-3)
  _close(ns.mean, rm, 1e-5)
  _close(ns.var, rv, 1e-5)


def test_ghost_grad_and_transforms():
  x = jnp.asarray(_rand((6, 5, 3), loc=0.5))
  p, s = _bn_params(3)
  w = jnp.asarray(_rand(x.shape, seed=8))

  def plain(x, p):
    xg = x.reshape(3, 2, 5, 3)
    mu = xg.mean((1, 2), keepdims=True)
    var = ((xg - mu) ** 2).mean((1, 2), keepdims=True)
    y = ((xg - mu) / jnp.sqrt(var + EPS)).reshape(x.shape) * p.scale + p.bias
    return jnp.sum(y * w)

  def ours(x, p):
    y, _ = jn.batch_norm(x, p, s, use_running_average=False, virtual_batch_size=2)
    return jnp.sum(y * w)

  g1 = jax.grad(ours, argnums=(0, 1))(x, p)
  g2 = _grad(plain, argnums=(0, 1))(x, p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5), g1, g2)
  f = functools.partial(jn.batch_norm, use_running_average=False, virtual_batch_size=3)
  ref = ghost_ref(np.asarray(x), *_f64(p.scale, p.bias, s.mean, s.var), 3)[0]
  ys, _ = jax.jit(jax.vmap(f, in_axes=(0, None, None)))(jnp.stack([x, x]), p, s)
  _close(ys[1], ref)
  ev = jn.batch_norm(x, p, s, use_running_average=True, virtual_batch_size=3)
  assert ev[1] is s
  out = jax.eval_shape(f, jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), p, s)
  assert out[0].dtype == jnp.bfloat16 and out[1].mean.dtype == jnp.float32
  yb, _ = f(x.astype(jnp.bfloat16), p, s)
  _close(yb, ref, 5e-2)


def test_ghost_errors():
  p, s = jn.batch_norm_init(3)
  x = jnp.ones((6, 2, 3))
  with pytest.raises(ValueError, match="virtual_batch_size"):
    jn.batch_norm(x, p, s, use_running_average=False, virtual_batch_size=4)
  with pytest.raises(ValueError, match="virtual_batch_size"):
    jn.batch_norm(x, p, s, use_running_average=False, virtual_batch_size=0)
  with pytest.raises(ValueError, match="virtual_batch_size"):
    jn.batch_norm(
      jnp.ones((6, 3)), p, s, use_running_average=False, virtual_batch_size=1
    )
  with pytest.raises(ValueError, match="virtual_batch_size"):
    jn.batch_norm(
      jnp.ones((6, 3)), jn.batch_norm_init(6)[0], jn.batch_norm_init(6)[1],
      use_running_average=False, axis=0, virtual_batch_size=2,
    )  # fmt: skip


# ----------------------------------------------------------- multi-device


def _mesh(n=4):
  return Mesh(np.array(jax.devices()[:n]), ("d",))


def _shard(f, n_in):
  return jax.shard_map(
    f, mesh=_mesh(), in_specs=(P("d"),) + (P(),) * (n_in - 1), out_specs=(P("d"), P())
  )


def test_sn_sync_matches_global_batch():
  # Every device holds a different shard, of a different distribution.
  x = np.concatenate([_rand((2, 3, 2), seed=i, loc=i, scl=1 + i) for i in range(4)])
  p, s = _sn_params(2)
  args = _f64(p.scale, p.bias, p.mean_weights, p.var_weights, s.mean, s.var)
  ref, rm, rv = sn_ref(x, *args, train=True)

  def f(x, p, s):
    return jn.switchable_norm(x, p, s, use_running_average=False, axis_name="d")

  y, ns = jax.jit(_shard(f, 3))(x, p, s)
  _close(y, ref)
  _close(ns.mean, rm, 1e-5)
  _close(ns.var, rv, 1e-5)
  w = jnp.asarray(_rand(x.shape, seed=11))
  g_sync = _grad(lambda x, p: jnp.sum(_shard(f, 3)(x, p, s)[0] * w), (0, 1))(x, p)
  g_one = _grad(
    lambda x, p: jnp.sum(jn.switchable_norm(x, p, s, use_running_average=False)[0] * w),
    (0, 1),
  )(jnp.asarray(x), p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g_sync, g_one)


def test_brn_sync_matches_global_batch_with_mask():
  x = np.concatenate([_rand((3, 2, 3), seed=i, loc=2 * i, scl=1 + i) for i in range(4)])
  mask = np.ones((12, 2, 1), bool)
  mask[3:6] = False  # device 1 contributes nothing
  mask[7, 1] = False
  p, s = _bn_params(3)
  ref, rm, rv = brn_ref(
    x, *_f64(p.scale, p.bias, s.mean, s.var), 1.5, 1.0, True, mask=mask
  )

  def f(x, mask, p, s):
    return jn.batch_renorm(
      x, p, s, use_running_average=False, r_max=1.5, d_max=1.0, axis_name="d",
      mask=mask,
    )  # fmt: skip

  g = jax.shard_map(
    f, mesh=_mesh(), in_specs=(P("d"), P("d"), P(), P()), out_specs=(P("d"), P())
  )
  y, ns = jax.jit(g)(x, mask, p, s)
  _close(np.asarray(y)[mask[..., 0]], ref[mask[..., 0]])
  _close(ns.mean, rm, 1e-5)
  _close(ns.var, rv, 1e-5)
  w = jnp.asarray(_rand(x.shape, seed=12))
  g_sync = _grad(lambda x, p: jnp.sum(g(x, mask, p, s)[0] * w), (0, 1))(x, p)
  g_ref = _grad(
    lambda x, p: jnp.sum(
      jn.batch_renorm(
        x, p, s, use_running_average=False, r_max=1.5, d_max=1.0, mask=mask
      )[0]
      * w
    ),
    (0, 1),
  )(jnp.asarray(x), p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g_sync, g_ref)


def test_ghost_sync_each_device_owns_its_ghost_batches():
  # 4 devices x 4 samples, k = 2: 8 ghost batches, none spans two devices;
  # the running state averages all 8 groups' statistics on every device.
  x = np.concatenate([_rand((4, 3, 2), seed=i, loc=i, scl=1 + i) for i in range(4)])
  p, s = _bn_params(2)
  ref, rm, rv = ghost_ref(x, *_f64(p.scale, p.bias, s.mean, s.var), 2)

  def f(x, p, s):
    return jn.batch_norm(
      x, p, s, use_running_average=False, virtual_batch_size=2, axis_name="d"
    )

  y, ns = jax.jit(_shard(f, 3))(x, p, s)
  _close(y, ref)
  _close(ns.mean, rm, 1e-5)
  _close(ns.var, rv, 1e-5)
  # Gradients: those of the plain per-group formula on the global batch.
  w = jnp.asarray(_rand(x.shape, seed=13))

  def plain(x, p):
    xg = x.reshape(8, 2, 3, 2)
    mu = xg.mean((1, 2), keepdims=True)
    var = ((xg - mu) ** 2).mean((1, 2), keepdims=True)
    y = ((xg - mu) / jnp.sqrt(var + EPS)).reshape(x.shape) * p.scale + p.bias
    return jnp.sum(y * w)

  g_sync = _grad(lambda x, p: jnp.sum(_shard(f, 3)(x, p, s)[0] * w), (0, 1))(x, p)
  g_ref = _grad(plain, (0, 1))(jnp.asarray(x), p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g_sync, g_ref)
  # With groups of devices, each group averages its own ghost batches.
  g = jax.shard_map(
    lambda x, p, s: jn.batch_norm(
      x, p, s, use_running_average=False, virtual_batch_size=2, axis_name="d",
      axis_index_groups=[[0, 1], [2, 3]],
    )[1].mean[None],
    mesh=_mesh(), in_specs=(P("d"), P(), P()), out_specs=P("d"),
  )  # fmt: skip
  means = np.asarray(jax.jit(g)(x, p, s))
  _, rm01, _ = ghost_ref(x[:8], *_f64(p.scale, p.bias, s.mean, s.var), 2)
  _, rm23, _ = ghost_ref(x[8:], *_f64(p.scale, p.bias, s.mean, s.var), 2)
  _close(means, np.stack([rm01, rm01, rm23, rm23]), 1e-5)


# ----------------------------------------------------------------- modules


def test_linen_modules():
  x = jnp.asarray(_rand((4, 3, 3, 2), loc=1.0))
  key = jax.random.key(0)
  frn = jnn.FilterResponseNorm(learned_epsilon=True)
  v = frn.init(key, x)
  assert jax.tree.map(jnp.shape, v) == {
    "params": {"bias": (2,), "eps": (2,), "scale": (2,), "tau": (2,)}
  }
  pv = v["params"]
  _close(
    frn.apply(v, x), frn_ref(x, *_f64(pv["scale"], pv["bias"], pv["tau"], pv["eps"]))
  )

  sn = jnn.SwitchableNorm(momentum=0.9)
  v = sn.init(key, x, use_running_average=False)
  assert jax.tree.map(jnp.shape, v) == {
    "batch_stats": {"mean": (2,), "var": (2,)},
    "params": {"bias": (2,), "mean_weights": (3,), "scale": (2,), "var_weights": (3,)},
  }
  pv, bs = v["params"], v["batch_stats"]
  args = _f64(
    pv["scale"],
    pv["bias"],
    pv["mean_weights"],
    pv["var_weights"],
    bs["mean"],
    bs["var"],
  )
  y, upd = sn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  ref, rm, rv = sn_ref(x, *args, train=True, momentum=0.9)
  _close(y, ref)
  _close(upd["batch_stats"]["var"], rv, 1e-5)
  v2 = {**v, **upd}
  y_eval = sn.apply(v2, x, use_running_average=True)
  args[4:] = rm, rv
  _close(y_eval, sn_ref(x, *args, train=False)[0])

  brn = jnn.BatchRenorm(r_max=1.5, d_max=0.5, axis=1)
  xc = jnp.moveaxis(x, -1, 1)
  v = brn.init(key, xc, use_running_average=False)
  assert jax.tree.map(jnp.shape, v) == {
    "batch_stats": {"mean": (2,), "var": (2,)},
    "params": {"bias": (2,), "scale": (2,)},
  }
  v = {**v, "batch_stats": {"mean": jnp.full(2, 0.5), "var": jnp.full(2, 2.0)}}
  y, upd = brn.apply(v, xc, use_running_average=False, mutable=["batch_stats"])
  ref, rm, _ = brn_ref(
    np.moveaxis(np.asarray(xc), 1, -1), 1.0, 0.0, 0.5, 2.0, 1.5, 0.5, True
  )
  _close(y, np.moveaxis(ref, -1, 1))
  _close(upd["batch_stats"]["mean"], rm, 1e-5)
  # call-time bounds override the fields, as traced values under jit
  y1, _ = jax.jit(
    lambda v, r: brn.apply(
      v, xc, use_running_average=False, r_max=r, d_max=0.0, mutable=["batch_stats"]
    )
  )(v, jnp.float32(1.0))
  ref1 = brn_ref(np.moveaxis(np.asarray(xc), 1, -1), 1.0, 0.0, 0.5, 2.0, 1.0, 0.0, True)
  _close(y1, np.moveaxis(ref1[0], -1, 1))
  ye = brn.apply(v, xc, use_running_average=True)
  _close(ye, (np.asarray(xc) - 0.5) / np.sqrt(2.0 + EPS))
  with pytest.raises(ValueError, match="use_running_average"):
    jnn.SwitchableNorm(use_running_average=True).apply(v, x, use_running_average=False)


def test_nnx_modules():
  x = jnp.asarray(_rand((4, 3, 3, 2), loc=1.0))
  frn = jnnx.FilterResponseNorm(2, use_tlu=False, rngs=nnx.Rngs(0))
  assert frn.tau is None and isinstance(frn.scale, nnx.Param)
  _close(frn(x), frn_ref(x, 1.0, 0.0, None, tlu=False))

  sn = jnnx.SwitchableNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
  assert isinstance(sn.mean, nnx.BatchStat) and sn.mean_weights.shape == (3,)
  ref, rm, rv = sn_ref(x, 1.0, 0.0, np.ones(3), np.ones(3), 0.0, 1.0, True, 0.9)
  _close(sn(x), ref)
  _close(sn.mean[...], rm, 1e-5)
  sn.eval()
  ref_e = sn_ref(x, 1.0, 0.0, np.ones(3), np.ones(3), rm, rv, False)[0]
  _close(sn(x), ref_e)
  _close(sn.mean[...], rm, 1e-5)  # unchanged in eval

  brn = jnnx.BatchRenorm(2, r_max=1.2, d_max=0.1, rngs=nnx.Rngs(0))
  brn.mean[...] = jnp.full(2, 0.3)
  ref, rm, _ = brn_ref(x, 1.0, 0.0, 0.3, 1.0, 1.2, 0.1, True)
  _close(brn(x), ref)
  _close(brn.var[...], 0.99 + 0.01 * np.asarray(x, np.float64).var((0, 1, 2)), 1e-5)

  @nnx.jit
  def train_step(m, x):
    return m(x, use_running_average=False, r_max=jnp.float32(1.0), d_max=0.0)

  brn2 = jnnx.BatchRenorm(2, rngs=nnx.Rngs(0))
  bn_ref = (np.asarray(x, np.float64) - np.asarray(x, np.float64).mean((0, 1, 2))) / (
    np.sqrt(np.asarray(x, np.float64).var((0, 1, 2)) + EPS)
  )
  _close(train_step(brn2, x), bn_ref)
  assert float(brn2.mean[0]) != 0.0


def test_modules_sync_under_shard_map():
  # The linen module passes axis_name through: SN state equals the global one.
  x = np.concatenate([_rand((2, 3, 2), seed=i, loc=i) for i in range(4)])
  sn = jnn.SwitchableNorm(axis_name="d")
  v = sn.init(jax.random.key(0), x[:2], use_running_average=False)
  f = jax.shard_map(
    lambda x, v: sn.apply(v, x, use_running_average=False, mutable=["batch_stats"]),
    mesh=_mesh(), in_specs=(P("d"), P()), out_specs=(P("d"), P()),
  )  # fmt: skip
  y, upd = jax.jit(f)(x, v)
  ref, rm, rv = sn_ref(x, 1.0, 0.0, np.ones(3), np.ones(3), 0.0, 1.0, True)
  _close(y, ref)
  _close(upd["batch_stats"]["var"], rv, 1e-5)


def test_linen_batchnorm_virtual_batch_size():
  x = _rand((8, 3), loc=1.0)
  bn = jnn.BatchNorm(virtual_batch_size=4, use_running_average=False)
  v = bn.init(jax.random.key(0), x)
  y, upd = bn.apply(v, x, mutable=["batch_stats"])
  ref, rm, _ = ghost_ref(x, 1.0, 0.0, 0.0, 1.0, 4)
  _close(y, ref)
  _close(upd["batch_stats"]["mean"], rm, 1e-5)
  assert isinstance(bn, nn.Module)


def test_nnx_batchnorm_virtual_batch_size():
  x = _rand((8, 3), loc=1.0)
  bn = jnnx.BatchNorm(3, virtual_batch_size=2, rngs=nnx.Rngs(0))
  ref, rm, rv = ghost_ref(x, 1.0, 0.0, 0.0, 1.0, 2)
  _close(bn(x), ref)
  _close(bn.var[...], rv, 1e-5)
