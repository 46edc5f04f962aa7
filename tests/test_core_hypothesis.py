"""A small Hypothesis property test: BN and LN against float64 NumPy over
random shapes, axes and values."""

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxnorm as jn


def np_norm(x, axes, eps):
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=axes, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps), var


def close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


@settings(
  max_examples=6,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow],
  derandomize=True,
)
@given(
  shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=2, max_side=5),
  data=st.data(),
)
def test_property_batch_and_layer_norm_match_numpy(shape, data):
  ndim = len(shape)
  x = data.draw(
    hnp.arrays(
      np.float32,
      shape,
      elements=st.floats(-100, 100, width=32, allow_subnormal=False),
    )
  )
  axis = data.draw(st.integers(-ndim, ndim - 1))
  red = tuple(a for a in range(ndim) if a != axis % ndim)
  # the data may be constant along a reduction: a large epsilon keeps the
  # comparison well conditioned without hiding a wrong formula
  eps = 1.0
  p, s = jn.batch_norm_init(shape[axis])
  y, new = jn.batch_norm(
    x, p, s, use_running_average=False, axis=axis, epsilon=eps, momentum=0.0
  )
  close(y, np_norm(x, red, eps)[0], tol=1e-4)
  close(new.var, np_norm(x, red, eps)[1].reshape(-1), tol=1e-3)

  raxes = tuple(sorted(set(data.draw(st.lists(st.integers(0, ndim - 1), min_size=1)))))
  y = jn.layer_norm(
    x,
    jn.layer_norm_init(shape[-1]),
    reduction_axes=raxes,
    feature_axes=-1,
    epsilon=eps,
  )
  close(y, np_norm(x, raxes, eps)[0], tol=1e-4)
