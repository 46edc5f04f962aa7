"""Train a small CNN on scikit-learn's digits with jaxnorm's functional API.

No Flax modules: parameters and batch-norm running statistics are explicit
pytrees, the convolutions are ``jax.lax.conv_general_dilated``, the optimizer
is optax, and one jitted train step threads the BN state from step to step.

Two variants are trained, identical but for where batch norm sits:

* ``bn_before_act``: conv -> BN -> ReLU, as in the original paper (Ioffe &
  Szegedy, 2015), which normalizes the pre-activation ``Wx + b`` so that the
  nonlinearity sees a stable distribution;
* ``bn_after_act``: conv -> ReLU -> BN, which many practitioners prefer and
  report works as well or better: the next layer's input is what gets
  normalized.

The seeds' discussion is not settled. On this small problem, in 400 steps,
both reach 92 to 98 % test accuracy; with seeds 0, 1 and 2 BN after the
activation was 2 to 4 points ahead (0.95/0.98, 0.92/0.96, 0.93/0.95), too
small a run to generalize from.

Run::

    python examples/functional_training.py             # full run, 10-25 s on 2 cores
    python examples/functional_training.py --steps 50  # a quick check
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxnorm as jn

CHANNELS = (16, 32)
NUM_CLASSES = 10
MOMENTUM = 0.9  # PyTorch's momentum=0.1


def load_data(seed: int = 0):
  """Digits as NHWC float32 images in [0, 1], split 75 / 25."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
  return train_test_split(
    images, digits.target.astype(np.int32), test_size=0.25, random_state=seed
  )


def init(key: jax.Array):
  """Parameters and BN state of conv(16) -> conv(32, stride 2) -> pool -> dense."""
  params, state = {}, {}
  c_in = 1
  for i, c_out in enumerate(CHANNELS):
    key, sub = jax.random.split(key)
    fan_in = 3 * 3 * c_in
    params[f"conv{i}"] = jax.random.normal(sub, (3, 3, c_in, c_out)) * jnp.sqrt(
      2.0 / fan_in
    )
    # Conv has no bias: the BN bias (or, after the ReLU, the next BN) does its job.
    params[f"bn{i}"], state[f"bn{i}"] = jn.batch_norm_init(c_out)
    c_in = c_out
  key, sub = jax.random.split(key)
  params["dense"] = {
    "w": jax.random.normal(sub, (c_in, NUM_CLASSES)) * jnp.sqrt(1.0 / c_in),
    "b": jnp.zeros(NUM_CLASSES),
  }
  return params, state


def conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x,
    w,
    window_strides=(stride, stride),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def forward(params, state, x, *, train: bool, bn_before_act: bool):
  """Returns ``(logits, new_state)``; in evaluation the state comes back as is."""
  new_state = {}
  for i in range(len(CHANNELS)):
    x = conv(x, params[f"conv{i}"], stride=1 + i)
    if not bn_before_act:
      x = jax.nn.relu(x)
    x, new_state[f"bn{i}"] = jn.batch_norm(
      x,
      params[f"bn{i}"],
      state[f"bn{i}"],
      use_running_average=not train,
      momentum=MOMENTUM,
    )
    if bn_before_act:
      x = jax.nn.relu(x)
  x = x.mean(axis=(1, 2))  # global average pool
  logits = x @ params["dense"]["w"] + params["dense"]["b"]
  return logits, new_state


def make_steps(optimizer, bn_before_act: bool):
  def loss_fn(params, state, x, y):
    logits, new_state = forward(
      params, state, x, train=True, bn_before_act=bn_before_act
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_state

  @jax.jit
  def train_step(params, state, opt_state, x, y):
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, state, x, y
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_state, opt_state, loss

  @jax.jit
  def predict(params, state, x):
    logits, _ = forward(params, state, x, train=False, bn_before_act=bn_before_act)
    return jnp.argmax(logits, axis=-1)

  return train_step, predict


def train(
  bn_before_act: bool, steps: int, batch_size: int = 64, seed: int = 0
) -> tuple[float, float]:
  """Trains one variant; returns test accuracy (running statistics) and loss."""
  x_train, x_test, y_train, y_test = load_data(seed)
  params, state = init(jax.random.key(seed))
  optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
  opt_state = optimizer.init(params)
  train_step, predict = make_steps(optimizer, bn_before_act)
  rng = np.random.default_rng(seed)
  loss = jnp.nan
  for _ in range(steps):
    idx = rng.choice(len(x_train), batch_size, replace=False)
    params, state, opt_state, loss = train_step(
      params, state, opt_state, x_train[idx], y_train[idx]
    )
  accuracy = float(jnp.mean(predict(params, state, x_test) == y_test))
  return accuracy, float(loss)


def main(steps: int = 400, seed: int = 0) -> dict[str, float]:
  results = {}
  for name, before in (("bn_before_act", True), ("bn_after_act", False)):
    start = time.perf_counter()
    accuracy, loss = train(before, steps=steps, seed=seed)
    seconds = time.perf_counter() - start
    print(
      f"{name:14s} test accuracy {accuracy:.4f}  "
      f"(final train loss {loss:.3f}, {steps} steps, {seconds:.1f} s)"
    )
    results[name] = accuracy
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400, help="training steps")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  main(steps=args.steps, seed=args.seed)
