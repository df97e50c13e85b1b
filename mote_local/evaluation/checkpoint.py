"""Finished work of an evaluation kept in its output folder, so that a run cut short (Ctrl-C, a crash) resumes.

Each finished (condition, prompt) generation and each condition's capability cost is a record under a key:
the SHA-256 of everything that decides it (the model's identity, the condition's steering, the prompt's
tokens, the decoding settings and the detector), so a record is reused only where the new run would compute
the very same thing, whatever else changed (another sweep size, more prompts). Records go to
``OUT/checkpoint/records-NNNNNN.json``, a new file per flush, each written atomically (``mote_local.atomic``):
a flush at most every ``FLUSH_S`` seconds, and always when the run ends or is interrupted. A run without
``resume`` starts the folder afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from mote_local.atomic import atomic_write_text
from mote_local.errors import EvalError

__all__ = ["Checkpoint", "record_key"]

FORMAT = "mote-eval-checkpoint"
FLUSH_S = 2.0
FOLDER = "checkpoint"


def record_key(*parts: Any) -> str:
    """A stable key for the JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


class Checkpoint:
    """Records of one output folder. ``resume``: those of earlier runs are read; otherwise they are removed."""

    def __init__(self, out_dir: str | os.PathLike, resume: bool):
        self.folder = Path(out_dir) / FOLDER
        self.records: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, dict[str, Any]] = {}
        self._last = time.monotonic()
        self._next = 0
        try:
            shards = sorted(self.folder.glob("records-*.json"))
        except OSError as err:
            raise EvalError(f"cannot read {self.folder}: {err}") from None
        for shard in shards:
            if resume:
                self.records.update(self._read(shard))
            else:
                shard.unlink()
        self._next = 1 + max((int(s.stem.split("-")[1]) for s in shards if s.exists()), default=0)

    @staticmethod
    def _read(shard: Path) -> dict[str, dict[str, Any]]:
        try:
            doc = json.loads(shard.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise EvalError(
                f"{shard} is not a readable checkpoint ({err}): remove it, or run without --resume"
            ) from None
        if doc.get("format") != FORMAT:
            raise EvalError(f"{shard} is not a mote evaluation checkpoint: remove it, or run without --resume")
        return dict(doc["records"])

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, key: str, record: dict[str, Any]) -> None:
        self.records[key] = self._pending[key] = record
        if time.monotonic() - self._last >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._pending:
            return
        shard = self.folder / f"records-{self._next:06d}.json"
        atomic_write_text(shard, json.dumps({"format": FORMAT, "records": self._pending}, ensure_ascii=False))
        self._next += 1
        self._pending = {}
