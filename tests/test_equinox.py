"""jaxnorm.equinox: equinox's own layers and the functional core as references.

equinox calls a layer on one unbatched channels-first sample and batches it
with a named ``jax.vmap``; the references run on the whole batch at once:
``equinox.nn.BatchNorm`` / ``LayerNorm`` / ``GroupNorm`` (with the same
weights), and for the layers equinox lacks the functional core on the
batched input (channel axis 1), which the tests of the core check against
float64 NumPy and PyTorch.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxnorm as jn
import jaxnorm.equinox as jeqx

N, C = 8, 6


def batched(fn, axis_name="batch", mask=False):
  """``fn(x, state)`` (or ``fn(x, mask, state)``) under equinox's named vmap."""
  in_axes = (0, 0, None) if mask else (0, None)
  return jax.vmap(fn, axis_name=axis_name, in_axes=in_axes, out_axes=(0, None))


def rand(seed, shape, low=None):
  """NumPy data (no compilation, unlike jax.random); ``low + |v|`` if given."""
  v = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return v if low is None else low + np.abs(v)


def randomize(model, seed=1):
  """Every float array of ``model`` replaced by random values (scale > 0)."""
  leaves, tree = jax.tree.flatten(model)
  out = [
    jnp.asarray(rand(seed + i, leaf.shape, low=0.5))
    if eqx.is_inexact_array(leaf)
    else leaf
    for i, leaf in enumerate(leaves)
  ]
  return jax.tree.unflatten(tree, out)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# --- equinox's own layers --------------------------------------------------------


def test_batch_norm_matches_equinox_over_steps_and_in_inference():
  ours, state = eqx.nn.make_with_state(jeqx.BatchNorm)(
    C, axis_name="batch", momentum=0.9
  )
  ref, ref_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
    C, "batch", momentum=0.9, mode="batch"
  )
  weight, bias = rand(1, (C,), low=0.5), rand(2, (C,))
  ours = eqx.tree_at(lambda m: (m.scale, m.bias), ours, (weight, bias))
  ref = eqx.tree_at(lambda m: (m.weight, m.bias), ref, (weight, bias))

  xs = [rand(10 + t, (N, C, 4, 3)) * (1.0 + t) + 3.0 for t in range(3)]
  x_eval = rand(20, (N, C, 4, 3)) + 3.0

  @eqx.filter_jit
  def run(ours, state, ref, ref_state):
    steps = []
    for x in xs:  # three training steps
      y, state = batched(ours)(x, state)
      y_ref, ref_state = batched(ref)(x, ref_state)
      stats = state.get(ours.state_index)
      steps.append((y, y_ref, stats, ref_state.get(ref.batch_state_index)))
    # equinox's mode="batch" divides its EMAs by 1 - momentum**t in
    # inference; with its step counter at 0 it uses them as they are, as
    # jaxnorm does.
    ref_state = ref_state.set(ref.batch_counter, jnp.array(0))
    ours_eval, ref_eval = eqx.nn.inference_mode((ours, ref))
    assert ours_eval.inference and not ours.inference
    y, new_state = batched(ours_eval)(x_eval, state)
    y_ref, _ = batched(ref_eval)(x_eval, ref_state)
    return steps, (y, y_ref, state, new_state)

  steps, (y, y_ref, state, new_state) = run(ours, state, ref, ref_state)
  for y_t, y_ref_t, stats, (hidden_mean, hidden_var) in steps:
    close(y_t, y_ref_t)
    close(stats["mean"], hidden_mean)
    close(stats["var"], hidden_var)
  close(y, y_ref)
  jax.tree.map(np.testing.assert_array_equal, new_state, state)


def test_layer_norm_matches_equinox():
  x = rand(0, (N, 3, 4, 5)) * 3.0 + 1.0
  ref = eqx.nn.LayerNorm((3, 4, 5))
  ours = jeqx.LayerNorm((3, 4, 5))  # equinox's epsilon, 1e-5
  w, b = rand(1, (3, 4, 5), low=0.5), rand(2, (3, 4, 5))
  ref = eqx.tree_at(lambda m: (m.weight, m.bias), ref, (w, b))
  ours = eqx.tree_at(lambda m: (m.scale, m.bias), ours, (w, b))
  # LayerNorm(D) on a sequence (T, D): every token, as equinox's twice vmapped.
  tokens = jeqx.LayerNorm(5, use_bias=False)
  tokens = eqx.tree_at(lambda m: m.scale, tokens, w[0, 0])
  ref_tokens = eqx.tree_at(
    lambda m: m.weight, eqx.nn.LayerNorm(5, use_bias=False), w[0, 0]
  )

  @jax.jit
  def run(x):
    x2 = x.reshape(N, 12, 5)
    return (
      (jax.vmap(ours)(x), jax.vmap(ref)(x)),
      (jax.vmap(tokens)(x2), jax.vmap(jax.vmap(ref_tokens))(x2)),
    )

  for got, want in run(x):
    close(got, want)


def test_group_norm_matches_equinox_and_passes_state_through():
  x = rand(0, (N, C, 4, 4)) * 2.0 - 1.0
  ref = eqx.nn.GroupNorm(3, C)
  ours = jeqx.GroupNorm(3, C)
  w, b = rand(1, (C,), low=0.5), rand(2, (C,))
  ref = eqx.tree_at(lambda m: (m.weight, m.bias), ref, (w, b))
  ours = eqx.tree_at(lambda m: (m.scale, m.bias), ours, (w, b))
  _, state = eqx.nn.make_with_state(jeqx.BatchNorm)(C, axis_name="batch")

  @jax.jit
  def run(x, state):
    # With a state, a stateless layer returns it unchanged (as equinox's
    # do), so that eqx.nn.Sequential can hold it beside stateful layers.
    y0, same = ours(x[0], state)
    assert same is state
    return jax.vmap(ours)(x), jax.vmap(ref)(x), y0

  y, y_ref, y0 = run(x, state)
  close(y, y_ref)
  close(y0, y_ref[0])


# --- the functional core, for every other layer -------------------------------------


def _np(state, index):
  return {k: jnp.asarray(v) for k, v in state.get(index).items()}


def _bn_core(m, x, s, train, mask, **kw):
  axis = 1 if m.axis == 0 else m.axis
  torch = m.running_stats == "torch"
  state_type = jn.TorchBatchNormState if torch else jn.BatchNormState
  y, new = jn.batch_norm(
    x,
    jn.NormParams(m.scale, m.bias),
    state_type(**s),
    use_running_average=not train,
    axis=axis,
    momentum=m.momentum,
    epsilon=m.epsilon,
    mask=mask,
    running_stats=m.running_stats,
    virtual_batch_size=m.virtual_batch_size,
  )
  return y, new._asdict()


def _running(fn, params):
  def core(m, x, s, train, mask, **kw):
    if fn is jn.batch_renorm:
      kw = {"r_max": m.r_max, "d_max": m.d_max, **kw}
    y, new = fn(
      x,
      params(m),
      jn.BatchNormState(**s),
      use_running_average=not train,
      axis=1,
      momentum=m.momentum,
      epsilon=m.epsilon,
      mask=mask,
      **kw,
    )
    return y, new._asdict()

  return core


def _mabn_core(m, x, s, train, mask, **kw):
  y, new = jn.moving_average_batch_norm(
    x,
    jn.NormParams(m.scale, m.bias),
    jn.MovingAverageBatchNormState(**s),
    use_running_average=not train,
    axis=1,
    momentum=m.momentum,
    epsilon=m.epsilon,
    mask=mask,
    renorm_warmup_steps=m.renorm_warmup_steps,
    r_max=m.r_max,
  )
  return y, new._asdict()


def _b0_core(m, x, s, train, mask, **kw):
  y, new = jn.evonorm_b0(
    x,
    jn.EvoNormParams(m.scale, m.bias, m.v),
    jn.EvoNormB0State(**s),
    use_running_average=not train,
    axis=1,
    momentum=m.momentum,
    epsilon=m.epsilon,
    mask=mask,
  )
  return y, new._asdict()


def _stateless(fn):
  def core(m, x, s, train, mask, **kw):
    return fn(m, x, mask), {}

  return core


STATEFUL = {
  "bn_channels_last": (
    lambda: jeqx.BatchNorm(C, axis=-1, axis_name="batch", momentum=0.8),
    _bn_core,
    (5, C),
  ),
  "bn_torch": (
    lambda: jeqx.BatchNorm(
      C, axis_name="batch", running_stats="torch", momentum=None, use_bias=False
    ),
    _bn_core,
    (C, 5),
  ),
  "bn_ghost": (
    lambda: jeqx.BatchNorm(C, axis_name="batch", virtual_batch_size=4, momentum=0.7),
    _bn_core,
    (C, 3, 2),
  ),
  "switchable": (
    lambda: jeqx.SwitchableNorm(C, axis_name="batch", momentum=0.9),
    _running(
      jn.switchable_norm,
      lambda m: jn.SwitchableNormParams(m.scale, m.bias, m.mean_weights, m.var_weights),
    ),
    (C, 4, 2),
  ),
  "renorm": (
    lambda: jeqx.BatchRenorm(C, axis_name="batch", r_max=1.5, d_max=0.5),
    _running(jn.batch_renorm, lambda m: jn.NormParams(m.scale, m.bias)),
    (C, 5),
  ),
  "renorm_traced_bounds": (
    lambda: jeqx.BatchRenorm(C, axis_name="batch"),
    _running(jn.batch_renorm, lambda m: jn.NormParams(m.scale, m.bias)),
    (C, 5),
  ),
  "mabn": (
    lambda: jeqx.MovingAverageBatchNorm(
      C, axis_name="batch", buffer_size=3, renorm_warmup_steps=0
    ),
    _mabn_core,
    (C, 5),
  ),
  "evonorm_b0": (
    lambda: jeqx.EvoNormB0(C, axis_name="batch", momentum=0.9),
    _b0_core,
    (C, 3, 3),
  ),
}

STATELESS = {
  "rms": (
    lambda: jeqx.RMSNorm((4, 3)),
    lambda m, x, mask: jn.rms_norm(
      x,
      jn.NormParams(m.scale, None),
      reduction_axes=(2, 3),
      feature_axes=(2, 3),
      epsilon=m.epsilon,
      mask=mask,
    ),
    (C, 4, 3),
  ),
  "instance": (
    lambda: jeqx.InstanceNorm(C),
    lambda m, x, mask: jn.instance_norm(
      x, jn.NormParams(m.scale, m.bias), axis=1, epsilon=m.epsilon, mask=mask
    ),
    (C, 4, 3),
  ),
  "group_size": (
    lambda: jeqx.GroupNorm(None, C, group_size=2, axis=-1),
    lambda m, x, mask: jn.group_norm(
      x,
      jn.NormParams(m.scale, m.bias),
      group_size=2,
      num_groups=None,
      axis=-1,
      epsilon=m.epsilon,
      mask=mask,
    ),
    (4, 3, C),
  ),
  "frn": (
    lambda: jeqx.FilterResponseNorm(C, learned_epsilon=True),
    lambda m, x, mask: jn.filter_response_norm(
      x,
      jn.FilterResponseNormParams(m.scale, m.bias, m.tau, m.eps),
      axis=1,
      epsilon=m.epsilon,
      mask=mask,
    ),
    (C, 4, 3),
  ),
  "evonorm_s0": (
    lambda: jeqx.EvoNormS0(C, num_groups=3),
    lambda m, x, mask: jn.evonorm_s0(
      x,
      jn.EvoNormParams(m.scale, m.bias, m.v),
      num_groups=3,
      axis=1,
      epsilon=m.epsilon,
      mask=mask,
    ),
    (C, 4, 3),
  ),
}


def _random_state(state, index, seed):
  """Running statistics away from their initial values (variances > 0)."""
  values = state.get(index)
  new = {}
  for i, (name, v) in enumerate(sorted(values.items())):
    if jnp.issubdtype(v.dtype, jnp.integer):
      new[name] = v + 2  # num_batches_tracked, MABN's step count
    else:
      new[name] = rand(seed + i, v.shape, low=0.5).astype(v.dtype)
  return state.set(index, new)


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_stateful_layer_matches_core_in_training_and_inference(name):
  make, core, sample = STATEFUL[name]
  model, state = eqx.nn.make_with_state(make)()
  model = randomize(model)
  state = _random_state(state, model.state_index, seed=40)
  x = rand(3, (N, *sample)) * 2.0 + 1.0
  # Per-sample masks: one sample empty, the others partly masked.
  mask = np.array(rand(4, (N, *sample)) > -0.8)
  mask[2] = False
  if name == "bn_ghost":
    mask[4:, 0] = False  # channel 0 of the second ghost batch: nothing
  kwargs = {}
  if name == "renorm_traced_bounds":
    kwargs = dict(
      zip(("r_max", "d_max"), jn.batch_renorm_schedule(10_000), strict=True)
    )
  start = _np(state, model.state_index)

  @jax.jit
  def run(x, mask, state, kwargs):
    def call(x, mask, state, inference):
      return model(x, state, mask=mask, inference=inference, **kwargs)

    train = batched(lambda x, m, s: call(x, m, s, False), mask=True)(x, mask, state)
    infer = batched(lambda x, m, s: call(x, m, s, True), mask=True)(x, mask, state)
    refs = [core(model, x, start, t, mask, **kwargs) for t in (True, False)]
    return train, infer, refs

  (y, new), (y_eval, same), refs = run(x, mask, state, kwargs)
  (y_ref, new_ref), (y_eval_ref, _) = refs
  close(y, y_ref, 2e-5)
  got = _np(new, model.state_index)
  assert sorted(got) == sorted(start)
  for k in new_ref:
    close(got[k], new_ref[k])
  close(y_eval, y_eval_ref)
  jax.tree.map(np.testing.assert_array_equal, _np(same, model.state_index), start)


@pytest.mark.parametrize("name", sorted(STATELESS))
def test_stateless_layer_matches_core(name):
  make, core, sample = STATELESS[name]
  model = randomize(make())
  x = rand(3, (N, *sample)) * 2.0 + 1.0
  mask = rand(4, (N, *sample)) > -0.8
  y, y_ref = jax.jit(
    lambda x, mask: (
      jax.vmap(lambda x, m: model(x, mask=m))(x, mask),
      core(model, x, mask),
    )
  )(x, mask)
  close(y, y_ref, 2e-5)


def test_output_keeps_the_dtype_of_x_as_equinox_does():
  x = (rand(0, (N, C, 3)) + 2.0).astype(jnp.bfloat16)
  model, state = eqx.nn.make_with_state(jeqx.BatchNorm)(C, axis_name="batch")
  ln, ref = jeqx.LayerNorm((C, 3)), eqx.nn.LayerNorm((C, 3), dtype=jnp.float32)

  @jax.jit
  def run(x, state):
    return batched(model)(x, state), jax.vmap(ln)(x), jax.vmap(ref)(x)

  (y, state), y_ln, y_ref = run(x, state)
  assert y.dtype == jnp.bfloat16
  assert state.get(model.state_index)["var"].dtype == jnp.float32
  assert y_ln.dtype == y_ref.dtype == jnp.bfloat16
  close(y_ln.astype(jnp.float32), y_ref.astype(jnp.float32), 2e-2)


# --- across devices ----------------------------------------------------------------


@pytest.mark.parametrize("running_stats", ["flax", "torch"])
def test_sync_over_devices_and_vmap_is_count_weighted(running_stats):
  """pmap over 8 devices x vmap over 3 samples each, different data per
  device, a mask leaving 0 to 3 samples per device: equal to one batch of
  all 24 samples with the mask."""
  devices, per = 8, 3
  momentum = 0.9 if running_stats == "flax" else 0.1
  model, state = eqx.nn.make_with_state(jeqx.BatchNorm)(
    C, axis_name=("device", "batch"), momentum=momentum, running_stats=running_stats
  )
  model = randomize(model)
  x = rand(0, (devices * per, C, 5)) * 3.0 + np.arange(devices * per)[:, None, None]
  mask = np.zeros((devices * per, 1, 1), bool)
  for d in range(devices):
    mask[d * per : d * per + d % 4] = True  # device 0 has nothing

  def local(x, m, s):
    return batched(lambda x, m, s: model(x, s, mask=m), mask=True)(x, m, s)

  y, new = jax.pmap(local, axis_name="device", in_axes=(0, 0, None))(
    x.reshape(devices, per, C, 5), mask.reshape(devices, per, 1, 1), state
  )
  start = _np(state, model.state_index)
  y_ref, new_ref = jax.jit(lambda x: _bn_core(model, x, start, True, mask))(x)
  close(y.reshape(x.shape), y_ref)
  got = _np(new, model.state_index)
  for k, v in new_ref.items():
    for d in range(devices):  # the same on every device
      close(got[k][d], v)

  # shard_map over the 8 devices, vmap inside (JAX refuses a collective over a
  # shard_map axis and a vmap axis together unless check_vma=False).
  mesh = Mesh(np.array(jax.devices()), ("device",))
  sharded = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(P("device"), P("device"), P()),
    out_specs=(P("device"), P()),
    check_vma=False,
  )
  y, new = jax.jit(sharded)(x, mask, state)
  close(y, y_ref)
  for k, v in _np(new, model.state_index).items():
    close(v, new_ref[k])


# --- equinox's workflow ---------------------------------------------------------


def test_inference_mode_switches_every_layer_of_a_model():
  model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
    [
      jeqx.BatchNorm(C, axis_name="batch"),
      jeqx.GroupNorm(3, C),
      eqx.nn.Lambda(jax.nn.relu),
      jeqx.EvoNormB0(C, axis_name="batch"),
    ]
  )
  x = rand(1, (N, C, 5)) + 1.0
  bn = model.layers[0]

  @eqx.filter_jit
  def run(model, x, state):
    y, new = batched(model)(x, state)
    # The call's `inference` overrides the field, in both directions.
    first = model.layers[0]
    y_eval, _ = batched(lambda x, s: first(x, s, inference=True))(x, state)
    y_train, _ = batched(lambda x, s: first(x, s, inference=False))(x, state)
    return y, new, y_eval, y_train

  _, trained, _, _ = run(model, x, state)
  evaluation = eqx.nn.inference_mode(model)
  assert [m.inference for m in evaluation.layers if hasattr(m, "inference")] == [
    True,
    True,
  ]
  _, after, y_eval, y_train = run(evaluation, x, trained)
  jax.tree.map(np.testing.assert_array_equal, after, trained)
  assert not np.allclose(y_train, y_eval)
  # Back to training: the statistics move again.
  _, moved, _, _ = run(eqx.nn.inference_mode(evaluation, value=False), x, trained)
  assert not np.allclose(
    moved.get(bn.state_index)["mean"], trained.get(bn.state_index)["mean"]
  )


def _mlp(norm, key):
  k1, k2 = jax.random.split(key)
  return eqx.nn.Sequential(
    [
      eqx.nn.Linear(4, C, key=k1),
      norm,
      eqx.nn.Lambda(jax.nn.relu),
      eqx.nn.Linear(C, 1, key=k2),
    ]
  )


def test_filter_jit_and_filter_grad_training_step_matches_equinox():
  key = jax.random.key(0)
  ours, state = eqx.nn.make_with_state(_mlp)(
    jeqx.BatchNorm(C, axis_name="batch", momentum=0.9), key
  )
  ref, ref_state = eqx.nn.make_with_state(_mlp)(
    eqx.nn.BatchNorm(C, "batch", momentum=0.9, mode="batch"), key
  )
  x, target = rand(1, (N, 4)), rand(2, (N, 1))

  def loss(model, state, x):
    y, state = batched(model)(x, state)
    return jnp.mean((y - target) ** 2), state

  def sgd(model, state, x):
    (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
      model, state, x
    )
    model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))
    return model, state, value, grads

  @eqx.filter_jit
  def step(both, x):
    return [sgd(model, state, x) for model, state in both]

  both = [(ours, state), (ref, ref_state)]
  for t in range(3):
    (ours, state, value, grads), (ref, ref_state, ref_value, ref_grads) = step(
      both, x * (1.0 + t)
    )
    both = [(ours, state), (ref, ref_state)]
    close(value, ref_value)
    close(grads.layers[0].weight, ref_grads.layers[0].weight, 1e-4)
    close(grads.layers[1].scale, ref_grads.layers[1].weight, 1e-4)
    close(grads.layers[1].bias, ref_grads.layers[1].bias, 1e-4)
  close(
    state.get(ours.layers[1].state_index)["var"],
    ref_state.get(ref.layers[1].batch_state_index)[1],
  )


def test_mabn_gradient_writes_the_backward_buffer_as_the_core_does():
  model, state = eqx.nn.make_with_state(jeqx.MovingAverageBatchNorm)(
    C, axis_name="batch", buffer_size=3
  )
  x = rand(0, (4, C, 5)) + 0.5
  ref_state = jn.MovingAverageBatchNormState(**_np(state, model.state_index))

  def loss(model_and_state):
    model, state = model_and_state
    y, state = batched(model)(x, state)
    return jnp.sum(jnp.sin(y)), state

  def ref_loss(s):
    y, new = jn.moving_average_batch_norm(
      x, jn.NormParams(model.scale, model.bias), s, use_running_average=False, axis=1
    )
    return jnp.sum(jnp.sin(y)), new

  @eqx.filter_jit
  def step(state, ref_state):
    (_, g_state), state = eqx.filter_grad(loss, has_aux=True)((model, state))
    g_ref, new_ref = jax.grad(ref_loss, has_aux=True, allow_int=True)(ref_state)
    return (
      jn.apply_mabn_grad_moments(state, g_state),
      jn.apply_mabn_grad_moments(new_ref, g_ref),
    )

  for _ in range(2):  # the second step reads the buffer the first one wrote
    state, ref_state = step(state, ref_state)
    got = _np(state, model.state_index)
    for k, v in ref_state._asdict().items():
      close(got[k], v)
  assert np.all(np.asarray(got["grad_moments"][:2]) != 0)


# --- errors ------------------------------------------------------------------------


def _train(model, x, state=None, **kwargs):
  if state is None:
    state = eqx.nn.State(model)
  return batched(lambda x, s: model(x, s, **kwargs))(x, state)


X = np.ones((4, C, 3), np.float32)


ERRORS = [
  (
    lambda: jeqx.BatchNorm(C)(X[0], eqx.nn.State(jeqx.BatchNorm(C))),
    ValueError,
    "`axis_name`",
  ),
  (lambda: _train(jeqx.EvoNormB0(C), X), ValueError, "`axis_name`"),
  (lambda: jeqx.BatchNorm(C, axis_name="batch")(X[0], None), TypeError, "`state`"),
  (lambda: jeqx.BatchNorm("6"), TypeError, "`num_features`"),
  (lambda: jeqx.LayerNorm(2.5), TypeError, "`shape`"),
  (lambda: jeqx.GroupNorm(4, C), ValueError, "`num_groups`"),
  (lambda: jeqx.GroupNorm(3, C, group_size=2), ValueError, "`group_size`"),
  (lambda: jeqx.EvoNormS0(C, num_groups=5), ValueError, "`num_groups`"),
  (lambda: jeqx.BatchNorm(C, running_stats="keras"), ValueError, "`running_stats`"),
  (lambda: jeqx.BatchNorm(C, inference="yes"), TypeError, "`inference`"),
  (
    lambda: jeqx.BatchNorm(C, virtual_batch_size=2, running_stats="torch"),
    ValueError,
    "`virtual_batch_size`",
  ),
  (
    lambda: jeqx.LayerNorm(3, scale_init=jax.nn.initializers.normal()),
    ValueError,
    "`key=",
  ),
  (lambda: jeqx.LayerNorm(4)(X[0]), ValueError, "`shape`"),
  (lambda: jeqx.LayerNorm((2, C, 3))(X[0]), ValueError, "`shape`"),
  (lambda: jeqx.InstanceNorm(C + 1)(X[0]), ValueError, "`num_features`"),
  (lambda: jeqx.InstanceNorm(C, feature_axes=3)(X[0]), ValueError, "`feature_axes`"),
  (lambda: jeqx.GroupNorm(3, C, axis=2)(X[0]), ValueError, "`num_groups`|`axis`"),
  (lambda: jeqx.FilterResponseNorm(C, axis=5)(X[0]), ValueError, "`axis`"),
  (lambda: jeqx.RMSNorm(3)(X[0], mask=np.ones((2, 3), bool)), ValueError, "`mask`"),
  (lambda: jeqx.RMSNorm(3)(jnp.float32(1.0)), ValueError, "`x`"),
  (
    lambda: _train(jeqx.BatchNorm(C, axis_name="batch", virtual_batch_size=3), X),
    ValueError,
    "`virtual_batch_size`",
  ),
  (
    lambda: _train(
      jeqx.BatchNorm(
        C, axis_name="batch", virtual_batch_size=2, axis_index_groups=[[0, 1], [2, 3]]
      ),
      X,
    ),
    ValueError,
    "`axis_index_groups`",
  ),
  (lambda: _train(jeqx.BatchNorm(C, axis_name="other"), X), ValueError, "`axis_name`"),
  (
    lambda: _train(jeqx.BatchRenorm(C, axis_name="batch"), X, rmax=2.0),
    TypeError,
    "rmax",
  ),
  (
    lambda: _train(jeqx.BatchNorm(C, axis_name="batch", epsilon=-1.0), X),
    ValueError,
    "`epsilon`",
  ),
]


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_bad_input_raises_naming_the_argument(case):
  fn, error, match = ERRORS[case]
  with pytest.raises(error, match=match):
    fn()


def test_single_sample_per_channel_in_training_raises():
  model, state = eqx.nn.make_with_state(jeqx.BatchNorm)(C, axis_name="batch")
  with pytest.raises(ValueError, match="more than 1 value per channel"):
    batched(model)(np.ones((1, C), np.float32), state)


def test_inference_needs_no_axis_name_and_no_vmap_name():
  model, state = eqx.nn.make_with_state(jeqx.BatchNorm)(C, inference=True)
  y, same = jax.jit(jax.vmap(model, in_axes=(0, None), out_axes=(0, None)))(X, state)
  close(y, X / np.sqrt(1.0 + 1e-5))
  assert same is not None


# --- packaging ----------------------------------------------------------------------


@pytest.mark.slow
def test_equinox_stays_optional():
  code = textwrap.dedent(
    """
    import sys
    import jaxnorm, jaxnorm.linen, jaxnorm.nnx
    assert "equinox" not in sys.modules, "jaxnorm imported equinox"
    sys.modules["equinox"] = None  # as if it were not installed
    try:
      import jaxnorm.equinox
    except ImportError as error:
      assert "pip install jaxnorm[equinox]" in str(error), error
    else:
      raise AssertionError("no ImportError")
    """
  )
  result = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr


def test_random_initializers_draw_from_the_key():
  init = jax.nn.initializers.normal()
  a = jeqx.LayerNorm(3, scale_init=init, key=jax.random.key(0))
  b = jeqx.LayerNorm(3, scale_init=init, key=jax.random.key(1))
  assert a.scale.shape == (3,) and not np.allclose(a.scale, b.scale)
  np.testing.assert_array_equal(a.bias, np.zeros(3))


@pytest.mark.parametrize(
  "make, error, text",
  [
    (
      lambda: jeqx.MovingAverageBatchNorm(3, axis_name="batch", buffer_size=0),
      ValueError,
      "buffer_size",
    ),
    (
      lambda: jeqx.MovingAverageBatchNorm(3, axis_name="batch", buffer_size=2.5),
      TypeError,
      "buffer_size",
    ),
    (lambda: jeqx.LayerNorm(3, param_dtype="foo"), TypeError, "foo"),
  ],
)
def test_constructor_errors_are_not_reported_as_a_missing_key(make, error, text):
  # Only a random initializer's failure without a key asks for a key.
  with pytest.raises(error, match=text):
    make()


def test_random_initializer_without_key_asks_for_one():
  with pytest.raises(ValueError, match="needs a random key"):
    jeqx.LayerNorm(3, scale_init=jax.nn.initializers.normal())
