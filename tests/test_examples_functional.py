"""A short run of ``examples/functional_training.py`` learns something."""

import importlib.util
import pathlib

import pytest

EXAMPLE = (
  pathlib.Path(__file__).resolve().parent.parent / "examples" / "functional_training.py"
)


@pytest.mark.slow
def test_functional_training_short_run(capsys):
  spec = importlib.util.spec_from_file_location("functional_training", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  results = module.main(steps=60)
  out = capsys.readouterr().out
  lines = [line for line in out.splitlines() if "accuracy" in line]
  assert len(lines) == 2, out  # BN before and after the activation
  assert set(results) == {"bn_before_act", "bn_after_act"}
  for accuracy in results.values():
    assert accuracy > 0.3, results  # chance is 0.1
