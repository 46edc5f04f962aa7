"""Collectives counted in the compiled HLO, per layer and parallel mode.

The counts come from ``benchmarks/collectives.py`` (which also writes the
table in ``docs/benchmarks/collectives.md``) and take in every kind of
collective, all-gathers too; the bounds are the issue's: exact batch
statistics in at most 2 collectives forward and 3 forward+backward (in
fact 1 and 2 on both kinds of mesh), none for per-sample statistics except
the parameter gradients, never a branch, and no more than flax where
flax's layer does the same job.
"""

import functools
import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "collectives.py")
_spec = importlib.util.spec_from_file_location("bench_collectives", _PATH)
collectives = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(collectives)

# Each table is compiled once for the tests that read it (the compiles are
# the time this file takes).
spmd_rows = functools.cache(collectives.spmd_rows)
feature_rows = functools.cache(collectives.feature_rows)

BATCH_STATS = {
  "batch_norm",
  "ghost batch_norm (k=4, across 2 shards)",
  "ghost batch_norm (k=2, within a shard)",
  "batch_renorm",
  "switchable_norm",
  "evonorm_b0",
}


@pytest.fixture(scope="module", params=[False, True], ids=["auto", "explicit"])
def spmd(request):
  return spmd_rows(explicit=request.param)


def test_spmd_counts(spmd):
  rows = {
    name: (fwd, both, branch)
    for lib, name, fwd, both, branch, _ in spmd
    if lib == "jaxnorm"
  }
  assert len(rows) == len(collectives.jaxnorm_layers())
  for name, (fwd, both, branch) in rows.items():
    assert not branch, name
    if name in BATCH_STATS:
      assert fwd <= 2 and both <= 3, (name, fwd, both)
    else:
      assert fwd == 0 and both <= 1, (name, fwd, both)


def test_spmd_beats_flax_exact_batch_norm():
  rows = {
    (lib, name): (fwd, both) for lib, name, fwd, both, *_ in spmd_rows(explicit=False)
  }
  ours = rows["jaxnorm", "batch_norm"]
  flax_exact = rows["flax", "batch_norm (exact: use_fast_variance=False)"]
  assert ours[0] <= flax_exact[0] and ours[1] < flax_exact[1]
  for name in ("layer_norm", "rms_norm", "group_norm", "instance_norm"):
    assert rows["jaxnorm", name] <= rows["flax", name], name


def test_features_sharded_no_more_than_flax():
  rows = {
    (lib, name): (fwd, both)
    for lib, name, fwd, both, *_ in feature_rows(explicit=False)
  }
  # Exact statistics, and no more collectives than flax's default (inexact
  # for batch norm: E[x^2] - E[x]^2).
  for name in ("batch_norm", "rms_norm", "group_norm", "instance_norm"):
    ours, theirs = rows["jaxnorm", name], rows["flax", name]
    assert ours[0] <= theirs[0] and ours[1] <= theirs[1], (name, ours, theirs)
  # Layer norm over sharded features on an Auto mesh is held to flax's
  # exact mode: its per-sample statistics are left to XLA there, whose
  # partition of the two passes takes one more all-reduce forward than
  # flax's inexact default (docs/parallel.md says why).
  ours = rows["jaxnorm", "layer_norm"]
  exact = rows["flax", "layer_norm (exact: use_fast_variance=False)"]
  assert ours[0] <= exact[0] and ours[1] <= exact[1]


def test_batch_statistics_merge_in_one_collective(spmd):
  """Batch statistics take 1 collective forward and 2 forward+backward on
  both kinds of mesh (flax's inexact default; its exact mode takes 2 and
  4). Explicit mesh: the shards' moments merge in one psum. Auto mesh: the
  blocks' moments are all-gathered once. Ghost batches that lie within a
  shard need none for ``y``, only the parameter gradients' (and the running
  state's); those made of whole shards merge within groups of devices in
  the same one collective as plain batch norm."""
  rows = {name: (fwd, both) for lib, name, fwd, both, *_ in spmd if lib == "jaxnorm"}
  local_ghost = "ghost batch_norm (k=2, within a shard)"
  for name in BATCH_STATS - {local_ghost}:
    assert rows[name] == (1, 2), (name, rows[name])
  # (The forward pass measured returns y only: no running state to sum.)
  assert rows[local_ghost] == (0, 1), rows[local_ghost]


def test_auto_mesh_gathers_blocks_once(spmd, request):
  """On an Auto mesh the one forward collective is the all-gather of the
  blocks' moments; on an Explicit mesh it is the psum."""
  kinds = {name: k for lib, name, *_, k in spmd if lib == "jaxnorm"}
  want = (
    "all-reduce, all-gather" if request.node.callspec.id == "auto" else "all-reduce"
  )
  for name in BATCH_STATS - {"ghost batch_norm (k=2, within a shard)"}:
    assert kinds[name] == want, (name, kinds[name])


def test_explicit_features_sharded_no_more_than_flax_default():
  """Channels on ``model`` of an Explicit mesh: exact statistics, no more
  collectives than flax's default (inexact) layers on an Auto mesh, and
  never an all-gather (the statistics stay split like ``x``)."""
  explicit = feature_rows(explicit=True)
  ours = {name: (fwd, both) for _, name, fwd, both, *_ in explicit}
  assert all(kinds == "all-reduce" for *_, kinds in explicit), explicit
  theirs = {
    name: (fwd, both)
    for lib, name, fwd, both, *_ in feature_rows(explicit=False)
    if lib == "flax"
  }
  for name in ("batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm"):
    assert ours[name][0] <= theirs[name][0], (name, ours[name], theirs[name])
    assert ours[name][1] <= theirs[name][1], (name, ours[name], theirs[name])


def test_shard_map_step_no_more_than_flax():
  counts = collectives.shard_map_step_counts()
  assert counts["jaxnorm"] <= counts["flax"], counts


def test_counter_sees_all_reduces_and_gathers():
  """The counter is not blind: a psum and an all_gather under shard_map
  show up, each under its kind."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((8,), ("i",), axis_types=(jax.sharding.AxisType.Explicit,))
  f = jax.shard_map(
    lambda x: jax.lax.psum(x, "i"), mesh=mesh, in_specs=P("i"), out_specs=P()
  )
  with jax.set_mesh(mesh):
    x = jax.device_put(jnp.arange(8.0), P("i"))
    assert collectives.count_all_reduces(collectives.compiled_text(f, x)) == 1
    g = jax.shard_map(
      lambda x: jax.lax.all_gather(x, "i", tiled=True),
      mesh=mesh,
      in_specs=P("i"),
      out_specs=P(),
      check_vma=False,
    )
    kinds = collectives.collective_kinds(collectives.compiled_text(g, x))
    assert kinds == {"all-gather": 1}, kinds
