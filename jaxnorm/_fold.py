"""Folding batch norm into the preceding linear layer (for inference).

In evaluation, batch norm is a per-channel affine map of fixed coefficients,
so a ``Dense`` or ``Conv`` followed by it is one ``Dense`` or ``Conv`` with a
rescaled kernel and a new bias: one layer less to run at inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxnorm import _checks
from jaxnorm._types import NormParams

# Argument names used in error messages; the flax helpers pass their own.
_CORE_NAMES: Mapping[str, str] = {
  "kernel": "kernel",
  "bias": "bias",
  "scale": "params.scale",
  "bn_bias": "params.bias",
  "mean": "state.mean",
  "var": "state.var",
  "epsilon": "epsilon",
}


def _as_real_float(v: Any, name: str) -> jax.Array:
  """``v`` as an array, or ``TypeError`` naming ``name`` unless real floating."""
  if v is None:
    raise TypeError(f"`{name}` must be an array, got None.")
  try:
    v = jnp.asarray(v)
  except TypeError:
    raise TypeError(f"`{name}` must be an array, got {type(v).__name__}.") from None
  if not jnp.issubdtype(v.dtype, jnp.floating):
    raise TypeError(
      f"`{name}` must be a real floating-point array, got dtype {v.dtype}."
    )
  return v


def _feature_vector(
  v: Any, name: str, kernel_name: str, kernel_shape: tuple[int, ...]
) -> jax.Array | None:
  """Checks that ``v`` is ``None`` or a float vector of the output features."""
  if v is None:
    return None
  v = _as_real_float(v, name)
  out = kernel_shape[-1]
  if v.ndim != 1:
    raise ValueError(
      f"`{name}` must have shape ({out},) (`{kernel_name}` of shape "
      f"{kernel_shape} has {out} output features, its last axis), got shape "
      f"{tuple(v.shape)}."
    )
  if v.shape[0] != out:
    raise ValueError(
      f"`{kernel_name}` has {out} output features (its last axis, shape "
      f"{kernel_shape}) but `{name}` has {v.shape[0]}."
    )
  return v


def fold(
  kernel: Any,
  bias: Any,
  scale: Any,
  bn_bias: Any,
  mean: Any,
  var: Any,
  epsilon: Any,
  names: Mapping[str, str] = _CORE_NAMES,
) -> tuple[jax.Array, jax.Array]:
  """The folding itself, on plain arrays; ``names`` label the error messages."""
  kernel = _as_real_float(kernel, names["kernel"])
  if kernel.ndim < 1:
    raise ValueError(
      f"`{names['kernel']}` must have at least one axis (the output features "
      "last), got a scalar."
    )
  kshape = tuple(kernel.shape)
  vec = {}
  for key, v in (
    ("bias", bias),
    ("scale", scale),
    ("bn_bias", bn_bias),
    ("mean", mean),
    ("var", var),
  ):
    if v is None and key in ("mean", "var"):
      raise TypeError(f"`{names[key]}` must be an array, got None.")
    vec[key] = _feature_vector(v, names[key], names["kernel"], kshape)
  epsilon = _checks.check_hyper(epsilon, names["epsilon"])
  _checks.traced_check(names["epsilon"], epsilon, low=0.0)
  _checks.traced_check(names["var"], vec["var"], low=0.0)

  # At least float32 (a bfloat16 variance near 0 loses every digit of
  # rsqrt), and float64 when any input is float64.
  present = [v.dtype for v in (kernel, *vec.values()) if v is not None]
  dtype = jnp.result_type(jnp.float32, *present)
  s = lax.rsqrt(vec["var"].astype(dtype) + epsilon)
  if vec["scale"] is not None:
    s = s * vec["scale"].astype(dtype)
  new_kernel = (kernel.astype(dtype) * s).astype(kernel.dtype)
  shift = -vec["mean"].astype(dtype)
  if vec["bias"] is not None:
    shift = vec["bias"].astype(dtype) + shift
  new_bias = shift * s
  if vec["bn_bias"] is not None:
    new_bias = new_bias + vec["bn_bias"].astype(dtype)
  # The layer's parameter dtype: the bias it had, or the kernel's (what the
  # layer built with `use_bias=True` and the same `param_dtype` creates).
  bias_dtype = kernel.dtype if vec["bias"] is None else vec["bias"].dtype
  return new_kernel, new_bias.astype(bias_dtype)


def fold_batch_norm(
  kernel: ArrayLike,
  bias: ArrayLike | None,
  params: NormParams,
  state: Any,
  *,
  epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
  r"""Folds evaluation-mode batch norm into the linear layer before it.

  A ``Dense`` or ``Conv`` layer (``y = x @ kernel + bias``, or the
  convolution) followed by :func:`jaxnorm.batch_norm` with
  ``use_running_average=True`` over its output features is the same layer
  with

  .. math::
    s = \mathrm{scale} / \sqrt{\mathrm{var} + \epsilon}, \qquad
    \mathrm{kernel}' = \mathrm{kernel} \cdot s, \qquad
    \mathrm{bias}' = (\mathrm{bias} - \mathrm{mean}) \cdot s
      + \mathrm{bn\_bias},

  ``s`` broadcast over the last axis of ``kernel``. So ``x @ kernel' +
  bias'`` equals ``batch_norm(x @ kernel + bias, params, state,
  use_running_average=True, epsilon=epsilon)`` to floating-point rounding,
  and so does a convolution with any padding, strides, dilation or
  ``feature_group_count``: only output channels are rescaled. A missing
  ``scale`` is 1, a missing ``bias`` or BN bias 0.

  The running statistics are used as they are: a
  :class:`jaxnorm.TorchBatchNormState` (PyTorch's unbiased running variance,
  which PyTorch also uses as it is in evaluation) folds the same way.

  Dtypes: the arithmetic is done in at least float32 (float64 if any input
  is float64). The folded parameters keep the layer's dtypes: ``kernel'``
  has the dtype of ``kernel``, and ``bias'`` that of ``bias``, or of
  ``kernel`` when ``bias`` is ``None``. Works under ``jax.jit`` (a traced
  ``epsilon`` is used unchecked).

  Args:
    kernel: ``(..., out)``: the output features last, as in flax (``Dense``:
      ``(in, out)``; ``Conv``: ``(*window, in // groups, out)``).
    bias: ``(out,)`` or ``None`` (a layer without bias).
    params: ``NormParams(scale, bias)`` of the batch norm, each ``(out,)``
      or ``None``.
    state: the running statistics, anything with ``mean`` and ``var`` of
      shape ``(out,)``: :class:`jaxnorm.BatchNormState` or
      :class:`jaxnorm.TorchBatchNormState`.
    epsilon: the batch norm's ``epsilon``, added to ``var``.

  Returns:
    ``(kernel', bias')``: ``kernel'`` of the shape and dtype of ``kernel``,
    ``bias'`` of shape ``(out,)``, always an array.

  Raises:
    TypeError: ``kernel``, ``bias``, a field of ``params`` or ``state`` is
      not a real floating-point array (``mean`` and ``var`` are required);
      ``params`` has no ``scale``/``bias`` or ``state`` no ``mean``/``var``;
      ``epsilon`` is not a real scalar.
    ValueError: ``kernel`` is a scalar; a vector does not have shape
      ``(out,)``; a concrete ``epsilon`` is negative or not finite.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> kernel = jax.random.normal(k1, (4, 3))  # a Dense layer, 4 -> 3
    >>> params = jn.NormParams(scale=jnp.array([1.0, 2.0, 0.5]),
    ...                        bias=jnp.array([0.1, 0.0, -0.1]))
    >>> state = jn.BatchNormState(mean=jax.random.normal(k2, (3,)),
    ...                           var=jnp.array([0.5, 1.0, 4.0]))
    >>> new_kernel, new_bias = jn.fold_batch_norm(kernel, None, params, state)
    >>> x = jax.random.normal(k3, (2, 4))
    >>> y, _ = jn.batch_norm(x @ kernel, params, state, use_running_average=True)
    >>> bool(jnp.allclose(x @ new_kernel + new_bias, y, atol=1e-5))
    True
    >>> new_bias.shape
    (3,)
  """
  if not (hasattr(params, "scale") and hasattr(params, "bias")):
    hint = (
      " For flax variables use `jaxnorm.linen.fold_batch_norm`."
      if isinstance(params, Mapping)
      else ""
    )
    raise TypeError(
      "`params` must be a `jaxnorm.NormParams(scale, bias)`, got "
      f"{type(params).__name__}.{hint}"
    )
  if not (hasattr(state, "mean") and hasattr(state, "var")):
    raise TypeError(
      "`state` must have `mean` and `var` (a `jaxnorm.BatchNormState` or "
      f"`jaxnorm.TorchBatchNormState`), got {type(state).__name__}."
    )
  return fold(kernel, bias, params.scale, params.bias, state.mean, state.var, epsilon)
