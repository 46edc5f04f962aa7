"""The plain-sum fast path of batch, instance and group norm (``_guarded``).

On a CPU these layers first take ``sum(x)`` and ``sum(x^2)`` and fall back
to the exact (shifted or two-pass) sums when some row's mean is too large
for them. Whichever route runs, the results must match float64 NumPy: these
tests put rows on both sides of the threshold (|mean| = sqrt(15) std), under
``jit``, ``vmap`` (where the rule keeps a single ``cond``) and a sync axis.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn

C = 8
RNG = np.random.default_rng(11)


def _np_stats(x, axes):
  x = np.asarray(x, np.float64)
  mean = x.mean(axes, keepdims=True)
  return mean, ((x - mean) ** 2).mean(axes, keepdims=True)


def _x(shape, offsets):
  """N(0, 1) data plus a per-channel offset (in units of its std)."""
  return jnp.asarray(RNG.standard_normal(shape) + np.asarray(offsets), jnp.float32)


# Per-channel offsets: near zero, just inside and just outside the threshold
# (sqrt(15) = 3.87), moderate and huge. Any one channel outside it sends the
# whole call down the exact route; the second set stays inside.
MIXED = [0.0, 0.5, -3.5, 3.7, 4.5, 30.0, -300.0, 1e4]
INSIDE = [0.0, 0.5, -1.0, 2.0, -3.0, 3.5, 1.5, -0.25]


def _layer(name, x):
  p = jn.NormParams(jnp.ones(C), jnp.zeros(C))
  if name == "batch_norm":
    _, s = jn.batch_norm_init(C)
    y, new = jn.batch_norm(x, p, s, use_running_average=False, momentum=0.0)
    return y, new.var, (0, 1, 2)
  if name == "instance_norm":
    return jn.instance_norm(x, p, epsilon=0.0), None, (1, 2)
  # group norm with one channel per group is instance norm's statistics,
  # taken through the grouped code path
  return jn.group_norm(x, p, num_groups=C, epsilon=0.0), None, (1, 2)


def _tolerance(offsets):
  # x itself is only known to float32's resolution at its magnitude, and
  # that error, not the statistics', bounds how close y can be.
  return 4e-3 if max(abs(o) for o in offsets) > 1e3 else 2e-5


@pytest.mark.parametrize("name", ["batch_norm", "instance_norm", "group_norm"])
@pytest.mark.parametrize("offsets", [MIXED, INSIDE], ids=["mixed", "inside"])
def test_matches_float64_on_both_routes(name, offsets):
  # channel offsets vary along C: batch norm sees one offset per channel;
  # instance and group norm see one per (sample, channel) row
  x = _x((16, 12, 12, C), offsets)
  y, var, axes = jax.jit(lambda x: _layer(name, x))(x)
  mean, ref_var = _np_stats(x, axes)
  eps = 1e-5 if name == "batch_norm" else 0.0
  ref_y = (np.asarray(x, np.float64) - mean) / np.sqrt(ref_var + eps)
  np.testing.assert_allclose(y, ref_y, atol=_tolerance(offsets))
  if var is not None:
    rel = np.abs(np.asarray(var, np.float64) - ref_var.reshape(-1)) / ref_var.reshape(
      -1
    )
    assert rel.max() <= (1e-3 if max(map(abs, offsets)) > 1e3 else 1e-5), rel.max()


@pytest.mark.parametrize("name", ["instance_norm", "group_norm"])
def test_vmap_mixes_routes_across_the_batch(name):
  # one example per route: the batched rule must still give each its own
  # statistics (the exact route for all when any example needs it)
  xs = jnp.stack([_x((2, 6, 6, C), INSIDE), _x((2, 6, 6, C), MIXED)])
  ys = jax.jit(jax.vmap(lambda x: _layer(name, x)[0]))(xs)
  for x, y, offsets in zip(xs, ys, [INSIDE, MIXED], strict=True):
    mean, var = _np_stats(x, (1, 2))
    ref = (np.asarray(x, np.float64) - mean) / np.sqrt(var)
    np.testing.assert_allclose(y, ref, atol=_tolerance(offsets))


def test_vmap_keeps_one_cond_not_both_routes():
  # a cond whose predicate is batched would become a select of both
  # routes: the rule reduces the predicate over the batch instead
  xs = jnp.zeros((3, 2, 6, 6, C))
  jaxpr = str(jax.make_jaxpr(jax.vmap(lambda x: _layer("instance_norm", x)[0]))(xs))
  assert "cond[" in jaxpr
  assert "select_n" not in jaxpr


def test_gradient_on_both_routes_matches_float64():
  # the forward that feeds the custom VJP takes the guarded route too; its
  # gradient is checked against the closed form of instance norm in float64
  for offsets in (INSIDE, MIXED):
    x = _x((2, 6, 6, C), offsets)
    dy = jnp.asarray(RNG.standard_normal(x.shape), jnp.float32)
    p = jn.NormParams(jnp.ones(C), jnp.zeros(C))

    def loss(x, p=p, dy=dy):
      return jnp.sum(jn.instance_norm(x, p, epsilon=0.0) * dy)

    g = jax.jit(jax.grad(loss))(x)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    mean, var = _np_stats(x64, (1, 2))
    xhat = (x64 - mean) / np.sqrt(var)
    ref = (
      dy64
      - dy64.mean((1, 2), keepdims=True)
      - xhat * (dy64 * xhat).mean((1, 2), keepdims=True)
    ) / np.sqrt(var)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(
      g, ref, atol=(2e-2 if max(map(abs, offsets)) > 1e3 else 1e-4) * scale
    )


def test_sync_devices_on_different_routes():
  # under pmap each device picks its own route: device 0's channels sit 4.5
  # std from zero (exact route), the others' 0.5 (plain sums); the merged
  # statistics are those of the concatenated batch
  n = jax.local_device_count()
  shards = np.stack(
    [np.asarray(_x((4, 3, 3, C), [4.5 if i == 0 else 0.5] * C)) for i in range(n)]
  )
  p, s = jn.batch_norm_init(C)

  def step(x):
    new = jn.batch_norm(
      x, p, s, use_running_average=False, momentum=0.0, axis_name="d"
    )[1]
    return new.mean, new.var

  mean, var = jax.pmap(step, axis_name="d")(jnp.asarray(shards))
  ref_mean, ref_var = _np_stats(shards.reshape((-1, C)), (0,))
  np.testing.assert_allclose(mean[0], ref_mean.reshape(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var[0], ref_var.reshape(-1), rtol=1e-5)
