"""The bare normalization formula, for users who bring their own statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxnorm import _checks, _stats


def normalize(
  x: ArrayLike,
  mean: ArrayLike,
  var: ArrayLike,
  *,
  scale: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  epsilon: float = 1e-5,
) -> jax.Array:
  r"""Applies given statistics to ``x``, with broadcasting.

  .. math::
    y = (x - \mathrm{mean}) \cdot \frac{1}{\sqrt{\mathrm{var} + \epsilon}}
        \cdot \mathrm{scale} + \mathrm{bias}

  This is ``tf.nn.batch_normalization``: nothing is reduced, every argument
  broadcasts against ``x``. Arithmetic is in at least float32 and the result
  has the dtype of ``x``.

  Args:
    x: input, any shape.
    mean: broadcastable to ``x``.
    var: broadcastable to ``x``; the biased variance.
    scale: optional, broadcastable to ``x``.
    bias: optional, broadcastable to ``x``.
    epsilon: added to ``var`` inside the square root.

  Returns:
    An array of the shape and dtype of ``x``.

  Raises:
    TypeError: if ``x`` is not floating point, or an array argument is not
      floating point (or is complex while ``x`` is real).
    ValueError: if an argument does not broadcast to ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    >>> jn.normalize(x, x.mean(0), x.var(0), epsilon=0.0)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
  """
  x = _checks.check_input(x)
  args = {"mean": mean, "var": var, "scale": scale, "bias": bias}
  for name, v in args.items():
    if v is None:
      continue
    shape = jnp.shape(v)
    try:
      ok = jnp.broadcast_shapes(shape, x.shape) == x.shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(
        f"`{name}` of shape {shape} does not broadcast to `x` of shape {x.shape}."
      )
    # A Python number is weakly typed and takes x's dtype; an array must be
    # floating point (and real for real x), as every layer's parameters.
    if _checks.is_int(v) or type(v) is float:
      continue
    if isinstance(v, (bool, np.bool_)):
      raise TypeError(f"`{name}` must be a number or a float array, got {v!r}.")
    _checks.check_param(v, shape, name, x.dtype)
  dtype = _checks.compute_dtype(x.dtype)
  return _stats.normalize_with(
    x,
    mean,
    var,
    scale=None if scale is None else jnp.asarray(scale),
    bias=None if bias is None else jnp.asarray(bias),
    epsilon=epsilon,
    dtype=dtype,
    out_dtype=x.dtype,
  )
