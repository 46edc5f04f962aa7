"""flax.nnx ``WeightNorm`` and ``SpectralNorm``: they take the arguments of
their flax namesakes and reparameterize the weights of a wrapped Linear or
Conv layer.

They wrap a layer rather than normalize activations, so they are written out
here rather than built from a :mod:`jaxnorm._description` entry; every number
comes from :func:`jaxnorm.weight_norm` and :func:`jaxnorm.spectral_norm`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

import jaxnorm as jn
from jaxnorm import _checks
from jaxnorm._spectral_norm import (
  SpectralNormState,
  _spectral_norm_with_sigma,
  module_start,
)

Dtype = Any
Initializer = Any
Axes = Any


class _Stateful(nnx.Module):
  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``, ``model.train()`` and ``model.eval()``.

    Args:
      use_running_average: if true, the running statistics are used.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


def _key(path) -> tuple:
  """Keys of ``scales`` / ``batch_stats``: the parameter's path, as flax."""
  return tuple(path)


def _wrapped_params(module: nnx.Module, predicate=None):
  """``(path, nnx.Param)`` of the wrapped layer, in a stable order."""
  out = []
  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Param) and (predicate is None or predicate(path, node)):
      out.append((path, node))
  return out


class _Swap:
  """Gives parameters other values for one call of the wrapped layer.

  The layer's ``nnx.Param`` objects keep their identity (so ``nnx.grad``
  differentiates with respect to the stored weights, through the
  normalization); only their values change during the call.
  """

  def __init__(self, pairs):
    self.pairs = pairs
    self.saved = []

  def __enter__(self):
    for param, value in self.pairs:
      self.saved.append((param, param[...]))
      param[...] = value

  def __exit__(self, *exc):
    for param, value in self.saved:
      param[...] = value


_KERNEL = nnx.PathContains("kernel")
# flax.nnx.SpectralNorm's start of u.
_U_INIT = nnx.initializers.normal()


class WeightNorm(nnx.Module):
  """Weight normalization (Salimans & Kingma, 2016), like
  :class:`flax.nnx.WeightNorm`.

  Wraps any layer: every ``nnx.Param`` selected by ``variable_filter``
  (``kernel`` by default) is replaced, for the duration of each call, by
  :func:`jaxnorm.weight_norm` of it; the stored weight is the direction
  ``v`` and is left unchanged (flax's nnx version overwrites it with the
  normalized value at every call). The lengths are trainable ``nnx.Param``
  in ``self.scales``, keyed by the parameter's path (``("kernel",)``), as
  in flax (where they are plain arrays).

  ``init_from_weights`` chooses the initialization: ``False`` (flax's) uses
  ``scale_init`` (ones); ``True`` starts at ``||v||``
  (:func:`jaxnorm.weight_norm_init`), so the wrapped layer computes the
  same function as before wrapping.

  Args:
    layer_instance: the layer to wrap.
    feature_axes: axes with their own norm (``None``: one norm in all).
    use_scale: whether to learn the lengths.
    scale_init: initializer of the lengths when ``init_from_weights`` is
      false.
    epsilon: added to the squared norm.
    dtype: dtype of the normalized weight (default: promoted).
    param_dtype: dtype of the lengths.
    variable_filter: nnx filter of the parameters to normalize.
    promote_dtype: accepted for compatibility with flax.
    rngs: random keys for ``scale_init``.
    init_from_weights: jaxnorm extension: function-preserving init.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> dense = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 3))
    >>> y0 = dense(x)
    >>> model = jnx.WeightNorm(dense, init_from_weights=True, rngs=nnx.Rngs(1))
    >>> bool(jnp.allclose(model(x), y0, atol=1e-6))
    True
  """

  def __init__(
    self,
    layer_instance: nnx.Module,
    *,
    feature_axes: Axes | None = -1,
    use_scale: bool = True,
    scale_init: Initializer = nnx.initializers.ones,
    epsilon: float = 1e-12,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    variable_filter: Any = _KERNEL,
    promote_dtype: Any = nnx_dtypes.promote_dtype,
    rngs: nnx.Rngs,
    init_from_weights: bool = False,
  ):
    self.layer_instance = layer_instance
    self.feature_axes = feature_axes
    self.use_scale = use_scale
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
    self.promote_dtype = promote_dtype
    self.init_from_weights = init_from_weights
    scales = {}
    if use_scale:
      for path, param in _wrapped_params(layer_instance, self.variable_filter):
        v = param[...]
        if init_from_weights:
          s = jn.weight_norm_init(v, feature_axes=feature_axes).astype(param_dtype)
        else:
          faxes = () if feature_axes is None else _faxes(v.ndim, feature_axes)
          s = scale_init(rngs.params(), tuple(v.shape[a] for a in faxes), param_dtype)
        scales[_key(path)] = nnx.Param(s)
    self.scales = nnx.data(scales)

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    """Calls the wrapped layer with weight-normalized parameters."""
    pairs = []
    for path, param in _wrapped_params(self.layer_instance, self.variable_filter):
      scale = self.scales[_key(path)][...] if self.use_scale else None
      w = jn.weight_norm(
        param[...], scale, feature_axes=self.feature_axes, epsilon=self.epsilon
      )
      pairs.append((param, w if self.dtype is None else w.astype(self.dtype)))
    with _Swap(pairs):
      return self.layer_instance(x, *args, **kwargs)


def _faxes(ndim, feature_axes):
  return _checks.canonicalize_axes(ndim, feature_axes, "feature_axes")


class SpectralNorm(_Stateful):
  """Spectral normalization (Miyato et al., 2018), like
  :class:`flax.nnx.SpectralNorm`.

  Wraps any layer: each ``nnx.Param`` of rank 2 or more is divided, for the
  duration of each call, by its largest singular value, estimated by
  :func:`jaxnorm.spectral_norm` (matrix view: every axis but the last
  flattened). The power-iteration vectors ``u`` ``(1, out)`` and the last
  ``sigma`` are ``nnx.BatchStat`` in ``self.batch_stats``, keyed
  ``("kernel", "u")`` and ``("kernel", "sigma")`` as in flax.
  ``update_stats`` (constructor or call; ``model.train()``/``model.eval()``
  switch it) stores new values.

  Args:
    layer_instance: the layer to wrap.
    n_steps: power-iteration steps per call (``< 1``: no normalization).
    epsilon: added to squared norms.
    dtype: dtype of the normalized weight.
    param_dtype: dtype of ``u`` and ``sigma``.
    error_on_non_matrix: raise on parameters of rank above 2.
    update_stats: default of the call argument.
    rngs: random keys for the start of ``u``.
    n_warmup: jaxnorm extension: power-iteration steps at construction
      (0 by default, as flax; ``u`` starts at flax's draw, a normal of
      standard deviation 0.01, so the same ``rngs`` give flax's numbers).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> model = jnx.SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    ...                          rngs=nnx.Rngs(1))
    >>> model(jnp.ones((2, 3))).shape
    (2, 4)
  """

  def __init__(
    self,
    layer_instance: nnx.Module,
    *,
    n_steps: int = 1,
    epsilon: float = 1e-12,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    error_on_non_matrix: bool = False,
    update_stats: bool = True,
    rngs: nnx.Rngs,
    n_warmup: int = 0,
  ):
    self.layer_instance = layer_instance
    self.n_steps = n_steps
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.error_on_non_matrix = error_on_non_matrix
    # flax's convention: `use_running_average` is what train()/eval() set.
    self.use_running_average = not update_stats
    stats = {}
    for path, param in self._targets():
      u = module_start(param[...], rngs.params(), n_warmup, param_dtype, _U_INIT)
      stats[_key(path) + ("u",)] = nnx.BatchStat(u)
      stats[_key(path) + ("sigma",)] = nnx.BatchStat(jnp.ones((), param_dtype))
    self.batch_stats = nnx.data(stats)

  def _targets(self):
    out = []
    for path, param in _wrapped_params(self.layer_instance):
      if param.ndim <= 1 or self.n_steps < 1:
        continue
      if param.ndim > 2 and self.error_on_non_matrix:
        raise ValueError(
          f"Layer instance parameter is {param.ndim}D but error_on_non_matrix "
          "is True: `error_on_non_matrix`=True refuses a weight of more than "
          f"two dimensions ({jax.tree_util.keystr(tuple(path))})."
        )
      out.append((path, param))
    return out

  def __call__(self, x: jax.Array, update_stats: bool | None = None) -> jax.Array:
    """Calls the wrapped layer with spectrally normalized parameters.

    Args:
      x: the input of the wrapped layer.
      update_stats: whether to store the new ``u`` and ``sigma``; defaults
        to the constructor's (``model.train()``/``model.eval()``).

    Returns:
      The output of the wrapped layer.
    """
    if update_stats is None:
      update_stats = not self.use_running_average
    pairs = []
    for path, param in self._targets():
      u_var = self.batch_stats[_key(path) + ("u",)]
      sigma_var = self.batch_stats[_key(path) + ("sigma",)]
      w, new_state, sigma = _spectral_norm_with_sigma(
        param[...],
        SpectralNormState(u_var[...][0]),
        n_steps=self.n_steps,
        epsilon=self.epsilon,
        update_stats=True,
      )
      if update_stats:
        u_var[...] = new_state.u[None].astype(u_var.dtype)
        sigma_var[...] = jax.lax.stop_gradient(sigma).astype(sigma_var.dtype)
      pairs.append((param, w if self.dtype is None else w.astype(self.dtype)))
    with _Swap(pairs):
      return self.layer_instance(x)
