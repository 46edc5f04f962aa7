"""Sphinx configuration of jaxnorm's documentation site.

Build it as CI does (warnings are errors, so a broken reference, a bad
docstring or a page missing from the table of contents fails the build)::

  python -m pip install -e ".[docs]"
  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import importlib.metadata

project = "jaxnorm"
author = "the jaxnorm developers"
copyright = "2026, the jaxnorm developers"
# One source for the version: the package metadata (pyproject.toml).
release = importlib.metadata.version("jaxnorm")
version = release

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
  "sphinx_copybutton",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# GitHub-style anchors (`page.md#a-heading`), checked by the build, and
# `$...$` maths in the pages.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath", "colon_fence", "substitution"]
myst_substitutions = {"release": release}

autodoc_member_order = "bysource"
# Types are described in each docstring's Args; in signatures, jax's
# ArrayLike would be spelled out as a Union of ten types.
autodoc_typehints = "none"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False

# Every cross-reference must resolve (a broken one fails the build), except
# those to other projects: the build runs offline, without intersphinx.
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(jax|jaxlib|flax|nn|nnx|optax|equinox|eqx|torch|numpy|np|jnp)(\..*)?"),
  (r"py:.*", r"(typing|collections|collections\.abc|enum|types|dataclasses)\..*"),
  # flax's type aliases, as flax's signatures spell them.
  (r"py:.*", r"(Array|ArrayLike|Axes|Dtype|DTypeLike|Shape|PRNGKey|Initializer|Any)"),
]

html_theme = "furo"
html_title = f"jaxnorm {release}"
html_static_path: list[str] = []
pygments_style = "friendly"
