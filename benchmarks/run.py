"""Benchmark suite: jaxnorm against flax.linen, haiku, equinox and jax.nn.

Every core layer (batch norm in training mode, layer norm, RMS norm, group
norm, instance norm) at CNN (NHWC) and transformer shapes, in float32 and
bfloat16, forward and forward+backward (the gradient of ``sum(y * dy)`` with
respect to ``x`` and the parameters). For one (layer, shape, dtype, mode) the
implementations are compiled, then timed side by side with their runs
interleaved, and each reports the median of ``--reps`` calls.

Each row reports the wall time, its ratio to every peer, the compile time,
the bytes saved for the backward pass over the bytes of ``x`` (leaves of the
``jax.vjp`` closure, under ``jax.eval_shape``), and XLA's ``bytes accessed``
over the compulsory bytes (forward: read ``x``, write ``y``; forward+backward:
read ``x`` and ``dy``, write ``dx``, plus one more read of ``x`` for batch
norm's batch statistics). On a GPU it also reports the bandwidth achieved on
the compulsory bytes as a fraction of the device's peak.

With ``--models`` the suite also times whole models, jaxnorm's
``jaxnorm.linen`` layers against flax.linen's in jitted training steps of
50 x (Dense + norm + ReLU) and of a small ResNet-style CNN: step time and
compile time, each over flax's (see ``benchmarks/models.py``). Their rows
go to ``model_rows`` in ``results.json`` and to a table of their own in
``results.md``.

Usage::

  python benchmarks/run.py                      # every layer row (slow on a CPU)
  python benchmarks/run.py --quick --out /tmp/b # a smoke run, under a minute
  python benchmarks/run.py --layers ln,rms --shapes tr1 --dtypes float32
  python benchmarks/run.py --models             # layer rows, then model rows
  python benchmarks/run.py --models-only        # the model rows alone
  python benchmarks/run.py --models-only --models mlp --layers bn,gn

Writes ``results.json``, ``results.md`` and ``ratios.png`` (layer rows only)
to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm as jn
from jaxnorm import _benchmark as tb

EPS = 1e-5
GROUPS = 32

SHAPES = {
  "cnn1": (64, 56, 56, 64),
  "cnn2": (256, 14, 14, 256),
  "tr1": (16, 512, 1024),
  "tr2": (8, 2048, 4096),
}
QUICK_SHAPES = {"cnn-tiny": (8, 8, 8, 64), "tr-tiny": (4, 32, 128)}
LAYERS = ("bn", "ln", "rms", "gn", "in")
LIBS = ("jaxnorm", "flax", "haiku", "equinox", "jax.nn")
MODES = ("fwd", "fwd+bwd")

# Peak HBM bandwidth in bytes/s by (a substring of) `device.device_kind`.
# Vendors' data sheets; the first match wins, so specific names come first.
PEAK_BANDWIDTH = (
  ("H200", 4.8e12),
  ("H100 PCIe", 2.0e12),
  ("H100 NVL", 3.9e12),
  ("H100", 3.35e12),  # SXM
  ("GH200", 4.0e12),
  ("B200", 8.0e12),
  ("A100-SXM4-80GB", 2.039e12),
  ("A100 80GB PCIe", 1.935e12),
  ("A100", 1.555e12),  # 40 GB
  ("L40S", 0.864e12),
  ("A10G", 0.6e12),
  ("V100", 0.9e12),
  ("T4", 0.32e12),
  ("TPU v5 lite", 0.819e12),
  ("TPU v5p", 2.765e12),
  ("TPU v4", 1.2e12),
)


def steady_heap() -> bool:
  """Keeps freed buffers in the process's heap; returns whether it could.

  By default glibc hands a freed buffer of more than a few MiB back to the
  operating system, so the next call's output of that size is mapped anew
  and page-faulted in, one 4 KiB page at a time: on a CPU that costs more
  than the layer itself at these shapes (a 32 MiB output: 8192 faults,
  about 5 ms), and how often it happens depends on the allocator's state,
  not on the program being timed. One arena with no mmap and no trimming
  makes every call reuse the memory of the last one, as a training step
  does in steady state. glibc only; elsewhere nothing changes.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
  return all(
    libc.mallopt(opt, value) == 1
    for opt, value in (
      (m_arena_max, 1),
      (m_mmap_threshold, 1 << 30),
      (m_trim_threshold, (1 << 31) - 1),
    )
  )


def load_models():
  """``benchmarks/models.py``, the whole-model rows, imported by its path.

  By path, so that it loads the same whether this file runs as a script or
  is imported from elsewhere (as the tests do).
  """
  name = "jaxnorm_bench_models"
  if name in sys.modules:
    return sys.modules[name]
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models.py")
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod  # dataclasses look their module up here
  spec.loader.exec_module(mod)
  return mod


def peak_bandwidth(device_kind: str) -> float | None:
  """Peak memory bandwidth (bytes/s) of a device kind, or ``None`` if unknown."""
  for name, bw in PEAK_BANDWIDTH:
    if name.lower() in device_kind.lower():
      return bw
  return None


# --------------------------------------------------------------------------
# The implementations. Each builder returns `(fn, params)` with
# `fn(x, params) -> y`, or None where the library has no such layer.
# Every one returns y in the dtype of x and uses epsilon 1e-5.
# --------------------------------------------------------------------------


def _jaxnorm(layer, shape, dtype):
  c = shape[-1]
  if layer == "bn":
    params, state = jn.batch_norm_init(c)

    def fn(x, p):
      return jn.batch_norm(x, p, state, use_running_average=False, epsilon=EPS)[0]

    return fn, params
  if layer == "ln":
    return (lambda x, p: jn.layer_norm(x, p, epsilon=EPS)), jn.layer_norm_init(c)
  if layer == "rms":
    return (lambda x, p: jn.rms_norm(x, p, epsilon=EPS)), jn.rms_norm_init(c)
  if layer == "gn":
    return (
      lambda x, p: jn.group_norm(x, p, num_groups=GROUPS, epsilon=EPS)
    ), jn.group_norm_init(c)
  if layer == "in":
    return (lambda x, p: jn.instance_norm(x, p, epsilon=EPS)), jn.group_norm_init(c)
  raise ValueError(layer)


def _flax(layer, shape, dtype):
  import flax.linen as nn

  x0 = jnp.zeros(shape, dtype)
  kw = dict(epsilon=EPS, dtype=dtype)
  if layer == "bn":
    mod = nn.BatchNorm(use_running_average=False, momentum=0.99, **kw)
    v = mod.init(jax.random.key(0), x0)
    stats = v["batch_stats"]

    def fn(x, p):
      y, _ = mod.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
      return y

    return fn, v["params"]
  mod = {
    "ln": lambda: nn.LayerNorm(**kw),
    "rms": lambda: nn.RMSNorm(**kw),
    "gn": lambda: nn.GroupNorm(num_groups=GROUPS, **kw),
    "in": lambda: nn.InstanceNorm(**kw),
  }[layer]()
  params = mod.init(jax.random.key(0), x0)["params"]
  return (lambda x, p: mod.apply({"params": p}, x)), params


def _haiku(layer, shape, dtype):
  import haiku as hk

  x0 = jnp.zeros(shape, dtype)

  def make():
    if layer == "bn":
      return lambda x: hk.BatchNorm(True, True, 0.99, eps=EPS)(x, is_training=True)
    return {
      "ln": lambda: hk.LayerNorm(-1, True, True, eps=EPS),
      "rms": lambda: hk.RMSNorm(-1, eps=EPS),
      "gn": lambda: hk.GroupNorm(GROUPS, eps=EPS),
      "in": lambda: hk.InstanceNorm(True, True, eps=EPS),
    }[layer]()

  t = hk.transform_with_state(lambda x: make()(x))
  params, state = t.init(jax.random.key(0), x0)

  def fn(x, p):
    return t.apply(p, state, None, x)[0].astype(x.dtype)

  return fn, params


def _equinox(layer, shape, dtype):
  # equinox's GroupNorm and BatchNorm take channels-first, unbatched inputs:
  # on NHWC they would need transposes, which would not be a like-for-like
  # comparison, so only the per-row layers are compared.
  if layer not in ("ln", "rms"):
    return None
  import equinox as eqx

  c = shape[-1]
  mod = (
    eqx.nn.LayerNorm(c, eps=EPS)
    if layer == "ln"
    else eqx.nn.RMSNorm(c, eps=EPS, use_bias=False)
  )
  params, static = eqx.partition(mod, eqx.is_array)

  def fn(x, p):
    m = eqx.combine(p, static)
    rows = x.reshape(-1, c)
    return jax.vmap(m)(rows).reshape(x.shape).astype(x.dtype)

  return fn, params


def _jax_nn(layer, shape, dtype):
  # `jax.nn.standardize` with the affine transform written out: batch norm
  # (over every axis but C), layer norm (over C) and instance norm (over the
  # spatial axes). RMS and group norm are not standardizations over axes.
  axes = {
    "bn": tuple(range(len(shape) - 1)),
    "ln": (-1,),
    "in": tuple(range(1, len(shape) - 1)),
  }.get(layer)
  if axes is None:
    return None
  params = jn.layer_norm_init(shape[-1])

  def fn(x, p):
    z = jax.nn.standardize(x.astype(jnp.float32), axis=axes, epsilon=EPS)
    return (z * p.scale + p.bias).astype(x.dtype)

  return fn, params


BUILDERS: dict[str, Callable] = {
  "jaxnorm": _jaxnorm,
  "flax": _flax,
  "haiku": _haiku,
  "equinox": _equinox,
  "jax.nn": _jax_nn,
}


# --------------------------------------------------------------------------


@dataclass
class Entry:
  lib: str
  compiled: Any
  args: tuple
  compile_s: float
  bytes_accessed: float | None
  residual_bytes: int | None
  times: list = field(default_factory=list)


def _nbytes(shape, dtype) -> int:
  return math.prod(shape) * jnp.dtype(dtype).itemsize


def compulsory_bytes(layer: str, mode: str, shape, dtype) -> int:
  nx = _nbytes(shape, dtype)
  if mode == "fwd":
    return 2 * nx
  return 3 * nx + (nx if layer == "bn" else 0)


def run_case(layer, shape, dtype, mode, libs, reps, key):
  """Compiles every library's program for one case and times them interleaved."""
  x = jax.random.normal(key, shape, jnp.float32).astype(dtype) * 2.0 + 0.5
  dy = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32).astype(dtype)
  entries = []
  for lib in libs:
    built = BUILDERS[lib](layer, shape, dtype)
    if built is None:
      continue
    fn, params = built
    if mode == "fwd":
      program, args, saved = tb.forward_only(fn), (x, params), None
    else:
      program, args = tb.forward_and_backward(fn, (0, 1)), (dy, x, params)
      saved = tb.residual_bytes(fn, (x, params), (0, 1))
    compiled, compile_s = tb.compile_timed(program, *args)
    jax.block_until_ready(compiled(*args))  # warm-up, untimed
    entries.append(
      Entry(lib, compiled, args, compile_s, tb.bytes_accessed(compiled), saved)
    )
  for rep in range(reps):
    # Interleaved, so that load changes hit every library alike, and in
    # reversed order every other round, so that no library always runs
    # first (right after another's output was freed) or last.
    for e in entries if rep % 2 == 0 else entries[::-1]:
      e.times.append(tb.time_once(e.compiled, *e.args))
  return entries


def _device_info():
  dev = jax.devices()[0]
  return {
    "platform": dev.platform,
    "device_kind": dev.device_kind,
    "device_count": jax.device_count(),
    "peak_bandwidth_Bps": peak_bandwidth(dev.device_kind)
    if dev.platform == "gpu"
    else None,
  }


def _versions():
  out = {"python": platform.python_version(), "numpy": np.__version__}
  for mod in ("jax", "jaxlib", "flax", "haiku", "equinox", "jaxnorm"):
    try:
      out[mod] = __import__(mod).__version__
    except Exception:  # a peer that is not installed is skipped later
      out[mod] = None
  return out


def _machine():
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "affinity": len(os.sched_getaffinity(0))
    if hasattr(os, "sched_getaffinity")
    else None,
    "system": platform.platform(),
  }


def build_rows(layer, shape_name, shape, dtype, mode, entries, device):
  med = {e.lib: statistics.median(e.times) for e in entries}
  nx = _nbytes(shape, dtype)
  need = compulsory_bytes(layer, mode, shape, dtype)
  rows = []
  for e in entries:
    row = {
      "layer": layer,
      "shape_name": shape_name,
      "shape": list(shape),
      "dtype": jnp.dtype(dtype).name,
      "mode": mode,
      "lib": e.lib,
      "median_s": med[e.lib],
      "min_s": min(e.times),
      "times_s": e.times,
      "compile_s": e.compile_s,
      "ratio": {o: med[e.lib] / med[o] for o in med if o != e.lib},
      "residual_over_x": None if e.residual_bytes is None else e.residual_bytes / nx,
      "bytes_accessed_over_compulsory": None
      if e.bytes_accessed is None
      else e.bytes_accessed / need,
      "compulsory_bytes": need,
    }
    peak = device["peak_bandwidth_Bps"]
    row["bandwidth_fraction"] = None if peak is None else need / med[e.lib] / peak
    rows.append(row)
  return rows


def _fmt(v, spec):
  return "–" if v is None else format(v, spec)


def meta_line(meta) -> str:
  """The first line of ``results.md``: device, versions, flags and reps."""
  return (
    f"Device: {meta['device']['device_kind']} ({meta['device']['platform']}), "
    f"{meta['machine']['cpu']}, {meta['machine']['affinity']} cores; "
    + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    + f"; XLA_FLAGS=`{meta['xla_flags'] or '(none)'}`; reps={meta['reps']}"
    + f"; steady heap: {'yes' if meta.get('steady_heap') else 'no'}."
  )


def markdown(rows, meta) -> str:
  peers = [lib for lib in LIBS if lib != "jaxnorm"]
  lines = [
    meta_line(meta),
    "",
    "Time: median ms of jaxnorm. `÷peer`: jaxnorm's time over the peer's "
    "(< 1 means jaxnorm is faster). `res/x`: bytes saved for the backward "
    "pass over bytes of x. `acc/min`: XLA bytes accessed over the compulsory "
    "bytes. Compile: seconds.",
    "",
  ]
  gpu = meta["device"]["peak_bandwidth_Bps"] is not None
  head = ["layer", "shape", "dtype", "mode", "jaxnorm ms"]
  head += [f"÷{p}" for p in peers]
  head += ["res/x", "flax res/x", "acc/min", "flax acc/min", "compile s"]
  head += ["% peak BW"] if gpu else []
  lines.append("| " + " | ".join(head) + " |")
  lines.append("|" + "---|" * len(head))
  by_case = {}
  for r in rows:
    by_case.setdefault((r["layer"], r["shape_name"], r["dtype"], r["mode"]), {})[
      r["lib"]
    ] = r
  for (layer, sname, dt, mode), libs in by_case.items():
    j = libs.get("jaxnorm")
    if j is None:
      continue
    f = libs.get("flax", {})
    cells = [
      layer,
      f"{sname} {tuple(j['shape'])}",
      dt,
      mode,
      f"{j['median_s'] * 1e3:.2f}",
    ]
    cells += [_fmt(j["ratio"].get(p), ".2f") for p in peers]
    cells += [
      _fmt(j["residual_over_x"], ".2f"),
      _fmt(f.get("residual_over_x"), ".2f"),
      _fmt(j["bytes_accessed_over_compulsory"], ".2f"),
      _fmt(f.get("bytes_accessed_over_compulsory"), ".2f"),
      f"{j['compile_s']:.2f}",
    ]
    if gpu:
      cells.append(
        _fmt(
          None if j["bandwidth_fraction"] is None else 100 * j["bandwidth_fraction"],
          ".0f",
        )
      )
    lines.append("| " + " | ".join(cells) + " |")
  s = summary(rows)
  lines += [
    "",
    "Geometric mean of jaxnorm ÷ flax: "
    + ", ".join(f"{m} {_fmt(v, '.3f')}" for m, v in s["geomean_vs_flax"].items())
    + f"; rows slower than flax: {s['rows_slower_than_flax']} of {s['rows']}; "
    f"max res/x: {_fmt(s['max_residual_over_x'], '.2f')}.",
  ]
  return "\n".join(lines) + "\n"


def summary(rows):
  j = [r for r in rows if r["lib"] == "jaxnorm" and "flax" in r["ratio"]]
  geo = {}
  for m in MODES:
    rs = [r["ratio"]["flax"] for r in j if r["mode"] == m]
    geo[m] = math.exp(sum(map(math.log, rs)) / len(rs)) if rs else None
  res = [r["residual_over_x"] for r in j if r["residual_over_x"] is not None]
  return {
    "geomean_vs_flax": geo,
    "rows": len(j),
    "rows_slower_than_flax": sum(r["ratio"]["flax"] > 1.0 for r in j),
    "max_residual_over_x": max(res) if res else None,
  }


def plot(rows, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  peers = [p for p in LIBS if p != "flax"]
  fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
  for ax, mode in zip(axes, MODES, strict=True):
    cases = []
    for r in rows:
      key = (r["layer"], r["shape_name"], r["dtype"])
      if r["mode"] == mode and key not in cases:
        cases.append(key)
    width = 0.8 / len(peers)
    for i, lib in enumerate(peers):
      vals = []
      for c in cases:
        r = next(
          (
            r
            for r in rows
            if (r["layer"], r["shape_name"], r["dtype"]) == c
            and r["mode"] == mode
            and r["lib"] == lib
          ),
          None,
        )
        vals.append(
          np.nan if r is None or "flax" not in r["ratio"] else r["ratio"]["flax"]
        )
      ax.bar(np.arange(len(cases)) + i * width, vals, width, label=lib)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
    ax.set_xticklabels(
      [f"{a} {b} {'bf16' if 'bfloat' in d else 'f32'}" for a, b, d in cases],
      rotation=90,
      fontsize=7,
    )
    ax.set_title(f"{mode}: time ÷ flax.linen (lower is faster)")
  axes[0].set_ylabel("wall time ÷ flax")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes, few reps")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--layers", default=",".join(LAYERS))
  p.add_argument("--shapes", default=None, help=f"names from {list(SHAPES)}")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--libs", default=",".join(LIBS))
  p.add_argument("--reps", type=int, default=None, help="timed runs (default 9)")
  p.add_argument(
    "--models",
    nargs="?",
    const="mlp,resnet",
    default=None,
    help="also time whole-model training steps: mlp, resnet (default both)",
  )
  p.add_argument(
    "--models-only",
    action="store_true",
    help="time the whole models alone, no single-layer rows (implies --models)",
  )
  p.add_argument(
    "--compile-reps",
    type=int,
    default=None,
    help="timed compilations per model and library after a warm-up one "
    "(default 3; quick: 0, the warm-up one is reported)",
  )
  p.add_argument(
    "--no-steady-heap",
    dest="steady_heap",
    action="store_false",
    help="let glibc unmap freed buffers (every call then page-faults its outputs)",
  )
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  # Before XLA starts its threads and allocates: see steady_heap.
  heap = steady_heap() if args.steady_heap else False
  from tqdm import tqdm

  table = QUICK_SHAPES if args.quick else SHAPES
  shape_names = list(table) if args.shapes is None else args.shapes.split(",")
  for s in shape_names:
    if s not in table:
      sys.exit(f"unknown shape {s!r}; choose from {list(table)}")
  layers = args.layers.split(",")
  for layer in layers:
    if layer not in LAYERS:
      sys.exit(f"unknown layer {layer!r}; choose from {list(LAYERS)}")
  if args.models_only and args.models is None:
    args.models = "mlp,resnet"
  model_names = [] if args.models is None else args.models.split(",")
  models = load_models() if model_names else None
  if models is not None:
    model_table = models.QUICK_MODELS if args.quick else models.MODELS
    for name in model_names:
      if name not in model_table:
        sys.exit(f"unknown model {name!r}; choose from {list(model_table)}")
    model_configs = {name: model_table[name] for name in model_names}
  compile_reps = (
    args.compile_reps if args.compile_reps is not None else (0 if args.quick else 3)
  )
  dtypes = [jnp.dtype(d) for d in args.dtypes.split(",")]
  modes = args.modes.split(",")
  libs = [lib for lib in args.libs.split(",")]
  if "jaxnorm" not in libs:
    libs.insert(0, "jaxnorm")
  reps = args.reps or (3 if args.quick else 9)
  device = _device_info()
  meta = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "jax_flags": {
      k: os.environ[k] for k in sorted(os.environ) if k.startswith(("JAX_", "XLA_"))
    },
    "device": device,
    "machine": _machine(),
    "versions": _versions(),
    "reps": reps,
    "steady_heap": heap,
    "quick": args.quick,
    "command": " ".join(sys.argv),
  }
  if models is not None:
    meta["models"] = {
      name: dataclasses.asdict(cfg) for name, cfg in model_configs.items()
    }
    meta["compile_reps"] = compile_reps
  cases = (
    []
    if args.models_only
    else [
      (layer, s, dt, m)
      for s in shape_names
      for layer in layers
      for dt in dtypes
      for m in modes
    ]
  )
  rows = []
  model_rows = None if models is None else []
  key = jax.random.key(0)
  os.makedirs(args.out, exist_ok=True)
  for i, (layer, s, dt, m) in enumerate(tqdm(cases, desc="benchmark", unit="case")):
    entries = run_case(layer, table[s], dt, m, libs, reps, jax.random.fold_in(key, i))
    rows += build_rows(layer, s, table[s], dt, m, entries, device)
    del entries  # frees the compiled programs and buffers of large cases
    done = i + 1 == len(cases) and models is None
    write_json(args.out, meta, rows, done=done)  # partial results
  if models is not None:

    def on_row(new_rows, done):
      model_rows[:] = new_rows
      write_json(args.out, meta, rows, done=done, model_rows=model_rows)

    models.run(
      model_configs,
      layers,
      reps,
      compile_reps,
      jax.random.fold_in(key, len(cases)),
      progress=lambda c: tqdm(c, desc="models", unit="case"),
      on_row=on_row,
    )
  parts = [markdown(rows, meta)] if rows else [meta_line(meta) + "\n"]
  if model_rows is not None:
    parts.append(models.markdown(model_rows, compile_reps))
  # A title, so that the file is a page of the documentation site as it is.
  text = "# Benchmark results\n\n" + "\n".join(parts)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(text)
  if rows:
    plot(rows, os.path.join(args.out, "ratios.png"))
  print(text)
  result = {"meta": meta, "summary": summary(rows), "rows": rows}
  if model_rows is not None:
    result["model_summary"] = models.summary(model_rows)
    result["model_rows"] = model_rows
  return result


def write_json(out, meta, rows, done, model_rows=None):
  """Writes ``results.json`` atomically; ``done``: whether every row is in."""
  result = {"meta": {**meta, "complete": done}, "summary": summary(rows), "rows": rows}
  if model_rows is not None:
    models = load_models()
    result["model_summary"] = models.summary(model_rows)
    result["model_rows"] = model_rows
  tmp = os.path.join(out, "results.json.tmp")
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, os.path.join(out, "results.json"))


if __name__ == "__main__":
  main()
