"""``recompute_batch_stats`` (precise BN), against float64 NumPy unions.

The reference is what one batch of every element would give: the mean and
biased variance of the concatenation, written out in NumPy. Batches have
different sizes and scales, so an average of per-batch averages (fvcore's
PreciseBN, ``update_bn``) would not match.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm.linen as jnn
import jaxnorm.nnx as jnx

C = 4


def _batches(sizes=(16, 8, 3), seed=0):
  rng = np.random.default_rng(seed)
  return [
    (rng.normal(size=(n, 2, C)) * (1 + i) + 3 * i - 1).astype(np.float32)
    for i, n in enumerate(sizes)
  ]


def _union(batches, mask=None):
  x = np.concatenate([b.reshape(-1, C) for b in batches]).astype(np.float64)
  if mask is not None:
    x = x[mask.reshape(-1)]
  return x.mean(0), x.var(0), x.var(0, ddof=1), (x**2).mean(0)


class Branches(nn.Module):
  """Every stateful layer sees the input itself."""

  @nn.compact
  def __call__(self, x, train):
    ura = not train
    ys = [
      jnn.BatchNorm(name="bn")(x, ura),
      jnn.BatchNorm(virtual_batch_size=1, name="ghost")(x, ura),
      jnn.BatchNorm(momentum=0.1, running_stats="torch", name="torch")(x, ura),
      jnn.SwitchableNorm(name="sn")(x, ura),
      jnn.BatchRenorm(name="renorm")(x, ura),
      jnn.EvoNormB0(name="b0")(x, ura),
      jnn.MovingAverageBatchNorm(name="mabn")(x, ura),
    ]
    return sum(ys)


def _check_union(stats, batches, names):
  mean, var, unbiased, second = _union(batches)
  for name in names:
    want_var = {"torch": unbiased, "mabn": second}.get(name, var)
    np.testing.assert_allclose(stats[name]["var"], want_var, rtol=2e-6, err_msg=name)
    if "mean" in stats[name]:
      np.testing.assert_allclose(
        stats[name]["mean"], mean, rtol=2e-6, atol=1e-6, err_msg=name
      )


def test_linen_every_layer_gets_the_union():
  batches = _batches()
  model = Branches()
  variables = model.init(jax.random.key(0), batches[0], train=False)
  new = jnn.recompute_batch_stats(
    model.apply, variables, batches, progress=False, train=True
  )
  _check_union(
    new["batch_stats"], batches, ["bn", "ghost", "torch", "sn", "renorm", "b0", "mabn"]
  )
  # Parameters, MABN's buffers and num_batches_tracked are left as given.
  jax.tree.map(np.testing.assert_array_equal, new["params"], variables["params"])
  for name in ("count", "second_moments"):
    np.testing.assert_array_equal(
      new["batch_stats"]["mabn"][name], variables["batch_stats"]["mabn"][name]
    )
  assert int(new["batch_stats"]["torch"]["num_batches_tracked"]) == 0


def test_linen_mutable_true_returns_flax_collections_only():
  # mutable=True made the moments collection mutable, and every training
  # step then returned it too: a loop carrying the variables changed
  # structure after one step. flax's BatchNorm is the reference.
  x = jax.random.normal(jax.random.key(0), (16, 8))

  def carried(norm):
    model = norm(use_running_average=False)
    variables = model.init(jax.random.key(1), x)

    def body(i, v):
      return {**v, **model.apply(v, x * i, mutable=True)[1]}

    return jax.lax.fori_loop(0, 3, body, variables)

  ours, theirs = carried(jnn.BatchNorm), carried(nn.BatchNorm)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), ours, theirs
  )


def test_linen_deeper_layer_sees_training_mode_activations():
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = jnn.BatchNorm(use_running_average=not train, name="bn1")(x)
      x = nn.Dense(C, use_bias=False, name="dense")(x)
      return jnn.BatchNorm(use_running_average=not train, name="bn2")(x)

  batches = _batches(seed=1)
  model = Stack()
  variables = model.init(jax.random.key(1), batches[0], train=False)
  new = jnn.recompute_batch_stats(
    model.apply, variables, batches, progress=False, train=True
  )
  # NumPy forward: bn1 normalizes each batch by its own statistics (scale 1,
  # bias 0 at init), then the dense kernel.
  kernel = np.asarray(variables["params"]["dense"]["kernel"], np.float64)
  hidden = []
  for b in batches:
    b = b.astype(np.float64).reshape(-1, C)
    hidden.append((b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5) @ kernel)
  mean, var, _, _ = _union(hidden)
  np.testing.assert_allclose(new["batch_stats"]["bn2"]["mean"], mean, atol=2e-6)
  np.testing.assert_allclose(new["batch_stats"]["bn2"]["var"], var, rtol=2e-5)


def test_linen_shared_layer_and_mask():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
      bn = jnn.BatchNorm(use_running_average=False)
      return bn(x, mask=mask) + bn(2 * x + 1, mask=mask)

  batches = _batches(seed=2)
  masks = [np.arange(b.shape[0])[:, None, None] % 3 != 0 for b in batches]
  model = Twice()
  variables = model.init(jax.random.key(0), batches[0], masks[0])
  new = jnn.recompute_batch_stats(
    lambda v, xm, **kw: model.apply(v, *xm, **kw),
    variables,
    list(zip(batches, masks, strict=True)),
    progress=False,
  )
  both = [b for b in batches] + [2 * b + 1 for b in batches]
  pairs = zip(masks, batches, strict=True)
  full_masks = [np.broadcast_to(m, b.shape) for m, b in pairs] * 2
  x = np.concatenate([b.reshape(-1, C) for b in both]).astype(np.float64)
  keep = np.concatenate([m.reshape(-1, C) for m in full_masks])
  x = np.where(keep, x, np.nan)
  np.testing.assert_allclose(
    new["batch_stats"]["BatchNorm_0"]["mean"], np.nanmean(x, 0), rtol=2e-6
  )
  np.testing.assert_allclose(
    new["batch_stats"]["BatchNorm_0"]["var"], np.nanvar(x, 0), rtol=2e-6
  )


def test_linen_union_spans_devices():
  # shard_map with axis_name, every device its own shard.
  mesh = jax.make_mesh((8,), ("data",))
  model = jnn.BatchNorm(use_running_average=False, axis_name="data")
  batches = [b.reshape(8, -1, C) for b in _batches((16, 8, 24), seed=3)]
  variables = model.init(jax.random.key(0), batches[0][0])

  def apply_fn(variables, x, mutable):
    @functools.partial(
      jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())
    )
    def run(variables, x):
      y, updates = model.apply(variables, x[0], mutable=mutable)
      return y[None], updates

    return run(variables, x)

  sharded = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
  new = jnn.recompute_batch_stats(apply_fn, variables, sharded, progress=False)
  mean, var, _, _ = _union(batches)
  np.testing.assert_allclose(new["batch_stats"]["mean"], mean, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["var"], var, rtol=2e-6)

  # SPMD jit: the batches sharded, no axis_name.
  plain = jnn.BatchNorm(use_running_average=False)
  new = jnn.recompute_batch_stats(
    plain.apply,
    variables,
    [jax.device_put(b.reshape(-1, C), NamedSharding(mesh, P("data"))) for b in batches],
    progress=False,
  )
  np.testing.assert_allclose(new["batch_stats"]["var"], var, rtol=2e-6)


def test_linen_bad_input():
  model = jnn.BatchNorm()
  x = jnp.ones((4, C))
  variables = model.init(jax.random.key(0), x, use_running_average=True)
  with pytest.raises(ValueError, match="`batches` is empty"):
    jnn.recompute_batch_stats(model.apply, variables, [], use_running_average=False)
  with pytest.raises(ValueError, match="training mode"):
    jnn.recompute_batch_stats(
      model.apply, variables, [x], progress=False, use_running_average=True
    )
  with pytest.raises(ValueError, match="`variables`"):
    jnn.recompute_batch_stats(model.apply, {"params": {}}, [x])


class NnxBranches(nnx.Module):
  def __init__(self, rngs):
    self.bn = jnx.BatchNorm(C, rngs=rngs)
    self.ghost = jnx.BatchNorm(C, virtual_batch_size=1, rngs=rngs)
    self.torch = jnx.BatchNorm(C, momentum=0.1, running_stats="torch", rngs=rngs)
    self.sn = jnx.SwitchableNorm(C, rngs=rngs)
    self.renorm = jnx.BatchRenorm(C, rngs=rngs)
    self.b0 = jnx.EvoNormB0(C, rngs=rngs)
    self.mabn = jnx.MovingAverageBatchNorm(C, rngs=rngs)
    self.flax_bn = nnx.BatchNorm(C, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    ys = [
      layer(x)
      for layer in (
        self.bn, self.ghost, self.torch, self.sn, self.renorm, self.b0, self.mabn
      )
    ]  # fmt: skip
    return self.dropout(sum(ys) + self.flax_bn(x))


def test_nnx_every_layer_gets_the_union_and_modes_come_back():
  batches = _batches(seed=4)
  model = NnxBranches(nnx.Rngs(0))
  model.eval()
  params = nnx.clone(nnx.state(model, nnx.Param))
  flax_stats = nnx.clone(nnx.state(model.flax_bn, nnx.BatchStat))
  jnx.recompute_batch_stats(model, batches, progress=False)
  stats = {
    name: {k: v[...] for k, v in nnx.state(getattr(model, name), nnx.BatchStat).items()}
    for name in ("bn", "ghost", "torch", "sn", "renorm", "b0", "mabn")
  }
  _check_union(stats, batches, list(stats))
  assert model.bn.use_running_average is True
  assert model.dropout.deterministic is True
  assert int(model.torch.num_batches_tracked[...]) == 0
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params)
  jax.tree.map(
    np.testing.assert_array_equal, nnx.state(model.flax_bn, nnx.BatchStat), flax_stats
  )
  assert "_jaxnorm_moments" not in vars(model.bn)


def test_nnx_bad_input():
  with pytest.raises(TypeError, match="`model`"):
    jnx.recompute_batch_stats(object(), [jnp.ones((2, C))])
  with pytest.raises(ValueError, match="no jaxnorm layer"):
    jnx.recompute_batch_stats(nnx.Linear(C, C, rngs=nnx.Rngs(0)), [jnp.ones((2, C))])
  bn = jnx.BatchNorm(C, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`batches` is empty"):
    jnx.recompute_batch_stats(bn, iter([]))
  assert bn.use_running_average is False


def test_nnx_union_spans_devices():
  mesh = jax.make_mesh((8,), ("data",))
  batches = [b.reshape(-1, C) for b in _batches((8, 16, 24), seed=5)]
  sharded = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
  mean, var, _, _ = _union(batches)

  # SPMD jit: no axis_name.
  bn = jnx.BatchNorm(C, rngs=nnx.Rngs(0))
  jnx.recompute_batch_stats(bn, sharded, progress=False)
  np.testing.assert_allclose(bn.var[...], var, rtol=2e-6)

  # axis_name under nnx.shard_map, every device its own shard.
  bn = jnx.BatchNorm(C, axis_name="data", rngs=nnx.Rngs(0))

  def forward(model, x):
    @nnx.shard_map(mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    def run(model, x):
      return model(x)

    return run(model, x)

  jnx.recompute_batch_stats(bn, sharded, progress=False, forward=forward)
  np.testing.assert_allclose(bn.mean[...], mean, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], var, rtol=2e-6)
