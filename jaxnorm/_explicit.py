"""Batch statistics under SPMD ``jax.jit`` on an Explicit mesh, merged in
one collective.

Under SPMD ``jit`` the arrays are global and XLA partitions the two passes
of :mod:`jaxnorm._stats` as it sees them: one all-reduce for the shift, one
for the deviations, one more in the backward pass. On an Explicit mesh the
sharding of ``x`` is part of its type, so it is known at trace time which
mesh axes split the reduced axes. Then each shard's ``(count, mean, m2)``
can be taken locally, under a ``shard_map`` over just those mesh axes, and
merged with the single ``psum`` of :func:`jaxnorm._stats.merge`, exactly as
with ``axis_name``: one all-reduce forward, and by the transpose of that
``psum`` one in the backward pass (measured on 8 CPU devices: batch norm 1
forward and 2 forward+backward, against 2 and 3 for the global form; layer
norm with its features sharded 1 forward, as flax's inexact default).
Every other mesh axis keeps its Explicit sharding inside. Ghost batches
(``virtual_batch_size``) that lie within each shard need no merge at all;
those made of whole shards merge within groups of consecutive devices, in
the same single psum (1 forward, 2 forward+backward, against 2 and 3 for
the global form); any other split keeps the global form. On an Auto mesh
the sharding is only chosen after tracing, so the global form stays.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
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
  x, mask, names, local_moments, merge, sync_type, per_sample=False, span=1
):
  """``(count, mean, m2)`` over every device's shard, merged in one psum.

  ``local_moments(x, mask)`` gives one shard's triple; ``merge(count, mean,
  m2, sync)`` merges them over the devices of ``sync``, built here as
  ``sync_type(names, size, groups)``. With ``per_sample`` (ghost batches,
  see :func:`ghost_span`) the statistics come back per sample: with
  ``span`` 1 they are already complete on each shard and nothing is merged;
  with ``span`` ``m`` each shard's triple merges with those of the ``m``
  consecutive shards of its ghost batch (``names`` in the order that splits
  axis 0, so that the flattened device index is the shard's position).
  """
  mesh = jax.typeof(x).sharding.mesh
  size = math.prod(mesh.shape[n] for n in names)
  groups = None
  if span > 1:
    names = _names(_spec(x)[0])
    groups = tuple(tuple(range(g, g + span)) for g in range(0, size, span))

  def manual(v):
    # Only the merged mesh axes become manual; the others stay Explicit.
    return P(*(tuple(n for n in _names(e) if n in names) or None for e in _spec(v)))

  x_spec = manual(x)
  if mask is not None:
    # The mask must split like x wherever it is not broadcast; reshard
    # slices a replicated mask, which needs no communication.
    full = []
    for d, entry in enumerate(_spec(mask)):
      other = tuple(n for n in _names(entry) if n not in names)
      split = _names(x_spec[d]) if mask.shape[d] == x.shape[d] else ()
      full.append(other + split or None)
    if tuple(full) != _spec(mask):
      mask = jax.sharding.reshard(mask, P(*full))

  def local(x, mask=None):
    count, mean, m2 = local_moments(x, mask)
    # One stack of (count, mean, m2) wants one sharding; the statistics may
    # be sharded along a kept axis where the count is not.
    zeros = jnp.zeros_like(mean, jnp.real(mean).dtype)
    count = jnp.asarray(count, zeros.dtype) + zeros
    if per_sample and span == 1:
      return count, mean, m2
    count, mean, m2 = merge(count, mean, m2, sync_type(names, size, groups))
    if per_sample:  # this shard's samples all share their ghost batch's
      rows = (x.shape[0],) + mean.shape[1:]
      count, mean, m2 = (jnp.broadcast_to(v, rows) for v in (count, mean, m2))
    return count, mean, m2

  args = (x,) if mask is None else (x, mask)
  out = P(x_spec[0]) if per_sample else P()
  return jax.shard_map(
    local,
    mesh=mesh,  # (x's own: a context mesh need not be set)
    in_specs=tuple(manual(v) for v in args),
    out_specs=(out, out, out),
    axis_names=frozenset(names),
  )(*args)
