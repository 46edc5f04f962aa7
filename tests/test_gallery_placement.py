"""``examples/bn_placement.py --quick`` trains, and writes its figure and numbers.

The example runs in a fresh interpreter with ``XLA_FLAGS`` unset; the test
reads the CSV it wrote: one row per placement, learning rate, seed and
epoch, with accuracies in [0, 1], and every placement well above chance
after the quick run at the moderate rate.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLE = (
  pathlib.Path(__file__).resolve().parent.parent / "examples" / "bn_placement.py"
)
FIELDS = ["placement", "learning_rate", "seed", "epoch", "train_loss", "test_accuracy"]
PLACEMENTS = {"before", "after", "none"}
# What --quick trains: 2 rates x 2 seeds x 2 epochs per placement.
RATES, SEEDS, EPOCHS = {0.1, 1.0}, {0, 1}, 2


@pytest.mark.slow
def test_bn_placement_quick_run(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, str(EXAMPLE), "--quick", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=240,
    env=env,
    cwd=tmp_path,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]

  png = tmp_path / "placement.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert png.stat().st_size > 20_000
  with open(tmp_path / "placement.csv", newline="") as f:
    reader = csv.reader(f)
    assert next(reader) == FIELDS
    rows = [
      (p, float(lr), int(seed), int(epoch), float(loss), float(acc))
      for p, lr, seed, epoch, loss, acc in reader
    ]

  keys = {(p, lr, seed, epoch) for p, lr, seed, epoch, _, _ in rows}
  assert len(keys) == len(rows) == len(PLACEMENTS) * len(RATES) * len(SEEDS) * EPOCHS
  assert {k[0] for k in keys} == PLACEMENTS
  assert {k[1] for k in keys} == RATES
  assert {k[2] for k in keys} == SEEDS
  assert {k[3] for k in keys} == set(range(1, EPOCHS + 1))

  for row in rows:
    assert 0.0 <= row[5] <= 1.0, row
    assert math.isnan(row[4]) or row[4] >= 0.0, row
  # Two epochs at the moderate rate: both BN placements are far above chance
  # (0.1); without BN the network learns more slowly but learns.
  for p, lr, _, epoch, loss, acc in rows:
    if lr == 0.1 and epoch == EPOCHS:
      assert acc > (0.8 if p != "none" else 0.3), (p, acc)
      assert loss < (1.0 if p != "none" else 2.2), (p, loss)
  # The printed summary names every placement and rate.
  summary = [line for line in proc.stdout.splitlines() if "final test accuracy" in line]
  assert len(summary) == len(PLACEMENTS) * len(RATES), proc.stdout
