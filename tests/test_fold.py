"""Batch-norm folding against independent references.

The core is compared with float64 NumPy written out here (a Dense as
``x @ k + b``, a Conv as a loop over the window), followed by the batch-norm
formula; the flax helpers with flax's own ``Dense``/``Conv`` and batch norms
in evaluation mode, after training steps that move the running statistics.
"""

import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm as jn
import jaxnorm.linen as jnl
import jaxnorm.nnx as jnx

EXAMPLE = (
  pathlib.Path(__file__).resolve().parent.parent / "examples" / "fold_batch_norm.py"
)


def _rng(seed):
  return np.random.default_rng(seed)


def _randn(rng, *shape, loc=0.0, scale=1.0):
  return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def _bn_state(rng, c):
  """Non-trivial statistics: means far from 0, variances from 0.01 to 9."""
  mean = _randn(rng, c, scale=3.0)
  var = np.exp(rng.uniform(np.log(0.01), np.log(9.0), c)).astype(np.float32)
  return mean, var


def np_bn_eval(y, scale, bias, mean, var, eps):
  """Batch norm with given statistics over the last axis, float64."""
  y = np.asarray(y, np.float64)
  out = (y - np.float64(mean)) / np.sqrt(np.float64(var) + eps)
  if scale is not None:
    out = out * np.float64(scale)
  if bias is not None:
    out = out + np.float64(bias)
  return out


def np_conv(x, k, strides, padding, dilation, groups):
  """NHWC x HWIO convolution in float64 by a loop over the window."""
  x = np.pad(np.float64(x), ((0, 0), padding[0], padding[1], (0, 0)))
  k = np.float64(k)
  n, h, w, _ = x.shape
  kh, kw, c_group, c_out = k.shape
  (sh, sw), (dh, dw) = strides, dilation
  oh = (h - dh * (kh - 1) - 1) // sh + 1
  ow = (w - dw * (kw - 1) - 1) // sw + 1
  out_group = c_out // groups
  out = np.zeros((n, oh, ow, c_out))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh]
      patch = patch[:, :, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
      for g in range(groups):
        cin = slice(g * c_group, (g + 1) * c_group)
        cout = slice(g * out_group, (g + 1) * out_group)
        out[..., cout] += patch[..., cin] @ k[i, j][:, cout]
  return out


def _close(actual, expected, tol=2e-5):
  """Close to float32 rounding of values of the reference's magnitude."""
  expected = np.asarray(expected, np.float64)
  atol = tol * max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=atol)


# ----------------------------------------------------------------------------
# core
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_scale", [True, False])
@pytest.mark.parametrize("use_bn_bias", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_matches_numpy(use_scale, use_bn_bias, use_bias):
  rng = _rng(0)
  k = _randn(rng, 5, 4)
  b = _randn(rng, 4) if use_bias else None
  scale = _randn(rng, 4, loc=1.0) if use_scale else None
  beta = _randn(rng, 4) if use_bn_bias else None
  mean, var = _bn_state(rng, 4)
  x = _randn(rng, 7, 5, scale=2.0)
  eps = 1e-3

  new_k, new_b = jn.fold_batch_norm(
    k, b, jn.NormParams(scale, beta), jn.BatchNormState(mean, var), epsilon=eps
  )
  assert new_k.shape == (5, 4) and new_k.dtype == jnp.float32
  assert new_b.shape == (4,) and new_b.dtype == jnp.float32

  y = np.float64(x) @ np.float64(k)
  if b is not None:
    y = y + np.float64(b)
  expected = np_bn_eval(y, scale, beta, mean, var, eps)
  _close(np.float64(x) @ np.float64(new_k) + np.float64(new_b), expected)
  # The folded parameters themselves, written out.
  s = (1.0 if scale is None else np.float64(scale)) / np.sqrt(np.float64(var) + eps)
  _close(new_k, np.float64(k) * s)
  shift = -np.float64(mean) + (0.0 if b is None else np.float64(b))
  _close(new_b, shift * s + (0.0 if beta is None else np.float64(beta)))


@pytest.mark.parametrize(
  "strides, padding, dilation, groups",
  [
    ((1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 1), ((2, 0), (0, 1)), (2, 1), 2),
    ((1, 2), ((0, 0), (0, 0)), (1, 2), 3),
  ],
)
def test_conv_matches_numpy(strides, padding, dilation, groups):
  rng = _rng(1)
  c_in, c_out = 6, 6
  k = _randn(rng, 3, 2, c_in // groups, c_out, scale=0.5)
  scale = _randn(rng, c_out, loc=1.0)
  beta = _randn(rng, c_out)
  mean, var = _bn_state(rng, c_out)
  x = _randn(rng, 2, 9, 8, c_in)

  new_k, new_b = jn.fold_batch_norm(
    k, None, jn.NormParams(scale, beta), jn.BatchNormState(mean, var)
  )
  y = jax.lax.conv_general_dilated(
    x,
    new_k,
    strides,
    padding,
    rhs_dilation=dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
    precision=jax.lax.Precision.HIGHEST,
  )
  y = y + new_b
  conv = np_conv(x, k, strides, padding, dilation, groups)
  _close(y, np_bn_eval(conv, scale, beta, mean, var, 1e-5))


def test_contract_with_batch_norm_and_torch_state():
  """``x @ k' + b'`` equals ``jn.batch_norm`` in evaluation, and a
  TorchBatchNormState (its variance used as it is) folds the same way."""
  rng = _rng(2)
  k, b = _randn(rng, 3, 5), _randn(rng, 5)
  params = jn.NormParams(_randn(rng, 5, loc=1.0), _randn(rng, 5))
  mean, var = _bn_state(rng, 5)
  x = _randn(rng, 4, 3)
  y, _ = jn.batch_norm(
    x @ k + b, params, jn.BatchNormState(mean, var), use_running_average=True
  )
  torch_state = jn.TorchBatchNormState(mean, var, jnp.asarray(7, jnp.int32))
  new_k, new_b = jn.fold_batch_norm(k, b, params, torch_state)
  _close(x @ new_k + new_b, np.asarray(y))


def test_jit_with_traced_epsilon():
  rng = _rng(3)
  k, b = _randn(rng, 4, 3), _randn(rng, 3)
  params = jn.NormParams(_randn(rng, 3, loc=1.0), _randn(rng, 3))
  mean, var = _bn_state(rng, 3)
  state = jn.BatchNormState(mean, var)

  @jax.jit
  def f(k, b, params, state, eps):
    return jn.fold_batch_norm(k, b, params, state, epsilon=eps)

  new_k, new_b = f(k, b, params, state, jnp.float32(0.1))
  x = _randn(rng, 6, 4)
  expected = np_bn_eval(np.float64(x) @ k + b, *params, mean, var, 0.1)
  _close(np.float64(x) @ np.float64(new_k) + new_b, expected)


def test_dtypes():
  rng = _rng(4)
  k = _randn(rng, 4, 3)
  params = jn.NormParams(_randn(rng, 3, loc=1.0), _randn(rng, 3))
  mean, var = _bn_state(rng, 3)
  state = jn.BatchNormState(mean, var)
  s = np.float64(params.scale) / np.sqrt(np.float64(var) + 1e-5)

  # bfloat16 layer: folded in float32, rounded once to bfloat16.
  kb = jnp.asarray(k, jnp.bfloat16)
  new_k, new_b = jn.fold_batch_norm(kb, None, params, state)
  assert new_k.dtype == jnp.bfloat16 and new_b.dtype == jnp.bfloat16
  expected = np.float64(kb.astype(jnp.float32)) * s
  np.testing.assert_allclose(np.float64(new_k.astype(jnp.float32)), expected, rtol=8e-3)
  # A float32 bias keeps its dtype.
  _, new_b = jn.fold_batch_norm(kb, jnp.zeros(3, jnp.float32), params, state)
  assert new_b.dtype == jnp.float32

  # float64 throughout with x64: float64 accuracy, not float32's.
  with jax.enable_x64(True):
    k64 = jnp.asarray(np.float64(k))
    params64 = jax.tree.map(lambda v: jnp.asarray(np.float64(v)), params)
    state64 = jn.BatchNormState(
      jnp.asarray(np.float64(mean)), jnp.asarray(np.float64(var))
    )
    new_k, new_b = jn.fold_batch_norm(k64, None, params64, state64)
    assert new_k.dtype == jnp.float64 and new_b.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(new_k), np.float64(k) * s, rtol=1e-13)
    np.testing.assert_allclose(
      np.asarray(new_b), -np.float64(mean) * s + np.float64(params.bias), rtol=1e-12
    )


def _good():
  k = np.ones((4, 3), np.float32)
  params = jn.NormParams(np.ones(3, np.float32), np.zeros(3, np.float32))
  state = jn.BatchNormState(np.zeros(3, np.float32), np.ones(3, np.float32))
  return k, np.zeros(3, np.float32), params, state


@pytest.mark.parametrize(
  "change, exc, pattern",
  [
    ({"bias": np.zeros(5, np.float32)}, ValueError, r"`kernel` has 3 .* `bias` has 5"),
    (
      {"params": jn.NormParams(np.ones(4, np.float32), None)},
      ValueError,
      r"`kernel` has 3 .* `params.scale` has 4",
    ),
    (
      {"params": jn.NormParams(None, np.ones(2, np.float32))},
      ValueError,
      r"`params.bias` has 2",
    ),
    (
      {"state": jn.BatchNormState(np.zeros(3, np.float32), np.ones(6, np.float32))},
      ValueError,
      r"`kernel` has 3 .* `state.var` has 6",
    ),
    (
      {"state": jn.BatchNormState(np.zeros((1, 3), np.float32), np.ones(3))},
      ValueError,
      r"`state.mean` must have shape \(3,\).*\(1, 3\)",
    ),
    (
      {"kernel": np.ones((4, 3), np.int32)},
      TypeError,
      r"`kernel` must be a real float",
    ),
    ({"kernel": np.ones((4, 3), np.complex64)}, TypeError, r"`kernel` must be a real"),
    ({"kernel": np.float32(1.0)}, ValueError, r"`kernel` must have at least one axis"),
    ({"kernel": None}, TypeError, r"`kernel` must be an array"),
    ({"bias": np.zeros(3, np.int32)}, TypeError, r"`bias` must be a real float"),
    (
      {"state": jn.BatchNormState(None, np.ones(3, np.float32))},
      TypeError,
      r"`state.mean` must be an array",
    ),
    ({"params": {"scale": None, "bias": None}}, TypeError, r"`params` must be .*linen"),
    ({"state": (np.zeros(3), np.ones(3))}, TypeError, r"`state` must have `mean`"),
    ({"epsilon": -1e-3}, ValueError, r"`epsilon` must be finite and >= 0"),
    ({"epsilon": float("nan")}, ValueError, r"`epsilon` must be finite"),
    ({"epsilon": jnp.inf}, ValueError, r"`epsilon` must be finite"),
    ({"epsilon": "1e-5"}, TypeError, r"`epsilon` must be a number"),
  ],
)
def test_errors(change, exc, pattern):
  k, b, params, state = _good()
  args = {"kernel": k, "bias": b, "params": params, "state": state, "epsilon": 1e-5}
  args.update(change)
  eps = args.pop("epsilon")
  with pytest.raises(exc, match=pattern):
    jn.fold_batch_norm(*args.values(), epsilon=eps)


def test_errors_under_jit():
  """Shape errors are raised at trace time, under jit too."""
  k, _, params, state = _good()
  with pytest.raises(ValueError, match=r"`bias` has 2"):
    jax.jit(jn.fold_batch_norm)(k, jnp.zeros(2), params, state)


# ----------------------------------------------------------------------------
# linen
# ----------------------------------------------------------------------------


def _trained_linen_bn(bn_train, x_fn, rng):
  """Variables of ``bn_train`` after a few training steps on shifted data."""
  key = jax.random.key(int(rng.integers(1 << 30)))
  variables = bn_train.init(key, x_fn())
  params = jax.tree.map(
    lambda v: v + _randn(rng, *v.shape, scale=0.5), variables.get("params", {})
  )
  variables = {**variables, "params": params} if params else dict(variables)
  for _ in range(3):
    _, updates = bn_train.apply(variables, x_fn(), mutable=["batch_stats"])
    variables = {**variables, **updates}
  return variables


@pytest.mark.parametrize(
  "layer_cls, layer_kwargs, bn_module, bn_kwargs, x_shape",
  [
    (nn.Dense, {"features": 5}, nn.BatchNorm, {}, (6, 4)),
    (
      nn.Dense,
      {"features": 5, "use_bias": False},
      jnl.BatchNorm,
      {"use_scale": False},
      (6, 4),
    ),
    (
      nn.Conv,
      {
        "features": 6,
        "kernel_size": (3, 3),
        "strides": 2,
        "feature_group_count": 2,
        "use_bias": False,
      },
      nn.BatchNorm,
      {"epsilon": 1e-3, "use_bias": False},
      (2, 7, 7, 4),
    ),
    (
      nn.Conv,
      {"features": 4, "kernel_size": (2, 3), "padding": "VALID", "kernel_dilation": 2},
      jnl.BatchNorm,
      {"use_scale": False, "use_bias": False},
      (2, 8, 9, 3),
    ),
  ],
)
def test_linen_against_flax(layer_cls, layer_kwargs, bn_module, bn_kwargs, x_shape):
  rng = _rng(5)
  layer = layer_cls(**layer_kwargs)
  x = _randn(rng, *x_shape)
  layer_vars = layer.init(jax.random.key(0), x)
  # A bias far from its zero initialization.
  layer_vars = jax.tree.map(lambda v: v + _randn(rng, *v.shape), layer_vars)

  def layer_out():
    return layer.apply(layer_vars, _randn(rng, *x_shape, loc=1.0, scale=2.0)) + 0.7

  bn_vars = _trained_linen_bn(
    bn_module(use_running_average=False, momentum=0.5, **bn_kwargs), layer_out, rng
  )
  stats = bn_vars["batch_stats"]
  assert float(jnp.max(jnp.abs(stats["mean"]))) > 0.3  # non-trivial statistics
  assert float(jnp.max(jnp.abs(stats["var"] - 1.0))) > 0.3

  eps = bn_kwargs.get("epsilon", 1e-5)
  folded = jnl.fold_batch_norm(layer_vars, bn_vars, epsilon=eps)
  assert set(folded) == {"params"} and set(folded["params"]) == {"kernel", "bias"}
  folded_layer = layer_cls(**{**layer_kwargs, "use_bias": True})
  # flax's own BatchNorm in evaluation is the reference, whichever trained it.
  reference_bn = nn.BatchNorm(use_running_average=True, **bn_kwargs)
  y_ref = reference_bn.apply(bn_vars, layer.apply(layer_vars, x))
  _close(folded_layer.apply(folded, x), y_ref, tol=5e-5)


def test_linen_folds_a_torch_statistics_batch_norm():
  # Its batch_stats also hold num_batches_tracked, which plays no part in the
  # fold; it was refused as an unexpected entry.
  rng = _rng(7)
  dense = nn.Dense(4)
  x = _randn(rng, 6, 5)
  dense_vars = dense.init(jax.random.key(0), x)
  bn = jnl.BatchNorm(use_running_average=False, running_stats="torch", momentum=0.3)
  bn_vars = _trained_linen_bn(
    bn, lambda: dense.apply(dense_vars, _randn(rng, 6, 5, loc=1.0, scale=2.0)), rng
  )
  assert int(bn_vars["batch_stats"]["num_batches_tracked"]) == 3
  folded = jnl.fold_batch_norm(dense_vars, bn_vars, epsilon=1e-5)
  p, s = bn_vars["params"], bn_vars["batch_stats"]
  k, b = (np.float64(dense_vars["params"][n]) for n in ("kernel", "bias"))
  y_ref = np_bn_eval(
    np.float64(x) @ k + b, p["scale"], p["bias"], s["mean"], s["var"], 1e-5
  )
  _close(dense.apply(folded, x), y_ref)


def test_linen_keeps_boxed_metadata():
  layer = nn.Dense(
    3, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
  )
  x = jnp.ones((2, 4))
  layer_vars = layer.init(jax.random.key(0), x)
  bn_vars = {"batch_stats": {"mean": jnp.arange(3.0), "var": jnp.full(3, 4.0)}}
  folded = jnl.fold_batch_norm(layer_vars, bn_vars)
  assert isinstance(folded["params"]["kernel"], nn.Partitioned)
  assert folded["params"]["kernel"].names == (None, "model")
  kernel = nn.unbox(layer_vars["params"]["kernel"])
  expected = (np.float64(x) @ np.float64(kernel) - np.arange(3.0)) / np.sqrt(4.0 + 1e-5)
  _close(nn.Dense(3).apply(nn.unbox(folded), x), expected)


@pytest.mark.parametrize(
  "layer_vars, bn_vars, exc, pattern",
  [
    ({}, None, ValueError, r'`layer_variables` has no "params" collection'),
    (
      {"params": {"bias": jnp.zeros(3)}},
      None,
      ValueError,
      r'\["params"\]` has no "kernel"',
    ),
    (
      {"params": {"kernel": jnp.ones((2, 3)), "scale": jnp.ones(3)}},
      None,
      ValueError,
      r"unexpected entries \['scale'\]",
    ),
    (
      None,
      {"params": {"scale": jnp.ones(3)}},
      ValueError,
      r'`bn_variables` has no "batch_stats"',
    ),
    (
      None,
      {"batch_stats": {"mean": jnp.zeros(3)}},
      ValueError,
      r'\["batch_stats"\]` has no "var"',
    ),
    ([1], None, TypeError, r"`layer_variables` must be a mapping"),
    (
      None,
      {"batch_stats": {"mean": jnp.zeros(4), "var": jnp.ones(4)}},
      ValueError,
      r'`layer_variables\["params"\]\["kernel"\]` has 3 .* '
      r'`bn_variables\["batch_stats"\]\["mean"\]` has 4',
    ),
  ],
)
def test_linen_errors(layer_vars, bn_vars, exc, pattern):
  if layer_vars is None:
    layer_vars = {"params": {"kernel": jnp.ones((2, 3))}}
  if bn_vars is None:
    bn_vars = {"batch_stats": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
  with pytest.raises(exc, match=pattern):
    jnl.fold_batch_norm(layer_vars, bn_vars)


# ----------------------------------------------------------------------------
# nnx
# ----------------------------------------------------------------------------


def _train_nnx_bn(bn, layer, rng, x_shape):
  """A few training calls on shifted data, then evaluation mode."""
  if bn.scale is not None:
    bn.scale[...] = bn.scale[...] + _randn(rng, *bn.scale.shape, scale=0.5)
  if bn.bias is not None:
    bn.bias[...] = bn.bias[...] + _randn(rng, *bn.bias.shape)
  for _ in range(3):
    bn(
      layer(_randn(rng, *x_shape, loc=1.0, scale=2.0)) + 0.7, use_running_average=False
    )
  bn.eval()
  assert float(jnp.max(jnp.abs(bn.mean[...]))) > 0.3
  assert float(jnp.max(jnp.abs(bn.var[...] - 1.0))) > 0.3


@pytest.mark.parametrize("bn_cls", [jnx.BatchNorm, nnx.BatchNorm])
def test_nnx_conv(bn_cls):
  rng = _rng(6)
  rngs = nnx.Rngs(0)
  mask = (rng.random((3, 3, 2, 6)) < 0.8).astype(np.float32)
  conv = nnx.Conv(
    4,
    6,
    (3, 3),
    strides=(2, 1),
    padding=((1, 2), (0, 1)),
    kernel_dilation=(1, 2),
    feature_group_count=2,
    use_bias=False,
    mask=jnp.asarray(mask),
    rngs=rngs,
  )
  bn = bn_cls(6, momentum=0.5, epsilon=1e-3, axis=3, rngs=rngs)
  x_shape = (2, 9, 9, 4)
  _train_nnx_bn(bn, conv, rng, x_shape)
  kernel_before = np.asarray(conv.kernel[...]).copy()
  mean_before = np.asarray(bn.mean[...]).copy()

  folded = jnx.fold_batch_norm(conv, bn)
  assert type(folded) is nnx.Conv and folded.use_bias and folded.bias.shape == (6,)
  assert folded.strides == (2, 1) and folded.feature_group_count == 2
  x = _randn(rng, *x_shape)
  _close(folded(x), bn(conv(x)))
  # The inputs are untouched.
  assert conv.bias is None and not conv.use_bias
  np.testing.assert_array_equal(conv.kernel[...], kernel_before)
  np.testing.assert_array_equal(bn.mean[...], mean_before)


@pytest.mark.parametrize("bn_cls", [jnx.BatchNorm, nnx.BatchNorm])
def test_nnx_linear(bn_cls):
  rng = _rng(7)
  rngs = nnx.Rngs(1)
  linear = nnx.Linear(5, 3, rngs=rngs, bias_init=nnx.initializers.normal(1.0))
  bn = bn_cls(3, momentum=0.5, use_scale=False, rngs=rngs)
  _train_nnx_bn(bn, linear, rng, (8, 5))
  bias_before = np.asarray(linear.bias[...]).copy()
  folded = jnx.fold_batch_norm(linear, bn)
  assert type(folded) is nnx.Linear
  x = _randn(rng, 2, 4, 5)
  expected = np_bn_eval(
    np.float64(x) @ np.float64(linear.kernel[...]) + bias_before,
    None,
    np.asarray(bn.bias[...]),
    np.asarray(bn.mean[...]),
    np.asarray(bn.var[...]),
    1e-5,
  )
  _close(folded(x), expected)
  np.testing.assert_array_equal(linear.bias[...], bias_before)


def test_nnx_errors():
  rngs = nnx.Rngs(0)
  linear = nnx.Linear(4, 3, rngs=rngs)
  with pytest.raises(ValueError, match=r"`bn.axis`=0 is not the last axis"):
    jnx.fold_batch_norm(linear, jnx.BatchNorm(3, axis=0, rngs=rngs))
  with pytest.raises(ValueError, match=r"`bn.axis`=1 is not the last axis"):
    jnx.fold_batch_norm(linear, nnx.BatchNorm(3, axis=1, rngs=rngs))
  conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
  with pytest.raises(ValueError, match=r"`bn.axis`=2 is not the last axis"):
    jnx.fold_batch_norm(conv, jnx.BatchNorm(3, axis=2, rngs=rngs))
  with pytest.raises(
    ValueError, match=r"`layer` has 3 output features but `bn` normalizes 4"
  ):
    jnx.fold_batch_norm(linear, jnx.BatchNorm(4, rngs=rngs))
  lora = nnx.LoRALinear(4, 3, lora_rank=2, rngs=rngs)
  with pytest.raises(TypeError, match=r"`layer` must be .* got LoRALinear"):
    jnx.fold_batch_norm(lora, jnx.BatchNorm(3, rngs=rngs))
  with pytest.raises(TypeError, match=r"`bn` must be .* got LayerNorm"):
    jnx.fold_batch_norm(linear, nnx.LayerNorm(3, rngs=rngs))


# ----------------------------------------------------------------------------
# example
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_example_quick_run(tmp_path):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  proc = subprocess.run(
    [sys.executable, str(EXAMPLE), "--quick"],
    capture_output=True,
    text=True,
    timeout=180,
    env=env,
    cwd=tmp_path,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  (line,) = [s for s in out.splitlines() if "max |logit difference|" in s]
  assert line.startswith("folded 6 conv+BN pairs"), out
  diff = float(re.search(r"difference\| ([0-9.e+-]+)", line).group(1))
  assert diff <= 1e-4, line
  (acc,) = [s for s in out.splitlines() if s.startswith("test accuracy")]
  with_bn, folded = (float(v) for v in re.findall(r"([0-9.]+)%", acc))
  assert abs(with_bn - folded) < 1.0, acc  # same predictions but for ties
  assert "ms folded" in out, out
