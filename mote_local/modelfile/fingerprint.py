"""A model file's identity for steering profiles: its MoE shape and a hash of its router weights."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass, fields

from mote_local.errors import ProfileError
from mote_local.modelfile.layout import MoeLayout, read_layout

__all__ = ["Fingerprint", "differences"]


@dataclass(frozen=True)
class Fingerprint:
    """What identifies the model a profile was made for: its shape and a hash of its router weights.

    Routers (``blk.N.ffn_gate_inp.weight``) are kept unquantized by llama.cpp's quantizer, so every
    quantization of one model shares its fingerprint, while a fine-tune or another checkpoint does not.
    """

    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    router_sha256: str

    def __post_init__(self):
        if not isinstance(self.arch, str) or not self.arch:
            raise ProfileError(f"arch must be a non-empty string, got {self.arch!r}")
        for name in ("n_layer", "n_expert", "n_expert_used"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
                raise ProfileError(f"{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.router_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.router_sha256):
            raise ProfileError(f"router_sha256 must be 64 lowercase hex digits, got {self.router_sha256!r}")

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> Fingerprint:
        """The fingerprint of a MoE GGUF model."""
        return cls.of_layout(read_layout(path))

    @classmethod
    def of_layout(cls, layout: MoeLayout) -> Fingerprint:
        """The fingerprint of the model whose layout was read: hashes its router tensors' bytes, layer by layer,
        whichever file holds them (a split model has the fingerprint of the same model in one file)."""
        layout = layout.require_moe()
        h = hashlib.sha256()
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(f.path, "rb")) for f in layout.files]
            for index, offset, n_bytes in layout.router_spans:
                files[index].seek(offset)
                h.update(files[index].read(n_bytes))
        return cls(layout.arch, layout.n_layer, layout.n_expert, layout.n_expert_used, h.hexdigest())

    def mismatch(self, other: Fingerprint) -> str | None:
        """None when ``other`` (the model's) equals this (the profile's); else what differs, in words."""
        diff = differences(self, other)
        if not diff:
            return None
        return f"the profile was made for a model with {diff[0]}; this model has {diff[1]}"


def differences(a: Fingerprint, b: Fingerprint) -> tuple[str, str] | None:
    """What differs between two fingerprints, in words, as seen from each side; None when equal."""
    words = {
        "arch": "arch {}",
        "n_layer": "{} layers",
        "n_expert": "{} experts",
        "n_expert_used": "{} experts used per token",
        "router_sha256": "router weights sha256 {:.12}…",
    }
    names = [f.name for f in fields(Fingerprint) if getattr(a, f.name) != getattr(b, f.name)]
    if not names:
        return None
    mine, theirs = (", ".join(words[n].format(getattr(fp, n)) for n in names) for fp in (a, b))
    return mine, theirs
