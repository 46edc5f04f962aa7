"""Bad input is refused by name, empty batches keep the state, export works.

Each test pins one item of the reliability issue; the references are plain
float64 NumPy or the unchanged input state.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

import jaxnorm as jn
import jaxnorm.nnx as jnx

C = 4
X = jax.ShapeDtypeStruct((8, 3, 3, C), jnp.float32)


def _x(shape=(8, 3, 3, C), offset=0.0, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(offset + rng.standard_normal(shape), jnp.float32)


def _raises(exc, pattern, f, *args):
  with pytest.raises(exc, match=pattern):
    jax.eval_shape(f, *args)


def bn(x, **kw):
  params, state = jn.batch_norm_init(C)
  kw.setdefault("use_running_average", False)
  return jn.batch_norm(x, params, state, **kw)


# --- 1. hyperparameters checked where concrete --------------------------------

BAD_EPSILON = [-1e-3, float("nan"), float("inf"), np.float32(-1.0)]


@pytest.mark.parametrize("epsilon", BAD_EPSILON)
@pytest.mark.parametrize(
  "layer",
  [
    lambda x, e: bn(x, epsilon=e),
    lambda x, e: bn(x, epsilon=e, use_running_average=True),
    lambda x, e: jn.layer_norm(x, jn.layer_norm_init(C), epsilon=e),
    lambda x, e: jn.rms_norm(x, jn.rms_norm_init(C), epsilon=e),
    lambda x, e: jn.group_norm(x, jn.group_norm_init(C), num_groups=2, epsilon=e),
    lambda x, e: jn.instance_norm(x, jn.group_norm_init(C), epsilon=e),
    lambda x, e: jn.filter_response_norm(x, jn.filter_response_norm_init(C), epsilon=e),
    lambda x, e: jn.evonorm_s0(x, jn.evonorm_s0_init(C), num_groups=2, epsilon=e),
    lambda x, e: jn.evonorm_b0(
      x, *jn.evonorm_b0_init(C), use_running_average=False, epsilon=e
    ),
    lambda x, e: jn.moving_average_batch_norm(
      x, *jn.moving_average_batch_norm_init(C), use_running_average=False, epsilon=e
    ),
    lambda x, e: jn.normalize(x, 0.0, 1.0, epsilon=e),
  ],
)
def test_bad_epsilon_is_refused_by_name(layer, epsilon):
  _raises(ValueError, "`epsilon`", lambda x: layer(x, epsilon), X)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize(
  "layer",
  [
    lambda x, m: bn(x, momentum=m),
    lambda x, m: bn(x, momentum=m, virtual_batch_size=4),
    lambda x, m: jn.batch_renorm(
      x, *jn.batch_renorm_init(C), use_running_average=False, momentum=m
    ),
    lambda x, m: jn.switchable_norm(
      x, *jn.switchable_norm_init(C), use_running_average=False, momentum=m
    ),
    lambda x, m: jn.evonorm_b0(
      x, *jn.evonorm_b0_init(C), use_running_average=False, momentum=m
    ),
    lambda x, m: jn.moving_average_batch_norm(
      x, *jn.moving_average_batch_norm_init(C), use_running_average=False, momentum=m
    ),
  ],
)
def test_bad_momentum_is_refused_by_name(layer, momentum):
  _raises(ValueError, "`momentum`", lambda x: layer(x, momentum), X)


@pytest.mark.parametrize("name", ["epsilon", "momentum"])
def test_none_hyperparameter_is_a_type_error(name):
  _raises(TypeError, f"`{name}`", lambda x: bn(x, **{name: None}), X)


def test_traced_hyperparameters_are_used_as_given():
  """A schedule under jit cannot be checked at trace time; it is used."""
  x = _x()
  params, state = jn.batch_norm_init(C)
  f = jax.jit(
    lambda x, m: jn.batch_norm(x, params, state, use_running_average=False, momentum=m)
  )
  _, new = f(x, 0.5)
  np.testing.assert_allclose(
    new.var, 0.5 + 0.5 * np.var(np.asarray(x), (0, 1, 2)), rtol=1e-5
  )


@pytest.mark.parametrize("kw", [dict(r_max=float("nan")), dict(d_max=float("nan"))])
def test_batch_renorm_nan_bounds(kw):
  params, state = jn.batch_renorm_init(C)
  name = next(iter(kw))
  _raises(
    ValueError,
    f"`{name}`",
    lambda x: jn.batch_renorm(x, params, state, use_running_average=False, **kw),
    X,
  )


@pytest.mark.parametrize("r_max", [0.5, 0.0, float("nan")])
def test_mabn_bad_r_max(r_max):
  params, state = jn.moving_average_batch_norm_init(C)
  _raises(
    ValueError,
    "`r_max`",
    lambda x: jn.moving_average_batch_norm(
      x, params, state, use_running_average=False, r_max=r_max
    ),
    X,
  )


def test_mabn_negative_count_acts_as_fresh_state():
  params, state = jn.moving_average_batch_norm_init(C)
  x = _x()
  y_fresh, s_fresh = jn.moving_average_batch_norm(
    x, params, state, use_running_average=False
  )
  bad = state._replace(count=jnp.asarray(-3, state.count.dtype))
  y_bad, s_bad = jn.moving_average_batch_norm(x, params, bad, use_running_average=False)
  assert np.all(np.isfinite(y_bad))
  np.testing.assert_allclose(y_bad, y_fresh, rtol=1e-6)
  assert int(s_bad.count) == int(s_fresh.count) == 1


# --- 2. an empty batch leaves the running state as it was ---------------------

STATE = jn.BatchNormState(jnp.full((C,), 5.0), jnp.full((C,), 4.0))


def _stateful(name):
  if name == "batch":
    return STATE, lambda x, s, **kw: bn_with(x, s, **kw)
  if name == "ghost":
    return STATE, lambda x, s, **kw: bn_with(x, s, virtual_batch_size=4, **kw)
  if name == "renorm":
    return STATE, lambda x, s, **kw: jn.batch_renorm(
      x, jn.batch_renorm_init(C)[0], s, use_running_average=False, **kw
    )
  if name == "switchable":
    return STATE, lambda x, s, **kw: jn.switchable_norm(
      x, jn.switchable_norm_init(C)[0], s, use_running_average=False, **kw
    )
  if name == "evonorm_b0":
    return jn.EvoNormB0State(jnp.full((C,), 4.0)), lambda x, s, **kw: jn.evonorm_b0(
      x, jn.evonorm_b0_init(C)[0], s, use_running_average=False, **kw
    )
  params, state = jn.moving_average_batch_norm_init(C, buffer_size=4)
  state = state._replace(
    var=jnp.full((C,), 4.0),
    second_moments=jnp.full((4, C), 3.0),
    count=jnp.asarray(2, state.count.dtype),
  )
  return state, lambda x, s, **kw: jn.moving_average_batch_norm(
    x, params, s, use_running_average=False, **kw
  )


def bn_with(x, state, **kw):
  return jn.batch_norm(
    x, jn.batch_norm_init(C)[0], state, use_running_average=False, **kw
  )


EMPTY_LAYERS = ["batch", "ghost", "renorm", "switchable", "evonorm_b0", "mabn"]


@pytest.mark.parametrize("name", EMPTY_LAYERS)
def test_all_masked_batch_keeps_state(name):
  state, f = _stateful(name)
  x = _x()
  mask = jnp.zeros(x.shape[:-1] + (1,), bool)
  y, new = jax.jit(functools.partial(f, momentum=0.0))(x, state, mask=mask)
  assert np.all(np.isfinite(np.asarray(y)))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new, state)


@pytest.mark.parametrize("name", EMPTY_LAYERS)
def test_batch_of_size_zero_keeps_state(name):
  state, f = _stateful(name)
  x = jnp.zeros((0, 3, 3, C))
  y, new = f(x, state, momentum=0.0)
  assert y.shape == x.shape
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new, state)


@pytest.mark.parametrize(
  "name", ["batch", "renorm", "switchable", "evonorm_b0", "mabn"]
)
def test_empty_on_every_device_keeps_state_under_sync(name):
  state, f = _stateful(name)
  x = _x((8, 2, 3, 3, C))  # 8 devices
  mask = jnp.zeros((8, 2, 3, 3, 1), bool)
  g = jax.pmap(
    lambda x, m: f(x, state, mask=m, momentum=0.0, axis_name="d"), axis_name="d"
  )
  y, new = g(x, mask)
  assert np.all(np.isfinite(np.asarray(y)))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[3], b), new, state)


# --- 3. degenerate batches ---------------------------------------------------


def test_evonorm_b0_single_value_per_channel_raises():
  params, state = jn.evonorm_b0_init(C)
  _raises(
    ValueError,
    "more than 1 value per channel",
    lambda x: jn.evonorm_b0(x, params, state, use_running_average=False),
    jax.ShapeDtypeStruct((1, C), jnp.float32),
  )


# --- 4. dtypes ----------------------------------------------------------------


def test_integer_state_is_refused():
  params, _ = jn.batch_norm_init(C)
  state = jn.BatchNormState(jnp.zeros(C, jnp.int32), jnp.ones(C, jnp.int32))
  _raises(
    TypeError,
    r"`state\.mean`",
    lambda x: jn.batch_norm(x, params, state, use_running_average=False),
    X,
  )


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_floating_output_dtype_is_refused(dtype):
  _raises(TypeError, "`dtype`", lambda x: bn(x, dtype=dtype), X)
  _raises(
    TypeError,
    "`dtype`",
    lambda x: jn.layer_norm(x, jn.layer_norm_init(C), dtype=dtype),
    X,
  )


def test_complex_parameters_with_real_x_are_refused():
  params = jn.NormParams(jnp.ones(C, jnp.complex64), None)
  _raises(TypeError, r"`params\.scale`", lambda x: jn.layer_norm(x, params), X)
  _, state = jn.batch_norm_init(C)
  state = state._replace(mean=state.mean.astype(jnp.complex64))
  _raises(
    TypeError,
    r"`state\.mean`",
    lambda x: jn.batch_norm(
      x, jn.batch_norm_init(C)[0], state, use_running_average=True
    ),
    X,
  )


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.int32])
def test_non_floating_parameters_are_refused(dtype):
  params = jn.NormParams(jnp.ones(C, dtype), None)
  _raises(TypeError, r"`params\.scale`", lambda x: jn.layer_norm(x, params), X)


def test_integer_mask_is_refused():
  mask = jnp.ones((8, 3, 3, 1), jnp.int32)
  _raises(TypeError, "`mask`", lambda x: bn(x, mask=mask), X)


# --- 5. clear errors, and NumPy scalars accepted ----------------------------------


@pytest.mark.parametrize("num_groups", [2.0, "2"])
def test_num_groups_must_be_an_int(num_groups):
  _raises(
    TypeError,
    "`num_groups`",
    lambda x: jn.group_norm(x, jn.group_norm_init(C), num_groups=num_groups),
    X,
  )


@pytest.mark.parametrize(
  "layer",
  [
    lambda x: jn.group_norm(x, jn.group_norm_init(C), num_groups=2, axis=(1, 3)),
    lambda x: jn.moving_average_batch_norm(
      x, *jn.moving_average_batch_norm_init(C), use_running_average=False, axis=(1, 3)
    ),
    lambda x: jn.evonorm_b0(
      x, *jn.evonorm_b0_init(C), use_running_average=False, axis=(1, 3)
    ),
  ],
)
def test_several_axes_where_one_is_expected(layer):
  _raises(ValueError, "`axis`", layer, X)


@pytest.mark.parametrize(
  "layer",
  [
    lambda x: jn.group_norm(x, jn.group_norm_init(C), num_groups=2),
    lambda x: jn.evonorm_s0(x, jn.evonorm_s0_init(C), num_groups=2),
    lambda x: jn.evonorm_b0(x, *jn.evonorm_b0_init(C), use_running_average=False),
  ],
)
def test_empty_spatial_axis(layer):
  _raises(ValueError, "`x`", layer, jax.ShapeDtypeStruct((2, 0, 3, C), jnp.float32))


def test_string_axis_index_groups():
  f = jax.pmap(
    lambda x: bn(
      x, axis_name="d", axis_index_groups=[["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    ),
    axis_name="d",
  )
  with pytest.raises(TypeError, match="`axis_index_groups`"):
    f(_x((8, 2, 3, 3, C)))


def test_nnx_batch_norm_negative_features():
  # flax's own text (same exception type), then the argument's name.
  with pytest.raises(TypeError, match=r"nonnegative.*`num_features`"):
    jnx.BatchNorm(-1, rngs=nnx.Rngs(0))


def test_numpy_scalars_are_ints_and_bools():
  x = _x()
  params, state = jn.batch_norm_init(np.int64(C))
  y1, _ = jn.batch_norm(
    x, params, state, use_running_average=np.bool_(False), axis=np.int64(-1)
  )
  y2, _ = jn.batch_norm(x, params, state, use_running_average=False)
  np.testing.assert_array_equal(y1, y2)
  g1, _ = jn.batch_norm(
    x, params, state, use_running_average=False, virtual_batch_size=np.int64(2)
  )
  g2, _ = jn.batch_norm(
    x, params, state, use_running_average=False, virtual_batch_size=2
  )
  np.testing.assert_array_equal(g1, g2)
  gn = jn.group_norm(x, jn.group_norm_init(C), num_groups=np.int32(2))
  np.testing.assert_array_equal(
    gn, jn.group_norm(x, jn.group_norm_init(C), num_groups=2)
  )


# --- 6. spectral norm with u = 0 -----------------------------------------------


def test_spectral_norm_recovers_from_zero_u():
  w = jax.random.normal(jax.random.key(0), (6, 4)) * 3.0
  state = jn.SpectralNormState(u=jnp.zeros(4))
  for _ in range(30):
    w_bar, state = jn.spectral_norm(w, state, update_stats=True)
  sigma = np.linalg.svd(np.asarray(w_bar, np.float64), compute_uv=False)[0]
  np.testing.assert_allclose(sigma, 1.0, rtol=1e-3)
  assert float(jnp.linalg.norm(state.u)) > 0.5


@pytest.mark.parametrize("scale", [1e-2, 1e19, 1e30])
def test_spectral_norm_large_weights_are_normalized(scale):
  # The power iteration's squared norms overflow float32 past about 1e18;
  # the float64 SVD of the result says whether sigma was still found.
  w = jax.random.normal(jax.random.key(0), (16, 8)) * scale
  state = jn.spectral_norm_init(w, jax.random.key(1), n_warmup=100)
  w_bar, state = jn.spectral_norm(w, state)
  sigma = np.linalg.svd(np.asarray(w_bar, np.float64), compute_uv=False)[0]
  np.testing.assert_allclose(sigma, 1.0, rtol=1e-4)
  np.testing.assert_allclose(float(jnp.linalg.norm(state.u)), 1.0, rtol=1e-5)


# --- 7. jax.export ------------------------------------------------------------

EXPORTED = {
  "batch_train": (lambda x, p, s: bn_export(x, p, s, False), jn.batch_norm_init),
  "batch_eval": (lambda x, p, s: bn_export(x, p, s, True), jn.batch_norm_init),
  "ghost": (
    lambda x, p, s: jn.batch_norm(
      x, p, s, use_running_average=False, virtual_batch_size=1
    ),
    jn.batch_norm_init,
  ),
  "renorm": (
    lambda x, p, s: jn.batch_renorm(x, p, s, use_running_average=False),
    jn.batch_renorm_init,
  ),
  "switchable": (
    lambda x, p, s: jn.switchable_norm(x, p, s, use_running_average=False),
    jn.switchable_norm_init,
  ),
  "evonorm_b0": (
    lambda x, p, s: jn.evonorm_b0(x, p, s, use_running_average=False),
    jn.evonorm_b0_init,
  ),
  "mabn": (
    lambda x, p, s: jn.moving_average_batch_norm(x, p, s, use_running_average=False),
    jn.moving_average_batch_norm_init,
  ),
  "layer": (
    lambda x, p, s: (jn.layer_norm(x, p), s),
    lambda c: (jn.layer_norm_init(c), None),
  ),
  "rms": (
    lambda x, p, s: (jn.rms_norm(x, p), s),
    lambda c: (jn.rms_norm_init(c), None),
  ),
  "group": (
    lambda x, p, s: (jn.group_norm(x, p, num_groups=2), s),
    lambda c: (jn.group_norm_init(c), None),
  ),
  "instance": (
    lambda x, p, s: (jn.instance_norm(x, p), s),
    lambda c: (jn.group_norm_init(c), None),
  ),
  "frn": (
    lambda x, p, s: (jn.filter_response_norm(x, p), s),
    lambda c: (jn.filter_response_norm_init(c, learned_epsilon=True), None),
  ),
  "evonorm_s0": (
    lambda x, p, s: (jn.evonorm_s0(x, p, num_groups=2), s),
    lambda c: (jn.evonorm_s0_init(c), None),
  ),
}


EXPORTED.update(
  {
    f"{name}_eval": (
      functools.partial(
        lambda x, p, s, fn: fn(x, p, s, use_running_average=True), fn=fn
      ),
      init,
    )
    for name, fn, init in [
      ("renorm", jn.batch_renorm, jn.batch_renorm_init),
      ("switchable", jn.switchable_norm, jn.switchable_norm_init),
      ("evonorm_b0", jn.evonorm_b0, jn.evonorm_b0_init),
      ("mabn", jn.moving_average_batch_norm, jn.moving_average_batch_norm_init),
    ]
  }
)


def bn_export(x, p, s, eval_mode):
  return jn.batch_norm(x, p, s, use_running_average=eval_mode)


@pytest.mark.parametrize("rank", [4, 2])
@pytest.mark.parametrize("name", list(EXPORTED))
def test_export_with_symbolic_batch(name, rank):
  f, init = EXPORTED[name]
  params, state = init(C)
  shape = (5, 3, 3, C) if rank == 4 else (5, C)
  if rank == 2 and name in (
    "group",
    "instance",
    "evonorm_s0",
    "evonorm_b0",
    "frn",
    "ghost",
    "evonorm_b0_eval",
  ):
    shape = (5, 2, C)  # these need an axis besides the batch and channels
  (b,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b,) + shape[1:], jnp.float32)
  exported = jax.export.export(jax.jit(f))(spec, params, state)
  restored = jax.export.deserialize(exported.serialize())
  x = _x(shape)
  got = restored.call(x, params, state)
  want = jax.jit(f)(x, params, state)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want
  )


# --- 8. NaN and Inf -----------------------------------------------------------------


def _masked_stateful(fn, init, **kw):
  def layer(x, params, mask, train):
    state = init(C)[1]
    return fn(x, params, state, use_running_average=not train, mask=mask, **kw)[0]

  return layer, lambda: init(C)[0]


def _masked_stateless(fn, init, **kw):
  return (lambda x, params, mask, train: fn(x, params, mask=mask, **kw)), (
    lambda: init(C)
  )


# Every layer that takes a mask, as (layer(x, params, mask, train), params).
MASKED_LAYERS = {
  "batch_norm": _masked_stateful(jn.batch_norm, jn.batch_norm_init),
  "ghost_batch_norm": _masked_stateful(
    jn.batch_norm, jn.batch_norm_init, virtual_batch_size=4
  ),
  "batch_renorm": _masked_stateful(jn.batch_renorm, jn.batch_renorm_init),
  "switchable_norm": _masked_stateful(jn.switchable_norm, jn.switchable_norm_init),
  "evonorm_b0": _masked_stateful(jn.evonorm_b0, jn.evonorm_b0_init),
  "mabn": _masked_stateful(
    jn.moving_average_batch_norm, jn.moving_average_batch_norm_init
  ),
  "layer_norm": _masked_stateless(jn.layer_norm, jn.layer_norm_init),
  "rms_norm": _masked_stateless(jn.rms_norm, jn.rms_norm_init),
  "group_norm": _masked_stateless(jn.group_norm, jn.group_norm_init, num_groups=2),
  "instance_norm": _masked_stateless(jn.instance_norm, jn.group_norm_init),
  "frn": _masked_stateless(jn.filter_response_norm, jn.filter_response_norm_init),
  "evonorm_s0": _masked_stateless(jn.evonorm_s0, jn.evonorm_s0_init, num_groups=2),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MASKED_LAYERS))
def test_masked_nan_does_not_poison_the_gradient(name, train):
  """NaN padding that the mask and the loss leave out: the gradients with
  respect to ``x`` and the parameters are finite, and on the real elements
  equal those with the padding zeroed (where nothing is NaN to begin with)."""
  layer, make_params = MASKED_LAYERS[name]
  x = np.asarray(_x(), np.float32).copy()
  mask = np.ones(x.shape, bool)
  mask[-2:] = False  # two padded samples
  mask[0, 2] = False  # and a padded row within a real sample
  x[~mask] = np.nan
  params = make_params()

  def loss(x, params):
    y = layer(x, params, mask, train)
    return jnp.sum(jnp.where(mask, y, 0.0) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  gx, gp = grad(jnp.asarray(x), params)
  assert np.all(np.isfinite(np.asarray(gx)))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(gp))
  gx0, gp0 = grad(jnp.where(mask, x, 0.0), params)
  np.testing.assert_allclose(
    np.asarray(gx)[mask], np.asarray(gx0)[mask], rtol=1e-5, atol=1e-6
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), gp, gp0
  )


def test_checkify_names_a_nan_input_and_a_bad_traced_momentum():
  params, state = jn.batch_norm_init(C)
  x = _x().at[0, 0, 0, 0].set(jnp.nan)

  def f(x, momentum):
    return jn.batch_norm(x, params, state, use_running_average=False, momentum=momentum)

  with jn.checkify_checks():
    checked = checkify.checkify(jax.jit(f))
    err, _ = checked(x, 0.9)
    assert "`x` holds NaN or Inf" in err.get()
    err, _ = checked(_x(), 1.5)
    assert "`momentum` is outside" in err.get()
    err, _ = checked(_x(), 0.9)
    assert err.get() is None


def test_checks_are_off_by_default():
  params, state = jn.batch_norm_init(C)
  y, _ = jax.jit(lambda x: jn.batch_norm(x, params, state, use_running_average=False))(
    _x()
  )
  assert np.all(np.isfinite(np.asarray(y)))


# --- 9. accuracy on the masked and ghost paths at 1e6 ------------------------------


def _ref_var(x, mask=None):
  shape = x.shape
  x = np.asarray(x, np.float64).reshape(-1, C)
  if mask is None:
    return x.var(0)
  m = np.broadcast_to(np.asarray(mask), shape).reshape(-1, C)
  return np.array([x[m[:, c], c].var() for c in range(C)])


def test_masked_and_ghost_running_variance_at_1e6():
  x = _x((64, 4, 4, C), offset=1e6)
  rng = np.random.default_rng(1)
  mask = jnp.asarray(rng.random((64, 4, 4, 1)) < 0.6)
  params, state = jn.batch_norm_init(C)
  _, s = jn.batch_norm(
    x, params, state, use_running_average=False, momentum=0.0, mask=mask
  )
  np.testing.assert_allclose(s.var, _ref_var(x, mask), rtol=1e-3)
  _, s = jn.batch_norm(
    x, params, state, use_running_average=False, momentum=0.0, virtual_batch_size=8
  )
  xg = np.asarray(x, np.float64).reshape(8, -1, C)
  np.testing.assert_allclose(s.var, xg.var(1).mean(0), rtol=1e-3)
  for f, init in [
    (jn.batch_renorm, jn.batch_renorm_init),
    (jn.switchable_norm, jn.switchable_norm_init),
  ]:
    p, st = init(C)
    _, s = f(x, p, st, use_running_average=False, momentum=0.0, mask=mask)
    np.testing.assert_allclose(s.var, _ref_var(x, mask), rtol=1e-3)
  p, st = jn.evonorm_b0_init(C)
  _, s = jn.evonorm_b0(x, p, st, use_running_average=False, momentum=0.0, mask=mask)
  np.testing.assert_allclose(s.var, _ref_var(x, mask), rtol=1e-3)


def test_evonorm_s0_group_variance_at_1e6():
  """S0 divides by the group std: x * sigmoid(v x) / std with v = 0 is x / (2 std),
  so the std used shows in the output's scale."""
  x = _x((4, 8, 8, C), offset=1e6)
  params = jn.evonorm_s0_init(C)._replace(v=jnp.zeros(C))
  y = jn.evonorm_s0(x, params, num_groups=2, epsilon=0.0)
  xg = np.asarray(x, np.float64).reshape(4, 8, 8, 2, 2)
  std = xg.std(axis=(1, 2, 4), keepdims=True)
  want = (xg / (2.0 * std)).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-3)


def test_masked_layer_norm_gradient_at_1e4():
  """Rows with 3 valid elements at 1e4: masked dx as accurate as plain float32
  layer norm over those 3 elements (the issue measured 50 times worse)."""
  rng = np.random.default_rng(0)
  x = np.asarray(1e4 + rng.standard_normal((64, 8)), np.float32)
  mask = np.zeros((64, 8), bool)
  mask[:, :3] = True
  g = rng.standard_normal((64, 8))
  params = jn.NormParams(None, None)

  def grad(x, mask, g):
    def loss(x):
      y = jn.layer_norm(x, params, mask=mask, epsilon=1e-6)
      return jnp.sum(y * g if mask is None else y * g * mask)

    return np.asarray(jax.grad(loss)(jnp.asarray(x)), np.float64)

  # float64 reference: LN of the 3 valid elements, chain rule written out
  xv, gv = np.asarray(x[:, :3], np.float64), g[:, :3]
  inv = 1 / np.sqrt(xv.var(1, keepdims=True) + 1e-6)
  xhat = (xv - xv.mean(1, keepdims=True)) * inv
  ref = inv * (
    gv - gv.mean(1, keepdims=True) - xhat * (gv * xhat).mean(1, keepdims=True)
  )
  err_masked = np.abs(grad(x, mask, g)[:, :3] - ref).max()
  err_plain = np.abs(grad(x[:, :3], None, g[:, :3]) - ref).max()
  assert err_masked <= 2.0 * err_plain + 1e-6, (err_masked, err_plain)


def test_evonorm_b0_on_rank_2_input_with_zero_epsilon():
  """On (N, C) input the instance variance is over no axis, 0: the layer is
  ``x / max(sqrt(var_B), v x)``, smooth at ``epsilon = 0``, and its gradient
  is that formula's (it was NaN everywhere: 0 * inf through sqrt(0))."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((8, C)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, C)), jnp.float32)
  params, state = jn.evonorm_b0_init(C)
  params = params._replace(v=jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32))

  def ours(x):
    y, _ = jn.evonorm_b0(x, params, state, use_running_average=False, epsilon=0.0)
    return jnp.sum(y * w)

  def formula(x):
    var_b = jnp.mean((x - jnp.mean(x, 0)) ** 2, 0)
    return jnp.sum(x / jnp.maximum(jnp.sqrt(var_b), params.v * x) * w)

  np.testing.assert_allclose(ours(x), formula(x), rtol=1e-5)
  g = jax.grad(ours)(x)
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(g, jax.grad(formula)(x), rtol=1e-4, atol=1e-5)
