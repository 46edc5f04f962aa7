"""Population statistics of a layer's input, for precise BN.

``recompute_batch_stats`` (linen and nnx) sets the running statistics of
every layer to those of the union of every batch it saw. While it runs, the
stateful modules call :func:`record` with their input; each call gives the
rows ``(count, mean, m2)`` per channel, merged exactly (Chan et al.'s
pairwise formula) within one forward pass here and across batches, in
float64, by :class:`Accumulator`. Outside ``recompute_batch_stats`` nothing
is computed: the modules only call :func:`record` when asked to.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import _checks, _stats

# The linen collection recompute_batch_stats makes mutable to receive them.
COLLECTION = "jaxnorm_moments"

# Set while linen's recompute_batch_stats traces the model. A mutable
# collection alone is no request: `apply(..., mutable=True)` makes every
# collection mutable, and recording there added a stray collection to every
# training step's updates (which broke loops that carry the variables).
_RECORDING = contextvars.ContextVar("jaxnorm_recording", default=False)


@contextlib.contextmanager
def recording() -> Iterator[None]:
  """Within it, linen layers traced with :data:`COLLECTION` mutable record."""
  token = _RECORDING.set(True)
  try:
    yield
  finally:
    _RECORDING.reset(token)


def is_recording() -> bool:
  return _RECORDING.get()


def batch_moments(
  x: jax.Array,
  *,
  axis: int | Sequence[int],
  mask: Any = None,
  axis_name: Hashable | None = None,
  axis_index_groups: Any = None,
) -> jax.Array:
  """``(3, C)`` rows ``count, mean, m2`` of ``x`` over every axis but ``axis``.

  ``m2`` is the sum of squared deviations from the mean; with ``axis_name``
  the rows are those of every device's elements together (one ``psum``).
  """
  x = _checks.check_input(x)
  feature_axes = _checks.canonicalize_axes(x.ndim, axis, "axis")
  axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  mask = _checks.check_mask(mask, x.shape)
  sync = _stats.make_sync(axis_name, axis_index_groups)
  dtype = _checks.compute_dtype(x.dtype)
  m = _stats.moments(
    jax.lax.stop_gradient(x), axes, mask=mask, use_mean=True, sync=sync, dtype=dtype
  )
  count = jnp.broadcast_to(m.count, m.mean.shape).reshape(-1)
  mean = m.mean.reshape(-1)
  m2 = m.var.reshape(-1) * count
  return jnp.stack([count.astype(mean.dtype), mean, m2.astype(mean.dtype)])


def merge_rows(a: jax.Array, b: jax.Array) -> jax.Array:
  """The rows of the union of two sets, from the rows of each (traced)."""
  na, ma, sa = jnp.real(a[0]), a[1], jnp.real(a[2])
  nb, mb, sb = jnp.real(b[0]), b[1], jnp.real(b[2])
  n = na + nb
  safe = jnp.maximum(n, 1.0)
  delta = mb - ma
  mean = ma + delta * (nb / safe)
  m2 = sa + sb + jnp.abs(delta) ** 2 * (na * nb / safe)
  return jnp.stack([n.astype(a.dtype), mean, m2.astype(a.dtype)])


def record(previous: jax.Array | None, rows: jax.Array) -> jax.Array:
  """``rows`` merged into what an earlier call of the same layer recorded."""
  return rows if previous is None else merge_rows(previous, rows)


class Accumulator:
  """Merges the rows of successive batches in float64 on the host."""

  def __init__(self) -> None:
    self.rows: dict[Hashable, np.ndarray] = {}

  def add(self, key: Hashable, rows: Any) -> None:
    rows = np.asarray(rows)
    rows = rows.astype(np.complex128 if np.iscomplexobj(rows) else np.float64)
    old = self.rows.get(key)
    if old is None:
      self.rows[key] = rows
      return
    na, nb = old[0].real, rows[0].real
    n = na + nb
    safe = np.maximum(n, 1.0)
    delta = rows[1] - old[1]
    mean = old[1] + delta * (nb / safe)
    m2 = old[2].real + rows[2].real + np.abs(delta) ** 2 * (na * nb / safe)
    self.rows[key] = np.stack([n, mean, m2]).astype(old.dtype)

  def statistics(
    self, key: Hashable, shape: tuple[int, ...], *, unbiased: bool, second_moment: bool
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, mean, var)`` of the union seen by ``key``, shaped ``shape``.

    ``var`` is the biased variance; the unbiased one with ``unbiased``
    (PyTorch's running statistics), or the second moment ``E[|x|^2]`` with
    ``second_moment`` (MABN's running statistic).
    """
    rows = self.rows[key]
    count = rows[0].real
    safe = np.maximum(count, 1.0)
    var = rows[2].real / safe
    if unbiased:
      var = rows[2].real / np.maximum(count - 1.0, 1.0)
    if second_moment:
      var = var + np.abs(rows[1]) ** 2
    return (
      count.reshape(shape),
      rows[1].reshape(shape),
      var.reshape(shape),
    )


def check_batches(count: int) -> None:
  """Raises if ``recompute_batch_stats`` saw no batch at all."""
  if count == 0:
    raise ValueError(
      "`batches` is empty: recompute_batch_stats needs at least one batch to "
      "take the population statistics from."
    )
