"""Statistics under SPMD ``jax.jit`` on a mesh, merged in one collective:
what the mesh of ``x`` says, read while tracing.

Under SPMD ``jit`` the arrays are global and XLA partitions the two passes
of :mod:`jaxnorm._stats` as it sees them: one all-reduce for the shift, one
for the deviations, one more in the backward pass. On an Explicit mesh the
sharding of ``x`` is part of its type, so it is known at trace time which
mesh axes split the reduced axes. Then each shard's moments can be taken
locally, under a ``shard_map`` over the mesh axes that split ``x``, and
merged over those that split the reduced axes with the single ``psum`` of
:func:`jaxnorm._stats.merge`, exactly as with ``axis_name``: one all-reduce
forward, and by the transpose of that ``psum`` one in the backward pass
(measured on 8 CPU devices: batch norm 1 forward and 2 forward+backward,
against 2 and 3 for the global form; layer norm with its features sharded
1 forward, as flax's inexact default). Ghost batches
(``virtual_batch_size``) that lie within each shard need no merge at all;
those made of whole shards merge within groups of consecutive devices, in
the same single psum (1 forward, 2 forward+backward, against 2 and 3 for
the global form); any other split keeps the global form, run with the
mesh's axes made Auto (:func:`on_auto_axes`).

On an Auto mesh the sharding is only chosen after tracing. There, for batch
statistics, the batch axis is cut into as many blocks as there are devices
(:func:`auto_blocks`; ghost batches into blocks of each ghost batch,
:func:`auto_ghost_blocks`); each block's moments are taken where it lies,
and the blocks' moments, asked to be replicated, reach every device in one
all-gather and merge there (:func:`jaxnorm._stats.moments`): one collective
forward, two forward+backward, when the batch is split evenly.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P


def _names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _spec(v) -> tuple[Any, ...]:
  spec = tuple(jax.typeof(v).sharding.spec)
  return spec + (None,) * (jnp.ndim(v) - len(spec))


def reduced_mesh_axes(x: jax.Array, axes: tuple[int, ...]) -> tuple[str, ...]:
  """The Explicit mesh axes that shard one of ``axes`` of ``x`` (none on an
  Auto mesh, without a mesh, or for axes a ``shard_map`` made manual)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not getattr(sharding, "spec", None):
    return ()
  kinds = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
  spec = _spec(x)
  return tuple(
    n for a in axes for n in _names(spec[a]) if kinds.get(n) == AxisType.Explicit
  )


def _auto_devices(x: jax.Array) -> int:
  """How many devices the Auto axes of ``x``'s mesh hold (1 without one)."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if mesh is None or not mesh.axis_names:
    return 1
  kinds = zip(mesh.axis_sizes, mesh.axis_types, strict=True)
  return math.prod(size for size, kind in kinds if kind == AxisType.Auto)


def batch_may_be_split(x: jax.Array) -> bool:
  """Whether axis 0 of ``x`` is split over devices, or may be: an Explicit
  mesh axis splits it, or ``x`` lies on an Auto mesh of several devices,
  whose shardings XLA chooses after tracing."""
  return bool(reduced_mesh_axes(x, (0,))) or _auto_devices(x) > 1


def auto_blocks(x: jax.Array, axes: tuple[int, ...]) -> int | None:
  """On an Auto mesh, for batch statistics: into how many blocks to cut the
  batch axis, whose moments are each taken where they lie, or ``None``.

  XLA chooses an Auto mesh's shardings after tracing, so which axis is split
  is not known here; the guess is the batch axis (data parallelism), split
  evenly. ``blocks`` divides both its length and the number of devices of
  the mesh's Auto axes, so that such a split over any of them puts whole
  blocks on every device. A wrong guess costs collectives, never exactness.

  Per-sample statistics (layer norm over features split by tensor
  parallelism) are left to XLA: cutting the features into blocks costs
  compute wherever they are not split, the common case (measured on 8 CPU
  devices with the batch split: layer norm 4.5 x slower forward over 64
  features, 1.25 x forward+backward over 1024), to save one all-reduce
  where they are.
  """
  devices, length = _auto_devices(x), x.shape[0]
  if devices < 2 or 0 not in axes or not isinstance(length, int):
    return None
  blocks = math.gcd(length, devices)
  return blocks if blocks > 1 else None


def auto_ghost_blocks(x: jax.Array, k: int) -> int | None:
  """On an Auto mesh: into how many blocks each ghost batch of ``k``
  samples is cut so that every block lies within one device's share of the
  batch (1 when shares hold whole ghost batches, ``m`` when a ghost batch
  spans ``m`` whole shares), or ``None`` (no Auto mesh, or shares that cut
  ghost batches). As for :func:`auto_blocks`, the batch is guessed to be
  split evenly over every device; a wrong guess costs collectives only."""
  devices, n = _auto_devices(x), x.shape[0]
  if devices < 2 or not isinstance(n, int) or n % devices:
    return None
  share = n // devices
  if share % k == 0:
    return 1
  return k // share if k % share == 0 else None


def ghost_span(x: jax.Array, names: tuple[str, ...], k: int) -> int | None:
  """How many shards one ghost batch of ``k`` samples spans, when ``names``
  split the batch axis 0 and nothing else: 1 when every shard holds whole
  ghost batches, ``m`` when every ghost batch is ``m`` whole consecutive
  shards, ``None`` otherwise (a ghost batch cut across a shard)."""
  if set(names) != set(_names(_spec(x)[0])):
    return None
  mesh = jax.typeof(x).sharding.mesh
  shard = x.shape[0] // math.prod(mesh.shape[n] for n in names)
  if shard % k == 0:
    return 1
  return k // shard if k % shard == 0 else None


def moments_by_shard(
  x, mask, axes, names, local_moments, merge, sync_type, per_sample=False, span=1
):
  """``(count, hi, m2, lo)`` over every device's shard, merged in one psum
  (the mean is ``hi + lo``).

  ``local_moments(x, mask)`` gives one shard's ``(count, hi, m2, lo)``
  over ``axes``; ``merge(count, hi, m2, lo, sync)`` merges them over the
  devices of ``sync``, built here as ``sync_type(names, size, groups)``.
  With ``per_sample`` (ghost batches, see :func:`ghost_span`) the
  statistics come back per sample: with ``span`` 1 they are already
  complete on each shard and nothing is merged; with ``span`` ``m`` each
  shard's moments merge with those of the ``m`` consecutive shards of its
  ghost batch (``names`` in the order that splits axis 0, so that the
  flattened device index is the shard's position).

  Every mesh axis that splits ``x`` is manual inside, not only the merged
  ones: the statistics stay split along the kept axes as ``x`` is. (With
  only the merged axes manual, XLA gathered ``x`` whole over the others:
  layer norm on a 2-D mesh took 4 all-gathers forward, 23 backward.)
  """
  mesh = jax.typeof(x).sharding.mesh
  size = math.prod(mesh.shape[n] for n in names)
  groups = None
  if span > 1:
    names = _names(_spec(x)[0])
    groups = tuple(tuple(range(g, g + span)) for g in range(0, size, span))
  x_spec = _spec(x)
  manual = frozenset(n for entry in x_spec for n in _names(entry))
  specs = [P(*x_spec)]
  if mask is not None:
    # The mask splits like x wherever it is not broadcast; reshard slices
    # a replicated mask, which needs no communication.
    want = tuple(
      x_spec[d] if mask.shape[d] == x.shape[d] else None for d in range(x.ndim)
    )
    if want != _spec(mask):
      mask = jax.sharding.reshard(mask, P(*want))
    specs.append(P(*want))

  def local(x, mask=None):
    count, hi, m2, lo = local_moments(x, mask)
    # The count leaves the shard_map with the statistics' shape and split
    # (one out_spec for all four), so it is made full-size here.
    zeros = jnp.zeros_like(hi, jnp.real(hi).dtype)
    count = jnp.asarray(count, zeros.dtype) + zeros
    if not (per_sample and span == 1):
      sync = sync_type(names, size, groups)
      count, hi, m2, lo = merge(count, hi, m2, lo, sync)
    if per_sample:  # this shard's samples all share their ghost batch's
      rows = (x.shape[0],) + hi.shape[1:]
      return tuple(jnp.broadcast_to(v, rows) for v in (count, hi, m2, lo))
    return count, hi, m2, lo

  # The statistics keep x's split along every axis they keep (axis 0 too
  # for ghost batches, whose statistics are per sample).
  kept = [d not in axes or (per_sample and d == 0) for d in range(x.ndim)]
  out = P(*(e if k else None for e, k in zip(x_spec, kept, strict=True)))
  args = (x,) if mask is None else (x, mask)
  return jax.shard_map(
    local,
    mesh=mesh,  # (x's own: a context mesh need not be set)
    in_specs=tuple(specs),
    out_specs=(out,) * 4,
    axis_names=manual,
  )(*args)


def falls_back(
  x: jax.Array, axes: tuple[int, ...], segment: int | None, groups
) -> bool:
  """Whether Explicit mesh axes split the reduced ``axes`` of ``x`` in a way
  :func:`moments_by_shard` cannot take: a ghost batch cut across a shard,
  or group norm's groups of channels cut by one."""
  if groups is not None and reduced_mesh_axes(x, (groups[0],)):
    return True
  names = reduced_mesh_axes(x, axes)
  return bool(names) and segment is not None and ghost_span(x, names, segment) is None


def in_partial_shard_map(x: jax.Array) -> bool:
  """Whether ``x`` is inside a ``shard_map`` that left some mesh axes
  Explicit. Split reduced axes there take the plain global form: a nested
  ``shard_map`` failed to lower under ``grad``, and ``auto_axes`` failed to
  linearize."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  return mesh is not None and AxisType.Manual in getattr(mesh, "axis_types", ())


def on_auto_axes(f, x: jax.Array):
  """``f`` with the Explicit axes of ``x``'s mesh made Auto, its array
  outputs sharded like ``x`` along the axes they share with it (NumPy
  outputs, static counts, pass through), so that XLA partitions the global
  form as on an Auto mesh. Under Explicit sharding rules its reshapes
  failed, or gathered full-size arrays: a ghost batch cut across shards
  took 2 collectives forward and 5 forward+backward, against 2 and 3 on an
  Auto mesh (8 CPU devices)."""
  mesh = jax.typeof(x).sharding.mesh
  explicit = tuple(
    n
    for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
    if t == AxisType.Explicit
  )
  spec = _spec(x)

  def like_x(out):
    if out.ndim != x.ndim:
      return P()
    same = (s == d for s, d in zip(out.shape, x.shape, strict=True))
    return P(*(entry if eq else None for entry, eq in zip(spec, same, strict=True)))

  def run(*args):
    kept = {}

    def arrays(*a):
      leaves, kept["tree"] = jax.tree.flatten(f(*a))
      kept["static"] = {i: v for i, v in enumerate(leaves) if isinstance(v, np.ndarray)}
      return [v for i, v in enumerate(leaves) if i not in kept["static"]]

    # The output shapes, from a trace without the mesh's types (with them,
    # the global form is what fails or gathers).
    bare = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), args
    )
    shardings = [like_x(s) for s in jax.eval_shape(arrays, *bare)]
    out = iter(
      jax.sharding.auto_axes(arrays, axes=explicit, out_sharding=shardings)(*args)
    )
    static = kept["static"]
    leaves = [
      static[i] if i in static else next(out) for i in range(kept["tree"].num_leaves)
    ]
    return jax.tree.unflatten(kept["tree"], leaves)

  return run
