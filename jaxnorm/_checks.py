"""Argument checks and axis canonicalisation shared by every layer.

Everything here runs at trace time on static shapes and Python values, so a
bad argument raises before any computation is staged.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Axes = int | Sequence[int]


def canonicalize_axes(ndim: int, axes: Axes, name: str) -> tuple[int, ...]:
  """Returns sorted, non-negative, de-duplicated axes, or raises naming ``name``."""
  if isinstance(axes, bool):
    raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.")
  if isinstance(axes, int):
    axes = (axes,)
  try:
    axes = tuple(axes)
  except TypeError:
    raise TypeError(
      f"`{name}` must be an int or a sequence of ints, got {axes!r}."
    ) from None
  out = set()
  for a in axes:
    if not isinstance(a, int) or isinstance(a, bool):
      raise TypeError(f"`{name}` must contain ints, got {a!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(f"`{name}`={a} is out of range for an input of rank {ndim}.")
    out.add(a % ndim)
  return tuple(sorted(out))


def check_input(x: Any, name: str = "x") -> jax.Array:
  """Returns ``x`` as an array, raising ``TypeError`` unless it is inexact."""
  if not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    raise TypeError(
      f"`{name}` must be a floating-point or complex array, got dtype "
      f"{x.dtype}. Cast it first, e.g. `{name}.astype(jnp.float32)`."
    )
  return jnp.asarray(x)


def compute_dtype(x_dtype: Any, dtype: Any = None, force_float32: bool = True):
  """The dtype statistics are accumulated in: at least float32 by default."""
  base = jnp.dtype(dtype) if dtype is not None else jnp.dtype(x_dtype)
  if force_float32:
    return jnp.promote_types(base, jnp.float32)
  return base


def check_mask(mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
  """Returns a boolean mask broadcastable to ``shape``, or raises naming ``mask``."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if not (
    jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.integer)
  ):
    raise TypeError(f"`mask` must be a boolean array, got dtype {mask.dtype}.")
  try:
    out = jnp.broadcast_shapes(mask.shape, shape)
  except ValueError:
    out = None
  if out != tuple(shape):
    raise ValueError(
      f"`mask` of shape {mask.shape} does not broadcast to the input shape "
      f"{tuple(shape)}."
    )
  if mask.ndim < len(shape):
    mask = mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)
  return mask.astype(bool)


def check_param(p: Any, expected: tuple[int, ...], name: str) -> jax.Array | None:
  """Checks that a parameter or state leaf has the shape the input implies."""
  if p is None:
    return None
  p = jnp.asarray(p)
  if tuple(p.shape) != tuple(expected):
    raise ValueError(
      f"`{name}` has shape {tuple(p.shape)}, but the input implies {tuple(expected)}."
    )
  return p


def check_axis_name(
  axis_name: Hashable | None, axis_index_groups: Any
) -> tuple[int, tuple[tuple[int, ...], ...] | None]:
  """Validates ``axis_name`` and ``axis_index_groups``.

  Returns:
    ``(axis_size, groups)`` where ``groups`` is a tuple of tuples or ``None``.
    ``axis_size`` is 1 when ``axis_name`` is ``None``.
  """
  if axis_name is None:
    if axis_index_groups is not None:
      raise ValueError("`axis_index_groups` needs an `axis_name`.")
    return 1, None
  try:
    size = lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
      f"`axis_name`={axis_name!r} is not bound: call the layer inside "
      "`jax.pmap`, `jax.shard_map` or `jax.vmap` with that axis name, or pass "
      "`axis_name=None` (under `jax.jit` with sharded inputs the statistics "
      "are already global)."
    ) from None
  if axis_index_groups is None:
    return size, None
  try:
    groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
  except TypeError:
    raise TypeError(
      "`axis_index_groups` must be a sequence of sequences of device indices."
    ) from None
  sizes = {len(g) for g in groups}
  if len(sizes) != 1 or 0 in sizes:
    raise ValueError(
      "`axis_index_groups` must hold non-empty groups of equal size, got sizes "
      f"{[len(g) for g in groups]}."
    )
  flat = sorted(i for g in groups for i in g)
  if flat != list(range(size)):
    raise ValueError(
      f"`axis_index_groups` must cover every index of axis {axis_name!r} "
      f"(0..{size - 1}) exactly once, got {axis_index_groups!r}."
    )
  return size, groups


def feature_shape(x_shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(x_shape[a] for a in axes)


def broadcast_shape(x_ndim: int, x_shape, axes: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of a per-feature array reshaped to broadcast against ``x``."""
  return tuple(x_shape[a] if a in axes else 1 for a in range(x_ndim))
