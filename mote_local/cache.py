"""mote-local's one cache directory: ``$MOTE_CACHE_DIR``, else ``~/.cache/mote-local``. Each user keeps a
subfolder of it: ``models`` (generated models), ``super-experts`` (scan results), ``vocab`` (tokenizer files
from the pinned sdist), ``chat-history``; the build keeps the sdist in ``sdist`` (tools/upstream.py, which
runs before this package exists, spells the same rule)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str) -> Path:
    """The cache directory, or a path inside it (not created)."""
    root = Path(os.environ.get("MOTE_CACHE_DIR") or Path.home() / ".cache" / "mote-local")
    return root.joinpath(*parts)
