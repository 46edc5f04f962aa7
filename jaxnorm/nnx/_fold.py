"""Folding an nnx batch norm into the ``Linear`` or ``Conv`` before it."""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxnorm import _checks
from jaxnorm._fold import fold
from jaxnorm.nnx._normalization import BatchNorm

# Exact classes: a subclass may change the computation (``nnx.LoRALinear``
# adds a low-rank term that a rescaled kernel would not cover).
_LAYERS = (nnx.Linear, nnx.Conv)
_NORMS = (BatchNorm, nnx.BatchNorm)


def _value(variable: Any) -> Any:
  return None if variable is None else variable[...]


def _check_axis(bn: Any, layer: Any) -> None:
  """Raises unless ``bn`` normalizes the last axis of ``layer``'s output."""
  axis = bn.axis
  if not _checks.is_int(axis):
    try:
      axes = tuple(axis)
    except TypeError:
      axes = ()
    axis = axes[0] if len(axes) == 1 and _checks.is_int(axes[0]) else None
  # A batched Conv output has the kernel's rank (batch, *window, channels);
  # a Linear's output rank is not known here, so only -1 is unambiguous.
  last = {-1}
  if type(layer) is nnx.Conv:
    last.add(layer.kernel.ndim - 1)
  if axis is None or int(axis) not in last:
    raise ValueError(
      f"`bn.axis`={bn.axis!r} is not the last axis: folding needs the batch "
      "norm to normalize the layer's output features, the last axis "
      f"(`axis=-1`, or {layer.kernel.ndim - 1} after a batched Conv)."
    )


def fold_batch_norm(layer: nnx.Linear | nnx.Conv, bn: Any) -> nnx.Linear | nnx.Conv:
  r"""Folds an nnx batch norm into the ``Linear`` or ``Conv`` before it.

  Returns a new layer of the class of ``layer``, with ``use_bias=True``,
  whose output equals ``bn(layer(x))`` in evaluation mode (running
  statistics): the kernel rescaled per output feature and a new bias, by
  :func:`jaxnorm.fold_batch_norm`'s formula with ``bn.epsilon``:

  .. math::
    s = \mathrm{scale} / \sqrt{\mathrm{var} + \epsilon}, \quad
    \mathrm{kernel}' = \mathrm{kernel} \cdot s, \quad
    \mathrm{bias}' = (\mathrm{bias} - \mathrm{mean}) \cdot s + \beta.

  Every other setting of ``layer`` (strides, padding, dilation, groups,
  ``mask``, dtypes, the parameters' metadata) is kept; ``layer`` and ``bn``
  are not modified. The parameters keep ``layer``'s dtypes (a new bias gets
  the kernel's). Use it to build an inference model: the folded model runs
  one layer less per pair and has no batch statistics left to manage.

  Args:
    layer: an :class:`flax.nnx.Linear` (kernel ``(in, out)``) or
      :class:`flax.nnx.Conv` (kernel ``(*window, in // groups, out)``), with
      or without bias.
    bn: a :class:`jaxnorm.nnx.BatchNorm` or :class:`flax.nnx.BatchNorm` of
      ``out`` features that normalizes the last axis of ``layer``'s output.

  Returns:
    A new ``nnx.Linear`` or ``nnx.Conv`` with ``use_bias=True``.

  Raises:
    TypeError: ``layer`` is not exactly an ``nnx.Linear`` or ``nnx.Conv``
      (a subclass such as ``nnx.LoRALinear`` may compute something else),
      or ``bn`` is not one of the batch norms above.
    ValueError: ``bn.axis`` is not the last axis; ``bn`` has a different
      number of features than ``layer``'s outputs.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> rngs = nnx.Rngs(0)
    >>> conv = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    >>> bn = jnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    >>> x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
    >>> _ = bn(conv(x) + 1.0)  # training: the running statistics move
    >>> bn.eval()
    >>> folded = jnx.fold_batch_norm(conv, bn)
    >>> bool(jnp.allclose(folded(x), bn(conv(x)), atol=1e-5))
    True
    >>> type(folded).__name__, folded.use_bias
    ('Conv', True)
  """
  if type(layer) not in _LAYERS:
    raise TypeError(
      "`layer` must be a `flax.nnx.Linear` or `flax.nnx.Conv` (not a "
      f"subclass, which may compute something else), got {type(layer).__name__}."
    )
  if not isinstance(bn, _NORMS):
    raise TypeError(
      "`bn` must be a `jaxnorm.nnx.BatchNorm` or `flax.nnx.BatchNorm`, got "
      f"{type(bn).__name__}."
    )
  _check_axis(bn, layer)
  out = layer.kernel.shape[-1]
  if bn.mean.shape != (out,):
    raise ValueError(
      f"`layer` has {out} output features but `bn` normalizes "
      f"{bn.mean.shape[0] if bn.mean.ndim == 1 else bn.mean.shape}."
    )
  kernel, bias = fold(
    layer.kernel[...],
    _value(layer.bias),
    _value(bn.scale),
    _value(bn.bias),
    bn.mean[...],
    bn.var[...],
    bn.epsilon,
    names={
      "kernel": "layer.kernel",
      "bias": "layer.bias",
      "scale": "bn.scale",
      "bn_bias": "bn.bias",
      "mean": "bn.mean",
      "var": "bn.var",
      "epsilon": "bn.epsilon",
    },
  )
  new = nnx.clone(layer)
  # `replace` keeps each Param's metadata (sharding names and the like).
  new.kernel = layer.kernel.replace(kernel)
  new.bias = nnx.Param(bias) if layer.bias is None else layer.bias.replace(bias)
  new.use_bias = True
  return new
