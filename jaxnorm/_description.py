"""One description per wrapped layer, shared by the linen, nnx and equinox modules.

A :class:`Layer` states, once, what a module family needs to know about a
normalization layer: its fields with their defaults and meaning, its
variables (collection, shape, dtype, initializer), and ``apply``, the one
function that turns the variables and an input into the output and the new
state by calling the functional core. ``jaxnorm.linen``, ``jaxnorm.nnx``
and ``jaxnorm.equinox`` build their classes from these descriptions
(``_build.py`` in each), so the families cannot drift apart: the same
variables and input give the same bits.

``apply(m, x, v, *, training, initializing, mask, family, **call_kwargs)`` reads the
fields as attributes of ``m`` (the module), the variables from the dict
``v`` (shaped like the features of ``x``; ``None`` where a variable is not
created), and returns ``(y, updates)``, the new values of the variables it
changes in training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.nnx.nn import dtypes as nnx_dtypes
from jax.nn import initializers

import jaxnorm as jn
from jaxnorm import _checks
from jaxnorm._batch_norm import check_running_stats
from jaxnorm._group_norm import resolve_groups

FAMILIES = frozenset({"linen", "nnx", "equinox"})
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
_SAME = object()


@dataclasses.dataclass(frozen=True)
class Field:
  """A constructor argument and attribute of a module."""

  name: str
  default: Any
  doc: str
  annotation: str = "Any"
  families: frozenset = FAMILIES
  # A default that differs by family (flax.nnx starts BatchNorm in training).
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # nnx: positional after num_features (GroupNorm's num_groups, group_size).
  positional: bool = False

  def default_for(self, family: str) -> Any:
    return self.defaults.get(family, self.default)


@dataclasses.dataclass(frozen=True)
class Var:
  """A variable: ``collection`` is ``"params"`` or ``"batch_stats"``."""

  collection: str
  name: str
  init: Callable[[Any], Callable[..., jax.Array]]
  dtype: Callable[[Any], Any]
  shape: Callable[[Any, tuple[int, ...]], tuple[int, ...]] = lambda m, f: f
  when: Callable[[Any], bool] = lambda m: True
  # nnx: the field holding the Param's metadata, and a Variable type other
  # than nnx.Param / nnx.BatchStat (MABN's gradient buffer).
  metadata: str | None = None
  nnx_type: str | None = None
  doc: str = ""


@dataclasses.dataclass(frozen=True)
class Layer:
  """Everything the module families share about one layer."""

  name: str
  title: str
  summary: str
  function: str
  fields: tuple[Field, ...]
  variables: tuple[Var, ...]
  features: Callable[[Any, tuple[int, ...]], tuple[int, ...]]
  apply: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  examples: Mapping[str, str]
  namesake: str | None = None  # the flax class of that name, if any
  stateful: bool = False  # has use_running_average and running statistics
  call_kwargs: tuple[Field, ...] = ()
  records_moments: bool = False  # for recompute_batch_stats
  # nnx: derived attributes set at construction (flax resolves GN's groups).
  nnx_setup: Callable[[Any], None] | None = None
  # Families whose namesake takes ``mask`` positionally (flax.nnx.RMSNorm).
  positional_mask: frozenset = frozenset()

  def fields_for(self, family: str) -> tuple[Field, ...]:
    return tuple(f for f in self.fields if family in f.families)


# --- shared pieces ------------------------------------------------------------


def out_dtype(x: Any, *params: Any, dtype: Any) -> Any:
  """flax's output dtype: ``dtype``, or the promotion of ``x`` and the params."""
  return flax_dtypes.canonicalize_dtype(x, *params, dtype=dtype)


def as_inexact(x: Any, dtype: Any) -> jax.Array:
  """``x`` as an array; integers are promoted to ``dtype``, as flax does."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(dtype)
  return x


def axes_shape(x_shape: tuple[int, ...], axes: Any, name: str) -> tuple[int, ...]:
  canonical = _checks.canonicalize_axes(len(x_shape), axes, name)
  return tuple(x_shape[a] for a in canonical)


def _reduced_size(x_shape, feature_axes) -> int:
  return math.prod(d for a, d in enumerate(x_shape) if a not in feature_axes)


def _attr(name: str) -> Callable[[Any], Any]:
  return lambda m: getattr(m, name)


def _const(init: Callable[..., jax.Array]) -> Callable[[Any], Callable[..., Any]]:
  return lambda m: init


def _stats_dtype(m: Any) -> Any:
  if getattr(m, "force_float32_reductions", True):
    return jnp.float32
  return m.param_dtype


def _param_dtype(m: Any) -> Any:
  return m.param_dtype


def _uses(name: str) -> Callable[[Any], bool]:
  return lambda m: bool(getattr(m, name))


def _f(name, default, doc, annotation="Any", **kw) -> Field:
  return Field(name, default, doc, annotation, **kw)


def _epsilon(default: float, doc="added to the variance inside the square root."):
  return _f("epsilon", default, doc, "float")


DTYPE = _f(
  "dtype",
  None,
  "dtype of the output (default: promoted from ``x`` and the params).",
  "Dtype | None",
)
PARAM_DTYPE = _f("param_dtype", jnp.float32, "dtype of the parameters.", "Dtype")
USE_BIAS = _f("use_bias", True, "whether to add ``bias`` (beta).", "bool")
USE_SCALE = _f("use_scale", True, "whether to multiply by ``scale`` (gamma).", "bool")
BIAS_INIT = _f(
  "bias_init", initializers.zeros, "initializer of ``bias``, zeros.", "Initializer"
)
SCALE_INIT = _f(
  "scale_init", initializers.ones, "initializer of ``scale``, ones.", "Initializer"
)
AXIS_NAME = _f(
  "axis_name",
  None,
  "named axis (``pmap``, ``shard_map``, named ``vmap``) to also reduce the "
  "statistics over; not needed under ``jit`` with sharded arrays.",
  "str | None",
)
AXIS_INDEX_GROUPS = _f(
  "axis_index_groups",
  None,
  "groups of indices of ``axis_name`` normalized separately, e.g. "
  "``[[0, 1], [2, 3]]``.",
)
USE_FAST_VARIANCE = _f(
  "use_fast_variance",
  True,
  "accepted for compatibility and ignored: the variance is always the exact "
  "two-pass one, which does not lose digits when the mean is large.",
  "bool",
)
FORCE_FLOAT32 = _f(
  "force_float32_reductions",
  True,
  "if false, statistics are computed in the input dtype (and running "
  "statistics kept in ``param_dtype``).",
  "bool",
)
PROMOTE_DTYPE = _f(
  "promote_dtype",
  nnx_dtypes.promote_dtype,
  "flax's hook that promotes ``x`` and the floating variables (for "
  "BatchNorm ``(x, mean, var, scale, bias)``) to a common dtype, or to "
  "``dtype``, before normalizing, as flax.nnx does; pass the identity to "
  "get linen's dtypes.",
  "PromoteDtypeFn",
  families=frozenset({"nnx"}),
)
SCALE_METADATA = _f(
  "scale_metadata",
  _NO_METADATA,
  "metadata of the ``scale`` ``nnx.Param`` (e.g. sharding).",
  "Mapping[str, Any]",
  families=frozenset({"nnx"}),
)
BIAS_METADATA = _f(
  "bias_metadata",
  _NO_METADATA,
  "metadata of the ``bias`` ``nnx.Param``.",
  "Mapping[str, Any]",
  families=frozenset({"nnx"}),
)
USE_RUNNING_AVERAGE = _f(
  "use_running_average",
  None,
  "if true, normalize with the running statistics (evaluation); if false, "
  "with those of the batch, which update them (training). linen: pass it "
  "here or at call time, not both; nnx: the call overrides it, and "
  "``model.train()`` / ``model.eval()`` set it.",
  "bool | None",
  defaults={"nnx": False},
)
AXIS = _f("axis", -1, "the channel axis: ``-1`` for NHWC, ``1`` for NCHW.", "int")


def _momentum(default: float, doc: str = "") -> Field:
  return _f(
    "momentum",
    default,
    doc
    or "decay rate of the running averages: ``new = momentum * old + "
    "(1 - momentum) * batch`` (PyTorch's ``momentum=0.1`` is 0.9 here).",
    "float",
  )


SCALE = Var(
  "params",
  "scale",
  _attr("scale_init"),
  _param_dtype,
  when=_uses("use_scale"),
  metadata="scale_metadata",
)
BIAS = Var(
  "params",
  "bias",
  _attr("bias_init"),
  _param_dtype,
  when=_uses("use_bias"),
  metadata="bias_metadata",
)
AFFINE = (SCALE, BIAS)
RUNNING_MEAN = Var("batch_stats", "mean", _const(initializers.zeros), _stats_dtype)
RUNNING_VAR = Var("batch_stats", "var", _const(initializers.ones), _stats_dtype)


def _sync(m: Any, initializing: bool) -> dict[str, Any]:
  """``axis_name`` and groups; like flax, init needs no bound named axis."""
  if initializing:
    return {"axis_name": None, "axis_index_groups": None}
  return {"axis_name": m.axis_name, "axis_index_groups": m.axis_index_groups}


def _channel_features(m: Any, x_shape: tuple[int, ...]) -> tuple[int, ...]:
  return axes_shape(x_shape, m.axis, "axis")


def _training_at_init(m, x, training, initializing, axis) -> bool:
  """During init only shapes matter and the statistics are thrown away (as in
  flax); with a single value per channel (``model.init(key, jnp.ones((1,
  784)))``) the running statistics are used instead, so ``init`` works."""
  if initializing and training:
    feature_axes = _checks.canonicalize_axes(x.ndim, axis, "axis")
    if _reduced_size(x.shape, feature_axes) <= 1:
      return False
  return training


# --- BatchNorm ---------------------------------------------------------------


def _batch_norm(m, x, v, *, training, initializing, mask, family):
  feature_axes = _checks.canonicalize_axes(x.ndim, m.axis, "axis")
  del family  # (nnx's promotion with the running statistics: see nnx/_build.py)
  dtype = out_dtype(x, v["scale"], v["bias"], dtype=m.dtype)
  x = as_inexact(x, dtype)
  torch_stats = check_running_stats(m.running_stats) == "torch"
  if torch_stats:
    state = jn.TorchBatchNormState(v["mean"], v["var"], v["num_batches_tracked"])
  else:
    state = jn.BatchNormState(v["mean"], v["var"])
  training = _training_at_init(m, x, training, initializing, feature_axes)
  extra = {}
  if m.virtual_batch_size is not None and not initializing:
    extra["virtual_batch_size"] = m.virtual_batch_size
  y, new = jn.batch_norm(
    x,
    jn.NormParams(v["scale"], v["bias"]),
    state,
    use_running_average=not training,
    axis=feature_axes,
    momentum=m.momentum,
    epsilon=m.epsilon,
    mask=mask,
    dtype=dtype,
    force_float32_reductions=m.force_float32_reductions,
    running_stats=m.running_stats,
    **_sync(m, initializing),
    **extra,
  )
  updates = {"mean": new.mean, "var": new.var}
  if torch_stats:
    updates["num_batches_tracked"] = new.num_batches_tracked
  return y, updates


def _bn_features(m, x_shape):
  return axes_shape(x_shape, m.axis, "axis")


BATCH_NORM = Layer(
  name="BatchNorm",
  namesake="BatchNorm",
  title="Batch normalization (Ioffe & Szegedy 2015).",
  function="batch_norm",
  summary="""\
Normalizes each channel (``axis``) over every other axis of the batch with
:func:`jaxnorm.batch_norm`: per channel C over N, H, W of an image. In
training the batch statistics are used and the running averages move
toward them, ``new = momentum * old + (1 - momentum) * batch`` with the
biased batch variance (PyTorch's ``momentum=0.1`` is ``momentum=0.9``
here); in evaluation the running averages are used. Statistics across
devices (``axis_name``) are count-weighted, so masks and uneven shards are
exact. ``virtual_batch_size=k`` gives ghost batch norm (Hoffer et al.
2017); ``running_stats="torch"`` keeps PyTorch's running statistics.

Differences from flax, on purpose: ``use_fast_variance`` is ignored (the
variance is always the exact two-pass one: flax's default
``E[x^2] - E[x]^2`` loses every digit of ``1e4 + N(0, 1)`` in float32); a
training call with a single value per channel raises ``ValueError`` (flax
returns ``bias``), except in linen's ``init``, which then normalizes with
the running statistics.""",
  fields=(
    USE_RUNNING_AVERAGE,
    _f("axis", -1, "the channel axis (or axes): ``-1`` for NHWC, ``1`` for NCHW."),
    _f(
      "momentum",
      0.99,
      'decay rate of the running averages (with ``running_stats="torch"``: '
      "PyTorch's weight of the new batch, or ``None`` for the cumulative "
      "average).",
      "float | None",
    ),
    _epsilon(1e-5),
    DTYPE,
    PARAM_DTYPE,
    USE_BIAS,
    USE_SCALE,
    BIAS_INIT,
    SCALE_INIT,
    AXIS_NAME,
    AXIS_INDEX_GROUPS,
    USE_FAST_VARIANCE,
    PROMOTE_DTYPE,
    BIAS_METADATA,
    SCALE_METADATA,
    FORCE_FLOAT32,
    _f(
      "virtual_batch_size",
      None,
      "jaxnorm extension: ``k`` for ghost batch norm, the statistics of each "
      "group of ``k`` consecutive samples; ``None`` for plain batch norm.",
      "int | None",
    ),
    _f(
      "running_stats",
      "flax",
      'jaxnorm extension: ``"flax"``, or ``"torch"`` for PyTorch\'s running '
      "statistics (unbiased running variance, PyTorch's ``momentum``, "
      "``None`` for the cumulative average) with an int32 "
      "``num_batches_tracked`` statistic; see :func:`jaxnorm.batch_norm`.",
      "str",
    ),
  ),
  variables=(
    RUNNING_MEAN,
    RUNNING_VAR,
    Var(
      "batch_stats",
      "num_batches_tracked",
      _const(initializers.zeros),
      lambda m: jnp.int32,
      shape=lambda m, f: (),
      when=lambda m: check_running_stats(m.running_stats) == "torch",
    ),
    *AFFINE,
  ),
  features=_bn_features,
  apply=_batch_norm,
  stateful=True,
  records_moments=True,
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.linen as jnn
>>> bn = jnn.BatchNorm(momentum=0.9)
>>> x = jax.random.normal(jax.random.key(0), (8, 6))
>>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
>>> jax.tree.map(jnp.shape, variables["batch_stats"])
{'mean': (6,), 'var': (6,)}
>>> y, updates = bn.apply(
...     variables, x, use_running_average=False, mutable=["batch_stats"])
>>> variables = {**variables, **updates}
>>> y_eval = bn.apply(variables, x, use_running_average=True)
>>> y.shape, y_eval.dtype
((8, 6), dtype('float32'))""",
    "nnx": """\
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm.nnx as jnx
>>> bn = jnx.BatchNorm(6, momentum=0.9, rngs=nnx.Rngs(0))
>>> x = jax.random.normal(jax.random.key(0), (8, 6)) + 3.0
>>> y = bn(x)  # training: batch statistics, running averages updated
>>> bool(jnp.all(bn.mean[...] > 0.2))
True
>>> bn.eval()
>>> y_eval = bn(x)  # running statistics, nothing updated
>>> y_eval.shape
(8, 6)""",
  },
)


# --- LayerNorm, RMSNorm ------------------------------------------------------


def _feature_axes_shape(m, x_shape):
  return axes_shape(x_shape, m.feature_axes, "feature_axes")


def _layer_norm(m, x, v, *, training, initializing, mask, family):
  dtype = out_dtype(x, v["scale"], v["bias"], dtype=m.dtype)
  return jn.layer_norm(
    as_inexact(x, dtype),
    jn.NormParams(v["scale"], v["bias"]),
    reduction_axes=m.reduction_axes,
    feature_axes=m.feature_axes,
    epsilon=m.epsilon,
    mask=mask,
    axis_name=m.axis_name,
    axis_index_groups=m.axis_index_groups,
    dtype=dtype,
    force_float32_reductions=m.force_float32_reductions,
  ), {}


_LN_AXES = (
  _f("reduction_axes", -1, "axes the statistics are taken over.", "Axes"),
  _f("feature_axes", -1, "axes ``scale`` and ``bias`` run along.", "Axes"),
)

LAYER_NORM = Layer(
  name="LayerNorm",
  namesake="LayerNorm",
  title="Layer normalization (Ba et al. 2016).",
  function="layer_norm",
  summary="""\
Normalizes every sample over ``reduction_axes`` with
:func:`jaxnorm.layer_norm`: ``y = (x - E[x]) / sqrt(Var[x] + epsilon) *
scale + bias``, with ``scale`` and ``bias`` along ``feature_axes``. For a
transformer ``(B, T, D)`` the defaults normalize every token over ``D``; LN
over C, H, W of an NHWC image is ``reduction_axes=(1, 2, 3)``.
``use_fast_variance`` is ignored: the variance is always the exact
two-pass one.""",
  fields=(
    _epsilon(1e-6),
    DTYPE,
    PARAM_DTYPE,
    USE_BIAS,
    USE_SCALE,
    BIAS_INIT,
    SCALE_INIT,
    *_LN_AXES,
    AXIS_NAME,
    AXIS_INDEX_GROUPS,
    USE_FAST_VARIANCE,
    PROMOTE_DTYPE,
    BIAS_METADATA,
    SCALE_METADATA,
    FORCE_FLOAT32,
  ),
  variables=AFFINE,
  features=_feature_axes_shape,
  apply=_layer_norm,
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.linen as jnn
>>> x = jax.random.normal(jax.random.key(0), (2, 5, 16))
>>> ln = jnn.LayerNorm()
>>> variables = ln.init(jax.random.key(1), x)
>>> jax.tree.map(jnp.shape, variables)
{'params': {'bias': (16,), 'scale': (16,)}}
>>> y = ln.apply(variables, x)
>>> bool(jnp.allclose(y.mean(-1), 0.0, atol=1e-5))
True""",
    "nnx": """\
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm.nnx as jnx
>>> ln = jnx.LayerNorm(16, rngs=nnx.Rngs(0))
>>> x = jax.random.normal(jax.random.key(0), (2, 5, 16))
>>> bool(jnp.allclose(ln(x).mean(-1), 0.0, atol=1e-5))
True""",
  },
)


def _rms_norm(m, x, v, *, training, initializing, mask, family):
  dtype = out_dtype(x, v["scale"], dtype=m.dtype)
  return jn.rms_norm(
    as_inexact(x, dtype),
    jn.NormParams(v["scale"], None),
    reduction_axes=m.reduction_axes,
    feature_axes=m.feature_axes,
    epsilon=m.epsilon,
    mask=mask,
    axis_name=m.axis_name,
    axis_index_groups=m.axis_index_groups,
    dtype=dtype,
    force_float32_reductions=m.force_float32_reductions,
  ), {}


RMS_NORM = Layer(
  name="RMSNorm",
  namesake="RMSNorm",
  title="RMS normalization (Zhang & Sennrich 2019).",
  function="rms_norm",
  summary="""\
Normalizes every sample by the root mean square over ``reduction_axes``
with :func:`jaxnorm.rms_norm`: ``y = x / sqrt(E[x^2] + epsilon) * scale``.
There is no centering and no bias. ``use_fast_variance`` is ignored.""",
  fields=(
    _epsilon(1e-6, "added to the mean square inside the square root."),
    DTYPE,
    PARAM_DTYPE,
    USE_SCALE,
    SCALE_INIT,
    *_LN_AXES,
    AXIS_NAME,
    AXIS_INDEX_GROUPS,
    USE_FAST_VARIANCE,
    PROMOTE_DTYPE,
    SCALE_METADATA,
    FORCE_FLOAT32,
  ),
  variables=(SCALE,),
  features=_feature_axes_shape,
  apply=_rms_norm,
  positional_mask=frozenset({"nnx"}),
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.linen as jnn
>>> x = jnp.array([[1.0, 7.0]])  # mean square 25
>>> rms = jnn.RMSNorm(epsilon=0.0)
>>> variables = rms.init(jax.random.key(0), x)
>>> rms.apply(variables, x)
Array([[0.2, 1.4]], dtype=float32)""",
    "nnx": """\
>>> import jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm.nnx as jnx
>>> rms = jnx.RMSNorm(2, epsilon=0.0, rngs=nnx.Rngs(0))
>>> rms(jnp.array([[1.0, 7.0]]))  # mean square 25
Array([[0.2, 1.4]], dtype=float32)""",
  },
)


# --- GroupNorm, InstanceNorm --------------------------------------------------


def _gn_axis(m) -> int:
  return getattr(m, "feature_axis", m.axis)


def _group_norm(m, x, v, *, training, initializing, mask, family):
  dtype = out_dtype(x, v["scale"], v["bias"], dtype=m.dtype)
  num_groups, group_size = m.num_groups, m.group_size
  if getattr(m, "feature_axis", None) is not None:
    group_size = None  # nnx resolved both at construction (as flax does)
  return jn.group_norm(
    as_inexact(x, dtype),
    jn.NormParams(v["scale"], v["bias"]),
    num_groups=num_groups,
    group_size=group_size,
    axis=_gn_axis(m),
    epsilon=m.epsilon,
    mask=mask,
    reduction_axes=m.reduction_axes,
    axis_name=m.axis_name,
    axis_index_groups=m.axis_index_groups,
    dtype=dtype,
    force_float32_reductions=m.force_float32_reductions,
  ), {}


def _gn_nnx_setup(m) -> None:
  # Checked at construction, like flax, which also keeps both resolved.
  m.num_groups = resolve_groups(
    m.num_features, m.num_groups, m.group_size, what="features"
  )
  m.group_size = m.num_features // m.num_groups
  m.feature_axis = m.axis


_GROUPS = (
  _f(
    "num_groups",
    32,
    "number of groups ``G``, or ``None`` to give ``group_size``.",
    "int | None",
    positional=True,
  ),
  _f(
    "group_size",
    None,
    "channels per group, or ``None``.",
    "int | None",
    positional=True,
  ),  # fmt: skip
)

GROUP_NORM = Layer(
  name="GroupNorm",
  namesake="GroupNorm",
  title="Group normalization (Wu & He 2018).",
  function="group_norm",
  summary="""\
Splits the ``C`` channels into groups and normalizes every sample and group
over the group's channels and every other non-batch axis (H, W and C/G),
with :func:`jaxnorm.group_norm`; ``scale`` and ``bias`` are per channel.
One group is layer norm over C, H, W; ``group_size=1`` is instance norm.
Give exactly one of ``num_groups`` and ``group_size`` (to give
``group_size``, pass ``num_groups=None``: the default of ``num_groups`` is
32, the paper's). ``use_fast_variance`` is ignored.""",
  fields=(
    *_GROUPS,
    _epsilon(1e-6),
    DTYPE,
    PARAM_DTYPE,
    USE_BIAS,
    USE_SCALE,
    BIAS_INIT,
    SCALE_INIT,
    _f(
      "reduction_axes",
      None,
      "axes to reduce, which must include the channel axis; default: every "
      "axis but the leading (batch) one.",
      "Axes | None",
    ),
    AXIS_NAME,
    AXIS_INDEX_GROUPS,
    USE_FAST_VARIANCE,
    PROMOTE_DTYPE,
    BIAS_METADATA,
    SCALE_METADATA,
    FORCE_FLOAT32,
    _f(
      "axis",
      -1,
      "jaxnorm extension: the channel axis, ``-1`` (NHWC, flax's only choice) "
      "or ``1`` (NCHW).",
      "int",
    ),
  ),
  variables=AFFINE,
  features=lambda m, s: axes_shape(s, _gn_axis(m), "axis"),
  apply=_group_norm,
  nnx_setup=_gn_nnx_setup,
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.linen as jnn
>>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
>>> gn = jnn.GroupNorm(num_groups=3)
>>> variables = gn.init(jax.random.key(1), x)
>>> jax.tree.map(jnp.shape, variables)
{'params': {'bias': (6,), 'scale': (6,)}}
>>> y = gn.apply(variables, x)
>>> y_nchw = jnn.GroupNorm(num_groups=3, axis=1).apply(
...     variables, x.transpose(0, 3, 1, 2))
>>> bool(jnp.allclose(y_nchw, y.transpose(0, 3, 1, 2), atol=1e-5))
True""",
    "nnx": """\
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm.nnx as jnx
>>> gn = jnx.GroupNorm(6, num_groups=3, axis=1, rngs=nnx.Rngs(0))
>>> x = jax.random.normal(jax.random.key(0), (2, 6, 4, 4))  # NCHW
>>> y = gn(x).reshape(2, 3, 2, 4, 4)  # groups of 2 channels
>>> bool(jnp.allclose(y.mean((2, 3, 4)), 0.0, atol=1e-5))
True""",
  },
)


_BATCH_AXIS_MESSAGE = (
  "The channel axes cannot include the leading dimension as this is assumed "
  "to be the batch axis."
)


def _in_features(m, x_shape):
  feature_axes = _checks.canonicalize_axes(len(x_shape), m.feature_axes, "feature_axes")
  if 0 in feature_axes:
    raise ValueError(
      f"{_BATCH_AXIS_MESSAGE} `feature_axes`={m.feature_axes} includes axis 0, "
      "the batch axis of instance norm."
    )
  return tuple(x_shape[a] for a in feature_axes)


def _instance_norm(m, x, v, *, training, initializing, mask, family):
  _in_features(m, jnp.shape(x))
  dtype = out_dtype(x, v["scale"], v["bias"], dtype=m.dtype)
  return jn.instance_norm(
    as_inexact(x, dtype),
    jn.NormParams(v["scale"], v["bias"]),
    axis=m.feature_axes,
    epsilon=m.epsilon,
    mask=mask,
    axis_name=m.axis_name,
    axis_index_groups=m.axis_index_groups,
    dtype=dtype,
    force_float32_reductions=m.force_float32_reductions,
  ), {}


INSTANCE_NORM = Layer(
  name="InstanceNorm",
  namesake="InstanceNorm",
  title="Instance normalization (Ulyanov et al. 2016).",
  function="instance_norm",
  summary="""\
Normalizes every sample and channel over the remaining axes (H, W) with
:func:`jaxnorm.instance_norm`; ``scale`` and ``bias`` run along
``feature_axes``. Axis 0 is the batch axis; ``feature_axes=1`` handles
NCHW. ``use_fast_variance`` is ignored.""",
  fields=(
    _epsilon(1e-6),
    DTYPE,
    PARAM_DTYPE,
    USE_BIAS,
    USE_SCALE,
    BIAS_INIT,
    SCALE_INIT,
    _f(
      "feature_axes", -1, "the channel axis or axes (not 0, the batch axis).", "Axes"
    ),  # fmt: skip
    AXIS_NAME,
    AXIS_INDEX_GROUPS,
    USE_FAST_VARIANCE,
    PROMOTE_DTYPE,
    BIAS_METADATA,
    SCALE_METADATA,
    FORCE_FLOAT32,
  ),
  variables=AFFINE,
  features=_in_features,
  apply=_instance_norm,
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.linen as jnn
>>> x = jax.random.normal(jax.random.key(0), (2, 3, 5, 5))  # NCHW
>>> inorm = jnn.InstanceNorm(feature_axes=1)
>>> variables = inorm.init(jax.random.key(1), x)
>>> y = inorm.apply(variables, x)
>>> bool(jnp.allclose(y.mean((2, 3)), 0.0, atol=1e-5))
True""",
    "nnx": """\
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm.nnx as jnx
>>> inorm = jnx.InstanceNorm(3, rngs=nnx.Rngs(0))
>>> x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))  # NHWC
>>> bool(jnp.allclose(inorm(x).mean((1, 2)), 0.0, atol=1e-5))
True""",
  },
)


# --- Filter response norm ------------------------------------------------------


def _frn(m, x, v, *, training, initializing, mask, family):
  params = jn.FilterResponseNormParams(v["scale"], v["bias"], v["tau"], v["eps"])
  dtype = out_dtype(x, *params, dtype=m.dtype)
  return jn.filter_response_norm(
    as_inexact(x, dtype),
    params,
    axis=m.axis,
    epsilon=m.epsilon,
    use_tlu=m.use_tlu,
    mask=mask,
    dtype=dtype,
  ), {}


FILTER_RESPONSE_NORM = Layer(
  name="FilterResponseNorm",
  title="Filter response normalization + TLU (Singh & Krishnan 2019).",
  function="filter_response_norm",
  summary="""\
Calls :func:`jaxnorm.filter_response_norm`: per sample and channel,
``y = max(scale * x / sqrt(mean_{H,W}(x^2) + eps) + bias, tau)``. No batch
statistics, no state, the same in training and evaluation.""",
  fields=(
    AXIS,
    _epsilon(
      1e-6,
      "fixed epsilon added to ``nu^2``; with ``learned_epsilon`` the epsilon "
      "is ``epsilon + |eps|``.",
    ),
    _f(
      "use_tlu",
      True,
      "whether to apply the thresholded linear unit ``max(y, tau)``.",
      "bool",
    ),  # fmt: skip
    _f("learned_epsilon", False, "whether to learn a per-channel ``eps``.", "bool"),
    DTYPE,
    PARAM_DTYPE,
    USE_BIAS,
    USE_SCALE,
    BIAS_INIT,
    SCALE_INIT,
    _f(
      "tau_init", initializers.zeros, "initializer of ``tau``, zeros.", "Initializer"
    ),  # fmt: skip
    _f(
      "eps_init",
      initializers.constant(1e-4),
      "initializer of ``eps``, 1e-4 (the paper's).",
      "Initializer",
    ),
    BIAS_METADATA,
    SCALE_METADATA,
  ),
  variables=(
    *AFFINE,
    Var("params", "tau", _attr("tau_init"), _param_dtype, when=_uses("use_tlu")),
    Var(
      "params",
      "eps",
      _attr("eps_init"),
      _param_dtype,
      when=_uses("learned_epsilon"),
    ),
  ),
  features=_channel_features,
  apply=_frn,
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.linen as jnn
>>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
>>> frn = jnn.FilterResponseNorm()
>>> variables = frn.init(jax.random.key(1), x)
>>> sorted(variables["params"])
['bias', 'scale', 'tau']
>>> frn.apply(variables, x).shape
(2, 4, 4, 3)""",
    "nnx": """\
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm.nnx as jnx
>>> frn = jnx.FilterResponseNorm(3, rngs=nnx.Rngs(0))
>>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
>>> frn(x).shape, frn.tau.shape
((2, 4, 4, 3), (3,))""",
  },
)


# --- Switchable norm, batch renorm ------------------------------------------------


def _running_stats_call(fn, params, m, x, v, training, initializing, mask, **kw):
  """Switchable norm and batch renorm: the call of a BN-like core function."""
  dtype = out_dtype(x, v["scale"], v["bias"], dtype=m.dtype)
  x = as_inexact(x, dtype)
  training = _training_at_init(m, x, training, initializing, m.axis)
  y, new = fn(
    x,
    params,
    jn.BatchNormState(v["mean"], v["var"]),
    use_running_average=not training,
    axis=m.axis,
    momentum=m.momentum,
    epsilon=m.epsilon,
    mask=mask,
    dtype=dtype,
    **_sync(m, initializing),
    **kw,
  )
  return y, {"mean": new.mean, "var": new.var}


def _switchable_norm(m, x, v, *, training, initializing, mask, family):
  params = jn.SwitchableNormParams(
    v["scale"], v["bias"], v["mean_weights"], v["var_weights"]
  )
  del family
  return _running_stats_call(
    jn.switchable_norm, params, m, x, v, training, initializing, mask
  )


def _batch_renorm(
  m, x, v, *, training, initializing, mask, family, r_max=None, d_max=None
):
  del family
  return _running_stats_call(
    jn.batch_renorm,
    jn.NormParams(v["scale"], v["bias"]),
    m,
    x,
    v,
    training,
    initializing,
    mask,
    r_max=m.r_max if r_max is None else r_max,
    d_max=m.d_max if d_max is None else d_max,
  )


_RUNNING_FIELDS = (
  USE_RUNNING_AVERAGE,
  AXIS,
  _momentum(0.99),
  _epsilon(1e-5),
  DTYPE,
  PARAM_DTYPE,
  USE_BIAS,
  USE_SCALE,
  BIAS_INIT,
  SCALE_INIT,
  AXIS_NAME,
  AXIS_INDEX_GROUPS,
)
# (No promote_dtype: only flax's namesakes have it; these compute as linen.)
_NNX_AFFINE_FIELDS = (BIAS_METADATA, SCALE_METADATA)

SWITCHABLE_NORM = Layer(
  name="SwitchableNorm",
  title="Switchable normalization (Luo et al. 2018).",
  function="switchable_norm",
  summary="""\
Calls :func:`jaxnorm.switchable_norm`: mixes the IN, LN and BN means and
variances with softmax weights, then ``y = (x - mean) / sqrt(var + eps) *
scale + bias``. The BN statistics are those of the batch (synchronized over
``axis_name``) in training and the running ones in evaluation.""",
  fields=(
    *_RUNNING_FIELDS,
    _f(
      "weights_init",
      initializers.ones,
      "initializer of ``mean_weights`` and ``var_weights``, ones.",
      "Initializer",
    ),
    *_NNX_AFFINE_FIELDS,
  ),
  variables=(
    RUNNING_MEAN,
    RUNNING_VAR,
    *AFFINE,
    Var(
      "params",
      "mean_weights",
      _attr("weights_init"),
      _param_dtype,
      shape=lambda m, f: (3,),
    ),  # fmt: skip
    Var(
      "params",
      "var_weights",
      _attr("weights_init"),
      _param_dtype,
      shape=lambda m, f: (3,),
    ),  # fmt: skip
  ),
  features=_channel_features,
  apply=_switchable_norm,
  stateful=True,
  records_moments=True,
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.linen as jnn
>>> x = jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
>>> sn = jnn.SwitchableNorm()
>>> variables = sn.init(jax.random.key(1), x, use_running_average=False)
>>> jax.tree.map(jnp.shape, variables["params"])["mean_weights"]
(3,)
>>> y, updates = sn.apply(
...     variables, x, use_running_average=False, mutable=["batch_stats"])
>>> y_eval = sn.apply({**variables, **updates}, x, use_running_average=True)""",
    "nnx": """\
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm.nnx as jnx
>>> sn = jnx.SwitchableNorm(3, rngs=nnx.Rngs(0))
>>> x = jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
>>> y = sn(x)  # training: updates sn.mean, sn.var
>>> sn.eval()  # use_running_average=True from now on
>>> sn(x).shape
(4, 4, 4, 3)""",
  },
)

_TRACEABLE = (
  _f(
    "r_max", None, "overrides ``r_max`` (may be traced: a warm-up schedule).", "Any"
  ),  # fmt: skip
  _f("d_max", None, "overrides ``d_max`` (may be traced).", "Any"),
)

BATCH_RENORM = Layer(
  name="BatchRenorm",
  title="Batch renormalization (Ioffe 2017).",
  function="batch_renorm",
  summary="""\
Calls :func:`jaxnorm.batch_renorm`: in training, batch norm corrected
toward the running statistics by ``r = clip(sigma_B / sigma, 1/r_max,
r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, both under
``stop_gradient``; in evaluation, batch norm with the running statistics.
The variables are those of flax's ``BatchNorm``. ``r_max`` and ``d_max``
may also be passed at call time, as traced arrays: that is how a warm-up
schedule (:func:`jaxnorm.batch_renorm_schedule`) runs inside a jitted
step.""",
  fields=(
    *_RUNNING_FIELDS,
    _f("r_max", 3.0, "default bound of ``r`` (at least 1).", "float"),
    _f("d_max", 5.0, "default bound of ``d`` (at least 0).", "float"),
    *_NNX_AFFINE_FIELDS,
  ),
  variables=(RUNNING_MEAN, RUNNING_VAR, *AFFINE),
  features=_channel_features,
  apply=_batch_renorm,
  stateful=True,
  call_kwargs=_TRACEABLE,
  records_moments=True,
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm as jn, jaxnorm.linen as jnn
>>> x = jax.random.normal(jax.random.key(0), (8, 3))
>>> brn = jnn.BatchRenorm()
>>> variables = brn.init(jax.random.key(1), x, use_running_average=False)
>>> r_max, d_max = jn.batch_renorm_schedule(20_000)
>>> y, updates = brn.apply(variables, x, use_running_average=False,
...                        r_max=r_max, d_max=d_max, mutable=["batch_stats"])
>>> y.shape
(8, 3)""",
    "nnx": """\
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm as jn, jaxnorm.nnx as jnx
>>> brn = jnx.BatchRenorm(3, rngs=nnx.Rngs(0))
>>> x = jax.random.normal(jax.random.key(0), (8, 3))
>>> r_max, d_max = jn.batch_renorm_schedule(20_000)
>>> brn(x, r_max=r_max, d_max=d_max).shape
(8, 3)""",
  },
)


# --- MABN -------------------------------------------------------------------------


def _mabn_init(name: str):
  def init(m):
    def make(key, shape, dtype):
      del key
      c = shape[-1] if shape else 1
      _, state = jn.moving_average_batch_norm_init(c, buffer_size=m.buffer_size)
      return getattr(state, name).astype(dtype)

    return make

  return init


def _mabn(m, x, v, *, training, initializing, mask, family):
  dtype = out_dtype(x, v["scale"], v["bias"], dtype=m.dtype)
  y, new = jn.moving_average_batch_norm(
    as_inexact(x, dtype),
    jn.NormParams(v["scale"], v["bias"]),
    jn.MovingAverageBatchNormState(
      v["var"], v["second_moments"], v["grad_moments"], v["count"]
    ),
    use_running_average=not training,
    axis=m.axis,
    momentum=m.momentum,
    epsilon=m.epsilon,
    mask=mask,
    renorm_warmup_steps=m.renorm_warmup_steps,
    r_max=m.r_max,
    dtype=dtype,
    **_sync(m, initializing),
  )
  # grad_moments is written by the backward pass, through its gradient.
  return y, {"var": new.var, "second_moments": new.second_moments, "count": new.count}


MOVING_AVERAGE_BATCH_NORM = Layer(
  name="MovingAverageBatchNorm",
  title="Moving Average Batch Normalization (Yan et al., 2020).",
  function="moving_average_batch_norm",
  summary="""\
Calls :func:`jaxnorm.moving_average_batch_norm`; see it for the formula
and the backward pass. ``grad_moments`` is written through the gradient:
differentiate the loss with respect to it as well (linen: the
``batch_stats``; nnx: ``nnx.DiffState`` on :class:`jaxnorm.nnx.GradMoments`)
and pass the result to :func:`jaxnorm.apply_mabn_grad_moments` (see the example).""",
  fields=(
    USE_RUNNING_AVERAGE,
    AXIS,
    _momentum(0.98, "weight of the old value of the EMA ``var``."),
    _epsilon(1e-5, "added to the second moment inside the square root."),
    DTYPE,
    PARAM_DTYPE,
    USE_BIAS,
    USE_SCALE,
    BIAS_INIT,
    SCALE_INIT,
    AXIS_NAME,
    AXIS_INDEX_GROUPS,
    _f("buffer_size", 16, "window of the simple moving averages.", "int"),
    _f(
      "renorm_warmup_steps",
      1000,
      "training steps during which the renormalization factor is 1.",
      "int",
    ),
    _f("r_max", 5.0, "clip of the renormalization factor.", "float"),
    *_NNX_AFFINE_FIELDS,
  ),
  variables=(
    Var("batch_stats", "var", _mabn_init("var"), lambda m: jnp.float32),
    Var(
      "batch_stats",
      "second_moments",
      _mabn_init("second_moments"),
      lambda m: jnp.float32,
      shape=lambda m, f: (m.buffer_size, *f),
    ),
    Var(
      "batch_stats",
      "grad_moments",
      _mabn_init("grad_moments"),
      lambda m: jnp.float32,
      shape=lambda m, f: (m.buffer_size, *f),
      nnx_type="grad_moments",
    ),
    Var(
      "batch_stats",
      "count",
      _mabn_init("count"),
      lambda m: jnp.int32,
      shape=lambda m, f: (),
    ),
    *AFFINE,
  ),
  features=_channel_features,
  apply=_mabn,
  stateful=True,
  records_moments=True,
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm as jn, jaxnorm.linen as jnn
>>> model = jnn.MovingAverageBatchNorm(buffer_size=4)
>>> x = jax.random.normal(jax.random.key(0), (2, 5, 3))
>>> variables = model.init(jax.random.key(1), x, use_running_average=True)
>>> def loss_fn(params, batch_stats):
...   y, updates = model.apply(
...       {"params": params, "batch_stats": batch_stats}, x,
...       use_running_average=False, mutable=["batch_stats"])
...   return jnp.sum(y ** 3), updates["batch_stats"]
>>> grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True, allow_int=True)
>>> (g_params, g_stats), batch_stats = grad_fn(
...     variables["params"], variables["batch_stats"])
>>> batch_stats = jn.apply_mabn_grad_moments(batch_stats, g_stats)
>>> int(batch_stats["count"]), batch_stats["grad_moments"].shape
(1, (4, 3))""",
    "nnx": """\
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm as jn, jaxnorm.nnx as jnx
>>> model = jnx.MovingAverageBatchNorm(3, buffer_size=4, rngs=nnx.Rngs(0))
>>> x = jax.random.normal(jax.random.key(0), (2, 5, 3))
>>> def loss_fn(model):
...   return jnp.sum(model(x) ** 3)
>>> diff = nnx.DiffState(0, nnx.Any(nnx.Param, jnx.GradMoments))
>>> grads = nnx.grad(loss_fn, argnums=diff)(model)
>>> buffers = nnx.state(model, jnx.GradMoments)
>>> nnx.update(model, jn.apply_mabn_grad_moments(buffers, grads))
>>> int(model.count[...]), bool(jnp.all(model.grad_moments[...][0] != 0))
(1, True)""",
  },
)


# --- EvoNorm ------------------------------------------------------------------------

_V = Var("params", "v", _attr("v_init"), _param_dtype)
_V_INIT = _f("v_init", initializers.ones, "initializer of ``v``, ones (the "
             "paper's).", "Initializer")  # fmt: skip


def _evonorm_b0(m, x, v, *, training, initializing, mask, family):
  params = jn.EvoNormParams(v["scale"], v["bias"], v["v"])
  dtype = out_dtype(x, *params, dtype=m.dtype)
  y, new = jn.evonorm_b0(
    as_inexact(x, dtype),
    params,
    jn.EvoNormB0State(v["var"]),
    use_running_average=not training,
    axis=m.axis,
    momentum=m.momentum,
    epsilon=m.epsilon,
    mask=mask,
    dtype=dtype,
    **_sync(m, initializing),
  )
  return y, {"var": new.var}


EVONORM_B0 = Layer(
  name="EvoNormB0",
  title="EvoNorm-B0 (Liu et al., 2020).",
  function="evonorm_b0",
  summary="""\
Calls :func:`jaxnorm.evonorm_b0`:
``y = x / max(sqrt(var_B + eps), v * x + sqrt(var_inst + eps)) * scale +
bias``, with the batch variance ``var_B`` in training and its running
average in evaluation.""",
  fields=(
    USE_RUNNING_AVERAGE,
    AXIS,
    _momentum(0.99, "weight of the old running variance."),
    _epsilon(1e-5, "added to both variances."),
    DTYPE,
    PARAM_DTYPE,
    USE_BIAS,
    USE_SCALE,
    BIAS_INIT,
    SCALE_INIT,
    _V_INIT,
    AXIS_NAME,
    AXIS_INDEX_GROUPS,
    *_NNX_AFFINE_FIELDS,
  ),
  variables=(RUNNING_VAR, *AFFINE, _V),
  features=_channel_features,
  apply=_evonorm_b0,
  stateful=True,
  records_moments=True,
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.linen as jnn
>>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
>>> model = jnn.EvoNormB0()
>>> variables = model.init(jax.random.key(1), x, use_running_average=False)
>>> y, updates = model.apply(variables, x, use_running_average=False,
...                          mutable=["batch_stats"])
>>> sorted(variables["params"]), y.shape
(['bias', 'scale', 'v'], (4, 6, 6, 8))""",
    "nnx": """\
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm.nnx as jnx
>>> layer = jnx.EvoNormB0(8, rngs=nnx.Rngs(0))
>>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
>>> y = layer(x)
>>> layer.eval()
>>> layer(x).shape
(4, 6, 6, 8)""",
  },
)


def _evonorm_s0(m, x, v, *, training, initializing, mask, family):
  params = jn.EvoNormParams(v["scale"], v["bias"], v["v"])
  dtype = out_dtype(x, *params, dtype=m.dtype)
  return jn.evonorm_s0(
    as_inexact(x, dtype),
    params,
    num_groups=m.num_groups,
    group_size=m.group_size,
    axis=m.axis,
    epsilon=m.epsilon,
    mask=mask,
    dtype=dtype,
  ), {}


EVONORM_S0 = Layer(
  name="EvoNormS0",
  title="EvoNorm-S0 (Liu et al., 2020).",
  function="evonorm_s0",
  summary="""\
Calls :func:`jaxnorm.evonorm_s0`:
``y = x * sigmoid(v * x) / sqrt(var_group + eps) * scale + bias``, with the
group variance of each sample (as group norm). No state.""",
  fields=(
    _f(
      "num_groups",
      32,
      "number of channel groups (``None`` to give ``group_size``).",
      "int | None",
    ),  # fmt: skip
    _f("group_size", None, "channels per group.", "int | None"),
    AXIS,
    _epsilon(1e-5, "added to the group variance."),
    DTYPE,
    PARAM_DTYPE,
    USE_BIAS,
    USE_SCALE,
    BIAS_INIT,
    SCALE_INIT,
    _V_INIT,
    *_NNX_AFFINE_FIELDS,
  ),
  variables=(*AFFINE, _V),
  features=_channel_features,
  apply=_evonorm_s0,
  examples={
    "linen": """\
>>> import jax, jax.numpy as jnp
>>> import jaxnorm.linen as jnn
>>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
>>> model = jnn.EvoNormS0(num_groups=4)
>>> variables = model.init(jax.random.key(1), x)
>>> model.apply(variables, x).shape
(2, 4, 4, 8)""",
    "nnx": """\
>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import jaxnorm.nnx as jnx
>>> layer = jnx.EvoNormS0(8, num_groups=4, rngs=nnx.Rngs(0))
>>> layer(jnp.ones((2, 3, 3, 8))).shape
(2, 3, 3, 8)""",
  },
)


LAYERS: tuple[Layer, ...] = (
  BATCH_NORM,
  LAYER_NORM,
  RMS_NORM,
  GROUP_NORM,
  INSTANCE_NORM,
  FILTER_RESPONSE_NORM,
  SWITCHABLE_NORM,
  BATCH_RENORM,
  MOVING_AVERAGE_BATCH_NORM,
  EVONORM_B0,
  EVONORM_S0,
)


# --- docstrings ------------------------------------------------------------------


def _wrap(text: str, indent: str) -> list[str]:
  import textwrap

  return textwrap.wrap(
    text, 76 - len(indent), initial_indent="", subsequent_indent="  "
  ) or [""]


def variables_doc(layer: Layer, family: str) -> list[str]:
  """The variables, as the family names them."""
  lines = []
  for var in layer.variables:
    kind = {
      "linen": f"{var.collection}/{var.name}",
      "nnx": f"{var.name}: "
      + (
        "nnx.Param"
        if var.collection == "params"
        else ("GradMoments" if var.nnx_type else "nnx.BatchStat")
      ),
      "equinox": f"{var.name}: "
      + ("array field" if var.collection == "params" else "eqx.nn.State entry"),
    }[family]
    lines.append(kind)
  return lines


def docstring(layer: Layer, family: str, extra_args: Sequence[tuple[str, str]] = ()):
  """The class docstring of ``layer`` in ``family``, from its description."""
  namesake = {
    "linen": f":class:`flax.linen.{layer.namesake}`",
    "nnx": f":class:`flax.nnx.{layer.namesake}`",
    "equinox": f":class:`equinox.nn.{layer.namesake}`",
  }[family]
  head = layer.title
  if layer.namesake and family != "equinox":
    head = f"{layer.title[:-1]}, a drop-in for {namesake}."
  out = [head, ""]
  out += layer.summary.splitlines()
  out += ["", "Variables: " + ", ".join(variables_doc(layer, family)) + ".", ""]
  out.append("Attributes:" if family == "linen" else "Args:")
  entries = list(extra_args[:1]) + [(f.name, f.doc) for f in layer.fields_for(family)]
  entries += list(extra_args[1:])
  for name, doc in entries:
    wrapped = _wrap(f"{name}: {doc}", "    ")
    out += ["  " + wrapped[0]] + ["  " + w for w in wrapped[1:]]
  out += ["", "Examples:"]
  out += ["  " + line for line in layer.examples[family].splitlines()]
  return "\n".join(out) + "\n"
