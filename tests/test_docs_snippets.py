"""Every ```python block of README.md and of the documentation site runs.

Blocks fenced as ```python are executed as written, as a reader runs a
page: each page in a fresh interpreter with 8 simulated CPU devices (as the
pages tell readers to set up), its blocks in order, each in a namespace of
its own and an empty working directory, so that no block leans on another.
Blocks that need several processes or a GPU are fenced ```py and only
shown; shell commands are ```bash.
"""

from __future__ import annotations

import concurrent.futures
import json
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

# Runs one page's blocks, given as [[number, code], ...], and writes
# {number: traceback or null}. One interpreter per page rather than per
# block: importing jax and flax was half of this file's time.
_RUNNER = """
import json, os, sys, traceback
blocks, out = json.load(open(sys.argv[1])), {}
for number, code in blocks:
  workdir = os.path.join(os.path.dirname(sys.argv[1]), f"snippet_{number}")
  os.makedirs(workdir)
  os.chdir(workdir)
  try:
    exec(compile(code, f"snippet_{number}.py", "exec"), {"__name__": "__main__"})
    out[number] = None
  except SystemExit as e:
    out[number] = None if e.code in (None, 0) else f"SystemExit({e.code!r})"
  except BaseException:
    out[number] = traceback.format_exc()
json.dump(out, open(sys.argv[2], "w"))
"""


def test_pages_have_snippets():
  pages = {page for page, _, _ in BLOCKS}
  assert "README.md" in pages
  assert len(pages) >= 15, sorted(pages)
  assert len(BLOCKS) >= 40


def _run_page(numbers: list[int], directory: pathlib.Path) -> dict[int, str | None]:
  """Every block of one page in one interpreter: ``{number: error or None}``."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  pagedir = directory / f"page_{numbers[0]}"
  pagedir.mkdir()
  blocks, out = pagedir / "blocks.json", pagedir / "results.json"
  blocks.write_text(json.dumps([[n, BLOCKS[n][2]] for n in numbers]))
  runner = pagedir / "runner.py"
  runner.write_text(_RUNNER)
  proc = subprocess.run(
    [sys.executable, str(runner), str(blocks), str(out)],
    capture_output=True,
    text=True,
    timeout=180 * len(numbers),
    env=env,
    cwd=pagedir,
  )
  if proc.returncode != 0 or not out.exists():  # the interpreter itself died
    return {n: f"exit {proc.returncode}:\n{proc.stderr[-3000:]}" for n in numbers}
  return {int(n): err for n, err in json.loads(out.read_text()).items()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Every block's error (or ``None``), pages two at a time.

  Each page is its own interpreter, mostly on one core; running two at once
  uses the second core that a serial run leaves idle.
  """
  directory = tmp_path_factory.mktemp("snippets")
  pages: dict[str, list[int]] = {}
  for number, (page, _, _) in enumerate(BLOCKS):
    pages.setdefault(page, []).append(number)
  merged: dict[int, str | None] = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    for part in pool.map(lambda n: _run_page(n, directory), pages.values()):
      merged.update(part)
  return merged


@pytest.mark.parametrize("number", range(len(BLOCKS)), ids=IDS)
def test_snippet_runs(number, results):
  page, index, code = BLOCKS[number]
  error = results[number]
  assert error is None, f"{page}, snippet {index} failed:\n{code}\n{error[-3000:]}"
