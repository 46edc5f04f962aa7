"""Every bad input of SPEC §3 rule 11 raises at trace time, naming the argument.

Each case runs under ``jax.eval_shape`` on abstract inputs: the error must come
from the static checks, before any computation is staged.
"""

import jax
import jax.numpy as jnp
import pytest

import jaxnorm as jn

X = jax.ShapeDtypeStruct((4, 5, 5, 8), jnp.float32)  # NHWC, C = 8
P8 = jn.NormParams(jnp.ones(8), jnp.zeros(8))
S8 = jn.BatchNormState(jnp.zeros(8), jnp.ones(8))


def _raises(exc, match, f, *args):
  with pytest.raises(exc, match=match):
    jax.eval_shape(f, *args)


def bn(x, params=P8, state=S8, **kw):
  kw.setdefault("use_running_average", False)
  return jn.batch_norm(x, params, state, **kw)


# ----------------------------------------------------------------------------
# parameter and state shapes that do not match x
# ----------------------------------------------------------------------------

P3 = jn.NormParams(jnp.ones(3), jnp.zeros(3))
BAD_PARAMS = {
  "batch_norm": lambda x: bn(x, params=P3),
  "batch_norm_eval": lambda x: bn(x, params=P3, use_running_average=True),
  "layer_norm": lambda x: jn.layer_norm(x, P3),
  "rms_norm": lambda x: jn.rms_norm(x, jn.NormParams(jnp.ones(3), None)),
  "group_norm": lambda x: jn.group_norm(x, P3, num_groups=2),
  "instance_norm": lambda x: jn.instance_norm(x, P3),
  # params fit NHWC, but the layer is told the input is NCHW
  "group_norm_nchw": lambda x: jn.group_norm(x, P8, num_groups=1, axis=1),
  "batch_norm_nchw": lambda x: bn(x, axis=1),
}


@pytest.mark.parametrize("name", sorted(BAD_PARAMS))
def test_param_shape_mismatch(name):
  _raises(ValueError, r"`params\.scale` has shape", BAD_PARAMS[name], X)


def test_bias_shape_mismatch():
  p = jn.NormParams(jnp.ones(8), jnp.zeros(7))
  _raises(ValueError, r"`params\.bias`", lambda x: bn(x, params=p), X)
  _raises(ValueError, r"`params\.bias`", lambda x: jn.layer_norm(x, p), X)


def test_layer_norm_feature_shape_mismatch():
  # LN over (C, H, W) with elementwise affine needs params of shape (5, 5, 8)
  f = lambda x: jn.layer_norm(x, P8, reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3))
  _raises(ValueError, r"`params\.scale` has shape \(8,\).*\(5, 5, 8\)", f, X)


def test_batch_norm_state_shape_mismatch():
  bad = jn.BatchNormState(jnp.zeros(8), jnp.ones(4))
  _raises(ValueError, r"`state\.var`", lambda x: bn(x, state=bad), X)
  bad = jn.BatchNormState(jnp.zeros(2), jnp.ones(8))
  _raises(
    ValueError,
    r"`state\.mean`",
    lambda x: bn(x, state=bad, use_running_average=True),
    X,
  )


# ----------------------------------------------------------------------------
# groups
# ----------------------------------------------------------------------------


def test_channels_not_divisible_by_num_groups():
  _raises(
    ValueError,
    r"Number of groups \(3\) does not divide the number of channels \(8\)\. "
    r"`num_groups`=3 must divide",
    lambda x: jn.group_norm(x, P8, num_groups=3),
    X,
  )


def test_channels_not_divisible_by_group_size():
  _raises(
    ValueError,
    r"not multiple of the group size \(3\)\. `group_size`=3 must divide",
    lambda x: jn.group_norm(x, P8, num_groups=None, group_size=3),
    X,
  )


@pytest.mark.parametrize("num_groups,group_size", [(2, 4), (None, None)])
def test_both_or_neither_of_num_groups_and_group_size(num_groups, group_size):
  _raises(
    ValueError,
    r"Either `num_groups` or `group_size` should be specified.*pass exactly one",
    lambda x: jn.group_norm(x, P8, num_groups=num_groups, group_size=group_size),
    X,
  )


# ----------------------------------------------------------------------------
# axes
# ----------------------------------------------------------------------------

BAD_AXES = {
  "batch_norm": ("`axis`=4 is out of range", lambda x: bn(x, axis=4)),
  "batch_norm_tuple": ("`axis`=-5 is out of range", lambda x: bn(x, axis=(1, -5))),
  "layer_norm_reduction": (
    "`reduction_axes`=7 is out of range",
    lambda x: jn.layer_norm(x, P8, reduction_axes=(1, 7)),
  ),
  "layer_norm_feature": (
    "`feature_axes`=4 is out of range",
    lambda x: jn.layer_norm(x, P8, feature_axes=4),
  ),
  "rms_norm": (
    "`reduction_axes`=-9 is out of range",
    lambda x: jn.rms_norm(x, P8, reduction_axes=-9),
  ),
  "group_norm": (
    "`axis`=5 is out of range",
    lambda x: jn.group_norm(x, P8, num_groups=2, axis=5),
  ),
  "instance_norm": (
    "`axis`=-6 is out of range",
    lambda x: jn.instance_norm(x, P8, axis=-6),
  ),
}


@pytest.mark.parametrize("name", sorted(BAD_AXES))
def test_axis_out_of_range(name):
  match, f = BAD_AXES[name]
  _raises(ValueError, match, f, X)


def test_instance_norm_channel_axis_may_not_be_the_batch_axis():
  _raises(ValueError, "batch axis", lambda x: jn.instance_norm(x, P3, axis=0), X)


# ----------------------------------------------------------------------------
# integer x, masks, axis names
# ----------------------------------------------------------------------------

ALL_LAYERS = {
  "batch_norm": lambda x, **kw: bn(x, **kw),
  "batch_norm_eval": lambda x, **kw: bn(x, use_running_average=True, **kw),
  "layer_norm": lambda x, **kw: jn.layer_norm(x, P8, **kw),
  "rms_norm": lambda x, **kw: jn.rms_norm(x, P8, **kw),
  "group_norm": lambda x, **kw: jn.group_norm(x, P8, num_groups=2, **kw),
  "instance_norm": lambda x, **kw: jn.instance_norm(x, P8, **kw),
}


@pytest.mark.parametrize("name", sorted(ALL_LAYERS) + ["normalize"])
def test_integer_x(name):
  xi = jax.ShapeDtypeStruct((4, 5, 5, 8), jnp.int32)
  f = ALL_LAYERS.get(name, lambda x: jn.normalize(x, 0.0, 1.0))
  _raises(TypeError, "`x` must be a floating-point", f, xi)


@pytest.mark.parametrize("name", sorted(ALL_LAYERS))
def test_mask_that_does_not_broadcast(name):
  mask = jnp.ones((4, 3, 1, 8), bool)
  _raises(
    ValueError,
    r"`mask` of shape \(4, 3, 1, 8\) does not broadcast",
    lambda x: ALL_LAYERS[name](x, mask=mask),
    X,
  )


def test_mask_of_float_dtype():
  mask = jnp.ones((4, 1, 1, 1), jnp.float32)
  _raises(TypeError, "`mask` must be a boolean", lambda x: bn(x, mask=mask), X)


@pytest.mark.parametrize(
  "name", ["batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm"]
)
def test_axis_name_not_bound(name):
  _raises(
    ValueError,
    "`axis_name`='batch' is not bound",
    lambda x: ALL_LAYERS[name](x, axis_name="batch"),
    X,
  )


def test_axis_index_groups_without_axis_name():
  _raises(
    ValueError,
    "`axis_index_groups` needs an `axis_name`",
    lambda x: bn(x, axis_index_groups=[[0, 1]]),
    X,
  )


def test_normalize_statistics_that_do_not_broadcast():
  _raises(
    ValueError,
    r"`var` of shape \(3,\) does not broadcast",
    lambda x: jn.normalize(x, 0.0, jnp.ones(3)),
    X,
  )
  _raises(
    ValueError,
    "`scale` of shape",
    lambda x: jn.normalize(x, 0.0, 1.0, scale=jnp.ones((2, 8))),
    X,
  )


# ----------------------------------------------------------------------------
# batch norm specifics
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "shape,axis", [((1, 8), -1), ((1, 8, 1, 1), 1), ((1, 1, 1, 8), -1)]
)
def test_training_batch_norm_with_a_single_value_per_channel(shape, axis):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  _raises(
    ValueError,
    "more than 1 value per channel",
    lambda x: bn(x, axis=axis),
    x,
  )
  # evaluation with a single example is fine
  y, _ = jax.eval_shape(lambda x: bn(x, axis=axis, use_running_average=True), x)
  assert y.shape == shape


@pytest.mark.parametrize("flag", [0, 1, None, "yes", jnp.array(True)])
def test_use_running_average_must_be_a_python_bool(flag):
  _raises(
    TypeError,
    "`use_running_average` must be a Python bool",
    lambda x: bn(x, use_running_average=flag),
    X,
  )


def test_use_running_average_is_required():
  with pytest.raises(TypeError, match="use_running_average"):
    jn.batch_norm(jnp.ones((2, 8)), P8, S8)


def test_errors_are_raised_inside_jit_at_trace_time():
  f = jax.jit(lambda x: jn.group_norm(x, P8, num_groups=3))
  with pytest.raises(ValueError, match="num_groups"):
    f.trace(X)


# ----------------------------------------------------------------------------
# parameter and state containers of the wrong kind
# ----------------------------------------------------------------------------

XB = jnp.ones((4, 8))
_MABN_P, _MABN_S = jn.moving_average_batch_norm_init(8, buffer_size=2)
_EVO_P, _EVO_S = jn.evonorm_b0_init(8)
_SW_P, _SW_S = jn.switchable_norm_init(8)
CONTAINER_CASES = {
  # (call, the argument named, what is passed in its place)
  "bn_state_dict": (lambda: bn(XB, state={"mean": S8.mean, "var": S8.var}), "state"),
  "bn_params_tuple": (lambda: bn(XB, params=(P8.scale, P8.bias)), "params"),
  "bn_swapped": (lambda: bn(XB, params=S8, state=P8), "params"),
  "ln_none": (lambda: jn.layer_norm(XB, None), "params"),
  "rms_dict": (lambda: jn.rms_norm(XB, {"scale": P8.scale}), "params"),
  "gn_tuple": (lambda: jn.group_norm(XB[:, None], (P8.scale,), num_groups=2), "params"),
  "in_none": (lambda: jn.instance_norm(XB[:, None], None), "params"),
  "frn_norm_params": (lambda: jn.filter_response_norm(XB[:, None], P8), "params"),
  "evo_b0_state": (
    lambda: jn.evonorm_b0(XB, _EVO_P, None, use_running_average=False),
    "state",
  ),
  "evo_s0_params": (lambda: jn.evonorm_s0(XB[:, None], P8, num_groups=2), "params"),
  "renorm_state": (
    lambda: jn.batch_renorm(XB, P8, (S8.mean,), use_running_average=False),
    "state",
  ),
  "mabn_bn_state": (
    lambda: jn.moving_average_batch_norm(XB, _MABN_P, S8, use_running_average=False),
    "state",
  ),
  "switchable_params": (
    lambda: jn.switchable_norm(XB, P8, _SW_S, use_running_average=False),
    "params",
  ),
  "spectral_state": (lambda: jn.spectral_norm(jnp.ones((3, 3)), {"u": 1}), "state"),
}


@pytest.mark.parametrize("case", sorted(CONTAINER_CASES))
def test_wrong_container_is_a_type_error_naming_it(case):
  # Before: AttributeError ('dict' object has no attribute 'mean') from deep
  # inside the layer.
  call, name = CONTAINER_CASES[case]
  with pytest.raises(TypeError, match=f"`{name}` must be a `jaxnorm"):
    call()


REQUIRED_NONE = {
  "state.var": lambda: bn(XB, state=S8._replace(var=None)),
  "params.v": lambda: jn.evonorm_b0(
    XB, _EVO_P._replace(v=None), _EVO_S, use_running_average=False
  ),
  "state.u": lambda: jn.spectral_norm(jnp.ones((3, 3)), jn.SpectralNormState(None)),
}


@pytest.mark.parametrize("name", sorted(REQUIRED_NONE))
def test_required_field_none_is_a_type_error_naming_it(name):
  with pytest.raises(TypeError, match=f"`{name}` is None"):
    REQUIRED_NONE[name]()


@pytest.mark.parametrize("layer", ["batch_norm", "batch_renorm", "switchable_norm"])
def test_torch_state_refused_with_flax_statistics(layer):
  # A TorchBatchNormState under flax's convention would lose
  # num_batches_tracked and mix a biased batch variance into its unbiased one.
  _, torch_state = jn.batch_norm_init(8, running_stats="torch")
  params = _SW_P if layer == "switchable_norm" else P8
  with pytest.raises(TypeError, match="TorchBatchNormState"):
    getattr(jn, layer)(XB, params, torch_state, use_running_average=False)


def test_normalize_refuses_complex_and_integer_arrays_for_real_x():
  x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
  with pytest.raises(TypeError, match="`mean` is complex"):
    jn.normalize(x, jnp.array([5j, 0.0]), jnp.ones(2))
  with pytest.raises(TypeError, match="`scale` is complex"):
    jn.normalize(x, 0.0, 1.0, scale=jnp.array([1j, 1j]))
  with pytest.raises(TypeError, match="`var` must be a floating-point"):
    jn.normalize(x, 0.0, jnp.array([1, 2]))
  with pytest.raises(TypeError, match="`bias`"):
    jn.normalize(x, 0.0, 1.0, bias=True)
  # Python numbers take x's dtype, as before: (x - 2) / sqrt(4) by hand.
  y = jn.normalize(x, 2, 4, epsilon=0.0)
  assert y.tolist() == [[-0.5, 0.0], [0.5, 2.0]]


def test_weight_norm_checks_epsilon_and_scale_dtype():
  v = jnp.full((3, 2), 1e-4)
  for eps in (-1e-6, float("nan")):
    with pytest.raises(ValueError, match="epsilon"):
      jn.weight_norm(v, jnp.ones(2), epsilon=eps)
  with pytest.raises(TypeError, match="`scale` must be a floating-point"):
    jn.weight_norm(v, jnp.ones(2, jnp.int32))
  with pytest.raises(TypeError, match="`scale` is complex.*`v` is real"):
    jn.weight_norm(v, jnp.ones(2, jnp.complex64))


def test_spectral_norm_takes_numpy_ints_and_bools():
  import numpy as np

  w = jax.random.normal(jax.random.key(0), (5, 4))
  state = jn.spectral_norm_init(w, jax.random.key(1))
  a, s_a = jn.spectral_norm(w, state, n_steps=np.int64(2), update_stats=np.bool_(False))
  b, s_b = jn.spectral_norm(w, state, n_steps=2, update_stats=False)
  assert bool((a == b).all()) and bool((s_a.u == s_b.u).all())
  with pytest.raises(TypeError, match="n_steps"):
    jn.spectral_norm(w, state, n_steps=True)
  with pytest.raises(ValueError, match="n_steps"):
    jn.spectral_norm(w, state, n_steps=np.int32(0))


@pytest.mark.parametrize(
  "kw", [{"r_max": float("inf")}, {"r_max": float("nan")}, {"d_max": float("inf")}]
)
def test_renorm_schedule_refuses_non_finite_bounds(kw):
  # Before: (nan, 0.) at step 0, and NaN outputs from batch_renorm under jit.
  with pytest.raises(ValueError, match=next(iter(kw))):
    jn.batch_renorm_schedule(0, **kw)


def test_renorm_schedule_zero_length_ramp_is_a_step():
  def at(step):
    r, d = jn.batch_renorm_schedule(
      step, r_max=3.0, d_max=5.0, r_max_steps=(5, 5), d_max_steps=(5, 5)
    )
    return float(r), float(d)

  assert at(4) == (1.0, 0.0)
  assert at(5) == (3.0, 5.0)  # the final value from `end` on
  assert at(6) == (3.0, 5.0)


def test_filter_response_norm_tlu_refuses_complex_x():
  x = jnp.ones((2, 3, 3, 4), jnp.complex64)
  params = jn.filter_response_norm_init(4)
  with pytest.raises(TypeError, match="use_tlu=False"):
    jn.filter_response_norm(x, params)
  # Without the TLU: x / sqrt(mean |x|^2 + eps) * scale + bias, by hand.
  y = jn.filter_response_norm(x * (1 + 1j), params, use_tlu=False, epsilon=0.0)
  assert jnp.allclose(y, (1 + 1j) / jnp.sqrt(2.0), atol=1e-6)


def test_ghost_batch_with_symbolic_batch_says_how_to_declare_it():
  from jax import export

  p, s = jn.batch_norm_init(3)

  def f(x):
    return jn.batch_norm(x, p, s, use_running_average=False, virtual_batch_size=2)[0]

  with pytest.raises(ValueError, match=r'symbolic_shape\("2\*b'):
    export.export(jax.jit(f))(
      jax.ShapeDtypeStruct(export.symbolic_shape("b, 3"), jnp.float32)
    )
  exported = export.export(jax.jit(f))(
    jax.ShapeDtypeStruct(export.symbolic_shape("2*b, 3"), jnp.float32)
  )
  x = jnp.arange(12.0).reshape(4, 3)
  # Each pair of rows normalized on its own: (-1, 1) * (1 / sqrt(1 + eps)).
  assert jnp.allclose(exported.call(x)[::2], -1.0, atol=1e-4)
