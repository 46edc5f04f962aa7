"""Statistics merged from parts: across devices, and from blocks on Auto meshes.

Every parallel mode merges per-part moments: ``shard_map``/``pmap`` with
``axis_name`` (one psum), Explicit meshes (a ``shard_map`` inside), and Auto
meshes (blocks of the batch or feature axis, all-gathered once). These tests
hold them to the single-device accuracy at a large mean, where a merge of
rounded means loses digits, to the unsharded result when the Auto mesh's
guess of the split axis is wrong, and to the unsharded derivatives in
float64. References: float64 NumPy, and the same function on one device.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm as jn

C = 8


def _offset_data(offset, n=64, with_mask=False):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, 4, 4, C))
  # Every device's shard has its own mean, so that the merge has work to do.
  x = x + offset + 3.0 * np.repeat(np.arange(8), n // 8)[:, None, None, None]
  mask = None
  if with_mask:
    mask = rng.random((n, 4, 4, 1)) < 0.7
    mask[: n // 8] = False  # device 0 (and block 0) has nothing in it
  return x.astype(np.float32), mask


def _reference(x, mask):
  x = x.astype(np.float64)
  if mask is None:
    return x.mean((0, 1, 2)), x.var((0, 1, 2))
  w = np.broadcast_to(mask, x.shape)
  mean = (x * w).sum((0, 1, 2)) / w.sum((0, 1, 2))
  var = (((x - mean) ** 2) * w).sum((0, 1, 2)) / w.sum((0, 1, 2))
  return mean, var


def _bn_state(x, mask, axis_name=None):
  params, state = jn.batch_norm_init(C)
  _, new = jn.batch_norm(
    x,
    params,
    state,
    use_running_average=False,
    momentum=0.0,
    mask=mask,
    axis_name=axis_name,
  )
  return new.mean, new.var


def _run(mode, x, mask):
  if mode == "one device":
    return jax.jit(_bn_state)(x, mask)
  if mode == "pmap":
    xs = x.reshape((8, -1) + x.shape[1:])
    ms = None if mask is None else mask.reshape((8, -1) + mask.shape[1:])
    out = jax.pmap(lambda x, m: _bn_state(x, m, "d"), axis_name="d")(xs, ms)
    return jax.tree.map(lambda v: v[0], out)
  kind = AxisType.Explicit if mode != "auto mesh" else AxisType.Auto
  mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ms = None if mask is None else jax.device_put(mask, NamedSharding(mesh, P("data")))
    if mode == "shard_map":
      f = jax.shard_map(
        lambda x, m: _bn_state(x, m, "data"),
        mesh=mesh,
        in_specs=(P("data"), None if mask is None else P("data")),
        out_specs=P(),
      )
      return jax.jit(f)(xs, ms)
    return jax.jit(_bn_state)(xs, ms)


MODES = ["one device", "auto mesh", "explicit mesh", "shard_map", "pmap"]


@pytest.mark.parametrize("with_mask", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("mode", MODES)
def test_merged_variance_is_exact_at_a_large_mean(mode, with_mask):
  """``1e6 + N(0, 1)`` in float32, a different mean on every device: merged
  statistics are as accurate as one device's. (Merging the rounded means
  gave 4e-3 relative error in the variance, the same squared rounding that
  the corrected two-pass removes on one device.)"""
  x, mask = _offset_data(1e6, with_mask=with_mask)
  want_mean, want_var = _reference(x, mask)
  mean, var = _run(mode, x, mask)
  np.testing.assert_allclose(np.asarray(var), want_var, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=1e-7)


def _collectives(text):
  kinds = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")
  return sum(len(re.findall(rf"\b{k}(?:-start)?\(", text)) for k in kinds)


def _step(x, params, state, w):
  def loss(x, params):
    y, new = jn.batch_norm(x, params, state, use_running_average=False)
    return jnp.sum(y * w), new

  (_, new), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
  return new, grads


@pytest.mark.parametrize(
  "n,mesh_shape,spec",
  [
    # The batch is not divisible by the 8 devices: 4 blocks of 3, whole
    # shards of the batch split over `data` only.
    (12, (4, 2), P("data")),
    # The guess is wrong: the batch axis is cut into blocks, but H is split.
    (16, (8,), P(None, "data")),
    # Both, and the channels on `model` too.
    (16, (4, 2), P(None, "data", None, "model")),
  ],
  ids=["n=12", "H split", "H and C split"],
)
def test_auto_blocks_equal_the_unsharded_run(n, mesh_shape, spec):
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((n, 8, 4, C)) * 2 + 5).astype(np.float32)
  w = rng.standard_normal(x.shape).astype(np.float32)
  params, state = jn.batch_norm_init(C)
  params = params._replace(scale=params.scale + 0.3, bias=params.bias - 0.2)
  want = jax.jit(_step)(x, params, state, w)
  names = ("data", "model")[: len(mesh_shape)]
  mesh = jax.make_mesh(mesh_shape, names, axis_types=(AxisType.Auto,) * len(names))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, spec))
    ws = jax.device_put(w, NamedSharding(mesh, spec))
    got = jax.jit(_step)(xs, params, state, ws)
    fwd = jax.jit(
      lambda x: jn.batch_norm(x, params, state, use_running_average=False)[0]
    )
    count = _collectives(fwd.lower(xs).compile().as_text())
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-4
    ),
    got,
    want,
  )
  if n == 12:  # blocks of 3 are the shards: one all-gather
    assert count == 1, count


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_mesh_derivatives_equal_the_unsharded_ones_in_float64(kind):
  """jvp, grad of grad and a Hessian-vector product through ghost batch
  norm, batch norm and layer norm (features split over ``model``) on a 2-D
  mesh, where blocks (Auto) or shards (Explicit) give the moments: the
  derivatives are the moments' own, so they equal the unsharded ones to
  rounding."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 2, 2, C)) * 3 + 10
    v = rng.standard_normal(x.shape)
    bn_p, bn_s = jn.batch_norm_init(C, param_dtype=jnp.float64)
    ln_p = jn.layer_norm_init(C, param_dtype=jnp.float64)

    def f(x):
      y = jn.batch_norm(x, bn_p, bn_s, use_running_average=False, virtual_batch_size=8)[
        0
      ]
      y = jn.batch_norm(y, bn_p, bn_s, use_running_average=False)[0]
      return jnp.sum(jnp.sin(jn.layer_norm(y, ln_p)))

    def derivs(x, v):
      jvp = jax.jvp(f, (x,), (v,))[1]
      hvp = jax.jvp(jax.grad(f), (x,), (v,))[1]
      gg = jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2))(x)
      return jvp, hvp, gg

    want = jax.jit(derivs)(x, v)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind,) * 2)
    with jax.set_mesh(mesh):
      sharding = NamedSharding(mesh, P("data", None, None, "model"))
      got = jax.jit(derivs)(jax.device_put(x, sharding), jax.device_put(v, sharding))
    for a, b in zip(got, want, strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
  "n,k,spec,masked",
  [
    (24, 6, P("data"), True),  # shares of 3: every ghost batch spans 2
    (16, 2, P("data"), True),  # shares of 2 hold whole ghost batches
    (24, 2, P("data"), False),  # shares of 3 cut ghost batches: global form
    (16, 4, P(None, "data"), False),  # the guess is wrong: H is split
  ],
  ids=["spans 2", "within", "cut", "H split"],
)
def test_auto_ghost_batches_equal_the_unsharded_run(n, k, spec, masked):
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((n, 8, 2, C)) * 2 + 5).astype(np.float32)
  x += np.arange(n, dtype=np.float32)[:, None, None, None]  # ghost batches differ
  w = rng.standard_normal(x.shape).astype(np.float32)
  mask = None
  if masked:
    mask = rng.random((n, 8, 2, 1)) < 0.7
    mask[:k] = False  # the first ghost batch has nothing in it
  params, state = jn.batch_norm_init(C)
  params = params._replace(scale=params.scale + 0.3, bias=params.bias - 0.2)

  def step(x, params, w, mask):
    def loss(x, params):
      y, new = jn.batch_norm(
        x, params, state, use_running_average=False, virtual_batch_size=k, mask=mask
      )
      return jnp.sum(y * w), (y, new)

    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return aux, grads

  want = jax.jit(step)(x, params, w, mask)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(mesh):
    xs, ws = (jax.device_put(v, NamedSharding(mesh, spec)) for v in (x, w))
    ms = None if mask is None else jax.device_put(mask, NamedSharding(mesh, spec))
    got = jax.jit(step)(xs, params, ws, ms)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-4
    ),
    got,
    want,
  )
