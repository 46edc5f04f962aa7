"""The linen and nnx modules are what their shared description says.

Every layer is described once in ``jaxnorm/_description.py``; these tests
check each family's classes against it (fields and defaults, call
signature, variables with their collections, shapes and dtypes, docs), so a
change to a layer's facts shows up in both families or fails here.
"""

import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxnorm.linen as jnn
import jaxnorm.nnx as jnx
from jaxnorm import _description

LAYERS = {layer.name: layer for layer in _description.LAYERS}
C = 8
X = jnp.linspace(-2.0, 3.0, 2 * 3 * 3 * C).reshape(2, 3, 3, C)
# Configurations valid for an NHWC input with C channels.
CONFIG = {"GroupNorm": {"num_groups": 4}, "EvoNormS0": {"num_groups": 4}}


def test_every_layer_is_built_in_both_families():
  for name, layer in LAYERS.items():
    assert getattr(jnn, name).description is layer
    assert getattr(jnx, name).description is layer


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_linen_fields_and_defaults(name):
  layer = LAYERS[name]
  fields = {
    f.name: f for f in dataclasses.fields(getattr(jnn, name)) if f.name not in
    ("parent", "name")
  }  # fmt: skip
  want = layer.fields_for("linen")
  assert list(fields) == [f.name for f in want]
  for f in want:
    assert fields[f.name].default is f.default_for("linen"), f.name


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_nnx_signature_and_defaults(name):
  layer = LAYERS[name]
  params = inspect.signature(getattr(jnx, name)).parameters
  want = layer.fields_for("nnx")
  assert list(params) == ["num_features"] + [
    f.name for f in want if f.positional
  ] + [f.name for f in want if not f.positional] + ["rngs"]  # fmt: skip
  for f in want:
    assert params[f.name].default is f.default_for("nnx"), f.name
  # The call takes the description's call arguments in both families.
  for cls in (getattr(jnn, name), getattr(jnx, name)):
    call = inspect.signature(cls.__call__).parameters
    assert ("use_running_average" in call) == layer.stateful
    assert {f.name for f in layer.call_kwargs} <= set(call)
    assert "mask" in call


def _expected_variables(layer, module, features):
  out = {}
  for var in layer.variables:
    if var.when(module):
      out[(var.collection, var.name)] = (
        var.shape(module, features),
        jnp.dtype(var.dtype(module)),
      )
  return out


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_variables_match_the_description(name, param_dtype):
  layer = LAYERS[name]
  kwargs = dict(CONFIG.get(name, {}), param_dtype=param_dtype)
  linen_module = getattr(jnn, name)(**kwargs)
  call = {"use_running_average": True} if layer.stateful else {}
  variables = linen_module.init(jax.random.key(0), X, **call)
  got = {
    (collection, key): (tuple(value.shape), value.dtype)
    for collection, values in variables.items()
    for key, value in values.items()
  }
  features = layer.features(linen_module, X.shape)
  assert got == _expected_variables(layer, linen_module, features)

  nnx_module = getattr(jnx, name)(C, rngs=nnx.Rngs(0), **kwargs)
  got = {}
  for var in layer.variables:
    value = getattr(nnx_module, var.name)
    if value is None:
      continue
    kind = "params" if isinstance(value, nnx.Param) else "batch_stats"
    assert isinstance(value, nnx.Param if var.collection == "params" else nnx.BatchStat)
    got[(kind, var.name)] = (tuple(value.shape), value[...].dtype)
  assert got == _expected_variables(layer, nnx_module, (C,))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_docs_state_every_field(name):
  layer = LAYERS[name]
  for family, cls in (("linen", getattr(jnn, name)), ("nnx", getattr(jnx, name))):
    doc = cls.__doc__
    for f in layer.fields_for(family):
      assert f"{f.name}:" in doc, (family, f.name)
    for var in layer.variables:
      assert var.name in doc
    assert "Examples:" in doc
  assert issubclass(getattr(jnn, name), nn.Module)
