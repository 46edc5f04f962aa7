"""Frozen batch norm for flax.nnx, like detectron2's ``FrozenBatchNorm2d``.

:class:`FrozenBatchNorm` normalizes with fixed statistics and a fixed affine
transform, all four held as ``nnx.BatchStat``, so ``nnx.state(model,
nnx.Param)`` and ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` never see them.
:func:`freeze_batch_norm` and :func:`unfreeze_batch_norm` swap batch-norm
submodules of a model for frozen ones and back, in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import graphlib
from flax.nnx.nn import dtypes as nnx_dtypes

import jaxnorm as jn
from jaxnorm import _checks, _description
from jaxnorm._batch_norm import check_running_stats
from jaxnorm._description import _NO_METADATA
from jaxnorm._description import as_inexact as _as_inexact
from jaxnorm.nnx._build import _lossless_promotion, _value
from jaxnorm.nnx._normalization import BatchNorm

Dtype = Any
Initializer = Any
PromoteDtypeFn = Any
Path = tuple[Any, ...]

# The settings FrozenBatchNorm ignores but keeps, so that unfreezing gives
# back the BatchNorm that was frozen (and model.train()/eval() still reach it).
_KEPT = (
  "use_running_average",
  "momentum",
  "axis_name",
  "axis_index_groups",
  "use_fast_variance",
)


def _init_value(
  init: Initializer,
  rngs: nnx.Rngs | None,
  shape: tuple[int, ...],
  dtype: Dtype,
  name: str,
) -> jax.Array:
  """``init(key, shape, dtype)``; constant initializers need no ``rngs``."""
  if rngs is not None:
    return init(rngs.params(), shape, dtype)
  try:
    return init(None, shape, dtype)
  except Exception:  # a random initializer given no key
    raise ValueError(
      f"`{name}` needs a random key: pass `rngs=nnx.Rngs(...)` (the default "
      "initializers, ones and zeros, need none)."
    ) from None


def _retyped(variable: nnx.Variable, kind: type[nnx.Variable]) -> nnx.Variable:
  """A fresh ``kind`` variable with ``variable``'s value and metadata."""
  copy = variable.copy()  # a new array reference where the variable has one
  return kind.from_metadata(copy.get_raw_value(), copy.get_metadata())


class FrozenBatchNorm(nnx.Module):
  r"""Batch norm with fixed statistics and affine: always evaluation mode.

  Like detectron2's ``FrozenBatchNorm2d``: per channel (``axis``),

  .. math::
    y = \frac{x - \mathrm{mean}}{\sqrt{\mathrm{var} + \epsilon}} \cdot
        \mathrm{scale} + \mathrm{bias}

  computed by :func:`jaxnorm.batch_norm` with ``use_running_average=True``.
  ``mean`` and ``var`` (float32) and ``scale`` and ``bias`` (``param_dtype``),
  all of shape ``(num_features,)``, are ``nnx.BatchStat``, not
  ``nnx.Param``: ``nnx.state(model, nnx.Param)`` leaves them out, so
  ``nnx.grad`` (which differentiates ``nnx.Param`` by default) and
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` never move them, and nothing
  updates them at call time. ``use_scale=False`` / ``use_bias=False`` make
  ``scale`` / ``bias`` ``None``. Gradients flow to the input.

  **Drop-in for** :class:`jaxnorm.nnx.BatchNorm` (and
  ``flax.nnx.BatchNorm``): the constructor takes the same arguments
  (``rngs`` is optional, since the default initializers are constant) and
  the call the same ones. ``use_running_average`` (constructor, call,
  ``model.train()``, ``nnx.view``), ``momentum``, ``axis_name``,
  ``axis_index_groups`` and ``use_fast_variance`` are ignored: the layer is
  always in evaluation mode and needs no device axis. They are kept as
  attributes so that :func:`unfreeze_batch_norm` gives back the
  ``BatchNorm`` that :func:`freeze_batch_norm` froze.

  Args:
    num_features: the number of channels ``C``.
    use_running_average: accepted for compatibility; ignored (kept).
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    momentum: accepted for compatibility; ignored (kept).
    epsilon: added to the variance inside the square root.
    dtype: dtype of the output (default: promoted from the input, the
      statistics and the affine, as in flax).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init: initializer of ``bias``, zeros by default.
    scale_init: initializer of ``scale``, ones by default.
    axis_name: accepted for compatibility; ignored (kept).
    axis_index_groups: accepted for compatibility; ignored (kept).
    use_fast_variance: accepted for compatibility; ignored (kept).
    promote_dtype: flax's function that promotes ``(x, mean, var, scale,
      bias)`` to a common dtype before normalizing.
    rngs: random keys, only needed by a random ``scale_init``/``bias_init``.
    bias_metadata: metadata of the ``bias`` ``nnx.BatchStat``.
    scale_metadata: metadata of the ``scale`` ``nnx.BatchStat``.
    force_float32_reductions: if true (the default), the normalization is
      computed in at least float32.
    virtual_batch_size: accepted for compatibility; ignored (kept).
    running_stats: ``"flax"``, or ``"torch"`` for the frozen copy of a
      ``BatchNorm(running_stats="torch")``, which then also holds its int32
      ``num_batches_tracked`` (``nnx.BatchStat``), unchanged (kept).
      Evaluation is the same formula either way.

  Raises:
    TypeError: ``num_features`` is not a positive int.
    ValueError: a random initializer and no ``rngs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> bn = jnx.FrozenBatchNorm(2, epsilon=0.0)
    >>> bn.mean[...] = jnp.array([2.0, 7.0])
    >>> bn.var[...] = jnp.array([4.0, 1.0])
    >>> bn(jnp.array([[1.0, 5.0], [3.0, 9.0]]), use_running_average=False)
    Array([[-0.5, -2. ],
           [ 0.5,  2. ]], dtype=float32)
    >>> len(nnx.state(bn, nnx.Param))  # nothing for an optimizer
    0
  """

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: int = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = nnx.initializers.zeros,
    scale_init: Initializer = nnx.initializers.ones,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    use_fast_variance: bool = True,
    promote_dtype: PromoteDtypeFn = nnx_dtypes.promote_dtype,
    rngs: nnx.Rngs | None = None,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    scale_metadata: Mapping[str, Any] = _NO_METADATA,
    force_float32_reductions: bool = True,
    virtual_batch_size: int | None = None,
    running_stats: str = "flax",
  ):
    shape = _checks.num_features_shape(num_features)
    if check_running_stats(running_stats) == "torch":
      # Kept unchanged (the layer never trains), for unfreeze_batch_norm.
      self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.scale: nnx.BatchStat | None
    if use_scale:
      value = _init_value(scale_init, rngs, shape, param_dtype, "scale_init")
      self.scale = nnx.BatchStat(value, **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.BatchStat | None
    if use_bias:
      value = _init_value(bias_init, rngs, shape, param_dtype, "bias_init")
      self.bias = nnx.BatchStat(value, **bias_metadata)
    else:
      self.bias = nnx.data(None)
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.force_float32_reductions = force_float32_reductions
    self.virtual_batch_size = virtual_batch_size
    self.running_stats = running_stats

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x`` with the stored statistics and affine.

    Args:
      x: input ``(N, ..., C, ...)``.
      use_running_average: accepted so that models passing it work
        unchanged; ignored, the stored statistics are always used and never
        updated.
      mask: optional boolean array broadcastable to ``x``; checked like
        :class:`jaxnorm.nnx.BatchNorm` checks it, and otherwise unused.

    Returns:
      The normalized input, of the shape of ``x``.

    Raises:
      ValueError: ``axis`` out of range for ``x``, a channel count that is
        not ``num_features``, a negative ``epsilon``, or a ``mask`` that
        does not broadcast.
    """
    del use_running_average  # Always evaluation mode: see the class docstring.
    x = jnp.asarray(x)
    feature_axes = _checks.canonicalize_axes(x.ndim, self.axis, "axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    for name in ("mean", "var", "scale", "bias"):
      value = _value(getattr(self, name))
      if value is not None and tuple(value.shape) != feature_shape:
        raise ValueError(
          f"`{name}` has shape {tuple(value.shape)} (`num_features`="
          f"{self.num_features}), but `x` of shape {x.shape} with `axis`="
          f"{self.axis} implies {feature_shape}."
        )
    args = (x, self.mean[...], self.var[...], _value(self.scale), _value(self.bias))
    if self.promote_dtype is _description.PROMOTE_DTYPE.default:
      args = _lossless_promotion(args, self.dtype)
    else:
      args = self.promote_dtype(args, dtype=self.dtype)
    x, mean, var, scale, bias = args  # as jaxnorm.nnx.BatchNorm in evaluation
    out_dtype = _description.out_dtype(x, scale, bias, dtype=self.dtype)
    y, _ = jn.batch_norm(
      _as_inexact(x, out_dtype),
      jn.NormParams(scale, bias),
      jn.BatchNormState(mean, var),
      use_running_average=True,
      axis=self.axis,
      epsilon=self.epsilon,
      mask=mask,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
    )
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``; the frozen layer ignores the mode.

    Args:
      use_running_average: kept for :func:`unfreeze_batch_norm`, ignored.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average

  @classmethod
  def from_batch_norm(cls, bn: nnx.Module) -> FrozenBatchNorm:
    """A frozen copy of a :class:`jaxnorm.nnx.BatchNorm` or ``flax.nnx.BatchNorm``.

    The new layer holds the values of ``bn``'s ``mean``, ``var``, ``scale``
    and ``bias`` (with their metadata, e.g. sharding) as ``nnx.BatchStat``,
    and its settings (``axis``, ``epsilon``, dtypes, ...).

    Args:
      bn: the batch-norm layer.

    Returns:
      A new :class:`FrozenBatchNorm`; ``bn`` is unchanged.

    Raises:
      TypeError: ``bn`` is not a ``BatchNorm`` of jaxnorm or flax.

    Examples:
      >>> from flax import nnx
      >>> import jaxnorm.nnx as jnx
      >>> bn = nnx.BatchNorm(3, epsilon=1e-3, rngs=nnx.Rngs(0))
      >>> frozen = jnx.FrozenBatchNorm.from_batch_norm(bn)
      >>> type(frozen.scale).__name__, frozen.epsilon
      ('BatchStat', 0.001)
    """
    if type(bn) not in (BatchNorm, nnx.BatchNorm):
      raise TypeError(
        "`bn` must be a jaxnorm.nnx.BatchNorm or flax.nnx.BatchNorm, got "
        f"{type(bn).__name__}."
      )
    frozen = cls(
      bn.num_features,
      axis=bn.axis,
      epsilon=bn.epsilon,
      dtype=bn.dtype,
      param_dtype=bn.param_dtype,
      use_bias=bn.use_bias,
      use_scale=bn.use_scale,
      promote_dtype=bn.promote_dtype,
      force_float32_reductions=getattr(bn, "force_float32_reductions", True),
      virtual_batch_size=getattr(bn, "virtual_batch_size", None),
      running_stats=getattr(bn, "running_stats", "flax"),
      **{name: getattr(bn, name) for name in _KEPT},
    )
    if hasattr(frozen, "num_batches_tracked"):
      frozen.num_batches_tracked = _retyped(bn.num_batches_tracked, nnx.BatchStat)
    frozen.mean = _retyped(bn.mean, nnx.BatchStat)
    frozen.var = _retyped(bn.var, nnx.BatchStat)
    if bn.scale is not None:
      frozen.scale = _retyped(bn.scale, nnx.BatchStat)
    if bn.bias is not None:
      frozen.bias = _retyped(bn.bias, nnx.BatchStat)
    return frozen

  def to_batch_norm(self) -> BatchNorm:
    """A trainable :class:`jaxnorm.nnx.BatchNorm` with this layer's values.

    ``scale`` and ``bias`` become ``nnx.Param`` again (with their
    metadata), ``mean`` and ``var`` stay ``nnx.BatchStat``; the settings,
    including the kept ``use_running_average`` and ``momentum``, carry over.

    Returns:
      A new :class:`jaxnorm.nnx.BatchNorm`; this layer is unchanged.

    Examples:
      >>> import jaxnorm.nnx as jnx
      >>> bn = jnx.FrozenBatchNorm(3, momentum=0.9).to_batch_norm()
      >>> type(bn.scale).__name__, bn.momentum
      ('Param', 0.9)
    """
    bn = BatchNorm(
      self.num_features,
      axis=self.axis,
      epsilon=self.epsilon,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      use_bias=self.use_bias,
      use_scale=self.use_scale,
      promote_dtype=self.promote_dtype,
      force_float32_reductions=self.force_float32_reductions,
      virtual_batch_size=self.virtual_batch_size,
      running_stats=self.running_stats,
      rngs=nnx.Rngs(0),  # Only for the ones/zeros replaced below.
      **{name: getattr(self, name) for name in _KEPT},
    )
    if hasattr(self, "num_batches_tracked"):
      bn.num_batches_tracked = _retyped(self.num_batches_tracked, nnx.BatchStat)
    bn.mean = _retyped(self.mean, nnx.BatchStat)
    bn.var = _retyped(self.var, nnx.BatchStat)
    if self.scale is not None:
      bn.scale = _retyped(self.scale, nnx.Param)
    if self.bias is not None:
      bn.bias = _retyped(self.bias, nnx.Param)
    return bn


def _check_args(model: Any, where: Any) -> Callable[[Path, Any], bool]:
  if not isinstance(model, nnx.Module):
    raise TypeError(
      f"`model` must be an nnx.Module (changed in place), got "
      f"{type(model).__name__}. For flax.linen variables use "
      "jaxnorm.linen.freeze_batch_norm / unfreeze_batch_norm."
    )
  if where is None:
    return lambda path, module: True
  if not callable(where) and not (
    isinstance(where, (list, tuple)) and all(callable(w) for w in where)
  ):
    raise TypeError(
      "`where` must be None or an nnx filter: a predicate `(path, module) -> "
      f"bool`, a class, nnx.PathContains(...), got {type(where).__name__}."
    )
  return nnx.filterlib.to_predicate(where)


def _replace(
  model: nnx.Module,
  kinds: tuple[type, ...],
  convert: Callable[[Any], nnx.Module],
  where: Callable[[Path, Any], bool],
) -> int:
  """Replaces, in place, every submodule of a type in ``kinds`` that ``where``
  selects by ``convert(submodule)``; returns how many were replaced."""
  if type(model) in kinds:
    raise ValueError(
      f"`model` is itself a {type(model).__name__}, which cannot be replaced "
      "in place: use FrozenBatchNorm.from_batch_norm(bn) or "
      "frozen.to_batch_norm()."
    )
  # One decision per layer object: a layer shared at several paths is
  # decided at the first path found, and stays shared. Both dicts hold the
  # objects so that their ids are not reused while we walk.
  decided: dict[int, tuple[Any, bool]] = {}
  visited: dict[int, Any] = {}
  # Every replacement is found (and checked) before any is made, so that an
  # error leaves the model as it was.
  edits: list[tuple[Callable[[Any, Any, Any], None], Any, Any, Any]] = []

  def visit(node: Any, path: Path) -> None:
    if id(node) in visited:
      return
    visited[id(node)] = node
    impl = graphlib.get_node_impl(node)
    if impl is None:
      return
    for key, child in impl.node_dict(node).items():
      child_path = (*path, key)
      if type(child) in kinds and id(child) not in decided:
        decided[id(child)] = (child, bool(where(child_path, child)))
      if not decided.get(id(child), (None, False))[1]:
        if graphlib.is_node(child):
          visit(child, child_path)
      elif impl.set_key is None:
        raise ValueError(
          f"The {type(child).__name__} at `model` path {child_path} is inside "
          f"a {type(node).__name__}, which cannot be changed in place: hold it "
          "in an nnx.List, nnx.Dict, list or dict instead, or exclude it with "
          "`where`."
        )
      else:
        edits.append((impl.set_key, node, key, child))

  visit(model, ())
  converted = {
    key: convert(old) for key, (old, selected) in decided.items() if selected
  }
  for set_key, node, key, old in edits:
    set_key(node, key, converted[id(old)])
  return len(converted)


def freeze_batch_norm(
  model: nnx.Module, *, where: nnx.filterlib.Filter | None = None
) -> int:
  """Replaces the batch-norm layers of ``model`` by frozen ones, in place.

  Every :class:`jaxnorm.nnx.BatchNorm` and ``flax.nnx.BatchNorm`` submodule
  (exactly those types: subclasses, and other jaxnorm layers, are left
  alone), held as an attribute or inside ``nnx.List``, ``nnx.Dict``,
  ``nnx.Sequential``, or a list or dict marked ``nnx.data``, is replaced by
  :meth:`FrozenBatchNorm.from_batch_norm`: the same values and settings,
  with ``scale`` and ``bias`` no longer ``nnx.Param``. A layer shared at
  several paths becomes one shared frozen layer. Call it outside of
  ``nnx.jit``, then build the optimizer (``nnx.Optimizer(model, tx,
  wrt=nnx.Param)`` sees only the remaining parameters).

  Args:
    model: the ``nnx.Module`` to change in place.
    where: optional nnx filter selecting the layers to freeze: a predicate
      ``(path, layer) -> bool`` (``path`` a tuple of attribute names and
      indices from ``model``), e.g. ``nnx.PathContains('backbone')``.
      Default: every batch-norm layer.

  Returns:
    The number of layers replaced.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``, or ``where`` is not a
      filter.
    ValueError: ``model`` is itself a batch-norm layer (use
      :meth:`FrozenBatchNorm.from_batch_norm`), or a selected layer is held
      in a tuple.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> model = nnx.Sequential(
    ...     nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    >>> jnx.freeze_batch_norm(model)
    1
    >>> type(model.layers[1]).__name__, len(nnx.state(model, nnx.Param)["layers"])
    ('FrozenBatchNorm', 1)
  """
  predicate = _check_args(model, where)
  return _replace(
    model, (BatchNorm, nnx.BatchNorm), FrozenBatchNorm.from_batch_norm, predicate
  )


def unfreeze_batch_norm(
  model: nnx.Module, *, where: nnx.filterlib.Filter | None = None
) -> int:
  """Replaces the frozen layers of ``model`` by trainable batch norm, in place.

  The inverse of :func:`freeze_batch_norm`: every :class:`FrozenBatchNorm`
  submodule becomes a :class:`jaxnorm.nnx.BatchNorm` (also where a
  ``flax.nnx.BatchNorm`` was frozen; its state has the same names and
  types) by :meth:`FrozenBatchNorm.to_batch_norm`, with the same values,
  settings, ``epsilon`` and ``axis``; ``scale`` and ``bias`` are
  ``nnx.Param`` again. Freezing then unfreezing gives back the same
  ``nnx.state``, bit for bit. Build a new optimizer afterwards.

  Args:
    model: the ``nnx.Module`` to change in place.
    where: optional nnx filter selecting the layers to unfreeze (see
      :func:`freeze_batch_norm`).

  Returns:
    The number of layers replaced.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``, or ``where`` is not a
      filter.
    ValueError: ``model`` is itself a :class:`FrozenBatchNorm` (use
      :meth:`FrozenBatchNorm.to_batch_norm`), or a selected layer is held
      in a tuple.

  Examples:
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> model = nnx.Sequential(jnx.FrozenBatchNorm(3), jnx.FrozenBatchNorm(3))
    >>> jnx.unfreeze_batch_norm(model, where=lambda path, m: path[-1] == 0)
    1
    >>> [type(m).__name__ for m in model.layers]
    ['BatchNorm', 'FrozenBatchNorm']
  """
  predicate = _check_args(model, where)
  return _replace(model, (FrozenBatchNorm,), lambda m: m.to_batch_norm(), predicate)
