"""Contract tests every core layer must pass (SPEC §3 rules 4 and 10).

jit, grad, vmap and eval_shape; bfloat16 and float16 inputs. The stability,
memory and fully-masked cases are in ``test_core_stability.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn

RNG = np.random.default_rng(1)
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
# jit, grad, vmap, eval_shape
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
  f, x, p = LAYERS[name], _x(), _params()
  mask = jnp.asarray(RNG.random(SHAPE) < 0.8)
  np.testing.assert_allclose(jax.jit(f)(x, p), f(x, p), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    jax.jit(f)(x, p, mask), f(x, p, mask), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("name", NAMES)
def test_grad_is_finite_and_matches_finite_differences(name):
  f, p = LAYERS[name], _params()
  x = _x((3, 2, 2, C))
  w = _x((3, 2, 2, C), loc=0.0, scale=1.0)

  def loss(x, scale, bias):
    return jnp.sum(f(x, jn.NormParams(scale, bias)) * w)

  grads = jax.jit(jax.grad(loss, (0, 1, 2)))(x, p.scale, p.bias)
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g)))
  # a directional finite difference in float64 NumPy-free form: f is smooth,
  # so (L(x + h v) - L(x - h v)) / 2h = <grad, v>.
  v = _x(x.shape, loc=0.0, scale=1.0)
  h = 1e-2
  fd = (loss(x + h * v, p.scale, p.bias) - loss(x - h * v, p.scale, p.bias)) / (2 * h)
  np.testing.assert_allclose(
    float(jnp.vdot(grads[0], v)), float(fd), rtol=2e-2, atol=2e-2
  )


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_an_extra_leading_axis(name):
  f, p = LAYERS[name], _params()
  xs = _x((3,) + SHAPE)
  ys = jax.vmap(f, in_axes=(0, None))(xs, p)
  for i in range(3):
    np.testing.assert_allclose(ys[i], f(xs[i], p), rtol=1e-5, atol=1e-5)
  # vmap over the params too (an ensemble of layers)
  ps = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), p)
  ys = jax.vmap(f, in_axes=(None, 0))(xs[0], ps)
  np.testing.assert_allclose(ys[1], f(xs[0], jax.tree.map(lambda a: 2 * a, p)), 1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_eval_shape(name):
  f, p = LAYERS[name], _params()
  spec = jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16)
  out = jax.eval_shape(f, spec, p)
  assert out.shape == SHAPE and out.dtype == jnp.bfloat16


def test_batch_norm_state_under_transformations():
  p, s = jn.batch_norm_init(C)
  x = _x()

  def step(x, p, s):
    return jn.batch_norm(x, p, s, use_running_average=False, momentum=0.9)

  out = jax.eval_shape(step, x, p, s)
  assert out[1].mean.shape == (C,) and out[1].var.dtype == jnp.float32
  y, new = jax.jit(step)(x, p, s)
  y2, new2 = step(x, p, s)
  np.testing.assert_allclose(new.var, new2.var, rtol=1e-6)
  # vmap: one state per slice
  xs = _x((2,) + SHAPE)
  ys, news = jax.vmap(step, in_axes=(0, None, None))(xs, p, s)
  assert news.var.shape == (2, C)
  np.testing.assert_allclose(news.var[1], step(xs[1], p, s)[1].var, rtol=1e-6)


# ----------------------------------------------------------------------------
# bfloat16 / float16: output dtype of x, statistics in float32
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_input(name, dtype):
  f, p = LAYERS[name], _params()
  # a sizeable offset: statistics accumulated in 16 bits would be far off
  x = _x((16, 6, 6, C), loc=30.0, scale=1.0, dtype=dtype)
  y = f(x, p)
  assert y.dtype == dtype
  y32 = f(x.astype(jnp.float32), p)  # the same (rounded) values, in float32
  # the only difference allowed is the rounding of the output to 16 bits
  ulp = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
  err = np.abs(np.asarray(y, np.float32) - np.asarray(y32))
  assert err.max() <= 2 * ulp * (1 + np.abs(np.asarray(y32)).max()), err.max()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_batch_norm_state_is_float32(dtype):
  p, s = jn.batch_norm_init(C, param_dtype=dtype)
  x = _x((64, C), loc=30.0, dtype=dtype)
  y, new = jn.batch_norm(x, p, s, use_running_average=False, momentum=0.0)
  assert y.dtype == dtype
  assert new.mean.dtype == new.var.dtype == jnp.float32
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(new.mean, x64.mean(0), rtol=1e-6)
  np.testing.assert_allclose(new.var, x64.var(0), rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_low_precision_gradients(name):
  dtype = jnp.bfloat16
  f, p = LAYERS[name], _params()
  x = _x((4, 3, 3, C), dtype=dtype)
  gx, gp = jax.grad(lambda x, p: jnp.sum(f(x, p).astype(jnp.float32) ** 3), (0, 1))(
    x, p
  )
  assert gx.dtype == dtype and gp.scale.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(gx.astype(jnp.float32))))
