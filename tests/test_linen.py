"""jaxnorm.linen against flax.linen: the drop-in claim.

Every case builds flax's module and jaxnorm's with the same arguments, checks
that ``init`` creates the same variables (collections, names, shapes, dtypes,
values), then runs jaxnorm's module on FLAX's variables (a checkpoint from
flax, unchanged) and compares outputs and updated ``batch_stats``, in
training and in evaluation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnorm.linen as jnn

F32 = dict(rtol=1e-5, atol=1e-5)
LOW = dict(rtol=2e-2, atol=2e-2)  # bf16 has 8 bits of mantissa

# Everything runs under jit: in eager mode every primitive compiles on its
# own for every new shape, which is most of a test's time on CPU.


def _init(module, x, *args, **kwargs):
  return jax.jit(lambda k, x: module.init(k, x, *args, **kwargs))(jax.random.key(42), x)


def _apply(module, variables, x, *args, **kwargs):
  return jax.jit(lambda v, x: module.apply(v, x, *args, **kwargs))(variables, x)


def _data(shape, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = 2.0 * rng.standard_normal(shape) + 1.0
  if jnp.issubdtype(dtype, jnp.complexfloating):
    x = x + 1j * (2.0 * rng.standard_normal(shape) + 0.5)
  return jnp.asarray(
    x.astype(np.complex64 if np.iscomplexobj(x) else np.float32)
  ).astype(dtype)


def _signature(tree):
  return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)


def _np(a):
  a = np.asarray(a)
  return a if np.iscomplexobj(a) else a.astype(np.float32)


def _close(actual, expected, tol):
  assert jnp.dtype(actual.dtype) == jnp.dtype(expected.dtype)
  np.testing.assert_allclose(_np(actual), _np(expected), **tol)


def _check_init(flax_mod, jn_mod, x, **kwargs):
  """Same variables, built from the same RNG, as flax's module."""
  vf = _init(flax_mod, x, **kwargs)
  vj = _init(jn_mod, x, **kwargs)
  assert jax.tree.structure(vf) == jax.tree.structure(vj)
  assert _signature(vf) == _signature(vj)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(_np(a), _np(b)), vf, vj)
  return vf


def _perturb(variables):
  """Non-trivial params and running stats, as in a trained checkpoint."""
  rng = np.random.default_rng(7)
  return jax.tree.map(
    lambda v: jnp.asarray(
      _np(v) + 0.3 * rng.uniform(0.1, 1.0, v.shape).astype(np.float32)
    ).astype(v.dtype),
    variables,
  )


# --------------------------------------------------------------------------
# BatchNorm


BN_CASES = {
  "default": ({}, (8, 5, 6), jnp.float32),
  "nchw": ({"axis": 1}, (4, 3, 5, 5), jnp.float32),
  "tuple_axis": ({"axis": (1, 3)}, (4, 3, 2, 5), jnp.float32),
  "no_scale": ({"use_scale": False}, (8, 6), jnp.float32),
  "no_bias": ({"use_bias": False}, (8, 6), jnp.float32),
  "no_affine": ({"use_scale": False, "use_bias": False}, (8, 6), jnp.float32),
  "eps_momentum": ({"epsilon": 1e-2, "momentum": 0.8}, (8, 6), jnp.float32),
  "slow_variance": ({"use_fast_variance": False}, (8, 6), jnp.float32),
  "random_init": (
    {
      "scale_init": nn.initializers.normal(1.0),
      "bias_init": nn.initializers.normal(1.0),
    },
    (8, 6),
    jnp.float32,
  ),
  "rank5": ({}, (2, 3, 2, 2, 4), jnp.float32),
  "rank2_nc": ({"axis": 1}, (16, 3), jnp.float32),
  "dtype_bf16": ({"dtype": jnp.bfloat16}, (8, 6), jnp.float32),
  "param_bf16": ({"param_dtype": jnp.bfloat16}, (8, 6), jnp.float32),
  "input_bf16": ({}, (8, 6), jnp.bfloat16),
  "input_bf16_no_affine": (
    {"use_scale": False, "use_bias": False},
    (8, 6),
    jnp.bfloat16,
  ),
  "input_f16": ({}, (8, 6), jnp.float16),
  "no_f32_reductions": ({"force_float32_reductions": False}, (8, 6), jnp.float32),
  "no_f32_reductions_bf16": (
    {"force_float32_reductions": False, "param_dtype": jnp.bfloat16},
    (8, 6),
    jnp.bfloat16,
  ),
}


@pytest.mark.parametrize("case", list(BN_CASES))
def test_batch_norm_matches_flax(case):
  kwargs, shape, dtype = BN_CASES[case]
  x = _data(shape, dtype)
  tol = F32 if dtype == jnp.float32 and "dtype" not in kwargs else LOW
  if kwargs.get("param_dtype") == jnp.bfloat16:
    tol = LOW
  flax_bn, jn_bn = nn.BatchNorm(**kwargs), jnn.BatchNorm(**kwargs)
  variables = _perturb(_check_init(flax_bn, jn_bn, x, use_running_average=False))

  # Training: batch statistics, running averages updated.
  yf, uf = _apply(
    flax_bn, variables, x, use_running_average=False, mutable=["batch_stats"]
  )
  yj, uj = _apply(
    jn_bn, variables, x, use_running_average=False, mutable=["batch_stats"]
  )
  _close(yj, yf, tol)
  assert _signature(uj) == _signature(uf)
  jax.tree.map(lambda a, b: _close(a, b, tol), uj, uf)

  # Evaluation: running statistics, nothing mutable.
  trained = {**variables, **uf}
  _close(
    _apply(jn_bn, trained, x, use_running_average=True),
    _apply(flax_bn, trained, x, use_running_average=True),
    tol,
  )


def test_batch_norm_use_running_average_from_constructor():
  x = _data((8, 6))
  variables = _perturb(_init(nn.BatchNorm(use_running_average=True), x))
  for flag in (True, False):
    yf, uf = _apply(
      nn.BatchNorm(use_running_average=flag), variables, x, mutable=["batch_stats"]
    )
    yj, uj = _apply(
      jnn.BatchNorm(use_running_average=flag), variables, x, mutable=["batch_stats"]
    )
    _close(yj, yf, F32)
    jax.tree.map(lambda a, b: _close(a, b, F32), uj, uf)


def test_batch_norm_use_running_average_merge_errors():
  x = _data((8, 6))
  with pytest.raises(ValueError, match="use_running_average"):
    _init(jnn.BatchNorm(), x)
  with pytest.raises(ValueError, match="use_running_average"):
    _init(jnn.BatchNorm(use_running_average=True), x, use_running_average=True)


def test_batch_norm_mask():
  x = _data((8, 5, 3))
  mask = jax.random.bernoulli(jax.random.key(3), 0.7, (8, 5, 1))
  mask = mask.at[0].set(True)
  variables = _perturb(_init(nn.BatchNorm(), x, True))
  yf, uf = _apply(
    nn.BatchNorm(), variables, x, False, mask=mask, mutable=["batch_stats"]
  )
  yj, uj = _apply(
    jnn.BatchNorm(), variables, x, False, mask=mask, mutable=["batch_stats"]
  )
  _close(yj, yf, F32)
  jax.tree.map(lambda a, b: _close(a, b, F32), uj, uf)


def test_batch_norm_unbatched_eval():
  x = _data((6,))
  variables = _perturb(_init(nn.BatchNorm(), x, True))
  _close(
    _apply(jnn.BatchNorm(), variables, x, True),
    _apply(nn.BatchNorm(), variables, x, True),
    F32,
  )


def test_batch_norm_complex_training_output():
  # flax accepts complex inputs, and turns the float32 running mean into a
  # complex one at the first update; jaxnorm stores it the same way.
  x = _data((16, 4), jnp.complex64)
  variables = _init(nn.BatchNorm(), x, False)
  yf, uf = _apply(nn.BatchNorm(), variables, x, False, mutable=["batch_stats"])
  yj, uj = _apply(jnn.BatchNorm(), variables, x, False, mutable=["batch_stats"])
  _close(yj, yf, F32)
  for name in ("mean", "var"):
    assert uj["batch_stats"][name].dtype == uf["batch_stats"][name].dtype
    _close(uj["batch_stats"][name], uf["batch_stats"][name], F32)
  assert uj["batch_stats"]["mean"].dtype == jnp.complex64


def test_batch_norm_integer_input_promoted_like_flax():
  x = jnp.arange(24).reshape(4, 6)
  variables = _init(nn.BatchNorm(), x, False)
  yf, uf = _apply(nn.BatchNorm(), variables, x, False, mutable=["batch_stats"])
  yj, uj = _apply(jnn.BatchNorm(), variables, x, False, mutable=["batch_stats"])
  _close(yj, yf, F32)
  jax.tree.map(lambda a, b: _close(a, b, F32), uj, uf)


def test_batch_norm_stable_where_flax_fast_variance_is_not():
  # x = 1e4 + N(0, 1): flax's default E[x^2] - E[x]^2 loses every digit in
  # float32; jaxnorm matches flax's exact two-pass variance instead.
  x = 1e4 + jax.random.normal(jax.random.key(0), (256, 3))
  variables = _init(nn.BatchNorm(), x, False)
  _, uf = _apply(
    nn.BatchNorm(use_fast_variance=False), variables, x, False, mutable=["batch_stats"]
  )
  _, uj = _apply(jnn.BatchNorm(), variables, x, False, mutable=["batch_stats"])
  np.testing.assert_allclose(uj["batch_stats"]["var"], uf["batch_stats"]["var"], 1e-4)


class _Dense_BN(nn.Module):
  norm: type = jnn.BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    return self.norm(use_running_average=not train)(x)


def test_init_with_a_batch_of_one():
  # The common `model.init(key, jnp.ones((1, 784)))`: works as in flax and
  # creates the same variables; the statistics of init are thrown away.
  x1 = jnp.ones((1, 784))
  vj = _init(_Dense_BN(jnn.BatchNorm), x1, train=True)
  vf = _init(_Dense_BN(nn.BatchNorm), x1, train=True)
  assert _signature(vj) == _signature(vf)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), vj, vf)
  np.testing.assert_array_equal(vj["batch_stats"]["BatchNorm_0"]["var"], 1.0)
  # A real training call with one value per channel is an error.
  with pytest.raises(ValueError, match="1 value per channel"):
    _apply(_Dense_BN(jnn.BatchNorm), vj, x1, train=True, mutable=["batch_stats"])
  # Evaluation with a batch of one is fine.
  y = _apply(_Dense_BN(jnn.BatchNorm), vj, x1, train=False)
  assert y.shape == (1, 16)


def test_init_needs_no_named_axis():
  x = _data((8, 6))
  bn = jnn.BatchNorm(axis_name="batch")
  variables = _init(bn, x, use_running_average=False)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)


def test_batch_norm_axis_name_matches_flax_under_named_vmap():
  x = _data((4, 6, 3))  # 4 devices, each with a DIFFERENT shard of 6 samples
  variables = _perturb(_init(nn.BatchNorm(), x[0], True))

  def run(module):
    def step(xs):
      return _apply(module, variables, xs, False, mutable=["batch_stats"])

    return jax.vmap(step, axis_name="batch")(x)

  yf, uf = run(nn.BatchNorm(axis_name="batch"))
  yj, uj = run(jnn.BatchNorm(axis_name="batch"))
  _close(yj, yf, F32)
  jax.tree.map(lambda a, b: _close(a, b, F32), uj, uf)


def test_batch_norm_axis_index_groups_matches_flax_under_pmap():
  x = _data((4, 6, 3))  # 4 devices in 2 groups, each with a different shard
  variables = _perturb(_init(nn.BatchNorm(), x[0], True))
  groups = [[0, 1], [2, 3]]

  def run(module):
    return jax.pmap(
      lambda xs: module.apply(variables, xs, False, mutable=["batch_stats"]),
      axis_name="batch",
      devices=jax.devices()[:4],
    )(x)

  yf, uf = run(nn.BatchNorm(axis_name="batch", axis_index_groups=groups))
  yj, uj = run(jnn.BatchNorm(axis_name="batch", axis_index_groups=groups))
  _close(yj, yf, F32)
  jax.tree.map(lambda a, b: _close(a, b, F32), uj, uf)


def test_virtual_batch_size_is_passed_to_the_core():
  # Ghost BN: each group of 4 samples is normalized by its own statistics.
  x = _data((8, 3))
  bn = jnn.BatchNorm(virtual_batch_size=4)
  variables = _init(bn, jnp.ones((1, 3)), use_running_average=False)
  y, _ = _apply(bn, variables, x, use_running_average=False, mutable=["batch_stats"])
  plain = jnn.BatchNorm()
  refs = [
    _apply(plain, variables, half, use_running_average=False, mutable=["batch_stats"])[
      0
    ]
    for half in (x[:4], x[4:])
  ]
  np.testing.assert_allclose(y, jnp.concatenate(refs), **F32)


# --------------------------------------------------------------------------
# LayerNorm, RMSNorm, GroupNorm, InstanceNorm

STATELESS_CASES = {
  # name: (flax class, jaxnorm class, kwargs, shape, dtype)
  "ln_default": (nn.LayerNorm, jnn.LayerNorm, {}, (4, 5, 6), jnp.float32),
  "ln_chw": (
    nn.LayerNorm,
    jnn.LayerNorm,
    {"reduction_axes": (1, 2, 3), "feature_axes": -1},
    (2, 3, 4, 5),
    jnp.float32,
  ),
  "ln_tuple_features": (
    nn.LayerNorm,
    jnn.LayerNorm,
    {"reduction_axes": (1, 2, 3), "feature_axes": (-2, -1)},
    (2, 3, 4, 5),
    jnp.float32,
  ),
  "ln_unbatched": (nn.LayerNorm, jnn.LayerNorm, {}, (7,), jnp.float32),
  "ln_no_affine": (
    nn.LayerNorm,
    jnn.LayerNorm,
    {"use_scale": False, "use_bias": False, "epsilon": 1e-3},
    (4, 6),
    jnp.float32,
  ),
  "ln_random_init": (
    nn.LayerNorm,
    jnn.LayerNorm,
    {"scale_init": nn.initializers.normal(1.0), "bias_init": nn.initializers.normal()},
    (4, 6),
    jnp.float32,
  ),
  "ln_slow_variance": (
    nn.LayerNorm,
    jnn.LayerNorm,
    {"use_fast_variance": False},
    (4, 6),
    jnp.float32,
  ),
  "ln_bf16_input": (nn.LayerNorm, jnn.LayerNorm, {}, (4, 6), jnp.bfloat16),
  "ln_dtype_bf16": (
    nn.LayerNorm,
    jnn.LayerNorm,
    {"dtype": jnp.bfloat16},
    (4, 6),
    jnp.float32,
  ),
  "ln_param_bf16": (
    nn.LayerNorm,
    jnn.LayerNorm,
    {"param_dtype": jnp.bfloat16},
    (4, 6),
    jnp.bfloat16,
  ),
  "ln_no_f32_reductions": (
    nn.LayerNorm,
    jnn.LayerNorm,
    {"force_float32_reductions": False},
    (4, 6),
    jnp.bfloat16,
  ),
  "ln_complex": (nn.LayerNorm, jnn.LayerNorm, {}, (4, 6), jnp.complex64),
  "ln_int": (nn.LayerNorm, jnn.LayerNorm, {}, (4, 6), jnp.int32),
  "rms_default": (nn.RMSNorm, jnn.RMSNorm, {}, (4, 5, 6), jnp.float32),
  "rms_axes": (
    nn.RMSNorm,
    jnn.RMSNorm,
    {"reduction_axes": (-2, -1), "feature_axes": (-2, -1)},
    (3, 4, 5),
    jnp.float32,
  ),
  "rms_no_scale": (
    nn.RMSNorm,
    jnn.RMSNorm,
    {"use_scale": False, "epsilon": 1e-2},
    (4, 6),
    jnp.float32,
  ),
  "rms_unbatched": (nn.RMSNorm, jnn.RMSNorm, {}, (7,), jnp.float32),
  "rms_bf16": (
    nn.RMSNorm,
    jnn.RMSNorm,
    {"param_dtype": jnp.bfloat16},
    (4, 6),
    jnp.bfloat16,
  ),
  "rms_complex": (nn.RMSNorm, jnn.RMSNorm, {}, (4, 6), jnp.complex64),
  "gn_groups": (
    nn.GroupNorm,
    jnn.GroupNorm,
    {"num_groups": 3},
    (2, 4, 4, 6),
    jnp.float32,
  ),
  "gn_group_size": (
    nn.GroupNorm,
    jnn.GroupNorm,
    {"num_groups": None, "group_size": 2},
    (2, 4, 4, 6),
    jnp.float32,
  ),
  "gn_one_group": (
    nn.GroupNorm,
    jnn.GroupNorm,
    {"num_groups": 1},
    (2, 3, 6),
    jnp.float32,
  ),
  "gn_instance": (
    nn.GroupNorm,
    jnn.GroupNorm,
    {"num_groups": None, "group_size": 1},
    (2, 3, 6),
    jnp.float32,
  ),
  "gn_default_32": (nn.GroupNorm, jnn.GroupNorm, {}, (2, 3, 64), jnp.float32),
  "gn_reduction_axes": (
    nn.GroupNorm,
    jnn.GroupNorm,
    {"num_groups": 3, "reduction_axes": (-3, -2, -1)},
    (2, 3, 4, 5, 6),
    jnp.float32,
  ),
  "gn_unbatched": (nn.GroupNorm, jnn.GroupNorm, {"num_groups": 2}, (6,), jnp.float32),
  "gn_rank2": (nn.GroupNorm, jnn.GroupNorm, {"num_groups": 2}, (3, 6), jnp.float32),
  "gn_no_affine": (
    nn.GroupNorm,
    jnn.GroupNorm,
    {"num_groups": 2, "use_scale": False, "use_bias": False, "epsilon": 1e-3},
    (2, 3, 6),
    jnp.float32,
  ),
  "gn_bf16": (
    nn.GroupNorm,
    jnn.GroupNorm,
    {"num_groups": 2, "dtype": jnp.bfloat16},
    (2, 3, 6),
    jnp.bfloat16,
  ),
  "gn_no_f32_reductions": (
    nn.GroupNorm,
    jnn.GroupNorm,
    {"num_groups": 2, "force_float32_reductions": False},
    (2, 3, 6),
    jnp.float32,
  ),
  "gn_complex": (
    nn.GroupNorm,
    jnn.GroupNorm,
    {"num_groups": 3},
    (2, 3, 6),
    jnp.complex64,
  ),
  "in_default": (nn.InstanceNorm, jnn.InstanceNorm, {}, (2, 4, 4, 3), jnp.float32),
  "in_nchw": (
    nn.InstanceNorm,
    jnn.InstanceNorm,
    {"feature_axes": 1},
    (2, 3, 4, 4),
    jnp.float32,
  ),
  "in_tuple": (
    nn.InstanceNorm,
    jnn.InstanceNorm,
    {"feature_axes": (1, -1)},
    (2, 3, 4, 5),
    jnp.float32,
  ),
  "in_rank2": (nn.InstanceNorm, jnn.InstanceNorm, {}, (3, 5), jnp.float32),
  "in_rank3": (nn.InstanceNorm, jnn.InstanceNorm, {}, (2, 7, 5), jnp.float32),
  "in_bf16": (
    nn.InstanceNorm,
    jnn.InstanceNorm,
    {"param_dtype": jnp.bfloat16, "use_bias": False},
    (2, 5, 3),
    jnp.bfloat16,
  ),
  "in_complex": (nn.InstanceNorm, jnn.InstanceNorm, {}, (2, 5, 3), jnp.complex64),
}


@pytest.mark.parametrize("case", list(STATELESS_CASES))
def test_stateless_layer_matches_flax(case):
  flax_cls, jn_cls, kwargs, shape, dtype = STATELESS_CASES[case]
  if dtype == jnp.int32:
    x = jnp.arange(np.prod(shape)).reshape(shape) % 7
  else:
    x = _data(shape, dtype)
  low = dtype == jnp.bfloat16 or any(
    kwargs.get(k) == jnp.bfloat16 for k in ("dtype", "param_dtype")
  )
  flax_mod, jn_mod = flax_cls(**kwargs), jn_cls(**kwargs)
  variables = _perturb(_check_init(flax_mod, jn_mod, x))
  _close(
    _apply(jn_mod, variables, x), _apply(flax_mod, variables, x), LOW if low else F32
  )


@pytest.mark.parametrize(
  "flax_mod, jn_mod",
  [
    (nn.LayerNorm(), jnn.LayerNorm()),
    (nn.RMSNorm(), jnn.RMSNorm()),
    (nn.GroupNorm(num_groups=2), jnn.GroupNorm(num_groups=2)),
    (nn.InstanceNorm(), jnn.InstanceNorm()),
  ],
  ids=["ln", "rms", "gn", "in"],
)
def test_stateless_mask_matches_flax(flax_mod, jn_mod):
  x = _data((2, 5, 6))
  mask = jax.random.bernoulli(jax.random.key(3), 0.7, x.shape)
  mask = mask.at[:, 0].set(True)
  variables = _perturb(_init(flax_mod, x))
  _close(
    _apply(jn_mod, variables, x, mask=mask),
    _apply(flax_mod, variables, x, mask=mask),
    F32,
  )


def test_layer_norm_axis_name_matches_flax_under_named_vmap():
  # Sequence parallelism: the feature axis is split across 3 "devices".
  x = _data((3, 4, 5))
  variables = _perturb(_init(nn.LayerNorm(), x[0]))

  def run(module):
    return jax.vmap(lambda xs: _apply(module, variables, xs), axis_name="seq")(x)

  _close(run(jnn.LayerNorm(axis_name="seq")), run(nn.LayerNorm(axis_name="seq")), F32)


def test_group_norm_nchw_axis_extension():
  # flax has NHWC only; jaxnorm's `axis=1` gives the same numbers on NCHW.
  x = _data((2, 4, 3, 6))
  variables = _perturb(_init(nn.GroupNorm(num_groups=3), x))
  expected = _apply(nn.GroupNorm(num_groups=3), variables, x)
  got = _apply(jnn.GroupNorm(num_groups=3, axis=1), variables, x.transpose(0, 3, 1, 2))
  _close(got, expected.transpose(0, 3, 1, 2), F32)


def test_group_norm_errors():
  x = _data((2, 3, 6))
  with pytest.raises(ValueError, match="num_groups"):
    _init(jnn.GroupNorm(num_groups=4), x)
  with pytest.raises(ValueError, match="group_size"):
    _init(jnn.GroupNorm(num_groups=2, group_size=3), x)
  with pytest.raises(ValueError, match="reduction_axes"):
    jnn.GroupNorm(num_groups=2, reduction_axes=(1,)).init(jax.random.key(0), x)


def test_instance_norm_rejects_batch_axis_as_feature():
  with pytest.raises(ValueError, match="feature_axes"):
    _init(jnn.InstanceNorm(feature_axes=0), _data((2, 3, 4)))


# --------------------------------------------------------------------------
# Models: checkpoints and training


class _CNN(nn.Module):
  """A small model using every layer, with the norm classes as a field."""

  norms: object = jnn

  @nn.compact
  def __call__(self, x, train: bool):
    # A ReLU after each layer, so that no layer's affine is undone by the next
    # normalization (its gradient would be rounding noise).
    x = nn.Dense(8)(x)  # a 1x1 convolution
    x = self.norms.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = self.norms.GroupNorm(num_groups=4)(nn.relu(x))
    x = self.norms.InstanceNorm()(nn.relu(x))
    x = nn.relu(x).reshape((x.shape[0], -1))
    x = self.norms.LayerNorm()(x)
    x = self.norms.RMSNorm()(nn.Dense(8)(x))
    return nn.Dense(3)(x)


def _batch():
  x = jax.random.normal(jax.random.key(1), (8, 4, 4, 2))
  y = jax.random.randint(jax.random.key(2), (8,), 0, 3)
  return x, y


def test_flax_checkpoint_loads_unchanged():
  x, _ = _batch()
  variables = _perturb(_init(_CNN(nn), x, train=False))
  yf, uf = _apply(_CNN(nn), variables, x, train=True, mutable=["batch_stats"])
  yj, uj = _apply(_CNN(jnn), variables, x, train=True, mutable=["batch_stats"])
  _close(yj, yf, F32)
  jax.tree.map(lambda a, b: _close(a, b, F32), uj, uf)
  _close(
    _apply(_CNN(jnn), variables, x, train=False),
    _apply(_CNN(nn), variables, x, train=False),
    F32,
  )


def _train(norms, steps=3):
  model = _CNN(norms)
  x, labels = _batch()
  variables = _init(model, x, train=False)
  tx = optax.sgd(0.1)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, updates = _apply(
        model,
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  losses = []
  for _ in range(steps):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  return params, batch_stats, losses


def test_optax_training_step_matches_flax():
  pj, bj, lj = _train(jnn)
  pf, bf, lf = _train(nn)
  assert lj[-1] < lj[0]
  np.testing.assert_allclose(lj, lf, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), pj, pf)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), bj, bf)


# Bad arguments on which flax fails deeper down (an IndexError from a tuple,
# a modulo by zero) or with its own check: jaxnorm's error is of flax's type
# (and a ValueError) and its message contains flax's.
FLAX_ERROR_CASES = {
  "axis_out_of_range": lambda m: m.BatchNorm(use_running_average=False, axis=5),
  "reduction_axes_out_of_range": lambda m: m.LayerNorm(reduction_axes=5),
  "feature_axes_out_of_range": lambda m: m.LayerNorm(feature_axes=7),
  "group_size_zero": lambda m: m.GroupNorm(num_groups=None, group_size=0),
  "group_size_negative": lambda m: m.GroupNorm(num_groups=None, group_size=-2),
}


@pytest.mark.parametrize("case", list(FLAX_ERROR_CASES))
def test_errors_have_flax_type_and_text(case):
  x = _data((2, 3, 3, 6))
  with pytest.raises(Exception) as flax_error:
    FLAX_ERROR_CASES[case](nn).init(jax.random.key(0), x)
  with pytest.raises(ValueError) as ours:
    FLAX_ERROR_CASES[case](jnn).init(jax.random.key(0), x)
  assert isinstance(ours.value, type(flax_error.value)), (ours.value, flax_error.value)
  assert str(flax_error.value) in str(ours.value)
