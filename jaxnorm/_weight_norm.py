"""Weight normalization (Salimans & Kingma, 2016)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxnorm import _checks

Axes = int | Sequence[int] | None


def _axes(v: jax.Array, feature_axes: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(feature_axes, reduction_axes)`` of ``v``; ``None`` keeps no axis."""
  if feature_axes is None:
    faxes: tuple[int, ...] = ()
  else:
    faxes = _checks.canonicalize_axes(v.ndim, feature_axes, "feature_axes")
  return faxes, tuple(a for a in range(v.ndim) if a not in faxes)


def _real(v: jax.Array) -> jax.Array:
  if jnp.iscomplexobj(v):
    raise TypeError(f"`v` must be real floating point, got dtype {v.dtype}.")
  return v


def weight_norm_init(v: ArrayLike, *, feature_axes: Axes = -1) -> jax.Array:
  """The ``scale`` that makes :func:`weight_norm` return ``v`` itself.

  ``scale = ||v||``, the L2 norm over every axis of ``v`` except
  ``feature_axes`` (one norm per output feature), so a layer whose weight
  is reparameterized computes the same function at init (Salimans &
  Kingma, 2016, Sec. 2). flax's ``WeightNorm`` starts ``scale`` at ones
  instead, which rescales every output feature to norm 1.

  Args:
    v: the weight, e.g. a Dense kernel ``(in, out)`` or a Conv kernel
      ``(kh, kw, in, out)``.
    feature_axes: the axes that keep their own norm (default: the last,
      the output features); ``None`` for one norm over the whole array.

  Returns:
    ``scale`` of shape ``v.shape[feature_axes]`` (``()`` for ``None``),
    float32 or wider.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> jn.weight_norm_init(jnp.array([[3.0, 0.0], [4.0, 1.0]]))
    Array([5., 1.], dtype=float32)
  """
  v = _real(_checks.check_input(v, "v"))
  faxes, raxes = _axes(v, feature_axes)
  vf = v.astype(jnp.promote_types(v.dtype, jnp.float32))
  norm = jnp.sqrt(jnp.sum(jnp.square(vf), axis=raxes, keepdims=True))
  return norm.reshape(tuple(v.shape[a] for a in faxes))


def weight_norm(
  v: ArrayLike,
  scale: ArrayLike | None,
  *,
  feature_axes: Axes = -1,
  epsilon: float = 1e-12,
) -> jax.Array:
  r"""Weight normalization: ``w = scale * v / ||v||``.

  .. math::
    w = \mathrm{scale} \cdot \frac{v}{\sqrt{\sum_{\text{other axes}} v^2
        + \epsilon}}

  The norm is taken over every axis except ``feature_axes``, so each output
  feature has its own direction ``v / ||v||`` and length ``scale``
  (Salimans & Kingma, 2016). ``epsilon`` sits inside the square root, as in
  ``flax.linen.WeightNorm``. Gradients flow to both ``v`` and ``scale``.

  Args:
    v: the unnormalized weight.
    scale: the length per feature, of shape ``v.shape[feature_axes]``, or
      ``None`` for unit norm.
    feature_axes: axes that keep their own norm (default: the last);
      ``None`` for one norm over the whole array.
    epsilon: added to the squared norm.

  Returns:
    The normalized weight, of the shape of ``v`` and the dtype of ``v``
    promoted with ``scale``.

  Raises:
    TypeError: ``v`` not floating point, or ``scale`` not floating point
      (or complex).
    ValueError: ``feature_axes`` out of range, ``scale`` of the wrong
      shape, or a concrete ``epsilon`` negative or not finite.

  References:
    Salimans, Kingma. *Weight Normalization: A Simple Reparameterization to
    Accelerate Training of Deep Neural Networks*. NeurIPS 2016.
    arXiv:1602.07868.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> v = jax.random.normal(jax.random.key(0), (4, 3))
    >>> w = jn.weight_norm(v, jn.weight_norm_init(v))
    >>> bool(jnp.allclose(w, v, atol=1e-6))
    True
  """
  v = _real(_checks.check_input(v, "v"))
  epsilon = _checks.check_hyper(epsilon, "epsilon")
  faxes, raxes = _axes(v, feature_axes)
  cdtype = jnp.promote_types(v.dtype, jnp.float32)
  vf = v.astype(cdtype)
  w = vf * lax.rsqrt(jnp.sum(jnp.square(vf), axis=raxes, keepdims=True) + epsilon)
  out_dtype = v.dtype
  if scale is not None:
    shape = tuple(v.shape[a] for a in faxes)
    scale = _checks.check_param(scale, shape, "scale", v.dtype, x_name="v")
    bshape = _checks.broadcast_shape(v.ndim, v.shape, faxes)
    w = w * scale.astype(cdtype).reshape(bshape)
    out_dtype = jnp.result_type(v.dtype, scale.dtype)
  return w.astype(out_dtype)
