"""An optional progress bar: tqdm's when it is installed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def progress(iterable: Iterable[Any], *, enabled: bool, desc: str) -> Iterable[Any]:
  """``iterable`` wrapped in a tqdm bar if ``enabled`` and tqdm is installed.

  tqdm is not a dependency of jaxnorm (the ``examples`` and ``test`` extras
  have it); without it the loop runs without a bar.
  """
  if not enabled:
    return iterable
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return iterable
  return tqdm(iterable, desc=desc, leave=False)
