"""What `mote serve` is started with: one dataclass, filled by the CLI or by a test."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mote_local.errors import InputError

__all__ = ["Settings", "parse_profile_option"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Settings:
    model: Path
    profiles: dict[str, Path] = field(default_factory=dict)  # name -> file, served as steering.profile = name
    force_profiles: bool = False     # load profiles made for another model anyway
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4                # sequence slots decoded together (llama-server's --parallel)
    n_ctx: int = 4096                # the whole context; each slot holds n_ctx // parallel positions
    n_batch: int = 512
    placement: dict = field(default_factory=dict)  # Model's n_gpu_layers, rpc_servers, tensor_split
    n_threads: int | None = None
    api_key: str | None = None       # when set, /v1/* needs "Authorization: Bearer <key>"
    alias: str | None = None         # the model id clients see (default: the file's stem)
    max_queue: int = 256             # requests waiting for a slot before new ones get HTTP 503
    max_body_bytes: int = 8 * 2**20  # request bodies above this get HTTP 413
    verbose: bool = False

    def __post_init__(self):
        self.model = Path(self.model)
        for name, low in (("parallel", 1), ("n_ctx", 16), ("n_batch", 1), ("max_queue", 0),
                          ("max_body_bytes", 1024), ("port", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.port > 65535:
            raise InputError(f"port must be at most 65535, got {self.port}")
        if self.n_ctx // self.parallel < 16:
            raise InputError(f"a context of {self.n_ctx} split over {self.parallel} slots leaves "
                             f"{self.n_ctx // self.parallel} positions per request: raise -c or lower --parallel")
        for name in self.profiles:
            if not _NAME_RE.fullmatch(name):
                raise InputError(f"profile name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("the API key is empty")

    @property
    def model_id(self) -> str:
        return self.alias or self.model.stem

    @property
    def slot_ctx(self) -> int:
        """Positions one request may use: prompt plus completion."""
        return self.n_ctx // self.parallel

    @property
    def threads(self) -> int:
        return self.n_threads or max(1, os.cpu_count() or 1)


def parse_profile_option(values: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """``--profile NAME=FILE`` (or ``FILE``, named after its stem) options as a name -> path dict."""
    out: dict[str, Path] = {}
    for value in values:
        name, eq, path = value.partition("=")
        if not eq:
            name, path = Path(value).stem, value
        if not path:
            raise InputError(f"--profile {value!r}: expected NAME=FILE")
        if name in out:
            raise InputError(f"--profile {value!r}: the name {name!r} is given twice")
        out[name] = Path(path)
    return out
