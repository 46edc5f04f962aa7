"""Porting the normalization layers of a PyTorch ``state_dict`` to jaxnorm.

Nothing here imports torch: tensors are read through their own methods
(``detach``, ``cpu``, ``numpy``), so a NumPy checkpoint works as well and
jaxnorm keeps jax and flax as its only dependencies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxnorm._types import BatchNormState, NormParams, TorchBatchNormState

# torch class name -> family. SyncBatchNorm has BatchNorm's entries and maths
# in evaluation; the three BatchNorm and InstanceNorm ranks differ only in the
# rank of their input, not in their entries.
_KINDS: Mapping[str, str] = {
  "BatchNorm1d": "batch",
  "BatchNorm2d": "batch",
  "BatchNorm3d": "batch",
  "SyncBatchNorm": "batch",
  "InstanceNorm1d": "instance",
  "InstanceNorm2d": "instance",
  "InstanceNorm3d": "instance",
  "LayerNorm": "layer",
  "GroupNorm": "group",
  "RMSNorm": "rms",
}

_STATS = ("running_mean", "running_var")
_COUNT = "num_batches_tracked"
# The entries each family may have, in the order torch writes them.
_ENTRIES: Mapping[str, tuple[str, ...]] = {
  "batch": ("weight", "bias", *_STATS, _COUNT),
  "instance": ("weight", "bias", *_STATS, _COUNT),
  "layer": ("weight", "bias"),
  "group": ("weight", "bias"),
  "rms": ("weight",),
}
_LAYOUTS = ("NCHW", "NHWC")
_INT32_MAX = int(np.iinfo(np.int32).max)


def _kind_name(layer: Any) -> str:
  """The torch class name of ``layer``: a name, a class or an instance."""
  if isinstance(layer, str):
    if layer in _KINDS:
      return layer
    raise ValueError(
      f"`layer`={layer!r} is not a supported torch layer kind; expected one "
      f"of {sorted(_KINDS)}."
    )
  cls = layer if isinstance(layer, type) else type(layer)
  # The first known class in the MRO, so a subclass of BatchNorm2d counts.
  for base in getattr(cls, "__mro__", (cls,)):
    if base.__name__ in _KINDS:
      return base.__name__
  raise ValueError(
    f"`layer` of type {cls.__name__} is not a supported torch normalization "
    f"layer; expected a name, class or instance of one of {sorted(_KINDS)}."
  )


def _module_entries(layer: Any) -> set[str] | None:
  """The entry names of a torch module instance, or ``None`` for a name/class."""
  if isinstance(layer, (str, type)) or not callable(getattr(layer, "state_dict", None)):
    return None
  return {str(k) for k in layer.state_dict()}


def _to_numpy(value: Any, key: str) -> np.ndarray:
  """A torch tensor (any device, any dtype) or array-like as a NumPy array."""
  if callable(getattr(value, "detach", None)):
    value = value.detach()
    if callable(getattr(value, "cpu", None)):
      value = value.cpu()
    try:
      value = value.numpy()
    except TypeError:
      # bfloat16 and other dtypes NumPy lacks: widen to float32 in torch.
      value = value.float().numpy()
  try:
    array = np.asarray(value)
  except (TypeError, ValueError) as e:
    raise TypeError(
      f"`state_dict[{key!r}]` is not an array ({type(value).__name__}): {e}"
    ) from None
  if array.dtype.kind not in "biuf":
    raise TypeError(
      f"`state_dict[{key!r}]` must hold real numbers, got dtype {array.dtype}."
    )
  return array


def _where(prefix: str) -> str:
  return f" at `prefix`={prefix!r}" if prefix else ""


def _check_entries(
  present: set[str],
  kind_name: str,
  family: str,
  module_entries: set[str] | None,
  running_stats: str,
  prefix: str,
) -> None:
  """Raises ``ValueError`` listing unknown and missing entries, if any."""
  allowed = _ENTRIES[family]
  unknown = present - set(allowed)
  missing = set()
  if module_entries is not None:
    # A module says exactly which entries it has (affine, bias, running stats).
    unknown |= present - module_entries
    missing |= module_entries - present
  else:
    # Without a module, only inconsistent combinations are detectable: torch
    # has no bias without a weight, and the two statistics go together.
    if "bias" in present and "weight" not in present:
      missing.add("weight")
    if _COUNT in allowed and present & {*_STATS, _COUNT}:
      missing |= set(_STATS) - present
  if running_stats == "torch" and present & set(_STATS):
    missing |= {_COUNT} - present
  elif running_stats == "flax":
    # Checkpoints older than PyTorch 0.4.1 lack the count; flax has no use
    # for it.
    missing.discard(_COUNT)
  if not unknown and not missing:
    return
  order = {name: i for i, name in enumerate(allowed)}
  parts = []
  if unknown:
    names = sorted(unknown, key=lambda n: (order.get(n, len(order)), n))
    parts.append(f"unknown entries {[prefix + n for n in names]}")
  if missing:
    names = sorted(missing, key=lambda n: order[n])
    parts.append(f"missing entries {[prefix + n for n in names]}")
  raise ValueError(
    f"`state_dict` does not match a torch {kind_name}{_where(prefix)}: "
    + "; ".join(parts)
    + f". A {kind_name} has entries among {list(allowed)}."
  )


def from_torch_state_dict(
  state_dict: Mapping[str, Any],
  layer: Any,
  *,
  prefix: str = "",
  layout: str = "NHWC",
  running_stats: str = "flax",
  to: str = "jaxnorm",
) -> tuple[NormParams, BatchNormState | TorchBatchNormState | None] | dict:
  """Converts one PyTorch normalization layer's ``state_dict`` entries.

  Reads the entries ``prefix + name`` of ``state_dict`` (the whole model's,
  or the layer's own with ``prefix=""``) for one torch layer and returns
  them as jaxnorm parameters and state, or as flax variables:

  * ``weight`` -> ``NormParams.scale``, flax ``params/scale``;
  * ``bias`` -> ``NormParams.bias``, flax ``params/bias``;
  * ``running_mean`` -> ``state.mean``, flax ``batch_stats/mean``;
  * ``running_var`` -> ``state.var``, flax ``batch_stats/var``;
  * ``num_batches_tracked`` -> dropped (``running_stats="flax"``, the state
    is a ``BatchNormState(mean, var)``), or kept as an int32 scalar
    (``running_stats="torch"``): ``TorchBatchNormState(mean, var,
    num_batches_tracked)``, flax ``batch_stats/num_batches_tracked``.

  Absent entries are ``None`` fields (``BatchNorm2d(affine=False)``,
  ``LayerNorm(bias=False)``) or absent variables (flax's ``use_scale=False``
  and ``use_bias=False``). Arrays are float32 whatever the checkpoint's dtype
  (bfloat16 included). Values may be torch tensors on any device or NumPy
  arrays; torch is never imported.

  **Running variance.** PyTorch's ``running_var`` is the running average of
  the *unbiased* batch variance (divided by ``n - 1``); jaxnorm and flax
  normally store the biased one (divided by ``n``). Evaluation of all three
  uses the stored value as it is,
  ``(x - mean) / sqrt(var + eps) * scale + bias``, so evaluation outputs
  match exactly and the value is copied unchanged. To continue *training*
  with PyTorch's conventions (unbiased running variance, ``momentum=None``'s
  cumulative average), pass ``running_stats="torch"``: the state is then a
  ``TorchBatchNormState(mean, var, num_batches_tracked)`` for
  ``jaxnorm.batch_norm(..., running_stats="torch")``, and the flax
  ``batch_stats`` gain ``num_batches_tracked`` for the linen and nnx
  ``BatchNorm(running_stats="torch")``; ``momentum`` then has PyTorch's
  meaning (pass ``module.momentum`` as it is, ``None`` included). With
  ``running_stats="flax"``, ``momentum`` is the weight of the old value:
  PyTorch's ``momentum=0.1`` is ``momentum=0.9``.

  **Which jaxnorm layer, with which arguments** (torch's ``eps`` is
  ``1e-5`` by default while jaxnorm's LN, RMS norm, GN and IN default to
  ``1e-6``: always pass ``epsilon=module.eps``):

  * ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``: :func:`jaxnorm.batch_norm`
    with ``axis=1`` (NCHW) or ``axis=-1`` (NHWC), or
    ``jaxnorm.linen.BatchNorm``. Evaluation is
    ``use_running_average=True``. Without running statistics
    (``track_running_stats=False``) torch normalizes with the batch
    statistics even in evaluation: ``state`` is ``None``; use
    ``use_running_average=False`` with any state (say
    ``jaxnorm.batch_norm_init(C)[1]``) and ignore the new one.
  * ``InstanceNorm1d/2d/3d``: :func:`jaxnorm.instance_norm` (``axis=1`` or
    ``-1``), or ``jaxnorm.linen.InstanceNorm``. With
    ``track_running_stats=True`` torch's *evaluation* normalizes every
    channel with the running statistics, which is exactly
    ``jaxnorm.batch_norm(x, params, state, use_running_average=True)`` per
    channel (or ``jaxnorm.linen.BatchNorm(use_running_average=True)`` with
    the flax variables); in training it is ``instance_norm`` with the same
    ``params``.
  * ``GroupNorm``: :func:`jaxnorm.group_norm` with
    ``num_groups=module.num_groups`` and ``axis=1`` or ``-1``.
  * ``LayerNorm`` and ``RMSNorm`` over a ``normalized_shape`` of ``k``
    trailing axes: :func:`jaxnorm.layer_norm` / :func:`jaxnorm.rms_norm`
    with ``reduction_axes`` and ``feature_axes`` both the last ``k`` axes,
    e.g. ``(1, 2, 3)`` for ``(C, H, W)`` of an image in either layout
    (``-1`` for a transformer's ``(D,)``). torch's ``RMSNorm(eps=None)``
    uses the machine epsilon of the input: ``epsilon=1.1920929e-07``
    (``numpy.finfo(numpy.float32).eps``) for float32.

  **Layout.** ``layout`` is the layout of the JAX model's activations;
  torch's are channels first. Entries of shape ``(C,)`` are the same in
  both. A ``LayerNorm``/``RMSNorm`` entry of rank 2 or more is taken to be
  ``(C, *spatial)``, the ``normalized_shape`` of a channels-first tensor,
  and for ``"NHWC"`` becomes ``(*spatial, C)``: ``(C, H, W)`` becomes
  ``(H, W, C)`` (``"NCHW"`` keeps it). A multi-axis ``normalized_shape``
  that does not start at a channel axis, e.g. ``(T, D)`` of a sequence,
  must be ported with ``layout="NCHW"`` to stay as it is. The names stand
  for any rank: ``NCL``/``NLC`` and ``NCDHW``/``NDHWC`` alike.

  Args:
    state_dict: a mapping from names to torch tensors or array-likes, e.g.
      ``model.state_dict()``.
    layer: the torch layer: a class name (``"BatchNorm2d"``,
      ``"SyncBatchNorm"``, ``"InstanceNorm1d"``, ``"LayerNorm"``,
      ``"GroupNorm"``, ``"RMSNorm"``...), a class, or the module instance
      itself. An instance is checked exactly: every entry it has must be
      present and no other; a name or class only allows the entries of
      that kind and checks that they are consistent.
    prefix: the layer's name in ``state_dict``, e.g. ``"layer1.0.bn1"``
      (a trailing dot is added). Entries outside it are ignored.
    layout: ``"NHWC"`` (channels last, the default) or ``"NCHW"``.
    running_stats: ``"flax"`` to drop ``num_batches_tracked`` (the state is
      a ``BatchNormState``), ``"torch"`` to keep it (``TorchBatchNormState``;
      required then whenever running statistics are present).
    to: ``"jaxnorm"`` for ``(params, state)``; ``"flax"`` for a dict of flax
      variable collections, ``{"params": {"scale", "bias"}, "batch_stats":
      {"mean", "var"[, "num_batches_tracked"]}}`` with absent entries and
      empty collections left out.

  Returns:
    With ``to="jaxnorm"``: ``(params, state)``, ``params`` a
    ``NormParams(scale, bias)`` and ``state`` a ``BatchNormState``, a
    ``TorchBatchNormState``, or ``None`` when the layer has no running
    statistics. With ``to="flax"``: the variables dict, to load into
    ``jaxnorm.linen.BatchNorm`` (or ``flax.linen.BatchNorm``),
    ``LayerNorm``, ``GroupNorm``, ``InstanceNorm``, ``RMSNorm``.

  Raises:
    ValueError: an unknown ``layer`` kind, ``layout``, ``running_stats`` or
      ``to``; no entry under a non-empty ``prefix``; unknown or missing
      entries (all listed, with their full keys); entries of inconsistent
      shapes; a ``num_batches_tracked`` that is not a scalar in int32's
      range.
    TypeError: ``state_dict`` not a mapping with string keys, ``prefix``
      not a string, or an entry that is not an array of real numbers.

  Examples:
    A ``BatchNorm2d(3)`` checkpoint (NumPy here; torch tensors work alike),
    evaluated in NCHW exactly as torch's ``eval()`` does:

    >>> import numpy as np, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> sd = {"bn1.weight": np.array([1.0, 2.0, 0.5]),
    ...       "bn1.bias": np.array([0.0, 1.0, -1.0]),
    ...       "bn1.running_mean": np.array([0.5, -1.0, 2.0]),
    ...       "bn1.running_var": np.array([4.0, 1.0, 0.25]),
    ...       "bn1.num_batches_tracked": np.array(10)}
    >>> params, state = jn.from_torch_state_dict(sd, "BatchNorm2d", prefix="bn1")
    >>> type(state).__name__, state.var
    ('BatchNormState', Array([4.  , 1.  , 0.25], dtype=float32))
    >>> x = jnp.ones((2, 3, 4, 4))  # NCHW
    >>> y, _ = jn.batch_norm(x, params, state, use_running_average=True,
    ...                      axis=1, epsilon=0.0)
    >>> y[0, :, 0, 0]  # (1 - mean) / sqrt(var) * weight + bias
    Array([ 0.25,  5.  , -2.  ], dtype=float32)

    Flax variable names, with PyTorch's batch count kept:

    >>> v = jn.from_torch_state_dict(sd, "BatchNorm2d", prefix="bn1.",
    ...                              running_stats="torch", to="flax")
    >>> {k: sorted(c) for k, c in v.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'params': ['bias', 'scale'],
     'batch_stats': ['mean', 'num_batches_tracked', 'var']}
    >>> v["batch_stats"]["num_batches_tracked"]
    Array(10, dtype=int32)

    Unknown and missing entries are listed:

    >>> bad = {"bn1.weight": np.ones(3), "bn1.bias": np.zeros(3),
    ...        "bn1.foo": np.ones(3), "bn1.running_mean": np.zeros(3)}
    >>> try:
    ...   jn.from_torch_state_dict(bad, "BatchNorm2d", prefix="bn1")
    ... except ValueError as e:
    ...   print(str(e).split(": ")[1].split(". ")[0])
    unknown entries ['bn1.foo']; missing entries ['bn1.running_var']
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(
      f"`state_dict` must be a mapping (e.g. `model.state_dict()`), got "
      f"{type(state_dict).__name__}."
    )
  if not isinstance(prefix, str):
    raise TypeError(f"`prefix` must be a string, got {type(prefix).__name__}.")
  if layout not in _LAYOUTS:
    raise ValueError(f'`layout` must be "NCHW" or "NHWC", got {layout!r}.')
  if running_stats not in ("flax", "torch"):
    raise ValueError(
      f'`running_stats` must be "flax" or "torch", got {running_stats!r}.'
    )
  if to not in ("jaxnorm", "flax"):
    raise ValueError(f'`to` must be "jaxnorm" or "flax", got {to!r}.')
  kind_name = _kind_name(layer)
  family = _KINDS[kind_name]
  module_entries = _module_entries(layer)
  if prefix and not prefix.endswith("."):
    prefix += "."

  entries = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise TypeError(f"`state_dict` keys must be strings, got {key!r}.")
    if key.startswith(prefix):
      entries[key[len(prefix) :]] = value
  if prefix and not entries:
    # An empty match is almost always a misspelt prefix; a layer without
    # entries has nothing to port (pass its own, empty, state_dict).
    nearby = sorted(state_dict)[:8]
    raise ValueError(
      f"`state_dict` has no entries under `prefix`={prefix!r}; its first "
      f"keys are {nearby}."
    )
  _check_entries(set(entries), kind_name, family, module_entries, running_stats, prefix)

  arrays = {}
  for name in _ENTRIES[family]:
    if name == _COUNT or name not in entries:
      continue
    arrays[name] = _to_numpy(entries[name], prefix + name).astype(np.float32)
  shapes = {name: a.shape for name, a in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(
      f"`state_dict` entries of the torch {kind_name}{_where(prefix)} have "
      f"different shapes: {shapes}."
    )
  if family in ("batch", "instance", "group"):
    bad = {name: s for name, s in shapes.items() if len(s) != 1}
    if bad:
      raise ValueError(
        f"`state_dict` entries of a torch {kind_name}{_where(prefix)} must have "
        f"shape (C,), got {bad}."
      )
  elif layout == "NHWC":
    # normalized_shape (C, *spatial) of a channels-first tensor.
    arrays = {
      name: np.moveaxis(a, 0, -1) if a.ndim >= 2 else a for name, a in arrays.items()
    }
  arrays = {name: jnp.asarray(a, jnp.float32) for name, a in arrays.items()}

  count = None
  if running_stats == "torch" and _COUNT in entries and "running_mean" in arrays:
    key = prefix + _COUNT
    raw = _to_numpy(entries[_COUNT], key)
    if raw.size != 1 or raw.dtype.kind == "f" and raw.reshape(()) % 1 != 0:
      raise ValueError(f"`state_dict[{key!r}]` must be an integer scalar, got {raw!r}.")
    value = int(raw.reshape(()))
    if not 0 <= value <= _INT32_MAX:
      raise ValueError(
        f"`state_dict[{key!r}]`={value} is outside [0, {_INT32_MAX}] (int32)."
      )
    count = jnp.asarray(value, jnp.int32)

  scale, bias = arrays.get("weight"), arrays.get("bias")
  mean, var = arrays.get("running_mean"), arrays.get("running_var")
  if to == "flax":
    variables = {}
    params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
    if params:
      variables["params"] = params
    if mean is not None:
      variables["batch_stats"] = {"mean": mean, "var": var}
      if count is not None:
        variables["batch_stats"]["num_batches_tracked"] = count
    return variables
  params = NormParams(scale=scale, bias=bias)
  if mean is None:
    return params, None
  if count is not None:
    return params, TorchBatchNormState(mean=mean, var=var, num_batches_tracked=count)
  return params, BatchNormState(mean=mean, var=var)
