"""Every ```python block of README.md runs as written.

Blocks fenced as ```python are executed, each in a fresh interpreter with 8
simulated CPU devices (as the README tells readers to set up); blocks that
need several processes or a GPU are fenced ```py and only shown.
"""

import concurrent.futures
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


def _run(index: int, directory: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  workdir = directory / f"snippet_{index}"
  workdir.mkdir()
  script = workdir / "snippet.py"
  script.write_text(BLOCKS[index])
  return subprocess.run(
    [sys.executable, str(script)],
    capture_output=True,
    text=True,
    timeout=180,
    env=env,
    cwd=workdir,
  )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Every snippet's run, two at a time.

  Each snippet is its own interpreter, mostly importing jax on one core;
  running two at once uses the second core that a serial run leaves idle.
  """
  directory = tmp_path_factory.mktemp("readme")
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {i: pool.submit(_run, i, directory) for i in range(len(BLOCKS))}
    return {i: f.result() for i, f in futures.items()}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, results):
  proc = results[index]
  assert proc.returncode == 0, (
    f"README snippet {index} failed:\n{BLOCKS[index]}\n{proc.stderr[-3000:]}"
  )
