"""``running_stats="torch"``: PyTorch's running statistics, step by step.

References: ``torch.nn.BatchNorm1d/2d`` themselves, and for the sync path
``SyncBatchNorm``'s formula (the statistics of the concatenated batch, the
running variance unbiased with the count over every device), which is what
``torch.nn.BatchNorm2d`` computes on the concatenated batch.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
import jaxnorm.linen as jnn
import jaxnorm.nnx as jnx

torch.set_num_threads(1)


def _batches(steps, shape, seed=0):
  rng = np.random.default_rng(seed)
  return [
    (rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.uniform(-2, 2)).astype(
      np.float32
    )
    for _ in range(steps)
  ]


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_functional_matches_torch_batchnorm2d(momentum):
  torch_bn = torch.nn.BatchNorm2d(3, momentum=momentum)
  params, state = jn.batch_norm_init(3, running_stats="torch")
  step = jax.jit(
    functools.partial(
      jn.batch_norm,
      use_running_average=False,
      axis=1,
      momentum=momentum,
      running_stats="torch",
    )
  )
  for x in _batches(5, (4, 3, 5, 6)):
    y_torch = torch_bn(torch.from_numpy(x)).detach().numpy()
    y, state = step(jnp.asarray(x), params, state)
    np.testing.assert_allclose(y, y_torch, atol=2e-6)
    np.testing.assert_allclose(state.mean, torch_bn.running_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state.var, torch_bn.running_var, rtol=2e-6)
    assert int(state.num_batches_tracked) == int(torch_bn.num_batches_tracked)
  assert state.num_batches_tracked.dtype == jnp.int32
  torch_bn.eval()
  x = _batches(1, (2, 3, 5, 6), seed=9)[0]
  y_eval, same = jn.batch_norm(
    x, params, state, use_running_average=True, axis=1, running_stats="torch"
  )
  assert same is state
  np.testing.assert_allclose(
    y_eval, torch_bn(torch.from_numpy(x)).detach().numpy(), atol=2e-6
  )


def test_linen_and_nnx_match_torch_batchnorm1d():
  torch_bn = torch.nn.BatchNorm1d(5, momentum=None)
  linen_bn = jnn.BatchNorm(momentum=None, running_stats="torch")
  nnx_bn = jnx.BatchNorm(5, momentum=None, running_stats="torch", rngs=nnx.Rngs(0))
  batches = _batches(4, (7, 5), seed=1)
  variables = linen_bn.init(jax.random.key(0), batches[0], use_running_average=True)
  assert variables["batch_stats"]["num_batches_tracked"].dtype == jnp.int32
  for x in batches:
    torch_bn(torch.from_numpy(x))
    _, updates = linen_bn.apply(
      variables, x, use_running_average=False, mutable=["batch_stats"]
    )
    variables = {**variables, **updates}
    nnx_bn(jnp.asarray(x))
  for stats in (variables["batch_stats"], nnx.state(nnx_bn, nnx.BatchStat)):
    np.testing.assert_allclose(stats["mean"][...], torch_bn.running_mean, atol=1e-6)
    np.testing.assert_allclose(stats["var"][...], torch_bn.running_var, rtol=2e-6)
    assert int(stats["num_batches_tracked"][...]) == 4


def _torch_concat_reference(shards, momentum, steps):
  torch_bn = torch.nn.BatchNorm2d(shards.shape[-1], momentum=momentum)
  for _ in range(steps):
    # NHWC shards to one NCHW batch: the union SyncBatchNorm normalizes.
    whole = np.concatenate(list(shards)).transpose(0, 3, 1, 2)
    torch_bn(torch.from_numpy(np.ascontiguousarray(whole)))
  return torch_bn


def test_sync_shard_map_counts_every_device():
  # Every device its own data, of its own scale: a sync path that forgot
  # its collective or counted one device's n would not match.
  devices = jax.devices()[:8]
  rng = np.random.default_rng(3)
  shards = np.stack(
    [rng.normal(size=(2, 3, 3, 4)) * (1 + i) + i for i in range(8)]
  ).astype(np.float32)
  torch_bn = _torch_concat_reference(shards, 0.1, steps=2)
  mesh = jax.make_mesh((8,), ("data",), devices=devices)
  params, state = jn.batch_norm_init(4, running_stats="torch")

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=P()
  )
  def step(x, params, state):
    _, state = jn.batch_norm(
      x[0],
      params,
      state,
      use_running_average=False,
      momentum=0.1,
      axis_name="data",
      running_stats="torch",
    )
    return state

  sharded = jax.device_put(shards, jax.sharding.NamedSharding(mesh, P("data")))
  for _ in range(2):
    state = step(sharded, params, state)
  np.testing.assert_allclose(state.mean, torch_bn.running_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.var, torch_bn.running_var, rtol=1e-5)
  assert int(state.num_batches_tracked) == 2


def test_spmd_jit_sharded_batch_counts_every_shard():
  rng = np.random.default_rng(4)
  shards = np.stack(
    [rng.normal(size=(2, 3, 3, 4)) * (1 + i) + i for i in range(8)]
  ).astype(np.float32)
  torch_bn = _torch_concat_reference(shards, None, steps=1)
  mesh = jax.make_mesh((8,), ("data",))
  x = jax.device_put(
    np.concatenate(list(shards)), jax.sharding.NamedSharding(mesh, P("data"))
  )
  params, state = jn.batch_norm_init(4, running_stats="torch")
  _, state = jax.jit(
    functools.partial(
      jn.batch_norm, use_running_average=False, momentum=None, running_stats="torch"
    )
  )(x, params, state)
  np.testing.assert_allclose(state.mean, torch_bn.running_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.var, torch_bn.running_var, rtol=1e-5)


def test_masked_elements_do_not_count():
  x = _batches(1, (10, 3), seed=5)[0]
  mask = np.arange(10)[:, None] < 7
  params, state = jn.batch_norm_init(3, running_stats="torch")
  _, new = jn.batch_norm(
    x,
    params,
    state,
    use_running_average=False,
    momentum=0.1,
    mask=mask,
    running_stats="torch",
  )
  kept = x[:7].astype(np.float64)
  np.testing.assert_allclose(new.mean, 0.1 * kept.mean(0), rtol=1e-5)
  np.testing.assert_allclose(new.var, 0.9 + 0.1 * kept.var(0, ddof=1), rtol=1e-5)


def test_empty_batch_changes_nothing():
  x = _batches(1, (6, 3), seed=6)[0]
  params, state = jn.batch_norm_init(3, running_stats="torch")
  state = state._replace(num_batches_tracked=jnp.int32(5))
  _, new = jn.batch_norm(
    x,
    params,
    state,
    use_running_average=False,
    momentum=None,
    mask=np.zeros((6, 1), bool),
    running_stats="torch",
  )
  for a, b in zip(new, state, strict=True):
    np.testing.assert_array_equal(a, b)


def test_bad_arguments():
  x = jnp.ones((4, 3))
  params, state = jn.batch_norm_init(3)
  with pytest.raises(ValueError, match="`running_stats`"):
    jn.batch_norm_init(3, running_stats="pytorch")
  with pytest.raises(TypeError, match="TorchBatchNormState"):
    jn.batch_norm(x, params, state, use_running_average=False, running_stats="torch")
  _, torch_state = jn.batch_norm_init(3, running_stats="torch")
  with pytest.raises(ValueError, match="`virtual_batch_size`"):
    jn.batch_norm(
      x,
      params,
      torch_state,
      use_running_average=False,
      running_stats="torch",
      virtual_batch_size=2,
    )
  with pytest.raises(TypeError, match="`momentum`"):
    jn.batch_norm(x, params, state, use_running_average=False, momentum=None)
  with pytest.raises(ValueError, match="`momentum`"):
    jn.batch_norm(
      x, params, torch_state, use_running_average=False, momentum=1.5,
      running_stats="torch",
    )  # fmt: skip
  with pytest.raises(ValueError, match="`running_stats`"):
    jnn.BatchNorm(running_stats="torchh").init(
      jax.random.key(0), x, use_running_average=True
    )
  with pytest.raises(ValueError, match="`running_stats`"):
    jnx.BatchNorm(3, running_stats="", rngs=nnx.Rngs(0))
