"""Every ```python block of README.md and of the documentation site runs.

Blocks fenced as ```python are executed as written, each in a fresh
interpreter with 8 simulated CPU devices (as the pages tell readers to set
up), in an empty working directory. Blocks that need several processes or a
GPU are fenced ```py and only shown; shell commands are ```bash.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted(
  p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts
)
BLOCKS = [
  (page.relative_to(ROOT).as_posix(), index, code)
  for page in PAGES
  for index, code in enumerate(
    re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S)
  )
]
IDS = [f"{page}:{index}" for page, index, _ in BLOCKS]


def test_pages_have_snippets():
  pages = {page for page, _, _ in BLOCKS}
  assert "README.md" in pages
  assert len(pages) >= 15, sorted(pages)
  assert len(BLOCKS) >= 40


def _run(number: int, directory: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  workdir = directory / f"snippet_{number}"
  workdir.mkdir()
  script = workdir / "snippet.py"
  script.write_text(BLOCKS[number][2])
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
  directory = tmp_path_factory.mktemp("snippets")
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {i: pool.submit(_run, i, directory) for i in range(len(BLOCKS))}
    return {i: f.result() for i, f in futures.items()}


@pytest.mark.parametrize("number", range(len(BLOCKS)), ids=IDS)
def test_snippet_runs(number, results):
  proc = results[number]
  page, index, code = BLOCKS[number]
  assert proc.returncode == 0, (
    f"{page}, snippet {index} failed:\n{code}\n{proc.stderr[-3000:]}"
  )
