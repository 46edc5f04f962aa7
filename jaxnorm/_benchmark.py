"""Timing of jitted normalization calls, as ``benchmarks/run.py`` does it.

The suite and :func:`benchmark` share these helpers so that a user's figure
for one configuration means the same as a row of the published table:
compile once (timed), one untimed warm-up call, then the median of ``reps``
timed calls, each waited on with ``block_until_ready`` and each preceded by
a write over a 64 MiB buffer, so that every call starts from the same cache
state whatever ran before it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import _checks


class BenchmarkResult(NamedTuple):
  """What :func:`benchmark` measured.

  Attributes:
    median_s: median wall time of one call, in seconds, after compilation.
    times_s: every timed call, in seconds, in the order they ran.
    compile_s: seconds to trace, lower and compile the function.
    bytes_accessed: XLA's ``bytes accessed`` of the compiled program (its own
      estimate of memory traffic), or ``None`` when the backend gives none.
    residual_bytes: bytes the backward pass keeps from the forward pass (the
      leaves of the ``jax.vjp`` closure), or ``None`` for ``mode="fwd"``.
    mode: ``"fwd"`` or ``"fwd+bwd"``.
  """

  median_s: float
  times_s: tuple[float, ...]
  compile_s: float
  bytes_accessed: float | None
  residual_bytes: int | None
  mode: str


def _first(out: Any) -> jax.Array:
  """The normalized output: layers such as batch norm return ``(y, state)``."""
  return out[0] if isinstance(out, tuple | list) else out


def forward_and_backward(fn: Callable, argnums: Sequence[int]) -> Callable:
  """``(dy, *args) -> (y, grads)``: the gradient of ``sum(y * dy)``.

  Returns ``y`` too, so that the forward work cannot be removed as dead code
  and the timing covers a real training step of the layer.
  """

  def loss(*args_and_dy):
    *args, dy = args_and_dy
    y = _first(fn(*args))
    return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)), y

  # allow_int: an integer leaf (num_batches_tracked) gets a float0 gradient.
  grad = jax.grad(loss, argnums=tuple(argnums), has_aux=True, allow_int=True)

  def step(dy, *args):
    grads, y = grad(*args, dy)
    return y, grads

  return step


def forward_only(fn: Callable) -> Callable:
  """``(*args) -> y``: the layer's normalized output alone."""
  return lambda *args: _first(fn(*args))


def compile_timed(fn: Callable, *args: Any) -> tuple[Any, float]:
  """Jits, lowers and compiles ``fn`` for ``args``; returns it and the seconds."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


_FLUSH_BYTES = 64 << 20
_flush_buffer: list[np.ndarray] = []


def flush_caches() -> None:
  """Writes one byte in every 64-byte line of a 64 MiB buffer.

  Without it a call's time depends on what the previous call left in the
  caches: on the 2-core machine of the published table the same compiled
  layer, timed as two entries of one interleaved run, differed by up to 30%
  at 4 ms; with it, by 2-6%.
  """
  if not _flush_buffer:
    _flush_buffer.append(np.zeros(_FLUSH_BYTES, np.uint8))
  _flush_buffer[0][::64] += 1


def time_once(compiled: Any, *args: Any) -> float:
  """Seconds for one call of ``compiled``, waiting for every output.

  The caches are flushed first (:func:`flush_caches`), outside the timing.
  """
  flush_caches()
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - start


def bytes_accessed(compiled: Any) -> float | None:
  """XLA's ``bytes accessed`` estimate for a compiled program, if it has one."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement the analysis
    return None
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  if not cost or "bytes accessed" not in cost:
    return None
  return float(cost["bytes accessed"])


def residual_bytes(fn: Callable, args: Sequence[Any], argnums: Sequence[int]) -> int:
  """Bytes saved for the backward pass of ``fn`` w.r.t. ``args[argnums]``.

  Read from the leaves of the ``jax.vjp`` closure under ``jax.eval_shape``,
  so nothing is computed. Inputs the closure keeps (``x`` itself) count.
  """

  def vjp_closure(*diff):
    full = list(args)
    for i, a in zip(argnums, diff, strict=True):
      full[i] = a

    def f(*d):
      inner = list(full)
      for i, a in zip(argnums, d, strict=True):
        inner[i] = a
      return _first(fn(*inner))

    return jax.vjp(f, *diff)[1]

  closure = jax.eval_shape(vjp_closure, *(args[i] for i in argnums))
  return sum(
    math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
    for leaf in jax.tree_util.tree_leaves(closure)
  )


def _check_argnums(argnums: Any, n: int) -> tuple[int, ...]:
  """``argnums`` (``None``, an int or a sequence of ints) as a tuple of
  positions in ``range(n)``."""
  if argnums is None:
    return tuple(range(n))
  if _checks.is_int(argnums):
    argnums = (argnums,)
  if not isinstance(argnums, Sequence) or not all(map(_checks.is_int, argnums)):
    raise TypeError(f"`argnums` must be an int or a sequence of ints, got {argnums!r}.")
  out = tuple(int(i) % n if -n <= i < n else None for i in argnums)
  if None in out or not out:
    raise ValueError(
      f"`argnums`={argnums!r} must name at least one of the {n} positions of `args`."
    )
  return out


def benchmark(
  fn: Callable,
  *args: Any,
  mode: str = "fwd",
  reps: int = 7,
  argnums: Sequence[int] | None = None,
  seed: int = 0,
) -> BenchmarkResult:
  """Times a normalization call under ``jax.jit``, as the benchmark suite does.

  ``fn(*args)`` must return the normalized array ``y``, or a tuple whose
  first element is ``y`` (as :func:`jaxnorm.batch_norm` returns
  ``(y, new_state)``). Hyperparameters are closed over (``functools.partial``
  or a lambda), not passed in ``args``.

  With ``mode="fwd+bwd"`` the timed program computes ``y`` and the gradient
  of ``sum(y * dy)`` for a fixed random ``dy`` with respect to
  ``args[argnums]`` (by default every argument): one training step of the
  layer. The program is compiled once (``compile_s``), called once untimed,
  then ``reps`` times; ``median_s`` is the median of those calls.

  Args:
    fn: the function to time, e.g. ``lambda x, p: jn.layer_norm(x, p)``.
    *args: its arguments; the first is the input ``x``.
    mode: ``"fwd"`` (forward only) or ``"fwd+bwd"`` (forward and backward).
    reps: number of timed calls (at least 1).
    argnums: position or positions in ``args`` to differentiate for
      ``"fwd+bwd"`` (an integer leaf, such as ``num_batches_tracked``, gets
      a ``float0`` gradient, as with ``jax.grad(..., allow_int=True)``).
    seed: seed of the random cotangent ``dy``.

  Returns:
    A :class:`BenchmarkResult`.

  Raises:
    TypeError: ``reps`` not an int, ``argnums`` not ints.
    ValueError: an unknown ``mode``, ``reps < 1``, no arguments, or an
      ``argnums`` out of range.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jnp.ones((4, 16))
    >>> r = jn.benchmark(jn.layer_norm, x, jn.layer_norm_init(16),
    ...                  mode="fwd+bwd", reps=3)
    >>> len(r.times_s), r.median_s > 0, r.mode
    (3, True, 'fwd+bwd')
    >>> r.residual_bytes >= x.nbytes  # the backward pass keeps x
    True
  """
  if mode not in ("fwd", "fwd+bwd"):
    raise ValueError(f"`mode` must be 'fwd' or 'fwd+bwd', got {mode!r}.")
  reps = _checks.as_int(reps, "reps", least=1)
  if not args:
    raise ValueError("`args` is empty: pass at least the input `x`.")
  if mode == "fwd":
    program, call_args, saved = forward_only(fn), args, None
  else:
    argnums = _check_argnums(argnums, len(args))
    y = jax.eval_shape(lambda *a: _first(fn(*a)), *args)
    dy = jax.random.normal(jax.random.key(seed), y.shape, jnp.float32).astype(y.dtype)
    program = forward_and_backward(fn, argnums)
    call_args = (dy, *args)
    saved = residual_bytes(fn, args, argnums)
  compiled, compile_s = compile_timed(program, *call_args)
  jax.block_until_ready(compiled(*call_args))
  times = tuple(time_once(compiled, *call_args) for _ in range(reps))
  return BenchmarkResult(
    median_s=statistics.median(times),
    times_s=times,
    compile_s=compile_s,
    bytes_accessed=bytes_accessed(compiled),
    residual_bytes=saved,
    mode=mode,
  )
