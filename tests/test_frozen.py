"""Frozen batch norm (linen and nnx) and the freeze / unfreeze converters.

References: the formula in float64 NumPy, written out below; flax's own
``BatchNorm`` in evaluation mode with trained, non-trivial statistics; and
bit-exact identity for values that must not move (converters, training
steps with the layers frozen).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from flax.core import FrozenDict

import jaxnorm.linen as jnn
import jaxnorm.nnx as jnx

EPS = 1e-3
F32 = dict(rtol=1e-5, atol=1e-5)


def _values(shape, seed, use_scale=True, use_bias=True):
  """Non-trivial float32 mean, var, scale, bias of the feature ``shape``."""
  rng = np.random.default_rng(seed)
  out = {"mean": rng.normal(1.0, 2.0, shape), "var": rng.uniform(0.2, 4.0, shape)}
  if use_scale:
    out["scale"] = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
  if use_bias:
    out["bias"] = rng.normal(0.0, 1.0, shape)
  return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def _reference(x, values, axes, eps=EPS):
  """``(x - mean) / sqrt(var + eps) * scale + bias`` per channel, in float64.

  ``axes``: the feature axes of ``x`` (the values have the shape of ``x``
  there).
  """
  x = np.asarray(x, np.float64)
  axes = [a % x.ndim for a in np.atleast_1d(axes)]
  shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]

  def channel(name):
    return np.asarray(values[name], np.float64).reshape(shape)

  y = (x - channel("mean")) / np.sqrt(channel("var") + eps)
  if "scale" in values:
    y = y * channel("scale")
  if "bias" in values:
    y = y + channel("bias")
  return y


def _x(shape, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(1.0, 3.0, shape), jnp.float32).astype(dtype)


def _bits_equal(a, b):
  """Same tree (names, Variable types), same dtypes, same bits."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert jnp.dtype(u.dtype) == jnp.dtype(v.dtype)
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _signature(tree):
  return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)


def _snapshot(tree):
  """The arrays of ``tree`` now (nnx.state holds the live Variables)."""
  return [np.array(a) for a in jax.tree.leaves(tree)]


def _perturbed(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda a: (a + rng.uniform(0.1, 1.0, a.shape)).astype(a.dtype), tree
  )


# -- the layers against the formula -------------------------------------------

AFFINE_CASES = [
  (-1, True, True),
  (1, True, True),
  (-1, False, True),
  (1, True, False),
  (-1, False, False),
]


@pytest.mark.parametrize("axis, use_scale, use_bias", AFFINE_CASES)
def test_linen_matches_the_formula(axis, use_scale, use_bias):
  x = _x((4, 3, 5))
  bn = jnn.FrozenBatchNorm(
    axis=axis, epsilon=EPS, use_scale=use_scale, use_bias=use_bias
  )
  variables = bn.init(jax.random.key(0), x)
  assert "params" not in variables
  values = _values(x.shape[axis], 1, use_scale, use_bias)
  assert _signature(variables["batch_stats"]) == _signature(values)
  y = bn.apply({"batch_stats": values}, x, use_running_average=False)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), _reference(x, values, axis), **F32)


@pytest.mark.parametrize("axis, use_scale, use_bias", AFFINE_CASES)
def test_nnx_matches_the_formula(axis, use_scale, use_bias):
  x = _x((4, 3, 5))
  c = x.shape[axis]
  bn = jnx.FrozenBatchNorm(
    c, axis=axis, epsilon=EPS, use_scale=use_scale, use_bias=use_bias
  )
  assert (bn.scale is None) != use_scale and (bn.bias is None) != use_bias
  values = _values(c, 2, use_scale, use_bias)
  for name, value in values.items():
    getattr(bn, name)[...] = value
  y = bn(x, use_running_average=False)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), _reference(x, values, axis), **F32)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_linen_dtypes_and_feature_axes_like_batch_norm(dtype):
  # (C, W) features of an (N, C, W) input, bf16 input, float32 variables.
  x = _x((4, 3, 5), dtype=jnp.bfloat16)
  values = _values((3, 5), 3)
  stats = {k: values[k] for k in ("mean", "var")}
  affine = {k: values[k] for k in ("scale", "bias")}
  kwargs = dict(axis=(1, 2), epsilon=EPS, dtype=dtype)
  y = jnn.FrozenBatchNorm(**kwargs).apply({"batch_stats": values}, x)
  unfrozen = {"params": affine, "batch_stats": stats}
  y_jn = jnn.BatchNorm(use_running_average=True, **kwargs).apply(unfrozen, x)
  y_flax = nn.BatchNorm(use_running_average=True, **kwargs).apply(unfrozen, x)
  assert y.dtype == y_jn.dtype == y_flax.dtype == jnp.dtype(dtype or jnp.float32)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_jn))
  tol = F32 if dtype is None else dict(rtol=2e-2, atol=5e-2)
  y_ref = _reference(x, values, (1, 2))
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, **tol)
  np.testing.assert_allclose(
    np.asarray(y, np.float32), np.asarray(y_flax, np.float32), **tol
  )


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_nnx_dtypes_like_batch_norm(dtype):
  x = _x((6, 4), dtype=jnp.bfloat16)
  values = _values(4, 4)
  frozen = jnx.FrozenBatchNorm(4, epsilon=EPS, dtype=dtype)
  bn = jnx.BatchNorm(
    4, epsilon=EPS, dtype=dtype, use_running_average=True, rngs=nnx.Rngs(0)
  )
  for name, value in values.items():
    getattr(frozen, name)[...] = value
    getattr(bn, name)[...] = value
  y, y_bn = frozen(x), bn(x)
  assert y.dtype == y_bn.dtype == jnp.dtype(dtype or jnp.float32)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_bn))
  tol = F32 if dtype is None else dict(rtol=2e-2, atol=5e-2)
  np.testing.assert_allclose(
    np.asarray(y, np.float32), _reference(x, values, -1), **tol
  )


# -- against flax's BatchNorm, trained ----------------------------------------


class LinenNet(nn.Module):
  norm: Any = nn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = self.norm(momentum=0.5, epsilon=EPS, name="bn")(
      x, use_running_average=not train
    )
    return nn.Dense(2)(nn.relu(x))


def _mse(out, y):
  return jnp.mean((out - y) ** 2)


@functools.cache
def _trained_linen():
  """A flax.linen BatchNorm model after 3 SGD steps: trained statistics,
  scale and bias."""
  x, y = _x((16, 4), 5), _x((16, 2), 6)
  model = LinenNet()
  variables = model.init(jax.random.key(0), x, train=False)
  tx = optax.sgd(0.2)

  @jax.jit
  def step(variables, opt_state):
    def loss_fn(params):
      out, new = model.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      return _mse(out, y), new

    grads, new = jax.grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state)
    return {**new, "params": optax.apply_updates(variables["params"], updates)}, (
      opt_state
    )

  opt_state = tx.init(variables["params"])
  for _ in range(3):
    variables, opt_state = step(variables, opt_state)
  bn_vars = [variables["params"]["bn"], variables["batch_stats"]["bn"]]
  trivial_values = [np.zeros(6), np.ones(6), np.zeros(6), np.ones(6)]  # b, s, m, v
  for a, trivial in zip(jax.tree.leaves(bn_vars), trivial_values, strict=True):
    assert np.abs(np.asarray(a) - trivial).min() > 1e-4  # all four trained
  return variables, x


def test_linen_frozen_model_equals_flax_batch_norm_in_eval():
  variables, x = _trained_linen()
  frozen = jnn.freeze_batch_norm(variables)
  frozen_model = LinenNet(norm=jnn.FrozenBatchNorm)
  # Exactly the variables the frozen model creates: no BN entry in params.
  init = frozen_model.init(jax.random.key(1), x, train=False)
  assert _signature(frozen) == _signature(init)
  assert sorted(frozen["params"]) == ["Dense_0", "Dense_1"]
  y_flax = LinenNet().apply(variables, x, train=False)
  y_jn = LinenNet(norm=jnn.BatchNorm).apply(variables, x, train=False)
  for train in (False, True):  # `use_running_average=not train` is ignored
    y = frozen_model.apply(frozen, x, train=train)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_flax), **F32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_jn))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 6, rngs=rngs)
    self.bn = nnx.BatchNorm(6, momentum=0.5, epsilon=EPS, rngs=rngs)
    self.head = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.bn(self.linear(x))))


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(lambda m: _mse(m(x), y))(model)
  optimizer.update(model, grads)
  return loss, grads


@functools.cache
def _trained_nnx():
  """A flax.nnx BatchNorm model after 3 SGD steps, as (graphdef, state)."""
  x, y = _x((16, 4), 5), _x((16, 2), 6)
  model = NnxNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.2), wrt=nnx.Param)
  for _ in range(3):
    _nnx_step(model, optimizer, x, y)
  assert np.abs(np.asarray(model.bn.scale[...]) - 1.0).min() > 1e-4
  assert np.abs(np.asarray(model.bn.mean[...])).min() > 1e-4
  return nnx.split(model), x, y


def _fresh_nnx():
  (graphdef, state), x, y = _trained_nnx()
  return nnx.merge(graphdef, state), x, y


def test_nnx_frozen_model_equals_flax_batch_norm_in_eval():
  model, x, _ = _fresh_nnx()
  flax_bn = model.bn
  model.eval()
  y_flax = model(x)
  jn_bn = jnx.BatchNorm(6, epsilon=EPS, use_running_average=True, rngs=nnx.Rngs(1))
  nnx.update(jn_bn, nnx.state(flax_bn))
  h = model.linear(x)
  assert jnx.freeze_batch_norm(model) == 1
  assert type(model.bn) is jnx.FrozenBatchNorm
  assert "bn" not in nnx.state(model, nnx.Param)
  assert len(nnx.state(model.bn, nnx.Param)) == 0
  assert len(nnx.state(model.bn, nnx.BatchStat)) == 4
  for mode in (model.train, model.eval):  # the mode is ignored
    mode()
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(y_flax), **F32)
    np.testing.assert_array_equal(np.asarray(model.bn(h)), np.asarray(jn_bn(h)))


# -- gradients flow to x, nothing moves ----------------------------------------


def _grad_reference(values, w):
  """d/dx of sum(w * y): w * scale / sqrt(var + eps) per channel."""
  per_channel = np.asarray(values["scale"], np.float64) / np.sqrt(
    np.asarray(values["var"], np.float64) + EPS
  )
  return np.asarray(w, np.float64) * per_channel


def test_linen_gradients_flow_and_statistics_never_change():
  x, w = _x((8, 5), 7), _x((8, 5), 8)
  values = _values(5, 9)
  bn = jnn.FrozenBatchNorm(epsilon=EPS)
  variables = {"batch_stats": values}

  def loss(x):
    y, updates = bn.apply(
      variables, x, use_running_average=False, mutable=["batch_stats"]
    )
    return jnp.sum(w * y), updates

  grad, updates = jax.jit(jax.grad(loss, has_aux=True))(x)
  np.testing.assert_allclose(np.asarray(grad), _grad_reference(values, w), **F32)
  _bits_equal(updates, variables)


def test_nnx_gradients_flow_and_statistics_never_change():
  x, w = _x((8, 5), 7), _x((8, 5), 8)
  values = _values(5, 9)
  bn = jnx.FrozenBatchNorm(5, epsilon=EPS)
  for name, value in values.items():
    getattr(bn, name)[...] = value
  before = _snapshot(nnx.state(bn))

  @nnx.jit
  def grad_x(bn, x):
    return jax.grad(lambda x: jnp.sum(w * bn(x, use_running_average=False)))(x)

  bn.train()
  for _ in range(2):
    grad = grad_x(bn, x)
  np.testing.assert_allclose(np.asarray(grad), _grad_reference(values, w), **F32)
  for a, b in zip(before, _snapshot(nnx.state(bn)), strict=True):
    np.testing.assert_array_equal(a, b)
  # nnx.grad differentiates nnx.Param: the frozen layer has none.
  grads = nnx.grad(lambda m: jnp.sum(m(x)))(bn)
  assert len(grads) == 0


# -- converters -----------------------------------------------------------------


class Block(nn.Module):
  norm: Any = jnn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(4)(x)
    x = self.norm(name="bn_full")(x, use_running_average=not train)
    x = self.norm(use_scale=False, name="bn_no_scale")(x, not train)
    return self.norm(use_bias=False, name="bn_no_bias")(x, not train)


class LinenModel(nn.Module):
  backbone_norm: Any = jnn.BatchNorm
  head_norm: Any = jnn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Block(self.backbone_norm, name="backbone")(x, train)
    x = self.head_norm(use_scale=False, use_bias=False, name="bn_plain")(x, not train)
    return nn.Dense(3, name="head")(x)


@functools.cache
def _linen_variables():
  x = _x((6, 5), 10)
  variables = LinenModel().init(jax.random.key(0), x)
  return _perturbed(variables, 11), x


def test_linen_freeze_unfreeze_round_trip():
  variables, x = _linen_variables()
  original = jax.tree.map(np.array, variables)
  frozen = jnn.freeze_batch_norm(variables)
  _bits_equal(variables, original)  # the input is not modified
  frozen_model = LinenModel(jnn.FrozenBatchNorm, jnn.FrozenBatchNorm)
  init = frozen_model.init(jax.random.key(1), x)
  assert _signature(frozen) == _signature(init)
  assert set(frozen["params"]) == {"backbone", "head"}
  assert set(frozen["params"]["backbone"]) == {"Dense_0"}
  _bits_equal(jnn.unfreeze_batch_norm(frozen), variables)
  _bits_equal(jnn.freeze_batch_norm(jnn.unfreeze_batch_norm(frozen)), frozen)
  _bits_equal(jnn.freeze_batch_norm(frozen), frozen)  # idempotent
  # Same outputs as the BatchNorm model in evaluation mode.
  y = frozen_model.apply(frozen, x, train=True)
  y_bn = LinenModel().apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_bn))
  # A FrozenDict comes back as a FrozenDict.
  frozen_fd = jnn.freeze_batch_norm(FrozenDict(variables))
  assert isinstance(frozen_fd, FrozenDict)
  _bits_equal(frozen_fd.unfreeze(), frozen)
  assert isinstance(jnn.unfreeze_batch_norm(frozen_fd), FrozenDict)


def test_linen_where_freezes_part_of_a_model():
  variables, x = _linen_variables()
  frozen = jnn.freeze_batch_norm(variables, where=lambda path: path[0] == "backbone")
  part_model = LinenModel(backbone_norm=jnn.FrozenBatchNorm)
  init = part_model.init(jax.random.key(1), x)
  assert _signature(frozen) == _signature(init)
  y = part_model.apply(frozen, x, train=False)
  y_bn = LinenModel().apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_bn))
  back = jnn.unfreeze_batch_norm(frozen, where=lambda path: path == ("bn_plain",))
  _bits_equal(back, frozen)  # bn_plain has nothing to move
  _bits_equal(jnn.unfreeze_batch_norm(frozen), variables)


class Sub(jnx.BatchNorm):
  """A subclass may change the maths: freeze_batch_norm leaves it alone."""


class NnxModel(nnx.Module):
  def __init__(self, rngs):
    self.backbone = nnx.Sequential(
      nnx.Linear(5, 4, rngs=rngs), nnx.BatchNorm(4, momentum=0.8, rngs=rngs)
    )
    self.attr = jnx.BatchNorm(4, use_scale=False, epsilon=1e-2, rngs=rngs)
    self.shared = self.attr
    self.items = nnx.List([jnx.BatchNorm(4, use_bias=False, rngs=rngs)])
    self.table = nnx.Dict(
      plain=jnx.BatchNorm(4, use_scale=False, use_bias=False, rngs=rngs)
    )
    self.python_list = nnx.data([jnx.BatchNorm(4, axis=1, rngs=rngs)])
    self.python_dict = nnx.data({"b": jnx.BatchNorm(4, rngs=rngs)})
    self.sub = Sub(4, rngs=rngs)
    self.renorm = jnx.BatchRenorm(4, rngs=rngs)


def test_nnx_freeze_unfreeze_round_trip_in_every_container():
  model = NnxModel(nnx.Rngs(0))
  nnx.update(model, _perturbed(nnx.state(model), 12))
  state = nnx.state(model)
  before = jax.tree.map(np.array, state)
  assert jnx.freeze_batch_norm(model) == 6  # attr and shared: one layer
  layers = [
    model.backbone.layers[1],
    model.attr,
    model.items[0],
    model.table["plain"],
    model.python_list[0],
    model.python_dict["b"],
  ]
  assert all(type(m) is jnx.FrozenBatchNorm for m in layers)
  assert model.shared is model.attr
  assert type(model.sub) is Sub and type(model.renorm) is jnx.BatchRenorm
  params = nnx.state(model, nnx.Param)
  assert set(params) == {"backbone", "sub", "renorm"}
  assert set(params["backbone"]["layers"]) == {0}
  assert model.backbone.layers[1].momentum == 0.8 and model.attr.epsilon == 1e-2
  assert jnx.freeze_batch_norm(model) == 0
  assert jnx.unfreeze_batch_norm(model) == 6
  assert type(model.backbone.layers[1]) is jnx.BatchNorm  # flax's: jaxnorm's
  assert model.shared is model.attr
  _bits_equal(nnx.state(model), before)  # names, Variable types, bits


def test_nnx_round_trip_gives_back_the_same_module():
  model = nnx.Sequential(
    jnx.BatchNorm(3, momentum=0.7, axis=1, rngs=nnx.Rngs(0)),
    jnx.BatchNorm(3, use_running_average=True, virtual_batch_size=2, rngs=nnx.Rngs(0)),
  )
  nnx.update(model, _perturbed(nnx.state(model), 13))
  graphdef, state = nnx.split(model)
  before = jax.tree.map(np.array, state)
  assert jnx.freeze_batch_norm(model) == 2
  assert jnx.unfreeze_batch_norm(model) == 2
  graphdef2, state2 = nnx.split(model)
  assert graphdef2 == graphdef  # every setting carried over
  _bits_equal(state2, before)


def _np_eval(x, scale, bias, mean, var, eps=1e-5):
  x, scale, bias, mean, var = (np.float64(a) for a in (x, scale, bias, mean, var))
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_nnx_torch_statistics_survive_a_round_trip():
  # Unfreezing used to give back running_stats="flax" with momentum=0.1 kept:
  # the next training step then moved the running mean 90% of the way.
  rng = np.random.default_rng(3)
  model = nnx.Sequential(
    jnx.BatchNorm(2, running_stats="torch", momentum=0.1, rngs=nnx.Rngs(0))
  )
  for _ in range(3):
    model(jnp.asarray(rng.normal(1.0, 2.0, (8, 2)), jnp.float32))
  graphdef, state = nnx.split(model)
  before = jax.tree.map(np.array, state)
  assert jnx.freeze_batch_norm(model) == 1
  frozen = model.layers[0]
  assert frozen.running_stats == "torch" and int(frozen.num_batches_tracked[...]) == 3
  x = jnp.asarray(rng.normal(1.0, 2.0, (8, 2)), jnp.float32)
  bn = before["layers"][0]
  expected = _np_eval(x, *(bn[k][...] for k in ("scale", "bias", "mean", "var")))
  np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-5)
  assert jnx.unfreeze_batch_norm(model) == 1
  graphdef2, state2 = nnx.split(model)
  assert graphdef2 == graphdef
  _bits_equal(state2, before)
  # One more training step follows PyTorch's convention, by hand:
  # mean <- (1 - 0.1) mean + 0.1 batch mean, var with the unbiased batch var.
  model(x)
  x64 = np.float64(x)
  np.testing.assert_allclose(
    np.asarray(model.layers[0].mean[...]),
    0.9 * bn["mean"][...] + 0.1 * x64.mean(0),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    np.asarray(model.layers[0].var[...]),
    0.9 * bn["var"][...] + 0.1 * x64.var(0, ddof=1),
    rtol=1e-5,
  )
  assert int(model.layers[0].num_batches_tracked[...]) == 4


def test_linen_freezes_torch_statistics_batch_norm():
  rng = np.random.default_rng(4)
  bn = jnn.BatchNorm(use_running_average=False, running_stats="torch", momentum=0.1)
  x = jnp.asarray(rng.normal(1.0, 2.0, (8, 2)), jnp.float32)
  variables = bn.init(jax.random.key(0), x)
  variables = {**variables, "params": _perturbed(variables["params"], 5)}
  for _ in range(3):
    _, updates = bn.apply(variables, x * 1.5 - 0.5, mutable=["batch_stats"])
    variables = {**variables, **updates}
  frozen = jnn.freeze_batch_norm(variables)
  assert "params" not in frozen  # recognised as a batch norm and frozen
  layer = jnn.FrozenBatchNorm(running_stats="torch")
  assert _signature(frozen) == _signature(layer.init(jax.random.key(1), x))
  p, st = variables["params"], variables["batch_stats"]
  expected = _np_eval(x, p["scale"], p["bias"], st["mean"], st["var"])
  np.testing.assert_allclose(np.asarray(layer.apply(frozen, x)), expected, rtol=1e-5)
  _bits_equal(jnn.unfreeze_batch_norm(frozen), variables)


def test_nnx_where_train_eval_and_view():
  model, x, _ = _fresh_nnx()
  assert jnx.freeze_batch_norm(model, where=nnx.PathContains("linear")) == 0
  assert jnx.freeze_batch_norm(model, where=lambda path, m: path == ("bn",)) == 1
  model.train()
  assert model.bn.use_running_average is False  # kept, ignored
  view = nnx.view(model, use_running_average=True)
  np.testing.assert_array_equal(np.asarray(view(x)), np.asarray(model(x)))
  model.eval()
  assert jnx.unfreeze_batch_norm(model) == 1
  assert model.bn.use_running_average is True  # the current mode comes back


# -- make_norm ------------------------------------------------------------------


def test_make_norm_frozen_batch():
  x = _x((4, 6), 14)
  norm = jnn.make_norm("frozen_batch", momentum=0.9, epsilon=EPS)
  assert type(norm) is jnn.FrozenBatchNorm and norm.epsilon == EPS
  variables = norm.init(jax.random.key(0), x, use_running_average=False)
  assert list(variables) == ["batch_stats"]
  trivial = {
    "mean": np.zeros(6),
    "var": np.ones(6),
    "scale": np.ones(6),
    "bias": np.zeros(6),
  }
  y_ref = _reference(x, trivial, -1)
  np.testing.assert_allclose(np.asarray(norm.apply(variables, x)), y_ref, **F32)
  nnx_norm = jnx.make_norm("Frozen-Batch", 6, rngs=nnx.Rngs(0), epsilon=EPS)
  assert type(nnx_norm) is jnx.FrozenBatchNorm
  assert len(nnx.state(nnx_norm, nnx.Param)) == 0
  np.testing.assert_allclose(np.asarray(nnx_norm(x)), y_ref, **F32)
  assert "frozen_batch" in jnn.NORM_NAMES and "frozen_batch" in jnx.NORM_NAMES


# -- bad input --------------------------------------------------------------------


def test_linen_errors_name_the_argument():
  variables, x = _linen_variables()
  with pytest.raises(TypeError, match="`variables`"):
    jnn.freeze_batch_norm([variables])
  with pytest.raises(ValueError, match="`variables`.*not `params` alone"):
    jnn.freeze_batch_norm(variables["params"])
  with pytest.raises(TypeError, match="`where`"):
    jnn.unfreeze_batch_norm(variables, where="backbone")
  bad = {
    "params": {"bn": {"scale": jnp.ones(3), "bias": jnp.zeros(4)}},
    "batch_stats": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}},
  }
  with pytest.raises(ValueError, match="`variables` at 'bn'.*shapes differ"):
    jnn.freeze_batch_norm(bad)
  frozen = jnn.FrozenBatchNorm().init(jax.random.key(0), jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="`axis`"):
    jnn.FrozenBatchNorm(axis=2).apply(frozen, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"`batch_stats/mean` has shape \(3,\)"):
    jnn.FrozenBatchNorm().apply(frozen, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="`epsilon`"):
    jnn.FrozenBatchNorm(epsilon=-1.0).apply(frozen, jnp.ones((2, 3)))
  with pytest.raises(TypeError, match="`mask`"):
    jnn.FrozenBatchNorm().apply(frozen, jnp.ones((2, 3)), mask=jnp.ones((2, 3)))


def test_nnx_errors_name_the_argument():
  bn = jnx.BatchNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="`model`"):
    jnx.freeze_batch_norm({"bn": bn})
  with pytest.raises(TypeError, match="`model`"):
    jnx.unfreeze_batch_norm(nnx.state(bn))
  with pytest.raises(ValueError, match="`model` is itself a BatchNorm"):
    jnx.freeze_batch_norm(bn)
  with pytest.raises(TypeError, match="`where`"):
    jnx.freeze_batch_norm(nnx.Sequential(bn), where=3)
  in_tuple = nnx.Sequential(bn)
  in_tuple.pair = nnx.data((jnx.BatchNorm(3, rngs=nnx.Rngs(0)),))
  with pytest.raises(ValueError, match=r"`model` path \('pair', 0\).*tuple"):
    jnx.freeze_batch_norm(in_tuple)
  with pytest.raises(TypeError, match="`bn`"):
    jnx.FrozenBatchNorm.from_batch_norm(nnx.LayerNorm(3, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match="`num_features`"):
    jnx.FrozenBatchNorm("3")
  with pytest.raises(ValueError, match="`scale_init` needs a random key"):
    jnx.FrozenBatchNorm(3, scale_init=nnx.initializers.normal())
  assert jnx.FrozenBatchNorm(3, scale_init=nnx.initializers.normal(), rngs=nnx.Rngs(0))
  frozen = jnx.FrozenBatchNorm(3)
  with pytest.raises(ValueError, match=r"`mean` has shape \(3,\) \(`num_features`=3"):
    frozen(jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="`axis`"):
    jnx.FrozenBatchNorm(3, axis=2)(jnp.ones((2, 3)))


# -- optax recipes ----------------------------------------------------------------


def test_optax_recipe_multi_transform_keeps_batch_norm_fixed():
  """Linen: keep BatchNorm, fix its statistics (use_running_average=True) and
  zero the updates to its scale and bias (labels by path)."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(4)(x)
      x = nn.BatchNorm(use_running_average=True, name="fixed_bn")(x)
      x = nn.Dense(4)(nn.relu(x))
      x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
      return nn.Dense(2)(nn.relu(x))

  x, y = _x((16, 3), 15), _x((16, 2), 16)
  v0 = Net().init(jax.random.key(0), x, train=False)
  v0 = {**v0, "params": _perturbed(v0["params"], 17)}
  label = lambda path, _: "fixed" if path[0] == "fixed_bn" else "train"  # noqa: E731
  labels = traverse_util.path_aware_map(label, v0["params"])
  tx = optax.multi_transform(
    {"train": optax.adamw(1e-2, weight_decay=0.1), "fixed": optax.set_to_zero()},
    labels,
  )

  @jax.jit
  def step(variables, opt_state):
    def loss_fn(params):
      out, new = Net().apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      return _mse(out, y), new

    grads, new = jax.grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    params = optax.apply_updates(variables["params"], updates)
    return {**new, "params": params}, opt_state

  variables, opt_state = v0, tx.init(v0["params"])
  for _ in range(3):
    variables, opt_state = step(variables, opt_state)
  for collection in ("params", "batch_stats"):
    _bits_equal(variables[collection]["fixed_bn"], v0[collection]["fixed_bn"])
    for name in ("bn",) + (
      ("Dense_0", "Dense_1", "Dense_2") if collection == "params" else ()
    ):
      for a, b in zip(
        jax.tree.leaves(variables[collection][name]),
        jax.tree.leaves(v0[collection][name]),
        strict=True,
      ):
        assert np.abs(np.asarray(a) - np.asarray(b)).min() > 0  # every entry moved


def test_optax_recipe_freeze_part_of_an_nnx_model():
  """nnx: freeze the backbone's BN; the optimizer only holds nnx.Param."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.backbone = nnx.Sequential(
        nnx.Linear(4, 6, rngs=rngs), nnx.BatchNorm(6, momentum=0.5, rngs=rngs)
      )
      self.head = nnx.Sequential(
        nnx.Linear(6, 2, rngs=rngs), jnx.BatchNorm(2, momentum=0.5, rngs=rngs)
      )

    def __call__(self, x):
      return self.head(nnx.relu(self.backbone(x)))

  model = Net(nnx.Rngs(0))
  nnx.update(model, _perturbed(nnx.state(model), 18))
  x, y = _x((16, 4), 19), _x((16, 2), 20)
  assert jnx.freeze_batch_norm(model, where=nnx.PathContains("backbone")) == 1
  frozen_before = _snapshot(nnx.state(model.backbone.layers[1]))
  rest_before = _snapshot(nnx.state(model, nnx.Not(nnx.PathContains("backbone"))))
  linear_before = _snapshot(nnx.state(model.backbone.layers[0]))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.Param)
  model.train()
  for _ in range(3):
    _, grads = _nnx_step(model, optimizer, x, y)
  assert "layers" in grads["backbone"] and 1 not in grads["backbone"]["layers"]
  for a, b in zip(
    frozen_before, _snapshot(nnx.state(model.backbone.layers[1])), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  moved = rest_before + linear_before
  now = _snapshot(nnx.state(model, nnx.Not(nnx.PathContains("backbone"))))
  now += _snapshot(nnx.state(model.backbone.layers[0]))
  for a, b in zip(moved, now, strict=True):
    assert np.abs(a - b).min() > 0  # every entry moved (head BN statistics too)
