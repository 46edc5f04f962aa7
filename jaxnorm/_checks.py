"""Argument checks and axis canonicalisation shared by every layer.

Everything here runs at trace time on static shapes and Python values, so a
bad argument raises before any computation is staged.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

Axes = int | Sequence[int]

# Where flax fails on a bad argument with an IndexError, ZeroDivisionError or
# TypeError (raised by the code it reaches, not by a check), jaxnorm's check
# raises an exception that is both that and a ValueError, so that except
# clauses and ``pytest.raises`` written for either keep working (SPEC section
# 4). An axis out of range is NumPy's ``AxisError`` (a ValueError and an
# IndexError), as in NumPy and jax.numpy.
AxisError = np.exceptions.AxisError


class GroupSizeError(ValueError, ZeroDivisionError):
  """``group_size=0``: flax's modulo by zero, as a ValueError too."""


class FeatureShapeError(ValueError, TypeError):
  """Features that do not match the input: an nnx module's ``num_features``,
  or a linen module's stored ``batch_stats`` (flax's layers fail on both
  with a TypeError from a reshape or broadcast)."""


def is_int(v: Any) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def as_int(v: Any, name: str, *, least: int | None = None) -> int:
  """``v`` as a Python int (NumPy integers accepted), or raises naming ``name``."""
  if not is_int(v):
    raise TypeError(f"`{name}` must be an int, got {v!r} of type {type(v).__name__}.")
  v = int(v)
  if least is not None and v < least:
    raise ValueError(f"`{name}` must be at least {least}, got {v}.")
  return v


def as_bool(v: Any, name: str) -> bool:
  """``v`` as a Python bool (NumPy bools accepted), or raises naming ``name``."""
  if not isinstance(v, (bool, np.bool_)):
    raise TypeError(
      f"`{name}` must be a Python bool (it selects the code path at trace "
      f"time), got {type(v).__name__}."
    )
  return bool(v)


def _concrete(v: Any):
  """The value of ``v`` as a NumPy array if it is known at trace time."""
  try:
    return np.asarray(v)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_hyper(v: Any, name: str, *, low: float = 0.0, high: float = math.inf) -> Any:
  """Checks a float hyperparameter where it is concrete.

  ``epsilon``, ``momentum``, ``r_max``... A Python or NumPy number, or a
  concrete array, must be finite and within ``[low, high]``. A traced value
  (a schedule under ``jit``) cannot be checked at trace time and is used as
  it is: a NaN there spreads to the output (see the NaN policy in
  ``docs/numerics.md``).
  """
  if type(v) is float and low <= v <= high and math.isfinite(v):
    return v  # The common case, on every call of every layer: no array.
  if v is None or isinstance(v, (bool, np.bool_, str, bytes)):
    raise TypeError(f"`{name}` must be a number, got {v!r}.")
  if not isinstance(v, (int, float, np.number, np.ndarray, jax.Array)):
    raise TypeError(f"`{name}` must be a number, got {type(v).__name__}.")
  if jnp.ndim(v) != 0:
    raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(v)}.")
  if not jnp.issubdtype(jnp.result_type(v), jnp.number) or jnp.iscomplexobj(v):
    raise TypeError(f"`{name}` must be a real number, got {v!r}.")
  value = _concrete(v)
  if value is not None:
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
      bound = f"[{low}, {high}]" if math.isfinite(high) else f">= {low}"
      raise ValueError(f"`{name}` must be finite and {bound}, got {value}.")
    if isinstance(v, (int, float, np.number)):
      return value
  return v


def check_dtype(dtype: Any, name: str = "dtype") -> Any:
  """``None`` or a floating dtype, or raises ``TypeError`` naming ``name``."""
  if dtype is None:
    return None
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"`{name}` must be a floating dtype, got {dtype!r}.") from None
  if not jnp.issubdtype(dt, jnp.inexact):
    raise TypeError(f"`{name}` must be a floating dtype, got {dt}.")
  return dt


def canonicalize_axes(ndim: int, axes: Axes, name: str) -> tuple[int, ...]:
  """Returns sorted, non-negative, de-duplicated axes, or raises naming ``name``."""
  if isinstance(axes, (bool, np.bool_, str)):
    raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.")
  if is_int(axes):
    axes = (axes,)
  try:
    axes = tuple(axes)
  except TypeError:
    raise TypeError(
      f"`{name}` must be an int or a sequence of ints, got {axes!r}."
    ) from None
  out = set()
  for a in axes:
    if not is_int(a):
      raise TypeError(f"`{name}` must contain ints, got {a!r}.")
    a = int(a)
    if not -ndim <= a < ndim:
      raise AxisError(
        f"`{name}`={a} is out of range for an input of rank {ndim} (tuple index "
        "out of range)."
      )
    out.add(a % ndim)
  return tuple(sorted(out))


def single_axis(ndim: int, axis: Any, name: str = "axis") -> int:
  """One axis, or raises naming ``name`` (a layer with one channel axis)."""
  axes = canonicalize_axes(ndim, axis, name)
  if len(axes) != 1:
    raise ValueError(f"`{name}` must be a single axis for this layer, got {axis!r}.")
  return axes[0]


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
  dtype = check_dtype(dtype)
  base = dtype if dtype is not None else jnp.dtype(x_dtype)
  if force_float32:
    return jnp.promote_types(base, jnp.float32)
  return base


def check_mask(mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
  """Returns a boolean mask broadcastable to ``shape``, or raises naming ``mask``."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if not jnp.issubdtype(mask.dtype, jnp.bool_):
    raise TypeError(
      f"`mask` must be a boolean array, got dtype {mask.dtype} (an integer "
      "mask is ambiguous: pass `mask != 0` or `mask.astype(bool)`)."
    )
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


def check_fields(obj: Any, name: str, cls: type) -> None:
  """``obj`` has every field of the NamedTuple ``cls`` (it is one, or any
  object with those attributes), or raises ``TypeError`` naming ``name``:
  a dict or tuple in its place would otherwise fail deeper down with an
  ``AttributeError``."""
  missing = [f for f in cls._fields if not hasattr(obj, f)]
  if missing:
    hint = (
      f" For a dict `d`, pass `jaxnorm.{cls.__name__}(**d)`."
      if isinstance(obj, Mapping)
      else ""
    )
    raise TypeError(
      f"`{name}` must be a `jaxnorm.{cls.__name__}` with fields "
      f"{', '.join(cls._fields)}; got {type(obj).__name__}, which has no "
      f"`{missing[0]}`.{hint}"
    )


def check_param(
  p: Any,
  expected: tuple[int, ...],
  name: str,
  x_dtype: Any = None,
  x_name: str = "x",
  *,
  required: bool = False,
) -> jax.Array | None:
  """Checks that a parameter or state leaf has the shape the input implies.

  With ``x_dtype``, also that it is floating point, and real unless ``x`` is
  complex: an integer state would be truncated at every update, and the
  imaginary part of a complex parameter silently dropped. ``None`` (no
  scale, no bias) passes unless ``required``.
  """
  if p is None:
    if required:
      raise TypeError(f"`{name}` is None, but the layer needs it.")
    return None
  p = jnp.asarray(p)
  if x_dtype is not None:
    if not jnp.issubdtype(p.dtype, jnp.inexact):
      raise TypeError(f"`{name}` must be a floating-point array, got dtype {p.dtype}.")
    if jnp.issubdtype(p.dtype, jnp.complexfloating) and not jnp.issubdtype(
      x_dtype, jnp.complexfloating
    ):
      raise TypeError(
        f"`{name}` is complex ({p.dtype}) but `{x_name}` is real "
        f"({jnp.dtype(x_dtype)})."
      )
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
    groups = tuple(tuple(i for i in g) for g in axis_index_groups)
  except TypeError:
    groups = None
  if groups is None or not all(is_int(i) for g in groups for i in g):
    raise TypeError(
      "`axis_index_groups` must be a sequence of sequences of int device "
      f"indices, got {axis_index_groups!r}."
    )
  groups = tuple(tuple(int(i) for i in g) for g in groups)
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


def num_features_shape(num_features: Any) -> tuple[int]:
  """``(num_features,)`` for a module's parameters, or raises naming it.

  Same exception type and text as flax's modules for a negative size (jax's
  broadcast error), followed by the argument's name.
  """
  if not is_int(num_features):
    raise TypeError(
      f"`num_features` must be an int, got {num_features!r} of type "
      f"{type(num_features).__name__}."
    )
  if num_features < 0:
    raise TypeError(
      "broadcast_in_dim shape must have every element be nonnegative, got "
      f"({int(num_features)},). `num_features` must be positive."
    )
  return (int(num_features),)


_CHECKIFY = contextvars.ContextVar("jaxnorm_checkify", default=False)


@contextlib.contextmanager
def checkify_checks(enabled: bool = True) -> Iterator[None]:
  """Within this context, layers traced add ``checkify`` checks.

  The checks (a NaN or Inf in ``x`` where it enters the statistics, in the
  statistics themselves, in a traced ``epsilon`` or ``momentum``, or one out
  of range) become named errors when the function is transformed by
  ``jax.experimental.checkify.checkify``. Off by default: a check that is
  not functionalized by ``checkify`` fails under ``jit``. Checks are added
  at trace time, so trace (call or ``jit``) inside the context.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.experimental import checkify
    >>> import jaxnorm as jn
    >>> params, state = jn.batch_norm_init(2)
    >>> def f(x):
    ...   return jn.batch_norm(x, params, state, use_running_average=False)[0]
    >>> x = jnp.array([[1.0, jnp.nan], [2.0, 3.0]])
    >>> with jn.checkify_checks():
    ...   err, _ = checkify.checkify(jax.jit(f))(x)
    >>> print(err.get())  # doctest: +ELLIPSIS
    jaxnorm: `x` holds NaN or Inf ...
  """
  token = _CHECKIFY.set(bool(enabled))
  try:
    yield
  finally:
    _CHECKIFY.reset(token)


def checks_enabled() -> bool:
  """Whether layers traced now add :func:`checkify_checks`'s checks."""
  return _CHECKIFY.get()


def traced_check(name: str, value: Any, *, low: float = -math.inf, high=math.inf):
  """Under :func:`checkify_checks`, checks that ``value`` is finite and in
  ``[low, high]`` at run time, naming ``name``."""
  if not _CHECKIFY.get() or value is None:
    return
  value = jnp.asarray(value)
  if not jnp.issubdtype(value.dtype, jnp.inexact):
    return
  checkify.check(
    jnp.all(jnp.isfinite(value)), f"jaxnorm: `{name}` holds NaN or Inf (layer input)"
  )
  if low > -math.inf or high < math.inf:
    real = jnp.real(value)
    checkify.check(
      jnp.all((real >= low) & (real <= high)),
      f"jaxnorm: `{name}` is outside [{low}, {high}]",
    )
