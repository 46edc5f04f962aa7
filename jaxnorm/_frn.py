"""Filter response normalization with a thresholded linear unit (Singh &
Krishnan, 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxnorm import _checks, _stats
from jaxnorm._batch_norm import _as_shape


class FilterResponseNormParams(NamedTuple):
  """Parameters of filter response normalization, each of shape ``(C,)``.

  Attributes:
    scale: per-channel multiplier ``gamma`` (ones), or ``None``.
    bias: per-channel offset ``beta`` (zeros), or ``None``.
    tau: per-channel TLU threshold (zeros), or ``None`` (no TLU).
    eps: learned per-channel epsilon (``1e-4``), or ``None`` (fixed
      epsilon).
  """

  scale: jax.Array | None
  bias: jax.Array | None
  tau: jax.Array | None
  eps: jax.Array | None = None


def filter_response_norm_init(
  num_features: int | Sequence[int],
  *,
  learned_epsilon: bool = False,
  use_scale: bool = True,
  use_bias: bool = True,
  use_tlu: bool = True,
  param_dtype: Any = jnp.float32,
) -> FilterResponseNormParams:
  """Creates filter-response-norm parameters.

  Args:
    num_features: ``C``, the number of channels.
    learned_epsilon: whether to create a learned per-channel ``eps``
      (initialised to ``1e-4``, as in the paper); otherwise ``eps`` is
      ``None``.
    use_scale: whether to create ``scale`` (ones).
    use_bias: whether to create ``bias`` (zeros).
    use_tlu: whether to create the TLU threshold ``tau`` (zeros).
    param_dtype: dtype of the parameters.

  Returns:
    ``FilterResponseNormParams(scale, bias, tau, eps)`` of shape ``(C,)``.

  Examples:
    >>> import jaxnorm as jn
    >>> p = jn.filter_response_norm_init(3, learned_epsilon=True)
    >>> p.tau, p.eps
    (Array([0., 0., 0.], dtype=float32), Array([0.0001, 0.0001, 0.0001], dtype=float32))
  """
  shape = _as_shape(num_features, "num_features")
  return FilterResponseNormParams(
    scale=jnp.ones(shape, param_dtype) if use_scale else None,
    bias=jnp.zeros(shape, param_dtype) if use_bias else None,
    tau=jnp.zeros(shape, param_dtype) if use_tlu else None,
    eps=jnp.full(shape, 1e-4, param_dtype) if learned_epsilon else None,
  )


def filter_response_norm(
  x: ArrayLike,
  params: FilterResponseNormParams,
  *,
  axis: int | Sequence[int] = -1,
  epsilon: float = 1e-6,
  use_tlu: bool = True,
  mask: ArrayLike | None = None,
  dtype: Any = None,
) -> jax.Array:
  r"""Filter response normalization (FRN) followed by a TLU.

  Each sample and channel is divided by the root mean square of its own
  responses, ``nu^2``, taken over every axis except the batch axis 0 and the
  channel ``axis`` (H, W of an image). Nothing is centred and no batch
  statistic is used, so FRN has no state and behaves the same in training
  and evaluation; the thresholded linear unit (TLU) replaces the ReLU that
  would follow.

  .. math::
    \nu^2 = \frac{1}{HW} \sum_{h,w} x^2, \qquad
    y = \max\Big(\mathrm{scale} \cdot \frac{x}{\sqrt{\nu^2 + \epsilon}}
        + \mathrm{bias},\ \tau\Big)

  With a learned ``params.eps`` the epsilon is ``epsilon + |params.eps|``
  (the paper's learned-epsilon variant, for inputs with few spatial
  positions such as ``(N, C)``, where ``nu^2 = x^2``).

  Stability: ``nu^2`` is a mean square, with no cancellation; it is exact
  to float32's summation error.

  Args:
    x: input ``(N, ..., C, ...)``, floating point; ``(N, H, W, C)`` for
      ``axis=-1``, ``(N, C, H, W)`` for ``axis=1``.
    params: ``FilterResponseNormParams(scale, bias, tau, eps)`` of shape
      ``(C,)``; ``tau`` may be ``None`` when ``use_tlu`` is false.
    axis: the channel axis (or axes); it may not include axis 0.
    epsilon: added to ``nu^2`` inside the square root.
    use_tlu: whether to apply ``max(y, tau)``.
    mask: optional boolean array broadcastable to ``x``: ``False`` positions
      do not enter ``nu^2`` (padding).
    dtype: output dtype (default: the dtype of ``x``). ``nu^2`` is computed
      in at least float32.

  Returns:
    ``y``, of the shape of ``x``.

  Raises:
    TypeError: ``x`` is not floating point, or complex with ``use_tlu``.
    ValueError: ``axis`` out of range or including axis 0, parameter shapes
      that do not match ``x``, ``use_tlu`` without ``params.tau``, or a
      ``mask`` that does not broadcast.

  References:
    Singh & Krishnan, "Filter Response Normalization Layer: Eliminating
    Batch Dependence in the Training of Deep Neural Networks", CVPR 2020,
    arXiv:1911.09737.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxnorm as jn
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3)) * 3.0
    >>> params = jn.filter_response_norm_init(3)
    >>> y = jn.filter_response_norm(x, params, use_tlu=False)
    >>> bool(jnp.allclose((y**2).mean((1, 2)), 1.0, atol=1e-4))
    True
    >>> bool((jn.filter_response_norm(x, params) >= 0.0).all())  # tau = 0
    True
  """
  x = _checks.check_input(x)
  _checks.check_fields(params, "params", FilterResponseNormParams)
  faxes = _checks.canonicalize_axes(x.ndim, axis, "axis")
  if 0 in faxes:
    raise ValueError(
      f"`axis`={axis} includes axis 0, the batch axis of filter response norm."
    )
  raxes = tuple(a for a in range(1, x.ndim) if a not in faxes)
  fshape = _checks.feature_shape(x.shape, faxes)
  bshape = _checks.broadcast_shape(x.ndim, x.shape, faxes)
  scale = _checks.check_param(params.scale, fshape, "params.scale", x.dtype)
  bias = _checks.check_param(params.bias, fshape, "params.bias", x.dtype)
  tau = _checks.check_param(params.tau, fshape, "params.tau", x.dtype)
  eps = _checks.check_param(params.eps, fshape, "params.eps", x.dtype)
  if use_tlu and tau is None:
    raise ValueError(
      "`use_tlu=True` needs `params.tau`; create it with "
      "`filter_response_norm_init(..., use_tlu=True)` or pass `use_tlu=False`."
    )
  if use_tlu and jnp.iscomplexobj(x):
    # max(y, tau) has no meaning for complex numbers (jnp.maximum would
    # compare them lexicographically).
    raise TypeError(
      f"`x` is complex ({x.dtype}), for which the TLU max(y, tau) is not "
      "defined: pass `use_tlu=False` (the normalization itself takes complex x)."
    )
  mask = _checks.check_mask(mask, x.shape)
  stats_dtype = _checks.compute_dtype(x.dtype, dtype)
  out_dtype = x.dtype if dtype is None else jnp.dtype(dtype)
  scale_b = None if scale is None else scale.reshape(bshape)
  bias_b = None if bias is None else bias.reshape(bshape)

  epsilon = _checks.check_hyper(epsilon, "epsilon")
  if eps is not None:
    # The learned epsilon of the paper: |eps| is added to epsilon.
    epsilon = epsilon + jnp.abs(eps.reshape(bshape).astype(stats_dtype))
  # nu^2 is the uncentred second moment: normalize_over without the mean,
  # which has no cancellation to guard against.
  y, *_ = _stats.normalize_over(
    x,
    axes=raxes,
    scale=scale_b,
    bias=bias_b,
    mask=mask,
    use_mean=False,
    epsilon=epsilon,
    axis_name=None,
    axis_index_groups=None,
    dtype=stats_dtype,
    out_dtype=stats_dtype if use_tlu else out_dtype,
  )
  if use_tlu:
    y = jnp.maximum(y, tau.reshape(bshape).astype(y.dtype))
  return y.astype(out_dtype)
