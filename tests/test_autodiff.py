"""Every functional layer under every autodiff transformation (SPEC rule 10).

For each layer, in training and in evaluation mode where it has both, in
float64: ``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``, ``jax.grad``, grad of
grad and ``jax.hessian``, and ``jax.vmap`` of each, agree with central finite
differences (step ``1e-5``) to ``1e-5`` of the largest reference entry:

- a directional derivative ``J d`` (jvp, jacfwd, linearize) with FD of ``y``;
- the gradient of ``L = sum(y * w) + sum(y**3) / 3`` along random directions
  with FD of ``L`` (the cubic term makes the second derivatives non-zero);
- a Hessian-vector product ``H d`` (grad of grad, hessian) with FD of the
  gradient.

Every float input of a layer (``x`` and the parameters) is differentiated,
all flattened into one vector; the running state is a constant.

Three layers define their gradient on purpose, and are checked against the
formula they document rather than against FD of their own forward pass:

- batch renorm holds ``r`` and ``d`` under ``stop_gradient``: the reference
  is the batch-norm formula, written here, with ``r`` and ``d`` frozen at
  the point of evaluation;
- spectral norm holds its power-iteration vectors under ``stop_gradient``:
  the reference is ``W / (v^T W u)`` with ``u``, ``v`` the singular vectors
  (by SVD) of a ``W`` whose state has converged;
- MABN in training: forward mode is the derivative of the paper's forward
  formula (with ``r`` frozen), written here, on a fresh state and on a warm
  one with a mask; on a fresh state its custom gradient is that of the
  uncentred batch formula; its state-dependent backward terms are checked
  under ``shard_map``, a named ``vmap`` and ``grad`` of ``vmap`` against one
  device on the whole batch; second order only has to run.

``jax.hessian`` of batch norm in training is also checked entry by entry,
for symmetry and against FD of a closed-form gradient. Finally, reverse mode
keeps little: the residuals of ``jax.vjp`` of batch, layer and group norm
are ``x`` and per-row statistics, nothing full-size in float32 for a
bfloat16 ``x``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxnorm as jn

SHAPE = (4, 3, 3, 4)  # NHWC
C = SHAPE[-1]
STEP = 1e-5  # finite-difference step
RTOL = 1e-5  # relative to the largest entry of the reference


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def assert_close(actual, expected, what, rtol=RTOL):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), f"{what}: not finite"
  scale = np.max(np.abs(expected))
  assert scale > 1e-8, f"{what}: the reference is zero, the check is vacuous"
  err = np.max(np.abs(actual - expected)) / scale
  assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def central_difference(g, z, d):
  return (g(z + STEP * d) - g(z - STEP * d)) / (2 * STEP)


# --- The layers -----------------------------------------------------------


class Layer(NamedTuple):
  """``fn(*args) -> y``; ``draw(rng) -> args``, a point to differentiate at.

  ``ref(base_args, *args) -> y``, if given, is the forward pass whose finite
  differences at ``base_args`` are the reference (the default is ``fn``).
  """

  fn: Callable
  draw: Callable
  ref: Callable | None = None


def _normal(rng, shape, loc=0.0, scale=1.0):
  return jnp.asarray(loc + scale * rng.standard_normal(shape))


def _x(rng, shape=SHAPE):
  return _normal(rng, shape, loc=0.5, scale=1.5)


def _perturb(rng, tree, scale=0.3):
  """Moves every leaf off its init value, so no derivative is special."""
  return jax.tree.map(lambda v: v + _normal(rng, v.shape, scale=scale), tree)


def _random_state(rng, state):
  """Running statistics that are not the init ones (still float32)."""
  return jn.BatchNormState(
    mean=jnp.asarray(0.5 * rng.standard_normal(C), jnp.float32),
    var=jnp.asarray(0.5 + rng.random(C), jnp.float32),
  )


def _batch_norm(rng, train, **kw):
  params, state = jn.batch_norm_init(C, param_dtype=jnp.float64)
  if not train:
    state = _random_state(rng, state)

  def fn(x, params):
    return jn.batch_norm(x, params, state, use_running_average=not train, **kw)[0]

  return Layer(fn, lambda r: (_x(r), _perturb(r, params)))


def _stateless(init, apply):
  params = init()
  return Layer(apply, lambda r: (_x(r), _perturb(r, params)))


def _frn(rng, **kw):
  use_tlu = kw.get("use_tlu", True)
  params = jn.filter_response_norm_init(C, param_dtype=jnp.float64, **kw)

  def draw(r):
    p = _perturb(r, params._replace(eps=None))
    if params.eps is not None:  # |eps| has a kink at 0: stay away from it
      p = p._replace(eps=jnp.asarray(0.01 + 0.05 * r.random(C)))
    return _x(r), p

  def fn(x, p):
    return jn.filter_response_norm(x, p, use_tlu=use_tlu)

  return Layer(fn, draw)


def _switchable_norm(rng, train):
  params, state = jn.switchable_norm_init(C, param_dtype=jnp.float64)
  if not train:
    state = _random_state(rng, state)

  def fn(x, params):
    return jn.switchable_norm(x, params, state, use_running_average=not train)[0]

  return Layer(fn, lambda r: (_x(r), _perturb(r, params)))


def _batch_renorm(rng, train):
  params, state = jn.batch_renorm_init(C, param_dtype=jnp.float64)
  state = _random_state(rng, state)
  r_max, d_max, eps = 3.0, 5.0, 1e-5

  def fn(x, params):
    return jn.batch_renorm(
      x, params, state, use_running_average=not train, r_max=r_max, d_max=d_max
    )[0]

  def ref(base, x, params):
    # Ioffe (2017): BN with the batch statistics, times r, plus d, where r
    # and d are constants of the backward pass: frozen at the base point.
    axes = (0, 1, 2)
    x0 = base[0]
    sigma = jnp.sqrt(state.var.astype(jnp.float64) + eps)
    r = jnp.clip(jnp.sqrt(jnp.var(x0, axes) + eps) / sigma, 1 / r_max, r_max)
    d = jnp.clip((jnp.mean(x0, axes) - state.mean) / sigma, -d_max, d_max)
    mu = jnp.mean(x, axes)
    var = jnp.mean((x - mu) ** 2, axes)
    xhat = (x - mu) / jnp.sqrt(var + eps)
    return (xhat * r + d) * params.scale + params.bias

  return Layer(fn, lambda r: (_x(r), _perturb(r, params)), ref if train else None)


def _evonorm_b0(rng, train):
  params, state = jn.evonorm_b0_init(C, param_dtype=jnp.float64)
  if not train:
    state = state._replace(var=jnp.asarray(0.5 + rng.random(C), jnp.float32))

  def fn(x, params):
    return jn.evonorm_b0(x, params, state, use_running_average=not train)[0]

  return Layer(fn, lambda r: (_x(r), _perturb(r, params)))


def _mabn(rng, train):
  params, state = jn.moving_average_batch_norm_init(
    C, buffer_size=4, param_dtype=jnp.float64
  )
  if not train:
    state = state._replace(var=jnp.asarray(0.5 + rng.random(C), jnp.float32))

  def fn(x, params):
    return jn.moving_average_batch_norm(
      x, params, state, use_running_average=not train
    )[0]

  def ref(base, x, params):
    # Yan et al. (2020) with one batch in the window and r = 1: the batch
    # formula, uncentred.
    chi = jnp.mean(x**2, (0, 1, 2))
    return x / jnp.sqrt(chi + 1e-5) * params.scale + params.bias

  return Layer(fn, lambda r: (_x(r), _perturb(r, params)), ref if train else None)


def _weight_norm(rng):
  def draw(r):
    v = _normal(r, (3, 3, 2, C))
    return v, jn.weight_norm_init(v) + _normal(r, (C,), scale=0.3)

  return Layer(lambda v, scale: jn.weight_norm(v, scale), draw)


def _spectral_norm(rng):
  # W = U diag(s) V^T with a clear spectral gap; its state u is the exact
  # leading right singular vector: the power iteration has converged.
  shape = (3, 2, C)
  q1, _ = np.linalg.qr(rng.standard_normal((6, C)))
  q2, _ = np.linalg.qr(rng.standard_normal((C, C)))
  w0 = (q1 * np.array([3.0, 1.5, 1.0, 0.5])) @ q2.T
  state = jn.SpectralNormState(u=jnp.asarray(q2[:, 0]))

  def fn(w):
    return jn.spectral_norm(w, state)[0]

  def draw(r):  # any positive multiple of w0 has the same singular vectors
    return (jnp.asarray((0.5 + r.random()) * w0.reshape(shape)),)

  def ref(base, w):
    u, _, vt = jnp.linalg.svd(base[0].reshape(6, C))
    mat = w.reshape(6, C)
    return mat / (u[:, 0] @ mat @ vt[0])

  return Layer(fn, draw, ref)


def _normalize(rng):
  def draw(r):
    x = _x(r)
    mean, scale, bias = (_normal(r, (C,)) for _ in range(3))
    var = jnp.asarray(0.5 + r.random(C))
    return x, mean, var, scale, bias

  def fn(x, mean, var, scale, bias):
    return jn.normalize(x, mean, var, scale=scale, bias=bias)

  return Layer(fn, draw)


def _ln_init():
  return jn.layer_norm_init(C, param_dtype=jnp.float64)


def _gn_init():
  return jn.group_norm_init(C, param_dtype=jnp.float64)


LAYERS: dict[str, Callable[[Any], Layer]] = {
  "batch_norm-train": lambda r: _batch_norm(r, True),
  "batch_norm-eval": lambda r: _batch_norm(r, False),
  "ghost_batch_norm-train": lambda r: _batch_norm(r, True, virtual_batch_size=2),
  "layer_norm": lambda r: _stateless(
    _ln_init, lambda x, p: jn.layer_norm(x, p, reduction_axes=(1, 2, 3))
  ),
  "rms_norm": lambda r: _stateless(
    lambda: jn.rms_norm_init(C, param_dtype=jnp.float64), jn.rms_norm
  ),
  "group_norm": lambda r: _stateless(
    _gn_init, lambda x, p: jn.group_norm(x, p, num_groups=2)
  ),
  "instance_norm": lambda r: _stateless(_gn_init, jn.instance_norm),
  "filter_response_norm-tlu": lambda r: _frn(r),
  "filter_response_norm-no_tlu": lambda r: _frn(r, use_tlu=False),
  "filter_response_norm-learned_eps": lambda r: _frn(r, learned_epsilon=True),
  "switchable_norm-train": lambda r: _switchable_norm(r, True),
  "switchable_norm-eval": lambda r: _switchable_norm(r, False),
  "batch_renorm-train": lambda r: _batch_renorm(r, True),
  "batch_renorm-eval": lambda r: _batch_renorm(r, False),
  "evonorm_b0-train": lambda r: _evonorm_b0(r, True),
  "evonorm_b0-eval": lambda r: _evonorm_b0(r, False),
  "evonorm_s0": lambda r: _stateless(
    lambda: jn.evonorm_s0_init(C, param_dtype=jnp.float64),
    lambda x, p: jn.evonorm_s0(x, p, num_groups=2),
  ),
  "mabn-eval": lambda r: _mabn(r, False),
  "weight_norm": _weight_norm,
  "spectral_norm": _spectral_norm,
  "normalize": _normalize,
}


# --- The harness: one flat vector in, one flat vector out -------------------

# XLA's CPU backend at its lowest optimization level compiles these many small
# programs about twice as fast; it changes nothing that is checked here.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


class Problem(NamedTuple):
  f: Callable  # z -> y, both flat
  loss: Callable  # z -> scalar
  ref_f: Callable  # (base z, z) -> y, the forward to take FD of at base
  ref_loss: Callable  # (base z, z) -> scalar
  points: jax.Array  # (n_points, z.size): where to differentiate


def _problem(build, n_points=2, seed=0):
  rng = np.random.default_rng(seed)
  layer = build(rng)
  args = [layer.draw(rng) for _ in range(n_points)]
  _, unravel = ravel_pytree(args[0])
  points = jnp.stack([ravel_pytree(a)[0] for a in args])
  f = lambda z: layer.fn(*unravel(z)).ravel()
  w = _normal(rng, f(points[0]).shape)

  def loss_of(g):
    return lambda *z: jnp.sum(g(*z) * w) + jnp.sum(g(*z) ** 3) / 3

  if layer.ref is None:
    ref_f = lambda base, z: f(z)
  else:
    ref_f = lambda base, z: layer.ref(unravel(base), *unravel(z)).ravel()
  return Problem(f, loss_of(f), ref_f, loss_of(ref_f), points)


def _directions(rng, z, k):
  return jnp.asarray(rng.standard_normal((k, z.size)))


def _forward_mode(f, z, d):
  """``J d`` by every forward-mode route."""
  return {
    "jvp": jax.jvp(f, (z,), (d,))[1],
    "jacfwd": jax.jacfwd(f)(z) @ d,
    "linearize": jax.linearize(f, z)[1](d),
  }


def _reverse_mode(loss, z, d, hessian=True):
  """The gradient, and ``H d`` by reverse over reverse and (unless
  ``hessian`` is false) forward over reverse."""
  grad = jax.grad(loss)
  out = {"grad": grad(z), "grad of grad": jax.grad(lambda z: jnp.vdot(grad(z), d))(z)}
  if hessian:
    out["hessian"] = jax.hessian(loss)(z) @ d
  return out


def _fd_references(p):
  """Central differences at a point ``z``: of ``y`` along ``d``, of the loss
  along each of ``dirs``, of the gradient along ``d``."""

  @jit
  def refs(z, d, dirs):
    y = lambda v: p.ref_f(z, v)
    loss = lambda v: p.ref_loss(z, v)
    jd = central_difference(y, z, d)
    dl = jax.vmap(lambda e: central_difference(loss, z, e))(dirs)
    hd = central_difference(jax.grad(loss), z, d)
    return jd, dl, hd

  return refs


def _check(got, refs, dirs, where):
  jd, dl, hd = refs
  for k in ("jvp", "jacfwd", "linearize"):
    if k in got:
      assert_close(got[k], jd, f"{k}{where} vs FD of y")
  assert_close(dirs @ got["grad"], dl, f"grad{where} vs FD of the loss")
  for k in ("grad of grad", "hessian"):
    if k in got:
      assert_close(got[k], hd, f"{k}{where} vs FD of the gradient")


def _row(tree, i):
  return jax.tree.map(lambda v: v[i], tree)


@pytest.mark.parametrize("name", list(LAYERS))
def test_derivatives_and_their_vmap_match_finite_differences(name, x64):
  """jvp, jacfwd, linearize, grad, grad of grad, hessian, each on its own
  and under ``jax.vmap`` over two points, against central differences."""
  p = _problem(LAYERS[name])
  rng = np.random.default_rng(1)
  zs = p.points
  ds = _directions(rng, zs[0], len(zs))
  dirs = _directions(rng, zs[0], 3)

  def derivatives(z, d):
    return {**_forward_mode(p.f, z, d), **_reverse_mode(p.loss, z, d)}

  plain, batched = jit(
    lambda zs, ds: (derivatives(zs[0], ds[0]), jax.vmap(derivatives)(zs, ds))
  )(zs, ds)
  assert plain["jvp"].dtype == jnp.float64
  refs = _fd_references(p)
  _check(plain, refs(zs[0], ds[0], dirs), dirs, "")
  for i in range(len(zs)):
    _check(_row(batched, i), refs(zs[i], ds[i], dirs), dirs, f" under vmap (row {i})")


# --- MABN in training: a custom gradient ------------------------------------


def _mabn_train():
  return _problem(lambda r: _mabn(r, True))


def test_mabn_train_derivatives_on_a_fresh_state(x64):
  """On a fresh state (one batch in the window, ``r = 1``) forward mode and
  MABN's custom gradient are both those of the uncentred batch formula (FD
  of the reference); grad of grad and ``jax.hessian`` (forward over the
  custom reverse mode) run and are finite; all under vmap too."""
  p = _mabn_train()
  rng = np.random.default_rng(1)
  zs = p.points
  ds = _directions(rng, zs[0], len(zs))
  dirs = _directions(rng, zs[0], 3)

  def derivatives(z, d):
    return {**_forward_mode(p.f, z, d), **_reverse_mode(p.loss, z, d)}

  plain, batched = jit(
    lambda zs, ds: (derivatives(zs[0], ds[0]), jax.vmap(derivatives)(zs, ds))
  )(zs, ds)
  refs = _fd_references(p)
  for got, i, where in [(plain, 0, "")] + [
    (_row(batched, i), i, f" under vmap (row {i})") for i in range(len(zs))
  ]:
    jd, dl, _ = refs(zs[i], ds[i], dirs)
    for k in ("jvp", "jacfwd", "linearize"):
      assert_close(got[k], jd, f"{k}{where} vs FD of y")
    assert_close(dirs @ got["grad"], dl, f"grad{where} vs FD of the loss")
    for k in ("grad of grad", "hessian"):
      assert got[k].shape == zs[i].shape, (k, where)
      assert bool(jnp.all(jnp.isfinite(got[k]))), (k, where)


def _mabn_warm_state(rng, buffer_size=4, count=5):
  """A state several steps in: a full window (n = 4), older second moments
  and gradient statistics that are not zero, a running ``var`` that makes
  ``r`` differ from 1 without clipping."""
  _, state = jn.moving_average_batch_norm_init(C, buffer_size=buffer_size)
  return state._replace(
    var=jnp.asarray(1.0 + rng.random(C), jnp.float32),
    second_moments=jnp.asarray(1.0 + 2.0 * rng.random((buffer_size, C)), jnp.float32),
    grad_moments=jnp.asarray(0.3 * rng.standard_normal((buffer_size, C)), jnp.float32),
    count=jnp.asarray(count, jnp.int32),
  )


MABN_WARM = dict(renorm_warmup_steps=0, epsilon=1e-5)


def _mabn_warm(rng):
  """MABN in training on a warm state, with a mask. The reference is the
  paper's forward written out: ``chi_bar`` the mean of the older batches'
  second moments and this batch's (masked) one, ``r`` frozen at the point of
  evaluation."""
  params, _ = jn.moving_average_batch_norm_init(C, param_dtype=jnp.float64)
  state = _mabn_warm_state(rng)
  mask = jnp.asarray(rng.random(SHAPE) < 0.7)
  axes, eps, n = (0, 1, 2), MABN_WARM["epsilon"], state.second_moments.shape[0]
  slot = int(state.count) % n
  older = np.delete(np.asarray(state.second_moments, np.float64), slot, axis=0)

  def fn(x, params):
    return jn.moving_average_batch_norm(
      x, params, state, use_running_average=False, mask=mask, **MABN_WARM
    )[0]

  def chi_bar(x):
    chi = jnp.sum(jnp.where(mask, x**2, 0.0), axes) / jnp.sum(mask, axes)
    return (older.sum(0) + chi) / n

  def ref(base, x, params):
    var = jnp.asarray(state.var, jnp.float64)
    r = jnp.sqrt(chi_bar(base[0]) + eps) / jnp.sqrt(var + eps)
    return params.scale * r * x / jnp.sqrt(chi_bar(x) + eps) + params.bias

  return Layer(fn, lambda r: (_x(r), _perturb(r, params)), ref)


def test_mabn_forward_mode_on_a_warm_state_with_a_mask(x64):
  """Several steps in (a full window, r != 1, a mask), jvp, jacfwd and
  linearize are the derivative of the paper's forward formula with ``r``
  held constant, and the forward pass is that formula."""
  p = _problem(_mabn_warm)
  z = p.points[0]
  d = _directions(np.random.default_rng(2), z, 1)[0]
  assert_close(p.f(z), p.ref_f(z, z), "y vs the paper's forward", rtol=1e-6)
  # r is not 1 here: the same step with the warm-up still on differs.
  mabn = functools.partial(jn.moving_average_batch_norm, use_running_average=False)
  params, _ = jn.moving_average_batch_norm_init(C, param_dtype=jnp.float64)
  x, params = ravel_pytree((jnp.zeros(SHAPE), params))[1](z)
  rng = np.random.default_rng(0)  # _problem's seed: _mabn_warm's state and mask
  state = _mabn_warm_state(rng)
  mask = jnp.asarray(rng.random(SHAPE) < 0.7)
  y1 = mabn(x, params, state, mask=mask, renorm_warmup_steps=100)[0]
  assert float(jnp.max(jnp.abs(y1.ravel() - p.f(z)))) > 1e-2
  jd, _, _ = _fd_references(p)(z, d, d[None])
  for k, got in jit(lambda z, d: _forward_mode(p.f, z, d))(z, d).items():
    assert_close(got, jd, f"{k} vs FD of the paper's forward")


def _mabn_grads(f, x, params, state, g):
  """Gradient of ``sum(y * g)`` with respect to x, the parameters and the
  state (whose ``grad_moments`` entry carries psi_t), and the jvp along
  ``g`` (reusing it as a direction for x)."""

  def loss(x, params, state):
    return jnp.sum(f(x, params, state) * g)

  gx, gp, gs = jax.grad(loss, argnums=(0, 1, 2), allow_int=True)(x, params, state)
  ty = jax.jvp(lambda x: f(x, params, state), (x,), (g,))[1]
  return gx, gp, gs.grad_moments, ty


def _assert_trees_close(got, want, what):
  # MABN's statistic is rounded to its float32 state: a merge in another
  # order can move it by one float32 ulp.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert_close(a, b, what, rtol=1e-6)


def test_mabn_sync_derivatives_equal_one_device_on_the_whole_batch(x64):
  """With ``axis_name`` under ``shard_map`` (4 devices, each its own shard)
  and under a named ``vmap``, MABN's custom gradient (older psi, the
  ``grad_moments`` increment) and its jvp equal one device's on the
  concatenated batch."""
  rng = np.random.default_rng(4)
  params, _ = jn.moving_average_batch_norm_init(C, param_dtype=jnp.float64)
  params = _perturb(rng, params)
  state = _mabn_warm_state(rng)
  x = _x(rng, (8, 3, 3, C))
  g = _normal(rng, x.shape)

  def one(x, params, state, **kw):
    return jn.moving_average_batch_norm(
      x, params, state, use_running_average=False, **MABN_WARM, **kw
    )[0]

  want = _mabn_grads(one, x, params, state, g)
  assert float(jnp.max(jnp.abs(want[2]))) > 0  # the increment is there

  mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.P("d")

  @jax.jit
  def sharded(x, params, state, g):
    def body(x, params, state, g):
      # The replicated parameters' and state's gradients come back summed
      # over the devices (the transpose of their broadcast).
      return _mabn_grads(
        lambda x, p, s: one(x, p, s, axis_name="d"), x, params, state, g
      )

    return jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(spec, jax.P(), jax.P(), spec),
      out_specs=(spec, jax.P(), jax.P(), spec),
    )(x, params, state, g)

  _assert_trees_close(sharded(x, params, state, g), want, "shard_map vs one device")

  # A named vmap over 2 groups of 4 samples, synced over the vmap axis.
  def per_group(x, g):
    return _mabn_grads(lambda x, p, s: one(x, p, s, axis_name="b"), x, params, state, g)

  gx, gp, gm, ty = jax.jit(jax.vmap(per_group, axis_name="b"))(
    x.reshape(2, 4, *x.shape[1:]), g.reshape(2, 4, *x.shape[1:])
  )
  got = (
    gx.reshape(x.shape),
    jax.tree.map(lambda v: jnp.sum(v, 0), gp),
    gm[0],  # each device's state gets the whole increment (a per-device state)
    ty.reshape(x.shape),
  )
  assert_close(gm[1], gm[0], "the increment on each device", rtol=0)
  _assert_trees_close(got, want, "named vmap vs one device")


def test_mabn_grad_of_vmap_equals_per_example_gradients(x64):
  """``grad`` of a vmapped MABN (each row its own batch, the parameters and
  the state shared) equals the sum of per-row gradients: the state-dependent
  part of MABN's backward is batched too."""
  rng = np.random.default_rng(5)
  params, _ = jn.moving_average_batch_norm_init(C, param_dtype=jnp.float64)
  params = _perturb(rng, params)
  state = _mabn_warm_state(rng)
  xs = _x(rng, (3, *SHAPE))
  gs = _normal(rng, xs.shape)

  def f(x, params, state):
    return jn.moving_average_batch_norm(
      x, params, state, use_running_average=False, **MABN_WARM
    )[0]

  def loss(xs, params, state):
    ys = jax.vmap(f, in_axes=(0, None, None))(xs, params, state)
    return jnp.sum(ys * gs)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2), allow_int=True))(xs, params, state)
  rows = [_mabn_grads(f, xs[i], params, state, gs[i]) for i in range(len(xs))]
  want_gx = jnp.stack([r[0] for r in rows])
  want_gp = jax.tree.map(lambda *v: sum(v), *[r[1] for r in rows])
  want_gm = sum(r[2] for r in rows)
  _assert_trees_close(
    (got[0], got[1], got[2].grad_moments), (want_gx, want_gp, want_gm), "grad(vmap)"
  )


# --- The Hessian of batch norm in training, entry by entry ------------------


def test_batch_norm_hessian_is_symmetric_and_matches_fd_of_the_gradient(x64):
  """Against a hand-written BN forward and its closed-form gradient
  (Ioffe & Szegedy 2015): ``dx = inv / M (M g - sum g - xhat sum(g xhat))``
  with ``g = dL/dxhat``; every column of ``H`` is FD of that gradient."""
  rng = np.random.default_rng(3)
  shape, eps, axes = (3, 2, 2, 2), 1e-5, (0, 1, 2)
  x = _x(rng, shape)
  scale, bias = _normal(rng, 2, 1.0, 0.3), _normal(rng, 2)
  w = _normal(rng, shape)
  m = math.prod(shape[a] for a in axes)
  params, state = jn.batch_norm_init(2, param_dtype=jnp.float64)
  params = params._replace(scale=scale, bias=bias)

  def loss(x):
    y = jn.batch_norm(x, params, state, use_running_average=False)[0]
    return jnp.sum(y * w) + jnp.sum(y**3) / 3

  def ref_grad(x):
    mu = jnp.mean(x, axes)
    inv = 1 / jnp.sqrt(jnp.mean((x - mu) ** 2, axes) + eps)
    xhat = (x - mu) * inv
    y = xhat * scale + bias
    g = (w + y**2) * scale
    return inv / m * (m * g - jnp.sum(g, axes) - xhat * jnp.sum(g * xhat, axes))

  n = x.size
  hess = jax.jit(jax.hessian(loss))(x).reshape(n, n)
  assert_close(jax.jit(jax.grad(loss))(x), ref_grad(x), "grad vs closed form")
  assert_close(hess, hess.T, "symmetry of the Hessian", rtol=1e-12)
  basis = jnp.eye(n).reshape((n, *shape))
  fd = jax.jit(jax.vmap(lambda e: central_difference(ref_grad, x, e)))(basis)
  assert_close(hess, fd.reshape(n, n), "hessian vs FD of the gradient")


# --- What reverse mode keeps -------------------------------------------------

BIG = (16, 8, 8, 32)
# Statistics rows of each layer on BIG: a float32 shift, mean and var are kept
# per row
# (group norm keeps its group statistics broadcast to the channels).
ROWS = {
  "batch_norm-train": BIG[-1],
  "layer_norm": BIG[0],
  "layer_norm-last_axis": BIG[0] * BIG[1] * BIG[2],
  "group_norm": BIG[0] * BIG[-1],  # statistics are kept per channel
}


def _kept(fn, x, params):
  """Bytes in the closure of ``jax.vjp``: every residual, ``x`` included."""
  pullback = jax.eval_shape(lambda x, p: jax.vjp(fn, x, p)[1], x, params)
  leaves = jax.tree.leaves(pullback)
  assert leaves, "the pullback holds no residual: nothing was measured"
  return sum(math.prod(v.shape) * jnp.dtype(v.dtype).itemsize for v in leaves)


MEMORY = {
  "batch_norm-train": lambda x, p: jn.batch_norm(
    x, p, jn.batch_norm_init(BIG[-1])[1], use_running_average=False
  )[0],
  "layer_norm": lambda x, p: jn.layer_norm(x, p, reduction_axes=(1, 2, 3)),
  "layer_norm-last_axis": jn.layer_norm,
  "group_norm": lambda x, p: jn.group_norm(x, p, num_groups=8),
}


@pytest.mark.parametrize(
  "dtype", [jnp.float32, jnp.bfloat16], ids=lambda t: jnp.dtype(t).name
)
@pytest.mark.parametrize("name", list(MEMORY))
def test_reverse_mode_keeps_x_and_statistics_only(name, dtype):
  """x (in its own dtype), a float32 mean and variance per statistics row,
  and the parameters: nothing else, and at most 1.1 x the bytes of x except
  where a row is so short that its 12 bytes of statistics weigh more (layer
  norm over 32 bfloat16 channels: 64 bytes of x per row, 1.19 x)."""
  x = jax.ShapeDtypeStruct(BIG, dtype)
  params = jn.NormParams(jnp.ones(BIG[-1]), jnp.zeros(BIG[-1]))
  nbytes = math.prod(BIG) * jnp.dtype(dtype).itemsize
  kept = _kept(MEMORY[name], x, params)
  assert kept <= nbytes + 12 * ROWS[name] + 2 * 4 * BIG[-1], kept
  row_bytes = nbytes / ROWS[name]
  if row_bytes >= 128:
    assert kept <= 1.1 * nbytes, f"reverse mode keeps {kept / nbytes:.3f} x.nbytes"


COMPLEX_LAYERS = {
  "batch_norm": lambda x: jn.batch_norm(
    x, *jn.batch_norm_init(C, param_dtype=jnp.float64), use_running_average=False
  )[0],
  "ghost_batch_norm": lambda x: jn.batch_norm(
    x,
    *jn.batch_norm_init(C, param_dtype=jnp.float64),
    use_running_average=False,
    virtual_batch_size=2,
  )[0],
  "layer_norm": lambda x: jn.layer_norm(
    x, jn.layer_norm_init(C, param_dtype=jnp.float64)
  ),
  "group_norm": lambda x: jn.group_norm(
    x, jn.group_norm_init(C, param_dtype=jnp.float64), num_groups=2
  ),
  "instance_norm": lambda x: jn.instance_norm(
    x, jn.group_norm_init(C, param_dtype=jnp.float64)
  ),
}


@pytest.mark.parametrize("name", list(COMPLEX_LAYERS))
def test_complex_input_reverse_and_forward_mode(name, x64):
  """Complex ``x`` (whose variance is ``E|x - mean|^2``): the gradient of a
  real loss, and its jvp, along a complex direction agree with central
  finite differences. (Reverse mode used to fail inside jax.checkpoint.)"""
  rng = np.random.default_rng(7)
  x, d, w = (
    jnp.asarray(rng.normal(size=SHAPE) + 1j * rng.normal(size=SHAPE)) for _ in range(3)
  )
  layer = COMPLEX_LAYERS[name]

  def loss(x):
    return jnp.sum(jnp.real(layer(x) * w) + jnp.abs(layer(x)) ** 3 / 3)

  expected = central_difference(loss, x, d)
  # jax.grad of a real function of a complex x is conj(dL/dx) * 2 in
  # Wirtinger terms, so the directional derivative is Re(sum(grad * d)).
  assert_close(jnp.real(jnp.sum(jax.grad(loss)(x) * d)), expected, f"{name} grad")
  assert_close(jax.jvp(loss, (x,), (d,))[1], expected, f"{name} jvp")


def test_mabn_float64_statistics_and_forward_mode_on_its_own_forward(x64):
  """float64 ``x`` gets float64 statistics whatever the (float32) state's
  dtype: on a fresh state the output is the uncentred batch formula to
  float64 precision, and jvp agrees with FD of MABN's own forward pass (it
  was 6e-3 off when the statistic was rounded to float32)."""
  rng = np.random.default_rng(3)
  x, t = (jnp.asarray(rng.normal(size=SHAPE)) for _ in range(2))
  params, state = jn.moving_average_batch_norm_init(C, param_dtype=jnp.float64)

  def f(x):
    return jn.moving_average_batch_norm(x, params, state, use_running_average=False)[0]

  y = f(x)
  assert y.dtype == jnp.float64
  chi = np.mean(np.asarray(x) ** 2, axis=(0, 1, 2))
  assert_close(y, np.asarray(x) / np.sqrt(chi + 1e-5), "y vs formula", rtol=1e-12)
  assert_close(jax.jvp(f, (x,), (t,))[1], central_difference(f, x, t), "jvp vs FD")
