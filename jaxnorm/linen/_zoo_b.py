"""flax.linen modules for MABN, EvoNorm-B0/S0, weight and spectral norm.

``MovingAverageBatchNorm``, ``EvoNormB0`` and ``EvoNormS0`` follow flax's
conventions (``params``, ``batch_stats``, ``use_running_average``);
``WeightNorm`` and ``SpectralNorm`` are drop-ins for their flax namesakes
and wrap any Dense or Conv layer. Every number comes from the functional
core in :mod:`jaxnorm`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.nn import initializers

import jaxnorm as jn
from jaxnorm import _checks
from jaxnorm._spectral_norm import SpectralNormState, _spectral_norm_with_sigma
from jaxnorm.linen._core import _affine_params, _as_inexact, _out_dtype, record_moments

Dtype = Any
Initializer = Any
Axes = Any


def _channels(x: jax.Array, axis: int) -> tuple[int, ...]:
  (c,) = _checks.canonicalize_axes(x.ndim, axis, "axis")
  return (x.shape[c],)


class MovingAverageBatchNorm(nn.Module):
  """Moving Average Batch Normalization (Yan et al., 2020), flax.linen.

  Calls :func:`jaxnorm.moving_average_batch_norm`; see it for the formula
  and the backward pass. Variables::

    params:      scale (C,), bias (C,)
    batch_stats: var (C,), second_moments (buffer_size, C),
                 grad_moments (buffer_size, C), count () int32

  ``grad_moments`` is written through the gradient: differentiate the loss
  with respect to ``batch_stats`` as well and pass the result to
  :func:`jaxnorm.apply_mabn_grad_moments` (see the example).

  Attributes:
    use_running_average: evaluation (running ``var``) if true; pass it here
      or at call time, not both.
    axis: the channel axis: ``-1`` for NHWC, ``1`` for NCHW.
    momentum: weight of the old value of the EMA ``var``.
    epsilon: added to the second moment inside the square root.
    dtype: output dtype (default: promoted from ``x`` and the params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: named axis to synchronize the statistics over.
    axis_index_groups: groups of indices of ``axis_name``.
    buffer_size: window of the simple moving averages.
    renorm_warmup_steps: training steps during which the renormalization
      factor is 1.
    r_max: clip of the renormalization factor.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn, jaxnorm.linen as jnn
    >>> model = jnn.MovingAverageBatchNorm(buffer_size=4)
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    >>> variables = model.init(jax.random.key(1), x, use_running_average=True)
    >>> def loss_fn(params, batch_stats):
    ...   y, updates = model.apply(
    ...       {"params": params, "batch_stats": batch_stats}, x,
    ...       use_running_average=False, mutable=["batch_stats"])
    ...   return jnp.sum(y ** 3), updates["batch_stats"]
    >>> grad_fn = jax.grad(loss_fn, argnums=(0, 1), has_aux=True, allow_int=True)
    >>> (g_params, g_stats), batch_stats = grad_fn(
    ...     variables["params"], variables["batch_stats"])
    >>> batch_stats = jn.apply_mabn_grad_moments(batch_stats, g_stats)
    >>> int(batch_stats["count"]), batch_stats["grad_moments"].shape
    (1, (4, 3))
  """

  use_running_average: bool | None = None
  axis: int = -1
  momentum: float = 0.98
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  buffer_size: int = 16
  renorm_warmup_steps: int = 1000
  r_max: float = 5.0

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; updates ``batch_stats`` in training.

    Args:
      x: input ``(N, ..., C, ...)``.
      use_running_average: evaluation if true; training (``batch_stats``
        mutable) if false.
      mask: optional boolean array broadcastable to ``x``.

    Returns:
      An array of the shape of ``x``.
    """
    use_running_average = bool(
      nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
      )
    )
    x = jnp.asarray(x)
    fshape = _channels(x, self.axis)
    _, init_state = jn.moving_average_batch_norm_init(
      fshape[0], buffer_size=self.buffer_size
    )
    state = {
      name: self.variable("batch_stats", name, lambda v=v: v)
      for name, v in init_state._asdict().items()
    }
    scale, bias = _affine_params(self, fshape)
    out_dtype = _out_dtype(x, scale, bias, dtype=self.dtype)
    x = _as_inexact(x, out_dtype)
    y, new_state = jn.moving_average_batch_norm(
      x,
      jn.NormParams(scale, bias),
      jn.MovingAverageBatchNormState(**{k: v.value for k, v in state.items()}),
      use_running_average=use_running_average,
      axis=self.axis,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis_name=None if self.is_initializing() else self.axis_name,
      axis_index_groups=None if self.is_initializing() else self.axis_index_groups,
      mask=mask,
      renorm_warmup_steps=self.renorm_warmup_steps,
      r_max=self.r_max,
      dtype=out_dtype,
    )
    if not use_running_average and not self.is_initializing():
      for name, value in new_state._asdict().items():
        if name != "grad_moments":
          state[name].value = value
    record_moments(self, x, self.axis, mask, use_running_average)
    return y


class EvoNormB0(nn.Module):
  """EvoNorm-B0 (Liu et al., 2020), flax.linen.

  Calls :func:`jaxnorm.evonorm_b0`:
  ``y = x / max(sqrt(var_B + eps), v * x + sqrt(var_inst + eps)) * scale +
  bias``. Variables: ``params``: ``scale``, ``bias``, ``v`` (C,);
  ``batch_stats``: ``var`` (C,).

  Attributes:
    use_running_average: evaluation (running ``var``) if true.
    axis: the channel axis.
    momentum: weight of the old running variance.
    epsilon: added to both variances.
    dtype: output dtype (default: promoted from ``x`` and the params).
    param_dtype: dtype of the params.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    v_init: initializer of ``v`` (ones, as in the paper).
    axis_name: named axis to synchronize the batch variance over.
    axis_index_groups: groups of indices of ``axis_name``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
    >>> model = jnn.EvoNormB0()
    >>> variables = model.init(jax.random.key(1), x, use_running_average=False)
    >>> y, updates = model.apply(variables, x, use_running_average=False,
    ...                          mutable=["batch_stats"])
    >>> sorted(variables["params"]), y.shape
    (['bias', 'scale', 'v'], (4, 6, 6, 8))
  """

  use_running_average: bool | None = None
  axis: int = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  v_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Applies EvoNorm-B0; updates ``batch_stats`` in training.

    Args:
      x: input ``(N, ..., C, ...)``.
      use_running_average: evaluation if true.
      mask: optional boolean array broadcastable to ``x``.

    Returns:
      An array of the shape of ``x``.
    """
    use_running_average = bool(
      nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
      )
    )
    x = jnp.asarray(x)
    fshape = _channels(x, self.axis)
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(fshape, jnp.float32))
    params = _evonorm_params(self, fshape)
    out_dtype = _out_dtype(x, *params, dtype=self.dtype)
    x = _as_inexact(x, out_dtype)
    initializing = self.is_initializing()
    y, new_state = jn.evonorm_b0(
      x,
      params,
      jn.EvoNormB0State(ra_var.value),
      use_running_average=use_running_average,
      axis=self.axis,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis_name=None if initializing else self.axis_name,
      axis_index_groups=None if initializing else self.axis_index_groups,
      mask=mask,
      dtype=out_dtype,
    )
    if not use_running_average and not initializing:
      ra_var.value = new_state.var
    record_moments(self, x, self.axis, mask, use_running_average)
    return y


def _evonorm_params(module, fshape) -> jn.EvoNormParams:
  scale = (
    module.param("scale", module.scale_init, fshape, module.param_dtype)
    if module.use_scale
    else None
  )
  bias = (
    module.param("bias", module.bias_init, fshape, module.param_dtype)
    if module.use_bias
    else None
  )
  v = module.param("v", module.v_init, fshape, module.param_dtype)
  return jn.EvoNormParams(scale, bias, v)


class EvoNormS0(nn.Module):
  """EvoNorm-S0 (Liu et al., 2020), flax.linen.

  Calls :func:`jaxnorm.evonorm_s0`:
  ``y = x * sigmoid(v * x) / sqrt(var_group + eps) * scale + bias``.
  Variables: ``params``: ``scale``, ``bias``, ``v`` (C,). No state.

  Attributes:
    num_groups: number of channel groups (``None`` to give ``group_size``).
    group_size: channels per group.
    axis: the channel axis.
    epsilon: added to the group variance.
    dtype: output dtype.
    param_dtype: dtype of the params.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    v_init: initializer of ``v`` (ones).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm.linen as jnn
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    >>> model = jnn.EvoNormS0(num_groups=4)
    >>> variables = model.init(jax.random.key(1), x)
    >>> model.apply(variables, x).shape
    (2, 4, 4, 8)
  """

  num_groups: int | None = 32
  group_size: int | None = None
  axis: int = -1
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  v_init: Initializer = initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Applies EvoNorm-S0.

    Args:
      x: input ``(N, ..., C, ...)``.
      mask: optional boolean array broadcastable to ``x``.

    Returns:
      An array of the shape of ``x``.
    """
    x = jnp.asarray(x)
    params = _evonorm_params(self, _channels(x, self.axis))
    out_dtype = _out_dtype(x, *params, dtype=self.dtype)
    return jn.evonorm_s0(
      _as_inexact(x, out_dtype),
      params,
      num_groups=self.num_groups,
      group_size=self.group_size,
      axis=self.axis,
      epsilon=self.epsilon,
      mask=mask,
      dtype=out_dtype,
    )


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

  flax starts ``u`` at a random normal vector; ``n_warmup`` (jaxnorm
  extension, 15 by default) runs that many power-iteration steps at init so
  the first normalization already uses a good sigma (``n_warmup=0`` is
  flax's behaviour).

  Attributes:
    layer_instance: the module to wrap.
    n_steps: power-iteration steps per call (``< 1``: no normalization).
    epsilon: added to squared norms.
    dtype: dtype of the normalized weight (default: promoted).
    param_dtype: dtype of ``u`` and ``sigma``.
    error_on_non_matrix: raise on parameters of rank above 2 instead of
      flattening them.
    collection_name: the collection of ``u`` and ``sigma``.
    n_warmup: power-iteration steps at init.

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
  n_warmup: int = 15

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
      raise ValueError(f"Input is {value.ndim}D but error_on_non_matrix is True")
    name = _path_name(self.layer_instance, path)
    u_var = self.variable(
      self.collection_name,
      name + "/u",
      lambda key: (
        jn.spectral_norm_init(value, key, n_warmup=self.n_warmup)
        .u[None]
        .astype(self.param_dtype)
      ),
      self.make_rng("params")
      if not self.has_variable(self.collection_name, name + "/u")
      else None,
    )
    sigma_var = self.variable(
      self.collection_name, name + "/sigma", jnp.ones, (), self.param_dtype
    )
    w, new_state, sigma = _spectral_norm_with_sigma(
      value,
      SpectralNormState(u_var.value[0]),
      n_steps=self.n_steps,
      epsilon=self.epsilon,
      update_stats=True,
    )
    if update_stats:
      u_var.value = new_state.u[None].astype(u_var.value.dtype)
      sigma_var.value = sigma.astype(sigma_var.value.dtype)
    return w if self.dtype is None else w.astype(self.dtype)
