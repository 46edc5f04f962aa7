"""Builds a ``flax.nnx`` module from a layer's description.

What only nnx needs: ``__init__(num_features, *, ..., rngs)`` creating the
variables eagerly as ``nnx.Param`` / ``nnx.BatchStat`` of flax.nnx's shapes
(flat ``(num_features,)``), reshaping them to the features of the input at
call time, ``train()`` / ``eval()`` / ``nnx.view``, and the sink that
``recompute_batch_stats`` reads. Everything else is in
:mod:`jaxnorm._description`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnorm import _checks, _description, _precise


class GradMoments(nnx.BatchStat):
  """MABN's ring buffer of backward statistics (a ``BatchStat``).

  The backward pass writes it through its gradient: select it with
  ``nnx.DiffState(0, nnx.Any(nnx.Param, GradMoments))`` and apply the
  gradient with :func:`jaxnorm.apply_mabn_grad_moments`.
  """


class BatchMoments(nnx.Variable):
  """``(3, C)`` rows ``count, mean, m2`` that ``recompute_batch_stats`` reads.

  Set on a layer only while ``recompute_batch_stats`` runs; not a
  ``BatchStat``, so filters of the model's state never see it.
  """


_TYPES = {"grad_moments": GradMoments}


def record_moments(
  module: nnx.Module, x: jax.Array, axis: Any, mask: Any, training: bool
) -> None:
  """Records the moments of a training call for ``recompute_batch_stats``."""
  sink = vars(module).get("_jaxnorm_moments")
  if not training or sink is None:
    return
  rows = _precise.batch_moments(
    _description.as_inexact(x, jnp.float32),
    axis=axis,
    mask=mask,
    axis_name=module.axis_name,
    axis_index_groups=module.axis_index_groups,
  )
  sink[...] = _precise.merge_rows(sink[...], rows.astype(sink[...].dtype))


def _value(variable: Any) -> jax.Array | None:
  return None if variable is None else variable[...]


def _init_signature(layer) -> inspect.Signature:
  P = inspect.Parameter
  params = [
    P("self", P.POSITIONAL_OR_KEYWORD),
    P("num_features", P.POSITIONAL_OR_KEYWORD),
  ]
  fields = layer.fields_for("nnx")
  params += [
    P(f.name, P.POSITIONAL_OR_KEYWORD, default=f.default_for("nnx"))
    for f in fields
    if f.positional
  ]
  params += [
    P(f.name, P.KEYWORD_ONLY, default=f.default_for("nnx"))
    for f in fields
    if not f.positional
  ]
  params.append(P("rngs", P.KEYWORD_ONLY))
  return inspect.Signature(params)


def _init(self, layer, signature, args, kwargs) -> None:
  try:
    bound = signature.bind(self, *args, **kwargs)
  except TypeError as e:
    # Python's own message names the function (flax's layers are plain
    # classes); Signature.bind's does not.
    raise TypeError(f"{layer.name}.__init__() {e}") from None
  bound.apply_defaults()
  arguments = dict(bound.arguments)
  del arguments["self"]
  rngs = arguments.pop("rngs")
  features = _checks.num_features_shape(arguments["num_features"])
  for name, value in arguments.items():
    if not name.endswith("_metadata"):  # used once, below; not hashable
      setattr(self, name, value)
  for var in layer.variables:
    if not var.when(self):
      setattr(self, var.name, nnx.data(None))
      continue
    shape = var.shape(self, features)
    init, dtype = var.init(self), var.dtype(self)
    if var.collection == "params":
      metadata = arguments.get(var.metadata) if var.metadata else None
      value = init(rngs.params(), shape, dtype)
      setattr(self, var.name, nnx.Param(value, **(metadata or {})))
    else:
      kind = _TYPES.get(var.nnx_type, nnx.BatchStat)
      setattr(self, var.name, kind(init(None, shape, dtype)))
  if layer.nnx_setup is not None:
    layer.nnx_setup(self)


def _shaped(value: jax.Array | None, shape: tuple[int, ...], name: str, module):
  """A flat ``(num_features,)`` variable reshaped to the features of ``x``."""
  if value is None or value.shape == shape:
    return value
  if value.size != math.prod(shape):
    raise _checks.FeatureShapeError(
      f"`num_features`={module.num_features} does not match the input: its "
      f"features have shape {shape} ({math.prod(shape)} values), but `{name}` "
      f"holds {value.size}."
    )
  return value.reshape(shape)


def _run(self, layer, x, training, mask, call_kwargs):
  values = {var.name: _value(getattr(self, var.name)) for var in layer.variables}
  promote = getattr(self, "promote_dtype", None)
  if promote is not None:
    # flax.nnx promotes the input and the floating variables, in flax's order
    # ((x, mean, var, scale, bias) for BatchNorm), to a common dtype (or
    # ``dtype``) before normalizing: the output of flax.nnx's BatchNorm is
    # float32 for half-precision input and parameters, since its running
    # statistics are float32. The running statistics are updated from their
    # stored values, as flax does; the promoted ones serve in evaluation.
    names = [
      v.name for v in layer.variables if not jnp.issubdtype(v.dtype(self), jnp.integer)
    ]
    args = (x, *(values[n] for n in names))
    if promote is _description.PROMOTE_DTYPE.default:
      promoted = _lossless_promotion(args, self.dtype)
    else:
      promoted = promote(args, dtype=self.dtype)
    x = promoted[0]
    for var, value in zip(names, promoted[1:], strict=True):
      if not training or layer_var(layer, var).collection == "params":
        values[var] = value
  x = jnp.asarray(x)
  features = layer.features(self, x.shape)
  flat = _checks.num_features_shape(self.num_features)
  for var in layer.variables:
    want = var.shape(self, features)
    if var.shape(self, flat) != want:
      values[var.name] = _shaped(values[var.name], want, var.name, self)
  y, updates = layer.apply(
    self,
    x,
    values,
    training=training,
    initializing=False,
    mask=mask,
    family="nnx",
    **call_kwargs,
  )
  if training:
    for name, value in updates.items():
      variable = getattr(self, name)
      value = jax.lax.stop_gradient(value)  # state, never differentiated
      if jnp.iscomplexobj(value) and not jnp.iscomplexobj(variable[...]):
        # flax.nnx keeps its float32 running mean float32 (the real part of a
        # complex input's mean); flax.linen, and the core, make it complex.
        value = jnp.real(value)
      value = value.astype(variable.dtype)
      variable.set_value(value.reshape(variable.shape))
  if layer.records_moments:
    record_moments(self, x, self.axis, mask, training)
  return y


def _lossless_promotion(args, dtype):
  """flax's default ``promote_dtype``, but never rounding an argument down.

  flax.nnx casts the input and parameters to the promoted dtype (or to
  ``dtype``), which rounds an argument wider than ``dtype`` before the
  statistics; flax.linen does not, and the two families disagree. jaxnorm
  keeps flax.nnx's output dtype (the promoted one, e.g. float32 for BN with
  half-precision input and parameters) but only ever casts up, so an nnx
  module computes on the same values as its linen twin.
  """
  present = [jnp.asarray(a) for a in args if a is not None]
  target = jnp.dtype(dtype) if dtype is not None else jnp.result_type(*present)
  if not jnp.issubdtype(target, jnp.inexact):
    target = jnp.promote_types(target, jnp.float32)

  def up(a):
    if a is None:
      return None
    a = jnp.asarray(a)
    return a.astype(target) if jnp.promote_types(a.dtype, target) == target else a

  return tuple(up(a) for a in args)


def layer_var(layer, name):
  return next(v for v in layer.variables if v.name == name)


def _resolve(self, use_running_average):
  if use_running_average is None:
    use_running_average = self.use_running_average
  if use_running_average is None:
    raise ValueError(
      f"No `use_running_average` argument was provided to "
      f"{type(self).__name__}. Pass it to the constructor or the call, or set "
      "it with `model.train()` / "
      "`model.eval()` or `nnx.view(model, use_running_average=...)`."
    )
  return bool(use_running_average)


def build(layer: _description.Layer) -> type[nnx.Module]:
  """The ``nnx.Module`` subclass described by ``layer``."""
  signature = _init_signature(layer)
  call_names = tuple(f.name for f in layer.call_kwargs)

  def __init__(self, *args, **kwargs):
    _init(self, layer, signature, args, kwargs)

  __init__.__signature__ = signature

  if layer.stateful:

    def __call__(self, x, use_running_average=None, *, mask=None, **kwargs):
      unknown = set(kwargs) - set(call_names)
      if unknown:
        raise TypeError(f"{layer.name} got unexpected arguments {sorted(unknown)}.")
      training = not _resolve(self, use_running_average)
      return _run(self, layer, x, training, mask, kwargs)

    def set_view(self, use_running_average: bool | None = None):
      """Used by ``nnx.view`` (and ``model.train()``/``model.eval()``).

      Args:
        use_running_average: if True, the stored running statistics are used
          instead of the batch's own; ``None`` leaves the setting as it is.
      """
      if use_running_average is not None:
        self.use_running_average = use_running_average

  elif "nnx" in layer.positional_mask:

    def __call__(self, x, mask=None):
      return _run(self, layer, x, False, mask, {})

    set_view = None

  else:

    def __call__(self, x, *, mask=None):
      return _run(self, layer, x, False, mask, {})

    set_view = None

  from jaxnorm.linen._build import _CALL_DOC, _signature

  __call__.__signature__ = _signature(
    layer, layer.stateful, positional_mask="nnx" in layer.positional_mask
  )
  __call__.__doc__ = _CALL_DOC.format(
    mode=" with batch (training) or running (evaluation) statistics"
    if layer.stateful
    else "",
    ura="\n  use_running_average: if true, use the running statistics; if false, "
    "use and\n    update those of the batch. Overrides the attribute."
    if layer.stateful
    else "",
    extra="".join(f"\n  {f.name}: {f.doc}" for f in layer.call_kwargs),
  )
  namespace = {
    "__module__": "jaxnorm.nnx",
    "__qualname__": layer.name,
    "__doc__": _description.docstring(
      layer,
      "nnx",
      extra_args=(
        (
          "num_features",
          "the number of features ``C`` (their product, for several feature axes).",
        ),  # fmt: skip
        ("rngs", "random keys for the initializers."),
      ),
    ),
    "__init__": __init__,
    "__call__": __call__,
    "description": layer,
  }
  if set_view is not None:
    namespace["set_view"] = set_view
  cls = type(layer.name, (nnx.Module,), namespace)
  # nnx's metaclass hides __init__'s signature from inspect and IDEs.
  cls.__signature__ = signature.replace(
    parameters=list(signature.parameters.values())[1:]
  )
  return cls
