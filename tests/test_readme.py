"""Every ```python block of README.md runs as written.

Blocks fenced as ```python are executed, each in a fresh interpreter with 8
simulated CPU devices (as the README tells readers to set up); blocks that
need several processes or a GPU are fenced ```py and only shown.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)


def test_readme_has_snippets():
  assert len(BLOCKS) >= 10


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  script = tmp_path / f"snippet_{index}.py"
  script.write_text(BLOCKS[index])
  proc = subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    timeout=180,
    env=env,
    cwd=tmp_path,
  )
  assert proc.returncode == 0, (
    f"README snippet {index} failed:\n{BLOCKS[index]}\n{proc.stderr[-3000:]}"
  )
