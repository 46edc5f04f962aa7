"""Test accuracy against the per-device batch size, for eight normalizations.

The trend of Figure 1 of Wu & He, "Group Normalization" (ECCV 2018): batch
norm with per-device statistics degrades when each device holds only a few
images, while normalizations that do not use the batch (GN, LN, IN, FRN) do
not care, and synchronized BN, whose statistics span every device, holds up.

Setup. A small CNN (three conv3x3 -> norm -> ReLU blocks of 16, 32 and 32
channels, the second with stride 2; global average pooling; dense) learns
scikit-learn's digits (8x8 grey images in [0, 1], 1437 train and 360 test
images, no download), data-parallel over 8 devices with ``jax.shard_map``
over a mesh axis ``"batch"``. The per-device batch ``b`` runs over 1, 2, 4,
8, 16 and 32 (global batch ``8 b``), and the normalization over:

- ``bn``: batch norm with each device's own statistics (no ``axis_name``);
- ``sync_bn``: batch norm with ``axis_name="batch"`` (statistics of the
  global batch);
- ``gn``: group norm, 4 channels per group; ``ln``: layer norm over H, W and
  C; ``in``: instance norm; ``frn``: filter response norm with its TLU in
  place of the ReLU;
- ``brn``: batch renorm, per-device statistics, with the paper's warm-up of
  ``r_max`` (1 -> 3) and ``d_max`` (0 -> 5) scaled to the run's length (both
  start at a quarter of the steps and reach their final values at half);
- ``mabn``: moving average BN, per-device, its backward statistics written
  back with ``jn.apply_mabn_grad_moments``, a window of ``32 // b`` batches
  (32 images per device, as the reference code sets the window to the
  simulated batch over the real one) and its renormalization warm-up over
  the first quarter of the steps.

Every per-device layer (``bn``, ``brn``, ``mabn``) keeps one state per device
(its running statistics, and MABN's buffers), as each device would if it
normalized alone; evaluation uses their average over the devices. For plain
BN that equals averaging them after every step, as the flax examples do (the
update is linear); batch renorm and MABN read their running statistics in
training, so each device reads its own. All running averages use
``momentum=0.9`` (PyTorch's default), so that they settle within the 112
steps of the largest batch.

Training budget: the same for every batch size, as in the GN paper: 20
epochs, so b = 1 takes 3592 steps and b = 32 takes 112. The optimizer is
Adam, its peak learning rate 8e-3 at b = 1 and scaled with the square root of
the global batch (4.5e-2 at b = 32), warmed up linearly over the first 10 %
of the steps and decayed with a cosine. The GN paper's SGD with the learning
rate scaled linearly made the large-batch runs (112 steps at learning
rates of 0.4 to 1.6) of GN, LN, FRN and MABN stall or diverge while BN's
trained: the comparison would have measured the learning rate rather than
the normalization. Each
(method, batch size) is one compiled program, a ``lax.scan`` over every
step in which the three seeds (initialization and data order) are
``vmap``-ped. Test accuracy is in evaluation mode (running statistics for
the batch-statistics layers).

What it shows (the full run; ``docs/gallery/batch_size.md`` has the
figure and the table): per-device BN falls to 68.5 % test accuracy at one
image per device (its training loss is as low as the others': in training
it normalizes each image by its own statistics, at test time by the running
average), against 98.9 % for GN and 99.3 % for sync BN, and is within a
point of sync BN from two images per device on. GN, LN, IN, FRN and sync BN
stay between 97.4 % and 99.4 % at every batch size, and batch renorm and
MABN, still per-device, bring b = 1 back to 98.0 % and 99.4 %.

Without an accelerator the script simulates 8 CPU devices (it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax).
It writes ``batch_size.png`` and ``batch_size.csv`` to ``--out`` (default:
the documentation's ``docs/gallery/``, or ``./gallery_quick/`` with
``--quick``) and prints a table.

Run::

    python examples/batch_size_sweep.py           # about 12 minutes on 2 CPU cores
    python examples/batch_size_sweep.py --quick   # a short check (b = 1 and 8)
"""

from __future__ import annotations

import os

# Simulated devices must be requested before jax is imported; the flag only
# affects the host platform, so it is not added when an accelerator is asked for.
_ACCELERATORS = ("cuda", "gpu", "rocm", "tpu")
if not any(p in os.environ.get("JAX_PLATFORMS", "").lower() for p in _ACCELERATORS):
  _FLAG = "--xla_force_host_platform_device_count=8"
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import argparse  # noqa: E402
import csv  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxnorm as jn  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

AXIS = "batch"
NUM_DEVICES = 8
BLOCKS = ((16, 1), (32, 2), (32, 1))  # (channels, stride) of each conv block
NUM_CLASSES = 10
GROUP_SIZE = 4  # channels per group of GN
MOMENTUM = 0.9  # of every running average (PyTorch's momentum=0.1)
LR_AT_8 = 8e-3  # Adam's peak learning rate at a global batch of 8
EPOCHS = 20
WARMUP = 0.1  # fraction of the steps with a linear learning-rate warm-up
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
METHODS = ("bn", "sync_bn", "gn", "ln", "in", "frn", "brn", "mabn")
LABELS = {
  "bn": "BN (per-device)",
  "sync_bn": "sync BN",
  "gn": "GN",
  "ln": "LN",
  "in": "IN",
  "frn": "FRN + TLU",
  "brn": "batch renorm (per-device)",
  "mabn": "MABN (per-device)",
}
PER_DEVICE_STATE = ("bn", "brn", "mabn")
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "gallery"
COLUMNS = (
  "method",
  "per_device_batch",
  "global_batch",
  "seed",
  "test_accuracy",
  "final_train_loss",
  "mean_test_accuracy",
  "min_test_accuracy",
  "max_test_accuracy",
)


@dataclass(frozen=True)
class Run:
  """One (method, per-device batch) point of the sweep and its budget."""

  method: str
  per_device_batch: int
  steps: int

  @property
  def global_batch(self) -> int:
    return self.per_device_batch * NUM_DEVICES

  @property
  def quarter(self) -> int:
    return self.steps // 4


def load_data(seed: int = 0):
  """Digits as NHWC float32 images in [0, 1], split 80 / 20, stratified."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
  labels = digits.target.astype(np.int32)
  return train_test_split(
    images, labels, test_size=0.2, random_state=seed, stratify=labels
  )


def norm_init(run: Run, channels: int):
  """The parameters and the state (``None`` if it has none) of one layer."""
  m = run.method
  if m in ("bn", "sync_bn"):
    return jn.batch_norm_init(channels)
  if m == "brn":
    return jn.batch_renorm_init(channels)
  if m == "mabn":
    window = max(32 // run.per_device_batch, 1)
    return jn.moving_average_batch_norm_init(channels, buffer_size=window)
  if m == "frn":
    return jn.filter_response_norm_init(channels), None
  if m == "ln":
    return jn.layer_norm_init(channels), None
  return jn.group_norm_init(channels), None  # gn, in


def norm_apply(run: Run, x, params, state, *, train: bool, step):
  """Normalizes ``x`` (NHWC); returns ``(y, new_state)``."""
  m, evaluate = run.method, not train
  if m in ("bn", "sync_bn"):
    return jn.batch_norm(
      x,
      params,
      state,
      use_running_average=evaluate,
      momentum=MOMENTUM,
      axis_name=AXIS if m == "sync_bn" and train else None,
    )
  if m == "brn":
    q = run.quarter
    r_max, d_max = jn.batch_renorm_schedule(
      step, r_max_steps=(q, 2 * q), d_max_steps=(q, 2 * q)
    )
    return jn.batch_renorm(
      x,
      params,
      state,
      use_running_average=evaluate,
      momentum=MOMENTUM,
      r_max=r_max,
      d_max=d_max,
    )
  if m == "mabn":
    return jn.moving_average_batch_norm(
      x,
      params,
      state,
      use_running_average=evaluate,
      momentum=MOMENTUM,
      renorm_warmup_steps=run.quarter,
    )
  if m == "gn":
    return jn.group_norm(x, params, num_groups=None, group_size=GROUP_SIZE), None
  if m == "ln":
    return jn.layer_norm(x, params, reduction_axes=(1, 2, 3), feature_axes=-1), None
  if m == "in":
    return jn.instance_norm(x, params), None
  if m == "frn":
    return jn.filter_response_norm(x, params), None
  raise ValueError(f"unknown method {m!r}")


def init(run: Run, key: jax.Array):
  """He-initialized convolutions (no bias: the norm's bias replaces it)."""
  params, state = {}, {}
  c_in = 1
  for i, (c_out, _) in enumerate(BLOCKS):
    key, sub = jax.random.split(key)
    std = np.sqrt(2.0 / (9 * c_in))
    params[f"conv{i}"] = jax.random.normal(sub, (3, 3, c_in, c_out)) * std
    params[f"norm{i}"], state[f"norm{i}"] = norm_init(run, c_out)
    c_in = c_out
  key, sub = jax.random.split(key)
  params["dense"] = {
    "w": jax.random.normal(sub, (c_in, NUM_CLASSES)) / np.sqrt(c_in),
    "b": jnp.zeros(NUM_CLASSES),
  }
  return params, state


def conv(x, kernel, stride: int):
  """A 3x3 "SAME" convolution as patches times a matrix.

  Under ``vmap`` over the seeds this is a batched matrix product; a batched
  ``lax.conv_general_dilated`` becomes a grouped convolution, slower on CPU.
  """
  kh, kw, c_in, c_out = kernel.shape
  patches = lax.conv_general_dilated_patches(
    x,
    (kh, kw),
    (stride, stride),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )  # (N, H', W', c_in * kh * kw), the input channel slowest
  return patches @ kernel.transpose(2, 0, 1, 3).reshape(c_in * kh * kw, c_out)


def apply(run: Run, params, state, images, *, train: bool, step=0):
  """Logits and the new normalization state."""
  h, new_state = images, {}
  for i, (_, stride) in enumerate(BLOCKS):
    h = conv(h, params[f"conv{i}"], stride)
    h, new_state[f"norm{i}"] = norm_apply(
      run, h, params[f"norm{i}"], state[f"norm{i}"], train=train, step=step
    )
    if run.method != "frn":  # FRN's TLU is its activation
      h = jax.nn.relu(h)
  h = h.mean(axis=(1, 2))
  return h @ params["dense"]["w"] + params["dense"]["b"], new_state


def make_optimizer(run: Run):
  """Adam, its learning rate scaled with the square root of the global batch."""
  peak = LR_AT_8 * np.sqrt(run.global_batch / 8)
  warmup = max(int(WARMUP * run.steps), 1)
  return optax.adam(optax.warmup_cosine_decay_schedule(0.0, peak, warmup, run.steps))


def make_train(run: Run, mesh: Mesh):
  """A jitted function that trains every seed for ``run.steps`` steps.

  Its inputs hold a leading seed axis; per-device states also a leading
  device axis, sharded over the mesh.
  """
  optimizer = make_optimizer(run)
  per_device_state = run.method in PER_DEVICE_STATE

  def loss_fn(params, state, images, labels, step):
    logits, new_state = apply(run, params, state, images, train=True, step=step)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # This device's share of the mean over the global batch: shard_map's
    # autodiff sums the replicated parameters' gradients over the devices.
    return jnp.sum(ce) / run.global_batch, new_state

  def one_step(params, opt_state, state, images, labels, step):
    if run.method == "mabn":
      # MABN's backward statistics come back as the state's gradient.
      grad_fn = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True, allow_int=True
      )
      (loss, new_state), (grads, state_grads) = grad_fn(
        params, state, images, labels, step
      )
      new_state = jn.apply_mabn_grad_moments(new_state, state_grads)
    else:
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      (loss, new_state), grads = grad_fn(params, state, images, labels, step)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_state, loss

  seeds_step = jax.vmap(one_step, in_axes=(0, 0, 0, 0, 0, None))

  def per_device(params, opt_state, state, images, labels):
    if per_device_state:
      state = jax.tree.map(lambda a: a[0], state)

    def body(carry, xs):
      params, opt_state, state = carry
      images_t, labels_t, step = xs
      params, opt_state, state, loss = seeds_step(
        params, opt_state, state, images_t, labels_t, step
      )
      return (params, opt_state, state), loss

    steps = jnp.arange(run.steps)
    (params, opt_state, state), losses = lax.scan(
      body, (params, opt_state, state), (images, labels, steps)
    )
    if per_device_state:
      state = jax.tree.map(lambda a: a[None], state)
    return params, state, lax.psum(losses, AXIS)

  state_spec = P(AXIS) if per_device_state else P()
  data_spec = P(None, None, AXIS)
  return jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(), state_spec, data_spec, data_spec),
      out_specs=(P(), state_spec, P()),
    )
  )


def batch_indices(num_train: int, run: Run, seed: int) -> np.ndarray:
  """``(steps, global_batch)`` image indices, reshuffled every epoch."""
  rng = np.random.default_rng(seed)
  need = run.steps * run.global_batch
  epochs = -(-need // num_train)
  order = np.concatenate([rng.permutation(num_train) for _ in range(epochs)])
  return order[:need].reshape(run.steps, run.global_batch)


def eval_state(run: Run, state):
  """The devices' average of per-device states (counters: device 0's)."""
  if run.method not in PER_DEVICE_STATE:
    return state
  return jax.tree.map(
    lambda a: a.mean(0) if jnp.issubdtype(a.dtype, jnp.floating) else a[0], state
  )


def train_and_test(run: Run, data, mesh: Mesh, seeds) -> tuple[np.ndarray, ...]:
  """Test accuracy and final training loss of every seed."""
  x_train, x_test, y_train, y_test = data
  idx = np.stack([batch_indices(len(x_train), run, s) for s in seeds], axis=1)
  images, labels = x_train[idx], y_train[idx]  # (steps, seeds, global batch, ...)
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
  params, state = jax.vmap(lambda k: init(run, k))(keys)
  opt_state = jax.vmap(make_optimizer(run).init)(params)
  if run.method in PER_DEVICE_STATE:
    state = jax.tree.map(lambda a: jnp.stack([a] * NUM_DEVICES), state)
  state_sharding = NamedSharding(
    mesh, P(AXIS) if run.method in PER_DEVICE_STATE else P()
  )
  data_sharding = NamedSharding(mesh, P(None, None, AXIS))
  params, opt_state = jax.device_put((params, opt_state), NamedSharding(mesh, P()))
  state = jax.device_put(state, state_sharding)
  images, labels = jax.device_put((images, labels), data_sharding)
  params, state, losses = make_train(run, mesh)(
    params, opt_state, state, images, labels
  )
  state = eval_state(run, state)

  @jax.jit
  def accuracy(params, state):
    logits, _ = apply(run, params, state, x_test, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y_test)

  acc = jax.vmap(accuracy)(params, state)
  tail = max(run.steps // 20, 1)  # the last 5 % of the steps
  return np.asarray(acc), np.asarray(losses[-tail:].mean(0))


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def plot(path: pathlib.Path, summary: dict, methods, batch_sizes, num_seeds: int):
  """Mean and spread against b: all of it, then the top of the range."""
  fig, (full, top) = plt.subplots(1, 2, figsize=(12.0, 5.0))
  markers = "osD^v<>Xp"
  x = np.array(batch_sizes, float)
  for i, m in enumerate(methods):
    mean, low, high = (
      np.array([summary[m, b][k] for b in batch_sizes]) * 100 for k in range(3)
    )
    style = dict(
      linestyle="--" if m in PER_DEVICE_STATE else "-",
      marker=markers[i % len(markers)],
      color=f"C{i}",
      label=LABELS[m],
    )
    full.plot(x, mean, **style)
    full.fill_between(x, low, high, color=f"C{i}", alpha=0.15)
    # Error bars, each method shifted a little sideways so that they can
    # be told apart where the curves overlap.
    shifted = x * 2.0 ** (0.035 * (i - (len(methods) - 1) / 2))
    top.errorbar(
      shifted, mean, yerr=(mean - low, high - mean), capsize=2.5, ms=5, **style
    )
  for ax in (full, top):
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(b) for b in batch_sizes])
    ax.set_xlabel(f"images per device (global batch: {NUM_DEVICES} x that)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
  best = max(100 * v[0] for v in summary.values())
  spread = "min to max over seeds" if num_seeds > 1 else "one seed"
  full.set_title(f"every method (bands: {spread})")
  top.set_title(f"the top 4 points (bars: {spread})")
  top.set_ylim(best - 4.0, min(best + 1.0, 100.4))
  full.legend(loc="lower right", fontsize=9)
  seeds = f"{num_seeds} seed{'s' if num_seeds > 1 else ''}"
  fig.suptitle(
    f"Digits, small CNN, data-parallel over {NUM_DEVICES} devices, the same "
    f"epochs at every batch size: mean of {seeds}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(methods, batch_sizes, seeds, epochs: float, out: pathlib.Path):
  data = load_data()
  num_train = len(data[0])
  devices = jax.devices()[:NUM_DEVICES]
  if len(devices) < NUM_DEVICES:
    raise SystemExit(f"needs {NUM_DEVICES} devices, found {len(devices)}")
  mesh = Mesh(np.array(devices), (AXIS,))
  print(
    f"{NUM_DEVICES} {devices[0].platform.upper()} devices; digits: {num_train} "
    f"train, {len(data[1])} test images; {epochs:g} epochs per run, "
    f"{len(seeds)} seed(s)"
  )
  start = time.perf_counter()
  rows, summary = [], {}
  grid = [(m, b) for b in batch_sizes for m in methods]
  for m, b in tqdm(grid, desc="runs"):
    steps = max(round(epochs * num_train / (b * NUM_DEVICES)), 1)
    run = Run(m, b, steps)
    acc, loss = train_and_test(run, data, mesh, seeds)
    summary[m, b] = (float(acc.mean()), float(acc.min()), float(acc.max()))
    for s, a, l_ in zip(seeds, acc, loss, strict=True):
      rows.append(
        {
          "method": m,
          "per_device_batch": b,
          "global_batch": run.global_batch,
          "seed": s,
          "test_accuracy": f"{a:.4f}",
          "final_train_loss": f"{l_:.4f}",
          "mean_test_accuracy": f"{summary[m, b][0]:.4f}",
          "min_test_accuracy": f"{summary[m, b][1]:.4f}",
          "max_test_accuracy": f"{summary[m, b][2]:.4f}",
        }
      )
  out.mkdir(parents=True, exist_ok=True)
  write_csv(out / "batch_size.csv", rows)
  plot(out / "batch_size.png", summary, methods, batch_sizes, len(seeds))

  width = max(len(LABELS[m]) for m in methods)
  print("test accuracy (%), mean [min, max] over seeds, by images per device:")
  print(" " * width + "".join(f"{b:>18}" for b in batch_sizes))
  for m in methods:
    cells = "".join(
      f"{100 * summary[m, b][0]:>7.1f} [{100 * summary[m, b][1]:4.1f},"
      f"{100 * summary[m, b][2]:5.1f}]"
      for b in batch_sizes
    )
    print(f"{LABELS[m]:<{width}}{cells}")
  print(f"wrote {out / 'batch_size.png'} and {out / 'batch_size.csv'}")
  print(f"done in {time.perf_counter() - start:.0f} s")
  return summary


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="b = 1 and 8, BN, sync BN and GN, one seed, 2 epochs",
  )
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
    main(("bn", "sync_bn", "gn"), (1, 8), (0,), 2, args.out)
  else:
    main(METHODS, BATCH_SIZES, (0, 1, 2), EPOCHS, args.out)
