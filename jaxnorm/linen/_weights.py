"""flax.linen ``WeightNorm`` and ``SpectralNorm``: drop-ins for their flax
namesakes that reparameterize the weights of a wrapped Dense or Conv layer.

They wrap a layer rather than normalize activations, so they are written out
here rather than built from a :mod:`jaxnorm._description` entry; every number
comes from :func:`jaxnorm.weight_norm` and :func:`jaxnorm.spectral_norm`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes as flax_dtypes
from jax.nn import initializers

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


def _path_name(layer: nn.Module, path) -> str:
  """flax's variable name for a wrapped parameter: ``Dense_0/kernel``."""
  return layer.name + "/" + jax.tree_util.keystr(path[1:], simple=True, separator="/")


class WeightNorm(nn.Module):
  """Weight normalization (Salimans & Kingma, 2016), a drop-in for
  :class:`flax.linen.WeightNorm`.

  Wraps any layer (Dense, Conv, ...): every parameter whose path contains a
  name in ``variable_filter`` (``kernel`` by default) is replaced, before
  the layer runs, by :func:`jaxnorm.weight_norm` of it, with one ``scale``
  per feature along ``feature_axes``. The variables are flax's: the layer's
  own under ``layer_instance``, plus
  ``params/"layer_instance/kernel/scale"``, so checkpoints
  move between the two.

  ``init_from_weights`` chooses the initialization: ``False`` (flax's) starts
  ``scale`` with ``scale_init`` (ones: every output feature rescaled to norm
  1); ``True`` starts it at ``||v||`` (:func:`jaxnorm.weight_norm_init`), so
  the wrapped layer computes exactly the function it had without the
  wrapper (the paper's choice before its data-dependent init).

  Attributes:
    layer_instance: the module to wrap.
    epsilon: added to the squared norm.
    dtype: dtype of the normalized weight (default: promoted).
    param_dtype: dtype of ``scale``.
    use_scale: whether to learn ``scale``; otherwise the norm is 1.
    scale_init: initializer of ``scale`` when ``init_from_weights`` is false.
    feature_axes: axes with their own norm (``None``: one norm in all).
    variable_filter: names of the parameters to normalize; ``None`` or empty
      normalizes all of them.
    init_from_weights: jaxnorm extension: function-preserving init.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import jaxnorm.linen as jnn
    >>> x = jnp.ones((2, 3))
    >>> model = jnn.WeightNorm(nn.Dense(4), init_from_weights=True)
    >>> variables = model.init(jax.random.key(0), x)
    >>> sorted(variables["params"])
    ['layer_instance', 'layer_instance/kernel/scale']
    >>> dense = {"params": variables["params"]["layer_instance"]}
    >>> plain = nn.Dense(4).apply(dense, x)
    >>> bool(jnp.allclose(model.apply(variables, x), plain, atol=1e-6))
    True
  """

  layer_instance: nn.Module
  epsilon: float = 1e-12
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  feature_axes: Axes | None = -1
  variable_filter: Iterable | None = frozenset({"kernel"})
  init_from_weights: bool = False

  @nn.compact
  def __call__(self, *args, **kwargs):
    """Calls the wrapped layer with weight-normalized parameters."""
    return nn.map_variables(
      lambda layer: layer(*args, **kwargs),
      trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(self._normalize, vs),
      init=self.is_initializing(),
    )(self.layer_instance)

  def _normalize(self, path, value):
    value = jnp.asarray(value)
    name = _path_name(self.layer_instance, path)
    if self.variable_filter and not any(f in name for f in self.variable_filter):
      return value
    scale = None
    if self.use_scale:
      faxes = (
        ()
        if self.feature_axes is None
        else _checks.canonicalize_axes(value.ndim, self.feature_axes, "feature_axes")
      )
      shape = tuple(value.shape[a] for a in faxes)
      if self.init_from_weights:
        scale = self.param(
          name + "/scale",
          lambda _, v: jn.weight_norm_init(v, feature_axes=self.feature_axes).astype(
            self.param_dtype
          ),
          value,
        )
      else:
        scale = self.param(name + "/scale", self.scale_init, shape, self.param_dtype)
    w = jn.weight_norm(
      value, scale, feature_axes=self.feature_axes, epsilon=self.epsilon
    )
    return w if self.dtype is None else w.astype(self.dtype)


class SpectralNorm(nn.Module):
  """Spectral normalization (Miyato et al., 2018), a drop-in for
  :class:`flax.linen.SpectralNorm`.

  Wraps any layer: each parameter of rank 2 or more is divided, before the
  layer runs, by its largest singular value, estimated by
  :func:`jaxnorm.spectral_norm` (matrix view: every axis but the last
  flattened). The variables are flax's: in ``collection_name``
  (``batch_stats``), ``"layer_instance/kernel/u"`` of shape ``(1, out)``
  and ``"layer_instance/kernel/sigma"``. ``update_stats`` (call argument) stores the
  new ``u`` and ``sigma``; make the collection mutable then.

  ``u`` starts where flax's does (a standard normal draw from the
  ``params`` key), so the same key gives flax's variables and numbers.
  ``n_warmup`` (jaxnorm extension, 0 by default as in flax) runs that many
  power-iteration steps at init, so that the first normalization already
  divides by a good estimate of sigma (with one step per call from a random
  start, the first calls underestimate it: 1.24 where the largest singular
  value is 1 in one measured Dense(5, 4)).

  Dtypes are flax's: the power iteration runs in the promotion of the
  weight and ``u``, and the normalized weight has that dtype (or
  ``dtype``), so a bfloat16 kernel with float32 ``u`` gives float32
  (and ``init`` stores the wrapped kernel as float32, as flax does). One
  difference: ``u`` and ``sigma`` keep ``param_dtype`` when updated, where
  flax stores them in the promoted dtype from the first update on.
  flax.nnx's ``SpectralNorm`` returns the kernel's own dtype instead, and
  so does :class:`jaxnorm.nnx.SpectralNorm`: with a low-precision kernel
  the two twins differ in dtype, as flax's do (each follows its flax
  namesake).

  Attributes:
    layer_instance: the module to wrap.
    n_steps: power-iteration steps per call (``< 1``: no normalization).
    epsilon: added to squared norms.
    dtype: dtype of the normalized weight (default: promoted from the
      weight and ``u``).
    param_dtype: dtype of ``u`` and ``sigma``, kept on update.
    error_on_non_matrix: raise on parameters of rank above 2 instead of
      flattening them.
    collection_name: the collection of ``u`` and ``sigma``.
    n_warmup: power-iteration steps at init (jaxnorm extension; flax: 0).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import jaxnorm.linen as jnn
    >>> x = jnp.ones((2, 3))
    >>> model = jnn.SpectralNorm(nn.Dense(4))
    >>> variables = model.init(jax.random.key(0), x, update_stats=False)
    >>> y, updates = model.apply(variables, x, update_stats=True,
    ...                          mutable=["batch_stats"])
    >>> jax.tree.map(jnp.shape, updates["batch_stats"])
    {'layer_instance/kernel/sigma': (), 'layer_instance/kernel/u': (1, 4)}
  """

  layer_instance: nn.Module
  n_steps: int = 1
  epsilon: float = 1e-12
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  error_on_non_matrix: bool = False
  collection_name: str = "batch_stats"
  n_warmup: int = 0

  @nn.compact
  def __call__(self, *args, update_stats: bool, **kwargs):
    """Calls the wrapped layer with spectrally normalized parameters.

    Args:
      *args: positional arguments of the wrapped layer.
      update_stats: whether to store the new ``u`` and ``sigma``.
      **kwargs: keyword arguments of the wrapped layer.
    """
    return nn.map_variables(
      lambda layer: layer(*args, **kwargs),
      trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(
        lambda p, v: self._normalize(p, v, update_stats), vs
      ),
      init=self.is_initializing(),
      mutable=True,
    )(self.layer_instance)

  def _normalize(self, path, value, update_stats):
    value = jnp.asarray(value)
    if value.ndim <= 1 or self.n_steps < 1:
      return value
    if value.ndim > 2 and self.error_on_non_matrix:
      raise ValueError(
        f"Input is {value.ndim}D but error_on_non_matrix is True: "
        "`error_on_non_matrix`=True refuses a weight of more than two "
        f"dimensions ({_path_name(self.layer_instance, path)})."
      )
    name = _path_name(self.layer_instance, path)
    u_var = self.variable(
      self.collection_name,
      name + "/u",
      lambda key: module_start(
        value, key, self.n_warmup, self.param_dtype, jax.random.normal
      ),
      self.make_rng("params")
      if not self.has_variable(self.collection_name, name + "/u")
      else None,
    )
    sigma_var = self.variable(
      self.collection_name, name + "/sigma", jnp.ones, (), self.param_dtype
    )
    # flax iterates in the promotion of the weight and ``u`` and returns the
    # weight in that dtype (float32 for a bfloat16 kernel and float32 ``u``),
    # which is also what init then stores as the wrapped kernel.
    compute = flax_dtypes.canonicalize_dtype(value, u_var.value)
    w, new_state, sigma = _spectral_norm_with_sigma(
      value.astype(compute),
      SpectralNormState(u_var.value[0]),
      n_steps=self.n_steps,
      epsilon=self.epsilon,
      update_stats=True,
    )
    if update_stats:
      u_var.value = new_state.u[None].astype(u_var.value.dtype)
      sigma_var.value = sigma.astype(sigma_var.value.dtype)
    return w if self.dtype is None else w.astype(self.dtype)
