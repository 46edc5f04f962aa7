"""Stability (SPEC §3 rule 5), fully masked inputs (rule 9) and the memory
the backward pass keeps, for every core layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn

RNG = np.random.default_rng(3)
SHAPE = (4, 5, 5, 8)  # NHWC, C = 8
C = SHAPE[-1]


def _x(shape=SHAPE, loc=1.0, scale=2.0, dtype=np.float32):
  return jnp.asarray(loc + scale * RNG.standard_normal(shape), dtype)


def _params(c=C):
  return jn.NormParams(
    jnp.asarray(1.0 + 0.2 * RNG.standard_normal(c), jnp.float32),
    jnp.asarray(RNG.standard_normal(c), jnp.float32),
  )


# Every layer as f(x, params, mask) -> y. BN in training also returns a state,
# which is checked separately below.
_BN_STATE = jn.BatchNormState(jnp.zeros(C), jnp.ones(C))


def _bn_train(x, p, mask=None):
  return jn.batch_norm(x, p, _BN_STATE, use_running_average=False, mask=mask)[0]


def _bn_eval(x, p, mask=None):
  state = jn.BatchNormState(jnp.full(C, 0.5), jnp.full(C, 2.0))
  return jn.batch_norm(x, p, state, use_running_average=True, mask=mask)[0]


LAYERS = {
  "batch_norm_train": _bn_train,
  "batch_norm_eval": _bn_eval,
  "layer_norm": lambda x, p, mask=None: jn.layer_norm(x, p, mask=mask),
  "layer_norm_chw": lambda x, p, mask=None: jn.layer_norm(
    x, p, reduction_axes=(1, 2, 3), mask=mask
  ),
  "rms_norm": lambda x, p, mask=None: jn.rms_norm(
    x, jn.NormParams(p.scale, None), mask=mask
  ),
  "group_norm": lambda x, p, mask=None: jn.group_norm(x, p, num_groups=4, mask=mask),
  "instance_norm": lambda x, p, mask=None: jn.instance_norm(x, p, mask=mask),
  "normalize": lambda x, p, mask=None: jn.normalize(
    x, 0.5, 2.0, scale=p.scale, bias=p.bias
  ),
}
NAMES = sorted(LAYERS)


# ----------------------------------------------------------------------------
# stability: x = 1e4 + N(0, 1) in float32 (rule 5)
# ----------------------------------------------------------------------------


def _offset_x(shape=(64, 4, 4, C)):
  return jnp.asarray(1e4 + RNG.standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_running_var_large_offset(masked):
  x = _offset_x()
  x64 = np.asarray(x, np.float64)
  mask = RNG.random(x.shape) < 0.6 if masked else None
  p, s = jn.batch_norm_init(C)
  _, new = jn.batch_norm(x, p, s, use_running_average=False, momentum=0.0, mask=mask)
  m = np.ones(x.shape) if mask is None else mask
  mean = (x64 * m).sum((0, 1, 2)) / m.sum((0, 1, 2))
  var = (((x64 - mean) ** 2) * m).sum((0, 1, 2)) / m.sum((0, 1, 2))
  rel = np.abs(np.asarray(new.var, np.float64) - var) / var
  assert rel.max() <= 1e-3, rel.max()
  assert bool(jnp.all(new.var >= 0))


def _np_out(x, axes, eps, mask=None):
  x = np.asarray(x, np.float64)
  m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape)
  mean = (x * m).sum(axes, keepdims=True) / m.sum(axes, keepdims=True)
  var = (((x - mean) ** 2) * m).sum(axes, keepdims=True) / m.sum(axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps), var


OFFSET_CASES = {
  # name: (layer, reduction axes of the reference, epsilon)
  "batch_norm": (_bn_train, (0, 1, 2), 1e-5),
  "layer_norm": (lambda x, p, mask=None: jn.layer_norm(x, p, mask=mask), (3,), 1e-6),
  "layer_norm_chw": (LAYERS["layer_norm_chw"], (1, 2, 3), 1e-6),
  "instance_norm": (LAYERS["instance_norm"], (1, 2), 1e-6),
}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", sorted(OFFSET_CASES) + ["group_norm"])
def test_outputs_large_offset(name, masked):
  x = _offset_x((8, 4, 4, C))
  mask = None
  if masked:
    mask = np.random.default_rng(7).random(x.shape) < 0.6  # fixed: reproducible
    mask[..., :2] = True  # every row of layer norm keeps two values
  p = jn.NormParams(jnp.ones(C), jnp.zeros(C))
  if name == "group_norm":
    y = jn.group_norm(x, p, num_groups=2, mask=mask)
    # the reference on channels split into (groups, C / groups)
    gshape, axes = (8, 4, 4, 2, 4), (1, 2, 4)
    mg = None if mask is None else mask.reshape(gshape)
    ref = _np_out(np.asarray(x).reshape(gshape), axes, 1e-6, mg)[0].reshape(x.shape)
    y_var = _np_out(np.asarray(y).reshape(gshape), axes, 0.0, mg)[1]
  else:
    f, axes, eps = OFFSET_CASES[name]
    y = f(x, p, mask)
    ref = _np_out(x, axes, eps, mask)[0]
    y_var = _np_out(y, axes, 0.0, mask)[1]
  assert bool(jnp.all(jnp.isfinite(y)))
  # x is only known to ~1e-3 absolute at 1e4 in float32, so x - mean is too
  np.testing.assert_allclose(y, ref, atol=5e-3)
  # the variance used is within 1e-3: the output has unit variance
  np.testing.assert_allclose(y_var, np.ones_like(y_var), rtol=2e-3)


def test_constant_input_gives_zero_variance_not_nan():
  x = jnp.full((16, C), 1e4, jnp.float32)
  p, s = jn.batch_norm_init(C)
  y, new = jn.batch_norm(x, p, s, use_running_average=False, momentum=0.0)
  assert bool(jnp.all(new.var == 0.0)) and bool(jnp.all(y == 0.0))
  x = jnp.full((2, 3, 3, C), -7e3, jnp.float32)
  for f in (LAYERS["layer_norm"], LAYERS["group_norm"], LAYERS["instance_norm"]):
    y = f(x, jn.NormParams(jnp.ones(C), jnp.zeros(C)))
    assert bool(jnp.all(y == 0.0))


@pytest.mark.parametrize("value", [0.1, 0.001, 7.7, 12345.678])
@pytest.mark.parametrize("n", [7, 255])
def test_constant_rows_of_inexact_values_never_go_below_zero(value, n):
  # 0.1 * 7 / 7 rounds, and the two-pass's correction then left -4e-24:
  # NaN at a tiny epsilon. The float64 variance of a constant is exactly 0.
  eps = 1e-30
  x = jnp.full((n, 4), value, jnp.float32)
  p, s = jn.batch_norm_init(4)
  y, new = jn.batch_norm(x, p, s, use_running_average=False, momentum=0.0, epsilon=eps)
  assert np.var(np.float64(np.asarray(x)), axis=0).tolist() == [0.0] * 4
  assert bool(jnp.all(new.var == 0.0)) and bool(jnp.all(y == 0.0))
  rows = jnp.full((2, 3, 1, n), value, jnp.float32)
  params = jn.NormParams(jnp.ones(n), jnp.zeros(n))
  for y in (
    jn.layer_norm(rows, params, epsilon=eps),
    jn.instance_norm(rows, params, epsilon=eps),
    jn.group_norm(rows, params, num_groups=1, epsilon=eps),
  ):
    assert bool(jnp.all(y == 0.0))


def test_overflowing_variance_is_inf_not_nan():
  # Deviations of 1e30 square beyond float32: the float64 variance, 2.7e60,
  # is inf in float32. It was inf - inf = NaN, in y and the running state.
  x = jnp.array([[1e30, 0.0], [-1e30, 0.0], [3e30, 0.0]], jnp.float32)
  assert np.var(np.float64(np.asarray(x))[:, 0]) > np.finfo(np.float32).max
  p, s = jn.batch_norm_init(2)
  y, new = jn.batch_norm(x, p, s, use_running_average=False, momentum=0.0)
  assert new.var.tolist() == [np.inf, 0.0]
  assert bool(jnp.all(y == 0.0))
  assert bool(jnp.all(jnp.isfinite(jn.layer_norm(x.T, jn.layer_norm_init(3)))))


def test_ghost_batch_nan_stays_in_its_ghost_batch():
  # A NaN in ghost batch 0 reached every ghost batch through the 0/1
  # contraction (0 * NaN). Reference: the second ghost batch alone, float64.
  x = jax.random.normal(jax.random.key(0), (6, 2)).at[1, 0].set(jnp.nan)
  p, s = jn.batch_norm_init(2)
  y, _ = jn.batch_norm(x, p, s, use_running_average=False, virtual_batch_size=3)
  assert bool(jnp.all(jnp.isnan(y[:3, 0])))
  second = np.float64(np.asarray(x[3:]))
  want = (second - second.mean(0)) / np.sqrt(second.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y[3:]), want, rtol=1e-5, atol=1e-6)


def test_flax_and_haiku_default_batch_norm_fail_the_stability_case():
  """The measurement can fail: flax's fast variance and haiku's E[x^2]-E[x]^2."""
  import flax.linen as nn
  import haiku as hk

  x = _offset_x((256, 16))
  var = np.asarray(x, np.float64).var(0)
  bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
  variables = bn.init(jax.random.key(0), x)
  _, upd = bn.apply(variables, x, mutable=["batch_stats"])
  rel = np.abs(np.asarray(upd["batch_stats"]["var"]) - var) / var
  assert rel.max() > 1.0  # off by more than 100 %, often by 10x or more

  def f(x):
    return hk.BatchNorm(True, True, decay_rate=0.0)(x, is_training=True)

  model = hk.transform_with_state(f)
  params, state = model.init(jax.random.key(0), x)
  y, _ = model.apply(params, state, None, x)
  assert bool(jnp.any(jnp.isnan(y)))


# ----------------------------------------------------------------------------
# memory: the backward pass keeps x plus per-row statistics only
# ----------------------------------------------------------------------------


def _residual_bytes(f, *args):
  """Bytes of every array that ``jax.vjp`` keeps for the backward pass."""

  def residuals(*a):
    return jax.tree.leaves(jax.vjp(f, *a)[1])

  leaves = jax.eval_shape(residuals, *args)
  return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves)


MEM_SHAPE = (16, 8, 8, 32)


@pytest.mark.parametrize("name", NAMES)
def test_backward_keeps_only_x_and_statistics(name):
  f = LAYERS[name]
  x = jax.ShapeDtypeStruct(MEM_SHAPE, jnp.float32)
  p = jn.NormParams(jnp.ones(32), jnp.zeros(32))
  c = 32

  def g(x, p):
    # the layers above are built for C = 8: rebuild their state at C = 32
    if name.startswith("batch_norm"):
      s = jn.BatchNormState(jnp.zeros(c), jnp.ones(c))
      return jn.batch_norm(x, p, s, use_running_average=name.endswith("eval"))[0]
    return f(x, p)

  used = _residual_bytes(g, x, p)
  x_bytes = int(np.prod(MEM_SHAPE)) * 4
  assert used <= 1.1 * x_bytes, used / x_bytes


def test_backward_memory_with_mask_adds_only_the_mask():
  x = jax.ShapeDtypeStruct(MEM_SHAPE, jnp.float32)
  mask = jnp.ones(MEM_SHAPE[:1] + (1, 1, 1), bool)
  p, s = jn.batch_norm_init(32)

  def g(x, p):
    return jn.batch_norm(x, p, s, use_running_average=False, mask=mask)[0]

  assert _residual_bytes(g, x, p) <= 1.1 * np.prod(MEM_SHAPE) * 4


def test_flax_keeps_more_which_shows_the_measurement_can_fail():
  import flax.linen as nn

  x = jnp.ones(MEM_SHAPE)
  x_bytes = x.nbytes
  bn = nn.BatchNorm(use_running_average=False)
  v = bn.init(jax.random.key(0), x)

  def f_bn(x, params):
    variables = {"params": params, "batch_stats": v["batch_stats"]}
    return bn.apply(variables, x, mutable=["batch_stats"])[0]

  assert _residual_bytes(f_bn, x, v["params"]) > 1.8 * x_bytes
  ln = nn.LayerNorm()
  w = ln.init(jax.random.key(0), x)
  assert _residual_bytes(lambda x, p: ln.apply({"params": p}, x), x, w["params"]) > (
    2.5 * x_bytes
  )


# ----------------------------------------------------------------------------
# rule 9: elements that are all masked give no NaN, nor do their gradients
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"normalize"}))
def test_fully_masked_input_gives_no_nan(name):
  f, p = LAYERS[name], _params()
  x = _x((2, 3, 3, C))
  mask = jnp.zeros((2, 1, 1, 1), bool)

  def loss(x, p):
    return jnp.sum(f(x, p, mask) ** 2)

  y = f(x, p, mask)
  gx, gp = jax.grad(loss, (0, 1))(x, p)
  for a in (y, gx, gp.scale, gp.bias):
    assert bool(jnp.all(jnp.isfinite(a))), name


def test_fully_masked_batch_norm_state_stays_finite():
  p, s = jn.batch_norm_init(C)
  x = _x((4, C))
  _, new = jn.batch_norm(
    x, p, s, use_running_average=False, mask=jnp.zeros((4, 1), bool), momentum=0.5
  )
  assert bool(jnp.all(jnp.isfinite(new.mean))) and bool(jnp.all(new.var >= 0))


@pytest.mark.parametrize("num_groups,shape", [(1, (64, 1, 1, 8)), (4, (64, 2, 2, 8))])
def test_group_norm_small_groups_at_large_mean(num_groups, shape):
  """SPEC rule 5 for a group of 8 values at 1e4 + N(0, 1): the variance used
  is exact to 1e-3, so every normalized group has variance 1 (a wrong mean
  only shifts the group; a wrong variance scales it)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(1e4 + rng.standard_normal(shape), jnp.float32)
  y = jn.group_norm(x, jn.group_norm_init(8), num_groups=num_groups, epsilon=0.0)
  yg = np.asarray(y, np.float64).reshape(shape[0], -1, num_groups, 8 // num_groups)
  var = yg.var(axis=(1, 3))
  np.testing.assert_allclose(var, 1.0, rtol=1e-3)
