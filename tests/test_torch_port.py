"""``from_torch_state_dict`` against PyTorch's own layers.

Every torch layer gets random, non-trivial affine parameters and running
statistics; its output (torch itself is the reference) is compared with the
jaxnorm function or the jaxnorm / flax linen module given the converted
values, in NCHW (``axis=1``) and NHWC (the input transposed).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxnorm as jn
import jaxnorm.linen as jnn

ATOL = RTOL = 1e-5
EPS = 1e-3  # not torch's default, so that a forgotten `epsilon` shows
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _torch_seed():
  torch.manual_seed(0)
  torch.set_num_threads(1)


def randomize(module: torch.nn.Module) -> torch.nn.Module:
  """Non-trivial weight, bias, running statistics and batch count."""
  with torch.no_grad():
    if getattr(module, "weight", None) is not None:
      module.weight.uniform_(0.5, 1.5)
    if getattr(module, "bias", None) is not None:
      module.bias.normal_(0.0, 0.5)
    if getattr(module, "running_mean", None) is not None:
      module.running_mean.normal_(0.0, 1.0)
      module.running_var.uniform_(0.3, 3.0)
      module.num_batches_tracked.fill_(7)
  return module


def torch_input(shape) -> torch.Tensor:
  return torch.randn(*shape) * 2.0 + 0.5


def run_torch(module: torch.nn.Module, x: torch.Tensor, training: bool) -> np.ndarray:
  module.train(training)
  with torch.no_grad():
    return module(x).numpy()


def to_nhwc(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(np.moveaxis(np.asarray(x), 1, -1))


def from_nhwc(y) -> np.ndarray:
  return np.moveaxis(np.asarray(y), -1, 1)


def assert_close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), expected, atol=ATOL, rtol=RTOL)


def check_params(params, module):
  """The converted parameters are torch's values, float32, None when absent."""
  for field, name in (("scale", "weight"), ("bias", "bias")):
    value, ref = getattr(params, field), getattr(module, name, None)
    if ref is None:
      assert value is None
    else:
      assert value.dtype == jnp.float32
      np.testing.assert_array_equal(
        np.asarray(value).reshape(ref.shape), ref.detach().numpy()
      )


# --- batch norm ---------------------------------------------------------------

# One channel count and few shapes throughout: each new shape costs a compile.
SHAPES = {2: (6, 4), 3: (2, 4, 6), 4: (2, 4, 5, 6), 5: (2, 4, 3, 4, 5)}
BN_CASES = [
  ("BatchNorm1d", SHAPES[2]),
  ("BatchNorm1d", SHAPES[3]),
  ("BatchNorm2d", SHAPES[4]),
  ("BatchNorm3d", SHAPES[5]),
  ("SyncBatchNorm", SHAPES[4]),
]
# (affine, bias, track_running_stats)
BN_CONFIGS = [(True, True, True), (True, False, True), (False, False, True)]


@pytest.mark.parametrize("kind,shape", BN_CASES)
@pytest.mark.parametrize("affine,bias,track", BN_CONFIGS)
def test_batch_norm_eval(kind, shape, affine, bias, track):
  c = shape[1]
  module = randomize(
    getattr(torch.nn, kind)(
      c, eps=EPS, affine=affine, bias=bias, track_running_stats=track
    )
  )
  x = torch_input(shape)
  expected = run_torch(module, x, training=False)
  sd = module.state_dict()

  params, state = jn.from_torch_state_dict(sd, kind, layout="NCHW")
  check_params(params, module)
  assert type(state) is jn.BatchNormState
  np.testing.assert_array_equal(state.mean, module.running_mean.numpy())
  np.testing.assert_array_equal(state.var, module.running_var.numpy())
  y, _ = jn.batch_norm(
    x.numpy(), params, state, use_running_average=True, axis=1, epsilon=EPS
  )
  assert_close(y, expected)

  params, state = jn.from_torch_state_dict(sd, module, layout="NHWC")
  y, _ = jn.batch_norm(to_nhwc(x), params, state, use_running_average=True, epsilon=EPS)
  assert_close(from_nhwc(y), expected)


@pytest.mark.parametrize("kind", ["BatchNorm1d", "BatchNorm2d"])
def test_batch_norm_without_running_stats_uses_batch_stats(kind):
  shape = SHAPES[2] if kind == "BatchNorm1d" else SHAPES[4]
  module = randomize(getattr(torch.nn, kind)(4, track_running_stats=False))
  x = torch_input(shape)
  expected = run_torch(module, x, training=False)  # batch statistics
  params, state = jn.from_torch_state_dict(module.state_dict(), kind)
  assert state is None
  check_params(params, module)
  y, _ = jn.batch_norm(
    to_nhwc(x), params, jn.batch_norm_init(4)[1], use_running_average=False
  )
  assert_close(from_nhwc(y), expected)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_torch_running_stats_continue_training_like_torch(layout):
  module = randomize(torch.nn.BatchNorm2d(4, momentum=0.2))
  params, state = jn.from_torch_state_dict(
    module.state_dict(), module, running_stats="torch", layout=layout
  )
  assert type(state) is jn.TorchBatchNormState
  assert state.num_batches_tracked.dtype == jnp.int32
  assert state.num_batches_tracked.shape == () and int(state.num_batches_tracked) == 7
  axis = 1 if layout == "NCHW" else -1
  for _ in range(2):
    x = torch_input(SHAPES[4])
    expected = run_torch(module, x, training=True)
    xj = x.numpy() if layout == "NCHW" else to_nhwc(x)
    y, state = jn.batch_norm(
      xj,
      params,
      state,
      use_running_average=False,
      axis=axis,
      momentum=0.2,
      running_stats="torch",
    )
    assert_close(y if layout == "NCHW" else from_nhwc(y), expected)
  assert_close(state.mean, module.running_mean.numpy())
  assert_close(state.var, module.running_var.numpy())  # unbiased, as torch's
  assert int(state.num_batches_tracked) == int(module.num_batches_tracked) == 9


# --- instance norm ------------------------------------------------------------

IN_CASES = [
  ("InstanceNorm1d", SHAPES[3]),
  ("InstanceNorm2d", SHAPES[4]),
  ("InstanceNorm3d", SHAPES[5]),
]


@pytest.mark.parametrize("kind,shape", IN_CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_instance_norm(kind, shape, affine, track):
  module = randomize(
    getattr(torch.nn, kind)(4, eps=EPS, affine=affine, track_running_stats=track)
  )
  x = torch_input(shape)
  sd = module.state_dict()
  p_nchw, state = jn.from_torch_state_dict(sd, kind, layout="NCHW")
  p_nhwc, state_nhwc = jn.from_torch_state_dict(sd, kind, layout="NHWC")
  check_params(p_nchw, module)
  assert (state is None) == (not track)

  # Training: per-sample statistics, with or without running statistics.
  expected = run_torch(module, x, training=True)
  assert_close(jn.instance_norm(x.numpy(), p_nchw, axis=1, epsilon=EPS), expected)
  y = jn.instance_norm(to_nhwc(x), p_nhwc, epsilon=EPS)
  assert_close(from_nhwc(y), expected)

  # Evaluation: the running statistics when tracked (batch norm in
  # evaluation, per channel), per-sample statistics otherwise. The training
  # call above moved torch's running statistics: convert them again.
  p_nchw, state = jn.from_torch_state_dict(module.state_dict(), kind, layout="NCHW")
  expected = run_torch(module, x, training=False)
  if track:
    y, _ = jn.batch_norm(
      x.numpy(), p_nchw, state, use_running_average=True, axis=1, epsilon=EPS
    )
    y_nhwc, _ = jn.batch_norm(
      to_nhwc(x), p_nchw, state, use_running_average=True, epsilon=EPS
    )
  else:
    y = jn.instance_norm(x.numpy(), p_nchw, axis=1, epsilon=EPS)
    y_nhwc = jn.instance_norm(to_nhwc(x), p_nchw, epsilon=EPS)
  assert_close(y, expected)
  assert_close(from_nhwc(y_nhwc), expected)


# --- layer norm, RMS norm, group norm ------------------------------------------


def run_torch_both(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
  """The output in evaluation, checked equal to the one in training.

  These layers have no running statistics, so both modes compute the same
  thing; one jaxnorm result is then compared with both.
  """
  expected = run_torch(module, x, training=False)
  np.testing.assert_array_equal(run_torch(module, x, training=True), expected)
  return expected


@pytest.mark.parametrize(
  "affine,bias", [(True, True), (True, False), (False, False)], ids=str
)
def test_layer_norm_last_axis(affine, bias):
  module = randomize(
    torch.nn.LayerNorm(6, eps=EPS, elementwise_affine=affine, bias=bias)
  )
  x = torch_input(SHAPES[3])
  expected = run_torch_both(module, x)
  params, state = jn.from_torch_state_dict(module.state_dict(), module)
  assert state is None
  check_params(params, module)
  assert_close(jn.layer_norm(x.numpy(), params, epsilon=EPS), expected)


def test_layer_norm_over_chw():
  module = randomize(torch.nn.LayerNorm((4, 5, 6), eps=EPS))
  x = torch_input(SHAPES[4])
  expected = run_torch_both(module, x)
  sd = module.state_dict()
  axes = dict(reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3), epsilon=EPS)

  params, _ = jn.from_torch_state_dict(sd, "LayerNorm", layout="NCHW")
  assert params.scale.shape == (4, 5, 6)
  assert_close(jn.layer_norm(x.numpy(), params, **axes), expected)

  params, _ = jn.from_torch_state_dict(sd, "LayerNorm", layout="NHWC")
  assert params.scale.shape == params.bias.shape == (5, 6, 4)
  np.testing.assert_array_equal(
    params.scale, module.weight.detach().numpy().transpose(1, 2, 0)
  )
  assert_close(from_nhwc(jn.layer_norm(to_nhwc(x), params, **axes)), expected)
  # The flax variables load into flax's LayerNorm with the same axes.
  variables = jn.from_torch_state_dict(sd, "LayerNorm", to="flax")
  y = nn.LayerNorm(**axes).apply(variables, to_nhwc(x))
  assert_close(from_nhwc(y), expected)


@pytest.mark.parametrize("eps", [None, EPS])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm(eps, affine):
  module = randomize(torch.nn.RMSNorm(6, eps=eps, elementwise_affine=affine))
  x = torch_input(SHAPES[3])
  expected = run_torch_both(module, x)
  params, state = jn.from_torch_state_dict(module.state_dict(), module)
  assert state is None and params.bias is None
  check_params(params, module)
  # torch's eps=None is the machine epsilon of the input's dtype.
  epsilon = np.finfo(np.float32).eps if eps is None else eps
  assert_close(jn.rms_norm(x.numpy(), params, epsilon=epsilon), expected)


def test_rms_norm_over_chw_nhwc():
  module = randomize(torch.nn.RMSNorm((4, 5, 6), eps=EPS))
  x = torch_input(SHAPES[4])
  expected = run_torch_both(module, x)
  params, _ = jn.from_torch_state_dict(module.state_dict(), "RMSNorm")
  assert params.scale.shape == (5, 6, 4)
  y = jn.rms_norm(
    to_nhwc(x), params, reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3), epsilon=EPS
  )
  assert_close(from_nhwc(y), expected)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_group_norm(rank, affine, bias):
  module = randomize(torch.nn.GroupNorm(2, 4, eps=EPS, affine=affine, bias=bias))
  x = torch_input(SHAPES[rank])
  expected = run_torch_both(module, x)
  params, state = jn.from_torch_state_dict(module.state_dict(), "GroupNorm")
  assert state is None
  check_params(params, module)
  y = jn.group_norm(x.numpy(), params, num_groups=2, axis=1, epsilon=EPS)
  assert_close(y, expected)
  y = jn.group_norm(to_nhwc(x), params, num_groups=2, epsilon=EPS)
  assert_close(from_nhwc(y), expected)


# --- flax variables -------------------------------------------------------------


@pytest.mark.parametrize("module_cls", [jnn.BatchNorm, nn.BatchNorm])
@pytest.mark.parametrize("affine", [True, False])
def test_flax_variables_load_into_batch_norm(module_cls, affine):
  module = randomize(torch.nn.BatchNorm2d(4, eps=EPS, affine=affine))
  x = torch_input(SHAPES[4])
  expected = run_torch(module, x, training=False)
  sd = {f"features.1.{k}": v for k, v in module.state_dict().items()}
  sd["features.0.weight"] = torch.ones(4, 3, 3, 3)  # another layer: ignored
  variables = jn.from_torch_state_dict(
    sd, "BatchNorm2d", prefix="features.1", to="flax"
  )
  assert set(variables) == ({"params", "batch_stats"} if affine else {"batch_stats"})
  assert set(variables["batch_stats"]) == {"mean", "var"}
  if affine:
    assert set(variables["params"]) == {"scale", "bias"}
  kw = dict(use_running_average=True, epsilon=EPS, use_scale=affine, use_bias=affine)
  y = module_cls(**kw).apply(variables, to_nhwc(x))
  assert_close(from_nhwc(y), expected)
  y = module_cls(axis=1, **kw).apply(variables, x.numpy())
  assert_close(y, expected)


def test_flax_variables_torch_running_stats_train_in_linen():
  module = randomize(torch.nn.BatchNorm2d(4, eps=EPS, momentum=None))
  variables = jn.from_torch_state_dict(
    module.state_dict(), module, running_stats="torch", to="flax"
  )
  count = variables["batch_stats"]["num_batches_tracked"]
  assert count.dtype == jnp.int32 and count.shape == () and int(count) == 7
  x = torch_input(SHAPES[4])
  expected = run_torch(module, x, training=True)
  bn = jnn.BatchNorm(momentum=None, running_stats="torch", epsilon=EPS)
  y, updates = bn.apply(
    variables, to_nhwc(x), use_running_average=False, mutable=["batch_stats"]
  )
  assert_close(from_nhwc(y), expected)
  stats = updates["batch_stats"]
  assert_close(stats["mean"], module.running_mean.numpy())
  assert_close(stats["var"], module.running_var.numpy())
  assert int(stats["num_batches_tracked"]) == 8


def test_flax_variables_instance_norm_with_running_stats_is_batch_norm():
  module = randomize(torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
  x = torch_input(SHAPES[4])
  expected = run_torch(module, x, training=False)
  variables = jn.from_torch_state_dict(module.state_dict(), module, to="flax")
  y = jnn.BatchNorm(use_running_average=True).apply(variables, to_nhwc(x))
  assert_close(from_nhwc(y), expected)


@pytest.mark.parametrize("flax_lib", [jnn, nn], ids=["jaxnorm", "flax"])
def test_flax_variables_load_into_feature_norms(flax_lib):
  x = torch_input(SHAPES[4])
  xj = to_nhwc(x)
  cases = [
    (torch.nn.GroupNorm(2, 4, eps=EPS), flax_lib.GroupNorm(num_groups=2, epsilon=EPS)),
    (
      torch.nn.InstanceNorm2d(4, eps=EPS, affine=True),
      flax_lib.InstanceNorm(epsilon=EPS),
    ),
    (torch.nn.LayerNorm(6, eps=EPS), flax_lib.LayerNorm(epsilon=EPS)),
    (torch.nn.RMSNorm(6, eps=EPS), flax_lib.RMSNorm(epsilon=EPS)),
  ]
  for module, flax_module in cases:
    randomize(module)
    expected = run_torch(module, x, training=False)
    variables = jn.from_torch_state_dict(module.state_dict(), module, to="flax")
    assert list(variables) == ["params"]
    if isinstance(module, torch.nn.LayerNorm | torch.nn.RMSNorm):
      # Normalizes the last (W) axis: no transposition of the input.
      y = flax_module.apply(variables, x.numpy())
    else:
      y = from_nhwc(flax_module.apply(variables, xj))
    assert_close(y, expected)


# --- values, prefixes ----------------------------------------------------------


def test_values_numpy_float64_bfloat16_become_float32():
  w = np.array([1.0, 2.0, 3.0])
  for value, ref in (
    (w, w),
    (torch.tensor(w, dtype=torch.float64), w),
    (torch.tensor(w, dtype=torch.bfloat16, requires_grad=True), w),
    (np.float16(w), w),
  ):
    params, state = jn.from_torch_state_dict({"weight": value}, "GroupNorm")
    assert params.scale.dtype == jnp.float32 and params.bias is None
    np.testing.assert_array_equal(params.scale, ref)


def test_prefix_selects_one_layer_only():
  sd = {
    "bn1.weight": np.ones(2),
    "bn1.bias": np.zeros(2),
    "bn10.weight": np.full(3, 2.0),
    "bn10.bias": np.zeros(3),
  }
  params, _ = jn.from_torch_state_dict(sd, "BatchNorm1d", prefix="bn1")
  assert params.scale.shape == (2,)
  params, _ = jn.from_torch_state_dict(sd, "BatchNorm1d", prefix="bn10.")
  assert params.scale.shape == (3,)


def test_old_checkpoint_without_num_batches_tracked():
  sd = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
  _, state = jn.from_torch_state_dict(sd, "BatchNorm2d")
  assert type(state) is jn.BatchNormState
  with pytest.raises(ValueError, match=r"missing entries \['num_batches_tracked'\]"):
    jn.from_torch_state_dict(sd, "BatchNorm2d", running_stats="torch")


# --- errors -----------------------------------------------------------------------


def test_error_lists_unknown_and_missing_entries():
  sd = {
    "bn1.weight": np.ones(3),
    "bn1.bias": np.zeros(3),
    "bn1.foo": np.ones(3),
    "bn1.running_mean": np.zeros(3),
    "conv.weight": np.ones((3, 3)),
  }
  with pytest.raises(
    ValueError,
    match=r"unknown entries \['bn1.foo'\]; missing entries \['bn1.running_var'\]",
  ):
    jn.from_torch_state_dict(sd, "BatchNorm2d", prefix="bn1")


@pytest.mark.parametrize(
  "kind,sd,message",
  [
    ("LayerNorm", {"bias": np.zeros(3)}, r"missing entries \['weight'\]"),
    (
      "RMSNorm",
      {"weight": np.ones(3), "bias": np.ones(3)},
      r"unknown entries \['bias'\]",
    ),
    (
      "GroupNorm",
      {"weight": np.ones(3), "running_mean": np.ones(3)},
      r"unknown entries \['running_mean'\]",
    ),
    (
      "InstanceNorm2d",
      {"num_batches_tracked": np.array(3)},
      r"missing entries \['running_mean', 'running_var'\]",
    ),
  ],
)
def test_error_inconsistent_entries(kind, sd, message):
  with pytest.raises(ValueError, match=message):
    jn.from_torch_state_dict(sd, kind)


def test_error_module_instance_checks_exact_entries():
  module = torch.nn.BatchNorm2d(3)  # affine: weight and bias expected
  sd = {k: v for k, v in module.state_dict().items() if k not in ("weight", "bias")}
  with pytest.raises(ValueError, match=r"missing entries \['weight', 'bias'\]"):
    jn.from_torch_state_dict(sd, module)
  module = torch.nn.LayerNorm(3, bias=False)
  with pytest.raises(ValueError, match=r"unknown entries \['bias'\]"):
    jn.from_torch_state_dict({"weight": np.ones(3), "bias": np.ones(3)}, module)


def test_error_arguments():
  sd = {"bn.weight": np.ones(3), "bn.bias": np.zeros(3)}
  with pytest.raises(ValueError, match="`layer`='Dropout' is not a supported"):
    jn.from_torch_state_dict(sd, "Dropout", prefix="bn")
  with pytest.raises(ValueError, match="`layer` of type Linear"):
    jn.from_torch_state_dict(sd, torch.nn.Linear(3, 3), prefix="bn")
  with pytest.raises(ValueError, match='`layout` must be "NCHW" or "NHWC"'):
    jn.from_torch_state_dict(sd, "BatchNorm2d", prefix="bn", layout="NWHC")
  with pytest.raises(ValueError, match="`running_stats`"):
    jn.from_torch_state_dict(sd, "BatchNorm2d", prefix="bn", running_stats="jax")
  with pytest.raises(ValueError, match="`to`"):
    jn.from_torch_state_dict(sd, "BatchNorm2d", prefix="bn", to="haiku")
  with pytest.raises(ValueError, match=r"no entries under `prefix`='bn1\.'"):
    jn.from_torch_state_dict(sd, "BatchNorm2d", prefix="bn1")
  with pytest.raises(TypeError, match="`state_dict` must be a mapping"):
    jn.from_torch_state_dict(list(sd.items()), "BatchNorm2d")
  with pytest.raises(ValueError, match="different shapes"):
    jn.from_torch_state_dict({"weight": np.ones(3), "bias": np.ones(4)}, "GroupNorm")
  with pytest.raises(ValueError, match=r"must have shape \(C,\)"):
    jn.from_torch_state_dict({"weight": np.ones((3, 2))}, "BatchNorm2d")
  with pytest.raises(TypeError, match=r"`state_dict\['weight'\]` must hold real"):
    jn.from_torch_state_dict({"weight": np.array(["a", "b"])}, "GroupNorm")
  bad_count = {"running_mean": np.zeros(2), "running_var": np.ones(2)}
  bad_count["num_batches_tracked"] = np.array([1, 2])
  with pytest.raises(ValueError, match="must be an integer scalar"):
    jn.from_torch_state_dict(bad_count, "BatchNorm2d", running_stats="torch")


# --- no torch at import; the example ---------------------------------------------


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.mark.slow
def test_numpy_checkpoint_does_not_import_torch():
  code = (
    "import sys, numpy as np, jaxnorm as jn\n"
    "p, s = jn.from_torch_state_dict({'weight': np.ones(2), 'running_mean': "
    "np.zeros(2), 'running_var': np.ones(2)}, 'BatchNorm2d')\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
    "print(s.var)\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code],
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert "[1. 1.]" in result.stdout


@pytest.mark.slow
def test_resnet_example_quick():
  result = subprocess.run(
    [
      sys.executable,
      str(ROOT / "examples" / "port_torchvision_resnet18.py"),
      "--quick",
      "--batch",
      "2",
      "--repeats",
      "2",
    ],
    env=_env(),
    capture_output=True,
    text=True,
    timeout=180,
    cwd=ROOT,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  line = next(s for s in result.stdout.splitlines() if "max |logits diff|" in s)
  diff = float(line.split(":")[1].split()[0])
  assert diff <= 1e-4, line
  assert "torch eval forward" in result.stdout
  assert "jitted JAX forward" in result.stdout
