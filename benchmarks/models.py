"""Whole-model rows of the benchmark suite: jitted training steps of networks.

The single-layer rows of ``run.py`` time one layer on a large tensor; in a
real model the same layer runs many times on small ones, where the fixed
cost of every call and the time to trace and compile the program matter
more. Two models, with every normalization layer in turn, as
``jaxnorm.linen`` modules against their ``flax.linen`` namesakes:

* ``mlp``: 50 blocks of ``Dense(64)`` + norm + ReLU on activations of shape
  (32, 8, 8, 64); the loss is the mean squared error to a random target.
* ``resnet``: a small ResNet-style CNN on (16, 16, 16, 3) images: a 3x3 conv
  stem (32 channels) + norm + ReLU, then 3 residual blocks of two 3x3 convs
  with a norm after each (the second block halves H and W and doubles the
  channels, with a 1x1 projection conv + norm on its shortcut), global
  average pooling and ``Dense(10)``; the loss is softmax cross-entropy
  against random labels.

Both libraries' modules get the same constructor arguments (each library's
defaults, plus ``use_running_average=False`` for batch norm and
``num_groups`` for group norm: 32, or the largest divisor of 32 that
divides the channels) and the very same initial variables. One step is
jitted: forward, backward, a plain SGD update of the parameters and, for
batch norm, the new running statistics.

For each (model, layer) the jaxnorm and flax steps are compiled once
(a warm-up, which also fills the process's own caches), compiled again
``compile_reps`` times, then timed ``reps`` times; both the compilations
and the steps alternate between the libraries, in alternating order (as
the single-layer rows do). Compile time is trace + lower + XLA compile of
a freshly built step (a new function and model, so that no jit cache is
hit); the row reports the median of the ``compile_reps`` compilations, or
the warm-up one's time when ``compile_reps`` is 0.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxnorm.linen as jnn
from jaxnorm import _benchmark as tb

LR = 0.01
GROUPS = 32
LAYERS = ("bn", "ln", "rms", "gn", "in")
LIBS = ("jaxnorm", "flax")
# The targets: jaxnorm's time over flax's, per row.
STEP_LIMIT = 1.0
COMPILE_LIMIT = 1.1

_NAMES = {
  "bn": "BatchNorm",
  "ln": "LayerNorm",
  "rms": "RMSNorm",
  "gn": "GroupNorm",
  "in": "InstanceNorm",
}


@dataclass(frozen=True)
class ModelConfig:
  """One benchmarked model.

  Attributes:
    kind: ``"mlp"`` or ``"resnet"``.
    input_shape: shape of the input batch, NHWC.
    blocks: number of Dense + norm + ReLU blocks (``mlp``) or residual
      blocks (``resnet``).
    features: width of the Dense layers, or channels of the stem conv.
    classes: number of classes of the ``resnet``'s head.
    downsample: indices of the ``resnet``'s residual blocks that halve H and
      W and double the channels (with a projection on the shortcut).
  """

  kind: str
  input_shape: tuple[int, ...]
  blocks: int
  features: int
  classes: int = 10
  downsample: tuple[int, ...] = (1,)

  @property
  def name(self) -> str:
    """A short label: the kind and the number of blocks, e.g. ``mlp50``."""
    return f"{self.kind}{self.blocks}"

  @property
  def norm_layers(self) -> int:
    """How many normalization layers one forward pass runs."""
    if self.kind == "mlp":
      return self.blocks
    return 1 + 2 * self.blocks + sum(i < self.blocks for i in self.downsample)

  @property
  def groups(self) -> int:
    """Group norm's ``num_groups``: 32, or fewer if the channels demand it."""
    return math.gcd(GROUPS, self.features)


MODELS = {
  "mlp": ModelConfig("mlp", (32, 8, 8, 64), blocks=50, features=64),
  "resnet": ModelConfig("resnet", (16, 16, 16, 3), blocks=3, features=32),
}
QUICK_MODELS = {
  "mlp": ModelConfig("mlp", (4, 4, 4, 16), blocks=3, features=16),
  # One block, which downsamples: every code path of the full model.
  "resnet": ModelConfig("resnet", (2, 8, 8, 3), blocks=1, features=8, downsample=(0,)),
}


# --------------------------------------------------------------------------
# The models. `norm` is a module constructor (a `functools.partial` of the
# library's class), as in flax's own ResNet example.
# --------------------------------------------------------------------------


class DenseStack(nn.Module):
  """``blocks`` x (Dense + norm + ReLU), on the last axis of the input."""

  norm: Callable[..., nn.Module]
  blocks: int
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.blocks):
      x = nn.Dense(self.features, name=f"dense{i}")(x)
      x = self.norm(name=f"norm{i}")(x)
      x = nn.relu(x)
    return x


class ResidualBlock(nn.Module):
  """conv3x3 + norm + ReLU + conv3x3 + norm, plus the shortcut, then ReLU."""

  norm: Callable[..., nn.Module]
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = partial(nn.Conv, self.features, use_bias=False, padding="SAME")
    s = (self.strides, self.strides)
    y = conv((3, 3), strides=s, name="conv1")(x)
    y = nn.relu(self.norm(name="norm1")(y))
    y = conv((3, 3), name="conv2")(y)
    y = self.norm(name="norm2")(y)
    if x.shape != y.shape:
      x = conv((1, 1), strides=s, name="proj")(x)
      x = self.norm(name="proj_norm")(x)
    return nn.relu(x + y)


class SmallResNet(nn.Module):
  """A conv stem and ``blocks`` residual blocks, average pooling, a Dense head."""

  norm: Callable[..., nn.Module]
  blocks: int
  features: int
  classes: int
  downsample: tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.features
    x = nn.Conv(c, (3, 3), use_bias=False, padding="SAME", name="stem")(x)
    x = nn.relu(self.norm(name="stem_norm")(x))
    for i in range(self.blocks):
      strides = 1
      if i in self.downsample:
        c, strides = 2 * c, 2
      x = ResidualBlock(self.norm, c, strides, name=f"block{i}")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.classes, name="head")(x)


def norm_constructor(lib: str, layer: str, cfg: ModelConfig) -> Callable:
  """The normalization module of ``lib`` for ``layer``, its arguments bound."""
  ns = {"jaxnorm": jnn, "flax": nn}[lib]
  cls = getattr(ns, _NAMES[layer])
  if layer == "bn":
    return partial(cls, use_running_average=False)
  if layer == "gn":
    return partial(cls, num_groups=cfg.groups)
  return cls


def build_model(lib: str, layer: str, cfg: ModelConfig) -> nn.Module:
  """A fresh, unbound model of ``cfg.kind`` with ``lib``'s ``layer``."""
  norm = norm_constructor(lib, layer, cfg)
  if cfg.kind == "mlp":
    return DenseStack(norm, cfg.blocks, cfg.features)
  if cfg.kind == "resnet":
    return SmallResNet(norm, cfg.blocks, cfg.features, cfg.classes, cfg.downsample)
  raise ValueError(f"unknown model kind {cfg.kind!r}")


def _loss(kind: str, out: jax.Array, target: jax.Array) -> jax.Array:
  if kind == "mlp":
    return jnp.mean(jnp.square(out - target))
  logp = jax.nn.log_softmax(out)
  return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=-1))


def make_step(model: nn.Module, kind: str) -> Callable:
  """``(variables, x, target) -> (new_variables, loss)``: one SGD step.

  ``variables`` holds ``params`` and, for batch norm, ``batch_stats``, which
  the step replaces by the running averages updated with the batch's.
  Every call returns a new function, so that ``jax.jit`` traces it anew.
  """

  def step(variables, x, target):
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p):
      if state:
        out, new_state = model.apply({"params": p, **state}, x, mutable=list(state))
      else:
        out, new_state = model.apply({"params": p}, x), {}
      return _loss(kind, out, target), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
    return {"params": params, **new_state}, loss

  return step


def inputs(cfg: ModelConfig, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A random input batch and its target (a tensor, or integer labels)."""
  kx, kt = jax.random.split(key)
  x = jax.random.normal(kx, cfg.input_shape, jnp.float32)
  if cfg.kind == "mlp":
    shape = (*cfg.input_shape[:-1], cfg.features)
    return x, jax.random.normal(kt, shape, jnp.float32)
  return x, jax.random.randint(kt, (cfg.input_shape[0],), 0, cfg.classes)


def init_variables(layer: str, cfg: ModelConfig, x: jax.Array) -> dict:
  """The initial variables, shared by both libraries' models.

  Initialized by flax's model; jaxnorm's must create the same tree (same
  names, shapes and dtypes), or this raises ``ValueError``.
  """
  key = jax.random.key(0)
  variables = build_model("flax", layer, cfg).init(key, x)
  mine = jax.eval_shape(build_model("jaxnorm", layer, cfg).init, key, x)
  spec = jax.tree.map(lambda a: (a.shape, a.dtype), variables)
  if jax.tree.map(lambda a: (a.shape, a.dtype), mine) != spec:
    raise ValueError(f"jaxnorm's {_NAMES[layer]} model has other variables")
  return dict(variables)


def compile_step(lib: str, layer: str, cfg: ModelConfig, args: Sequence[Any]):
  """Builds ``lib``'s step anew, then traces, lowers and compiles it, timed.

  Returns:
    ``(compiled, (trace_s, lower_s, xla_s))``.
  """
  step = make_step(build_model(lib, layer, cfg), cfg.kind)
  t0 = time.perf_counter()
  traced = jax.jit(step).trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  return compiled, (t1 - t0, t2 - t1, t3 - t2)


@dataclass
class ModelEntry:
  lib: str
  compiled: Any
  loss: float
  first_split: tuple  # (trace, lower, xla) seconds of the warm-up compilation
  compile_splits: list = field(default_factory=list)  # those timed after it
  times: list = field(default_factory=list)


def run_model(
  layer: str, cfg: ModelConfig, reps: int, compile_reps: int, key: jax.Array
) -> list[ModelEntry]:
  """Compiles and times jaxnorm's and flax's training step of one model."""
  x, target = inputs(cfg, key)
  args = (init_variables(layer, cfg, x), x, target)
  entries = []
  for lib in LIBS:
    compiled, split = compile_step(lib, layer, cfg, args)
    _, loss = jax.block_until_ready(compiled(*args))  # warm-up, untimed
    entries.append(ModelEntry(lib, compiled, float(loss), split))
  for rep in range(compile_reps):
    for e in entries if rep % 2 == 0 else entries[::-1]:
      e.compile_splits.append(compile_step(e.lib, layer, cfg, args)[1])
  for rep in range(reps):
    # Interleaved and in alternating order, as in run.py's `run_case`.
    for e in entries if rep % 2 == 0 else entries[::-1]:
      e.times.append(tb.time_once(e.compiled, *args))
  return entries


def build_rows(layer: str, cfg: ModelConfig, entries: list[ModelEntry]) -> list:
  """One JSON row per library; ratios are over every other library's."""
  med = {e.lib: statistics.median(e.times) for e in entries}
  # With no timed compilation (compile_reps=0) the warm-up one stands in.
  splits = {e.lib: e.compile_splits or [e.first_split] for e in entries}
  comp = {lib: statistics.median(sum(s) for s in sp) for lib, sp in splits.items()}
  loss = {e.lib: e.loss for e in entries}
  rows = []
  for e in entries:
    sp = splits[e.lib]
    rows.append(
      {
        "model": cfg.name,
        "kind": cfg.kind,
        "layer": layer,
        "input_shape": list(cfg.input_shape),
        "blocks": cfg.blocks,
        "features": cfg.features,
        "norm_layers": cfg.norm_layers,
        "lib": e.lib,
        "median_s": med[e.lib],
        "min_s": min(e.times),
        "times_s": e.times,
        "compile_s": comp[e.lib],
        "compile_times_s": [sum(s) for s in e.compile_splits],
        "first_compile_s": sum(e.first_split),
        "trace_s": statistics.median(s[0] for s in sp),
        "lower_s": statistics.median(s[1] for s in sp),
        "xla_compile_s": statistics.median(s[2] for s in sp),
        "loss": e.loss,
        "ratio": {o: med[e.lib] / med[o] for o in med if o != e.lib},
        "compile_ratio": {o: comp[e.lib] / comp[o] for o in comp if o != e.lib},
        "loss_diff": {o: abs(e.loss - loss[o]) for o in loss if o != e.lib},
      }
    )
  return rows


def run(
  configs: dict[str, ModelConfig],
  layers: Sequence[str],
  reps: int,
  compile_reps: int,
  key: jax.Array,
  progress: Callable = iter,
  on_row: Callable | None = None,
) -> list[dict]:
  """Every (model, layer) row; ``on_row(rows, done)`` after each case."""
  cases = [(cfg, layer) for cfg in configs.values() for layer in layers]
  rows = []
  for i, (cfg, layer) in enumerate(progress(cases)):
    entries = run_model(layer, cfg, reps, compile_reps, jax.random.fold_in(key, i))
    rows += build_rows(layer, cfg, entries)
    del entries
    if on_row is not None:
      on_row(rows, i + 1 == len(cases))
  return rows


def summary(rows: list[dict]) -> dict:
  """The worst ratios to flax and how many rows miss the issue's targets."""
  j = [r for r in rows if r["lib"] == "jaxnorm" and "flax" in r["ratio"]]
  step = [r["ratio"]["flax"] for r in j]
  comp = [r["compile_ratio"]["flax"] for r in j]
  return {
    "rows": len(j),
    "max_step_ratio_vs_flax": max(step, default=None),
    "max_compile_ratio_vs_flax": max(comp, default=None),
    "step_limit": STEP_LIMIT,
    "compile_limit": COMPILE_LIMIT,
    "rows_over_step_limit": sum(v > STEP_LIMIT for v in step),
    "rows_over_compile_limit": sum(v > COMPILE_LIMIT for v in comp),
  }


def _fmt(v, spec):
  return "–" if v is None else format(v, spec)


def markdown(rows: list[dict], compile_reps: int) -> str:
  """The whole-model table, with its legend and a summary line."""
  lines = [
    "Whole-model training steps (forward, backward, SGD update; batch norm "
    "also updates its running statistics), float32. Step: median ms. "
    "`÷flax`: jaxnorm's over flax's (< 1 means jaxnorm is faster). Compile: "
    "trace + lower + XLA compile of a freshly built step, "
    + (
      f"median seconds of {compile_reps} after a warm-up compilation"
      if compile_reps
      else "seconds of the first compilation"
    )
    + "; `trace+lower` is the "
    "part spent in JAX and flax before XLA. `Δloss`: the difference of the "
    "two steps' losses.",
    "",
  ]
  head = [
    "model",
    "input",
    "norms",
    "layer",
    "jaxnorm ms",
    "flax ms",
    "÷flax",
    "jaxnorm compile s",
    "flax compile s",
    "compile ÷flax",
    "trace+lower s (jaxnorm / flax)",
    "Δloss",
  ]
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "---|" * len(head))
  by_case = {}
  for r in rows:
    by_case.setdefault((r["model"], r["layer"]), {})[r["lib"]] = r
  for (model, layer), libs in by_case.items():
    j, f = libs.get("jaxnorm"), libs.get("flax")
    if j is None or f is None:
      continue
    cells = [
      model,
      str(tuple(j["input_shape"])),
      str(j["norm_layers"]),
      layer,
      f"{j['median_s'] * 1e3:.2f}",
      f"{f['median_s'] * 1e3:.2f}",
      f"{j['ratio']['flax']:.2f}",
      f"{j['compile_s']:.2f}",
      f"{f['compile_s']:.2f}",
      f"{j['compile_ratio']['flax']:.2f}",
      f"{_trace_lower(j)} / {_trace_lower(f)}",
      f"{j['loss_diff']['flax']:.1e}",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  s = summary(rows)
  lines += [
    "",
    f"Whole models, jaxnorm ÷ flax: step time max "
    f"{_fmt(s['max_step_ratio_vs_flax'], '.2f')} (target ≤ {STEP_LIMIT}), "
    f"{s['rows_over_step_limit']} of {s['rows']} rows over; compile time max "
    f"{_fmt(s['max_compile_ratio_vs_flax'], '.2f')} (target ≤ {COMPILE_LIMIT}), "
    f"{s['rows_over_compile_limit']} of {s['rows']} rows over.",
  ]
  return "\n".join(lines) + "\n"


def _trace_lower(row):
  return f"{row['trace_s'] + row['lower_s']:.2f}"
