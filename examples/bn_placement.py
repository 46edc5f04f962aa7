"""Batch norm before or after the activation: conv -> BN -> ReLU vs conv -> ReLU -> BN.

The same small CNN (three 3x3 conv blocks of 32, 64 and 64 channels, global
average pooling, dense) learns scikit-learn's digits (8x8x1 images in
[0, 1], no download) with the batch norm of every block placed either before
the ReLU (Ioffe & Szegedy's placement, and ResNet's) or after it, and, as a
reference, without batch norm. Everything else is shared: the convolutions
have a bias in all three (BN cancels it in the first placement), each seed
gives every variant the same initial weights and the same order of batches,
and the optimizer is SGD with Nesterov momentum 0.9 at a constant learning
rate, without weight decay. The usual claim for BN is trainability at high
learning rates, so the script trains at rates from 0.01 to 10, 3 seeds each.
The test accuracy is measured after every epoch in evaluation mode (BN's
running averages, momentum 0.9); a model whose loss became NaN scores 10 %.

It writes ``placement.csv`` (per variant, rate, seed and epoch: mean
training loss and test accuracy) and ``placement.png`` (mean over the seeds,
band from the lowest to the highest seed) to ``--out``, by default
``docs/gallery/`` of the repository (``./gallery_quick/`` with ``--quick``).
It runs on one device.

Run::

    python examples/bn_placement.py           # ~2 minutes on 2 CPU cores
    python examples/bn_placement.py --quick   # 2 rates, 2 seeds, 2 epochs
    python examples/bn_placement.py --rates 1 2 5 --seeds 5  # other rates
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxnorm as jn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "gallery"
FIELDS = ("placement", "learning_rate", "seed", "epoch", "train_loss", "test_accuracy")
# BN before / after the ReLU, and no BN at all as the reference.
PLACEMENTS = ("before", "after", "none")
LABELS = {
  "before": "conv → BN → ReLU",
  "after": "conv → ReLU → BN",
  "none": "conv → ReLU (no BN)",
}
BLOCKS = ((32, 1), (64, 2), (64, 1))  # (channels, stride) of each conv block
NUM_CLASSES = 10
BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1
BATCH = 64


def load_data():
  """Digits as NHWC float32 images in [0, 1], split 80 / 20, stratified."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
  labels = digits.target.astype(np.int32)
  return train_test_split(
    images, labels, test_size=0.2, random_state=0, stratify=labels
  )


def init(key: jax.Array):
  """He-initialized convolutions with a bias, BN with scale 1 and bias 0."""
  params, state = {}, {}
  c_in = 1
  for i, (c_out, _) in enumerate(BLOCKS):
    key, sub = jax.random.split(key)
    std = np.sqrt(2.0 / (9 * c_in))
    params[f"conv{i}"] = {
      "w": jax.random.normal(sub, (3, 3, c_in, c_out)) * std,
      "b": jnp.zeros(c_out),
    }
    params[f"bn{i}"], state[f"bn{i}"] = jn.batch_norm_init(c_out)
    c_in = c_out
  key, sub = jax.random.split(key)
  params["dense"] = {
    "w": jax.random.normal(sub, (c_in, NUM_CLASSES)) / np.sqrt(c_in),
    "b": jnp.zeros(NUM_CLASSES),
  }
  return params, state


def apply(params, state, images, *, train: bool, placement: str):
  """Logits and the new BN state of one model."""
  h, new_state = images, {}

  def bn(h, i):
    y, new_state[f"bn{i}"] = jn.batch_norm(
      h,
      params[f"bn{i}"],
      state[f"bn{i}"],
      use_running_average=not train,
      momentum=BN_MOMENTUM,
    )
    return y

  for i, (_, stride) in enumerate(BLOCKS):
    h = jax.lax.conv_general_dilated(
      h,
      params[f"conv{i}"]["w"],
      window_strides=(stride, stride),
      padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    h = h + params[f"conv{i}"]["b"]
    if placement == "before":
      h = jax.nn.relu(bn(h, i))
    elif placement == "after":
      h = bn(jax.nn.relu(h), i)
    else:  # BN's parameters stay unused and its state as it was
      h, new_state[f"bn{i}"] = jax.nn.relu(h), state[f"bn{i}"]
  h = h.mean(axis=(1, 2))  # global average pooling
  return h @ params["dense"]["w"] + params["dense"]["b"], new_state


# SGD with momentum is the momentum trace scaled by -learning_rate; scaling by
# hand makes the rate an argument, so every rate shares one compiled step.
MOMENTUM = optax.trace(decay=0.9, nesterov=True)


def make_step(placement: str, x_train, y_train):
  """One jitted optimizer step on the training images ``idx``."""
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)

  def loss_fn(params, state, images, labels):
    logits, new_state = apply(params, state, images, train=True, placement=placement)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, new_state

  @jax.jit
  def step(params, state, opt_state, lr, idx):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, state, x_train[idx], y_train[idx]
    )
    updates, opt_state = MOMENTUM.update(grads, opt_state)
    params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
    return params, state, opt_state, loss

  return step


def make_accuracy(placement: str):
  @jax.jit
  def accuracy(params, state, images, labels):
    logits, _ = apply(params, state, images, train=False, placement=placement)
    # A diverged model (NaN logits) predicts class 0 here: chance level.
    return jnp.mean(jnp.argmax(logits, -1) == labels)

  return accuracy


def train(placement, data, rates, seeds, epochs, bar):
  """Trains one model per rate and seed; returns the CSV rows.

  The models train one after the other with a Python loop over jitted steps:
  on XLA:CPU that is several times faster than a ``lax.scan`` over the steps
  (convolutions inside a while loop) or a ``jax.vmap`` over the models
  (grouped convolutions).
  """
  x_train, x_test, y_train, y_test = data
  step, accuracy = make_step(placement, x_train, y_train), make_accuracy(placement)
  steps = len(x_train) // BATCH
  rows = []
  for lr in rates:
    for seed in seeds:
      # The same initial weights and batch order for a seed, whatever the
      # placement and the rate: paired comparisons.
      params, state = init(jax.random.key(seed))
      opt_state = MOMENTUM.init(params)
      rng = np.random.default_rng(seed)
      for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))[: steps * BATCH].reshape(steps, BATCH)
        losses = []
        for idx in order:
          params, state, opt_state, loss = step(params, state, opt_state, lr, idx)
          losses.append(loss)
        acc = accuracy(params, state, x_test, y_test)
        loss = float(np.mean(jax.device_get(losses)))
        rows.append((placement, lr, seed, epoch, loss, float(acc)))
        bar.update()
  return rows


def plot(rows, rates, path):
  fig, axes = plt.subplots(2, len(rates), figsize=(3.8 * len(rates), 7.5), sharex=True)
  axes = np.asarray(axes).reshape(2, len(rates))
  colors = {"before": "tab:blue", "after": "tab:orange", "none": "tab:gray"}
  for col, lr in enumerate(rates):
    for placement in PLACEMENTS:
      sel = [r for r in rows if r[0] == placement and r[1] == lr]
      epochs = sorted({r[3] for r in sel})
      for field, ax in ((4, axes[0, col]), (5, axes[1, col])):
        values = np.array([[r[field] for r in sel if r[3] == e] for e in epochs])
        ax.plot(
          epochs,
          values.mean(1),
          color=colors[placement],
          label=f"{LABELS[placement]} (mean of {values.shape[1]} seeds)",
        )
        ax.fill_between(
          epochs,
          values.min(1),
          values.max(1),
          color=colors[placement],
          alpha=0.25,
          lw=0,
        )
      final = [r[4] for r in sel if r[3] == epochs[-1]]
      if all(np.isnan(final)):  # NaN is not drawn on a log axis: say so
        first = min(r[3] for r in sel if np.isnan(r[4]))
        axes[0, col].text(
          0.97,
          0.72 - 0.07 * PLACEMENTS.index(placement),
          f"loss NaN from epoch {first}",
          color=colors[placement],
          transform=axes[0, col].transAxes,
          ha="right",
          va="top",
          fontsize=8,
        )
    axes[0, col].set_title(f"learning rate {lr:g}")
    axes[0, col].set_yscale("log")
    # Diverging runs start at losses of 1e10 and more: keep the scale readable.
    finite = [r[4] for r in rows if r[1] == lr and np.isfinite(r[4])]
    axes[0, col].set_ylim(max(min(finite) / 2, 1e-5), 10)
    axes[1, col].set_ylim(0, 1.02)
    axes[1, col].set_xlabel("epoch")
  axes[0, 0].set_ylabel("training loss (mean over the epoch; clipped at 10)")
  axes[1, 0].set_ylabel("test accuracy (running statistics)")
  for ax in axes.ravel():
    ax.grid(True, alpha=0.3)
  axes[1, 0].legend(loc="lower right", fontsize=8)
  fig.suptitle(
    "BN before vs after the ReLU, small CNN on digits (SGD + Nesterov 0.9, "
    "batch 64, constant rate); band: min to max over the seeds"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(out: pathlib.Path, rates, seeds, epochs):
  start = time.perf_counter()
  data = load_data()
  print(
    f"digits: {len(data[0])} train, {len(data[1])} test images; "
    f"{len(rates)} learning rates x {len(seeds)} seeds x {len(PLACEMENTS)} variants, "
    f"{epochs} epochs of {len(data[0]) // BATCH} steps"
  )
  rows = []
  total = len(PLACEMENTS) * len(rates) * len(seeds) * epochs
  with tqdm(total=total, desc="placement", mininterval=1) as bar:
    for placement in PLACEMENTS:
      rows += train(placement, data, rates, seeds, epochs, bar)

  out.mkdir(parents=True, exist_ok=True)
  with open(out / "placement.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(FIELDS)
    writer.writerows(rows)
  plot(rows, rates, out / "placement.png")

  for lr in rates:
    for placement in PLACEMENTS:
      final = [r for r in rows if r[0] == placement and r[1] == lr and r[3] == epochs]
      accs = np.array([r[5] for r in final])
      losses = np.array([r[4] for r in final])
      print(
        f"lr {lr:g}, {LABELS[placement]}: final test accuracy "
        f"{accs.mean():.2%} (seeds {', '.join(f'{a:.2%}' for a in accs)}), "
        f"final training loss {np.mean(losses):.4f}"
      )
  print(f"wrote {out / 'placement.csv'} and {out / 'placement.png'}")
  print(f"done in {time.perf_counter() - start:.0f} s")
  return rows


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--quick", action="store_true", help="2 rates, 2 seeds, 2 epochs: a short check"
  )
  parser.add_argument("--epochs", type=int, default=20, help="epochs of the full run")
  parser.add_argument(
    "--rates",
    type=float,
    nargs="+",
    default=(0.01, 0.1, 1.0, 3.0, 10.0),
    help="learning rates of the full run",
  )
  parser.add_argument("--seeds", type=int, default=3, help="seeds of the full run")
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    # A --quick check must never overwrite the documented figure.
    help="output directory (default: docs/gallery/ for a full run, "
    "./gallery_quick/ with --quick)",
  )
  args = parser.parse_args()
  if args.out is None:
    args.out = pathlib.Path("gallery_quick") if args.quick else DEFAULT_OUT
  if args.quick:
    main(args.out, rates=(0.1, 1.0), seeds=(0, 1), epochs=2)
  else:
    main(args.out, rates=args.rates, seeds=range(args.seeds), epochs=args.epochs)
