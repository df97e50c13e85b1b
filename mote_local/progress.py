"""Progress bars for long loops: tqdm on stderr, shown on a terminal unless the caller says otherwise."""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, unit: str, show: bool | None = None) -> tqdm:
    """A tqdm bar over ``total`` steps; disabled (still usable as a context manager) when not shown."""
    show = sys.stderr.isatty() if show is None else show
    return tqdm(total=total, desc=desc, unit=unit, disable=not show)
