"""The documentation site covers the public API, and the versions agree.

The site itself is built with warnings as errors by ``.ci/run`` (Sphinx is
in the ``docs`` extra, not the test one); these checks need no Sphinx.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pathlib
import re

import pytest

import jaxnorm

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MODULES = ["jaxnorm", "jaxnorm.linen", "jaxnorm.nnx", "jaxnorm.equinox"]


def _documented() -> set[str]:
  """Every name under an ``auto*::`` directive of the API reference."""
  text = "".join(p.read_text() for p in (DOCS / "api").glob("*.rst"))
  return set(re.findall(r"^\.\. auto\w+:: ([\w.]+)", text, re.M))


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_is_in_the_api_reference(module):
  names = importlib.import_module(module).__all__
  missing = sorted({f"{module}.{n}" for n in names} - _documented())
  assert not missing, f"not in docs/api/*.rst: {missing}"


def test_the_api_reference_names_only_public_names():
  public = {f"{m}.{n}" for m in MODULES for n in importlib.import_module(m).__all__}
  assert _documented() <= public, sorted(_documented() - public)


def test_one_version_everywhere():
  version = importlib.metadata.version("jaxnorm")
  assert jaxnorm.__version__ == version
  pyproject = (ROOT / "pyproject.toml").read_text()
  assert re.search(rf'^version = "{re.escape(version)}"$', pyproject, re.M)
  # The newest release in the changelog is this version (Keep a Changelog:
  # "## [Unreleased]" first, then "## [x.y.z] - YYYY-MM-DD").
  releases = re.findall(
    r"^## \[(\d[^\]]*)\] - (\d{4}-\d{2}-\d{2})$",
    (ROOT / "CHANGELOG.md").read_text(),
    re.M,
  )
  assert releases and releases[0][0] == version, releases
  # The site takes its version from the package metadata.
  conf: dict = {}
  exec((DOCS / "conf.py").read_text(), conf)
  assert conf["release"] == version
  assert "{{ release }}" in (DOCS / "index.md").read_text()


def test_readme_is_a_front_door():
  text = (ROOT / "README.md").read_text()
  assert len(text.splitlines()) <= 250
  # The two set-up commands come first, in this order.
  commands = re.findall(r"^```bash\n(.*?)\n```", text, re.M | re.S)
  assert commands[0].endswith("python examples/sync_bn_training.py")
  assert commands[1].endswith('pip install -e ".[test]" && python -m pytest -q')
  # Every relative link points at a file of the repository.
  links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
  local = [link for link in links if not link.startswith(("http:", "https:"))]
  assert len(local) >= 20
  missing = [link for link in local if not (ROOT / link).exists()]
  assert not missing, missing


def test_every_page_is_linked_from_the_readme():
  text = (ROOT / "README.md").read_text()
  pages = [
    p.relative_to(ROOT).as_posix()
    for p in DOCS.rglob("*.md")
    if "_build" not in p.parts
    and p.parent.name != "benchmarks"
    and p.name not in ("index.md", "changelog.md")
    and p.parent.name != "gallery"
  ]
  missing = [p for p in pages if f"({p}" not in text]
  assert not missing, missing
