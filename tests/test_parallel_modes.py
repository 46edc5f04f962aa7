"""Every layer under SPMD ``jax.jit``: Auto and Explicit meshes, 1-D and 2-D.

The reference is the same layer run without any mesh, on one device: under
SPMD ``jit`` the statistics must already be global, so a sharded run must
give the unsharded outputs (to 2e-5), new state and gradients (to 2e-4),
whatever axis is sharded. The batch is sharded over ``data`` (a different
shard per device); on the 2-D mesh the channels are also sharded over
``model``. Masks, and ghost batches that span devices or lie within one,
are covered too.
Masks and the linen and nnx modules run on the Auto 1-D and the Explicit
2-D mesh (which also shards the batch over an Explicit axis), the functions
on all four meshes.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx

N, H, W, C = 16, 3, 3, 8
OUT_TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_TOL = dict(rtol=2e-4, atol=2e-4)


def _stateless(fn):
  def apply(x, params, state, mask, train):
    del train
    return fn(x, params, mask=mask), state

  return apply


def _stateful(fn, **kw):
  def apply(x, params, state, mask, train, **extra):
    return fn(x, params, state, use_running_average=not train, mask=mask, **kw, **extra)

  return apply


# name: (init(C) -> (params, state), apply(x, params, state, mask, train))
LAYERS = {
  "batch": (jn.batch_norm_init, _stateful(jn.batch_norm)),
  "ghost_batch": (
    jn.batch_norm_init,
    _stateful(jn.batch_norm, virtual_batch_size=4),  # groups span 2 devices
  ),
  "ghost_batch_local": (
    jn.batch_norm_init,
    _stateful(jn.batch_norm, virtual_batch_size=2),  # groups within a device
  ),
  "layer": (
    lambda c: (jn.layer_norm_init((H, W, c)), None),
    _stateless(
      functools.partial(jn.layer_norm, reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3))
    ),
  ),
  "layer_last": (
    lambda c: (jn.layer_norm_init(c), None),
    _stateless(jn.layer_norm),
  ),
  "rms": (lambda c: (jn.rms_norm_init(c), None), _stateless(jn.rms_norm)),
  "group": (
    lambda c: (jn.group_norm_init(c), None),
    _stateless(functools.partial(jn.group_norm, num_groups=4)),
  ),
  "instance": (lambda c: (jn.group_norm_init(c), None), _stateless(jn.instance_norm)),
  "frn": (
    lambda c: (jn.filter_response_norm_init(c, learned_epsilon=True), None),
    _stateless(jn.filter_response_norm),
  ),
  "switchable": (jn.switchable_norm_init, _stateful(jn.switchable_norm)),
  "batch_renorm": (
    jn.batch_renorm_init,
    _stateful(jn.batch_renorm, r_max=1.5, d_max=0.5),
  ),
  "evonorm_b0": (jn.evonorm_b0_init, _stateful(jn.evonorm_b0)),
  "evonorm_s0": (
    lambda c: (jn.evonorm_s0_init(c), None),
    _stateless(functools.partial(jn.evonorm_s0, num_groups=4)),
  ),
  "mabn": (
    functools.partial(jn.moving_average_batch_norm_init, buffer_size=4),
    _stateful(jn.moving_average_batch_norm),
  ),
}


def _data(with_mask):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
  # Every device's shard differs, and the channels have different means.
  x = jax.random.normal(k1, (N, H, W, C)) * 1.5 + jnp.arange(C) * 0.5
  w = jax.random.normal(k2, (N, H, W, C))
  mask = None
  if with_mask:
    mask = jax.random.bernoulli(k3, 0.7, (N, H, W, 1))
    mask = mask.at[:2].set(False)  # device 0 has nothing in its statistics
  del k4
  return x, w, mask


def _perturb(params):
  # Away from the init values, so that scale and bias gradients differ.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), max(len(leaves), 1))
  leaves = [
    p + 0.1 * jax.random.normal(k, p.shape, p.dtype)
    if jnp.issubdtype(p.dtype, jnp.floating)
    else p
    for p, k in zip(leaves, keys, strict=False)
  ]
  return jax.tree.unflatten(tree, leaves)


def _step_fn(apply, train):
  def loss(x, params, state, mask, w):
    y, new_state = apply(x, params, state, mask, train)
    return jnp.sum(y * w) + 0.1 * jnp.sum(y**2), (y, new_state)

  def step(x, params, state, mask, w):
    (_, (y, new_state)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      x, params, state, mask, w
    )
    return y, new_state, grads

  return step


MESHES = {
  "auto_1d": ((8,), ("data",), AxisType.Auto, P("data")),
  "explicit_1d": ((8,), ("data",), AxisType.Explicit, P("data")),
  "auto_2d": ((4, 2), ("data", "model"), AxisType.Auto, P("data", None, None, "model")),
  "explicit_2d": (
    (4, 2),
    ("data", "model"),
    AxisType.Explicit,
    P("data", None, None, "model"),
  ),
}


def _run_sharded(mesh_name, step, x, params, state, mask, w):
  shape, names, kind, spec = MESHES[mesh_name]
  mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(names))
  mask_spec = P(spec[0]) if mask is not None else None
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    ws = jax.device_put(w, NamedSharding(mesh, spec))
    ms = None if mask is None else jax.device_put(mask, NamedSharding(mesh, mask_spec))
    rep = NamedSharding(mesh, P())
    params_s = jax.device_put(params, rep)
    state_s = jax.device_put(state, rep)
    out = jax.jit(step)(xs, params_s, state_s, ms, ws)
  return jax.device_get(out)


def _assert_close(got, want, tol):
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol),
    got,
    want,
  )


@functools.cache
def _unsharded(name, train, with_mask):
  """The layer's step on one device, without a mesh: every mesh's
  reference (computed once per layer, mode and mask, not once per mesh)."""
  init, apply = LAYERS[name]
  params, state = init(C)
  params = _perturb(params)
  x, w, mask = _data(with_mask)
  step = _step_fn(apply, train)
  return jax.device_get(jax.jit(step)(x, params, state, mask, w))


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("train", [True, False])
def test_function_equals_unsharded(name, mesh_name, train):
  init, apply = LAYERS[name]
  params, state = init(C)
  params = _perturb(params)
  x, w, mask = _data(with_mask=False)
  step = _step_fn(apply, train)
  want = _unsharded(name, train, False)
  got = _run_sharded(mesh_name, step, x, params, state, None, w)
  _assert_close(got[0], want[0], OUT_TOL)
  _assert_close(got[1], want[1], OUT_TOL)
  _assert_close(got[2], want[2], GRAD_TOL)


MASKED = [n for n in LAYERS if n not in ("frn", "evonorm_s0", "layer_last")]


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", MASKED)
def test_function_with_mask_equals_unsharded(name, mesh_name):
  init, apply = LAYERS[name]
  params, state = init(C)
  params = _perturb(params)
  x, w, mask = _data(with_mask=True)
  step = _step_fn(apply, True)
  want = _unsharded(name, True, True)
  assert np.all(np.isfinite(np.asarray(want[0])))
  got = _run_sharded(mesh_name, step, x, params, state, mask, w)
  _assert_close(got, want, GRAD_TOL)


# --- shard_map with axis_name ------------------------------------------------

# Layers whose statistics span the batch take axis_name; per-sample layers
# need no collective. Ghost batches of 2 stay within a device's shard of 2.
SYNCED = {"batch", "ghost_batch", "switchable", "batch_renorm", "evonorm_b0", "mabn"}
SHARD_MAP_LAYERS = dict(LAYERS)
del SHARD_MAP_LAYERS["ghost_batch_local"]  # ghost_batch below is that case
SHARD_MAP_LAYERS["ghost_batch"] = (
  jn.batch_norm_init,
  _stateful(jn.batch_norm, virtual_batch_size=2),
)


@pytest.mark.parametrize(
  "name,masked",
  [(n, m) for n in SHARD_MAP_LAYERS for m in (False, True) if not m or n in MASKED],
)
def test_shard_map_equals_unsharded(name, masked):
  """Count-weighted and exact: each device's shard differs (device 0's is
  wholly masked), and the result is that of the whole batch."""
  init, apply = SHARD_MAP_LAYERS[name]
  params, state = init(C)
  params = _perturb(params)
  x, w, mask = _data(with_mask=masked)
  want = _unsharded(
    "ghost_batch_local" if name == "ghost_batch" else name, True, masked
  )
  if name in SYNCED:
    apply = functools.partial(apply, axis_name="data")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  spec = P("data")
  f = jax.shard_map(
    _step_fn(apply, True),
    mesh=mesh,
    in_specs=(spec, P(), P(), None if mask is None else spec, spec),
    out_specs=(spec, P(), (spec, P())),
  )
  with jax.set_mesh(mesh):
    xs, ws = (jax.device_put(v, spec) for v in (x, w))
    ms = None if mask is None else jax.device_put(mask, spec)
    got = jax.device_get(jax.jit(f)(xs, params, state, ms, ws))
  _assert_close(got, want, GRAD_TOL)


@pytest.mark.parametrize("name", list(SHARD_MAP_LAYERS))
def test_partial_shard_map_with_explicit_channels_equals_unsharded(name):
  """Data parallelism by a ``shard_map`` over ``data`` only, the channels
  split by the ``model`` axis it leaves Explicit (tensor parallelism): the
  statistics' merge over ``data`` meets statistics split over ``model``."""
  init, apply = SHARD_MAP_LAYERS[name]
  params, state = init(C)
  params = _perturb(params)
  x, w, _ = _data(with_mask=False)
  want = _unsharded("ghost_batch_local" if name == "ghost_batch" else name, True, False)
  if name in SYNCED:
    apply = functools.partial(apply, axis_name="data")
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  f = jax.shard_map(
    _step_fn(apply, True),
    mesh=mesh,
    in_specs=(P("data"), P(), P(), None, P("data")),
    out_specs=(P("data"), P(), (P("data"), P())),
    axis_names={"data"},
  )
  with jax.set_mesh(mesh):
    xs, ws = (jax.device_put(v, P("data", None, None, "model")) for v in (x, w))
    got = jax.device_get(jax.jit(f)(xs, params, state, None, ws))
  _assert_close(got, want, GRAD_TOL)


@pytest.mark.parametrize(
  "name, split",
  [(n, 3) for n in ("layer", "switchable", "evonorm_b0", "batch")]
  + [(n, 1) for n in ("switchable", "evonorm_b0", "batch")],
)
def test_gradient_of_partial_shard_map_equals_unsharded(name, split):
  """``jax.grad`` (eager, and under ``jit``) of a ``shard_map`` over
  ``data`` only, with H or the channels split by the Explicit ``model``
  axis it leaves automatic."""
  init, apply = SHARD_MAP_LAYERS[name]
  params, state = init(C)
  params = _perturb(params)
  x, w, _ = _data(with_mask=False)
  if split == 1:  # H split: 4 rows, so that the 2 devices of `model` divide it
    x, w = (jnp.concatenate([v, v[:, :1] * 0.5 + 1.0], axis=1) for v in (x, w))
  sync = dict(axis_name="data") if name in SYNCED else {}

  def forward(x, params):
    return apply(x, params, state, None, True, **sync)[0]

  def loss(f):
    return lambda x, params: jnp.sum(f(x, params) * w)

  want = jax.grad(loss(lambda x, p: apply(x, p, state, None, True)[0]), (0, 1))(
    x, params
  )
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  f = jax.shard_map(
    forward,
    mesh=mesh,
    in_specs=(P("data"), P()),
    out_specs=P("data"),
    axis_names={"data"},
  )
  spec = [None] * 4
  spec[0], spec[split] = "data", "model"
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, P(*spec))
    eager = jax.grad(loss(f), (0, 1))(xs, params)
    jitted = jax.jit(jax.grad(loss(f), (0, 1)))(xs, params)
  _assert_close(jax.device_get(eager), want, GRAD_TOL)
  _assert_close(jax.device_get(jitted), want, GRAD_TOL)


@pytest.mark.parametrize("name", ["group", "evonorm_s0"])
@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit])
def test_groups_of_channels_cut_by_shards_equal_unsharded(name, kind):
  """One channel per device: each group of 2 channels spans 2 shards."""
  init, apply = LAYERS[name]
  params, state = init(C)
  params = _perturb(params)
  x, w, _ = _data(with_mask=False)
  step = _step_fn(apply, True)
  want = _unsharded(name, True, False)
  mesh = jax.make_mesh((8,), ("model",), axis_types=(kind,))
  with jax.set_mesh(mesh):
    xs, ws = (jax.device_put(v, P(None, None, None, "model")) for v in (x, w))
    got = jax.device_get(jax.jit(step)(xs, params, state, None, ws))
  _assert_close(got, want, GRAD_TOL)


# --- linen and nnx modules ---------------------------------------------------

MODULES = {
  "batch": (dict(momentum=0.9), True),
  "ghost_batch": (dict(virtual_batch_size=4), True),
  "layer": ({}, False),
  "rms": ({}, False),
  "group": (dict(num_groups=4), False),
  "instance": ({}, False),
  "frn": ({}, False),
  "switchable": ({}, True),
  "batch_renorm": ({}, True),
  "mabn": ({}, True),
  "evonorm_b0": ({}, True),
  "evonorm_s0": (dict(num_groups=4), False),
}


def _linen_step(name, train):
  kwargs, stateful = MODULES[name]
  if stateful:
    kwargs = dict(kwargs, use_running_average=not train)
  module = jnl.make_norm(name, **kwargs)

  def step(variables, x, w):
    def loss(params, x):
      y, updates = module.apply(
        {**variables, "params": params}, x, mutable=["batch_stats"]
      )
      return jnp.sum(y * w), (y, updates)

    (_, (y, updates)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      variables["params"], x
    )
    return y, updates, grads

  return module, step


@functools.cache
def _linen_unsharded(name, train):
  module, step = _linen_step(name, train)
  x, w, _ = _data(with_mask=False)
  variables = module.init(jax.random.key(0), x)
  return jax.device_get(jax.jit(step)(variables, x, w))


@pytest.mark.parametrize("mesh_name", ["auto_1d", "explicit_2d"])
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("train", [True, False])
def test_linen_module_equals_unsharded(name, mesh_name, train):
  module, step = _linen_step(name, train)
  x, w, _ = _data(with_mask=False)
  want = _linen_unsharded(name, train)
  shape, names, kind, spec = MESHES[mesh_name]
  mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(names))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    ws = jax.device_put(w, NamedSharding(mesh, spec))
    # init itself runs on the sharded input (it failed on an Explicit mesh).
    variables_s = jax.jit(module.init)(jax.random.key(0), xs)
    got = jax.device_get(jax.jit(step)(variables_s, xs, ws))
  _assert_close(got, want, GRAD_TOL)


NNX = {
  "batch": lambda: jnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0)),
  "layer": lambda: jnx.LayerNorm(C, rngs=nnx.Rngs(0)),
  "rms": lambda: jnx.RMSNorm(C, rngs=nnx.Rngs(0)),
  "group": lambda: jnx.GroupNorm(C, num_groups=4, rngs=nnx.Rngs(0)),
  "instance": lambda: jnx.InstanceNorm(C, rngs=nnx.Rngs(0)),
  "frn": lambda: jnx.make_norm("frn", num_features=C, rngs=nnx.Rngs(0)),
  "switchable": lambda: jnx.make_norm("switchable", num_features=C, rngs=nnx.Rngs(0)),
  "batch_renorm": lambda: jnx.make_norm(
    "batch_renorm", num_features=C, rngs=nnx.Rngs(0)
  ),
  "evonorm_b0": lambda: jnx.make_norm("evonorm_b0", num_features=C, rngs=nnx.Rngs(0)),
  "evonorm_s0": lambda: jnx.make_norm(
    "evonorm_s0", num_features=C, num_groups=4, rngs=nnx.Rngs(0)
  ),
  "mabn": lambda: jnx.make_norm("mabn", num_features=C, rngs=nnx.Rngs(0)),
}


def _nnx_step(model, x, w, train):
  if train:
    model.train()
  else:
    model.eval()

  def loss(model, x):
    y = model(x)
    return jnp.sum(y * w), y

  (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(model, x)
  return y, nnx.state(model, nnx.BatchStat), grads


@pytest.mark.parametrize("mesh_name", ["auto_1d", "explicit_2d"])
@pytest.mark.parametrize("name", list(NNX))
@pytest.mark.parametrize("train", [True, False])
def test_nnx_module_equals_unsharded(name, mesh_name, train):
  x, w, _ = _data(with_mask=False)
  step = nnx.jit(functools.partial(_nnx_step, train=train))
  want = step(NNX[name](), x, w)
  shape, names, kind, spec = MESHES[mesh_name]
  mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(names))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    ws = jax.device_put(w, NamedSharding(mesh, spec))
    got = step(NNX[name](), xs, ws)
  got = jax.device_get(jax.tree.map(np.asarray, got))
  want = jax.device_get(jax.tree.map(np.asarray, want))
  _assert_close(got, want, GRAD_TOL)


@pytest.mark.parametrize("k", [4, 8])
def test_ghost_batches_of_whole_shards_merge_in_groups(k):
  """Ghost batches of ``k`` samples made of whole shards (2 samples each:
  the batch split over both axes of an Explicit mesh, in the order
  ``('model', 'data')``) merge within groups of consecutive devices in one
  all-reduce, and equal the unsharded run, with a mask."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  spec = P(("model", "data"))
  init, apply = LAYERS["batch"]
  params, state = init(C)
  params = _perturb(params)
  x, w, mask = _data(with_mask=True)
  step = _step_fn(lambda *a: apply(*a, virtual_batch_size=k), True)
  want = jax.jit(step)(x, params, state, mask, w)
  with jax.set_mesh(mesh):
    xs, ws, ms = (jax.device_put(v, NamedSharding(mesh, spec)) for v in (x, w, mask))
    got = jax.device_get(jax.jit(step)(xs, params, state, ms, ws))

    def forward(x, m):
      return apply(x, params, state, m, True, virtual_batch_size=k)[0]

    hlo = jax.jit(forward).lower(xs, ms).compile().as_text()
  _assert_close(got[:2], want[:2], OUT_TOL)
  _assert_close(got[2], want[2], GRAD_TOL)
  # One merge for y (the global form takes two).
  assert hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(") == 1, hlo


@pytest.mark.parametrize(
  "n, k, spec",
  [
    (24, 2, P("data")),  # shards of 3 samples: ghost batches cut across them
    (16, 4, P("data", None, "model")),  # a reduced axis besides the batch split
  ],
)
def test_ghost_batches_across_shards_take_the_global_form(n, k, spec):
  """The global form, as XLA partitions it on an Auto mesh: exact, and no
  more collectives than on an Auto mesh (the Explicit mesh's own sharding
  rules gathered full-size arrays: 2 forward and 5 forward+backward, where
  an Auto mesh takes 2 and 3)."""
  shape, names = ((8,), ("data",)) if spec == P("data") else ((4, 2), ("data", "model"))
  params, state = jn.batch_norm_init(C)
  params = _perturb(params)
  x = (
    jax.random.normal(jax.random.key(5), (n, H, 4, C)) * 1.5
    + jnp.arange(n)[:, None, None, None]
  )
  w = jax.random.normal(jax.random.key(6), x.shape)
  apply = functools.partial(LAYERS["batch"][1], virtual_batch_size=k)
  step = _step_fn(apply, True)
  want = jax.jit(step)(x, params, state, None, w)
  kinds = ("all-reduce", "all-gather", "all-to-all", "collective-permute")
  counts = {}
  for kind in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(names))
    with jax.set_mesh(mesh):
      xs, ws = (jax.device_put(v, NamedSharding(mesh, spec)) for v in (x, w))
      got = jax.device_get(jax.jit(step)(xs, params, state, None, ws))
      hlo = jax.jit(step).lower(xs, params, state, None, ws).compile().as_text()
    _assert_close(got[:2], want[:2], OUT_TOL)
    _assert_close(got[2], want[2], GRAD_TOL)
    counts[kind] = sum(hlo.count(f" {c}(") + hlo.count(f" {c}-start(") for c in kinds)
  assert counts[AxisType.Explicit] <= counts[AxisType.Auto] <= 4, counts


def test_explicit_outputs_keep_the_input_sharding():
  """The output of an Explicit-mesh layer is sharded like its input."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  spec = P("data", None, None, "model")
  params, state = jn.batch_norm_init(C)
  x, _, _ = _data(with_mask=False)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    y, _ = jax.jit(functools.partial(jn.batch_norm, use_running_average=False))(
      xs, params, state
    )
    assert jax.typeof(y).sharding.spec == spec


def test_nn_module_is_flax():
  # The linen factory gives flax modules (guards the imports above).
  assert isinstance(jnl.make_norm("batch"), nn.Module)


def test_nan_stays_in_its_ghost_batch_of_whole_shards():
  """Ghost batches of 4 over shards of 2 (Explicit mesh): a NaN in ghost
  batch 0 leaves the other three finite, as on one device."""
  params, state = jn.batch_norm_init(C)
  x = jax.random.normal(jax.random.key(0), (16, 2, C)).at[0, 0, 0].set(jnp.nan)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    y, _ = jax.jit(
      functools.partial(jn.batch_norm, use_running_average=False, virtual_batch_size=4)
    )(jax.device_put(x, P("data")), params, state)
  has_nan = np.isnan(np.asarray(y)).reshape(4, -1).any(axis=1)
  assert has_nan.tolist() == [True, False, False, False]


def test_vmap_over_an_explicit_sharded_axis_with_reduced_axes_split():
  """``vmap`` over an axis split by ``d`` while ``m`` splits the features:
  the merged parts differ in batching, and must still merge."""
  params = jn.layer_norm_init(C)
  x = jax.random.normal(jax.random.key(1), (2, 8, 4, C)) * 2 + 3
  want = jax.vmap(lambda v: jn.layer_norm(v, params))(x)
  mesh = jax.make_mesh((2, 4), ("d", "m"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, P("d", None, None, "m"))
    got = jax.jit(jax.vmap(lambda v: jn.layer_norm(v, params)))(xs)
  _assert_close(jax.device_get(got), want, OUT_TOL)
