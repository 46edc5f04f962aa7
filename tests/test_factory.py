"""make_norm: every name builds the module it names, in linen and nnx."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm.linen as jnn
import jaxnorm.nnx as jnx

C = 8
X = jax.random.normal(jax.random.key(0), (4, 6, 6, C)) * 3.0 + 1.0

LINEN = {
  "batch": (jnn.BatchNorm, {}),
  "sync_batch": (jnn.BatchNorm, {"axis_name": "batch"}),
  "ghost_batch": (jnn.BatchNorm, {"virtual_batch_size": 2}),
  "layer": (jnn.LayerNorm, {}),
  "rms": (jnn.RMSNorm, {}),
  "group": (jnn.GroupNorm, {"num_groups": 2}),
  "instance": (jnn.InstanceNorm, {}),
  "frn": (jnn.FilterResponseNorm, {}),
  "switchable": (jnn.SwitchableNorm, {}),
  "batch_renorm": (jnn.BatchRenorm, {}),
  "mabn": (jnn.MovingAverageBatchNorm, {}),
  "evonorm_b0": (jnn.EvoNormB0, {}),
  "evonorm_s0": (jnn.EvoNormS0, {"num_groups": 2}),
  "frozen_batch": (jnn.FrozenBatchNorm, {}),
}

NNX = {
  "batch": jnx.BatchNorm,
  "sync_batch": jnx.BatchNorm,
  "ghost_batch": jnx.BatchNorm,
  "layer": jnx.LayerNorm,
  "rms": jnx.RMSNorm,
  "group": jnx.GroupNorm,
  "instance": jnx.InstanceNorm,
  "frn": jnx.FilterResponseNorm,
  "switchable": jnx.SwitchableNorm,
  "batch_renorm": jnx.BatchRenorm,
  "mabn": jnx.MovingAverageBatchNorm,
  "evonorm_b0": jnx.EvoNormB0,
  "evonorm_s0": jnx.EvoNormS0,
  "frozen_batch": jnx.FrozenBatchNorm,
}

_NEEDS_TRAIN_FLAG = {
  "batch",
  "sync_batch",
  "ghost_batch",
  "switchable",
  "batch_renorm",
  "mabn",
  "evonorm_b0",
}


def test_names_match_the_issue():
  assert set(jnn.NORM_NAMES) == set(LINEN) == set(jnx.NORM_NAMES) == set(NNX)


@pytest.mark.parametrize("name", sorted(LINEN))
def test_linen_make_norm_builds_the_named_module(name):
  cls, kwargs = LINEN[name]
  norm = jnn.make_norm(name, **kwargs)
  assert type(norm) is cls
  for key, value in kwargs.items():
    assert getattr(norm, key) == value
  if name == "sync_batch":
    return  # needs a bound axis; covered by the sync tests
  call = {"use_running_average": False} if name in _NEEDS_TRAIN_FLAG else {}
  variables = norm.init(jax.random.key(0), X, **call)
  y, _ = norm.apply(variables, X, mutable=True, **call)
  assert y.shape == X.shape
  assert np.all(np.isfinite(np.asarray(y)))


def test_linen_make_norm_in_a_model_switches_by_string():
  class Net(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(C, (3, 3))(x)
      kwargs = {"num_groups": 2} if self.norm == "group" else {}
      return jnn.make_norm(self.norm, **kwargs)(x)

  for norm in ("layer", "group", "instance"):
    variables = Net(norm).init(jax.random.key(1), X)
    assert Net(norm).apply(variables, X).shape == X.shape


@pytest.mark.parametrize("name", sorted(NNX))
def test_nnx_make_norm_builds_the_named_module(name):
  kwargs = {
    "sync_batch": {"axis_name": "batch"},
    "ghost_batch": {"virtual_batch_size": 2},
    "group": {"num_groups": 2},
    "evonorm_s0": {"num_groups": 2},
  }.get(name, {})
  norm = jnx.make_norm(name, C, rngs=nnx.Rngs(0), **kwargs)
  assert type(norm) is NNX[name]
  if name == "sync_batch":
    return
  if name in _NEEDS_TRAIN_FLAG:
    y = norm(X, use_running_average=False)
  else:
    y = norm(X)
  assert y.shape == X.shape
  assert np.all(np.isfinite(np.asarray(y)))


def test_linen_make_norm_passes_the_module_name():
  # `name` was make_norm's own first parameter: name="bn1" clashed with it.
  layer = jnn.make_norm("frozen_batch", name="bn1")
  assert layer.name == "bn1"

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnn.make_norm("batch", name="bn1", use_running_average=True)(x)

  variables = Net().init(jax.random.key(0), jnp.ones((4, 3)))
  assert set(variables["params"]) == {"bn1"}


def test_names_are_case_and_dash_insensitive():
  assert type(jnn.make_norm("Batch-Renorm")) is jnn.BatchRenorm


@pytest.mark.parametrize(
  "make", [jnn.make_norm, lambda n: jnx.make_norm(n, C, rngs=nnx.Rngs(0))]
)
def test_unknown_name_lists_known_ones(make):
  with pytest.raises(ValueError, match="name.*known names: batch, sync_batch"):
    make("bacth")


def test_sync_batch_needs_axis_name():
  with pytest.raises(ValueError, match="axis_name"):
    jnn.make_norm("sync_batch")
  with pytest.raises(ValueError, match="axis_name"):
    jnx.make_norm("sync_batch", C, rngs=nnx.Rngs(0))


def test_ghost_batch_needs_virtual_batch_size():
  with pytest.raises(ValueError, match="virtual_batch_size"):
    jnn.make_norm("ghost_batch")


def test_sync_batch_from_factory_reduces_across_devices():
  norm = jnn.make_norm("sync_batch", axis_name="batch")
  shards = jnp.stack([X * (i + 1.0) + i for i in range(4)])  # different shards
  variables = norm.init(jax.random.key(0), X, use_running_average=False)

  def step(x):
    _, updates = norm.apply(
      variables, x, use_running_average=False, mutable=["batch_stats"]
    )
    return updates["batch_stats"]["mean"]

  mean = jax.vmap(step, axis_name="batch")(shards)
  ref = 0.01 * np.asarray(shards, np.float64).reshape(-1, C).mean(0)
  np.testing.assert_allclose(
    np.asarray(mean), np.broadcast_to(ref, (4, C)), rtol=1e-5, atol=1e-6
  )
