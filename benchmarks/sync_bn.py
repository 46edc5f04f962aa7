"""Sync batch norm: a data-parallel training step on 8 CPU devices.

Each device holds a different slice of the batch; batch statistics are
reduced across the ``"data"`` mesh axis inside ``jax.shard_map``. The step
computes BN in training mode, a squared-error loss, the gradients of the
parameters, an SGD update and the new running statistics, for jaxnorm's
``batch_norm(..., axis_name="data")`` and flax.linen's
``BatchNorm(axis_name="data")``. It reports the median wall time of the
step (runs interleaved) and the collectives in the compiled HLO: how many
all-reduces each step issues, and the bytes they carry.

Usage::

  python benchmarks/sync_bn.py [--shape 256,14,14,256] [--reps 9] [--out DIR]
"""

import os

# Simulated devices: must be set before jax is imported.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnorm as jn  # noqa: E402
from jaxnorm import _benchmark as tb  # noqa: E402

LR = 0.1


def jaxnorm_step(x, target, params, state):
  def loss(p):
    y, new_state = jn.batch_norm(
      x, p, state, use_running_average=False, axis_name="data", epsilon=1e-5
    )
    return jnp.mean(jnp.square(y - target)), new_state

  (value, new_state), g = jax.value_and_grad(loss, has_aux=True)(params)
  params = jax.tree.map(lambda p, d: p - LR * d, params, g)
  return params, new_state, jax.lax.pmean(value, "data")


def flax_step(x, target, params, state):
  mod = nn.BatchNorm(use_running_average=False, axis_name="data", epsilon=1e-5)

  def loss(p):
    y, upd = mod.apply({"params": p, "batch_stats": state}, x, mutable=["batch_stats"])
    return jnp.mean(jnp.square(y - target)), upd["batch_stats"]

  (value, new_state), g = jax.value_and_grad(loss, has_aux=True)(params)
  params = jax.tree.map(lambda p, d: p - LR * d, params, g)
  return params, new_state, jax.lax.pmean(value, "data")


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}


def all_reduce_bytes(hlo: str) -> int:
  """Bytes of the results of every all-reduce: what each device contributes."""
  total = 0
  for line in hlo.splitlines():
    m = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
    if not m:
      continue
    for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
      size = 1
      for d in filter(None, dims.split(",")):
        size *= int(d)
      total += size * _BYTES.get(dt, 4)
  return total


def collectives(hlo: str) -> dict:
  """Counts collective ops (async pairs counted once) in compiled HLO text."""
  ops = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
  )
  out = {}
  for op in ops:
    n = len(re.findall(rf"= [^=]*\b{op}(?:-start)?\(", hlo))
    if n:
      out[op] = n
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--shape", default="256,14,14,256", help="global NHWC batch")
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = ap.parse_args(argv)
  shape = tuple(int(s) for s in args.shape.split(","))
  n_dev = jax.device_count()
  if n_dev != 8:
    sys.exit(f"expected 8 devices, got {n_dev}: set XLA_FLAGS before importing jax")
  mesh = Mesh(jax.devices(), ("data",))
  batch = NamedSharding(mesh, P("data"))
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.device_put(jax.random.normal(k1, shape) * 2.0 + 1.0, batch)
  target = jax.device_put(jax.random.normal(k2, shape), batch)
  c = shape[-1]
  params, state = jn.batch_norm_init(c)
  fvars = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x[:2])
  impls = {
    "jaxnorm": (jaxnorm_step, (x, target, params, state)),
    "flax": (flax_step, (x, target, fvars["params"], fvars["batch_stats"])),
  }
  results = {}
  for name, (step, step_args) in impls.items():
    sharded = jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P("data"), P("data"), P(), P()),
      out_specs=(P(), P(), P()),
    )
    compiled, compile_s = tb.compile_timed(sharded, *step_args)
    jax.block_until_ready(compiled(*step_args))
    results[name] = {
      "compiled": compiled,
      "args": step_args,
      "compile_s": compile_s,
      "collectives": collectives(compiled.as_text()),
      "all_reduce_bytes": all_reduce_bytes(compiled.as_text()),
      "times": [],
    }
  for _ in range(args.reps):
    for r in results.values():
      r["times"].append(tb.time_once(r["compiled"], *r["args"]))
  # Same maths: the updated parameters and statistics agree.
  pj, sj, _ = results["jaxnorm"]["compiled"](*results["jaxnorm"]["args"])
  pf, sf, _ = results["flax"]["compiled"](*results["flax"]["args"])
  max_diff = max(
    float(jnp.max(jnp.abs(pj.scale - pf["scale"]))),
    float(jnp.max(jnp.abs(sj.var - sf["var"]))),
  )
  rows = []
  for name, r in results.items():
    rows.append(
      {
        "lib": name,
        "median_s": statistics.median(r["times"]),
        "times_s": r["times"],
        "compile_s": r["compile_s"],
        "collectives": r["collectives"],
        "all_reduce_bytes": r["all_reduce_bytes"],
      }
    )
  med = {r["lib"]: r["median_s"] for r in rows}
  meta = {
    "shape": list(shape),
    "devices": n_dev,
    "device_kind": jax.devices()[0].device_kind,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "jax": jax.__version__,
    "reps": args.reps,
    "max_abs_diff_jaxnorm_vs_flax": max_diff,
  }
  lines = [
    f"Sync BN training step, global batch {shape} on {n_dev} "
    f"{meta['device_kind']} devices (shard_map over 'data'), "
    f"XLA_FLAGS=`{meta['xla_flags']}`, jax {jax.__version__}, reps={args.reps}.",
    "",
    "| impl | median ms | ÷ flax | all-reduces per step | all-reduce bytes "
    "| other collectives | compile s |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    coll = dict(r["collectives"])
    n_ar = coll.pop("all-reduce", 0)
    other = ", ".join(f"{k} {v}" for k, v in coll.items()) or "none"
    lines.append(
      f"| {r['lib']} | {r['median_s'] * 1e3:.2f} | "
      f"{r['median_s'] / med['flax']:.2f} | {n_ar} | {r['all_reduce_bytes']} | "
      f"{other} | "
      f"{r['compile_s']:.2f} |"
    )
  lines.append("")
  lines.append(
    "All-reduces are counted in the compiled HLO, after XLA's all-reduce "
    "combiner has merged the backward pass's reduction with the parameter "
    "gradients' and the loss's."
  )
  lines.append(
    f"Updated parameters and running variance agree to {max_diff:.1e} "
    "(max abs difference)."
  )
  md = "# Sync BN training step\n\n" + "\n".join(lines) + "\n"
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "sync_bn.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(os.path.join(args.out, "sync_bn.md"), "w") as f:
    f.write(md)
  print(md)
  return {"meta": meta, "rows": rows}


if __name__ == "__main__":
  main()
