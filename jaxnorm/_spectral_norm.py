"""Spectral normalization (Miyato et al., 2018)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxnorm import _checks


class SpectralNormState(NamedTuple):
  """Power-iteration state of :func:`spectral_norm`.

  Attributes:
    u: ``(w.shape[-1],)``, the estimate of the leading right singular vector
      of the matrix view of ``w``, unit norm.
  """

  u: jax.Array


def _matrix(w: jax.Array) -> jax.Array:
  if jnp.iscomplexobj(w):
    raise TypeError(f"`w` must be real floating point, got dtype {w.dtype}.")
  if w.ndim < 2:
    raise ValueError(
      f"`w` must have at least 2 dimensions (its matrix view flattens every "
      f"axis but the last), got shape {w.shape}."
    )
  return w.reshape(-1, w.shape[-1]).astype(jnp.promote_types(w.dtype, jnp.float32))


def _l2_normalize(x, epsilon):
  return x * lax.rsqrt(jnp.sum(jnp.square(x)) + epsilon)


def _power_iteration(mat, u, n_steps, epsilon):
  # The squared norms overflow float32 once the entries pass about 1e18
  # (then u = 0 and sigma = 0: the weight came back unnormalized). u and v
  # are directions, so iterate on mat divided by a power of two near its
  # largest entry: exact, hence bit for bit flax's iteration wherever that
  # does not overflow (sigma >= max|W_ij|, so epsilon stays negligible).
  # Never scaled up: small weights keep flax's epsilon convention.
  _, exponent = jnp.frexp(lax.stop_gradient(jnp.max(jnp.abs(mat))))
  mat = mat / jnp.ldexp(jnp.ones((), mat.dtype), jnp.maximum(exponent - 1, 0))

  # A loop rather than n_steps unrolled copies: the 15 warm-up steps of
  # spectral_norm_init would otherwise be 30 matrix-vector products to
  # compile. With a static trip count it is a scan, so it differentiates.
  def step(_, carry):
    u, _ = carry
    v = _l2_normalize(mat @ u, epsilon)
    return _l2_normalize(v @ mat, epsilon), v

  v = jnp.zeros((mat.shape[0],), mat.dtype)
  return lax.fori_loop(0, n_steps, step, (u, v))


def spectral_norm_init(
  w: ArrayLike, key: jax.Array, *, n_warmup: int = 15
) -> SpectralNormState:
  """Starts the power iteration: a random unit ``u``, then ``n_warmup`` steps.

  Args:
    w: the weight, of rank at least 2 (e.g. a Dense kernel ``(in, out)`` or
      a Conv kernel ``(kh, kw, in, out)``).
    key: a PRNG key for the random start.
    n_warmup: power-iteration steps taken now, so that the first
      :func:`spectral_norm` already divides by a good estimate of sigma.

  Returns:
    ``SpectralNormState(u)``, ``u`` of shape ``(w.shape[-1],)``, float32 or
    wider.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> w = jnp.diag(jnp.array([3.0, 1.0]))
    >>> jnp.abs(jn.spectral_norm_init(w, jax.random.key(0)).u).round(3)
    Array([1., 0.], dtype=float32)
  """
  mat = _matrix(_checks.check_input(w, "w"))
  _check_warmup(n_warmup)
  u = jax.random.normal(key, (mat.shape[1],), mat.dtype)
  return SpectralNormState(u=_warm_up(mat, u, n_warmup))


def _check_warmup(n_warmup):
  if not _checks.is_int(n_warmup) or n_warmup < 0:
    raise ValueError(f"`n_warmup` must be a non-negative int, got {n_warmup!r}.")


def _warm_up(mat, u, n_warmup):
  """``u`` made unit, then ``n_warmup`` power-iteration steps on ``mat``."""
  u = _l2_normalize(u.astype(mat.dtype), 1e-12)
  u, _ = _power_iteration(mat, u, int(n_warmup), 1e-12)
  return lax.stop_gradient(u)


def module_start(w, key, n_warmup, dtype, draw):
  """The flax modules' ``u``, ``(1, out)`` in ``dtype``: flax's random start
  ``draw(key, shape, dtype)`` (linen draws a standard normal, nnx one of
  standard deviation 0.01, neither made unit), so that the same key gives
  flax's numbers; ``n_warmup > 0`` (a jaxnorm extension) then takes that
  many power-iteration steps."""
  mat = _matrix(jnp.asarray(w))
  _check_warmup(n_warmup)
  u = draw(key, (1, mat.shape[1]), dtype)
  if n_warmup:
    u = _warm_up(mat, u[0], n_warmup)[None].astype(dtype)
  return u


def spectral_norm(
  w: ArrayLike,
  state: SpectralNormState,
  *,
  n_steps: int = 1,
  epsilon: float = 1e-12,
  update_stats: bool = True,
) -> tuple[jax.Array, SpectralNormState]:
  r"""Spectral normalization: ``w / sigma(w)``, sigma by power iteration.

  With :math:`W` the matrix view of ``w`` (every axis but the last
  flattened, so ``W`` is ``(prod(w.shape[:-1]), w.shape[-1])``), each of the
  ``n_steps`` power-iteration steps is

  .. math::
    v \leftarrow \frac{W u}{\lVert W u \rVert}, \qquad
    u \leftarrow \frac{W^\top v}{\lVert W^\top v \rVert}, \qquad
    \sigma = v^\top W u,

  with ``epsilon`` added to the squared norms (flax's convention). ``u`` and
  ``v`` are under ``stop_gradient`` (Miyato et al., 2018), so the gradient
  flows through ``W`` in both ``w`` and ``sigma``. A ``sigma`` of exactly 0
  is replaced by 1.

  A state ``u`` of zeros (or with a NaN or Inf) has no direction to
  iterate from; it is replaced by the all-ones direction, so the layer
  recovers within a few steps instead of never normalizing.

  Args:
    w: the weight, rank at least 2.
    state: ``SpectralNormState(u)``.
    n_steps: power-iteration steps per call (at least 1).
    epsilon: added to squared norms in the normalizations.
    update_stats: whether ``new_state`` holds the new ``u``; with ``False``
      the state comes back unchanged (evaluation).

  Returns:
    ``(w / sigma, new_state)``; the weight has the dtype of ``w``.

  Raises:
    TypeError: ``w`` not floating point, ``update_stats`` not a bool,
      ``n_steps`` not an int.
    ValueError: ``w`` of rank below 2, ``state.u`` of the wrong shape, or
      ``n_steps`` below 1.

  References:
    Miyato, Kataoka, Koyama, Yoshida. *Spectral Normalization for Generative
    Adversarial Networks*. ICLR 2018. arXiv:1802.05957.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
    >>> state = jn.spectral_norm_init(w, jax.random.key(1))
    >>> w_sn, state = jn.spectral_norm(w, state)
    >>> s = jnp.linalg.svd(w_sn.reshape(-1, 8), compute_uv=False)[0]
    >>> bool(jnp.abs(s - 1.0) < 1e-3)
    True
  """
  w = _checks.check_input(w, "w")
  _checks.check_fields(state, "state", SpectralNormState)
  update_stats = _checks.as_bool(update_stats, "update_stats")
  n_steps = _checks.as_int(n_steps, "n_steps", least=1)
  w_bar, new_state, _ = _spectral_norm_with_sigma(
    w, state, n_steps=n_steps, epsilon=epsilon, update_stats=update_stats
  )
  return w_bar, new_state


def _spectral_norm_with_sigma(w, state, *, n_steps, epsilon, update_stats):
  """:func:`spectral_norm` that also returns sigma (flax's modules store it)."""
  mat = _matrix(w)
  u0 = _checks.check_param(
    state.u, (mat.shape[1],), "state.u", mat.dtype, required=True
  )
  epsilon = _checks.check_hyper(epsilon, "epsilon")
  u_start = u0.astype(mat.dtype)
  # A zero (or non-finite) u has no direction to iterate from: restart from
  # the all-ones direction, which is orthogonal to no singular vector of a
  # generic matrix, instead of staying at 0 and never normalizing.
  norm = jnp.sum(jnp.square(u_start))
  u_start = jnp.where((norm > 0) & jnp.isfinite(norm), u_start, jnp.ones_like(u_start))
  u, v = _power_iteration(lax.stop_gradient(mat), u_start, n_steps, epsilon)
  u, v = lax.stop_gradient(u), lax.stop_gradient(v)
  sigma = v @ mat @ u
  w_bar = (mat / jnp.where(sigma != 0, sigma, 1.0)).reshape(w.shape)
  new_state = SpectralNormState(u=u.astype(u0.dtype)) if update_stats else state
  return w_bar.astype(w.dtype), new_state, sigma
