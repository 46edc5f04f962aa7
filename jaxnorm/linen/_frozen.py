"""Frozen batch norm for flax.linen, like detectron2's ``FrozenBatchNorm2d``.

:class:`FrozenBatchNorm` normalizes with fixed statistics and a fixed affine
transform, all four held in the ``batch_stats`` collection, so nothing is in
``params`` for an optimizer to move. :func:`freeze_batch_norm` and
:func:`unfreeze_batch_norm` move the ``scale`` and ``bias`` of batch-norm
layers between ``params`` and ``batch_stats``, so trained ``BatchNorm``
variables load into a model built with ``FrozenBatchNorm`` and back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import FrozenDict
from jax.nn import initializers

import jaxnorm as jn
from jaxnorm import _checks
from jaxnorm._batch_norm import check_running_stats
from jaxnorm._description import as_inexact as _as_inexact
from jaxnorm._description import out_dtype as _out_dtype

Axes = int | Sequence[int]
Dtype = Any
Initializer = Any
Path = tuple[str, ...]

_STATS = ("mean", "var")
# A batch norm with running_stats="torch" also counts its training calls.
_TRACKED = "num_batches_tracked"
_AFFINE = ("scale", "bias")


class FrozenBatchNorm(nn.Module):
  r"""Batch norm with fixed statistics and affine: always evaluation mode.

  Like detectron2's ``FrozenBatchNorm2d``: per channel (``axis``),

  .. math::
    y = \frac{x - \mathrm{mean}}{\sqrt{\mathrm{var} + \epsilon}} \cdot
        \mathrm{scale} + \mathrm{bias}

  with the four arrays read from the ``batch_stats`` collection and never
  updated, computed by :func:`jaxnorm.batch_norm` with
  ``use_running_average=True``. Variables, all of the feature shape ``(C,)``::

    batch_stats: mean (C,) float32, var (C,) float32,
                 scale (C,) param_dtype, bias (C,) param_dtype

  and nothing in ``params``: an optimizer built on ``params`` never moves
  them and weight decay never shrinks them. The statistics are in
  ``param_dtype`` when ``force_float32_reductions=False``, as in
  :class:`jaxnorm.linen.BatchNorm`. ``use_scale=False`` / ``use_bias=False``
  drop ``scale`` / ``bias``. Gradients flow to ``x`` (through the per-channel
  ``scale / sqrt(var + epsilon)``); the frozen values themselves only get a
  gradient if you differentiate with respect to ``batch_stats``.

  **Drop-in for** :class:`jaxnorm.linen.BatchNorm` (and
  ``flax.linen.BatchNorm``): the fields and the call signature are the
  same, so a model that calls ``norm(x, use_running_average=not train)``
  works unchanged. ``use_running_average`` (field or call argument),
  ``momentum``, ``axis_name``, ``axis_index_groups``, ``use_fast_variance``
  and ``virtual_batch_size`` are accepted and ignored: the layer is always
  in evaluation mode and never needs a device axis. Load trained
  ``BatchNorm`` variables with :func:`freeze_batch_norm`.

  The variables only line up if the layer has the same name in both
  models: flax names an unnamed ``FrozenBatchNorm`` ``FrozenBatchNorm_0``
  where it named the ``BatchNorm`` ``BatchNorm_0``, so give norm layers an
  explicit ``name=`` (or assign them in ``setup``, which names them after
  the attribute).

  Attributes:
    use_running_average: accepted for compatibility; ignored.
    axis: the channel (feature) axis, or a tuple of axes: ``-1`` for NHWC,
      ``1`` for NCHW.
    momentum: accepted for compatibility; ignored.
    epsilon: added to the variance inside the square root.
    dtype: dtype of the output (default: promoted from ``x``, ``scale`` and
      ``bias``, as in flax).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init: initializer of ``bias``, zeros by default.
    scale_init: initializer of ``scale``, ones by default.
    axis_name: accepted for compatibility; ignored.
    axis_index_groups: accepted for compatibility; ignored.
    use_fast_variance: accepted for compatibility; ignored.
    force_float32_reductions: if true (the default), the statistics are
      float32 and the normalization is computed in at least float32; if
      false, they are in ``param_dtype`` and the input dtype.
    virtual_batch_size: accepted for compatibility; ignored.
    running_stats: ``"flax"``, or ``"torch"`` for the frozen copy of a
      ``BatchNorm(running_stats="torch")``: ``batch_stats`` then also holds
      its int32 ``num_batches_tracked``, kept unchanged. Evaluation is the
      same formula either way.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> bn = jnn.FrozenBatchNorm(epsilon=0.0)
    >>> x = jnp.array([[1.0, 5.0], [3.0, 9.0]])
    >>> variables = bn.init(jax.random.key(0), x)
    >>> "params" in variables, sorted(variables["batch_stats"])
    (False, ['bias', 'mean', 'scale', 'var'])
    >>> variables = {"batch_stats": {
    ...     "mean": jnp.array([2.0, 7.0]), "var": jnp.array([4.0, 1.0]),
    ...     "scale": jnp.array([1.0, 2.0]), "bias": jnp.array([0.0, 1.0])}}
    >>> bn.apply(variables, x, use_running_average=False)  # always frozen
    Array([[-0.5, -3. ],
           [ 0.5,  5. ]], dtype=float32)
  """

  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  virtual_batch_size: int | None = None
  running_stats: str = "flax"

  @nn.compact
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
      use_running_average: accepted so that models passing
        ``use_running_average=not train`` work unchanged; ignored, the
        stored statistics are always used and never updated.
      mask: optional boolean array broadcastable to ``x``; checked like
        :class:`jaxnorm.linen.BatchNorm` checks it, and otherwise unused
        (fixed statistics see no elements).

    Returns:
      The normalized input, of the shape of ``x``.

    Raises:
      ValueError: ``axis`` out of range for ``x``, stored variables whose
        shape does not match ``x``, a negative ``epsilon``, or a ``mask``
        that does not broadcast.
      TypeError: a non-boolean ``mask``, or stored variables whose shape
        does not match ``x`` (the error is both, like flax.linen's
        BatchNorm's TypeError for such statistics).
    """
    del use_running_average  # Always evaluation mode: see the class docstring.
    x = jnp.asarray(x)
    feature_axes = _checks.canonicalize_axes(x.ndim, self.axis, "axis")
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    mean = self.variable(
      "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape
    ).value
    var = self.variable(
      "batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape
    ).value
    scale = self._affine("scale", self.use_scale, self.scale_init, feature_shape)
    bias = self._affine("bias", self.use_bias, self.bias_init, feature_shape)
    if check_running_stats(self.running_stats) == "torch":
      # Kept, never read or updated, so that the variables stay those of
      # the BatchNorm(running_stats="torch") that was frozen.
      self.variable("batch_stats", _TRACKED, lambda: jnp.zeros((), jnp.int32))
    _check_shapes_match(
      {"mean": mean, "var": var, "scale": scale, "bias": bias},
      x.shape,
      feature_shape,
      self.axis,
    )
    out_dtype = _out_dtype(x, scale, bias, dtype=self.dtype)
    y, _ = jn.batch_norm(
      _as_inexact(x, out_dtype),
      jn.NormParams(scale, bias),
      jn.BatchNormState(mean, var),
      use_running_average=True,
      axis=feature_axes,
      epsilon=self.epsilon,
      mask=mask,
      dtype=out_dtype,
      force_float32_reductions=self.force_float32_reductions,
    )
    return y

  def _affine(
    self, name: str, use: bool, init: Initializer, shape: tuple[int, ...]
  ) -> jax.Array | None:
    """``batch_stats/{name}`` (``scale`` or ``bias``), or ``None`` if unused."""
    if not use:
      return None
    # The initializer only runs in `init`, where the "params" RNG exists.
    return self.variable(
      "batch_stats",
      name,
      lambda: init(self.make_rng("params"), shape, self.param_dtype),
    ).value


def _check_shapes_match(
  arrays: Mapping[str, Any],
  x_shape: tuple[int, ...],
  feature_shape: tuple[int, ...],
  axis: Any,
) -> None:
  """Raises naming the frozen variable whose shape does not match ``x``."""
  for name, value in arrays.items():
    if value is not None and tuple(jnp.shape(value)) != tuple(feature_shape):
      # Also a TypeError: flax.linen's BatchNorm, which this layer replaces,
      # fails on such statistics with one.
      raise _checks.FeatureShapeError(
        f"`batch_stats/{name}` has shape {tuple(jnp.shape(value))}, but `x` of "
        f"shape {tuple(x_shape)} with `axis`={axis} implies {tuple(feature_shape)}."
      )


def _is_leaf(v: Any) -> bool:
  return not isinstance(v, Mapping)


def _copy_tree(tree: Mapping) -> dict:
  """The nested mappings of ``tree`` as fresh dicts; the arrays are shared."""
  return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _subtrees(tree: dict, path: Path = ()):
  """Every (path, dict) of ``tree``, the root included, parents first."""
  yield path, tree
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _subtrees(value, (*path, key))


def _get(tree: dict, path: Path) -> Any:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _pop_prune(tree: dict, path: Path, key: str) -> Any:
  """Pops ``tree[path][key]``, then drops the dicts this left empty."""
  parents = [tree]
  for k in path:
    parents.append(parents[-1][k])
  value = parents[-1].pop(key)
  for parent, k in zip(reversed(parents[:-1]), reversed(path), strict=True):
    if parent[k]:
      break
    del parent[k]
  return value


def _set(tree: dict, path: Path, key: str, value: Any) -> None:
  for k in path:
    tree = tree.setdefault(k, {})
  tree[key] = value


def _check_args(variables: Any, where: Any) -> None:
  if not isinstance(variables, Mapping):
    raise TypeError(
      "`variables` must be a dict of flax collections such as "
      f"{{'params': ..., 'batch_stats': ...}}, got {type(variables).__name__}."
    )
  if variables and "params" not in variables and "batch_stats" not in variables:
    raise ValueError(
      "`variables` has neither a 'params' nor a 'batch_stats' collection (its "
      f"keys are {sorted(map(str, variables))}): pass the whole variables dict "
      "of the model, e.g. `{'params': params, 'batch_stats': batch_stats}`, "
      "not `params` alone."
    )
  if where is not None and not callable(where):
    raise TypeError(
      "`where` must be None or a callable taking a module path (a tuple of "
      f"str) and returning a bool, got {type(where).__name__}."
    )


def _check_shapes(path: Path, arrays: Mapping[str, Any]) -> None:
  shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
  if len(set(shapes.values())) > 1:
    where = "/".join(path) or "<root>"
    raise ValueError(
      f"`variables` at {where!r} look like a batch-norm layer but their "
      f"shapes differ: {shapes}. Exclude this path with `where`."
    )


def _without_tracked(node: Mapping[str, Any]) -> dict[str, Any]:
  """A layer's arrays of the feature shape: all but the scalar counter."""
  return {k: v for k, v in node.items() if k != _TRACKED}


def _finish(variables: Mapping, out: dict) -> Any:
  """Returns ``out`` as the kind of mapping ``variables`` was."""
  return FrozenDict(out) if isinstance(variables, FrozenDict) else out


def freeze_batch_norm(
  variables: Mapping[str, Any], *, where: Callable[[Path], bool] | None = None
) -> dict[str, Any]:
  """Moves batch-norm ``scale`` and ``bias`` from ``params`` to ``batch_stats``.

  Turns the variables of a model with (flax or jaxnorm) ``BatchNorm`` layers
  into those of the same model built with :class:`FrozenBatchNorm` in their
  place (with the same layer names). The input is not modified; the arrays
  are shared, not copied.

  A batch-norm layer is recognised by its variables: a ``batch_stats``
  subtree whose keys are exactly ``mean`` and ``var`` (arrays), and
  ``num_batches_tracked`` for ``running_stats="torch"``, at a path
  where ``params`` holds nothing or only ``scale`` and/or ``bias`` arrays
  (both are absent for ``use_scale=False, use_bias=False``). Any other
  layer, including one with more statistics (batch renorm, MABN) or
  already frozen, is left alone, so freezing twice is freezing once. Dicts
  of ``params`` left empty are removed (as flax's ``init`` of the frozen
  model would have none); other collections pass through.

  Args:
    variables: the model's variables, ``{'params': ..., 'batch_stats': ...,
      ...}`` (a dict or a ``FrozenDict``).
    where: optional predicate on a layer's path inside the collections (a
      tuple of str, e.g. ``('backbone', 'bn1')``); only layers where it
      returns true are frozen. Default: every batch-norm layer.

  Returns:
    New variables of the same kind (dict or ``FrozenDict``).

  Raises:
    TypeError: ``variables`` is not a mapping, or ``where`` is not callable.
    ValueError: ``variables`` has neither ``params`` nor ``batch_stats``
      (``params`` alone was passed), or a recognised layer whose arrays
      have different shapes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> x = jnp.ones((4, 3))
    >>> variables = jnn.BatchNorm(use_running_average=True).init(
    ...     jax.random.key(0), x)
    >>> frozen = jnn.freeze_batch_norm(variables)
    >>> sorted(frozen), sorted(frozen["batch_stats"])
    (['batch_stats'], ['bias', 'mean', 'scale', 'var'])
    >>> y = jnn.FrozenBatchNorm().apply(frozen, x)
    >>> jax.tree.all(jax.tree.map(
    ...     lambda a, b: bool((a == b).all()),
    ...     jnn.unfreeze_batch_norm(frozen), variables))
    True
  """
  _check_args(variables, where)
  out = _copy_tree(variables)
  stats = out.get("batch_stats")
  if not isinstance(stats, dict):
    return _finish(variables, out)
  params = out.get("params", {})
  if not isinstance(params, dict):
    params = {}
  moves = []
  for path, node in _subtrees(stats):
    if set(node) - {_TRACKED} != set(_STATS) or not all(map(_is_leaf, node.values())):
      continue
    affine = _get(params, path)
    if affine is None:
      affine = {}
    if not (
      isinstance(affine, dict)
      and set(affine) <= set(_AFFINE)
      and all(_is_leaf(v) for v in affine.values())
    ):
      continue
    if where is not None and not where(path):
      continue
    _check_shapes(path, {**_without_tracked(node), **affine})
    moves.extend((path, key) for key in affine)
  for path, key in moves:
    _get(stats, path)[key] = _pop_prune(params, path, key)
  if "params" in out and not params:
    del out["params"]
  return _finish(variables, out)


def unfreeze_batch_norm(
  variables: Mapping[str, Any], *, where: Callable[[Path], bool] | None = None
) -> dict[str, Any]:
  """Moves frozen ``scale`` and ``bias`` from ``batch_stats`` back to ``params``.

  The inverse of :func:`freeze_batch_norm`: turns the variables of a model
  built with :class:`FrozenBatchNorm` into those of the same model with
  ``BatchNorm`` layers, e.g. to fine-tune them again;
  ``unfreeze_batch_norm(freeze_batch_norm(v))`` gives back ``v`` exactly.
  The input is not modified; the arrays are shared, not copied.

  A frozen layer is recognised by its variables: a ``batch_stats`` subtree
  whose keys are ``mean``, ``var`` and ``scale`` and/or ``bias`` (arrays),
  and perhaps ``num_batches_tracked``, at a path where ``params`` holds
  nothing. A frozen layer with neither ``scale`` nor ``bias`` has the
  variables of a ``BatchNorm`` already.

  Args:
    variables: the model's variables (a dict or a ``FrozenDict``).
    where: optional predicate on a layer's path inside the collections (a
      tuple of str); only layers where it returns true are unfrozen.

  Returns:
    New variables of the same kind (dict or ``FrozenDict``).

  Raises:
    TypeError: ``variables`` is not a mapping, or ``where`` is not callable.
    ValueError: ``variables`` has neither ``params`` nor ``batch_stats``,
      or a recognised layer whose arrays have different shapes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> frozen = jnn.FrozenBatchNorm().init(jax.random.key(0), jnp.ones((4, 3)))
    >>> variables = jnn.unfreeze_batch_norm(frozen)
    >>> sorted(variables["params"]), sorted(variables["batch_stats"])
    (['bias', 'scale'], ['mean', 'var'])
  """
  _check_args(variables, where)
  out = _copy_tree(variables)
  stats = out.get("batch_stats")
  if not isinstance(stats, dict):
    return _finish(variables, out)
  params = out.get("params")
  moves = []
  for path, node in _subtrees(stats):
    keys = set(node) - {_TRACKED}
    if not (
      set(_STATS) < keys <= set(_STATS + _AFFINE)
      and all(_is_leaf(v) for v in node.values())
    ):
      continue
    if isinstance(params, dict) and _get(params, path) is not None:
      continue
    if where is not None and not where(path):
      continue
    _check_shapes(path, _without_tracked(node))
    moves.extend((path, key) for key in _AFFINE if key in node)
  if moves:
    params = out.setdefault("params", {})
  for path, key in moves:
    _set(params, path, key, _get(stats, path).pop(key))
  return _finish(variables, out)
