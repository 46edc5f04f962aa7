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
