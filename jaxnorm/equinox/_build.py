"""Builds an ``equinox`` module from a layer's description.

What only equinox needs: ``__init__(num_features, *, ..., key=None)``
creating the parameters eagerly as array fields and the running statistics
as one :class:`equinox.nn.StateIndex` (a dict of arrays, read and written
through :class:`equinox.nn.State`); hyperparameters as static fields; the
``inference`` flag that :func:`equinox.nn.inference_mode` sets; and the
layout of an equinox call, one unbatched channels-first sample ``(C,
*spatial)`` under a named ``jax.vmap``. Each call adds a leading batch axis
of size 1, shifts the axes by one, and lets the core take the batch
statistics over the vmap's ``axis_name``. Everything else is in
:mod:`jaxnorm._description`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm import _checks, _description
from jaxnorm._group_norm import resolve_groups

_Field = _description.Field
_REQUIRED = inspect.Parameter.empty
_EQX = frozenset({"equinox"})
# Fields of the description that are axes of the input: in equinox they are
# axes of one sample, shifted by one for the core, which sees a batch of 1.
_AXES = ("axis", "feature_axes", "reduction_axes")
# Only flax users know these: flax's variance flag (always ignored) and
# flax's train/eval switch, which equinox calls ``inference``.
_DROPPED = frozenset({"use_fast_variance", "use_running_average"})
# The stored hyperparameters of each built layer (every argument of the
# constructor but the initializers and ``key``).
_STORED: dict[str, tuple[str, ...]] = {}


class _NoState:
  """The default of a stateless layer's ``state``: none given, none returned."""

  def __repr__(self) -> str:
    return "<no state>"


NO_STATE = _NoState()


# --- what equinox changes in the description ----------------------------------
# Everything below is a per-family default or doc that could live in
# ``_description.py`` (``Field.defaults["equinox"]``, an equinox example).

NUM_FEATURES = _Field(
  "num_features",
  _REQUIRED,
  "the number of channels ``C`` (the product of their sizes for several channel axes).",
  "int",
  families=_EQX,
)
SHAPE = _Field(
  "shape",
  _REQUIRED,
  "shape of ``scale`` and ``bias``: the trailing axes of a sample that are "
  "normalized (PyTorch's ``normalized_shape``; ``x.shape`` normalizes the "
  "whole sample, as ``equinox.nn.LayerNorm(x.shape)`` does). An int is a "
  "1-tuple.",
  "int | Sequence[int]",
  families=_EQX,
)
INFERENCE = _Field(
  "inference",
  False,
  "if false (the default, training), normalize with the statistics of the "
  "batch of the named ``vmap`` and return updated running statistics; if "
  "true, normalize with the running statistics. Set it with "
  "``eqx.nn.inference_mode(model)``; the call's ``inference`` overrides it.",
  "bool",
  families=_EQX,
)
KEY = (
  "key",
  "``jax.random`` key for random initializers; ``None`` (the default) is "
  "enough for the default ones (ones, zeros, constants).",
)

_CHANNEL_AXIS_DOC = (
  "the channel axis of a sample: ``0`` (the default) for channels-first "
  "``(C, H, W)``, equinox's layout; ``-1`` for channels-last."
)
_AXIS_NAME_DOC = (
  "the name of the batch axis of the ``jax.vmap`` the layer is called "
  "under (``jax.vmap(model, axis_name=...)``), whose samples the batch "
  "statistics are taken over; a tuple of names to also synchronize over "
  "``pmap`` / ``shard_map`` devices (count-weighted). Required in training."
)
_DOCS = {
  "dtype": "dtype of the output (default: the dtype of ``x``, as in "
  "equinox; integer input is promoted with the parameters, as in flax). "
  "Not equinox's meaning: equinox's ``dtype`` is that of the weights, "
  "which is ``param_dtype`` here (flax's names).",
  "axis": _CHANNEL_AXIS_DOC,
}
_STATEFUL_DOCS = {"axis_name": _AXIS_NAME_DOC}
_LN_DOCS = {
  "epsilon": "added to the variance inside the square root (equinox's default, 1e-5).",
  "reduction_axes": "axes of a sample the statistics are taken over "
  "(default: the trailing ``len(shape)`` axes).",
  "feature_axes": "axes of a sample ``scale`` and ``bias`` run along "
  "(default: the trailing ``len(shape)`` axes).",
}


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the equinox family of one layer changes: the constructor's
  positional arguments, defaults and docs, and the docstring example."""

  leading: tuple[_Field, ...]
  example: str
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  docs: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # Where the description's summary speaks of flax or of a batched layout.
  summary: str | None = None


def _channel_spec(example: str, summary: str | None = None, **docs: str) -> Spec:
  return Spec((NUM_FEATURES,), example, {"axis": 0}, docs, summary)


_GROUP_FIELDS = {f.name: f for f in _description.GROUP_NORM.fields}

SPECS: dict[str, Spec] = {
  "BatchNorm": _channel_spec(
    """\
>>> import equinox as eqx, jax
>>> import jaxnorm.equinox as jeqx
>>> bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(3, axis_name="batch")
>>> x = jax.random.normal(jax.random.key(0), (8, 3, 5, 5))  # (N, C, H, W)
>>> def batched(model):
...   return jax.jit(jax.vmap(
...       model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)))
>>> y, state = batched(bn)(x, state)  # training: batch statistics
>>> sorted(state.get(bn.state_index))
['mean', 'var']
>>> y_eval, _ = batched(eqx.nn.inference_mode(bn))(x, state)  # running ones
>>> y_eval.shape
(8, 3, 5, 5)

Ghost batch norm, the statistics of every 4 consecutive samples:

>>> ghost, state = eqx.nn.make_with_state(jeqx.BatchNorm)(
...     3, axis_name="batch", virtual_batch_size=4)
>>> y, state = batched(ghost)(x, state)""",
    axis="the channel axis (or axes) of a sample: ``0`` (the default) for "
    "channels-first ``(C, H, W)``, equinox's layout; ``-1`` for channels-last.",
    virtual_batch_size="jaxnorm extension: ``k`` for ghost batch norm, the "
    "statistics of each group of ``k`` consecutive samples of the ``vmap`` "
    "(``k`` must divide its size; not with ``axis_index_groups``); ``None`` "
    "for plain batch norm.",
    summary="""\
Normalizes each channel (``axis``) over the samples of the named ``vmap``
(``axis_name``) and every other axis of a sample, with
:func:`jaxnorm.batch_norm`: per channel C over N, H, W of an image. In
training the batch statistics are used and the running averages move
toward them, ``new = momentum * old + (1 - momentum) * batch`` with the
biased batch variance (PyTorch's ``momentum=0.1`` is ``momentum=0.9``
here); in inference the running averages are used. Statistics across
devices (a tuple ``axis_name`` naming ``pmap`` / ``shard_map`` axes too)
are count-weighted, so masks and uneven shards are exact.
``virtual_batch_size=k`` gives ghost batch norm (Hoffer et al. 2017);
``running_stats="torch"`` keeps PyTorch's running statistics.

Differences from :class:`equinox.nn.BatchNorm`: ``axis_name`` is a keyword
(needed in training only); the running statistics are plain EMAs starting
at mean 0 and variance 1, used as they are in inference (equinox's
``mode="batch"`` keeps the same EMAs but divides them by ``1 -
momentum**t`` in inference; ``mode="ema"``, its default, starts from the
first batch and also normalizes in *training* by the running averages
blended with the batch's statistics, so training outputs differ from the
second step on);
the variance is the exact two-pass one; a training call with a single
value per channel raises ``ValueError``; the output has the dtype of
``x``.""",
  ),
  "LayerNorm": Spec(
    (SHAPE,),
    """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.equinox as jeqx
>>> ln = jeqx.LayerNorm(16)
>>> x = jax.random.normal(jax.random.key(0), (2, 5, 16))  # (N, T, D)
>>> y = jax.jit(jax.vmap(ln))(x)  # every token over its D features
>>> ln.scale.shape, bool(jnp.allclose(y.mean(-1), 0.0, atol=1e-5))
((16,), True)""",
    {"epsilon": 1e-5, "reduction_axes": None, "feature_axes": None},
    _LN_DOCS,
    summary="""\
Normalizes a sample over ``reduction_axes`` with :func:`jaxnorm.layer_norm`:
``y = (x - E[x]) / sqrt(Var[x] + epsilon) * scale + bias``, with ``scale``
and ``bias`` of shape ``shape`` along ``feature_axes``. By default both are
the trailing ``len(shape)`` axes of the sample (PyTorch's
``normalized_shape``): ``LayerNorm(x.shape)`` is
:class:`equinox.nn.LayerNorm` (which requires ``shape == x.shape``), and
``LayerNorm(D)`` on a sequence ``(T, D)`` normalizes every token over
``D`` without a second ``vmap``. The variance is the exact two-pass
one.""",
  ),
  "RMSNorm": Spec(
    (SHAPE,),
    """\
>>> import jax.numpy as jnp
>>> import jaxnorm.equinox as jeqx
>>> rms = jeqx.RMSNorm(2, epsilon=0.0)
>>> rms(jnp.array([1.0, 7.0]))  # mean square 25
Array([0.2, 1.4], dtype=float32)""",
    {"epsilon": 1e-5, "reduction_axes": None, "feature_axes": None},
    {
      **_LN_DOCS,
      "epsilon": "added to the mean square inside the square root (equinox's "
      "default, 1e-5).",
      "shape": "shape of ``scale``: the trailing axes of a sample that are "
      "normalized (``x.shape`` for the whole sample). An int is a 1-tuple.",
    },
    summary="""\
Normalizes a sample by the root mean square over ``reduction_axes`` with
:func:`jaxnorm.rms_norm`: ``y = x / sqrt(E[x^2] + epsilon) * scale``. There
is no centering and no bias (:class:`equinox.nn.RMSNorm` adds a bias by
default). By default the statistics run over the trailing ``len(shape)``
axes of the sample, the axes of ``scale``.""",
  ),
  "GroupNorm": Spec(
    (
      dataclasses.replace(
        _GROUP_FIELDS["num_groups"],
        default=_REQUIRED,
        doc="number of groups ``G``, or ``None`` to give ``group_size``.",
      ),
      NUM_FEATURES,
    ),
    """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.equinox as jeqx
>>> gn = jeqx.GroupNorm(3, 6)  # 3 groups of 2 channels
>>> x = jax.random.normal(jax.random.key(0), (2, 6, 4, 4))  # (N, C, H, W)
>>> y = jax.jit(jax.vmap(gn))(x).reshape(2, 3, 2, 4, 4)
>>> bool(jnp.allclose(y.mean((2, 3, 4)), 0.0, atol=1e-5))
True""",
    {"epsilon": 1e-5, "axis": 0},
    {
      "epsilon": "added to the variance inside the square root (equinox's "
      "default, 1e-5).",
      "reduction_axes": "axes of a sample to reduce, which must include the "
      "channel axis; default: every axis of the sample.",
      "axis": _CHANNEL_AXIS_DOC,
    },
    summary="""\
Splits the ``C`` channels of a sample into groups and normalizes every
group over its channels and every other axis (H, W and C/G), with
:func:`jaxnorm.group_norm`; ``scale`` and ``bias`` are per channel. One
group is layer norm over C, H, W; ``group_size=1`` is instance norm. Give
exactly one of ``num_groups`` and ``group_size`` (``GroupNorm(None, C,
group_size=...)``). ``GroupNorm(groups, channels)`` is
:class:`equinox.nn.GroupNorm` (same argument order and epsilon).""",
  ),
  "InstanceNorm": Spec(
    (NUM_FEATURES,),
    """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.equinox as jeqx
>>> inorm = jeqx.InstanceNorm(3)
>>> x = jax.random.normal(jax.random.key(0), (2, 3, 5, 5))  # (N, C, H, W)
>>> y = jax.jit(jax.vmap(inorm))(x)
>>> bool(jnp.allclose(y.mean((2, 3)), 0.0, atol=1e-5))
True""",
    {"feature_axes": 0},
    {
      "feature_axes": "the channel axis or axes of a sample: ``0`` (the "
      "default) for ``(C, H, W)``, ``-1`` for channels-last."
    },
    summary="""\
Normalizes every channel of a sample over its other axes (H, W) with
:func:`jaxnorm.instance_norm`; ``scale`` and ``bias`` run along
``feature_axes``, the channel axis ``0`` of ``(C, H, W)`` by default.""",
  ),
  "FilterResponseNorm": _channel_spec(
    """\
>>> import jax
>>> import jaxnorm.equinox as jeqx
>>> frn = jeqx.FilterResponseNorm(3)
>>> x = jax.random.normal(jax.random.key(0), (2, 3, 4, 4))  # (N, C, H, W)
>>> jax.jit(jax.vmap(frn))(x).shape, frn.tau.shape
((2, 3, 4, 4), (3,))"""
  ),
  "SwitchableNorm": _channel_spec(
    """\
>>> import equinox as eqx, jax
>>> import jaxnorm.equinox as jeqx
>>> sn, state = eqx.nn.make_with_state(jeqx.SwitchableNorm)(3, axis_name="batch")
>>> x = jax.random.normal(jax.random.key(0), (4, 3, 4, 4))  # (N, C, H, W)
>>> y, state = jax.jit(jax.vmap(
...     sn, axis_name="batch", in_axes=(0, None), out_axes=(0, None)))(x, state)
>>> sn.mean_weights.shape, y.shape
((3,), (4, 3, 4, 4))"""
  ),
  "BatchRenorm": _channel_spec(
    """\
>>> import equinox as eqx, jax
>>> import jaxnorm as jn, jaxnorm.equinox as jeqx
>>> brn, state = eqx.nn.make_with_state(jeqx.BatchRenorm)(3, axis_name="batch")
>>> x = jax.random.normal(jax.random.key(0), (8, 3))
>>> r_max, d_max = jn.batch_renorm_schedule(20_000)
>>> step = jax.jit(jax.vmap(
...     lambda x, s: brn(x, s, r_max=r_max, d_max=d_max),
...     axis_name="batch", in_axes=(0, None), out_axes=(0, None)))
>>> y, state = step(x, state)
>>> y.shape
(8, 3)"""
  ),
  "MovingAverageBatchNorm": _channel_spec(
    """\
>>> import equinox as eqx, jax, jax.numpy as jnp
>>> import jaxnorm as jn, jaxnorm.equinox as jeqx
>>> model, state = eqx.nn.make_with_state(jeqx.MovingAverageBatchNorm)(
...     3, axis_name="batch", buffer_size=4)
>>> x = jax.random.normal(jax.random.key(0), (2, 3, 5))  # (N, C, L)
>>> def loss_fn(model_and_state):
...   model, state = model_and_state
...   y, state = jax.vmap(model, axis_name="batch", in_axes=(0, None),
...                       out_axes=(0, None))(x, state)
...   return jnp.sum(y ** 3), state
>>> grad_fn = eqx.filter_jit(eqx.filter_grad(loss_fn, has_aux=True))
>>> (g_model, g_state), state = grad_fn((model, state))
>>> state = jn.apply_mabn_grad_moments(state, g_state)
>>> buffers = state.get(model.state_index)
>>> int(buffers["count"]), bool(jnp.all(buffers["grad_moments"][0] != 0))
(1, True)""",
    summary="""\
Calls :func:`jaxnorm.moving_average_batch_norm`; see it for the formula and
the backward pass. Its batch statistics are taken over the samples of the
named ``vmap`` (``axis_name``). ``grad_moments`` is written through the
gradient: differentiate the loss with respect to the state as well (pass
``(model, state)`` to ``eqx.filter_grad``) and pass the new state and the
state's gradient to :func:`jaxnorm.apply_mabn_grad_moments` (see the
example). With the state unbatched (``in_axes=(0, None)``) the gradient
taken outside the ``vmap`` is the increment itself; under ``pmap`` give
each device its own state.""",
  ),
  "EvoNormB0": _channel_spec(
    """\
>>> import equinox as eqx, jax
>>> import jaxnorm.equinox as jeqx
>>> layer, state = eqx.nn.make_with_state(jeqx.EvoNormB0)(8, axis_name="batch")
>>> x = jax.random.normal(jax.random.key(0), (4, 8, 6, 6))  # (N, C, H, W)
>>> y, state = jax.jit(jax.vmap(
...     layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None)))(x, state)
>>> y_eval, _ = jax.jit(jax.vmap(  # no batch statistics: no axis name needed
...     eqx.nn.inference_mode(layer), in_axes=(0, None), out_axes=(0, None)))(
...     x, state)
>>> y_eval.shape
(4, 8, 6, 6)"""
  ),
  "EvoNormS0": _channel_spec(
    """\
>>> import jax.numpy as jnp
>>> import jaxnorm.equinox as jeqx
>>> layer = jeqx.EvoNormS0(8, num_groups=4)
>>> layer(jnp.ones((8, 3, 3))).shape  # one sample (C, H, W)
(8, 3, 3)"""
  ),
}


def fields(layer: _description.Layer) -> tuple[_Field, ...]:
  """The equinox constructor's arguments, in order, with equinox's defaults."""
  spec = SPECS[layer.name]
  leading = {f.name for f in spec.leading}
  docs = {**_DOCS, **(_STATEFUL_DOCS if layer.stateful else {}), **spec.docs}
  out = [dataclasses.replace(f, doc=docs.get(f.name, f.doc)) for f in spec.leading]
  if layer.stateful:
    out.append(INFERENCE)
  for f in layer.fields_for("equinox"):
    if f.name in _DROPPED or f.name in leading:
      continue
    # A default the description gives for equinox wins over this table.
    default = f.defaults.get("equinox", spec.defaults.get(f.name, f.default))
    out.append(
      dataclasses.replace(
        f, default=default, defaults={}, doc=docs.get(f.name, f.doc), families=_EQX
      )
    )
  return tuple(out)


def _init_signature(fs: tuple[_Field, ...], n_leading: int) -> inspect.Signature:
  P = inspect.Parameter
  params = [P("self", P.POSITIONAL_OR_KEYWORD)]
  params += [P(f.name, P.POSITIONAL_OR_KEYWORD) for f in fs[:n_leading]]
  params += [P(f.name, P.KEYWORD_ONLY, default=f.default) for f in fs[n_leading:]]
  params.append(P("key", P.KEYWORD_ONLY, default=None))
  return inspect.Signature(params)


# --- construction -------------------------------------------------------------


def _frozen(value: Any) -> Any:
  """Lists as tuples, so that static fields hash (``jax.jit`` needs it)."""
  if isinstance(value, list | tuple):
    return tuple(_frozen(v) for v in value)
  return value


def _features_at_init(arguments) -> tuple[int, ...]:
  if "shape" in arguments:
    shape = arguments["shape"]
    try:
      dims = (shape,) if _checks.is_int(shape) else tuple(shape)
    except TypeError:
      raise TypeError(
        f"`shape` must be an int or a sequence of ints, got {shape!r}."
      ) from None
    return tuple(_checks.as_int(d, "shape", least=0) for d in dims)
  return _checks.num_features_shape(arguments["num_features"])


def _check_at_init(arguments, features) -> None:
  """Errors an equinox user expects from the constructor, naming the argument."""
  if "num_groups" in arguments:
    # GroupNorm and EvoNorm-S0: both or neither of num_groups and group_size,
    # or channels not divisible (equinox's GroupNorm also checks here).
    resolve_groups(features[0], arguments["num_groups"], arguments["group_size"])
  if arguments.get("virtual_batch_size") is not None:
    _checks.as_int(arguments["virtual_batch_size"], "virtual_batch_size", least=1)
    if arguments.get("running_stats") == "torch":
      raise ValueError(
        '`running_stats="torch"` cannot be combined with `virtual_batch_size`: '
        "PyTorch has no ghost batch norm whose running statistics to match."
      )
  if "running_stats" in arguments:
    _description.check_running_stats(arguments["running_stats"])
  if "inference" in arguments:
    arguments["inference"] = _checks.as_bool(arguments["inference"], "inference")


def _make(var, config, shape, key) -> jax.Array:
  init, dtype = var.init(config), var.dtype(config)
  if key is not None:
    return init(key, shape, dtype)
  try:
    return init(None, shape, dtype)
  except Exception as error:
    # Only a random initializer's error means "pass a key": one that fails
    # with a key too (a bad argument, a bad dtype, a bug in a custom
    # initializer) is re-raised as it is.
    try:
      jax.eval_shape(lambda k: init(k, shape, dtype), jax.random.key(0))
    except Exception:
      raise error from None
    raise ValueError(
      f"The initializer of `{var.name}` needs a random key: pass "
      "`key=jax.random.key(...)` to the constructor."
    ) from error


def _init(self, layer, signature, args, kwargs) -> None:
  bound = signature.bind(self, *args, **kwargs)
  bound.apply_defaults()
  arguments = dict(bound.arguments)
  del arguments["self"]
  key = arguments.pop("key")
  features = _features_at_init(arguments)
  if "shape" in arguments:
    arguments["shape"] = features
  _check_at_init(arguments, features)
  config = types.SimpleNamespace(**arguments)
  for name, value in arguments.items():
    if not name.endswith("_init"):  # initializers are used here only
      setattr(self, name, _frozen(value))
  params = [v for v in layer.variables if v.collection == "params"]
  keys = [None] * len(params) if key is None else jax.random.split(key, len(params))
  for var, k in zip(params, keys, strict=True):
    shape = var.shape(config, features)
    setattr(self, var.name, _make(var, config, shape, k) if var.when(config) else None)
  stats = {
    var.name: _make(var, config, var.shape(config, features), None)
    for var in layer.variables
    if var.collection != "params" and var.when(config)
  }
  if layer.stateful:
    self.state_index = eqx.nn.StateIndex(stats)


# --- the call -----------------------------------------------------------------


def _shift(value: Any, ndim: int, name: str) -> Any:
  """Axes of a sample of rank ``ndim`` as axes of the core's batch of one."""
  axes = tuple(a + 1 for a in _checks.canonicalize_axes(ndim, value, name))
  return axes[0] if _checks.is_int(value) else axes


def _config(self, layer, x: jax.Array, training: bool) -> types.SimpleNamespace:
  """The module's fields as the description's ``apply`` reads them: axes of
  the batch of one, and equinox's output dtype."""
  config = types.SimpleNamespace(
    **{name: getattr(self, name) for name in _STORED[layer.name]}
  )
  if "shape" in vars(config):
    if len(self.shape) > x.ndim:
      raise ValueError(
        f"`shape`={self.shape} has more axes than the sample `x` of shape "
        f"{x.shape} (call the layer on one sample, under `jax.vmap`)."
      )
    trailing = tuple(range(x.ndim - len(self.shape), x.ndim))
    for name in ("reduction_axes", "feature_axes"):
      if getattr(config, name) is None:
        setattr(config, name, trailing)
  for name in _AXES:
    value = getattr(config, name, None)
    if value is not None:
      setattr(config, name, _shift(value, x.ndim, name))
  if config.dtype is None and jnp.issubdtype(x.dtype, jnp.inexact):
    config.dtype = x.dtype  # equinox keeps the dtype of the input
  if not training and layer.stateful:
    # Running statistics need no batch: evaluation runs without a named axis.
    config.axis_name = config.axis_index_groups = None
  return config


def _values(self, layer, state) -> dict[str, Any]:
  values = {v.name: getattr(self, v.name, None) for v in layer.variables}
  if layer.stateful:
    values.update(state.get(self.state_index))
  return values


def _shaped(self, layer, config, xb, values) -> dict[str, Any]:
  """The stored variables reshaped to the features of the input."""
  features = layer.features(config, xb.shape)
  if "shape" in vars(config):
    if features != self.shape:
      raise ValueError(
        f"`shape`={self.shape} does not match the input: the normalized axes "
        f"of the sample `x` of shape {xb.shape[1:]} have shape {features}."
      )
    return values
  flat = _checks.num_features_shape(self.num_features)
  out = dict(values)
  for var in layer.variables:
    value, want = values[var.name], var.shape(config, features)
    if value is None or value.shape == want:
      continue
    if var.shape(config, flat) != value.shape or value.size != math.prod(want):
      raise ValueError(
        f"`num_features`={self.num_features} does not match the input: the "
        f"channels of the sample `x` of shape {xb.shape[1:]} have shape "
        f"{features}, but `{var.name}` holds {value.size} values."
      )
    out[var.name] = value.reshape(want)
  return out


def _check_mask(mask: Any, x: jax.Array) -> jax.Array | None:
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  try:
    ok = jnp.broadcast_shapes(mask.shape, x.shape) == x.shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
      f"`mask` of shape {mask.shape} does not broadcast to the sample `x` of "
      f"shape {x.shape}."
    )
  return mask[None]


def _ghost_state(config, xb, maskb, old, group_state, k):
  """Ghost BN's new running statistics across the samples of the ``vmap``.

  Each sample holds its ghost batch's EMA step (``group_state``, equal
  across the ``k`` samples of a group). As :func:`jaxnorm.batch_norm` with
  ``virtual_batch_size`` does for the groups of one device, the new state is
  their average over the groups that saw something, per channel: a single
  ``psum`` of one slot per group.
  """
  names, size = config.axis_name, lax.axis_size(config.axis_name)
  mean, var = group_state["mean"], group_state["var"]
  dtype = jnp.result_type(mean, var, jnp.float32)  # complex x: complex mean
  channels = _as_tuple(config.axis)
  if maskb is None:
    seen = jnp.ones(mean.shape, dtype)
  else:
    full = jnp.broadcast_to(maskb, xb.shape)
    others = tuple(a for a in range(xb.ndim) if a not in channels)
    seen = jnp.any(full, axis=others).reshape(mean.shape).astype(dtype)
  slot = jax.nn.one_hot(lax.axis_index(names) // k, size // k, dtype=jnp.float32)
  parts = jnp.stack([seen, mean.astype(dtype), var.astype(dtype)])
  sums = lax.psum(slot.reshape((-1,) + (1,) * parts.ndim) * parts[None], names)
  # A group's k samples all add its (identical) state; ``seen`` counts them.
  group_seen = (jnp.real(sums[:, 0]) > 0).astype(jnp.float32)
  n_seen = jnp.sum(group_seen, axis=0)
  new = {}
  for i, name in enumerate(("mean", "var"), start=1):
    avg = jnp.sum(group_seen * sums[:, i] / k, axis=0) / jnp.maximum(n_seen, 1.0)
    new[name] = jnp.where(n_seen > 0, avg, old[name].astype(dtype))
  return new


def _as_tuple(axes: Any) -> tuple[int, ...]:
  return (axes,) if _checks.is_int(axes) else tuple(axes)


def _ghost(layer, config, xb, values, maskb, call_kwargs):
  """Ghost BN under a named ``vmap``: the samples of each group of ``k``
  normalize with their group's statistics (``axis_index_groups``)."""
  if config.axis_index_groups is not None:
    raise ValueError(
      "`virtual_batch_size` and `axis_index_groups` cannot be combined: ghost "
      "batches are the groups of `virtual_batch_size` consecutive samples of "
      "`axis_name`."
    )
  size, _ = _checks.check_axis_name(config.axis_name, None)
  k = config.virtual_batch_size
  if size % k:
    raise ValueError(
      f"`virtual_batch_size`={k} does not divide the {size} samples of "
      f"`axis_name`={config.axis_name!r}."
    )
  config.axis_index_groups = tuple(
    tuple(range(g * k, (g + 1) * k)) for g in range(size // k)
  )
  config.virtual_batch_size = None
  y, updates = layer.apply(
    config,
    xb,
    values,
    training=True,
    initializing=False,
    mask=maskb,
    family="equinox",
    **call_kwargs,
  )
  return y, _ghost_state(config, xb, maskb, values, updates, k)


def _run(self, layer, x, state, training, mask, call_kwargs):
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError(
      f"`x` must be one sample of at least one axis, `(C, *spatial)`, got a "
      f"scalar; batch {layer.name} with `jax.vmap`."
    )
  if training and layer.stateful and self.axis_name is None:
    raise ValueError(
      f"{layer.name} takes its batch statistics in training over the samples "
      "of a named `jax.vmap`, and has no `axis_name`: construct it with "
      '`axis_name="batch"` and call it as `jax.vmap(model, axis_name="batch", '
      "in_axes=(0, None), out_axes=(0, None))(x, state)`, or call it with "
      "`inference=True` (or on `eqx.nn.inference_mode(model)`)."
    )
  config = _config(self, layer, x, training)
  xb, maskb = x[None], _check_mask(mask, x)
  values = _values(self, layer, state)
  shaped = _shaped(self, layer, config, xb, values)
  if training and getattr(config, "virtual_batch_size", None) is not None:
    y, updates = _ghost(layer, config, xb, shaped, maskb, call_kwargs)
  else:
    y, updates = layer.apply(
      config,
      xb,
      shaped,
      training=training,
      initializing=False,
      mask=maskb,
      family="equinox",
      **call_kwargs,
    )
  y = y[0]
  if not (training and layer.stateful):
    return y, state
  new = dict(state.get(self.state_index))
  for name, value in updates.items():
    old = new[name]
    value = lax.stop_gradient(value)  # state, never differentiated
    if not jnp.iscomplexobj(value):
      value = value.astype(old.dtype)
    new[name] = value.reshape(old.shape)
  return y, state.set(self.state_index, new)


def _check_state(layer, state) -> None:
  if not isinstance(state, eqx.nn.State):
    raise TypeError(
      f"`state` must be an `eqx.nn.State` (from `eqx.nn.make_with_state("
      f"{layer.name})(...)`), got {type(state).__name__}."
    )


_CALL_DOC = """Normalizes one sample ``x``{mode}.

Call it on one unbatched sample and batch it with ``jax.vmap``{vmap}.

Args:
  x: one sample, ``(C, *spatial)`` (channels first, equinox's layout;
    see the axis arguments of the constructor).{state}
  key: ignored; for compatibility with the rest of the equinox API.{inference}{extra}
  mask: optional boolean array broadcastable to ``x``; ``False`` elements do
    not enter the statistics (they are still normalized).

Returns:
  {returns}
"""


def _call_doc(layer) -> str:
  if layer.stateful:
    return _CALL_DOC.format(
      mode=" with batch (training) or running (inference) statistics",
      vmap=' named like\n``axis_name``: ``jax.vmap(model, axis_name="batch", '
      "in_axes=(0, None),\nout_axes=(0, None))(x, state)``",
      state="\n  state: the ``eqx.nn.State`` holding the running statistics.",
      inference="\n  inference: overrides the ``inference`` field if not ``None``.",
      extra="".join(f"\n  {f.name}: {f.doc}" for f in layer.call_kwargs),
      returns="``(y, new_state)``: ``y`` of the shape of ``x``; in training\n"
      "  ``new_state`` holds the updated running statistics, in inference it\n"
      "  is ``state``.",
    )
  return _CALL_DOC.format(
    mode="",
    vmap="",
    state="\n  state: optional ``eqx.nn.State``, returned unchanged (as\n"
    "    ``equinox.nn.LayerNorm`` does, so that stateful and stateless\n"
    "    layers are called alike).",
    inference="",
    extra="",
    returns="``y`` of the shape of ``x``, or ``(y, state)`` if ``state`` was given.",
  )


def _call_signature(layer) -> inspect.Signature:
  P = inspect.Parameter
  params = [P("self", P.POSITIONAL_OR_KEYWORD), P("x", P.POSITIONAL_OR_KEYWORD)]
  if layer.stateful:
    params.append(P("state", P.POSITIONAL_OR_KEYWORD))
  else:
    params.append(P("state", P.POSITIONAL_OR_KEYWORD, default=NO_STATE))
  params.append(P("key", P.KEYWORD_ONLY, default=None))
  if layer.stateful:
    params.append(P("inference", P.KEYWORD_ONLY, default=None))
  params += [P(f.name, P.KEYWORD_ONLY, default=None) for f in layer.call_kwargs]
  params.append(P("mask", P.KEYWORD_ONLY, default=None))
  return inspect.Signature(params)


def build(layer: _description.Layer) -> type[eqx.Module]:
  """The ``eqx.Module`` subclass described by ``layer``."""
  spec = SPECS[layer.name]
  fs = fields(layer)
  signature = _init_signature(fs, len(spec.leading))
  call_names = tuple(f.name for f in layer.call_kwargs)

  def __init__(self, *args, **kwargs):
    _init(self, layer, signature, args, kwargs)

  __init__.__signature__ = signature

  if layer.stateful:

    def __call__(self, x, state, *, key=None, inference=None, mask=None, **kwargs):
      del key
      unknown = set(kwargs) - set(call_names)
      if unknown:
        raise TypeError(f"{layer.name} got unexpected arguments {sorted(unknown)}.")
      _check_state(layer, state)
      if inference is None:
        inference = self.inference
      training = not _checks.as_bool(inference, "inference")
      return _run(self, layer, x, state, training, mask, kwargs)

  else:

    def __call__(self, x, state=NO_STATE, *, key=None, mask=None):
      del key
      if state is not NO_STATE:
        _check_state(layer, state)
      y, _ = _run(self, layer, x, None, False, mask, {})
      return y if state is NO_STATE else (y, state)

  __call__.__doc__ = _call_doc(layer)
  __call__.__signature__ = _call_signature(layer)
  stored = tuple(f.name for f in fs if not f.name.endswith("_init"))
  _STORED[layer.name] = stored
  static = {f.name: f.annotation for f in fs if f.name in stored}
  static.pop("inference", None)
  annotations = dict(static)
  annotations.update({v.name: "jax.Array | None" for v in layer.variables
                      if v.collection == "params"})  # fmt: skip
  if layer.stateful:
    annotations["state_index"] = "eqx.nn.StateIndex"
    annotations["inference"] = "bool"
  # ``docstring`` lists its first extra argument, the fields, then the rest.
  doc_layer = dataclasses.replace(
    layer,
    summary=spec.summary or layer.summary,
    fields=fs[1:],
    examples={**layer.examples, "equinox": spec.example},
  )
  namespace = {
    "__annotations__": annotations,
    "__module__": "jaxnorm.equinox",
    "__qualname__": layer.name,
    "__doc__": _description.docstring(
      doc_layer, "equinox", extra_args=((fs[0].name, fs[0].doc), KEY)
    ),
    "__init__": __init__,
    "__call__": __call__,
    "description": layer,
  }
  for name in static:
    namespace[name] = eqx.field(static=True)
  base = eqx.nn.StatefulLayer if layer.stateful else eqx.Module
  return types.new_class(layer.name, (base,), {}, lambda ns: ns.update(namespace))
