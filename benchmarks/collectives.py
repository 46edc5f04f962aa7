"""Collectives per layer and parallel mode, jaxnorm against flax.

Counts the collectives (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute; an async start/done pair once) in the compiled HLO
(``jax.jit(f).lower(...).compile().as_text()``) of each layer's forward
pass and of forward+backward (the gradient of ``sum(y**2)`` with respect
to ``x`` and the parameters), on 8 devices, and names the kinds that occur:

- ``spmd``: ``jax.jit`` on a 1-D ``data`` mesh, the batch sharded, no
  ``axis_name`` (Auto axes; ``--explicit`` for Explicit ones);
- ``features``: a 2-D (``data``, ``model``) mesh, the batch on ``data`` and
  the normalized features (channels) on ``model`` (Auto axes, and Explicit
  ones);
- ``shard_map``: a whole training step (Dense, BatchNorm with
  ``axis_name``, Dense, a ``pmean`` loss, SGD) under ``jax.shard_map``.

It also reports whether any compiled program holds a ``conditional`` or an
all-reduce of a ``pred`` (a branch predicate made global).

Usage::

  python benchmarks/collectives.py [--out docs/benchmarks/collectives.md]
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnorm as jn  # noqa: E402
import jaxnorm.linen as jnl  # noqa: E402

SHAPE = (16, 4, 4, 32)  # N, H, W, C
GROUPS = 8


def compiled_text(f: Callable, *args) -> str:
  return jax.jit(f).lower(*args).compile().as_text()


KINDS = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
)


def collective_kinds(text: str) -> dict[str, int]:
  """Collective ops in compiled HLO by kind (an async ``-start`` counts
  once), the kinds that occur."""
  found = {k: len(re.findall(rf"\b{k}(?:-start)?\(", text)) for k in KINDS}
  return {k: n for k, n in found.items() if n}


def count_collectives(text: str) -> int:
  return sum(collective_kinds(text).values())


def count_all_reduces(text: str) -> int:
  """All-reduce ops in compiled HLO (``all-reduce-start`` on GPUs)."""
  return collective_kinds(text).get("all-reduce", 0)


def has_branch(text: str) -> bool:
  """A conditional, or an all-reduce of a ``pred`` (a global predicate)."""
  return bool(
    re.search(r"\bconditional\(", text) or re.search(r"pred\[\] all-reduce", text)
  )


def _train(fn, init):
  params, state = init(SHAPE[-1])
  return params, lambda x, p: fn(x, p, state, use_running_average=False)[0]


def _plain(fn, params, **kw):
  return params, lambda x, p: fn(x, p, **kw)


def jaxnorm_layers(c: int = SHAPE[-1]) -> dict[str, tuple]:
  """name: (params, f(x, params) -> y), every layer in training mode."""
  return {
    "batch_norm": _train(jn.batch_norm, jn.batch_norm_init),
    "ghost batch_norm (k=4, across 2 shards)": _train(
      lambda *a, **k: jn.batch_norm(*a, **k, virtual_batch_size=4),
      jn.batch_norm_init,
    ),
    "ghost batch_norm (k=2, within a shard)": _train(
      lambda *a, **k: jn.batch_norm(*a, **k, virtual_batch_size=2),
      jn.batch_norm_init,
    ),
    "batch_renorm": _train(jn.batch_renorm, jn.batch_renorm_init),
    "switchable_norm": _train(jn.switchable_norm, jn.switchable_norm_init),
    "evonorm_b0": _train(jn.evonorm_b0, jn.evonorm_b0_init),
    "layer_norm": _plain(jn.layer_norm, jn.layer_norm_init(c)),
    "rms_norm": _plain(jn.rms_norm, jn.rms_norm_init(c)),
    "group_norm": _plain(jn.group_norm, jn.group_norm_init(c), num_groups=GROUPS),
    "instance_norm": _plain(jn.instance_norm, jn.group_norm_init(c)),
    "filter_response_norm": _plain(
      jn.filter_response_norm, jn.filter_response_norm_init(c)
    ),
    "evonorm_s0": _plain(jn.evonorm_s0, jn.evonorm_s0_init(c), num_groups=GROUPS),
  }


def flax_layers(x) -> dict[str, tuple]:
  """flax.linen's namesakes: name -> (params, f(x, params) -> y)."""
  modules = {
    "batch_norm": nn.BatchNorm(use_running_average=False),
    "batch_norm (exact: use_fast_variance=False)": nn.BatchNorm(
      use_running_average=False, use_fast_variance=False
    ),
    "layer_norm": nn.LayerNorm(),
    "layer_norm (exact: use_fast_variance=False)": nn.LayerNorm(
      use_fast_variance=False
    ),
    "rms_norm": nn.RMSNorm(),
    "group_norm": nn.GroupNorm(num_groups=GROUPS),
    "instance_norm": nn.InstanceNorm(),
  }
  out = {}
  for name, m in modules.items():
    v = m.init(jax.random.key(0), x)

    def f(x, p, m=m, v=v):
      return m.apply({**v, "params": p}, x, mutable=["batch_stats"])[0]

    out[name] = (v["params"], f)
  return out


def _fwd_bwd(f):
  def g(x, p):
    return jax.grad(lambda x, p: jnp.sum(f(x, p) ** 2), argnums=(0, 1))(x, p)

  return g


def counts(f, x, params) -> tuple[int, int, bool, str]:
  """(forward collectives, forward+backward collectives, any branch, kinds)."""
  fwd, both = compiled_text(f, x, params), compiled_text(_fwd_bwd(f), x, params)
  kinds = collective_kinds(fwd + both)
  names = ", ".join(k for k in KINDS if k in kinds) or "–"
  return count_collectives(fwd), count_collectives(both), has_branch(fwd + both), names


def spmd_rows(explicit: bool = False) -> list[tuple]:
  """(library, layer, fwd, fwd+bwd, branch, kinds) with the batch sharded."""
  kind = AxisType.Explicit if explicit else AxisType.Auto
  mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
  x = jax.random.normal(jax.random.key(0), SHAPE)
  rows = []
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    for name, (p, f) in jaxnorm_layers().items():
      rows.append(("jaxnorm", name, *counts(f, xs, p)))
    if not explicit:
      for name, (p, f) in flax_layers(x).items():
        rows.append(("flax", name, *counts(f, xs, p)))
  return rows


def feature_rows(explicit: bool = False) -> list[tuple]:
  """The same with the normalized features sharded over ``model`` too, and
  the per-channel parameters (flax's rows on the Auto mesh only)."""
  kind = AxisType.Explicit if explicit else AxisType.Auto
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind,) * 2)
  x = jax.random.normal(jax.random.key(0), SHAPE)
  keep = ("batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm")
  rows = []

  def per_channel_on_model(params):
    # Tensor parallelism's layout: per-channel parameters split like the
    # channels (replicated ones would have their gradients all-gathered).
    return jax.tree.map(
      lambda v: (
        jax.device_put(v, NamedSharding(mesh, P("model")))
        if v.shape == SHAPE[-1:]
        else v
      ),
      params,
    )

  with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None, "model")))
    for name, (p, f) in jaxnorm_layers().items():
      if name in keep or name == "switchable_norm":
        rows.append(("jaxnorm", name, *counts(f, xs, per_channel_on_model(p))))
    if not explicit:
      for name, (p, f) in flax_layers(x).items():
        rows.append(("flax", name, *counts(f, xs, per_channel_on_model(p))))
  return rows


def shard_map_step_counts() -> dict[str, int]:
  """Collectives of one training step with ``BatchNorm(axis_name="data")``."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  x = jax.random.normal(jax.random.key(0), (64, 16))
  target = jnp.ones((64, 4))
  out = {}
  for lib, batch_norm in (("jaxnorm", jnl.BatchNorm), ("flax", nn.BatchNorm)):

    class Model(nn.Module):
      @nn.compact
      def __call__(self, x, batch_norm=batch_norm):
        x = batch_norm(use_running_average=False, axis_name="data")(nn.Dense(32)(x))
        return nn.Dense(4)(nn.relu(x))

    model = Model()
    variables = model.init(jax.random.key(0), x[:8])

    def step(variables, x, target, model=model):
      def loss(params):
        y, updates = model.apply(
          {**variables, "params": params}, x, mutable=["batch_stats"]
        )
        return jax.lax.pmean(jnp.mean((y - target) ** 2), "data"), updates

      (_, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
      params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
      return {"params": params, **updates}

    f = jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
    )
    with jax.set_mesh(mesh):
      xs, ts = jax.device_put(x, P("data")), jax.device_put(target, P("data"))
      out[lib] = count_collectives(compiled_text(f, variables, xs, ts))
  return out


def markdown() -> str:
  lines = [
    "# Collectives per layer and parallel mode",
    "",
    f"Compiled HLO on 8 simulated CPU devices (jax {jax.__version__}); "
    f"activations {SHAPE} (N, H, W, C). Regenerate with "
    "`python benchmarks/collectives.py`.",
    "",
    "Every collective in the compiled programs is counted (all-reduce, "
    "all-gather, reduce-scatter, all-to-all, collective-permute; an async "
    "pair once); `kinds` names those that occur, forward or backward. "
    "`branch`: a `conditional`, or an all-reduce of a predicate.",
    "",
  ]

  def table(title, rows):
    lines.extend(
      [
        f"## {title}",
        "",
        "| library | layer | forward | fwd+bwd | kinds | branch |",
        "|---|---|---|---|---|---|",
      ]
    )
    for lib, name, fwd, both, branch, kinds in rows:
      branch = "yes" if branch else "no"
      lines.append(f"| {lib} | {name} | {fwd} | {both} | {kinds} | {branch} |")
    lines.append("")

  table("SPMD `jax.jit`, Auto mesh, batch sharded over 8 devices", spmd_rows())
  table(
    "SPMD `jax.jit`, Explicit mesh (`jax.make_mesh` default), batch sharded",
    spmd_rows(explicit=True),
  )
  table("2-D Auto mesh (4 x 2): batch on `data`, channels on `model`", feature_rows())
  table(
    "2-D Explicit mesh (4 x 2): batch on `data`, channels on `model`",
    feature_rows(explicit=True),
  )
  sm = shard_map_step_counts()
  lines.extend(
    [
      "## `shard_map`, one training step with `BatchNorm(axis_name='data')`",
      "",
      "| library | collectives per step |",
      "|---|---|",
      *(f"| {lib} | {n} |" for lib, n in sm.items()),
      "",
    ]
  )
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None, help="write the Markdown here")
  args = parser.parse_args(argv)
  text = markdown()
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  main()
