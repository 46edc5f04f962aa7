"""``examples/sync_bn_training.py --quick`` runs as a script and says what it should.

It runs in a fresh interpreter with ``XLA_FLAGS`` unset, so this also checks
that the script asks for its 8 simulated CPU devices itself.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLE = (
  pathlib.Path(__file__).resolve().parent.parent / "examples" / "sync_bn_training.py"
)


@pytest.mark.slow
def test_sync_bn_training_quick_run(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, str(EXAMPLE), "--quick"],
    capture_output=True,
    text=True,
    timeout=240,
    env=env,
    cwd=tmp_path,
  )
  out = proc.stdout
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert out.startswith("8 CPU devices"), out

  # The first steps equal single-device training on the global batch.
  (match,) = [line for line in out.splitlines() if "vs one device" in line]
  diffs = [float(v) for v in re.findall(r"(\d\.\de[+-]\d+)", match)]
  assert len(diffs) == 2 and max(diffs) < 1e-5, match
  assert "(match to 1e-5)" in match, match

  accuracies = {
    line: float(re.search(r"test accuracy ([0-9.]+)%", line).group(1)) / 100
    for line in out.splitlines()
    if "accuracy" in line
  }
  assert len(accuracies) == 2, out  # the sync run, then 1 image per device
  main_run, small = accuracies
  assert main_run.startswith("sync BN, 8 x 16 images per step, 30 steps"), out
  assert accuracies[main_run] > 0.6, out  # 30 steps; chance is 0.1
  assert small.startswith("1 image(s) per device (8 per step)"), out
  assert "with sync BN" in small and "with per-device BN" in small, out
