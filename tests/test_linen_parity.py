"""jaxnorm.linen against flax.linen where a bug bash found them apart.

Dtypes of the weight wrappers (SpectralNorm, WeightNorm) across float32,
bfloat16 and float16 kernels, ``param_dtype`` and ``dtype``; and the
exception type for ``batch_stats`` made for another number of features.
Every expectation is flax's own layer's behaviour.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import errors as flax_errors

import jaxnorm.linen as jnn

HALF_AND_FULL = (jnp.float32, jnp.bfloat16, jnp.float16)


def _dtypes(tree):
  return jax.tree.map(lambda a: jnp.dtype(a.dtype).name, tree)


def _name(dtype):
  return "None" if dtype is None else jnp.dtype(dtype).name


def _x(shape, dtype):
  return jax.random.normal(jax.random.key(1), shape).astype(dtype)


def _run_spectral(module, x):
  """init, an evaluation call and an updating call, as flax's users do."""
  variables = module.init(jax.random.key(0), x, update_stats=False)
  y = module.apply(variables, x, update_stats=False)
  y_up, updates = module.apply(variables, x, update_stats=True, mutable=["batch_stats"])
  return variables, y, y_up, updates


# --- SpectralNorm -------------------------------------------------------------


@pytest.mark.parametrize(
  "kernel_dtype,param_dtype,dtype",
  list(itertools.product(HALF_AND_FULL, HALF_AND_FULL, (None, jnp.bfloat16))),
  ids=lambda d: _name(d),
)
def test_spectral_norm_dtypes_match_flax(kernel_dtype, param_dtype, dtype):
  x = _x((3, 5), jnp.bfloat16)
  runs = [
    _run_spectral(
      mod.SpectralNorm(
        nn.Dense(4, param_dtype=kernel_dtype), param_dtype=param_dtype, dtype=dtype
      ),
      x,
    )
    for mod in (nn, jnn)
  ]
  (f_vars, f_y, f_y_up, f_up), (j_vars, j_y, j_y_up, j_up) = runs
  # The stored wrapped kernel takes the dtype of the normalized one (float32
  # for a bfloat16 kernel and float32 ``u``), as in flax.
  assert _dtypes(j_vars) == _dtypes(f_vars)
  assert jax.tree.map(jnp.shape, j_vars) == jax.tree.map(jnp.shape, f_vars)
  assert j_y.dtype == f_y.dtype
  assert j_y_up.dtype == f_y_up.dtype
  # flax writes ``u`` and ``sigma`` back in the promoted dtype; jaxnorm keeps
  # the dtype that flax's own init gives them.
  assert _dtypes(j_up["batch_stats"]) == _dtypes(f_vars["batch_stats"])
  # Tight where flax normalizes in float32; half precision rounds otherwise.
  normalized = f_vars["params"]["layer_instance"]["kernel"].dtype
  tol = 1e-6 if normalized == jnp.float32 else 2e-2
  np.testing.assert_allclose(
    np.asarray(j_y, np.float32), np.asarray(f_y, np.float32), rtol=tol, atol=tol
  )


@pytest.mark.parametrize("param_dtype", HALF_AND_FULL, ids=_name)
def test_spectral_norm_bf16_conv_kernel_matches_flax(param_dtype):
  x = _x((2, 6, 6, 3), jnp.bfloat16)
  runs = [
    _run_spectral(
      mod.SpectralNorm(
        nn.Conv(4, (3, 3), param_dtype=jnp.bfloat16), param_dtype=param_dtype
      ),
      x,
    )
    for mod in (nn, jnn)
  ]
  (f_vars, f_y, f_y_up, _), (j_vars, j_y, j_y_up, _) = runs
  assert _dtypes(j_vars) == _dtypes(f_vars)
  assert (j_y.dtype, j_y_up.dtype) == (f_y.dtype, f_y_up.dtype)
  # The power iteration runs in the promoted dtype, as flax's does.
  normalized = f_vars["params"]["layer_instance"]["kernel"].dtype
  tol = 1e-5 if normalized == jnp.float32 else 2e-2
  np.testing.assert_allclose(
    np.asarray(j_y, np.float32), np.asarray(f_y, np.float32), rtol=tol, atol=tol
  )


def test_spectral_norm_runs_flax_checkpoint_of_bf16_kernel():
  """A flax checkpoint (float32 stored kernel) gives flax's output dtype."""
  x = _x((3, 5), jnp.bfloat16)
  flax_model = nn.SpectralNorm(nn.Dense(4, param_dtype=jnp.bfloat16))
  variables = flax_model.init(jax.random.key(0), x, update_stats=False)
  want = flax_model.apply(variables, x, update_stats=False)
  got = jnn.SpectralNorm(nn.Dense(4, param_dtype=jnp.bfloat16)).apply(
    variables, x, update_stats=False
  )
  assert got.dtype == want.dtype
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# --- WeightNorm ---------------------------------------------------------------


@pytest.mark.parametrize(
  "kernel_dtype,param_dtype,dtype",
  list(itertools.product(HALF_AND_FULL, HALF_AND_FULL, (None, jnp.bfloat16))),
  ids=lambda d: _name(d),
)
def test_weight_norm_dtypes_match_flax(kernel_dtype, param_dtype, dtype):
  x = _x((3, 5), jnp.bfloat16)
  out = []
  for mod in (nn, jnn):
    module = mod.WeightNorm(
      nn.Dense(4, param_dtype=kernel_dtype), param_dtype=param_dtype, dtype=dtype
    )
    variables = module.init(jax.random.key(0), x)
    out.append((variables, module.apply(variables, x)))
  (f_vars, f_y), (j_vars, j_y) = out
  assert _dtypes(j_vars) == _dtypes(f_vars)
  assert jax.tree.map(jnp.shape, j_vars) == jax.tree.map(jnp.shape, f_vars)
  assert j_y.dtype == f_y.dtype


# --- batch_stats of another number of features --------------------------------


def _apply_wrong_features(module, use_running_average):
  variables = module.init(jax.random.key(0), jnp.ones((4, 6)), False)
  module.apply(
    variables, jnp.ones((4, 5)), use_running_average, mutable=["batch_stats"]
  )


@pytest.mark.parametrize("use_running_average", [False, True])
def test_batch_norm_wrong_features_raises_type_error_like_flax(use_running_average):
  with pytest.raises(TypeError):
    _apply_wrong_features(nn.BatchNorm(), use_running_average)
  with pytest.raises(TypeError, match=r"batch_stats/mean.*\(6,\).*\(5,\)"):
    _apply_wrong_features(jnn.BatchNorm(), use_running_average)


# jaxnorm's other layers with ``batch_stats`` follow flax's BatchNorm.
RUNNING_STATS_LAYERS = {
  "BatchNorm_torch": lambda: jnn.BatchNorm(running_stats="torch"),
  "SwitchableNorm": jnn.SwitchableNorm,
  "BatchRenorm": jnn.BatchRenorm,
  "MovingAverageBatchNorm": jnn.MovingAverageBatchNorm,
  "EvoNormB0": jnn.EvoNormB0,
  "FrozenBatchNorm": jnn.FrozenBatchNorm,
}


@pytest.mark.parametrize("use_running_average", [False, True])
@pytest.mark.parametrize("name", sorted(RUNNING_STATS_LAYERS))
def test_running_stats_layers_wrong_features_raise_type_error(
  name, use_running_average
):
  with pytest.raises(TypeError):
    _apply_wrong_features(nn.BatchNorm(), use_running_average)
  with pytest.raises(TypeError, match=r"batch_stats/.*\(6,\).*\(5,\)"):
    _apply_wrong_features(RUNNING_STATS_LAYERS[name](), use_running_average)


def test_batch_norm_nchw_wrong_channels_raises_type_error_like_flax():
  def run(mod, use_running_average):
    bn = mod.BatchNorm(axis=1)
    variables = bn.init(jax.random.key(0), jnp.ones((2, 6, 3, 3)), False)
    bn.apply(
      variables, jnp.ones((2, 5, 3, 3)), use_running_average, mutable=["batch_stats"]
    )

  for use_running_average in (False, True):
    with pytest.raises(TypeError):
      run(nn, use_running_average)
    with pytest.raises(TypeError, match="batch_stats/mean"):
      run(jnn, use_running_average)


@pytest.mark.parametrize("use_running_average", [False, True])
def test_batch_norm_only_params_mismatch_raises_scope_param_shape_error(
  use_running_average,
):
  """Statistics that fit and params that do not: flax's ScopeParamShapeError."""

  def run(mod):
    bn = mod.BatchNorm()
    variables = bn.init(jax.random.key(0), jnp.ones((4, 6)), False)
    stats = {"mean": jnp.zeros((5,)), "var": jnp.ones((5,))}
    variables = {"params": variables["params"], "batch_stats": stats}
    bn.apply(variables, jnp.ones((4, 5)), use_running_average, mutable=["batch_stats"])

  for mod in (nn, jnn):
    with pytest.raises(flax_errors.ScopeParamShapeError):
      run(mod)
