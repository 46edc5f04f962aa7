"""Two properties of normalization layers, measured.

1. **Scale invariance.** Without epsilon, ``N(a * x) = N(x)`` for every
   ``a > 0``: the mean and the standard deviation both scale by ``a``. The
   script measures ``max |N(a * x) - z|``, where ``z = (x - mean) / std`` is
   the epsilon-free normalization of ``x`` computed in float64 NumPy, for
   batch norm (training), layer norm, group norm, instance norm and RMS norm
   (``z = x / rms``), with ``a`` from 1e-4 to 1e4, in float32 and float64.
   Epsilon breaks the property where ``a * std`` comes near ``sqrt(epsilon)``:
   the deviation is about ``max|z| * epsilon / (2 a^2 std^2)``, so it falls as
   ``1 / a^2`` until float rounding takes over.
2. **Its consequence for the weights before a normalization.** For
   ``L(W) = sum(g * BN(x @ W))`` the gradient at ``a * W`` is ``1 / a`` times
   the gradient at ``W``, and each column of the gradient is orthogonal to
   that column of ``W``. Both are checked against the epsilon-free gradient
   written out in float64 NumPy.
3. **Identity.** Training-mode batch norm with ``scale = sqrt(batch var +
   epsilon)`` and ``bias = batch mean`` returns its input, to the rounding of
   its dtype, for several shapes, layouts and dtypes.

It writes ``properties.csv`` (every number plotted) and ``properties.png``
(three panels) to ``--out``, by default ``docs/gallery/`` of the repository
(``./gallery_quick/`` with ``--quick``).

Run::

    python examples/norm_properties.py           # ~15 s on 2 CPU cores
    python examples/norm_properties.py --quick   # one value of a per decade
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from tqdm import tqdm

import jaxnorm as jn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "gallery"
FIELDS = ("experiment", "layer", "dtype", "shape", "epsilon", "a", "error")
CHANNELS = 16
GROUPS = 4


def layers(dtype):
  """Each layer as ``(epsilon, f(x) -> y, z(x) -> epsilon-free reference)``.

  The input is NHWC; ``z`` is the float64 NumPy normalization without
  epsilon, over the same elements as the layer.
  """
  bn_params, bn_state = jn.batch_norm_init(CHANNELS, param_dtype=dtype)
  gn_params = jn.group_norm_init(CHANNELS, param_dtype=dtype)
  ln_params = jn.layer_norm_init(CHANNELS, param_dtype=dtype)
  rms_params = jn.rms_norm_init(CHANNELS, param_dtype=dtype)
  per_sample = (1, 2, 3)

  def standardize(x, axes):
    return (x - x.mean(axes, keepdims=True)) / x.std(axes, keepdims=True)

  def group_standardize(x):
    g = x.reshape(*x.shape[:-1], GROUPS, CHANNELS // GROUPS)
    return standardize(g, (1, 2, 4)).reshape(x.shape)

  return {
    "batch norm": (
      1e-5,
      lambda x: jn.batch_norm(x, bn_params, bn_state, use_running_average=False)[0],
      lambda x: standardize(x, (0, 1, 2)),
    ),
    "layer norm": (
      1e-6,
      lambda x: jn.layer_norm(x, ln_params, reduction_axes=per_sample),
      lambda x: standardize(x, per_sample),
    ),
    "group norm": (
      1e-6,
      lambda x: jn.group_norm(x, gn_params, num_groups=GROUPS),
      group_standardize,
    ),
    "instance norm": (
      1e-6,
      lambda x: jn.instance_norm(x, gn_params),
      lambda x: standardize(x, (1, 2)),
    ),
    "RMS norm": (
      1e-6,
      lambda x: jn.rms_norm(x, rms_params, reduction_axes=per_sample),
      lambda x: x / np.sqrt(np.mean(x**2, per_sample, keepdims=True)),
    ),
  }


def scale_invariance(scales, bar):
  """``max |N(a x) - z(x)|`` for every layer, dtype and ``a``."""
  x = np.random.default_rng(0).normal(size=(16, 8, 8, CHANNELS))  # std 1
  rows = []
  for dtype in (jnp.float32, jnp.float64):
    x_dtype = jnp.asarray(x, dtype)
    # The reference normalizes the values the layer actually sees.
    x64 = np.asarray(x_dtype, np.float64)
    for name, (epsilon, layer, reference) in layers(dtype).items():
      z = reference(x64)
      scaled = jax.jit(lambda x, a, layer=layer: layer(a * x))
      for a in scales:
        y = np.asarray(scaled(x_dtype, jnp.asarray(a, dtype)), np.float64)
        error = float(np.max(np.abs(y - z)))
        rows.append(("invariance", name, dtype.__name__, "", epsilon, a, error))
        bar.update()
  return rows


def gradient_scaling(scales, bar):
  """``L(W) = sum(g * BN(x W))``: ``a grad L(a W) = grad L(W)``, ``<W, grad> = 0``."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 16))
  w = rng.normal(size=(16, 8)) / 4.0  # columns of norm ~1: BN's input has std ~1
  g = rng.normal(size=(64, 8))

  # The epsilon-free gradient, by hand: dL/dh = (g - E[g] - y E[g y]) / std.
  h = x @ w
  std = h.std(0)
  y = (h - h.mean(0)) / std
  reference = x.T @ ((g - g.mean(0) - y * (g * y).mean(0)) / std)

  rows = []
  for dtype in (jnp.float32, jnp.float64):
    params, state = jn.batch_norm_init(8, param_dtype=dtype)

    def loss(w, x, g, params=params, state=state):
      out, _ = jn.batch_norm(x @ w, params, state, use_running_average=False)
      return jnp.sum(g * out)

    grad = jax.jit(jax.grad(loss))
    xd, gd, wd = (jnp.asarray(v, dtype) for v in (x, g, w))
    for a in scales:
      grad_a = np.asarray(grad(a * wd, xd, gd), np.float64)
      error = np.max(np.abs(a * grad_a - reference)) / np.max(np.abs(reference))
      # Scale invariance holds column by column: each column feeds one channel.
      cosine = np.sum(w * grad_a, 0) / (
        np.linalg.norm(w, axis=0) * np.linalg.norm(grad_a, axis=0)
      )
      name = dtype.__name__
      rows.append(("gradient", "batch norm", name, "", 1e-5, a, float(error)))
      rows.append(
        ("cosine", "batch norm", name, "", 1e-5, a, float(np.max(np.abs(cosine))))
      )
      bar.update()
  return rows


IDENTITY_CASES = (  # (shape, channel axis, dtype)
  ((32, 10), -1, jnp.float32),
  ((16, 12, 8), -1, jnp.float32),
  ((8, 6, 6, 4), -1, jnp.float32),
  ((8, 4, 6, 6), 1, jnp.float32),
  ((8, 6, 6, 4), -1, jnp.float64),
  ((8, 6, 6, 4), -1, jnp.float16),
  ((8, 6, 6, 4), -1, jnp.bfloat16),
)


def identity(bar):
  """``max |BN(x) - x| / max |x|`` with scale = batch std, bias = batch mean."""
  rng = np.random.default_rng(2)
  rows = []
  for shape, axis, dtype in IDENTITY_CASES:
    channels = shape[axis]
    where = [1] * len(shape)
    where[axis] = channels
    loc = rng.uniform(-5, 5, channels).reshape(where)
    spread = rng.uniform(0.5, 3, channels).reshape(where)
    x = jnp.asarray(loc + spread * rng.normal(size=shape), dtype)
    x64 = np.asarray(x, np.float64)
    reduce = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    epsilon = 1e-5
    param_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    params = jn.NormParams(
      scale=jnp.asarray(np.sqrt(x64.var(reduce) + epsilon), param_dtype),
      bias=jnp.asarray(x64.mean(reduce), param_dtype),
    )
    _, state = jn.batch_norm_init(channels, param_dtype=param_dtype)
    y, _ = jn.batch_norm(
      x, params, state, use_running_average=False, axis=axis, epsilon=epsilon
    )
    assert y.dtype == x.dtype, (y.dtype, x.dtype)
    y64 = np.asarray(y, np.float64)
    error = float(np.max(np.abs(y64 - x64)) / np.max(np.abs(x64)))
    layout = f"{shape} axis={axis}"
    rows.append(
      ("identity", "batch norm", jnp.dtype(dtype).name, layout, epsilon, "", error)
    )
    bar.update()
  return rows


def plot(rows, path):
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.2))
  colors = dict(zip(layers(jnp.float32), plt.cm.tab10.colors, strict=False))
  styles = {"float32": "-", "float64": "--"}

  for name, color in colors.items():
    for dtype, style in styles.items():
      pts = [
        (r[5], r[6])
        for r in rows
        if r[0] == "invariance" and r[1] == name and r[2] == dtype
      ]
      epsilon = next(r[4] for r in rows if r[0] == "invariance" and r[1] == name)
      label = f"{name} (eps={epsilon:.0e}), {dtype}"
      ax1.loglog(*zip(*pts, strict=True), style, color=color, label=label, lw=1.4)
  ax1.set_xlabel("a (input scaled by a; x has std 1)")
  ax1.set_ylabel("max |N(a·x) − (x − mean)/std|")
  ax1.set_title("Scale invariance: N(a·x) = N(x) until a·std ~ sqrt(eps)")
  ax1.legend(fontsize=7, ncol=2)

  for kind, color, text in (
    ("gradient", "tab:blue", "max|a·∇L(aW) − ∇L(W)| / max|∇L(W)|"),
    ("cosine", "tab:red", "max over columns |cos(W_j, ∇L_j)|"),
  ):
    for dtype, style in styles.items():
      pts = [(r[5], r[6]) for r in rows if r[0] == kind and r[2] == dtype]
      ax2.loglog(
        *zip(*pts, strict=True),
        style,
        color=color,
        marker="o",
        ms=3,
        label=f"{text}, {dtype}",
      )
  ax2.set_xlabel("a (weights W scaled by a)")
  ax2.set_ylabel("deviation from the epsilon-free gradient")
  ax2.set_title("L(W) = sum(g·BN(xW)): ∇L(aW) = ∇L(W)/a, orthogonal to W")
  ax2.legend(fontsize=7)

  # Where a * std = sqrt(epsilon): BN's epsilon, and the others' (1e-6).
  for ax in (ax1, ax2):
    for epsilon in (1e-5, 1e-6) if ax is ax1 else (1e-5,):
      ax.axvline(np.sqrt(epsilon), color="gray", ls=":", lw=1)
      ax.text(
        np.sqrt(epsilon) * (1.15 if epsilon == 1e-5 else 1 / 1.15),
        0.98 if epsilon == 1e-5 else 0.9,
        f"sqrt({epsilon:.0e})",
        transform=ax.get_xaxis_transform(),
        fontsize=7,
        color="gray",
        va="top",
        ha="left" if epsilon == 1e-5 else "right",
      )

  # In units of the dtype's rounding: 1 is one unit in the last place of max|x|.
  ident = [r for r in rows if r[0] == "identity"]
  ulps = [r[6] / float(jnp.finfo(r[2]).eps) for r in ident]
  positions = np.arange(len(ident))
  ax3.bar(positions, ulps, color="tab:blue")
  for pos, ulp in zip(positions, ulps, strict=True):
    ax3.text(
      pos, ulp + 0.02, "exact" if ulp == 0 else f"{ulp:.2f}", ha="center", fontsize=8
    )
  ax3.set_xticks(
    positions, [f"{r[3]}\n{r[2]}" for r in ident], fontsize=7, rotation=30, ha="right"
  )
  ax3.set_ylabel("max |BN(x) − x| / (max |x| · machine eps of the dtype)")
  ax3.set_title("BN with scale = sqrt(var + eps), bias = mean returns x")

  for ax in (ax1, ax2, ax3):
    ax.grid(True, which="major", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(out: pathlib.Path, quick: bool = False):
  # float64 for the comparison lines; every float32 array is created as such.
  jax.config.update("jax_enable_x64", True)
  start = time.perf_counter()
  per_decade = 1 if quick else 4
  scales = [float(a) for a in np.logspace(-4, 4, 8 * per_decade + 1)]
  total = 2 * len(layers(jnp.float32)) * len(scales) + 2 * len(scales)
  with tqdm(total=total + len(IDENTITY_CASES), desc="properties") as bar:
    rows = scale_invariance(scales, bar)
    rows += gradient_scaling(scales, bar)
    rows += identity(bar)

  out.mkdir(parents=True, exist_ok=True)
  with open(out / "properties.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(FIELDS)
    writer.writerows(rows)
  plot(rows, out / "properties.png")

  def worst(kind, dtype, low, high=np.inf):
    return max(
      r[6] for r in rows if r[0] == kind and r[2] == dtype and low <= r[5] <= high
    )

  for dtype in ("float32", "float64"):
    print(
      f"{dtype}: scale invariance, max deviation from the epsilon-free "
      f"normalization over the 5 layers: {worst('invariance', dtype, 1e-4, 1e-4):.1e} "
      f"at a = 1e-4, {worst('invariance', dtype, 1.0, 1.0):.1e} at a = 1, "
      f"{worst('invariance', dtype, 1e2):.1e} for a >= 100"
    )
    print(
      f"{dtype}: gradient through BN, relative deviation of a * grad L(a W) "
      f"from grad L(W): {worst('gradient', dtype, 1.0, 1.0):.1e} at a = 1, "
      f"{worst('gradient', dtype, 1e2):.1e} for a >= 100; max |cos(W, grad)| for "
      f"a >= 1: {worst('cosine', dtype, 1.0):.1e}"
    )
  for r in rows:
    if r[0] == "identity":
      print(f"identity, {r[3]} {r[2]}: max |BN(x) - x| / max |x| = {r[6]:.1e}")
  print(f"wrote {out / 'properties.csv'} and {out / 'properties.png'}")
  print(f"done in {time.perf_counter() - start:.0f} s")
  return rows


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--quick", action="store_true", help="one value of a per decade instead of four"
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    # A --quick check must never overwrite the documented figure.
    help="output directory (default: docs/gallery/ for a full run, "
    "./gallery_quick/ with --quick)",
  )
  args = parser.parse_args()
  if args.out is None:
    args.out = pathlib.Path("gallery_quick") if args.quick else DEFAULT_OUT
  main(args.out, quick=args.quick)
