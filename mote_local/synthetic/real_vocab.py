"""Real tokenizers and chat templates for the tiny models, read from the pinned llama-cpp-python sdist.

The sdist that the build fetches carries llama.cpp's tokenizer-only GGUFs
(``vendor/llama.cpp/models/ggml-vocab-<name>.gguf``: Qwen2's 151,936 tokens, DeepSeek's, Llama 3's, Llama 2's
SentencePiece, ...) and the chat templates of many models (``models/templates/<name>.jinja``). A :class:`Preset`
pairs one of each the way a real model does; :func:`load` gives the vocabulary ready to be written into a GGUF.
Nothing is downloaded and nothing from upstream is committed: the two files are extracted from the sdist once,
into the cache, and read from there.

Where a template speaks in tokens that the vocabulary file lacks (Qwen3's ``<think>``, DeepSeek-V3's
``<｜User｜>``, gpt-oss's harmony ``<|channel|>``), the preset writes them over the vocabulary's placeholder
slots (``[PAD151646]``, ``<|reserved_special_token_0|>``) in order, as the model's own tokenizer adds them:
Qwen3's land on their real ids.
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mote_local.atomic import atomic_write_bytes
from mote_local.cache import cache_dir
from mote_local.errors import MoteError
from mote_local.modelfile.layout import read_header

try:  # the build records the pin it was built from; without a build there is no sdist to read either
    from mote_local_engine import LLAMA_CPP_PYTHON_VERSION as PIN  # type: ignore[attr-defined]  # written by the build
except ImportError:  # pragma: no cover - an unbuilt checkout
    PIN = None

__all__ = ["PRESETS", "Preset", "RealVocab", "SdistMissing", "load", "sdist_path", "template_text", "upstream_cases"]

_MODELS_DIR = "vendor/llama.cpp/models"
_KT = gguf.Keys.Tokenizer


class SdistMissing(MoteError):
    """The pinned llama-cpp-python sdist (the source of the real vocabularies) is not on this machine."""


@dataclass(frozen=True)
class Preset:
    """A real vocabulary with the chat template of a model that uses it (or one of its kind)."""

    vocab: str  # models/ggml-vocab-<vocab>.gguf
    template: str  # models/templates/<template>.jinja
    added: tuple[str, ...] = ()  # the template's tokens the vocabulary lacks, over its placeholders in order
    eos: str | None = None  # the end-of-sequence token's text, where the model's differs from the file's
    add_bos: bool | None = None  # tokenizer.ggml.add_bos_token, where the model's differs from the file's


# Qwen2.5/Qwen3's added tokens after <|im_end|>, in their tokenizer's order (ids 151646..151668).
_QWEN3_ADDED = (
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
# The turn and thinking tokens of DeepSeek-V3/R1's tokenizer (its file here is DeepSeek-LLM's, which predates them).
_DEEPSEEK_ADDED = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")
# gpt-oss's harmony format tokens (o200k_harmony is not in the sdist: they go over Llama 3's reserved tokens).
# With <|return|> and <|call|> present, llama.cpp ends a reply at those and not at <|end|>, which only ends
# a message (the analysis channel's, for one).
_HARMONY_ADDED = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|return|>",
    "<|constrain|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|call|>",
)

PRESETS: dict[str, Preset] = {
    "qwen3": Preset("qwen2", "Qwen-Qwen3-0.6B", _QWEN3_ADDED, eos="<|im_end|>", add_bos=False),
    # R1's template opens the reply with <think>: generation starts inside the thinking span
    "deepseek-r1": Preset("deepseek-llm", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B", _DEEPSEEK_ADDED),
    "deepseek-v3.1": Preset("deepseek-llm", "deepseek-ai-DeepSeek-V3.1", _DEEPSEEK_ADDED),
    "gpt-oss": Preset("llama-bpe", "openai-gpt-oss-120b", _HARMONY_ADDED, eos="<|return|>", add_bos=False),
    # Llama 2's SentencePiece vocabulary: the kind and size (32,000) of Mistral 7B's and Mixtral 8x7B's
    "mistral": Preset("llama-spm", "mistralai-Mistral-Nemo-Instruct-2407"),
}

_PLACEHOLDER = re.compile(rb"\[PAD\d+\]|<\|reserved_special_token_\d+\|>")
# Added tokens spelled <|...|> or <｜...｜> are control tokens (rendered only when asked); the others are
# user-defined (always rendered, as <think> is in a Qwen3 reply).
_CONTROL = re.compile(r"<\|.*\|>|<｜.*｜>")

# the tokenizer keys copied from a vocabulary file besides its arrays
_SPECIAL_IDS = (_KT.BOS_ID, _KT.EOS_ID, _KT.UNK_ID, _KT.PAD_ID)
_FLAGS = (_KT.ADD_BOS, _KT.ADD_EOS, _KT.ADD_PREFIX)

# token types of ordinary text: the rows a random output head may favour
_TEXT_TYPES = (gguf.TokenType.NORMAL, gguf.TokenType.BYTE)


@dataclass(frozen=True, eq=False)
class RealVocab:
    """A real tokenizer (with a preset's added tokens) and its chat template, as written into a GGUF."""

    name: str
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # tokenizer.ggml.pre
    tokens: tuple[bytes, ...]
    types: np.ndarray  # int32 per token
    scores: np.ndarray | None  # float32 per token (SentencePiece)
    merges: tuple[bytes, ...]  # BPE merges
    special: dict[str, int]  # GGUF key (tokenizer.ggml.bos_token_id, ...) -> token id
    flags: dict[str, bool]  # GGUF key (tokenizer.ggml.add_bos_token, ...) -> value
    chat_template: str

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def _index(self) -> dict[bytes, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def id_of(self, text: str) -> int:
        """Token id of the token spelled ``text`` (raises ``KeyError`` when absent)."""
        return self._index[text.encode()]

    def text_mask(self) -> np.ndarray:
        """Boolean mask over token ids: ordinary text tokens (not control, placeholder or added tokens)."""
        return np.isin(self.types, np.array(_TEXT_TYPES, dtype=np.int32))

    def add_to(self, w: gguf.GGUFWriter) -> None:
        """Writes the tokenizer and the chat template into a GGUF being written."""
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(list(self.tokens))
        w.add_token_types(self.types.tolist())
        if self.scores is not None:
            w.add_token_scores(self.scores.tolist())
        if self.merges:
            w.add_token_merges(list(self.merges))
        for key, token in self.special.items():
            w.add_uint32(key, token)
        for key, value in self.flags.items():
            w.add_bool(key, value)
        w.add_chat_template(self.chat_template)


# ------------------------------------------------------------------------------------------ the pinned sdist


def sdist_path() -> Path:
    """The pinned sdist the engine was built from: $MOTE_LLAMA_SDIST, else the build's cache."""
    override = os.environ.get("MOTE_LLAMA_SDIST")
    if override:
        path = Path(override)
    elif PIN is None:
        raise SdistMissing(
            "the engine is not built, so the pinned llama-cpp-python sdist is unknown: "
            "install the package with `pip install .`"
        )
    else:
        path = cache_dir() / "sdist" / f"llama_cpp_python-{PIN}.tar.gz"
    if not path.is_file():
        raise SdistMissing(
            f"the pinned llama-cpp-python sdist is not at {path}: the build downloads it there "
            "(`pip install .`), or set MOTE_LLAMA_SDIST to a local copy"
        )
    return path


def _extracted(member: str) -> Path:
    """``member`` (a path under the sdist's llama.cpp models/) extracted once into the cache."""
    sdist = sdist_path()
    # keyed by the sdist's name and size: a different sdist never serves another's files
    target = cache_dir() / "real-vocab" / f"{sdist.name}-{sdist.stat().st_size}" / member
    if target.is_file():
        return target
    with tarfile.open(sdist) as tar:
        root = tar.getmembers()[0].name.split("/", 1)[0]
        try:
            data = tar.extractfile(f"{root}/{_MODELS_DIR}/{member}")
        except KeyError:
            raise SdistMissing(f"{sdist} has no {_MODELS_DIR}/{member}: is it the pinned llama-cpp-python?") from None
        if data is None:
            raise SdistMissing(f"{sdist}: {_MODELS_DIR}/{member} is not a regular file")
        atomic_write_bytes(target, data.read())
    return target


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def template_text(name: str) -> str:
    """The chat template ``models/templates/<name>.jinja`` of the pinned sdist."""
    return _extracted(f"templates/{name}.jinja").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ vocabularies


@functools.cache
def load(name: str) -> RealVocab:
    """The vocabulary of preset ``name`` (see PRESETS), with its added tokens and chat template."""
    if name not in PRESETS:
        raise ValueError(f"unknown real vocabulary {name!r}; expected one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    arrays = (_KT.LIST, _KT.TOKEN_TYPE, _KT.SCORES, _KT.MERGES)
    header = read_header(_extracted(f"ggml-vocab-{preset.vocab}.gguf"), arrays=arrays)
    tokens = list(header.arrays[_KT.LIST])
    types = np.array(header.arrays[_KT.TOKEN_TYPE], dtype=np.int32)
    _add_tokens(tokens, types, preset.added, f"ggml-vocab-{preset.vocab}.gguf")
    special: dict[str, Any] = {key: header.values[key] for key in _SPECIAL_IDS if key in header.values}
    if preset.eos is not None:
        special[_KT.EOS_ID] = tokens.index(preset.eos.encode())
    flags: dict[str, Any] = {key: header.values[key] for key in _FLAGS if key in header.values}
    if preset.add_bos is not None:
        flags[_KT.ADD_BOS] = preset.add_bos
    scores = header.arrays.get(_KT.SCORES)
    return RealVocab(
        name=name,
        model=str(header.values[_KT.MODEL]),
        pre=_optional_str(header.values.get(_KT.PRE)),
        tokens=tuple(tokens),
        types=types,
        scores=None if scores is None else np.array(scores, dtype=np.float32),
        merges=tuple(header.arrays.get(_KT.MERGES, ())),
        special=special,
        flags=flags,
        chat_template=template_text(preset.template),
    )


def upstream_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's own tokenizer cases for preset ``name``'s vocabulary (``ggml-vocab-<v>.gguf.inp/.out``, the
    token ids the model's reference tokenizer gives, without special tokens): (text, ids) pairs."""
    vocab = PRESETS[name].vocab
    texts = _extracted(f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = _extracted(f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, ids)]


def _add_tokens(tokens: list[bytes], types: np.ndarray, added: tuple[str, ...], source: str) -> None:
    """Writes ``added`` over the first placeholder slots, in order (tokens already present stay where they are)."""
    present = set(tokens)
    missing = [t.encode() for t in added if t.encode() not in present]
    slots = [i for i, t in enumerate(tokens) if _PLACEHOLDER.fullmatch(t)][: len(missing)]
    if len(slots) < len(missing):
        raise ValueError(f"{source} has {len(slots)} placeholder tokens for {len(missing)} added tokens")
    for slot, token in zip(slots, missing):
        tokens[slot] = token
        types[slot] = gguf.TokenType.CONTROL if _CONTROL.fullmatch(token.decode()) else gguf.TokenType.USER_DEFINED
