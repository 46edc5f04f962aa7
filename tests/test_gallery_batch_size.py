"""The batch-size gallery experiment: its ``--quick`` run, and its documented numbers.

``examples/batch_size_sweep.py --quick`` runs in a fresh interpreter with
``XLA_FLAGS`` unset (the script asks for its 8 simulated CPU devices itself)
and must write the figure and the CSV. The full run's CSV, checked in under
``docs/gallery/``, must show what ``docs/gallery/batch_size.md`` says it
shows.
"""

from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys
from collections import defaultdict

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "batch_size_sweep.py"
GALLERY = ROOT / "docs" / "gallery"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = [
  "method",
  "per_device_batch",
  "global_batch",
  "seed",
  "test_accuracy",
  "final_train_loss",
  "mean_test_accuracy",
  "min_test_accuracy",
  "max_test_accuracy",
]
METHODS = {"bn", "sync_bn", "gn", "ln", "in", "frn", "brn", "mabn"}
BATCH_SIZES = {1, 2, 4, 8, 16, 32}


def read_rows(path: pathlib.Path) -> list[dict]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    assert reader.fieldnames == COLUMNS, reader.fieldnames
    return list(reader)


def check_rows(rows: list[dict]) -> dict:
  """Checks every row; returns the seeds' accuracies by (method, batch)."""
  runs = defaultdict(list)
  for row in rows:
    b = int(row["per_device_batch"])
    assert int(row["global_batch"]) == 8 * b, row
    acc = float(row["test_accuracy"])
    assert 0.0 <= acc <= 1.0, row
    low, high = float(row["min_test_accuracy"]), float(row["max_test_accuracy"])
    assert low <= float(row["mean_test_accuracy"]) <= high, row
    assert low <= acc <= high, row
    runs[row["method"], b].append((int(row["seed"]), acc, row))
  for key, seeds in runs.items():
    accs = [acc for _, acc, _ in seeds]
    assert len({s for s, _, _ in seeds}) == len(seeds), key  # no seed twice
    for _, _, row in seeds:  # the aggregate columns are those of the seeds
      assert abs(float(row["mean_test_accuracy"]) - sum(accs) / len(accs)) < 1e-3
      assert abs(float(row["min_test_accuracy"]) - min(accs)) < 1e-4
      assert abs(float(row["max_test_accuracy"]) - max(accs)) < 1e-4
  return {key: [acc for _, acc, _ in seeds] for key, seeds in runs.items()}


@pytest.mark.slow
def test_batch_size_sweep_quick_run(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = tmp_path / "out"
  proc = subprocess.run(
    [sys.executable, str(EXAMPLE), "--quick", "--out", str(out)],
    capture_output=True,
    text=True,
    timeout=240,
    env=env,
    cwd=tmp_path,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert proc.stdout.startswith("8 CPU devices"), proc.stdout

  assert sorted(p.name for p in out.iterdir()) == ["batch_size.csv", "batch_size.png"]
  assert (out / "batch_size.png").read_bytes()[:8] == PNG_MAGIC
  runs = check_rows(read_rows(out / "batch_size.csv"))
  # The quick run: BN, sync BN and GN at 1 and 8 images per device, 1 seed.
  assert set(runs) == {(m, b) for m in ("bn", "sync_bn", "gn") for b in (1, 8)}
  assert all(len(accs) == 1 for accs in runs.values()), runs
  # Two epochs are enough to learn something (chance is 0.1).
  assert runs["sync_bn", 8][0] > 0.5, runs

  # The printed table has a line per method, with both batch sizes.
  table = proc.stdout.split("by images per device:\n", 1)[1].splitlines()
  assert table[0].split() == ["1", "8"], proc.stdout
  for label in ("BN (per-device)", "sync BN", "GN"):
    assert any(line.startswith(label + " ") for line in table[1:4]), proc.stdout


def test_checked_in_results_show_the_documented_trend():
  """The claims of docs/gallery/batch_size.md, read from its checked-in CSV."""
  assert (GALLERY / "batch_size.png").read_bytes()[:8] == PNG_MAGIC
  rows = read_rows(GALLERY / "batch_size.csv")
  runs = check_rows(rows)
  assert set(runs) == {(m, b) for m in METHODS for b in BATCH_SIZES}
  assert all(len(accs) == 3 for accs in runs.values()), runs
  mean = {key: sum(accs) / len(accs) for key, accs in runs.items()}

  # At one image per device, per-device BN is far behind GN and sync BN...
  assert mean["bn", 1] < mean["gn", 1] - 0.2, mean
  assert mean["bn", 1] < mean["sync_bn", 1] - 0.2, mean
  # ...though it fits its training data (in training mode) as well as they do.
  bn_loss = [
    float(r["final_train_loss"])
    for r in rows
    if r["method"] == "bn" and int(r["per_device_batch"]) == 1
  ]
  assert len(bn_loss) == 3 and max(bn_loss) < 0.01, bn_loss
  # From 2 images per device on, it is within a point of sync BN.
  for b in sorted(BATCH_SIZES - {1}):
    assert abs(mean["bn", b] - mean["sync_bn", b]) < 0.01, (b, mean)

  # GN, the other layers that do not use the batch, and sync BN are flat:
  # within 2 points over the whole range, and above 97 % everywhere.
  for method in ("gn", "ln", "in", "frn", "sync_bn"):
    curve = [mean[method, b] for b in sorted(BATCH_SIZES)]
    assert max(curve) - min(curve) < 0.02, (method, curve)
    assert min(curve) > 0.97, (method, curve)

  # Batch renorm and MABN, still per-device, repair BN at one image per device.
  for method in ("brn", "mabn"):
    assert mean[method, 1] > 0.97, (method, mean)
    assert mean[method, 1] > mean["bn", 1] + 0.2, (method, mean)
