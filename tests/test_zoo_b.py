"""MABN, EvoNorm-B0/S0, weight norm and spectral norm against their papers.

Every reference below is the paper's formula written out in float64 NumPy
(or plain jnp where autodiff of the plain formula is the reference), or
flax's own WeightNorm / SpectralNorm for the drop-in claims.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnx

RNG = np.random.default_rng(0)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------
# MABN
# --------------------------------------------------------------------------


def mabn_reference(xs, gs, scale, bias, *, buffer_size, momentum, eps, warmup, r_max):
  """Yan et al. 2020, Algorithm 1, on (M, C) float64 arrays, step by step.

  Forward: x_hat = x / sqrt(SMA(E[x^2]) + eps), y = scale * r * x_hat + bias.
  Backward: dx = (g' - x_hat * SMA(mean(g' * x_hat))) / sqrt(SMA + eps),
  g' = dL/dy * scale * r. Returns per step (y, dx, dscale, dbias, var, psi).
  """
  var = np.ones(xs[0].shape[-1])
  chis, psis, out = [], [], []
  for t, (x, g) in enumerate(zip(xs, gs, strict=True)):
    chis.append((x**2).mean(0))
    chi_bar = np.mean(chis[-buffer_size:], 0)
    r = np.sqrt(chi_bar + eps) / np.sqrt(var + eps)
    r = np.clip(r, 1 / r_max, r_max) if t >= warmup else np.ones_like(r)
    xhat = x / np.sqrt(chi_bar + eps)
    y = scale * r * xhat + bias
    gp = g * scale * r
    psis.append((gp * xhat).mean(0))
    psi_bar = np.mean(psis[-buffer_size:], 0)
    dx = (gp - xhat * psi_bar) / np.sqrt(chi_bar + eps)
    var = momentum * var + (1 - momentum) * chis[-1]
    out.append((y, dx, (g * r * xhat).sum(0), g.sum(0), var.copy(), psis[-1]))
  return out


def _mabn_step(params, state, x, g, **kw):
  def loss(params, state, x):
    y, new_state = jn.moving_average_batch_norm(
      x, params, state, use_running_average=False, **kw
    )
    return jnp.sum(y * g), (y, new_state)

  grads, (y, new_state) = jax.grad(
    loss, argnums=(0, 1, 2), has_aux=True, allow_int=True
  )(params, state, x)
  new_state = jn.apply_mabn_grad_moments(new_state, grads[1])
  return y, new_state, grads


def test_mabn_matches_paper_forward_backward_over_steps():
  c, bsz = 3, 3
  kw = dict(momentum=0.9, epsilon=1e-3, renorm_warmup_steps=2, r_max=1.5)
  params, state = jn.moving_average_batch_norm_init(c, buffer_size=bsz)
  params = jn.NormParams(jnp.array([1.0, 2.0, 0.5]), jnp.array([0.1, -0.2, 0.3]))
  xs = [RNG.normal(size=(2, 3, 3, c)) * (1 + 2 * t) for t in range(6)]
  gs = [RNG.normal(size=(2, 3, 3, c)) for _ in range(6)]
  ref = mabn_reference(
    [x.reshape(-1, c) for x in xs],
    [g.reshape(-1, c) for g in gs],
    np.asarray(params.scale, np.float64),
    np.asarray(params.bias, np.float64),
    buffer_size=bsz,
    momentum=0.9,
    eps=1e-3,
    warmup=2,
    r_max=1.5,
  )
  step = jax.jit(functools.partial(_mabn_step, **kw))
  for t in range(6):
    x = jnp.asarray(xs[t], jnp.float32)
    g = jnp.asarray(gs[t], jnp.float32)
    y, state, (gp, _, dx) = step(params, state, x, g)
    y_ref, dx_ref, ds_ref, db_ref, var_ref, psi_ref = ref[t]
    _close(y.reshape(-1, c), y_ref, 1e-4)
    _close(dx.reshape(-1, c), dx_ref, 1e-4)
    _close(gp.scale, ds_ref, 1e-3)
    _close(gp.bias, db_ref, 1e-4)
    _close(state.var, var_ref, 1e-4)
    assert int(state.count) == t + 1
    _close(state.grad_moments[t % bsz], psi_ref, 1e-4)
    _close(state.second_moments[t % bsz], (xs[t] ** 2).reshape(-1, c).mean(0), 1e-4)


def test_mabn_backward_differs_from_batch_gradient():
  """After a few steps the backward uses the averaged psi, not the batch one."""
  c = 2
  params, state = jn.moving_average_batch_norm_init(c, buffer_size=4)
  step = jax.jit(_mabn_step)
  for t in range(3):
    x = jnp.asarray(RNG.normal(size=(4, 5, c)) * (1 + t), jnp.float32)
    g = jnp.asarray(RNG.normal(size=(4, 5, c)), jnp.float32)
    _, state, (_, _, dx) = step(params, state, x, g)
  xf = np.asarray(x, np.float64).reshape(-1, c)
  gf = np.asarray(g, np.float64).reshape(-1, c)
  chi_bar = np.asarray(state.second_moments[:3]).mean(0)
  xhat = xf / np.sqrt(chi_bar + 1e-5)
  psi_batch = (gf * xhat).mean(0)
  dx_batch = (gf - xhat * psi_batch) / np.sqrt(chi_bar + 1e-5)
  psi_bar = np.asarray(state.grad_moments[:3]).mean(0)
  dx_mabn = (gf - xhat * psi_bar) / np.sqrt(chi_bar + 1e-5)
  _close(dx.reshape(-1, c), dx_mabn, 1e-4)
  assert np.abs(dx_mabn - dx_batch).max() > 1e-3


def test_mabn_buffer_one_is_exact_gradient_of_plain_formula():
  """buffer_size=1, no renorm: y = x / sqrt(mean(x^2) + eps), exact autodiff."""
  x = jnp.asarray(RNG.normal(size=(4, 3, 2)), jnp.float32)
  g = jnp.asarray(RNG.normal(size=(4, 3, 2)), jnp.float32)
  params, state = jn.moving_average_batch_norm_init(2, buffer_size=1)
  _, _, (_, _, dx) = _mabn_step(params, state, x, g)

  def plain(x):
    return jnp.sum(x / jnp.sqrt(jnp.mean(x**2, axis=(0, 1)) + 1e-5) * g)

  _close(dx, np.asarray(jax.grad(plain)(x)), 1e-5)


def test_mabn_eval_and_nchw_and_mask():
  c = 3
  params, state = jn.moving_average_batch_norm_init(c, buffer_size=2)
  state = state._replace(var=jnp.array([4.0, 0.25, 1.0]))
  x = RNG.normal(size=(2, c, 4, 4)).astype(np.float32)
  y, same = jn.moving_average_batch_norm(
    x, params, state, use_running_average=True, axis=1
  )
  assert same is state
  ref = x / np.sqrt(np.array([4.0, 0.25, 1.0]) + 1e-5)[None, :, None, None]
  _close(y, ref, 1e-5)
  # NCHW training equals NHWC on the transposed input.
  y1, s1 = jn.moving_average_batch_norm(
    x, params, state, use_running_average=False, axis=1
  )
  y2, s2 = jn.moving_average_batch_norm(
    x.transpose(0, 2, 3, 1), params, state, use_running_average=False
  )
  _close(y1.transpose(0, 2, 3, 1), np.asarray(y2), 1e-5)
  _close(s1.var, np.asarray(s2.var), 1e-6)
  # A mask leaves elements out of E[x^2].
  mask = np.zeros((2, c, 4, 4), bool)
  mask[0] = True
  _, s3 = jn.moving_average_batch_norm(
    x, params, state, use_running_average=False, axis=1, mask=mask
  )
  _close(s3.second_moments[0], (x[0] ** 2).mean((1, 2)), 1e-5)


def test_mabn_transforms_and_bf16():
  params, state = jn.moving_average_batch_norm_init(4, buffer_size=3)
  x = jnp.asarray(RNG.normal(size=(5, 2, 4)), jnp.float32)
  f = functools.partial(jn.moving_average_batch_norm, use_running_average=False)
  y, _ = jax.jit(f)(x, params, state)
  shapes = jax.eval_shape(f, x, params, state)
  assert shapes[0].shape == x.shape and shapes[1].second_moments.shape == (3, 4)
  yv, sv = jax.vmap(f, in_axes=(0, None, None))(x, params, state)
  assert yv.shape == x.shape and sv.var.shape == (5, 4)
  yb, sb = f(x.astype(jnp.bfloat16), params, state)
  assert yb.dtype == jnp.bfloat16 and sb.var.dtype == jnp.float32
  _close(yb.astype(jnp.float32), np.asarray(y), 3e-2)


def test_mabn_bad_inputs():
  params, state = jn.moving_average_batch_norm_init(3)
  x = jnp.ones((2, 3))
  with pytest.raises(TypeError, match="`x`"):
    jn.moving_average_batch_norm(
      jnp.ones((2, 3), jnp.int32), params, state, use_running_average=False
    )
  with pytest.raises(ValueError, match="axis"):
    jn.moving_average_batch_norm(x, params, state, use_running_average=False, axis=2)
  with pytest.raises(ValueError, match="params.scale"):
    jn.moving_average_batch_norm(
      jnp.ones((2, 4)), params, state, use_running_average=False
    )
  with pytest.raises(ValueError, match="axis_name"):
    jn.moving_average_batch_norm(
      x, params, state, use_running_average=False, axis_name="i"
    )
  with pytest.raises(TypeError, match="use_running_average"):
    jn.moving_average_batch_norm(x, params, state, use_running_average=1)
  with pytest.raises(ValueError, match="buffer_size"):
    jn.moving_average_batch_norm_init(3, buffer_size=0)
  with pytest.raises(TypeError, match="real"):
    jn.moving_average_batch_norm(
      x.astype(jnp.complex64), params, state, use_running_average=False
    )
  with pytest.raises(ValueError, match="mask"):
    jn.moving_average_batch_norm(
      x, params, state, use_running_average=False, mask=jnp.ones((5,), bool)
    )


def _mesh(n=4):
  return Mesh(np.array(jax.devices()[:n]), ("d",))


def test_mabn_sync_shard_map_equals_single_device():
  """Four devices, four different shards: same y, grads and buffers as one."""
  c = 3
  params, state = jn.moving_average_batch_norm_init(c, buffer_size=2)
  params = jn.NormParams(jnp.array([1.0, 2.0, 0.5]), jnp.array([0.1, -0.2, 0.3]))
  x = jnp.asarray(RNG.normal(size=(8, 3, c)) * np.arange(1, 9)[:, None, None], "f4")
  g = jnp.asarray(RNG.normal(size=(8, 3, c)), jnp.float32)
  kw = dict(use_running_average=False, renorm_warmup_steps=0)

  def sharded(params, state, x):
    return jax.shard_map(
      lambda p, s, x: jn.moving_average_batch_norm(x, p, s, axis_name="d", **kw),
      mesh=_mesh(),
      in_specs=(P(), P(), P("d")),
      out_specs=(P("d"), P()),
    )(params, state, x)

  def single(params, state, x):
    return jn.moving_average_batch_norm(x, params, state, **kw)

  results = []
  for fn in (sharded, single):
    s = state
    for _ in range(2):  # two steps, so the buffers and EMA move

      def loss(p, s, x, fn=fn):
        y, ns = fn(p, s, x)
        return jnp.sum(y * g), (y, ns)

      grad_fn = jax.grad(loss, argnums=(0, 1, 2), has_aux=True, allow_int=True)
      grads, (y, s) = jax.jit(grad_fn)(params, s, x)
      s = jn.apply_mabn_grad_moments(s, grads[1])
    results.append((y, s, grads[0], grads[2]))
  (y1, s1, gp1, dx1), (y2, s2, gp2, dx2) = results
  _close(y1, np.asarray(y2), 1e-5)
  _close(dx1, np.asarray(dx2), 1e-4)
  _close(gp1.scale, np.asarray(gp2.scale), 1e-4)
  for a, b in zip(s1, s2, strict=True):
    _close(a, np.asarray(b), 1e-5)
  assert np.all(np.asarray(s1.grad_moments) != 0)


def test_mabn_sync_pmap_per_device_state():
  """pmap with a per-device state: each device's grads and buffers are global."""
  c = 2
  params, state = jn.moving_average_batch_norm_init(c, buffer_size=2)
  x = jnp.asarray(RNG.normal(size=(4, 2, 3, c)) * np.arange(1, 5)[:, None, None, None])
  x = x.astype(jnp.float32)
  g = jnp.asarray(RNG.normal(size=(4, 2, 3, c)), jnp.float32)

  def step(params, state, x, g):
    def loss(params, state, x):
      y, ns = jn.moving_average_batch_norm(
        x, params, state, use_running_average=False, axis_name="i"
      )
      return jnp.sum(y * g), ns

    grads, ns = jax.grad(loss, (0, 1, 2), has_aux=True, allow_int=True)(
      params, state, x
    )
    return jn.apply_mabn_grad_moments(ns, grads[1]), grads[2]

  states = jax.tree.map(lambda a: jnp.stack([a] * 4), state)
  new, dx = jax.pmap(step, axis_name="i", in_axes=(None, 0, 0, 0))(params, states, x, g)
  _, ref_state, ref_grads = _mabn_step(
    params, state, x.reshape(8, 3, c), g.reshape(8, 3, c)
  )
  _close(dx.reshape(8, 3, c), np.asarray(ref_grads[2]), 1e-4)
  for a, b in zip(new, ref_state, strict=True):
    _close(a, np.broadcast_to(np.asarray(b), a.shape), 1e-5)


def test_mabn_modules():
  x = jnp.asarray(RNG.normal(size=(4, 3, 2)), jnp.float32)
  g = jnp.asarray(RNG.normal(size=(4, 3, 2)), jnp.float32)
  params, state = jn.moving_average_batch_norm_init(2, buffer_size=3)
  y_ref, s_ref, _ = _mabn_step(params, state, x, g)

  model = jnn.MovingAverageBatchNorm(buffer_size=3)
  variables = model.init(jax.random.key(0), x, use_running_average=True)
  assert jax.tree.map(jnp.shape, variables["batch_stats"]) == {
    "var": (2,),
    "second_moments": (3, 2),
    "grad_moments": (3, 2),
    "count": (),
  }

  def loss(params, stats):
    y, upd = model.apply(
      {"params": params, "batch_stats": stats},
      x,
      use_running_average=False,
      mutable=["batch_stats"],
    )
    return jnp.sum(y * g), (y, upd["batch_stats"])

  (_, g_stats), (y, stats) = jax.grad(
    loss, argnums=(0, 1), has_aux=True, allow_int=True
  )(variables["params"], variables["batch_stats"])
  stats = jn.apply_mabn_grad_moments(stats, g_stats)
  _close(y, np.asarray(y_ref), 1e-6)
  for name in s_ref._fields:
    _close(stats[name], np.asarray(getattr(s_ref, name)), 1e-6)

  layer = jnx.MovingAverageBatchNorm(2, buffer_size=3, rngs=nnx.Rngs(0))

  def nnx_loss(layer):
    return jnp.sum(layer(x) * g)

  diff = nnx.DiffState(0, nnx.Any(nnx.Param, jnx.GradMoments))
  grads = nnx.grad(nnx_loss, argnums=diff)(layer)
  nnx.update(
    layer, jn.apply_mabn_grad_moments(nnx.state(layer, jnx.GradMoments), grads)
  )
  for name in s_ref._fields:
    _close(getattr(layer, name)[...], np.asarray(getattr(s_ref, name)), 1e-6)
  layer.eval()
  _close(
    layer(x), np.asarray(model.apply({**variables, "batch_stats": stats}, x, True))
  )


# --------------------------------------------------------------------------
# EvoNorm
# --------------------------------------------------------------------------


def b0_reference(x, scale, bias, v, var_run, *, train, momentum=0.99, eps=1e-5):
  """Liu et al. 2020, EvoNorm-B0, NHWC float64."""
  c = x.shape[-1]
  var_b = x.reshape(-1, c).var(0) if train else var_run
  var_i = x.var(axis=tuple(range(1, x.ndim - 1)), keepdims=True)
  den = np.maximum(np.sqrt(var_b + eps), v * x + np.sqrt(var_i + eps))
  return x / den * scale + bias, momentum * var_run + (1 - momentum) * var_b


def s0_reference(x, scale, bias, v, groups, eps=1e-5):
  """Liu et al. 2020, EvoNorm-S0, NHWC float64."""
  n, c = x.shape[0], x.shape[-1]
  xg = x.reshape(n, -1, groups, c // groups)
  var = xg.var(axis=(1, 3), keepdims=True)
  inv = np.broadcast_to(1 / np.sqrt(var + eps), xg.shape).reshape(x.shape)
  return x / (1 + np.exp(-v * x)) * inv * scale + bias


def _evo_params(c):
  return jn.EvoNormParams(
    jnp.asarray(RNG.uniform(0.5, 2, c), jnp.float32),
    jnp.asarray(RNG.normal(size=c), jnp.float32),
    jnp.asarray(RNG.normal(size=c), jnp.float32),
  )


def test_evonorm_b0_matches_paper():
  c = 4
  params = _evo_params(c)
  state = jn.EvoNormB0State(jnp.asarray(RNG.uniform(0.5, 2, c), jnp.float32))
  x = RNG.normal(size=(3, 4, 4, c)) * 2 + 1
  p64 = [np.asarray(p, np.float64) for p in params]
  for train in (False, True):
    y, new = jn.evonorm_b0(
      jnp.asarray(x, jnp.float32), params, state, use_running_average=not train
    )
    y_ref, var_ref = b0_reference(
      x, *p64, np.asarray(state.var, np.float64), train=train
    )
    _close(y, y_ref, 1e-4)
    if train:
      _close(new.var, var_ref, 1e-5)
    else:
      assert new is state
  # NCHW
  y1, _ = jn.evonorm_b0(
    jnp.asarray(x.transpose(0, 3, 1, 2), jnp.float32),
    params,
    state,
    use_running_average=False,
    axis=1,
  )
  y_ref, _ = b0_reference(x, *p64, np.asarray(state.var, np.float64), train=True)
  _close(np.asarray(y1).transpose(0, 2, 3, 1), y_ref, 1e-4)


def test_evonorm_b0_gradient_and_mask():
  c = 3
  params = _evo_params(c)
  _, state = jn.evonorm_b0_init(c)
  x = jnp.asarray(RNG.normal(size=(2, 3, 3, c)), jnp.float32)

  def ours(x, params):
    return jnp.sum(jn.evonorm_b0(x, params, state, use_running_average=False)[0] ** 2)

  def plain(x, params):
    var_b = jnp.var(x, axis=(0, 1, 2))
    var_i = jnp.var(x, axis=(1, 2), keepdims=True)
    den = jnp.maximum(jnp.sqrt(var_b + 1e-5), params.v * x + jnp.sqrt(var_i + 1e-5))
    return jnp.sum((x / den * params.scale + params.bias) ** 2)

  for a, b in zip(
    jax.jit(jax.grad(ours, (0, 1)))(x, params),
    jax.jit(jax.grad(plain, (0, 1)))(x, params),
    strict=True,
  ):
    jax.tree.map(lambda a, b: _close(a, np.asarray(b), 1e-4), a, b)
  # Masked elements leave both variances.
  mask = np.ones((2, 3, 3, 1), bool)
  mask[1] = False
  _, new = jn.evonorm_b0(x, params, state, use_running_average=False, mask=mask)
  _close(new.var, 0.99 + 0.01 * np.asarray(x[0], np.float64).reshape(-1, c).var(0))


def test_evonorm_b0_sync_shard_map_and_groups():
  c = 2
  params = _evo_params(c)
  _, state = jn.evonorm_b0_init(c)
  x = jnp.asarray(RNG.normal(size=(8, 3, c)) * np.arange(1, 9)[:, None, None], "f4")

  @functools.partial(jax.jit, static_argnums=0)
  def run(groups):
    return jax.shard_map(
      lambda x: jn.evonorm_b0(
        x,
        params,
        state,
        use_running_average=False,
        axis_name="d",
        axis_index_groups=groups,
      ),
      mesh=_mesh(),
      in_specs=P("d"),
      out_specs=(P("d"), P("d")),
    )(x)

  y, new = run(None)
  y_ref, var_ref = b0_reference(
    np.asarray(x, np.float64), *[np.asarray(p, np.float64) for p in params],
    np.ones(c), train=True,
  )  # fmt: skip
  _close(y, y_ref, 1e-4)
  _close(new.var.reshape(4, c), np.broadcast_to(var_ref, (4, c)), 1e-5)
  # Groups {0, 1} and {2, 3}: the first half and the second half of x.
  y, _ = run(((0, 1), (2, 3)))
  for half in (0, 1):
    xs = np.asarray(x[4 * half : 4 * half + 4], np.float64)
    ref, _ = b0_reference(
      xs, *[np.asarray(p, np.float64) for p in params], np.ones(c), train=True
    )
    _close(y[4 * half : 4 * half + 4], ref, 1e-4)


def test_evonorm_s0_matches_paper():
  c = 8
  params = _evo_params(c)
  x = RNG.normal(size=(2, 3, 3, c)) * 3
  p64 = [np.asarray(p, np.float64) for p in params]
  y = jn.evonorm_s0(jnp.asarray(x, jnp.float32), params, num_groups=2)
  _close(y, s0_reference(x, *p64, 2), 1e-4)
  y = jn.evonorm_s0(jnp.asarray(x, jnp.float32), params, num_groups=None, group_size=2)
  _close(y, s0_reference(x, *p64, 4), 1e-4)
  y = jn.evonorm_s0(
    jnp.asarray(x.transpose(0, 3, 1, 2), jnp.float32), params, num_groups=2, axis=1
  )
  _close(np.asarray(y).transpose(0, 2, 3, 1), s0_reference(x, *p64, 2), 1e-4)
  # Gradient against autodiff of the plain formula.
  xj = jnp.asarray(x, jnp.float32)

  def plain(x):
    xg = x.reshape(2, 9, 2, 4)
    inv = jnp.broadcast_to(
      1 / jnp.sqrt(jnp.var(xg, axis=(1, 3), keepdims=True) + 1e-5), xg.shape
    ).reshape(x.shape)
    return jnp.sum(
      (x * jax.nn.sigmoid(params.v * x) * inv * params.scale + params.bias) ** 2
    )

  def ours(x):
    return jnp.sum(jn.evonorm_s0(x, params, num_groups=2) ** 2)

  _close(jax.jit(jax.grad(ours))(xj), np.asarray(jax.jit(jax.grad(plain))(xj)), 1e-3)
  # A mask leaves elements out of the group variance.
  mask = np.ones(x.shape, bool)
  mask[:, 0] = False
  y = jn.evonorm_s0(jnp.asarray(x, jnp.float32), params, num_groups=1, mask=mask)
  var = x[:, 1:].reshape(2, -1).var(1)[:, None, None, None]
  ref = x / (1 + np.exp(-p64[2] * x)) / np.sqrt(var + 1e-5) * p64[0] + p64[1]
  _close(y, ref, 1e-4)


def test_evonorm_transforms_bf16_and_errors():
  c = 4
  params, state = jn.evonorm_b0_init(c)
  x = jnp.asarray(RNG.normal(size=(3, 5, c)), jnp.float32)
  f = functools.partial(jn.evonorm_b0, use_running_average=False)
  y, _ = jax.jit(f)(x, params, state)
  assert jax.eval_shape(f, x, params, state)[0].shape == x.shape
  yv, _ = jax.vmap(f, in_axes=(0, None, None))(x[:, None], params, state)
  assert yv.shape == (3, 1, 5, c)
  yb, sb = f(x.astype(jnp.bfloat16), params, state)
  assert yb.dtype == jnp.bfloat16 and sb.var.dtype == jnp.float32
  _close(yb.astype(jnp.float32), np.asarray(y), 3e-2)
  s0 = jn.evonorm_s0_init(c)
  assert jax.jit(lambda x: jn.evonorm_s0(x, s0, num_groups=2))(x).shape == x.shape
  assert jn.evonorm_s0(x.astype(jnp.bfloat16), s0, num_groups=2).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="num_groups"):
    jn.evonorm_s0(x, s0, num_groups=3)
  with pytest.raises(ValueError, match="params.v"):
    jn.evonorm_s0(x, s0._replace(v=jnp.ones(5)), num_groups=1)
  with pytest.raises(ValueError, match="axis"):
    jn.evonorm_b0(x, params, state, use_running_average=False, axis=0)
  with pytest.raises(TypeError, match="`x`"):
    jn.evonorm_b0(jnp.ones((2, c), int), params, state, use_running_average=True)
  with pytest.raises(TypeError, match="real"):
    jn.evonorm_s0(x.astype(jnp.complex64), s0, num_groups=2)
  with pytest.raises(ValueError, match="state.var"):
    jn.evonorm_b0(x, params, jn.EvoNormB0State(jnp.ones(3)), use_running_average=True)


def test_evonorm_modules():
  c = 8
  x = jnp.asarray(RNG.normal(size=(2, 3, 3, c)), jnp.float32)
  params, state = jn.evonorm_b0_init(c)
  y_ref, s_ref = jn.evonorm_b0(x, params, state, use_running_average=False)
  model = jnn.EvoNormB0()
  variables = model.init(jax.random.key(0), x, use_running_average=True)
  y, upd = model.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  _close(y, np.asarray(y_ref), 1e-6)
  _close(upd["batch_stats"]["var"], np.asarray(s_ref.var), 1e-6)
  layer = jnx.EvoNormB0(c, rngs=nnx.Rngs(0))
  _close(layer(x), np.asarray(y_ref), 1e-6)
  _close(layer.var[...], np.asarray(s_ref.var), 1e-6)
  s0_ref = jn.evonorm_s0(x, jn.evonorm_s0_init(c), num_groups=4)
  m0 = jnn.EvoNormS0(num_groups=4)
  _close(m0.apply(m0.init(jax.random.key(0), x), x), np.asarray(s0_ref), 1e-6)
  _close(jnx.EvoNormS0(c, num_groups=4, rngs=nnx.Rngs(0))(x), np.asarray(s0_ref))


# --------------------------------------------------------------------------
# Weight norm
# --------------------------------------------------------------------------


def test_weight_norm_matches_paper():
  v = RNG.normal(size=(3, 3, 4, 5))
  g = RNG.uniform(0.5, 2, 5)
  w = jn.weight_norm(jnp.asarray(v, "f4"), jnp.asarray(g, "f4"))
  norm = np.sqrt((v**2).sum((0, 1, 2)))
  _close(w, g * v / norm, 1e-5)
  _close(jn.weight_norm_init(jnp.asarray(v, "f4")), norm, 1e-5)
  # feature_axes=None: one norm; a tuple of axes: one norm per (axis) pair.
  _close(
    jn.weight_norm(jnp.asarray(v, "f4"), None, feature_axes=None),
    v / np.sqrt((v**2).sum()),
  )
  s = jn.weight_norm_init(jnp.asarray(v, "f4"), feature_axes=(2, 3))
  assert s.shape == (4, 5)
  _close(jn.weight_norm(jnp.asarray(v, "f4"), s, feature_axes=(2, 3)), v, 1e-5)
  # Gradient against the plain formula.
  vj, gj = jnp.asarray(v, "f4"), jnp.asarray(g, "f4")

  def plain(v, g):
    return jnp.sum(jnp.sin(g * v / jnp.sqrt(jnp.sum(v**2, (0, 1, 2)))))

  def ours(v, g):
    return jnp.sum(jnp.sin(jn.weight_norm(v, g)))

  for a, b in zip(
    jax.grad(ours, (0, 1))(vj, gj), jax.grad(plain, (0, 1))(vj, gj), strict=True
  ):
    _close(a, np.asarray(b), 1e-4)
  assert jax.jit(jn.weight_norm)(vj, gj).shape == v.shape
  assert jax.vmap(jn.weight_norm, in_axes=(0, None))(vj, gj).shape == v.shape
  assert jax.eval_shape(jn.weight_norm, vj, gj).shape == v.shape
  assert jn.weight_norm(vj.astype(jnp.bfloat16), None).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="scale"):
    jn.weight_norm(vj, jnp.ones(4))
  with pytest.raises(ValueError, match="feature_axes"):
    jn.weight_norm(vj, gj, feature_axes=7)
  with pytest.raises(TypeError, match="`v`"):
    jn.weight_norm_init(jnp.ones((2, 2), int))


@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_weight_norm_linen_matches_flax(layer):
  make = (lambda: nn.Dense(5)) if layer == "dense" else (lambda: nn.Conv(5, (3, 3)))
  x = jnp.asarray(RNG.normal(size=(2, 6, 6, 3) if layer == "conv" else (2, 3)), "f4")
  ref_model = nn.WeightNorm(make())
  ours_model = jnn.WeightNorm(make())
  variables = ref_model.init(jax.random.key(0), x)
  ours_vars = ours_model.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours_vars) == jax.tree.map(jnp.shape, variables)
  _close(
    ours_model.apply(variables, x), np.asarray(ref_model.apply(variables, x)), 1e-5
  )

  def loss(model, params):
    return jnp.sum(jnp.sin(model.apply({"params": params}, x)))

  g_ref = jax.grad(functools.partial(loss, ref_model))(variables["params"])
  g_ours = jax.grad(functools.partial(loss, ours_model))(variables["params"])
  jax.tree.map(lambda a, b: _close(a, np.asarray(b), 1e-4), g_ours, g_ref)
  # Function-preserving init: the wrapped layer computes what it did before.
  fp = jnn.WeightNorm(make(), init_from_weights=True)
  fp_vars = fp.init(jax.random.key(0), x)
  plain = make().apply({"params": fp_vars["params"]["layer_instance"]}, x)
  _close(fp.apply(fp_vars, x), np.asarray(plain), 1e-5)


def test_weight_norm_nnx_matches_flax():
  x = jnp.asarray(RNG.normal(size=(2, 3)), "f4")
  ref = nnx.WeightNorm(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  ours = jnx.WeightNorm(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  y_ours = ours(x)
  _close(y_ours, np.asarray(ref(x)), 1e-5)
  # Ours leaves the stored direction alone: a second call gives the same.
  _close(ours(x), np.asarray(y_ours))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(ours)
  v, b = ours.layer_instance.kernel[...], ours.layer_instance.bias[...]

  def plain(v, s):
    return jnp.sum((x @ (s * v / jnp.sqrt(jnp.sum(v**2, 0))) + b) ** 2)

  gv, gs = jax.grad(plain, (0, 1))(v, ours.scales[("kernel",)][...])
  _close(grads["layer_instance"]["kernel"][...], np.asarray(gv), 1e-4)
  _close(grads["scales"][("kernel",)][...], np.asarray(gs), 1e-4)
  lin = nnx.Linear(3, 5, rngs=nnx.Rngs(2))
  y0 = lin(x)
  fp = jnx.WeightNorm(lin, init_from_weights=True, rngs=nnx.Rngs(0))
  _close(fp(x), np.asarray(y0), 1e-5)


# --------------------------------------------------------------------------
# Spectral norm
# --------------------------------------------------------------------------


def spectral_reference(w, u, n_steps, eps=1e-12):
  """Miyato et al. 2018, power iteration on the (prod(shape[:-1]), out) view."""
  mat = w.reshape(-1, w.shape[-1])
  for _ in range(n_steps):
    v = mat @ u
    v = v / np.sqrt((v**2).sum() + eps)
    u = mat.T @ v
    u = u / np.sqrt((u**2).sum() + eps)
  sigma = v @ mat @ u
  return w / sigma, u, sigma


def test_spectral_norm_matches_paper():
  w = RNG.normal(size=(3, 3, 2, 4))
  state = jn.spectral_norm_init(jnp.asarray(w, "f4"), jax.random.key(0), n_warmup=0)
  _close(np.linalg.norm(state.u), 1.0, 1e-6)
  u0 = np.asarray(state.u, np.float64)
  w_bar, new = jn.spectral_norm(jnp.asarray(w, "f4"), state, n_steps=3)
  ref, u_ref, _ = spectral_reference(w, u0, 3)
  _close(w_bar, ref, 1e-4)
  _close(new.u, u_ref, 1e-4)
  _, same = jn.spectral_norm(jnp.asarray(w, "f4"), state, update_stats=False)
  assert same is state
  # After warm-up sigma is the largest singular value (here 3, gap to 1).
  q1, _ = np.linalg.qr(RNG.normal(size=(18, 4)))
  q2, _ = np.linalg.qr(RNG.normal(size=(4, 4)))
  w = ((q1 * np.array([3.0, 1.0, 0.5, 0.2])) @ q2.T).reshape(3, 3, 2, 4)
  warm = jn.spectral_norm_init(jnp.asarray(w, "f4"), jax.random.key(1))
  w_bar, _ = jn.spectral_norm(jnp.asarray(w, "f4"), warm)
  _close(w_bar, w / 3.0, 1e-5)


def test_spectral_norm_gradient_transforms_errors():
  w = jnp.asarray(RNG.normal(size=(5, 4)), "f4")
  state = jn.spectral_norm_init(w, jax.random.key(0))
  c = jnp.asarray(RNG.normal(size=(5, 4)), "f4")
  _, new = jn.spectral_norm(w, state)
  u = new.u
  v = w @ u / jnp.linalg.norm(w @ u)

  def plain(w):  # u and v constants: sigma = v^T W u
    return jnp.sum(c * w / (v @ w @ u))

  def ours(w):
    return jnp.sum(c * jn.spectral_norm(w, state)[0])

  _close(jax.grad(ours)(w), np.asarray(jax.grad(plain)(w)), 1e-4)
  assert jax.jit(jn.spectral_norm)(w, state)[0].shape == w.shape
  assert jax.eval_shape(jn.spectral_norm, w, state)[1].u.shape == (4,)
  ws = jnp.stack([w, 2 * w])
  out, _ = jax.vmap(jn.spectral_norm, in_axes=(0, None))(ws, state)
  _close(out[1], np.asarray(out[0]), 1e-5)
  assert jn.spectral_norm(w.astype(jnp.bfloat16), state)[0].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="`w`"):
    jn.spectral_norm(jnp.ones(4), jn.SpectralNormState(jnp.ones(4)))
  with pytest.raises(ValueError, match="state.u"):
    jn.spectral_norm(w, jn.SpectralNormState(jnp.ones(3)))
  with pytest.raises(TypeError, match="real"):
    jn.spectral_norm(w.astype(jnp.complex64), state)
  with pytest.raises(ValueError, match="n_steps"):
    jn.spectral_norm(w, state, n_steps=0)
  with pytest.raises(TypeError, match="update_stats"):
    jn.spectral_norm(w, state, update_stats=None)


@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_spectral_norm_linen_matches_flax(layer):
  make = (lambda: nn.Dense(5)) if layer == "dense" else (lambda: nn.Conv(5, (3, 3)))
  x = jnp.asarray(RNG.normal(size=(2, 6, 6, 3) if layer == "conv" else (2, 3)), "f4")
  ref_model = nn.SpectralNorm(make(), n_steps=2)
  ours_model = jnn.SpectralNorm(make(), n_steps=2)  # flax's defaults
  variables = ref_model.init(jax.random.key(0), x, update_stats=False)
  ours_vars = ours_model.init(jax.random.key(0), x, update_stats=False)
  # The same key gives flax's variables: the same start of u, no warm-up.
  jax.tree.map(
    lambda a, b: _close(a, np.asarray(b), 1e-6) or assert_dtype(a, b),
    ours_vars,
    variables,
  )
  y_ref, upd_ref = ref_model.apply(variables, x, update_stats=True, mutable=True)
  y, upd = ours_model.apply(variables, x, update_stats=True, mutable=True)
  _close(y, np.asarray(y_ref), 1e-5)
  jax.tree.map(
    lambda a, b: _close(a, np.asarray(b), 1e-5),
    upd["batch_stats"],
    upd_ref["batch_stats"],
  )
  y2, upd2 = ours_model.apply(variables, x, update_stats=False, mutable=True)
  _close(y2, np.asarray(y_ref), 1e-5)
  jax.tree.map(
    lambda a, b: _close(a, np.asarray(b)), upd2["batch_stats"], variables["batch_stats"]
  )


def assert_dtype(a, b):
  assert a.dtype == b.dtype, (a.dtype, b.dtype)


@pytest.mark.filterwarnings(
  # flax.nnx.SpectralNorm itself warns when it stores a float32 u in a
  # bfloat16 variable.
  "ignore:scatter inputs have incompatible types:FutureWarning"
)
@pytest.mark.parametrize(
  "kwargs", [{}, {"epsilon": 1e-2}, {"param_dtype": jnp.bfloat16}], ids=str
)
def test_spectral_norm_nnx_matches_flax(kwargs):
  x = jnp.asarray(RNG.normal(size=(2, 3)), "f4")
  ref = nnx.SpectralNorm(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), **kwargs)
  ours = jnx.SpectralNorm(
    nnx.Linear(3, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), **kwargs
  )
  # The same rngs give flax's state (u starts at flax's unnormalized draw,
  # which matters with a large epsilon), and so flax's first output.
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a, b) or assert_dtype(a, b),
    nnx.state(ours),
    nnx.state(ref),
  )
  kernel = np.asarray(ours.layer_instance.kernel[...])
  _close(ours(x), np.asarray(ref(x)), 1e-5)
  _close(
    ours.batch_stats[("kernel", "u")][...],
    np.asarray(ref.batch_stats[("kernel", "u")][...]),
    1e-5,
  )
  # The stored kernel is unchanged; eval mode does not update u.
  _close(ours.layer_instance.kernel[...], kernel)
  ours.eval()
  u = np.asarray(ours.batch_stats[("kernel", "u")][...])
  ours(x)
  _close(ours.batch_stats[("kernel", "u")][...], u)


def test_spectral_norm_modules_warm_start():
  """``n_warmup`` (a jaxnorm extension) iterates at init, so the first call
  already divides by the largest singular value (3 here, then 1)."""
  x = jnp.asarray(RNG.normal(size=(2, 6)), "f4")
  q1, _ = np.linalg.qr(RNG.normal(size=(6, 6)))
  q2, _ = np.linalg.qr(RNG.normal(size=(5, 5)))
  w = (q1[:, :5] * np.array([3.0, 1.0, 0.5, 0.3, 0.1])) @ q2.T
  dense = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  dense.kernel[...] = jnp.asarray(w, "f4")
  model = jnx.SpectralNorm(dense, rngs=nnx.Rngs(1), n_warmup=15)
  model(x)
  _close(model.batch_stats[("kernel", "sigma")][...], 3.0, 1e-5)
  linen = jnn.SpectralNorm(
    nn.Dense(5, kernel_init=lambda *_: jnp.asarray(w, "f4")), n_warmup=15
  )
  variables = linen.init(jax.random.key(0), x, update_stats=False)
  kernel = variables["params"]["layer_instance"]["kernel"]  # normalized at init
  _close(np.linalg.svd(np.asarray(kernel, np.float64), compute_uv=False)[0], 1.0)
  with pytest.raises(ValueError, match="n_warmup"):
    jnx.SpectralNorm(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), n_warmup=-1)
