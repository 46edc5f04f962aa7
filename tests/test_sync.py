"""Sync BN on 8 CPU devices, each holding a different shard of the batch.

Under ``pmap``, ``shard_map``, named ``vmap`` and SPMD ``jit`` the outputs,
the new state (on every device) and the gradients with respect to ``x``,
``scale`` and ``bias`` must equal batch norm of the concatenated batch,
computed here in float64 NumPy with the chain rule written out.

Gradient conventions: under ``pmap`` and named ``vmap`` the gradient of a
parameter broadcast to every device is that device's contribution (the
training step sums or averages it); under ``shard_map`` with replicated
(``P()``) parameters autodiff sums it over the devices.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm as jn

D, N, H, C = 8, 4, 3, 5  # devices; per-device batch, height, channels
EPS, MOM = 1e-3, 0.9
TOL = dict(rtol=2e-4, atol=2e-4)

# ----------------------------------------------------------------------------
# Independent reference: float64 NumPy.


def ref_bn(x, mask, scale, bias, g, g_mean, g_var):
  """Batch norm over every axis but the last, and its gradients.

  ``L = sum(g * y) + g_mean . mean + g_var . var``: ``g_mean`` and ``g_var``
  are the cotangents reaching the batch statistics through the new state.
  Masked-out elements are normalized but do not enter the statistics.

  Returns:
    ``y, mean, var, dx, dscale, dbias`` (``y``, ``dx`` of the shape of ``x``).
  """
  shape = x.shape
  x = x.astype(np.float64).reshape(-1, C)
  g = g.astype(np.float64).reshape(-1, C)
  m = np.ones_like(x) if mask is None else np.broadcast_to(mask, shape)
  m = m.reshape(-1, C).astype(np.float64)
  n = m.sum(0)
  mean = (m * x).sum(0) / np.maximum(n, 1)
  d = x - mean
  var = (m * d**2).sum(0) / np.maximum(n, 1)
  inv = 1.0 / np.sqrt(var + EPS)
  xhat = d * inv
  y = xhat * scale + bias
  dxhat = g * scale
  # Every output (masked or not) depends on mean and var; only elements in
  # the statistics move them: d mean / dx = m / n, d var / dx = 2 m d / n.
  dmean = -inv * dxhat.sum(0) + g_mean
  dvar = -0.5 * inv**3 * (dxhat * d).sum(0) + g_var
  dx = inv * dxhat + m * (dmean + 2.0 * d * dvar) / np.maximum(n, 1)
  return (
    y.reshape(shape),
    mean,
    var,
    dx.reshape(shape),
    (g * xhat).sum(0),
    g.sum(0),
  )


def reference(data, groups):
  """Per-device expected ``y, mean, var, dx`` and total ``dscale, dbias``.

  Each device's copy of the new state carries ``1 / D`` of the state's
  cotangent (``loss`` below), so a group of ``k`` devices gets ``k / D``.
  """
  x, mask, g, scale, bias, w_mean, w_var = data
  groups = [list(range(D))] if groups is None else groups
  y, dx = np.zeros(x.shape), np.zeros(x.shape)
  mean, var = np.zeros((D, C)), np.zeros((D, C))
  dscale, dbias = np.zeros(C), np.zeros(C)
  for group in groups:
    k = len(group) / D
    out = ref_bn(
      x[group],
      None if mask is None else mask[group],
      scale,
      bias,
      g[group],
      k * (1 - MOM) * w_mean,
      k * (1 - MOM) * w_var,
    )
    y[group], mean[group], var[group], dx[group] = out[0], out[1], out[2], out[3]
    dscale += out[4]
    dbias += out[5]
  return y, mean, var, dx, dscale, dbias


# ----------------------------------------------------------------------------
# Data: every device gets a different shard, with its own offset and spread.


def make_data(mask_kind, seed=0):
  rng = np.random.default_rng(seed)
  dev = np.arange(D, dtype=np.float32)[:, None, None, None]
  x = (rng.normal(size=(D, N, H, C)) * (0.5 + dev / 4) + 2.0 * dev).astype(np.float32)
  g = rng.normal(size=(D, N, H, C)).astype(np.float32)
  scale = rng.uniform(0.5, 2.0, C).astype(np.float32)
  bias = rng.normal(size=C).astype(np.float32)
  w_mean = rng.normal(size=C).astype(np.float32)
  w_var = rng.normal(size=C).astype(np.float32)
  if mask_kind is None:
    mask = None
  elif mask_kind == "elements":  # uneven counts per device and channel
    mask = (
      rng.uniform(size=(D, N, H, C)) < np.linspace(0.2, 0.9, D)[:, None, None, None]
    )
  elif mask_kind == "empty_device":  # device 3 has no valid element at all
    mask = rng.uniform(size=(D, N, H, C)) < 0.7
    mask[3] = False
  elif mask_kind == "uneven_batch":  # device i has 1 + i % N valid rows
    mask = np.arange(N)[None, :, None, None] <= (np.arange(D) % N)[:, None, None, None]
  else:
    raise ValueError(mask_kind)
  return x, mask, g, scale, bias, w_mean, w_var


def _bn(x, mask, scale, bias, axis_name, groups):
  _, state = jn.batch_norm_init(C)
  return jn.batch_norm(
    x,
    jn.NormParams(scale, bias),
    state,
    use_running_average=False,
    axis_name=axis_name,
    axis_index_groups=groups,
    mask=mask,
    momentum=MOM,
    epsilon=EPS,
  )


def loss(x, mask, g, scale, bias, w_mean, w_var, axis_name, groups, copies):
  """``sum(g * y)`` plus the new state's share of ``w . state`` (see reference)."""
  y, state = _bn(x, mask, scale, bias, axis_name, groups)
  state_term = jnp.sum(w_mean * state.mean) + jnp.sum(w_var * state.var)
  return jnp.sum(g * y) + state_term / copies, (y, state)


_grad = jax.grad(loss, argnums=(0, 3, 4), has_aux=True)

# ----------------------------------------------------------------------------
# The four ways to run it. Each returns y, per-device state, dx and the total
# dscale, dbias.


def run_pmap(data, groups):
  x, mask, g, scale, bias, w_mean, w_var = data

  def step(x, mask, g):
    (dx, ds, db), (y, state) = _grad(
      x, mask, g, scale, bias, w_mean, w_var, "d", groups, D
    )
    return y, state, dx, ds, db

  mask_axis = None if mask is None else 0
  y, state, dx, ds, db = jax.pmap(step, axis_name="d", in_axes=(0, mask_axis, 0))(
    x, mask, g
  )
  return y, state.mean, state.var, dx, ds.sum(0), db.sum(0)


def run_vmap(data, groups):
  x, mask, g, scale, bias, w_mean, w_var = data

  def step(x, mask, g):
    (dx, ds, db), (y, state) = _grad(
      x, mask, g, scale, bias, w_mean, w_var, "d", groups, D
    )
    return y, state, dx, ds, db

  mask_axis = None if mask is None else 0
  y, state, dx, ds, db = jax.jit(
    jax.vmap(step, axis_name="d", in_axes=(0, mask_axis, 0))
  )(x, mask, g)
  return y, state.mean, state.var, dx, ds.sum(0), db.sum(0)


MESH = Mesh(np.array(jax.devices()), ("d",))


def run_shard_map(data, groups, state_spec="stacked", mesh=MESH, axis="d"):
  """``state_spec="replicated"`` returns the state with ``out_specs=P()``."""
  x, mask, g, scale, bias, w_mean, w_var = data
  replicated = state_spec == "replicated"

  def per_device(x, mask, g, scale, bias):
    y, state = _bn(x, mask, scale, bias, axis, groups)
    if not replicated:
      state = jax.tree.map(lambda v: v[None], state)
    return y, state

  spec = P(axis)
  mask_spec = None if mask is None else spec
  state_out = P() if replicated else spec
  sharded = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(spec, mask_spec, spec, P(), P()),
    out_specs=(spec, state_out),
  )

  def total_loss(x, scale, bias):
    y, state = sharded(x, mask, g, scale, bias)
    copies = 1 if replicated else D
    state_term = jnp.sum(w_mean * state.mean) + jnp.sum(w_var * state.var)
    return jnp.sum(g * y) + state_term / copies, (y, state)

  flat = lambda a: None if a is None else a.reshape((D * N,) + a.shape[2:])
  mask, g = flat(mask), flat(g)
  grads, (y, state) = jax.jit(jax.grad(total_loss, argnums=(0, 1, 2), has_aux=True))(
    flat(x), scale, bias
  )
  mean, var = state.mean, state.var
  if replicated:
    mean, var = np.broadcast_to(mean, (D, C)), np.broadcast_to(var, (D, C))
  dx, ds, db = grads
  return y.reshape(x.shape), mean, var, dx.reshape(x.shape), ds, db


def run_spmd_jit(data, groups):
  """Plain ``jit`` on arrays sharded over 8 devices, no ``axis_name``."""
  assert groups is None
  x, mask, g, scale, bias, w_mean, w_var = data
  sharding = NamedSharding(MESH, P("d"))
  flat = lambda a: (
    None if a is None else jax.device_put(a.reshape((D * N,) + a.shape[2:]), sharding)
  )
  xs, ms, gs = flat(x), flat(mask), flat(g)
  assert len(xs.sharding.device_set) == D
  (dx, ds, db), (y, state) = jax.jit(_grad, static_argnums=(7, 8, 9))(
    xs, ms, gs, scale, bias, w_mean, w_var, None, None, 1
  )
  assert y.sharding.is_equivalent_to(sharding, y.ndim)
  mean = np.broadcast_to(state.mean, (D, C))
  var = np.broadcast_to(state.var, (D, C))
  return y.reshape(x.shape), mean, var, dx.reshape(x.shape), ds, db


RUNNERS = {
  "pmap": run_pmap,
  "shard_map": run_shard_map,
  "vmap": run_vmap,
  "jit": run_spmd_jit,
}


def check(got, data, groups):
  y, mean, var, dx, ds, db = (np.asarray(v) for v in got)
  ry, rmean, rvar, rdx, rds, rdb = reference(data, groups)
  for v in (y, mean, var, dx, ds, db):
    assert np.all(np.isfinite(v))
  np.testing.assert_allclose(y, ry, **TOL, err_msg="y")
  # The new state, on every device: momentum * (0, 1) + (1 - momentum) * batch.
  np.testing.assert_allclose(mean, (1 - MOM) * rmean, **TOL, err_msg="state.mean")
  np.testing.assert_allclose(var, MOM + (1 - MOM) * rvar, **TOL, err_msg="state.var")
  np.testing.assert_allclose(dx, rdx, **TOL, err_msg="dx")
  np.testing.assert_allclose(ds, rds, **TOL, err_msg="dscale")
  np.testing.assert_allclose(db, rdb, **TOL, err_msg="dbias")


# ----------------------------------------------------------------------------
# Exactness.


def test_reference_matches_autodiff_of_plain_formula():
  """The hand-written float64 gradients are those of the textbook formula."""
  x, mask, g, scale, bias, w_mean, w_var = make_data("elements")
  x, mask, g = x[:2], mask[:2], g[:2]

  def plain(x, scale, bias):
    n = mask.sum((0, 1, 2))
    mean = jnp.sum(jnp.where(mask, x, 0.0), (0, 1, 2)) / n
    var = jnp.sum(jnp.where(mask, (x - mean) ** 2, 0.0), (0, 1, 2)) / n
    y = (x - mean) / jnp.sqrt(var + EPS) * scale + bias
    return jnp.sum(g * y) + jnp.sum(w_mean * mean) + jnp.sum(w_var * var)

  dx, ds, db = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(x, scale, bias)
  out = ref_bn(x, mask, scale, bias, g, w_mean, w_var)
  np.testing.assert_allclose(dx, out[3], **TOL)
  np.testing.assert_allclose(ds, out[4], **TOL)
  np.testing.assert_allclose(db, out[5], **TOL)


@pytest.mark.parametrize(
  "mask_kind", [None, "elements", "empty_device", "uneven_batch"]
)
@pytest.mark.parametrize("how", list(RUNNERS))
def test_sync_matches_concatenated_batch(how, mask_kind):
  data = make_data(mask_kind)
  check(RUNNERS[how](data, None), data, None)


GROUPS = {
  "halves": [[0, 1, 2, 3], [4, 5, 6, 7]],
  "interleaved": [[0, 2, 4, 6], [1, 3, 5, 7]],
  "pairs": [[0, 5], [1, 4], [2, 7], [3, 6]],
}


@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("how", ["pmap", "shard_map", "vmap"])
def test_axis_index_groups_match_each_group(how, groups):
  data = make_data("elements", seed=1)
  check(RUNNERS[how](data, GROUPS[groups]), data, GROUPS[groups])


def test_shard_map_replicated_state_is_not_counted_per_device():
  """With ``out_specs=P()`` the state's cotangent is the total, not one per device."""
  data = make_data("uneven_batch", seed=2)
  check(run_shard_map(data, None, state_spec="replicated"), data, None)


def test_shard_map_over_two_mesh_axes():
  """``axis_name=("a", "b")`` syncs over both axes of a 2 x 4 mesh."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
  data = make_data("elements", seed=3)
  for state_spec in ("stacked", "replicated"):
    got = run_shard_map(data, None, state_spec, mesh=mesh, axis=("a", "b"))
    check(got, data, None)


def test_differs_from_unsynced_batch_norm():
  """The test data would catch a missing collective."""
  data = make_data(None)
  x, _, _, scale, bias, _, _ = data
  local = jax.jit(jax.vmap(lambda x: _bn(x, None, scale, bias, None, None)[0]))(x)
  assert np.abs(np.asarray(local) - reference(data, None)[0]).max() > 0.5


def test_variance_is_stable_across_devices():
  """x = 1e4 + N(0, 1) in float32 over 8 devices: variance to 1e-3 relative."""
  rng = np.random.default_rng(3)
  x = (1e4 + rng.normal(size=(D * 64, C))).astype(np.float32)
  ref = x.astype(np.float64).var(0)

  def per_device(x):
    _, state = _bn(x, None, None, None, "d", None)
    return state

  state = jax.jit(jax.shard_map(per_device, mesh=MESH, in_specs=P("d"), out_specs=P()))(
    x
  )
  var = (np.asarray(state.var) - MOM) / (1 - MOM)
  np.testing.assert_allclose(var, ref, rtol=1e-3)
  assert np.all(var > 0)


# ----------------------------------------------------------------------------
# Cost: one collective forward, one backward.

COLLECTIVE = re.compile(
  r" (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)


def _collectives(fn, *args):
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  return [m.group(1) for m in COLLECTIVE.finditer(hlo)]


@pytest.mark.parametrize("groups", [None, "interleaved"])
@pytest.mark.parametrize("masked", [False, True])
def test_one_all_reduce_forward_and_one_backward(groups, masked):
  x, mask, g, scale, bias, *_ = make_data("elements" if masked else None)
  x, g = x.reshape(D * N, H, C), g.reshape(D * N, H, C)
  mask = None if mask is None else mask.reshape(D * N, H, C)
  axis_groups = None if groups is None else GROUPS[groups]
  spec = P("d")

  def per_device(x, mask, scale, bias):
    return _bn(x, mask, scale, bias, "d", axis_groups)[0]

  sharded = jax.shard_map(
    per_device,
    mesh=MESH,
    in_specs=(spec, None if mask is None else spec, P(), P()),
    out_specs=spec,
  )
  forward = lambda x, scale, bias: sharded(x, mask, scale, bias)
  grads = jax.grad(lambda x, s, b: jnp.sum(g * forward(x, s, b)), argnums=(0, 1, 2))
  assert _collectives(forward, x, scale, bias) == ["all-reduce"]
  assert _collectives(grads, x, scale, bias) == ["all-reduce", "all-reduce"]


# ----------------------------------------------------------------------------
# Other layers with axis_name.


def _assert_same_value_and_grads(fn, ref, g, *args):
  """``fn`` and the plain formula ``ref`` agree on ``y`` and ``d sum(g y) / d args``."""

  def value_and_grads(f):
    def run(*args):
      y, vjp = jax.vjp(f, *args)
      return y, *vjp(g)

    return jax.jit(run)(*args)

  for a, b in zip(value_and_grads(fn), value_and_grads(ref), strict=True):
    np.testing.assert_allclose(a, b, **TOL)


def test_layer_norm_with_features_sharded_over_devices():
  """LN of a row whose features are split over 8 devices (tensor parallelism)."""
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(3, D * 4)) * 3 + np.arange(D * 4) / 8).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, D * 4).astype(np.float32)
  bias = rng.normal(size=D * 4).astype(np.float32)

  def plain(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * scale + bias

  def per_device(x, scale, bias):
    return jn.layer_norm(x, jn.NormParams(scale, bias), axis_name="d")

  sharded = jax.shard_map(
    per_device,
    mesh=MESH,
    in_specs=(P(None, "d"), P("d"), P("d")),
    out_specs=P(None, "d"),
  )
  _assert_same_value_and_grads(sharded, plain, g, x, scale, bias)


def test_group_norm_with_height_sharded_over_devices():
  """GN of images whose rows are split over 8 devices (spatial parallelism)."""
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(2, D * 2, 3, 4)) + np.arange(D * 2)[:, None, None]).astype(
    np.float32
  )
  g = rng.normal(size=x.shape).astype(np.float32)
  params = jn.group_norm_init(4)

  def plain(x):
    xg = x.reshape(2, D * 2, 3, 2, 2)
    mean = xg.mean((1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean((1, 2, 4), keepdims=True)
    return ((xg - mean) / jnp.sqrt(var + 1e-6)).reshape(x.shape)

  def per_device(x):
    return jn.group_norm(x, params, num_groups=2, axis_name="d")

  sharded = jax.shard_map(
    per_device, mesh=MESH, in_specs=P(None, "d"), out_specs=P(None, "d")
  )
  _assert_same_value_and_grads(sharded, plain, g, x)


# ----------------------------------------------------------------------------
# Bad input.


def _in_pmap(**kwargs):
  x = np.ones((D, N, C), np.float32) + np.arange(N * C, dtype=np.float32).reshape(N, C)
  params, state = jn.batch_norm_init(C)

  def f(x):
    return jn.batch_norm(x, params, state, use_running_average=False, **kwargs)[0]

  return jax.pmap(f, axis_name="d")(x)


def test_unbound_axis_name_is_named():
  params, state = jn.batch_norm_init(C)
  x = jnp.ones((N, C)) + jnp.arange(N)[:, None]
  with pytest.raises(ValueError, match="axis_name"):
    jn.batch_norm(x, params, state, use_running_average=False, axis_name="d")
  with pytest.raises(ValueError, match="axis_name"):
    _in_pmap(axis_name="other")


@pytest.mark.parametrize(
  "groups",
  [
    [[0, 1, 2], [3, 4, 5, 6, 7]],  # unequal sizes
    [[0, 1, 2, 3]],  # does not cover the axis
    [[0, 1, 2, 3], [4, 5, 6, 6]],  # an index twice, one missing
    [[0, 1, 2, 3], [4, 5, 6, 8]],  # out of range
    [[0, 1, 2, 3, 4, 5, 6, 7], []],  # an empty group
  ],
)
def test_bad_axis_index_groups(groups):
  with pytest.raises(ValueError, match="axis_index_groups"):
    _in_pmap(axis_name="d", axis_index_groups=groups)


def test_axis_index_groups_without_axis_name():
  params, state = jn.batch_norm_init(C)
  with pytest.raises(ValueError, match="axis_index_groups"):
    jn.batch_norm(
      jnp.ones((N, C)),
      params,
      state,
      use_running_average=False,
      axis_index_groups=[[0]],
    )


def test_mask_of_wrong_shape():
  with pytest.raises(ValueError, match="mask"):
    _in_pmap(axis_name="d", mask=np.ones((N + 1, C), bool))
  with pytest.raises(TypeError, match="mask"):
    _in_pmap(axis_name="d", mask=np.ones((N, C), np.float32))
