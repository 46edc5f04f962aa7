"""``examples/norm_properties.py --quick`` writes its figure and the claimed numbers.

The example runs in a fresh interpreter with ``XLA_FLAGS`` unset; the test
then reads the CSV it wrote and checks the properties the gallery page
states: scale invariance to float rounding once ``a * std`` is well above
``sqrt(epsilon)``, the ``epsilon / (2 a^2 std^2)`` law below that, the
gradient's ``1 / a`` scaling and orthogonality, and the identity.
"""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

EXAMPLE = (
  pathlib.Path(__file__).resolve().parent.parent / "examples" / "norm_properties.py"
)
FIELDS = ["experiment", "layer", "dtype", "shape", "epsilon", "a", "error"]
LAYERS = {"batch norm", "layer norm", "group norm", "instance norm", "RMS norm"}
EPS = {
  "float64": 2.0**-52,
  "float32": 2.0**-23,
  "float16": 2.0**-10,
  "bfloat16": 2.0**-7,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  # Without --out, a --quick run writes to ./gallery_quick/, never over the
  # checked-in figure in docs/gallery/.
  cwd = tmp_path_factory.mktemp("properties")
  out = cwd / "gallery_quick"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, str(EXAMPLE), "--quick"],
    capture_output=True,
    text=True,
    timeout=180,
    env=env,
    cwd=cwd,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out / "properties.csv", newline="") as f:
    reader = csv.reader(f)
    header = next(reader)
    rows = list(reader)
  return out, proc.stdout, header, rows


def _errors(rows, experiment, dtype, layer="batch norm"):
  """``{a: error}`` for one curve."""
  return {
    float(r[5]): float(r[6])
    for r in rows
    if r[0] == experiment and r[2] == dtype and r[1] == layer
  }


@pytest.mark.slow
def test_files_and_rows(quick_run):
  out, stdout, header, rows = quick_run
  png = out / "properties.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert png.stat().st_size > 20_000
  assert header == FIELDS
  scales = 9  # --quick: one value of a per decade, 1e-4 ... 1e4
  invariance = [r for r in rows if r[0] == "invariance"]
  assert {r[1] for r in invariance} == LAYERS
  assert len(invariance) == len(LAYERS) * 2 * scales
  assert sorted({float(r[5]) for r in invariance}) == pytest.approx(
    np.logspace(-4, 4, scales)
  )
  assert len([r for r in rows if r[0] == "gradient"]) == 2 * scales
  assert len([r for r in rows if r[0] == "cosine"]) == 2 * scales
  assert len([r for r in rows if r[0] == "identity"]) == 7
  assert len(rows) == len(invariance) + 4 * scales + 7
  assert "wrote" in stdout


@pytest.mark.slow
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_scale_invariance_and_where_epsilon_breaks_it(quick_run, layer):
  rows = quick_run[3]
  f32 = _errors(rows, "invariance", "float32", layer)
  f64 = _errors(rows, "invariance", "float64", layer)
  # Well above sqrt(epsilon), N(a x) is the epsilon-free normalization to
  # float rounding (x has std 1 and |z| up to ~4.5).
  for a, error in f32.items():
    if a >= 10:
      assert error < 2e-6, (a, error)
  for a, error in f64.items():
    if a >= 100:
      assert error < 1e-8, (a, error)
  # Below it the deviation falls as epsilon / (2 a^2 std^2): 100x a decade.
  assert 60 < f64[0.1] / f64[1.0] < 140, f64
  assert 60 < f64[1.0] / f64[10.0] < 140, f64
  epsilon = 1e-5 if layer == "batch norm" else 1e-6
  assert f64[1.0] == pytest.approx(4.5 * epsilon / 2, rel=0.5)
  # At a = 1e-4, a * std is far below sqrt(epsilon): the output collapses
  # towards 0 and the deviation is of the order of |z| itself.
  assert f32[1e-4] > 1.0 and f64[1e-4] > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradient_scales_as_one_over_a_and_is_orthogonal(quick_run, dtype):
  rows = quick_run[3]
  gradient = _errors(rows, "gradient", dtype)
  cosine = _errors(rows, "cosine", dtype)
  # Beyond the epsilon regime: float rounding, or epsilon / a^2 (float64).
  for a in (100.0, 1e3, 1e4):
    bound = 1e-5 if dtype == "float32" else 3e-5 / a**2
    assert gradient[a] < bound, (a, gradient[a])
    assert cosine[a] < bound, (a, cosine[a])
  assert 60 < gradient[0.1] / gradient[1.0] < 140, gradient
  assert gradient[1e-3] > 0.1 and cosine[1e-3] > 0.1  # epsilon dominates


@pytest.mark.slow
def test_batch_norm_with_its_batch_statistics_returns_its_input(quick_run):
  rows = quick_run[3]
  identity = [r for r in rows if r[0] == "identity"]
  assert {r[2] for r in identity} == set(EPS)
  for r in identity:
    assert float(r[6]) <= 4 * EPS[r[2]], r
