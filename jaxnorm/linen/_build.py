"""Builds a ``flax.linen`` module from a layer's description.

What only linen needs: dataclass fields, variables created lazily from the
shape of the first input, ``nn.merge_param`` for ``use_running_average``,
``init``, and the ``jaxnorm_moments`` collection that ``recompute_batch_stats``
reads. Everything else is in :mod:`jaxnorm._description`.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxnorm import _checks, _description, _precise


def record_moments(
  module: nn.Module, x: jax.Array, axis: Any, mask: Any, training: bool
) -> None:
  """Records the moments of a training call for ``recompute_batch_stats``.

  Only within ``recompute_batch_stats``, which also makes the moments
  collection mutable: an ordinary training step, even with
  ``mutable=True``, computes nothing more and returns flax's collections.
  """
  if (
    not training
    or module.is_initializing()
    or not _precise.is_recording()
    or not module.is_mutable_collection(_precise.COLLECTION)
  ):
    return
  rows = _precise.batch_moments(
    _description.as_inexact(x, jnp.float32),
    axis=axis,
    mask=mask,
    axis_name=module.axis_name,
    axis_index_groups=module.axis_index_groups,
  )
  previous = None
  if module.has_variable(_precise.COLLECTION, "moments"):
    previous = module.get_variable(_precise.COLLECTION, "moments")
  module.put_variable(_precise.COLLECTION, "moments", _precise.record(previous, rows))


def _check_running_shapes(module: nn.Module, layer, features) -> None:
  """Raises if stored running statistics do not fit the input's features.

  flax.linen's BatchNorm fails on them with a TypeError (broadcasting the
  running averages against the batch's, in training and in evaluation)
  before it reads ``params``; jaxnorm checks them first too, so that the
  error is a TypeError (and a ValueError) naming the variable, instead of
  the ScopeParamShapeError of the ``scale`` that comes next.
  """
  for var in layer.variables:
    if var.collection == "params" or not var.when(module):
      continue
    if not module.has_variable(var.collection, var.name):
      continue
    found = tuple(jnp.shape(module.get_variable(var.collection, var.name)))
    expected = tuple(var.shape(module, features))
    if found != expected:
      raise _checks.FeatureShapeError(
        f"`{var.collection}/{var.name}` of {layer.name} has shape {found}, but "
        f"an input whose features have shape {tuple(features)} needs "
        f"{expected} (variables made for a different number of features?)."
      )


def _variables(module: nn.Module, layer, features):
  """Creates (or reads) the variables; returns values and the state holders."""
  _check_running_shapes(module, layer, features)
  values, holders = {}, {}
  for var in layer.variables:
    if not var.when(module):
      values[var.name] = None
      continue
    shape = var.shape(module, features)
    init, dtype = var.init(module), var.dtype(module)
    if var.collection == "params":
      values[var.name] = module.param(var.name, init, shape, dtype)
    else:
      holder = module.variable(
        var.collection,
        var.name,
        lambda init=init, shape=shape, dtype=dtype: init(None, shape, dtype),
      )
      holders[var.name] = holder
      values[var.name] = holder.value
  return values, holders


def _run(module, layer, x, training, mask, call_kwargs):
  x = jnp.asarray(x)
  features = layer.features(module, x.shape)
  values, holders = _variables(module, layer, features)
  initializing = module.is_initializing()
  y, updates = layer.apply(
    module,
    x,
    values,
    training=training,
    initializing=initializing,
    mask=mask,
    family="linen",
    **call_kwargs,
  )
  if training and not initializing:
    for name, value in updates.items():
      holders[name].value = value
  if layer.records_moments:
    record_moments(module, x, module.axis, mask, training)
  return y


def _signature(
  layer, stateful: bool, positional_mask: bool = False
) -> inspect.Signature:
  kind = inspect.Parameter.KEYWORD_ONLY
  params = [
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("x", inspect.Parameter.POSITIONAL_OR_KEYWORD),
  ]
  if stateful:
    params.append(
      inspect.Parameter(
        "use_running_average", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None
      )
    )
  params += [inspect.Parameter(f.name, kind, default=None) for f in layer.call_kwargs]
  mask_kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if positional_mask else kind
  params.append(inspect.Parameter("mask", mask_kind, default=None))
  return inspect.Signature(params)


_CALL_DOC = """Normalizes ``x``{mode}.

Args:
  x: the input, ``(N, ..., C, ...)``.{ura}{extra}
  mask: optional boolean array broadcastable to ``x``; ``False`` elements
    do not enter the statistics.

Returns:
  The normalized input, of the shape of ``x``.
"""


_RAISES_DOC = """
Raises:
  TypeError: stored ``batch_stats`` whose shape does not fit the features of
    ``x``, as in flax.linen (the error is also a ValueError and names the
    variable).
"""

_STATS_SHAPE_NOTE = """
Given ``batch_stats`` made for another number of features, the layer
raises a TypeError (also a ValueError) naming the variable before it reads
``params``, as flax.linen's BatchNorm raises a TypeError.
"""


def build(layer: _description.Layer) -> type[nn.Module]:
  """The ``nn.Module`` subclass described by ``layer``."""
  fields = layer.fields_for("linen")
  call_names = tuple(f.name for f in layer.call_kwargs)

  if layer.stateful:

    def __call__(self, x, use_running_average=None, *, mask=None, **kwargs):
      unknown = set(kwargs) - set(call_names)
      if unknown:
        raise TypeError(f"{layer.name} got unexpected arguments {sorted(unknown)}.")
      use_running_average = bool(
        nn.merge_param(
          "use_running_average", self.use_running_average, use_running_average
        )
      )
      return _run(self, layer, x, not use_running_average, mask, kwargs)

  else:

    def __call__(self, x, *, mask=None):
      return _run(self, layer, x, False, mask, {})

  __call__.__signature__ = _signature(layer, layer.stateful)
  __call__.__doc__ = _CALL_DOC.format(
    mode=" with batch (training) or running (evaluation) statistics"
    if layer.stateful
    else "",
    ura="\n  use_running_average: if true, use the stored running statistics; "
    "if false,\n    use and update those of the batch (``batch_stats`` must be "
    "mutable)."
    if layer.stateful
    else "",
    extra="".join(f"\n  {f.name}: {f.doc}" for f in layer.call_kwargs),
  )
  doc = _description.docstring(layer, "linen")
  if any(var.collection != "params" for var in layer.variables):
    __call__.__doc__ += _RAISES_DOC
    # The description's docstring is shared with nnx, whose layers check
    # ``num_features`` instead: the note is linen's own.
    doc = doc.replace("\nAttributes:", _STATS_SHAPE_NOTE + "\nAttributes:", 1)
  namespace = {
    "__annotations__": {f.name: f.annotation for f in fields},
    "__module__": "jaxnorm.linen",
    "__qualname__": layer.name,
    "__doc__": doc,
    "__call__": nn.compact(__call__),
    "description": layer,
  }
  for f in fields:
    namespace[f.name] = f.default_for("linen")
  return type(layer.name, (nn.Module,), namespace)
