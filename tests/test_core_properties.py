"""Equivalences between the layers and the properties the seeds discuss.

- GN with one group is LN over every non-batch axis with a per-channel affine;
  GN with ``group_size=1`` is IN.
- Normalization is not linear: N(a x) = N(x) for a > 0.
- With scale = batch std and bias = batch mean, training-mode BN returns its
  input (the "self-closing" property).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn

RNG = np.random.default_rng(2)


def _x(shape, loc=0.5, scale=2.0):
  return jnp.asarray(loc + scale * RNG.standard_normal(shape), jnp.float32)


def _params(c):
  return jn.NormParams(
    jnp.asarray(1.0 + 0.3 * RNG.standard_normal(c), jnp.float32),
    jnp.asarray(RNG.standard_normal(c), jnp.float32),
  )


def close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("axis", [-1, 1])
def test_group_norm_with_one_group_is_layer_norm(axis, masked):
  shape = (3, 6, 5, 4) if axis == 1 else (3, 5, 4, 6)
  x, p = _x(shape), _params(6)
  mask = jnp.asarray(RNG.random(shape) < 0.7) if masked else None
  y_gn = jn.group_norm(x, p, num_groups=1, axis=axis, mask=mask)
  y_ln = jn.layer_norm(
    x, p, reduction_axes=(1, 2, 3), feature_axes=axis, epsilon=1e-6, mask=mask
  )
  close(y_gn, y_ln)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape,axis", [((3, 4, 4, 6), -1), ((3, 6, 4, 4), 1)])
def test_group_norm_with_group_size_one_is_instance_norm(shape, axis, masked):
  x, p = _x(shape), _params(6)
  mask = jnp.asarray(RNG.random(shape) < 0.7) if masked else None
  y_gn = jn.group_norm(x, p, num_groups=None, group_size=1, axis=axis, mask=mask)
  close(y_gn, jn.instance_norm(x, p, axis=axis, mask=mask))
  y_gn = jn.group_norm(x, p, num_groups=6, axis=axis, mask=mask)
  close(y_gn, jn.instance_norm(x, p, axis=axis, mask=mask))


def _bn(x, p, **kw):
  s = jn.BatchNormState(jnp.zeros(p.scale.shape), jnp.ones(p.scale.shape))
  return jn.batch_norm(x, p, s, use_running_average=False, **kw)[0]


# epsilon=0 so that the invariance is exact, not approximate
INVARIANT = {
  "batch_norm": lambda x, p: _bn(x, p, epsilon=0.0),
  "batch_norm_nchw": lambda x, p: _bn(x, p, epsilon=0.0, axis=1),
  "layer_norm": lambda x, p: jn.layer_norm(x, p, epsilon=0.0),
  "layer_norm_chw": lambda x, p: jn.layer_norm(
    x, p, reduction_axes=(1, 2, 3), epsilon=0.0
  ),
  "rms_norm": lambda x, p: jn.rms_norm(x, p, epsilon=0.0),
  "group_norm": lambda x, p: jn.group_norm(x, p, num_groups=2, epsilon=0.0),
  "instance_norm": lambda x, p: jn.instance_norm(x, p, epsilon=0.0),
}


@pytest.mark.parametrize("name", sorted(INVARIANT))
@pytest.mark.parametrize("a", [1e-3, 0.5, 7.0, 1e3])
def test_scale_invariance_so_not_linear(name, a):
  f = INVARIANT[name]
  x, p = _x((4, 4, 4, 4)), _params(4)
  y = f(x, p)
  close(f(a * x, p), y, tol=5e-5)
  # a linear map would give a * y instead (bias zero to make that comparable)
  p0 = jn.NormParams(p.scale, jnp.zeros(4))
  if a != 1.0:
    assert not np.allclose(f(a * x, p0), a * f(x, p0), atol=1e-2)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape,axis", [((16, 3, 3, 5), -1), ((16, 5, 3, 3), 1)])
def test_batch_norm_is_self_closing(shape, axis, masked):
  """scale = sqrt(var + eps) and bias = mean of the batch give back x."""
  x = _x(shape, loc=4.0, scale=3.0)
  a = axis % x.ndim
  red = tuple(i for i in range(x.ndim) if i != a)
  x64 = np.asarray(x, np.float64)
  mask = RNG.random(shape) < 0.6 if masked else None
  m = np.ones(shape) if mask is None else mask
  mean = (x64 * m).sum(red) / m.sum(red)
  bshape = tuple(-1 if i == a else 1 for i in range(x.ndim))
  var = (((x64 - mean.reshape(bshape)) ** 2) * m).sum(red) / m.sum(red)
  eps = 1e-3
  p = jn.NormParams(
    jnp.asarray(np.sqrt(var + eps), jnp.float32), jnp.asarray(mean, jnp.float32)
  )
  y = _bn(x, p, axis=axis, epsilon=eps, mask=mask)
  close(y, x, tol=1e-4)
