"""jaxnorm.linen against jaxnorm.nnx: bit-identical twins (SPEC §4).

For every layer that exists in both families, the linen module and its nnx
twin are built with the same configuration, given the same random
non-trivial parameters and statistics (linen's variable tree, copied into
the nnx attributes; nnx keeps LN/IN parameters flat as ``(num_features,)``),
and run under ``jax.jit`` on the same input and mask, in training and in
evaluation (``update_stats`` True/False for spectral norm). Outputs and the
returned statistics must be bit-identical (``np.testing.assert_array_equal``)
and of the same dtype, over ``dtype`` in (None, float16, float32) x
``param_dtype`` in (float16, float32) x input dtype in (float16, float32),
plus a bfloat16 ``dtype`` with float16 or float32 parameters and input, with
and without a boolean mask (alternating over the configurations; both for
every float16 ``dtype`` of flax's namesakes). Layers with several feature
axes (LN over H, W, C; IN with W and C as features) run with ``dtype=None``.

Like flax's own linen/nnx equivalence tests (``tests/nnx/nn/
normalization_test.py`` in google/flax), the nnx modules that take
``promote_dtype`` get the identity function: flax.nnx's default promotion
casts ``x``, the parameters (and BN's running statistics) to ``dtype``
*before* the statistics, which flax.linen never does, so with a ``dtype``
narrower than an argument flax's two families differ by design (by 1-2 ulp
of float16 with ``dtype=float16``). The default promotion is run too
(``default_promote`` cases), with ``dtype=None`` and mixed float16/float32
arguments (cast up, no value changes) and with ``dtype=float16``: there
jaxnorm's nnx promotes without rounding ``x`` and the parameters down first,
so its twins agree where flax's do not (a jaxnorm guarantee, SPEC §4). BN
with ``dtype=None`` and float16 ``x`` and parameters is left out: flax.nnx
then returns float32 (its float32 running statistics join the promotion)
where flax.linen returns float16.

To keep the run short, every configuration of one layer is traced into one
jitted function per family (one compilation of 20 small graphs costs a
fraction of 20 compilations); a build or trace error is kept and raised by
the cases it belongs to.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.traverse_util import flatten_dict

import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx

SHAPE = (2, 4, 4, 6)  # NHWC
C = SHAPE[-1]
DENSE_OUT = 5  # features of the Dense wrapped by weight and spectral norm

DTYPES = (None, jnp.float16, jnp.bfloat16, jnp.float32)
PARAM_DTYPES = (jnp.float16, jnp.float32)
X_DTYPES = (jnp.float16, jnp.float32)

# The namespaces the specs build from, looked up at build time (pointing them
# at flax's classes is how this file is checked against flax itself).
LINEN: Any = jnl
NNX: Any = jnx


def _identity_promote(args, /, *, dtype=None, inexact=True):
  """flax's test idiom: no promotion, so nnx computes what linen computes."""
  del dtype, inexact
  return args


def _bn_mode(train: bool) -> dict[str, Any]:
  return {"use_running_average": not train}


def _sn_mode(train: bool) -> dict[str, Any]:
  return {"update_stats": train}


def _leaf(path: tuple[str, ...]) -> tuple[Any, ...]:
  """nnx attribute of a linen variable: its name (``params/scale`` -> scale)."""
  return (path[-1],)


def _wrapped_path(path: tuple[str, ...]) -> tuple[Any, ...]:
  """Weight/spectral norm: linen's variable names -> the nnx wrapper's.

  ``params/layer_instance/kernel`` -> ``layer_instance.kernel``;
  ``params/"layer_instance/kernel/scale"`` -> ``scales[("kernel",)]``;
  ``batch_stats/"layer_instance/kernel/u"`` -> ``batch_stats[("kernel", "u")]``.
  """
  if path[1] == "layer_instance":
    return ("layer_instance", path[2])
  _, param, what = path[1].split("/")
  if what == "scale":
    return ("scales", (param,))
  return ("batch_stats", (param, what))


@dataclasses.dataclass(frozen=True)
class Spec:
  """How to build and run one layer in both families."""

  name: str
  make_linen: Callable[..., nn.Module]  # (dtype, param_dtype) -> module
  make_nnx: Callable[..., nnx.Module]  # (dtype, param_dtype, rngs, **kw) -> module
  mode: Callable[[bool], dict[str, Any]] | None = None  # train -> call kwargs
  nnx_path: Callable[[tuple[str, ...]], tuple[Any, ...]] = _leaf
  masked: bool = True
  # flax's namesakes: every float16-output configuration with and without a
  # mask (see _masks).
  all_masks: bool = False
  promote: bool = False  # the nnx constructor takes ``promote_dtype``
  promotes_f32_state: bool = False  # flax.nnx promotes BN's running stats too
  dtypes: tuple = DTYPES  # values of ``dtype`` to run

  @property
  def stateful(self) -> bool:
    return self.mode is not None


def _dense(dtype):
  return nn.Dense(DENSE_OUT, dtype=dtype)


def _linear(dtype, rngs):
  return nnx.Linear(C, DENSE_OUT, dtype=dtype, rngs=rngs)


SPECS = {
  s.name: s
  for s in [
    Spec(
      "BatchNorm",
      lambda d, p: LINEN.BatchNorm(momentum=0.9, dtype=d, param_dtype=p),
      lambda d, p, r, **kw: NNX.BatchNorm(
        C, momentum=0.9, dtype=d, param_dtype=p, rngs=r, **kw
      ),
      mode=_bn_mode,
      promote=True,
      promotes_f32_state=True,
      all_masks=True,
    ),
    Spec(
      "LayerNorm",
      lambda d, p: LINEN.LayerNorm(dtype=d, param_dtype=p),
      lambda d, p, r, **kw: NNX.LayerNorm(C, dtype=d, param_dtype=p, rngs=r, **kw),
      promote=True,
      all_masks=True,
    ),
    Spec(
      # Two feature axes: linen's params are (W, C), nnx's flat (W * C,).
      "LayerNorm_HWC",
      lambda d, p: LINEN.LayerNorm(
        reduction_axes=(1, 2, 3), feature_axes=(2, 3), dtype=d, param_dtype=p
      ),
      lambda d, p, r, **kw: NNX.LayerNorm(
        SHAPE[2] * C,
        reduction_axes=(1, 2, 3),
        feature_axes=(2, 3),
        dtype=d,
        param_dtype=p,
        rngs=r,
        **kw,
      ),
      promote=True,
      dtypes=(None,),  # the flat parameters are what is new here
      all_masks=True,
    ),
    Spec(
      "RMSNorm",
      lambda d, p: LINEN.RMSNorm(dtype=d, param_dtype=p),
      lambda d, p, r, **kw: NNX.RMSNorm(C, dtype=d, param_dtype=p, rngs=r, **kw),
      promote=True,
      all_masks=True,
    ),
    Spec(
      "GroupNorm",
      lambda d, p: LINEN.GroupNorm(num_groups=3, dtype=d, param_dtype=p),
      lambda d, p, r, **kw: NNX.GroupNorm(
        C, num_groups=3, dtype=d, param_dtype=p, rngs=r, **kw
      ),
      promote=True,
      all_masks=True,
    ),
    Spec(
      "InstanceNorm",
      lambda d, p: LINEN.InstanceNorm(dtype=d, param_dtype=p),
      lambda d, p, r, **kw: NNX.InstanceNorm(C, dtype=d, param_dtype=p, rngs=r, **kw),
      promote=True,
      all_masks=True,
    ),
    Spec(
      # Two feature axes (W and C): linen's params are (4, 6), nnx's (24,).
      "InstanceNorm_WC",
      lambda d, p: LINEN.InstanceNorm(feature_axes=(2, 3), dtype=d, param_dtype=p),
      lambda d, p, r, **kw: NNX.InstanceNorm(
        SHAPE[2] * C, feature_axes=(2, 3), dtype=d, param_dtype=p, rngs=r, **kw
      ),
      promote=True,
      dtypes=(None,),
      all_masks=True,
    ),
    Spec(
      "FilterResponseNorm",
      lambda d, p: LINEN.FilterResponseNorm(
        learned_epsilon=True, dtype=d, param_dtype=p
      ),
      lambda d, p, r: NNX.FilterResponseNorm(
        C, learned_epsilon=True, dtype=d, param_dtype=p, rngs=r
      ),
    ),
    Spec(
      "SwitchableNorm",
      lambda d, p: LINEN.SwitchableNorm(momentum=0.9, dtype=d, param_dtype=p),
      lambda d, p, r: NNX.SwitchableNorm(
        C, momentum=0.9, dtype=d, param_dtype=p, rngs=r
      ),
      mode=_bn_mode,
    ),
    Spec(
      "BatchRenorm",
      # Tight bounds, so r and d are clipped with the random running stats.
      lambda d, p: LINEN.BatchRenorm(
        momentum=0.9, r_max=1.5, d_max=0.5, dtype=d, param_dtype=p
      ),
      lambda d, p, r: NNX.BatchRenorm(
        C, momentum=0.9, r_max=1.5, d_max=0.5, dtype=d, param_dtype=p, rngs=r
      ),
      mode=_bn_mode,
    ),
    Spec(
      "MovingAverageBatchNorm",
      # The step count (3, see _random_value) is past the warm-up (2): the
      # renormalization is active.
      lambda d, p: LINEN.MovingAverageBatchNorm(
        buffer_size=4, renorm_warmup_steps=2, dtype=d, param_dtype=p
      ),
      lambda d, p, r: NNX.MovingAverageBatchNorm(
        C, buffer_size=4, renorm_warmup_steps=2, dtype=d, param_dtype=p, rngs=r
      ),
      mode=_bn_mode,
    ),
    Spec(
      "EvoNormB0",
      lambda d, p: LINEN.EvoNormB0(momentum=0.9, dtype=d, param_dtype=p),
      lambda d, p, r: NNX.EvoNormB0(C, momentum=0.9, dtype=d, param_dtype=p, rngs=r),
      mode=_bn_mode,
    ),
    Spec(
      "EvoNormS0",
      lambda d, p: LINEN.EvoNormS0(num_groups=3, dtype=d, param_dtype=p),
      lambda d, p, r: NNX.EvoNormS0(C, num_groups=3, dtype=d, param_dtype=p, rngs=r),
    ),
    Spec(
      "WeightNorm",
      lambda d, p: LINEN.WeightNorm(_dense(d), dtype=d, param_dtype=p),
      lambda d, p, r, **kw: NNX.WeightNorm(
        _linear(d, r), dtype=d, param_dtype=p, rngs=r, **kw
      ),
      nnx_path=_wrapped_path,
      masked=False,
      promote=True,
    ),
    Spec(
      "SpectralNorm",
      lambda d, p: LINEN.SpectralNorm(_dense(d), dtype=d, param_dtype=p),
      lambda d, p, r: NNX.SpectralNorm(_linear(d, r), dtype=d, param_dtype=p, rngs=r),
      mode=_sn_mode,
      nnx_path=_wrapped_path,
      masked=False,
    ),
  ]
}


def _name(dtype) -> str:
  return "None" if dtype is None else jnp.dtype(dtype).name


def _dtype(name: str):
  return None if name == "None" else jnp.dtype(name)


def _default_promotion_keeps_the_output_dtype(
  spec: Spec, dtype, param_dtype, x_dtype
) -> bool:
  """Whether flax.nnx's default ``promote_dtype`` gives linen's output dtype.

  It promotes ``x`` and the parameters (and BN's float32 running statistics)
  to ``dtype``, or, when ``dtype`` is None, to their promoted type, which is
  then also the output dtype: float32 for BN where linen gives float16.
  """
  args = [jnp.dtype(x_dtype), jnp.dtype(param_dtype)]
  if spec.promotes_f32_state:
    args.append(jnp.dtype(jnp.float32))
  if dtype is not None:
    return True
  return jnp.result_type(*args) == jnp.result_type(*args[:2])


# A configuration: (layer, dtype, param_dtype, x dtype, promote); each runs
# with and without a mask, in each mode of the layer.
Key = tuple[str, str, str, str, str]


def _keys() -> list[Key]:
  out = []
  for spec in SPECS.values():
    promotes = ["identity_promote", "default_promote"] if spec.promote else ["-"]
    for promote, dtype, pdt, xdt in itertools.product(
      promotes, spec.dtypes, PARAM_DTYPES, X_DTYPES
    ):
      if dtype == jnp.bfloat16 and pdt != xdt:
        continue  # bfloat16 output of mixed inputs: f16/f32 cover the logic
      if promote == "default_promote" and not (
        # Mixed float16/float32 arguments: cast up, or all cast down to a
        # float16 ``dtype`` (flax.nnx rounds x and the parameters first).
        ((dtype is None and pdt != xdt) or dtype == jnp.float16)
        and _default_promotion_keeps_the_output_dtype(spec, dtype, pdt, xdt)
      ):
        continue
      out.append((spec.name, _name(dtype), _name(pdt), _name(xdt), promote))
  return out


KEYS = _keys()


def _masks(key: Key) -> tuple[bool, ...]:
  """The masks a configuration runs with.

  The mask alternates over the dtype configurations, on for half of them, so
  that every pair of values of two of (dtype, param_dtype, input dtype,
  mask) still meets, at half the compile time; flax's namesakes run every
  float16-output configuration with and without the mask (where masked
  statistics and float16 rounding meet).
  """
  spec = SPECS[key[0]]
  if not spec.masked:
    return (False,)
  _, dtype, pdt, xdt, _ = key
  if spec.all_masks and dtype == "float16":
    return (False, True)
  parity = [_name(d) for d in DTYPES].index(dtype) + (pdt, xdt).count("float16")
  return (parity % 2 == 1,)


def _modes(spec: Spec) -> tuple[tuple[str, bool | None], ...]:
  return (("train", True), ("eval", False)) if spec.stateful else (("apply", None),)


def _cases():
  out = []
  for key in KEYS:
    name, dtype, pdt, xdt, promote = key
    spec = SPECS[name]
    for mask, (mode, _) in itertools.product(_masks(key), _modes(spec)):
      parts = [name, mode, f"dtype={dtype}", f"param={pdt}", f"x={xdt}"]
      parts.append("mask" if mask else "nomask")
      if spec.promote:
        parts.append(promote)
      out.append(pytest.param(key, mask, mode, id="-".join(parts)))
  return out


def _inputs(x_dtype):
  rng = np.random.default_rng(0)
  x = (2.0 * rng.standard_normal(SHAPE) + 0.5).astype(np.float32)
  mask = rng.random(SHAPE) < 0.6
  # Every reduction (LN rows, IN/GN pixels, BN channels) keeps elements.
  mask[..., :2] = True
  mask[:, 0, 0, :] = True
  return jnp.asarray(x).astype(x_dtype), jnp.asarray(mask)


def _random_value(path: tuple[str, ...], shape, dtype, rng) -> jax.Array:
  """A random non-trivial value of a variable, by its name."""
  name = "/".join(path)
  if jnp.issubdtype(dtype, jnp.integer):
    value = np.full(shape, 3)  # MABN's step count
  elif name.endswith(("var", "second_moments", "sigma")):
    value = rng.uniform(0.5, 2.0, shape)
  elif name.endswith("scale"):
    value = 1.0 + 0.5 * rng.standard_normal(shape)
  else:
    value = 0.5 * rng.standard_normal(shape)
  return jnp.asarray(value.astype(np.float32)).astype(dtype)


def _get(obj, path):
  for k in path:
    obj = obj[k] if isinstance(obj, dict) else getattr(obj, k)
  return obj


def _unflatten(flat: dict) -> dict:
  out: dict = {}
  for path, v in flat.items():
    d = out
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return out


def _abstract_linen_variables(spec: Spec, lin: nn.Module, x) -> dict:
  init_kw = spec.mode(False) if spec.stateful else {}
  abstract = jax.eval_shape(lambda: lin.init(jax.random.key(0), x, **init_kw))
  return flatten_dict(dict(abstract))


@dataclasses.dataclass
class Built:
  key: Key
  spec: Spec
  linen: nn.Module
  variables: dict  # linen's variable tree
  graphdef: Any
  state: Any  # nnx state holding the same values
  x: jax.Array
  mask: jax.Array


def _build(key: Key) -> Built:
  """Linen and nnx twins holding the same random variables, and the inputs."""
  name, dtype, pdt, xdt, promote = key
  spec = SPECS[name]
  dtype, pdt, xdt = _dtype(dtype), _dtype(pdt), _dtype(xdt)
  x, mask = _inputs(xdt)
  lin = spec.make_linen(dtype, pdt)
  kw = {"promote_dtype": _identity_promote} if promote == "identity_promote" else {}
  # Abstract construction: no initializer runs, every value is set below.
  model = nnx.eval_shape(lambda: spec.make_nnx(dtype, pdt, nnx.Rngs(0), **kw))
  rng = np.random.default_rng(42)
  flat = {}
  for path, abstract in sorted(_abstract_linen_variables(spec, lin, x).items()):
    var = _get(model, spec.nnx_path(path))
    value_dtype = abstract.dtype
    if path[1] == "layer_instance":
      # The wrapped Dense's own weights (flax.linen's WeightNorm.init stores
      # the kernel in the wrapper's dtype): both families get the float32
      # checkpoint of nnx.Linear.
      value_dtype = var.dtype
    assert var.dtype == value_dtype, (path, var.dtype, value_dtype)
    assert var.size == abstract.size, (path, var.shape, abstract.shape)
    flat[path] = _random_value(path, abstract.shape, value_dtype, rng)
    var.set_value(flat[path].reshape(var.shape))
  graphdef, state = nnx.split(model)
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, jax.Array), "an nnx variable linen does not have"
  return Built(key, spec, lin, _unflatten(flat), graphdef, state, x, mask)


def _stat_paths(variables: dict):
  return [p for p in flatten_dict(variables) if p[0] == "batch_stats"]


def _linen_outputs(b: Built, variables, x, mask):
  out = {}
  for with_mask, (mode, train) in itertools.product(_masks(b.key), _modes(b.spec)):
    mask_kw = {"mask": mask} if with_mask else {}
    if train is None:
      out[with_mask, mode] = (b.linen.apply(variables, x, **mask_kw), {})
      continue
    y, updates = b.linen.apply(
      variables, x, **b.spec.mode(train), **mask_kw, mutable=["batch_stats"]
    )
    stats = {p: _get(updates, p) for p in _stat_paths(variables)}
    out[with_mask, mode] = (y, stats)
  return out


def _nnx_outputs(b: Built, state, x, mask):
  out = {}
  for with_mask, (mode, train) in itertools.product(_masks(b.key), _modes(b.spec)):
    mask_kw = {"mask": mask} if with_mask else {}
    # A fresh copy per call: evaluation must not see training's update.
    m = nnx.merge(b.graphdef, state, copy=True)
    if train is None:
      out[with_mask, mode] = (m(x, **mask_kw), {})
      continue
    y = m(x, **b.spec.mode(train), **mask_kw)
    stats = {}
    for p in _stat_paths(b.variables):
      # nnx keeps LN/IN-style variables flat; compare in linen's shape.
      value = _get(m, b.spec.nnx_path(p))[...]
      stats[p] = value.reshape(_get(b.variables, p).shape)
    out[with_mask, mode] = (y, stats)
  return out


# LLVM without optimization: about a third less compile time, and the same
# IEEE arithmetic (no fast-math at any level), for both families alike.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _jit_run(fn, inputs):
  return jax.device_get(jax.jit(fn).lower(inputs).compile(_COMPILER_OPTIONS)(inputs))


@functools.cache
def _run_layer(name: str):
  """Runs every configuration of one layer, in one jitted function per family.

  Returns ``{key: (linen_out, nnx_out)}`` (each ``{(mask, mode): (y,
  stats)}``), ``{key: exception}`` for configurations whose build or trace
  raised, and the built configurations.
  """
  errors: dict[Key, BaseException] = {}
  built = {}
  for k in KEYS:
    if k[0] == name:
      try:
        built[k] = _build(k)
      except Exception as e:  # raised again by its cases
        errors[k] = e

  def run_all(fn, inputs):
    out = {}
    for k, args in inputs.items():
      try:
        out[k] = fn(built[k], *args)
      except Exception as e:  # raised again by its cases
        errors.setdefault(k, e)
    return out

  linen_out = _jit_run(
    lambda i: run_all(_linen_outputs, i),
    {k: (b.variables, b.x, b.mask) for k, b in built.items()},
  )
  nnx_out = _jit_run(
    lambda i: run_all(_nnx_outputs, i),
    {k: (b.state, b.x, b.mask) for k, b in built.items()},
  )
  results = {
    k: (linen_out[k], nnx_out[k]) for k in built if k in linen_out and k in nnx_out
  }
  return results, errors, built


def _assert_identical(actual, expected, what):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.dtype == expected.dtype, (
    f"{what}: nnx {actual.dtype}, linen {expected.dtype}"
  )
  assert actual.shape == expected.shape, (
    f"{what}: nnx {actual.shape}, linen {expected.shape}"
  )
  np.testing.assert_array_equal(
    actual.astype(np.float32), expected.astype(np.float32), err_msg=what
  )


@pytest.mark.parametrize("key, with_mask, mode", _cases())
def test_linen_and_nnx_are_bit_identical(key, with_mask, mode):
  results, errors, built = _run_layer(key[0])
  if key in errors:
    raise errors[key]
  (linen_out, nnx_out), b = results[key], built[key]
  y_linen, stats_linen = linen_out[with_mask, mode]
  y_nnx, stats_nnx = nnx_out[with_mask, mode]
  _assert_identical(y_nnx, y_linen, "output")
  for path, value in stats_linen.items():
    _assert_identical(stats_nnx[path], value, "/".join(path))
  stats_in = {p: np.asarray(_get(b.variables, p)) for p in stats_linen}
  if mode == "eval":
    for path, value in stats_in.items():
      _assert_identical(stats_linen[path], value, "/".join(path) + " (eval)")
  if mode == "train":
    # Not vacuous: training moved the statistics.
    assert any(not np.array_equal(stats_linen[p], v) for p, v in stats_in.items())


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=_name)
def test_same_variables(name, param_dtype):
  """nnx holds exactly linen's variables: names, types, sizes and dtypes."""
  spec = SPECS[name]
  x = jnp.zeros(SHAPE, jnp.float32)
  flat = _abstract_linen_variables(spec, spec.make_linen(None, param_dtype), x)
  model = nnx.eval_shape(lambda: spec.make_nnx(None, param_dtype, nnx.Rngs(0)))
  for path, value in flat.items():
    var = _get(model, spec.nnx_path(path))
    expected_type = nnx.Param if path[0] == "params" else nnx.BatchStat
    assert isinstance(var, expected_type), (path, type(var))
    assert var.dtype == value.dtype, (path, var.dtype, value.dtype)
    assert var.size == value.size, (path, var.shape, value.shape)
  n_nnx = len(jax.tree.leaves(nnx.state(model, nnx.Param, nnx.BatchStat)))
  assert n_nnx == len(flat)
