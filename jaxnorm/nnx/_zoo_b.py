"""flax.nnx modules for MABN, EvoNorm-B0/S0, weight and spectral norm.

``MovingAverageBatchNorm``, ``EvoNormB0`` and ``EvoNormS0`` follow flax's
conventions (``nnx.Param``, ``nnx.BatchStat``, ``use_running_average``,
``rngs``); ``WeightNorm`` and ``SpectralNorm`` take the arguments of their
flax namesakes and wrap any Dense or Conv layer. Every number comes from
the functional core in :mod:`jaxnorm`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

import jaxnorm as jn
from jaxnorm import _checks
from jaxnorm._spectral_norm import SpectralNormState, _spectral_norm_with_sigma
from jaxnorm.linen._core import _as_inexact
from jaxnorm.nnx._core import _NO_METADATA, _make_param, _value, record_moments

Dtype = Any
Initializer = Any
Axes = Any


class GradMoments(nnx.BatchStat):
  """The MABN backward-statistic buffer, a ``BatchStat`` written by gradient.

  Its own type, so ``nnx.DiffState(0, nnx.Any(nnx.Param, GradMoments))``
  differentiates with respect to it (and not the int32 step counter).
  """


def _resolve(module, use_running_average):
  if use_running_average is None:
    use_running_average = module.use_running_average
  if use_running_average is None:
    raise ValueError(
      f"No `use_running_average` was given to {type(module).__name__}: pass "
      "it to the constructor or the call, or use `model.train()` / "
      "`model.eval()`."
    )
  return bool(use_running_average)


class _Stateful(nnx.Module):
  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``, ``model.train()`` and ``model.eval()``.

    Args:
      use_running_average: if true, the running statistics are used.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


def _affine_params(
  num_features, rngs, param_dtype, use_scale, use_bias, scale_init, bias_init,
  scale_metadata, bias_metadata,
):  # fmt: skip
  shape = _checks.num_features_shape(num_features)
  scale = (
    _make_param(scale_init, rngs, shape, param_dtype, scale_metadata)
    if use_scale
    else nnx.data(None)
  )
  bias = (
    _make_param(bias_init, rngs, shape, param_dtype, bias_metadata)
    if use_bias
    else nnx.data(None)
  )
  return scale, bias


class MovingAverageBatchNorm(_Stateful):
  """Moving Average Batch Normalization (Yan et al., 2020), flax.nnx.

  Calls :func:`jaxnorm.moving_average_batch_norm`. Attributes: ``scale``,
  ``bias`` (``nnx.Param``, ``(C,)``); ``var``, ``second_moments``,
  ``count`` (``nnx.BatchStat``) and ``grad_moments`` (:class:`GradMoments`,
  a ``BatchStat``), which the backward pass writes through its gradient:
  differentiate with respect to ``GradMoments`` too and apply the result
  with :func:`jaxnorm.apply_mabn_grad_moments` (see the example).

  Args:
    num_features: the number of channels ``C``.
    use_running_average: evaluation (running ``var``) if true.
    axis: the channel axis.
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
    renorm_warmup_steps: training steps with renormalization factor 1.
    r_max: clip of the renormalization factor.
    rngs: random keys for the initializers.
    bias_metadata: metadata of the ``bias`` param.
    scale_metadata: metadata of the ``scale`` param.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm as jn, jaxnorm.nnx as jnx
    >>> model = jnx.MovingAverageBatchNorm(3, buffer_size=4, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    >>> def loss_fn(model):
    ...   return jnp.sum(model(x) ** 3)
    >>> diff = nnx.DiffState(0, nnx.Any(nnx.Param, jnx.GradMoments))
    >>> grads = nnx.grad(loss_fn, argnums=diff)(model)
    >>> buffers = nnx.state(model, jnx.GradMoments)
    >>> nnx.update(model, jn.apply_mabn_grad_moments(buffers, grads))
    >>> int(model.count[...]), bool(jnp.all(model.grad_moments[...][0] != 0))
    (1, True)
  """

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: int = -1,
    momentum: float = 0.98,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = nnx.initializers.zeros,
    scale_init: Initializer = nnx.initializers.ones,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    buffer_size: int = 16,
    renorm_warmup_steps: int = 1000,
    r_max: float = 5.0,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    scale_metadata: Mapping[str, Any] = _NO_METADATA,
  ):
    _, state = jn.moving_average_batch_norm_init(num_features, buffer_size=buffer_size)
    self.var = nnx.BatchStat(state.var)
    self.second_moments = nnx.BatchStat(state.second_moments)
    self.grad_moments = GradMoments(state.grad_moments)
    self.count = nnx.BatchStat(state.count)
    self.scale, self.bias = _affine_params(
      num_features, rngs, param_dtype, use_scale, use_bias, scale_init, bias_init,
      scale_metadata, bias_metadata,
    )  # fmt: skip
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.buffer_size = buffer_size
    self.renorm_warmup_steps = renorm_warmup_steps
    self.r_max = r_max

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; updates the statistics in training.

    Args:
      x: input ``(N, ..., C, ...)``.
      use_running_average: evaluation if true; overrides the attribute.
      mask: optional boolean array broadcastable to ``x``.

    Returns:
      An array of the shape of ``x``.
    """
    use_running_average = _resolve(self, use_running_average)
    scale, bias = _value(self.scale), _value(self.bias)
    out_dtype = nnx_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    y, new_state = jn.moving_average_batch_norm(
      _as_inexact(x, out_dtype),
      jn.NormParams(scale, bias),
      jn.MovingAverageBatchNormState(
        self.var[...], self.second_moments[...], self.grad_moments[...], self.count[...]
      ),
      use_running_average=use_running_average,
      axis=self.axis,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      mask=mask,
      renorm_warmup_steps=self.renorm_warmup_steps,
      r_max=self.r_max,
      dtype=out_dtype,
    )
    if not use_running_average:
      self.var[...] = jax.lax.stop_gradient(new_state.var)
      self.second_moments[...] = jax.lax.stop_gradient(new_state.second_moments)
      self.count[...] = new_state.count
    record_moments(self, x, self.axis, mask, use_running_average)
    return y


class EvoNormB0(_Stateful):
  """EvoNorm-B0 (Liu et al., 2020), flax.nnx.

  Calls :func:`jaxnorm.evonorm_b0`:
  ``y = x / max(sqrt(var_B + eps), v * x + sqrt(var_inst + eps)) * scale +
  bias``. Attributes: ``scale``, ``bias``, ``v`` (``nnx.Param``, ``(C,)``);
  ``var`` (``nnx.BatchStat``, ones).

  Args:
    num_features: the number of channels ``C``.
    use_running_average: evaluation (running ``var``) if true.
    axis: the channel axis.
    momentum: weight of the old running variance.
    epsilon: added to both variances.
    dtype: output dtype.
    param_dtype: dtype of the params.
    use_bias: whether to add ``bias``.
    use_scale: whether to multiply by ``scale``.
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    v_init: initializer of ``v`` (ones).
    axis_name: named axis to synchronize the batch variance over.
    axis_index_groups: groups of indices of ``axis_name``.
    rngs: random keys for the initializers.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> layer = jnx.EvoNormB0(8, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
    >>> y = layer(x)
    >>> layer.eval()
    >>> layer(x).shape
    (4, 6, 6, 8)
  """

  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: int = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = nnx.initializers.zeros,
    scale_init: Initializer = nnx.initializers.ones,
    v_init: Initializer = nnx.initializers.ones,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
    rngs: nnx.Rngs,
  ):
    self.var = nnx.BatchStat(
      jnp.ones(_checks.num_features_shape(num_features), jnp.float32)
    )
    self.scale, self.bias = _affine_params(
      num_features, rngs, param_dtype, use_scale, use_bias, scale_init, bias_init,
      _NO_METADATA, _NO_METADATA,
    )  # fmt: skip
    self.v = _make_param(
      v_init, rngs, _checks.num_features_shape(num_features), param_dtype, _NO_METADATA
    )
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Applies EvoNorm-B0; updates ``var`` in training.

    Args:
      x: input ``(N, ..., C, ...)``.
      use_running_average: evaluation if true; overrides the attribute.
      mask: optional boolean array broadcastable to ``x``.

    Returns:
      An array of the shape of ``x``.
    """
    use_running_average = _resolve(self, use_running_average)
    params = jn.EvoNormParams(_value(self.scale), _value(self.bias), self.v[...])
    out_dtype = nnx_dtypes.canonicalize_dtype(x, *params, dtype=self.dtype)
    y, new_state = jn.evonorm_b0(
      _as_inexact(x, out_dtype),
      params,
      jn.EvoNormB0State(self.var[...]),
      use_running_average=use_running_average,
      axis=self.axis,
      momentum=self.momentum,
      epsilon=self.epsilon,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      mask=mask,
      dtype=out_dtype,
    )
    if not use_running_average:
      self.var[...] = jax.lax.stop_gradient(new_state.var)
    record_moments(self, x, self.axis, mask, use_running_average)
    return y


class EvoNormS0(nnx.Module):
  """EvoNorm-S0 (Liu et al., 2020), flax.nnx.

  Calls :func:`jaxnorm.evonorm_s0`:
  ``y = x * sigmoid(v * x) / sqrt(var_group + eps) * scale + bias``.
  Attributes: ``scale``, ``bias``, ``v`` (``nnx.Param``, ``(C,)``).

  Args:
    num_features: the number of channels ``C``.
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
    rngs: random keys for the initializers.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxnorm.nnx as jnx
    >>> layer = jnx.EvoNormS0(8, num_groups=4, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 3, 3, 8))).shape
    (2, 3, 3, 8)
  """

  def __init__(
    self,
    num_features: int,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    axis: int = -1,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = nnx.initializers.zeros,
    scale_init: Initializer = nnx.initializers.ones,
    v_init: Initializer = nnx.initializers.ones,
    rngs: nnx.Rngs,
  ):
    self.scale, self.bias = _affine_params(
      num_features, rngs, param_dtype, use_scale, use_bias, scale_init, bias_init,
      _NO_METADATA, _NO_METADATA,
    )  # fmt: skip
    self.v = _make_param(
      v_init, rngs, _checks.num_features_shape(num_features), param_dtype, _NO_METADATA
    )
    self.num_features = num_features
    self.num_groups = num_groups
    self.group_size = group_size
    self.axis = axis
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Applies EvoNorm-S0.

    Args:
      x: input ``(N, ..., C, ...)``.
      mask: optional boolean array broadcastable to ``x``.

    Returns:
      An array of the shape of ``x``.
    """
    params = jn.EvoNormParams(_value(self.scale), _value(self.bias), self.v[...])
    out_dtype = nnx_dtypes.canonicalize_dtype(x, *params, dtype=self.dtype)
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
      (flax: 0).

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
    n_warmup: int = 15,
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
      state = jn.spectral_norm_init(param[...], rngs.params(), n_warmup=n_warmup)
      stats[_key(path) + ("u",)] = nnx.BatchStat(state.u[None].astype(param_dtype))
      stats[_key(path) + ("sigma",)] = nnx.BatchStat(jnp.ones((), param_dtype))
    self.batch_stats = nnx.data(stats)

  def _targets(self):
    out = []
    for path, param in _wrapped_params(self.layer_instance):
      if param.ndim <= 1 or self.n_steps < 1:
        continue
      if param.ndim > 2 and self.error_on_non_matrix:
        raise ValueError(
          f"Layer instance parameter is {param.ndim}D but error_on_non_matrix is True"
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
