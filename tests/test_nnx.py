"""jaxnorm.nnx against flax.nnx: the drop-in claim.

Every case builds flax's module and jaxnorm's with the same arguments and
RNG, checks that they hold the same state (``nnx.Param`` / ``nnx.BatchStat``
attributes of the same names, shapes, dtypes and values), loads flax's
(perturbed) state into jaxnorm's module with ``nnx.update``, and compares
outputs and updated running statistics in training and evaluation.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnorm.nnx as jnx

F32 = dict(rtol=1e-5, atol=1e-5)
LOW = dict(rtol=2e-2, atol=2e-2)  # bf16 has 8 bits of mantissa


def _data(shape, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = 2.0 * rng.standard_normal(shape) + 1.0
  if jnp.issubdtype(dtype, jnp.complexfloating):
    x = (x + 1j * (2.0 * rng.standard_normal(shape) + 0.5)).astype(np.complex64)
  elif jnp.issubdtype(dtype, jnp.integer):
    x = np.arange(np.prod(shape)).reshape(shape) % 7
  return jnp.asarray(x).astype(dtype)


def _np(a):
  a = np.asarray(a)
  return a if np.iscomplexobj(a) else a.astype(np.float32)


def _close(actual, expected, tol):
  assert jnp.dtype(actual.dtype) == jnp.dtype(expected.dtype)
  np.testing.assert_allclose(_np(actual), _np(expected), **tol)


def _call(module, x, *args, **kwargs):
  # Under jit: eager mode compiles every primitive on its own, per shape.
  return nnx.jit(lambda m, x: m(x, *args, **kwargs))(module, x)


def _signature(state):
  return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), state)


def _same_state(flax_mod, jn_mod, tol=None):
  sf, sj = nnx.state(flax_mod), nnx.state(jn_mod)
  # The treedef includes the Variable types (Param, BatchStat) and names.
  assert jax.tree.structure(sf) == jax.tree.structure(sj)
  assert _signature(sf) == _signature(sj)
  if tol is None:
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(_np(a), _np(b)), sf, sj)
  else:
    jax.tree.map(lambda a, b: _close(b, a, tol), sf, sj)


def _load_perturbed(flax_mod, jn_mod):
  """A non-trivial flax state (a trained checkpoint) into both modules."""
  rng = np.random.default_rng(7)
  state = jax.tree.map(
    lambda v: jnp.asarray(
      _np(v) + 0.3 * rng.uniform(0.1, 1.0, v.shape).astype(np.float32)
    ).astype(v.dtype),
    nnx.state(flax_mod),
  )
  nnx.update(flax_mod, state)
  nnx.update(jn_mod, state)


def _pair(name, *args, **kwargs):
  flax_mod = getattr(nnx, name)(*args, rngs=nnx.Rngs(0), **kwargs)
  jn_mod = getattr(jnx, name)(*args, rngs=nnx.Rngs(0), **kwargs)
  return flax_mod, jn_mod


# --------------------------------------------------------------------------
# BatchNorm

BN_CASES = {
  "default": ({}, (8, 5, 6), jnp.float32),
  "nchw": ({"axis": 1}, (4, 6, 3, 3), jnp.float32),
  "rank2": ({}, (16, 6), jnp.float32),
  "rank5": ({}, (2, 3, 2, 2, 6), jnp.float32),
  "no_scale": ({"use_scale": False}, (8, 6), jnp.float32),
  "no_bias": ({"use_bias": False}, (8, 6), jnp.float32),
  "no_affine": ({"use_scale": False, "use_bias": False}, (8, 6), jnp.float32),
  "eps_momentum": ({"epsilon": 1e-2, "momentum": 0.8}, (8, 6), jnp.float32),
  "slow_variance": ({"use_fast_variance": False}, (8, 6), jnp.float32),
  "random_init": (
    {
      "scale_init": nnx.initializers.normal(1.0),
      "bias_init": nnx.initializers.normal(1.0),
    },
    (8, 6),
    jnp.float32,
  ),
  "dtype_bf16": ({"dtype": jnp.bfloat16}, (8, 6), jnp.float32),
  "param_bf16": ({"param_dtype": jnp.bfloat16}, (8, 6), jnp.bfloat16),
  "input_bf16": ({}, (8, 6), jnp.bfloat16),
  "input_f16_no_affine": (
    {"use_scale": False, "use_bias": False},
    (8, 6),
    jnp.float16,
  ),
}


@pytest.mark.parametrize("case", list(BN_CASES))
def test_batch_norm_matches_flax(case):
  kwargs, shape, dtype = BN_CASES[case]
  low = dtype != jnp.float32 or any(
    kwargs.get(k) == jnp.bfloat16 for k in ("dtype", "param_dtype")
  )
  tol = LOW if low else F32
  x = _data(shape, dtype)
  channels = shape[kwargs.get("axis", -1)]
  flax_bn, jn_bn = _pair("BatchNorm", channels, **kwargs)
  _same_state(flax_bn, jn_bn)
  _load_perturbed(flax_bn, jn_bn)

  # Training (the default of nnx.BatchNorm): running averages updated.
  _close(_call(jn_bn, x), _call(flax_bn, x), tol)
  _same_state(flax_bn, jn_bn, tol)

  # Evaluation: running statistics, state unchanged.
  flax_bn.eval()
  jn_bn.eval()
  before = nnx.state(jn_bn)
  _close(_call(jn_bn, x), _call(flax_bn, x), tol)
  jax.tree.map(np.testing.assert_array_equal, before, nnx.state(jn_bn))


def test_batch_norm_mask():
  x = _data((8, 5, 3))
  mask = np.random.default_rng(3).random((8, 5, 1)) < 0.7
  mask[0] = True
  flax_bn, jn_bn = _pair("BatchNorm", 3)
  _load_perturbed(flax_bn, jn_bn)
  _close(_call(jn_bn, x, mask=mask), _call(flax_bn, x, mask=mask), F32)
  _same_state(flax_bn, jn_bn, F32)


def test_batch_norm_complex_input():
  x = _data((16, 4), jnp.complex64)
  flax_bn, jn_bn = _pair("BatchNorm", 4)
  with warnings.catch_warnings():
    # flax casts the complex batch mean into its float32 running mean, with
    # a ComplexWarning and a FutureWarning; jaxnorm keeps the real part.
    warnings.simplefilter("ignore")
    yf = _call(flax_bn, x)
  _close(_call(jn_bn, x), yf, F32)
  _same_state(flax_bn, jn_bn, F32)


def test_batch_norm_call_argument_overrides_attribute():
  x = _data((8, 6))
  flax_bn, jn_bn = _pair("BatchNorm", 6, use_running_average=True)
  _load_perturbed(flax_bn, jn_bn)
  _close(_call(jn_bn, x, False), _call(flax_bn, x, False), F32)
  _same_state(flax_bn, jn_bn, F32)
  _close(_call(jn_bn, x, True), _call(flax_bn, x, True), F32)


def test_train_eval_and_view_toggle_use_running_average():
  x = _data((8, 6))
  bn = jnx.BatchNorm(6, rngs=nnx.Rngs(0))
  assert bn.use_running_average is False
  bn.eval()
  assert bn.use_running_average is True
  _call(bn, x)
  np.testing.assert_array_equal(bn.mean[...], 0.0)  # eval: nothing updated
  bn.train()
  assert bn.use_running_average is False
  _call(bn, x)
  assert np.all(np.asarray(bn.mean[...]) != 0.0)
  view = nnx.view(bn, use_running_average=True)
  assert view.use_running_average is True and bn.use_running_average is False


def test_batch_norm_needs_use_running_average():
  bn = jnx.BatchNorm(6, use_running_average=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use_running_average"):
    bn(_data((8, 6)))


def test_training_with_one_value_per_channel_raises():
  bn = jnx.BatchNorm(6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="1 value per channel"):
    bn(_data((1, 6)))
  assert bn(_data((1, 6)), use_running_average=True).shape == (1, 6)


def test_batch_norm_axis_name_matches_flax_under_named_vmap():
  x = _data((4, 6, 3))  # 4 devices, each with a DIFFERENT shard

  def run(module):
    graphdef, state = nnx.split(module)

    def step(state, xs):
      m = nnx.merge(graphdef, state)
      return m(xs), nnx.state(m, nnx.BatchStat)

    return jax.vmap(step, in_axes=(None, 0), axis_name="batch")(state, x)

  yf, sf = run(nnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0)))
  yj, sj = run(jnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0)))
  _close(yj, yf, F32)
  jax.tree.map(lambda a, b: _close(a, b, F32), sj, sf)


def test_virtual_batch_size_is_passed_to_the_core():
  x = _data((8, 3))
  ghost = jnx.BatchNorm(3, virtual_batch_size=4, rngs=nnx.Rngs(0))
  y = _call(ghost, x)
  refs = [_call(jnx.BatchNorm(3, rngs=nnx.Rngs(0)), h) for h in (x[:4], x[4:])]
  np.testing.assert_allclose(y, jnp.concatenate(refs), **F32)


# --------------------------------------------------------------------------
# LayerNorm, RMSNorm, GroupNorm, InstanceNorm

STATELESS_CASES = {
  # name: (class name, positional args, kwargs, shape, dtype)
  "ln_default": ("LayerNorm", (6,), {}, (4, 5, 6), jnp.float32),
  "ln_chw": (
    "LayerNorm",
    (5,),
    {"reduction_axes": (1, 2, 3), "feature_axes": -1},
    (2, 3, 4, 5),
    jnp.float32,
  ),
  "ln_tuple_features": (
    "LayerNorm",
    (20,),
    {"reduction_axes": (1, 2, 3), "feature_axes": (-2, -1)},
    (2, 3, 4, 5),
    jnp.float32,
  ),
  "ln_unbatched": ("LayerNorm", (7,), {}, (7,), jnp.float32),
  "ln_no_affine": (
    "LayerNorm",
    (6,),
    {"use_scale": False, "use_bias": False, "epsilon": 1e-3},
    (4, 6),
    jnp.float32,
  ),
  "ln_random_init": (
    "LayerNorm",
    (6,),
    {
      "scale_init": nnx.initializers.normal(1.0),
      "bias_init": nnx.initializers.normal(1.0),
    },
    (4, 6),
    jnp.float32,
  ),
  "ln_slow_variance": (
    "LayerNorm",
    (6,),
    {"use_fast_variance": False},
    (4, 6),
    jnp.float32,
  ),
  "ln_bf16": ("LayerNorm", (6,), {}, (4, 6), jnp.bfloat16),
  "ln_dtype_bf16": ("LayerNorm", (6,), {"dtype": jnp.bfloat16}, (4, 6), jnp.float32),
  "ln_param_bf16": (
    "LayerNorm",
    (6,),
    {"param_dtype": jnp.bfloat16},
    (4, 6),
    jnp.bfloat16,
  ),
  "ln_complex": ("LayerNorm", (6,), {}, (4, 6), jnp.complex64),
  "ln_int": ("LayerNorm", (6,), {}, (4, 6), jnp.int32),
  "rms_default": ("RMSNorm", (6,), {}, (4, 5, 6), jnp.float32),
  "rms_axes": (
    "RMSNorm",
    (20,),
    {"reduction_axes": (-2, -1), "feature_axes": (-2, -1)},
    (3, 4, 5),
    jnp.float32,
  ),
  "rms_no_scale": (
    "RMSNorm",
    (6,),
    {"use_scale": False, "epsilon": 1e-2},
    (4, 6),
    jnp.float32,
  ),
  "rms_unbatched": ("RMSNorm", (7,), {}, (7,), jnp.float32),
  "rms_bf16": ("RMSNorm", (6,), {"param_dtype": jnp.bfloat16}, (4, 6), jnp.bfloat16),
  "rms_complex": ("RMSNorm", (6,), {}, (4, 6), jnp.complex64),
  "gn_groups": ("GroupNorm", (6, 3), {}, (2, 4, 4, 6), jnp.float32),
  "gn_group_size": (
    "GroupNorm",
    (6,),
    {"num_groups": None, "group_size": 2},
    (2, 4, 4, 6),
    jnp.float32,
  ),
  "gn_one_group": ("GroupNorm", (6, 1), {}, (2, 3, 6), jnp.float32),
  "gn_instance": ("GroupNorm", (6, None, 1), {}, (2, 3, 6), jnp.float32),
  "gn_default_32": ("GroupNorm", (64,), {}, (2, 3, 64), jnp.float32),
  "gn_rank2": ("GroupNorm", (6, 2), {}, (3, 6), jnp.float32),
  "gn_no_affine": (
    "GroupNorm",
    (6, 2),
    {"use_scale": False, "use_bias": False, "epsilon": 1e-3},
    (2, 3, 6),
    jnp.float32,
  ),
  "gn_bf16": ("GroupNorm", (6, 2), {"dtype": jnp.bfloat16}, (2, 3, 6), jnp.bfloat16),
  "gn_complex": ("GroupNorm", (6, 3), {}, (2, 3, 6), jnp.complex64),
  "in_default": ("InstanceNorm", (3,), {}, (2, 4, 4, 3), jnp.float32),
  "in_nchw": ("InstanceNorm", (3,), {"feature_axes": 1}, (2, 3, 4, 4), jnp.float32),
  "in_tuple": (
    "InstanceNorm",
    (15,),
    {"feature_axes": (1, -1)},
    (2, 3, 4, 5),
    jnp.float32,
  ),
  "in_rank2": ("InstanceNorm", (5,), {}, (3, 5), jnp.float32),
  "in_rank3": ("InstanceNorm", (5,), {}, (2, 7, 5), jnp.float32),
  "in_bf16": (
    "InstanceNorm",
    (3,),
    {"param_dtype": jnp.bfloat16, "use_bias": False},
    (2, 5, 3),
    jnp.bfloat16,
  ),
  "in_complex": ("InstanceNorm", (3,), {}, (2, 5, 3), jnp.complex64),
}


@pytest.mark.parametrize("case", list(STATELESS_CASES))
def test_stateless_layer_matches_flax(case):
  name, args, kwargs, shape, dtype = STATELESS_CASES[case]
  low = dtype == jnp.bfloat16 or any(
    kwargs.get(k) == jnp.bfloat16 for k in ("dtype", "param_dtype")
  )
  x = _data(shape, dtype)
  flax_mod, jn_mod = _pair(name, *args, **kwargs)
  _same_state(flax_mod, jn_mod)
  _load_perturbed(flax_mod, jn_mod)
  _close(_call(jn_mod, x), _call(flax_mod, x), LOW if low else F32)


@pytest.mark.parametrize(
  "name, args",
  [
    ("LayerNorm", (6,)),
    ("RMSNorm", (6,)),
    ("GroupNorm", (6, 2)),
    ("InstanceNorm", (6,)),
  ],
)
def test_stateless_mask_matches_flax(name, args):
  x = _data((2, 5, 6))
  mask = np.random.default_rng(3).random(x.shape) < 0.7
  mask[:, 0] = True
  flax_mod, jn_mod = _pair(name, *args)
  _load_perturbed(flax_mod, jn_mod)
  _close(_call(jn_mod, x, mask=mask), _call(flax_mod, x, mask=mask), F32)


def test_rms_norm_mask_is_positional_like_flax():
  x = _data((2, 6))
  mask = np.array([[True] * 5 + [False]] * 2)
  flax_mod, jn_mod = _pair("RMSNorm", 6)
  _close(jn_mod(x, mask), flax_mod(x, mask), F32)


def test_group_norm_reduction_axes_and_unbatched_follow_linen():
  # flax.nnx.GroupNorm mishandles these (it repeats the group statistics
  # along axis 1); jaxnorm gives flax.linen.GroupNorm's numbers.
  import flax.linen as nn

  for shape, kwargs in [
    ((2, 3, 4, 5, 6), {"reduction_axes": (-3, -2, -1)}),
    ((6,), {}),
  ]:
    x = _data(shape)
    flax_linen = nn.GroupNorm(num_groups=3, **kwargs)
    variables = flax_linen.init(jax.random.key(0), x)
    jn_mod = jnx.GroupNorm(6, 3, rngs=nnx.Rngs(0), **kwargs)
    _close(_call(jn_mod, x), flax_linen.apply(variables, x), F32)


def test_group_norm_nchw_axis_extension():
  x = _data((2, 4, 3, 6))
  flax_mod, _ = _pair("GroupNorm", 6, 3)
  jn_mod = jnx.GroupNorm(6, 3, axis=1, rngs=nnx.Rngs(0))
  _load_perturbed(flax_mod, jn_mod)
  got = _call(jn_mod, x.transpose(0, 3, 1, 2))
  _close(got, _call(flax_mod, x).transpose(0, 3, 1, 2), F32)


def test_group_norm_construction_errors():
  with pytest.raises(ValueError, match="num_groups"):
    jnx.GroupNorm(6, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="group_size"):
    jnx.GroupNorm(6, 2, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="group_size"):
    jnx.GroupNorm(6, None, 4, rngs=nnx.Rngs(0))
  gn = jnx.GroupNorm(6, None, 2, rngs=nnx.Rngs(0))
  assert (gn.num_groups, gn.group_size) == (3, 2)


def test_bad_feature_arguments():
  with pytest.raises(ValueError, match="feature_axes"):
    jnx.InstanceNorm(3, feature_axes=0, rngs=nnx.Rngs(0))(_data((3, 4, 3)))
  with pytest.raises(ValueError, match="num_features"):
    jnx.LayerNorm(5, rngs=nnx.Rngs(0))(_data((3, 4)))


def test_promote_dtype_and_metadata_are_honoured():
  def to_bf16(args, *, dtype=None, inexact=True):
    del dtype, inexact
    return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in args)

  x = _data((4, 6))
  for name in ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm"):
    args = (6, 3) if name == "GroupNorm" else (6,)
    flax_mod, jn_mod = _pair(
      name, *args, promote_dtype=to_bf16, scale_metadata={"tag": "s"}
    )
    _close(_call(jn_mod, x), _call(flax_mod, x), LOW)
    assert jn_mod.scale.get_metadata()["tag"] == "s"
    assert jn_mod.scale.get_metadata() == flax_mod.scale.get_metadata()


# --------------------------------------------------------------------------
# Models: split/merge, checkpoints and training


class _Model(nnx.Module):
  def __init__(self, norms, *, rngs):
    self.dense_in = nnx.Linear(2, 8, rngs=rngs)
    self.bn = norms.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.gn = norms.GroupNorm(8, 4, rngs=rngs)
    self.inorm = norms.InstanceNorm(8, rngs=rngs)
    self.ln = norms.LayerNorm(128, rngs=rngs)
    self.dense = nnx.Linear(128, 8, rngs=rngs)
    self.rms = norms.RMSNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    # A ReLU after each layer, so no affine is undone by the next norm.
    x = self.bn(self.dense_in(x))
    x = self.gn(nnx.relu(x))
    x = self.inorm(nnx.relu(x))
    x = self.ln(nnx.relu(x).reshape((x.shape[0], -1)))
    return self.out(self.rms(self.dense(x)))


def _batch():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((8, 4, 4, 2)).astype(np.float32))
  return x, jnp.asarray(rng.integers(0, 3, 8))


def test_split_merge_state_is_interchangeable():
  x, _ = _batch()
  flax_model = _Model(nnx, rngs=nnx.Rngs(0))
  jn_model = _Model(jnx, rngs=nnx.Rngs(0))
  flax_graph, flax_state = nnx.split(flax_model)
  jn_graph, jn_state = nnx.split(jn_model)
  assert jax.tree.structure(flax_state) == jax.tree.structure(jn_state)
  assert _signature(flax_state) == _signature(jn_state)

  _load_perturbed(flax_model, jn_model)
  _, flax_state = nnx.split(flax_model)
  # jaxnorm's graph with flax's state, and flax's graph with jaxnorm's state.
  merged = nnx.merge(jn_graph, flax_state)
  back = nnx.merge(flax_graph, nnx.state(merged))
  _close(_call(merged, x), _call(back, x), F32)
  _same_state(back, merged, F32)
  merged.eval()
  back.eval()
  _close(_call(merged, x), _call(back, x), F32)


def _train(norms, steps=3):
  model = _Model(norms, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  x, labels = _batch()

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(steps)]
  return nnx.state(model), losses


def test_optax_training_matches_flax():
  sj, lj = _train(jnx)
  sf, lf = _train(nnx)
  assert lj[-1] < lj[0]
  np.testing.assert_allclose(lj, lf, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), sj, sf)


def _first_sentence(message):
  return message.split(". ")[0]


# Bad arguments on which flax.nnx fails deeper down (an IndexError, a modulo
# by zero, a TypeError from a reshape) or with its own check: jaxnorm's error
# is of flax's type (and a ValueError); its message contains flax's where
# flax's is its own (not an internal reshape's or broadcast's).
NNX_ERROR_CASES = {
  "no_use_running_average": (
    lambda m: m.BatchNorm(6, use_running_average=None, rngs=nnx.Rngs(0)),
    _first_sentence,
  ),
  "axis_out_of_range": (
    lambda m: m.BatchNorm(6, use_running_average=False, axis=5, rngs=nnx.Rngs(0)),
    str,
  ),
  "group_size_zero": (
    lambda m: m.GroupNorm(6, num_groups=None, group_size=0, rngs=nnx.Rngs(0)),
    str,
  ),
  "bn_num_features": (
    lambda m: m.BatchNorm(5, use_running_average=False, rngs=nnx.Rngs(0)),
    None,
  ),
  "ln_num_features": (lambda m: m.LayerNorm(5, rngs=nnx.Rngs(0)), None),
  "gn_num_features": (lambda m: m.GroupNorm(5, num_groups=1, rngs=nnx.Rngs(0)), None),
}


@pytest.mark.parametrize("case", list(NNX_ERROR_CASES))
def test_errors_have_flax_type_and_text(case):
  make, text = NNX_ERROR_CASES[case]
  x = _data((2, 3, 3, 6))
  with pytest.raises(Exception) as flax_error:
    make(nnx)(x)
  with pytest.raises(ValueError) as ours:
    make(jnx)(x)
  assert isinstance(ours.value, type(flax_error.value)), (ours.value, flax_error.value)
  if text is not None:
    assert text(str(flax_error.value)) in str(ours.value)
  else:
    assert "num_features" in str(ours.value)


@pytest.mark.parametrize(
  "name",
  ["BatchNorm", "BatchRenorm", "MovingAverageBatchNorm", "SwitchableNorm", "EvoNormB0"],
)
def test_view_info_documents_use_running_average_like_flax(name):
  # nnx.view_info reads the Args section of each layer's set_view docstring.
  def model(m, cls):
    class Net(nnx.Module):
      def __init__(self, rngs):
        self.lin = nnx.Linear(4, 6, rngs=rngs)
        self.norm = cls(6, rngs=rngs)

    return Net(nnx.Rngs(0))

  want = nnx.view_info(model(nnx, nnx.BatchNorm))
  got = nnx.view_info(model(jnx, getattr(jnx, name)))
  assert "use_running_average: bool | None = None" in want
  assert "use_running_average: bool | None = None" in got


@pytest.mark.parametrize(
  "build",
  [
    lambda m: m.LayerNorm(4),  # no rngs
    lambda m: m.LayerNorm(4, 1e-6, rngs=nnx.Rngs(0)),  # epsilon positional
    lambda m: m.BatchNorm(4, foo=1, rngs=nnx.Rngs(0)),
    lambda m: m.BatchNorm(rngs=nnx.Rngs(0)),
  ],
)
def test_constructor_type_errors_name_the_class_like_flax(build):
  with pytest.raises(TypeError) as flax_error:
    build(nnx)
  with pytest.raises(TypeError) as ours:
    build(jnx)
  prefix = str(flax_error.value).split("(")[0]  # e.g. "BatchNorm.__init__"
  assert str(ours.value).startswith(prefix + "()"), (ours.value, flax_error.value)
