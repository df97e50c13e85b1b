"""The MoE layout of a GGUF file, read with the `gguf` package (no engine needed).

Reading the file's metadata first lets every entry point reject a bad file with a clear message
before llama.cpp sees it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf

from .errors import ModelFileError, NotMoeError

GGUF_MAGIC = b"GGUF"

# Gating and top-k weight normalisation that llama.cpp hard-codes per architecture when the
# file carries no {arch}.expert_gating_func / {arch}.expert_weights_norm key.
ARCH_ROUTER_DEFAULTS: dict[str, tuple[str, bool]] = {
    "qwen3moe": ("softmax", True),
    "qwen2moe": ("softmax", False),
    "olmoe": ("softmax", False),
    "llama": ("softmax", True),
    "gpt-oss": ("softmax_weight", False),
    "deepseek2": ("softmax", False),
}
GATING_NAMES = {1: "softmax", 2: "sigmoid", 3: "softmax_weight", 4: "sqrt_softplus"}


@dataclass(frozen=True)
class MoeLayout:
    path: Path
    arch: str
    n_layer: int
    moe_layers: tuple[int, ...]
    n_expert: int
    n_expert_used: int
    gating: str | None  # None: an architecture whose gating mote-local does not know
    norm_weights: bool
    n_shared_experts: int
    n_expert_groups: int
    n_group_used: int
    file_type: str
    size_bytes: int
    context_length: int  # the training context (0 when the file does not say)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and bool(self.moe_layers)

    def require_moe(self) -> "MoeLayout":
        if not self.is_moe:
            raise NotMoeError(f"{self.path} is a dense model ({self.arch}, no experts): "
                              "mote-local needs a Mixture-of-Experts GGUF")
        return self


def check_model_file(path: str | os.PathLike) -> Path:
    """The path as a Path, or a ModelFileError saying why it cannot be a model file."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelFileError(f"{p} is a directory: give the path of a .gguf file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except PermissionError:
        raise ModelFileError(f"cannot read {p}: permission denied") from None
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p} is empty: not a GGUF model")
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{p} is not a GGUF file (it does not start with 'GGUF')")
    return p


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def open_gguf(p: Path, error: type[Exception] = ModelFileError) -> gguf.GGUFReader:
    """A reader of the GGUF file p; a corrupt or truncated file raises `error` saying so."""
    try:
        return gguf.GGUFReader(p)
    except Exception as err:  # the reader raises assorted errors on truncated or corrupt files
        raise error(f"{p} is not a readable GGUF file ({type(err).__name__}: {err}); "
                    "the file may be truncated or corrupt") from None


def read_layout(path: str | os.PathLike) -> MoeLayout:
    p = check_model_file(path)
    reader = open_gguf(p)
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise ModelFileError(f"{p} has no general.architecture key: not a llama.cpp model")

    def key(template: str, default=None):
        return _field(reader, template.format(arch=arch), default)

    n_layer = int(key(gguf.Keys.LLM.BLOCK_COUNT, 0))
    n_expert = int(key(gguf.Keys.LLM.EXPERT_COUNT, 0) or 0)
    n_expert_used = int(key(gguf.Keys.LLM.EXPERT_USED_COUNT, 0) or 0)
    router = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP]
    names = {t.name for t in reader.tensors}
    moe_layers = tuple(il for il in range(n_layer) if f"{router.format(bid=il)}.weight" in names)

    default_gating, default_norm = ARCH_ROUTER_DEFAULTS.get(arch, (None, False))
    gating_id = key(gguf.Keys.LLM.EXPERT_GATING_FUNC)
    gating = GATING_NAMES.get(int(gating_id)) if gating_id is not None else default_gating
    norm = key(gguf.Keys.LLM.EXPERT_WEIGHTS_NORM)
    shared = key(gguf.Keys.LLM.EXPERT_SHARED_COUNT)
    if shared is None:
        shexp = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP].format(bid=moe_layers[0]) if moe_layers else ""
        up_shexp = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_UP_SHEXP].format(bid=moe_layers[0]) if moe_layers else ""
        shared = 1 if moe_layers and (f"{shexp}.weight" in names or f"{up_shexp}.weight" in names) else 0
    file_type = _field(reader, gguf.Keys.General.FILE_TYPE)
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
    except ValueError:
        file_type_name = f"type {file_type}"
    return MoeLayout(
        path=p, arch=arch, n_layer=n_layer, moe_layers=moe_layers, n_expert=n_expert,
        n_expert_used=n_expert_used, gating=gating,
        norm_weights=bool(norm) if norm is not None else default_norm,
        n_shared_experts=int(shared),
        n_expert_groups=int(key(gguf.Keys.LLM.EXPERT_GROUP_COUNT, 0) or 0),
        n_group_used=int(key(gguf.Keys.LLM.EXPERT_GROUP_USED_COUNT, 0) or 0),
        file_type=file_type_name, size_bytes=p.stat().st_size,
        context_length=int(key(gguf.Keys.LLM.CONTEXT_LENGTH, 0) or 0),
    )
