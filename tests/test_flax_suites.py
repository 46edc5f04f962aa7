"""flax's own normalization test suites, rewritten for jaxnorm's classes.

The cases of ``NormalizationTest`` in google/flax ``tests/linen/linen_test.py``
and of ``tests/nnx/nn/normalization_test.py`` (linen/nnx equivalence), with
the same inputs and expectations, run on ``jaxnorm.linen`` / ``jaxnorm.nnx``
in place of ``flax.linen`` / ``flax.nnx`` (the code is this project's own).
Where flax's test compares to a reference one-liner, the reference here is
float64 NumPy, and flax's own layer is also run side by side on the same
input and variables. Where flax's test checks an error, jaxnorm must raise
the same exception type with flax's message text (taken from flax's layer
on the same input) and name the offending argument in backticks (SPEC §4).

Where this differs from flax's tests, on purpose:

* Inputs are drawn with NumPy (same distributions; flax uses jax.random).
* With a large offset (x + 1e6, x + 1e4) flax compares to a float32
  one-liner sharing its layer's rounding; here the reference is exact and
  jaxnorm must be at least as accurate as flax's own layer.
* The linen/nnx twins run eagerly, as flax's do, on fewer combinations:
  five of flax's sixteen per layer for BN, LN, RMS, GN, IN (each dtype pair,
  with and without the mask, both ``use_fast_variance``), and ``n_steps``
  of spectral norm paired with the dtypes instead of multiplied.
* Everything else runs under ``jax.jit`` (eager mode compiles every
  primitive apart, which costs more here).

``LINEN`` and ``NNX`` name the classes under test; pointing them at flax's
own classes runs these expectations against flax itself (all pass but the
backticked argument names, a jaxnorm addition).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx

LINEN: Any = jnl
NNX: Any = jnx


def _keys(n: int, seed: int = 0):
  return jax.random.split(jax.random.key(seed), n)


# Inputs are drawn with NumPy (flax's tests draw the same distributions with
# jax.random, whose every eager call here would be one more compilation).
def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    # Unit variance, as jax.random.normal's complex draw: real and imaginary
    # parts of variance 1/2 each.
    x = (x + 1j * rng.standard_normal(shape)) / np.sqrt(2)
  return jnp.asarray(x.astype(dtype))


def _bernoulli(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).random(shape) < 0.5


def _f64(a) -> np.ndarray:
  a = np.asarray(a)
  return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def _normalized(x, axes, epsilon: float) -> np.ndarray:
  """Float64 ``(x - mean) / sqrt(var + epsilon)`` over ``axes``."""
  x = _f64(x)
  mean = x.mean(axis=axes, keepdims=True)
  var = (np.abs(x - mean) ** 2).mean(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + epsilon)


def _masked_mean_var(y, mask, axes):
  """Float64 mean and (biased) variance of the unmasked elements of ``y``."""
  y = _f64(y)
  mask = np.broadcast_to(np.asarray(mask), y.shape)
  mean = np.mean(y, axis=axes, where=mask)
  centered = np.abs(y - np.expand_dims(mean, axes)) ** 2
  return mean, np.mean(centered, axis=axes, where=mask)


def _raises_like_flax(flax_call, jaxnorm_call, argument: str):
  """Same exception type as flax, flax's message inside, ``argument`` named."""
  with pytest.raises(Exception) as flax_error:
    flax_call()
  with pytest.raises(Exception) as jn_error:
    jaxnorm_call()
  assert type(jn_error.value) is type(flax_error.value), (
    f"jaxnorm raised {type(jn_error.value).__name__}: {jn_error.value}; "
    f"flax raises {type(flax_error.value).__name__}"
  )
  message = str(jn_error.value)
  assert str(flax_error.value) in message, (
    f"flax's message {str(flax_error.value)!r} is not in jaxnorm's {message!r}"
  )
  assert f"`{argument}`" in message, f"`{argument}` not named in {message!r}"


def _padded(x, mask):
  """``x`` with NaN where ``mask`` is False, as flax's mask tests pad."""
  return jnp.asarray(np.where(mask, np.asarray(x), np.nan).astype(x.dtype))


def _cache(fn):
  """``functools.cache`` that also keeps an exception, raised to every caller.

  The grouped runs below trace every case of a test in one function; one
  failing trace must not make each case run it again.
  """

  @functools.cache
  def run(*args):
    try:
      return True, fn(*args)
    except Exception as e:  # raised again below
      return False, e

  @functools.wraps(fn)
  def wrapper(*args):
    ok, value = run(*args)
    if not ok:
      raise value
    return value

  return wrapper


def _assert_offset_case(y, y_flax, expected):
  """With a large offset, at least as accurate as flax's own layer.

  flax's test compares to a float32 one-liner that shares its layer's
  rounding; no float32 computation can reach exact arithmetic there (the
  mean of values near 1e6 is itself rounded to ~0.03), so the exact float64
  result is the reference and flax's own error the bound.
  """
  err = np.max(np.abs(_f64(y) - expected))
  flax_err = np.max(np.abs(_f64(y_flax) - expected))
  assert err <= max(flax_err, 1e-3), (err, flax_err)


# LLVM without optimization: about a third less compile time for these
# small functions, and the same IEEE arithmetic.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _jit(fn, *args):
  """``jax.jit(fn)(*args)``; eager mode would compile every primitive apart."""
  return jax.jit(fn).lower(*args).compile(_COMPILER_OPTIONS)(*args)


def _init_with_output(module, key, *args, **kwargs):
  return _jit(lambda k, *a: module.init_with_output(k, *a, **kwargs), key, *args)


def _init(module, key, *args, **kwargs):
  return _jit(lambda k, *a: module.init(k, *a, **kwargs), key, *args)


def _ours_and_flax(ours, theirs, key, x, **kwargs):
  """jaxnorm's ``init_with_output``, and flax's layer on those variables."""

  def run(key, x):
    y, variables = ours.init_with_output(key, x, **kwargs)
    return y, variables, theirs.apply(variables, x, **kwargs)

  return _jit(run, key, x)


# --------------------------------------------------------------------------
# flax.linen NormalizationTest: masks


def test_layer_norm_mask():
  x = _normal(0, (3, 4, 5))
  m = _bernoulli(1, x.shape)
  m[..., :2] = True  # at least 2 elements per row
  x = _padded(x, m)
  y, _, y_flax = _ours_and_flax(
    LINEN.LayerNorm(), nn.LayerNorm(), jax.random.key(0), x, mask=m
  )
  mean, var = _masked_mean_var(y, m, -1)
  np.testing.assert_allclose(mean, 0.0, atol=1e-4)
  np.testing.assert_allclose(var, 1.0, atol=1e-4)
  np.testing.assert_allclose(_f64(y)[m], _f64(y_flax)[m], atol=1e-5)


def test_rms_norm_mask():
  x = _normal(0, (3, 4, 5))
  m = _bernoulli(1, x.shape)
  m[..., :1] = True  # at least 1 element per row
  x = _padded(x, m)
  y, _, y_flax = _ours_and_flax(
    LINEN.RMSNorm(), nn.RMSNorm(), jax.random.key(0), x, mask=m
  )
  mean_square = np.mean(_f64(y) ** 2, axis=-1, where=np.asarray(m))
  np.testing.assert_allclose(mean_square, 1.0, atol=1e-4)
  np.testing.assert_allclose(_f64(y)[m], _f64(y_flax)[m], atol=1e-5)


def test_group_norm_mask():
  x = _normal(0, (13, 3, 5, 7 * 11))
  m = _bernoulli(1, x.shape)
  m[..., :2] = True
  x = _padded(x, m)
  y, _, y_flax = _ours_and_flax(
    LINEN.GroupNorm(7, use_bias=False, use_scale=False),
    nn.GroupNorm(7, use_bias=False, use_scale=False),
    jax.random.key(0),
    x,
    mask=m,
  )
  # Statistics per sample and group of 11 channels, over H, W and the group.
  grouped, grouped_mask = (np.asarray(a).reshape(13, 3, 5, 7, 11) for a in (y, m))
  mean, var = _masked_mean_var(grouped, grouped_mask, (1, 2, 4))
  np.testing.assert_allclose(mean, 0.0, atol=1e-4)
  np.testing.assert_allclose(var, 1.0, atol=1e-4)
  np.testing.assert_allclose(_f64(y)[m], _f64(y_flax)[m], atol=1e-5)


# --------------------------------------------------------------------------
# BatchNorm, real and complex


def _batch_norm_case(dtype, with_mask: bool):
  x = _normal(0, (4, 3, 2), dtype)
  m = None
  if with_mask:
    m = _bernoulli(1, (4, 3, 1))
    x = _padded(x, m)
  return x, m, jax.random.key(2)


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64], ids=["real", "complex"])
def test_batch_norm(dtype, with_mask):
  x, m, key = _batch_norm_case(dtype, with_mask)
  kwargs = dict(momentum=0.9, use_running_average=False)
  if dtype == jnp.complex64:
    kwargs["dtype"] = jnp.complex64

  def run(x):
    """Init (a training call), then one step of jaxnorm's layer and flax's."""
    layer = LINEN.BatchNorm(**kwargs)
    y, variables = layer.init_with_output(key, x, mask=m)
    step = layer.apply(variables, x, mask=m, mutable=["batch_stats"])
    flax_step = nn.BatchNorm(**kwargs).apply(
      variables, x, mask=m, mutable=["batch_stats"]
    )
    return y, step, flax_step

  y, (y_step, updates), (y_flax, flax_updates) = _jit(run, x)
  where = np.ones(x.shape, bool) if m is None else np.broadcast_to(m, x.shape)

  # The output is normalized over (N, L) per channel.
  mean, var = _masked_mean_var(y, where, (0, 1))
  np.testing.assert_allclose(mean, 0.0, atol=1e-4)
  np.testing.assert_allclose(var, 1.0, rtol=1e-4)
  assert y.dtype == jnp.dtype(dtype)

  # One training step from init: new = 0.9 * (0, 1) + 0.1 * batch statistics.
  stats = updates["batch_stats"]
  x_mean, x_var = _masked_mean_var(x, where, (0, 1))
  np.testing.assert_allclose(stats["mean"], 0.1 * x_mean, atol=1e-4)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * x_var, rtol=1e-4)

  # flax's BatchNorm side by side: same output, same statistics and dtypes
  # (a complex batch gives flax a complex running mean).
  np.testing.assert_allclose(_f64(y_step)[where], _f64(y_flax)[where], atol=1e-5)
  for name in ("mean", "var"):
    expected = flax_updates["batch_stats"][name]
    assert stats[name].dtype == expected.dtype, (
      f"running {name}: jaxnorm {stats[name].dtype}, flax {expected.dtype}"
    )
    np.testing.assert_allclose(stats[name], expected, atol=1e-6)


def test_batch_norm_multi_init():
  """Init needs no bound ``axis_name``; a second call on the output is ~equal."""

  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      norm = LINEN.BatchNorm(name="norm", use_running_average=False, axis_name="b")
      x = norm(x)
      return x, norm(x)

  x = _normal(1, (2, 4))
  (y1, y2), _ = _init_with_output(Twice(), jax.random.key(0), x)
  np.testing.assert_allclose(y1, y2, rtol=0.005)


# --------------------------------------------------------------------------
# LayerNorm, RMSNorm


LAYER_NORM_CASES = {
  "axes=-1": (-1, True),
  "axes=1": (1, True),
  "axes=(1,2)": ((1, 2), True),
  "axes=(0,1,2)": ((0, 1, 2), True),
  "axes=-1-offset1e6": (-1, False),
}


@pytest.mark.parametrize("case", list(LAYER_NORM_CASES))
def test_layer_norm(case):
  reduction_axes, use_fast_variance = LAYER_NORM_CASES[case]
  k = _keys(2)
  x = _normal(0, (2, 3, 4))
  if not use_fast_variance:
    x = x + 1e6  # E[x^2] - E[x]^2 would lose every digit here
  kwargs = dict(
    use_bias=False,
    use_scale=False,
    epsilon=1e-5,
    reduction_axes=reduction_axes,
    use_fast_variance=use_fast_variance,
  )
  y, _, y_flax = _ours_and_flax(
    LINEN.LayerNorm(**kwargs), nn.LayerNorm(**kwargs), k[1], x
  )
  assert y.dtype == x.dtype and y.shape == x.shape
  expected = _normalized(x, reduction_axes, 1e-5)
  if use_fast_variance:
    np.testing.assert_allclose(y, expected, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(y, y_flax, atol=1e-3, rtol=1e-3)
  else:
    _assert_offset_case(y, y_flax, expected)


@pytest.mark.parametrize("reduction_axes", [-1, 1, (1, 2)], ids=str)
def test_rms_norm(reduction_axes):
  k = _keys(2)
  x = _normal(0, (2, 3, 4))
  kwargs = dict(use_scale=False, epsilon=1e-5, reduction_axes=reduction_axes)
  y, _, y_flax = _ours_and_flax(LINEN.RMSNorm(**kwargs), nn.RMSNorm(**kwargs), k[1], x)
  assert y.dtype == x.dtype and y.shape == x.shape
  x64 = _f64(x)
  expected = x64 / np.sqrt((x64**2).mean(axis=reduction_axes, keepdims=True) + 1e-5)
  np.testing.assert_allclose(y, expected, atol=1e-4)
  np.testing.assert_allclose(y, y_flax, atol=1e-5)


# --------------------------------------------------------------------------
# GroupNorm


def _group_norm_reference(x, groups: int, axes, epsilon=1e-5) -> np.ndarray:
  """Float64 GN: channels split into ``groups``, normalized over ``axes``."""
  x = _f64(x)
  grouped = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
  return _normalized(grouped, axes, epsilon).reshape(x.shape)


GROUP_NORM_CASES = {
  # name: (x shape, reduction_axes, axes of the (..., G, C/G) view)
  "default": ((2, 5, 4, 4, 32), None, (1, 2, 3, 5)),
  "unbatched": ((2, 5, 4, 4, 32), (0, 1, 3, 4), (0, 1, 3, 5)),
}


@pytest.mark.parametrize("case", list(GROUP_NORM_CASES))
def test_group_norm(case):
  shape, reduction_axes, grouped_axes = GROUP_NORM_CASES[case]
  k = _keys(2)
  x = _normal(0, shape)
  kwargs = dict(
    num_groups=2,
    use_bias=False,
    use_scale=False,
    epsilon=1e-5,
    reduction_axes=reduction_axes,
  )
  y, _, y_flax = _ours_and_flax(
    LINEN.GroupNorm(**kwargs), nn.GroupNorm(**kwargs), k[1], x
  )
  assert y.dtype == x.dtype and y.shape == x.shape
  np.testing.assert_allclose(y, _group_norm_reference(x, 2, grouped_axes), atol=1e-4)
  np.testing.assert_allclose(y, y_flax, atol=1e-5)


def test_group_norm_batched():
  """Negative reduction axes: a (3, 4, 32) sample, then a stack of 5 of them."""
  k = _keys(2)
  x = _normal(0, (3, 4, 32))
  kwargs = dict(
    num_groups=2,
    use_bias=False,
    use_scale=False,
    epsilon=1e-5,
    reduction_axes=(-3, -2, -1),
  )
  stacked = jnp.stack([x] * 5)

  def run(x, stacked):
    layer = LINEN.GroupNorm(**kwargs)
    y, variables = layer.init_with_output(k[1], x)
    y_flax = nn.GroupNorm(**kwargs).apply(variables, stacked)
    return y, layer.apply({}, stacked), y_flax

  y, y_stacked, y_flax = _jit(run, x, stacked)
  assert y.dtype == x.dtype and y.shape == x.shape
  np.testing.assert_allclose(y, y_stacked[0], atol=1e-4)
  np.testing.assert_allclose(
    y_stacked, _group_norm_reference(stacked, 2, (1, 2, 4)), atol=1e-4
  )
  np.testing.assert_allclose(y_stacked, y_flax, atol=1e-5)


GROUP_NORM_ERRORS = {
  # name: (GroupNorm arguments, the argument to name)
  "num_groups=3 for 32 channels": ({"num_groups": 3}, "num_groups"),
  "reduction_axes without the channels": (
    {"num_groups": 3, "reduction_axes": (0, 1, 2, 3)},
    "reduction_axes",
  ),
}


@pytest.mark.parametrize("case", list(GROUP_NORM_ERRORS))
def test_group_norm_raises(case):
  kwargs, argument = GROUP_NORM_ERRORS[case]
  kwargs = dict(use_bias=False, use_scale=False, epsilon=1e-5, **kwargs)
  k = _keys(2)
  x = _normal(0, (2, 5, 4, 4, 32))
  _raises_like_flax(
    lambda: _init_with_output(nn.GroupNorm(**kwargs), k[1], x),
    lambda: _init_with_output(LINEN.GroupNorm(**kwargs), k[1], x),
    argument,
  )


def test_group_norm_raises_nnx():
  """flax.nnx checks the groups at construction."""
  _raises_like_flax(
    lambda: nnx.GroupNorm(32, num_groups=3, rngs=nnx.Rngs(0)),
    lambda: NNX.GroupNorm(32, num_groups=3, rngs=nnx.Rngs(0)),
    "num_groups",
  )


# --------------------------------------------------------------------------
# InstanceNorm


INSTANCE_NORM_CASES = {
  "features=-1": (-1, True),
  "features=(1,2)": ((1, 2), True),
  "features=(1,2,3)": ((1, 2, 3), True),
  "features=-1-offset1e4": (-1, False),
}


@pytest.mark.parametrize("case", list(INSTANCE_NORM_CASES))
def test_instance_norm(case):
  feature_axes, use_fast_variance = INSTANCE_NORM_CASES[case]
  k = _keys(2)
  x = _normal(0, (2, 3, 4, 5))
  if not use_fast_variance:
    x = x + 1e4
  kwargs = dict(
    use_bias=False,
    use_scale=False,
    epsilon=1e-5,
    feature_axes=feature_axes,
    use_fast_variance=use_fast_variance,
  )
  y, _, y_flax = _ours_and_flax(
    LINEN.InstanceNorm(**kwargs), nn.InstanceNorm(**kwargs), k[1], x
  )
  assert y.dtype == x.dtype and y.shape == x.shape
  features = {a % x.ndim for a in np.atleast_1d(feature_axes)}
  axes = tuple(a for a in range(1, x.ndim) if a not in features)
  expected = _normalized(x, axes, 1e-5)
  if use_fast_variance:
    np.testing.assert_allclose(y, expected, atol=1e-6)
    np.testing.assert_allclose(y, y_flax, atol=1e-6)
  else:
    _assert_offset_case(y, y_flax, expected)


BATCH_AXIS_FEATURES = [0, -4, (0, 3), (2, -4)]


@pytest.mark.parametrize("feature_axes", BATCH_AXIS_FEATURES, ids=str)
def test_instance_norm_raises_on_the_batch_axis(feature_axes):
  x = _normal(0, (2, 3, 4, 5))
  _raises_like_flax(
    lambda: _init(nn.InstanceNorm(feature_axes=feature_axes), jax.random.key(1), x),
    lambda: _init(LINEN.InstanceNorm(feature_axes=feature_axes), jax.random.key(1), x),
    "feature_axes",
  )


@pytest.mark.parametrize("feature_axes", BATCH_AXIS_FEATURES, ids=str)
def test_instance_norm_raises_on_the_batch_axis_nnx(feature_axes):
  x = _normal(0, (2, 3, 4, 5))
  n = int(np.prod([x.shape[a] for a in np.atleast_1d(feature_axes)]))

  def call(module):
    return module(n, feature_axes=feature_axes, rngs=nnx.Rngs(0))(x)

  _raises_like_flax(
    lambda: call(nnx.InstanceNorm), lambda: call(NNX.InstanceNorm), "feature_axes"
  )


def _uniform_inits():
  return dict(bias_init=nn.initializers.uniform(), scale_init=nn.initializers.uniform())


EQUIVALENT_LAYERS = {
  "LN(features=(1,2))=IN(features=(1,2))": (
    lambda: LINEN.LayerNorm(feature_axes=(1, 2)),
    lambda: LINEN.InstanceNorm(feature_axes=(1, 2)),
  ),
  "LN(reduce=(1,2))=IN": (
    lambda: LINEN.LayerNorm(reduction_axes=(1, 2), feature_axes=-1),
    lambda: LINEN.InstanceNorm(feature_axes=-1),
  ),
  "LN(reduce=-2,features=(1,3))=IN(features=(1,-1))": (
    lambda: LINEN.LayerNorm(reduction_axes=-2, feature_axes=(1, 3), **_uniform_inits()),
    lambda: LINEN.InstanceNorm(feature_axes=(1, -1), **_uniform_inits()),
  ),
  "LN(reduce=(1,2,3))=GN(num_groups=1)": (
    lambda: LINEN.LayerNorm(reduction_axes=(1, 2, 3), **_uniform_inits()),
    lambda: LINEN.GroupNorm(num_groups=1, **_uniform_inits()),
  ),
  "IN=GN(group_size=1)": (
    lambda: LINEN.InstanceNorm(**_uniform_inits()),
    lambda: LINEN.GroupNorm(num_groups=None, group_size=1, **_uniform_inits()),
  ),
}


@_cache
def _equivalent_layer_results():
  """Variables and outputs of every pair, in one jitted function."""

  def run(x):
    out = {}
    for case, makers in EQUIVALENT_LAYERS.items():
      pair = []
      for make in makers:
        layer = make()
        variables = layer.init(jax.random.key(1), x)
        pair.append((variables, layer.apply(variables, x)))
      out[case] = pair
    return out

  x = _normal(0, (2, 3, 4, 5))
  return jax.device_get(_jit(run, x))


@pytest.mark.parametrize("case", list(EQUIVALENT_LAYERS))
def test_normalization_equivalence(case):
  (v1, y1), (v2, y2) = _equivalent_layer_results()[case]
  assert jax.tree.structure(v1) == jax.tree.structure(v2)
  jax.tree.map(np.testing.assert_array_equal, v1, v2)
  np.testing.assert_allclose(y1, y2, atol=1e-7)


# --------------------------------------------------------------------------
# SpectralNorm and WeightNorm in small models, trained with Adam


def _dense_model(wrapper, stateful):
  class FooDense(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dense(8)(x)
      kw = {"update_stats": train} if stateful else {}
      x = wrapper(nn.Dense(6))(x, **kw)
      return nn.Dense(4)(x)

  return FooDense()


def _conv_model(wrapper, stateful):
  class FooConv(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dense(9)(x).reshape((1, 3, 3))
      kw = {"update_stats": train} if stateful else {}
      x = wrapper(nn.Conv(2, kernel_size=(2, 2)))(x, **kw)
      return nn.Dense(4)(x.reshape(1, -1))

  return FooConv()


def _attention_model(wrapper, stateful):
  class FooAttention(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      a, b = nn.Dense(4)(x), nn.Dense(4)(x)
      kw = {"update_stats": train} if stateful else {}
      x = wrapper(nn.MultiHeadDotProductAttention(4))(a, b, **kw)
      return nn.Dense(4)(x)

  return FooAttention()


_ATTENTION = "MultiHeadDotProductAttention_0"
_ATTENTION_PARAMS = (
  "key/bias",
  "key/kernel",
  "out/kernel",
  "query/bias",
  "query/kernel",
  "value/bias",
  "value/kernel",
)
SPECTRAL_TRAIN_CASES = {
  "dense": (_dense_model, {"Dense_1/kernel/u", "Dense_1/kernel/sigma"}),
  "conv": (_conv_model, {"Conv_0/kernel/u", "Conv_0/kernel/sigma"}),
  "attention": (
    _attention_model,
    {f"{_ATTENTION}/{p}/{s}" for p in _ATTENTION_PARAMS for s in ("u", "sigma")},
  ),
}
WEIGHT_NORM_TRAIN_CASES = {
  "dense": (_dense_model, {"Dense_1/kernel/scale"}),
  "conv": (_conv_model, {"Conv_0/kernel/scale"}),
  "attention": (
    _attention_model,
    {f"{_ATTENTION}/{p}/kernel/scale" for p in ("key", "out", "query", "value")},
  ),
}


def _train(model, stateful: bool, steps: int = 10):
  """Adam(1e-3) on an L2 loss for ``steps`` steps from init, in one jit.

  Returns the (abstract) initial variables and the loss of every step.
  """
  k = _keys(3)
  x, target = _normal(0, (1, 4)), _normal(1, (1, 4))
  tx = optax.adam(1e-3)
  kw = {"train": False} if stateful else {}

  def loss_fn(params, stats):
    variables = {"params": params, **({"batch_stats": stats} if stateful else {})}
    if not stateful:
      return jnp.mean(optax.l2_loss(model.apply(variables, x), target)), stats
    y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.mean(optax.l2_loss(y, target)), updates["batch_stats"]

  def step(carry, _):
    params, stats, opt_state = carry
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, stats), grads = grad_fn(params, stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), loss

  def run():
    variables = model.init(k[2], x, **kw)
    params, stats = variables["params"], variables.get("batch_stats", {})
    return jax.lax.scan(step, (params, stats, tx.init(params)), length=steps)[1]

  abstract = jax.eval_shape(lambda: model.init(k[2], x, **kw))
  return abstract, np.asarray(_jit(run))


def _assert_decreasing(losses):
  assert all(b < a for a, b in itertools.pairwise(losses)), losses


def _spectral_norm_as_flax(layer):
  """``LINEN.SpectralNorm(layer)`` with its defaults, which are flax's."""
  return LINEN.SpectralNorm(layer)


@pytest.mark.parametrize("case", list(SPECTRAL_TRAIN_CASES))
def test_spectral_norm_train(case):
  make, key_paths = SPECTRAL_TRAIN_CASES[case]
  variables, losses = _train(make(_spectral_norm_as_flax, True), stateful=True)
  assert set(variables["batch_stats"]["SpectralNorm_0"]) == key_paths
  _assert_decreasing(losses)


@pytest.mark.parametrize("case", list(WEIGHT_NORM_TRAIN_CASES))
def test_weight_norm_train(case):
  make, key_paths = WEIGHT_NORM_TRAIN_CASES[case]
  variables, losses = _train(make(LINEN.WeightNorm, False), stateful=False)
  assert set(variables["params"]["WeightNorm_0"]) == key_paths
  _assert_decreasing(losses)


# --------------------------------------------------------------------------
# SpectralNorm: sigma and 3-D kernels

SIGMA_CASES = [(1, True, 4.0), (3, True, 4.0), (10, True, 4.0), (1, False, 1.0)]


def _sigma_model(spectral_norm, n_steps):
  class Foo(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      layer = spectral_norm(nn.Dense(8, use_bias=False), n_steps=n_steps)
      return layer(x, update_stats=train)

  return Foo()


@_cache
def _sigmas():
  """Stored sigma after one call on the kernel ``4 I``: (jaxnorm, flax)."""
  x = jnp.ones((1, 8))

  def run(x):
    out = {}
    for n_steps, update_stats, _ in SIGMA_CASES:
      ours = _sigma_model(LINEN.SpectralNorm, n_steps)
      variables = ours.init(jax.random.key(0), x, train=False)
      variables = {
        "params": jax.tree.map(lambda p: 4 * jnp.eye(*p.shape), variables["params"]),
        "batch_stats": variables["batch_stats"],
      }
      sigmas = []
      for model in (ours, _sigma_model(nn.SpectralNorm, n_steps)):
        _, updates = model.apply(variables, x, train=update_stats, mutable=True)
        stats = updates["batch_stats"]["SpectralNorm_0"]
        sigmas.append(stats["Dense_0/kernel/sigma"])
      out[n_steps, update_stats] = sigmas
    return out

  return jax.device_get(_jit(run, x))


@pytest.mark.parametrize("n_steps, update_stats, sigma", SIGMA_CASES)
def test_spectral_norm_sigma(n_steps, update_stats, sigma):
  """``4 I`` has sigma 4; without an update the stored sigma stays 1."""
  ours, flax_sigma = _sigmas()[n_steps, update_stats]
  np.testing.assert_allclose(ours, sigma, atol=1e-3)
  np.testing.assert_allclose(ours, flax_sigma, atol=1e-3)


def _dense_general_3d(spectral_norm, error_on_non_matrix):
  class Foo(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      layer = spectral_norm(
        nn.DenseGeneral((3, 4), use_bias=False),
        error_on_non_matrix=error_on_non_matrix,
      )
      return layer(x, update_stats=train)

  return Foo()


def _init_3d(spectral_norm, error_on_non_matrix):
  model = _dense_general_3d(spectral_norm, error_on_non_matrix)
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.ones((1, 2)), train=False)
  )


def test_spectral_norm_3d_tensor_allowed():
  variables = _init_3d(LINEN.SpectralNorm, False)
  assert set(variables["batch_stats"]["SpectralNorm_0"]) == {
    "DenseGeneral_0/kernel/u",
    "DenseGeneral_0/kernel/sigma",
  }


def test_spectral_norm_3d_tensor_raises():
  _raises_like_flax(
    lambda: _init_3d(nn.SpectralNorm, True),
    lambda: _init_3d(LINEN.SpectralNorm, True),
    "error_on_non_matrix",
  )


# --------------------------------------------------------------------------
# WeightNorm: the formula, and which parameters it takes

MANUAL_WEIGHT_NORM_CASES = [
  # (feature_axes, reduction_axes, variable_filter)
  (-1, 0, {"kernel"}),
  (0, 1, {"kernel"}),
  ((0, 1), (), {"kernel"}),
  ((), (0, 1), {"kernel"}),
  (None, (0, 1), {"kernel"}),
  (0, (), {"bias"}),
  ((), -1, {"bias"}),
]


class _WeightNormedDense(nn.Module):
  weight_norm: Any
  feature_axes: Any
  variable_filter: Any

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(2, bias_init=nn.initializers.normal())
    return self.weight_norm(
      dense, feature_axes=self.feature_axes, variable_filter=self.variable_filter
    )(x)


@_cache
def _manual_weight_norm_results():
  """Variables (init + 0.5) and outputs (jaxnorm, flax) of every case."""
  k = _keys(2, seed=1)
  x = _normal(0, (1, 3))

  def run(x):
    out = []
    for feature_axes, _, variable_filter in MANUAL_WEIGHT_NORM_CASES:
      ours, theirs = (
        _WeightNormedDense(w, feature_axes, frozenset(variable_filter))
        for w in (LINEN.WeightNorm, nn.WeightNorm)
      )
      variables = jax.tree.map(lambda v: v + 0.5, ours.init(k[1], x))
      out.append((variables, ours.apply(variables, x), theirs.apply(variables, x)))
    return out

  return x, jax.device_get(_jit(run, x))


@pytest.mark.parametrize(
  "case",
  range(len(MANUAL_WEIGHT_NORM_CASES)),
  ids=lambda i: str(MANUAL_WEIGHT_NORM_CASES[i]),
)
def test_manual_weight_norm(case):
  _, reduction_axes, variable_filter = MANUAL_WEIGHT_NORM_CASES[case]
  x, results = _manual_weight_norm_results()
  variables, y, y_flax = results[case]
  params = variables["params"]

  def normalized(name):
    w = _f64(params["Dense_0"][name])
    if name not in variable_filter:
      return w
    w = w / np.sqrt((w**2).sum(axis=reduction_axes, keepdims=True))
    scale = _f64(params["WeightNorm_0"][f"Dense_0/{name}/scale"])
    return w * np.expand_dims(scale, reduction_axes)

  expected = _f64(x) @ normalized("kernel") + normalized("bias").reshape(1, -1)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(y, y_flax, atol=1e-6)


_ALL_SCALES = {
  f"Bar_0/{layer}/{p}/scale"
  for layer in ("Baz_0/Dense_0", "Dense_0", "Baz_1/Dense_0", "Dense_1")
  for p in ("kernel", "bias")
}
WEIGHT_NORM_FILTER_CASES = {
  "all": ([{}, None, {"kernel", "bias"}, {"Bar"}], _ALL_SCALES),
  "kernel": ([{"kernel"}], {p for p in _ALL_SCALES if "kernel" in p}),
  "Baz+kernel": (
    [{"Baz", "kernel"}],
    {p for p in _ALL_SCALES if "kernel" in p or "Baz" in p},
  ),
}


class _Baz(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(x)


class _Bar(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(3)(_Baz(name="Baz_0")(x))
    return nn.Dense(3)(_Baz(name="Baz_1")(x))


class _WeightNormedBar(nn.Module):
  variable_filter: Any

  @nn.compact
  def __call__(self, x):
    return LINEN.WeightNorm(_Bar(name="Bar_0"), variable_filter=self.variable_filter)(x)


@pytest.mark.parametrize("case", list(WEIGHT_NORM_FILTER_CASES))
def test_weight_norm_variable_filter(case):
  filters, key_paths = WEIGHT_NORM_FILTER_CASES[case]
  for variable_filter in filters:
    model = _WeightNormedBar(
      None if variable_filter is None else frozenset(variable_filter)
    )
    params = jax.eval_shape(
      lambda m=model: m.init(jax.random.key(0), jnp.ones((1, 4)))
    )["params"]
    assert set(params["WeightNorm_0"]) == key_paths, variable_filter


# --------------------------------------------------------------------------
# flax.nnx normalization_test.py: a linen model and its nnx twin (the norm
# layer, then a Dense) give identical outputs and statistics.
#
# Run eagerly, as flax's tests are: under jit, XLA fuses the two families'
# (different) graphs differently, and flax's own linen and nnx WeightNorm
# then differ in the last bit. jaxnorm's twins are compared under jit in
# test_linen_nnx_identical.py.


def _identity_promote(args, /, *, dtype=None, inexact=True):
  """flax's ``promote_dtype=lambda x, **kwargs: x``: nnx computes as linen."""
  del dtype, inexact
  return args


def _nnx_norm(name, features, identity_promote=True):
  def make(dtype, param_dtype, fast, rngs, **kwargs):
    if identity_promote:
      kwargs["promote_dtype"] = _identity_promote
    return getattr(NNX, name)(
      features,
      dtype=dtype,
      param_dtype=param_dtype,
      use_fast_variance=fast,
      rngs=rngs,
      **kwargs,
    )

  return make


# name: (linen norm(dtype, param_dtype, use_fast_variance), nnx norm(...,
# rngs), features); flax's test keeps nnx's default promote_dtype for IN only.
NNX_TWINS = {
  "BatchNorm": (
    lambda d, p, f: LINEN.BatchNorm(
      use_running_average=False, dtype=d, param_dtype=p, use_fast_variance=f
    ),
    lambda d, p, f, r: _nnx_norm("BatchNorm", 5)(d, p, f, r, use_running_average=False),
    5,
  ),
  "LayerNorm": (
    lambda d, p, f: LINEN.LayerNorm(dtype=d, param_dtype=p, use_fast_variance=f),
    _nnx_norm("LayerNorm", 5),
    5,
  ),
  "RMSNorm": (
    lambda d, p, f: LINEN.RMSNorm(dtype=d, param_dtype=p, use_fast_variance=f),
    _nnx_norm("RMSNorm", 5),
    5,
  ),
  "GroupNorm": (
    lambda d, p, f: LINEN.GroupNorm(
      num_groups=3, dtype=d, param_dtype=p, use_fast_variance=f
    ),
    lambda d, p, f, r: _nnx_norm("GroupNorm", 6)(d, p, f, r, num_groups=3),
    6,
  ),
  "InstanceNorm": (
    lambda d, p, f: LINEN.InstanceNorm(dtype=d, param_dtype=p, use_fast_variance=f),
    _nnx_norm("InstanceNorm", 6, identity_promote=False),
    6,
  ),
}
_F32_F16 = [jnp.float32, jnp.float16]
# flax runs the product of dtype, param_dtype, use_fast_variance and mask
# (16 cases); here each dtype pair runs once, with the mask where the two
# differ and also for float16/float16, and use_fast_variance (accepted, and
# ignored by jaxnorm) takes both values.
NNX_TWIN_CONFIGS = [
  (dtype, pdt, dtype == jnp.float32, dtype != pdt)
  for dtype, pdt in itertools.product(_F32_F16, _F32_F16)
] + [(jnp.float16, jnp.float16, False, True)]


def _name(v) -> str:
  return jnp.dtype(v).name


def _twin_id(name, dtype, param_dtype, fast, masked) -> str:
  return (
    f"{name}-dtype={_name(dtype)}-param={_name(param_dtype)}"
    f"-fast_variance={fast}-{'mask' if masked else 'nomask'}"
  )


class _LinenTwin(nn.Module):
  norm: Any
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, *, mask=None):
    x = self.norm(x, mask=mask)
    return nn.Dense(4, dtype=self.dtype, param_dtype=self.param_dtype)(x)


@_cache
def _nnx_twin_results(name: str):
  """Every configuration of one layer, eagerly.

  Returns ``({id: (linen variables after the step, y)}, {id: (nnx norm
  variables after the step, y)})``.
  """
  make_linen, make_nnx, features = NNX_TWINS[name]
  x = _normal(0, (10, features))
  # flax's mask: every other feature (whole channels, for BN and IN).
  mask = jnp.arange(features) % 2 == 0

  def linen_all(x):
    out = {}
    for dtype, pdt, fast, masked in NNX_TWIN_CONFIGS:
      model = _LinenTwin(make_linen(dtype, pdt, fast), dtype, pdt)
      variables = model.init(jax.random.key(1), x)
      y, updates = model.apply(
        variables, x, mask=mask if masked else None, mutable=["batch_stats"]
      )
      out[_twin_id(name, dtype, pdt, fast, masked)] = ({**variables, **updates}, y)
    return out

  def nnx_all(x, linen_out):
    out = {}
    for dtype, pdt, fast, masked in NNX_TWIN_CONFIGS:
      key = _twin_id(name, dtype, pdt, fast, masked)
      dense = linen_out[key][0]["params"]["Dense_0"]
      rngs = nnx.Rngs(42)
      norm = make_nnx(dtype, pdt, fast, rngs)
      linear = nnx.Linear(features, 4, dtype=dtype, param_dtype=pdt, rngs=rngs)
      linear.kernel[...] = dense["kernel"]
      linear.bias[...] = dense["bias"]
      y = linear(norm(x, mask=mask if masked else None))
      names = ("scale", "bias", "mean", "var")
      out[key] = ({k: getattr(norm, k)[...] for k in names if hasattr(norm, k)}, y)
    return out

  linen_out = linen_all(x)
  return jax.device_get((linen_out, nnx_all(x, linen_out)))


@pytest.mark.parametrize(
  "name, dtype, param_dtype, fast, masked",
  [
    pytest.param(name, *config, id=_twin_id(name, *config))
    for name in NNX_TWINS
    for config in NNX_TWIN_CONFIGS
  ],
)
def test_nnx_linen_equivalence(name, dtype, param_dtype, fast, masked):
  key = _twin_id(name, dtype, param_dtype, fast, masked)
  linen_out, nnx_out = _nnx_twin_results(name)
  (linen_variables, y_linen), (nnx_variables, y_nnx) = linen_out[key], nnx_out[key]
  np.testing.assert_array_equal(y_linen, y_nnx)
  # The norm's parameters, and BN's updated running statistics.
  for collection in ("params", "batch_stats"):
    for k, value in linen_variables.get(collection, {}).get("norm", {}).items():
      np.testing.assert_array_equal(value, nnx_variables[k], err_msg=k)


WEIGHT_NORM_TWIN_CONFIGS = list(itertools.product(_F32_F16, _F32_F16, [1.0, 10.0, 0.5]))


def _weight_norm_twin_id(dtype, param_dtype, scale) -> str:
  return f"dtype={_name(dtype)}-param={_name(param_dtype)}-scale={scale}"


class _LinenWeightNormTwin(nn.Module):
  dtype: Any
  param_dtype: Any
  scale: float

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")
    return LINEN.WeightNorm(
      dense,
      variable_filter=frozenset({"kernel"}),
      scale_init=nnx.initializers.constant(self.scale),
      name="weight_norm",
    )(x)


@_cache
def _weight_norm_twin_results():
  x = _normal(0, (10, 8))

  def linen_all(x):
    out = {}
    for config in WEIGHT_NORM_TWIN_CONFIGS:
      model = _LinenWeightNormTwin(*config)
      variables = model.init(jax.random.key(1), x)
      out[_weight_norm_twin_id(*config)] = (variables, model.apply(variables, x))
    return out

  def nnx_all(x, linen_out):
    out = {}
    for dtype, pdt, scale in WEIGHT_NORM_TWIN_CONFIGS:
      key = _weight_norm_twin_id(dtype, pdt, scale)
      params = linen_out[key][0]["params"]["dense"]
      rngs = nnx.Rngs(42)
      dense = nnx.Linear(8, 4, dtype=dtype, param_dtype=pdt, rngs=rngs)
      normed = NNX.WeightNorm(
        dense,
        use_scale=True,
        scale_init=nnx.initializers.constant(scale),
        feature_axes=-1,
        dtype=dtype,
        param_dtype=pdt,
        rngs=rngs,
      )
      # set_value, as flax's test: linen's WeightNorm.init stores the kernel
      # in the promoted dtype of kernel and scale.
      dense.kernel.set_value(params["kernel"])
      dense.bias.set_value(params["bias"])
      out[key] = (normed.scales[("kernel",)][...], normed(x))
    return out

  linen_out = linen_all(x)
  return jax.device_get((linen_out, nnx_all(x, linen_out)))


@pytest.mark.parametrize(
  "config",
  WEIGHT_NORM_TWIN_CONFIGS,
  ids=[_weight_norm_twin_id(*c) for c in WEIGHT_NORM_TWIN_CONFIGS],
)
def test_nnx_linen_weight_norm_equivalence(config):
  key = _weight_norm_twin_id(*config)
  linen_out, nnx_out = _weight_norm_twin_results()
  (variables, y_linen), (nnx_scale, y_nnx) = linen_out[key], nnx_out[key]
  np.testing.assert_array_equal(
    variables["params"]["weight_norm"]["dense/kernel/scale"], nnx_scale
  )
  np.testing.assert_array_equal(y_linen, y_nnx)


# flax runs the product with n_steps in (1, 10); each dtype pair meets one.
SPECTRAL_TWIN_CONFIGS = [
  (dtype, pdt, 10 if dtype == pdt else 1, update_stats)
  for dtype, pdt, update_stats in itertools.product(_F32_F16, _F32_F16, [True, False])
]


def _spectral_twin_id(dtype, param_dtype, n_steps, update_stats) -> str:
  return (
    f"dtype={_name(dtype)}-param={_name(param_dtype)}-n_steps={n_steps}"
    f"-update_stats={update_stats}"
  )


class _LinenSpectralTwin(nn.Module):
  dtype: Any
  param_dtype: Any
  n_steps: int
  update_stats: bool

  def setup(self):
    # In setup, as flax's test: the layers are seq's (params/seq/layers_0).
    self.seq = nn.Sequential(
      [
        nn.Dense(4, dtype=self.dtype, param_dtype=self.param_dtype),
        nn.relu,
        nn.BatchNorm(
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          use_running_average=not self.update_stats,
        ),
      ]
    )
    self.norm_layer = LINEN.SpectralNorm(self.seq, n_steps=self.n_steps)

  def __call__(self, x):
    return self.norm_layer(x, update_stats=self.update_stats)


_U, _SIGMA = ("layers", 0, "kernel", "u"), ("layers", 0, "kernel", "sigma")


@_cache
def _spectral_twin_results():
  x = _normal(0, (10, 5))

  def linen_all(x):
    out = {}
    for config in SPECTRAL_TWIN_CONFIGS:
      model = _LinenSpectralTwin(*config)
      variables = model.init(jax.random.key(1), x)
      y, updates = model.apply(variables, x, mutable=["batch_stats"])
      out[_spectral_twin_id(*config)] = (variables, y, updates)
    return out

  def nnx_all(x, linen_out):
    out = {}
    for dtype, pdt, n_steps, update_stats in SPECTRAL_TWIN_CONFIGS:
      key = _spectral_twin_id(dtype, pdt, n_steps, update_stats)
      variables = linen_out[key][0]
      rngs = nnx.Rngs(42)
      seq = nnx.Sequential(
        nnx.Linear(5, 4, dtype=dtype, param_dtype=pdt, rngs=rngs),
        nnx.relu,
        nnx.BatchNorm(
          4,
          dtype=dtype,
          param_dtype=pdt,
          use_running_average=not update_stats,
          rngs=rngs,
        ),
      )
      model = NNX.SpectralNorm(
        seq,
        n_steps=n_steps,
        dtype=dtype,
        param_dtype=pdt,
        update_stats=update_stats,
        rngs=rngs,
      )
      params = variables["params"]["seq"]
      # set_value, as flax's test (linen's init may store other dtypes).
      seq.layers[0].kernel.set_value(params["layers_0"]["kernel"])
      seq.layers[0].bias.set_value(params["layers_0"]["bias"])
      seq.layers[2].scale.set_value(params["layers_2"]["scale"])
      seq.layers[2].bias.set_value(params["layers_2"]["bias"])
      stats = variables["batch_stats"]["norm_layer"]
      model.batch_stats[_U].set_value(stats["seq/layers_0/kernel/u"])
      model.batch_stats[_SIGMA].set_value(stats["seq/layers_0/kernel/sigma"])
      y = model(x)
      out[key] = (y, model.batch_stats[_U][...], model.batch_stats[_SIGMA][...])
    return out

  linen_out = linen_all(x)
  return jax.device_get((linen_out, nnx_all(x, linen_out)))


@pytest.mark.filterwarnings(
  # flax.nnx.SpectralNorm itself warns when param_dtype is float16.
  "ignore:scatter inputs have incompatible types:FutureWarning"
)
@pytest.mark.parametrize(
  "config",
  SPECTRAL_TWIN_CONFIGS,
  ids=[_spectral_twin_id(*c) for c in SPECTRAL_TWIN_CONFIGS],
)
def test_nnx_linen_spectral_norm_equivalence(config):
  key = _spectral_twin_id(*config)
  linen_out, nnx_out = _spectral_twin_results()
  (_, y_linen, updates), (y_nnx, u, sigma) = linen_out[key], nnx_out[key]
  np.testing.assert_array_equal(y_linen, y_nnx)
  stats = updates["batch_stats"]["norm_layer"]
  np.testing.assert_array_equal(u, stats["seq/layers_0/kernel/u"])
  np.testing.assert_array_equal(sigma, stats["seq/layers_0/kernel/sigma"])
