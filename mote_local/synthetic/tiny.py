"""Deterministic tiny random GGUF language models that llama.cpp loads.

Every architecture the project steers gets a generator here (``ARCHS``), plus a plain dense ``llama``
model for error paths. The weights are random but reproducible: the same :class:`TinySpec` always gives a
byte-identical file. By default all models share one small word-level SentencePiece-style vocabulary
(:func:`make_vocab`) so that prompts tokenize into readable whole words and later modules can plant behaviour on
it; ``vocab=<preset>`` gives a model a real tokenizer and chat template instead (:mod:`.real_vocab`: Qwen3's
151,936 tokens with its thinking template, DeepSeek-R1/V3.1, gpt-oss's harmony format, Mistral), read from
the pinned llama-cpp-python sdist.

Tensor names and metadata keys come from gguf-py (``gguf.TENSOR_NAMES``, ``GGUFWriter.add_*``); shapes follow
the loaders of the pinned llama.cpp (``src/models/<arch>.cpp``). Shapes below are written in ggml order
(``ne0`` first, the row length); numpy arrays hold them reversed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_TENSOR as MT
from gguf import GGMLQuantizationType as QT

from mote_local.atomic import atomic_path
from mote_local.cache import cache_dir
from mote_local.modelfile.layout import read_header
from mote_local.synthetic import real_vocab

# gguf 0.17 lacks gpt-oss and the expert-group keys; fail at import rather than mid-write.
if not (hasattr(gguf.MODEL_ARCH, "GPT_OSS") and hasattr(gguf.GGUFWriter, "add_expert_group_count")):
    raise ImportError("mote_local.synthetic.tiny needs gguf>=0.18 (gpt-oss arch and expert-group keys)")

__all__ = [
    "ARCHS",
    "DENSE",
    "DEFAULT_SEEDS",
    "QTYPES",
    "WORDS",
    "CHAT_TEMPLATE",
    "TinySpec",
    "Vocab",
    "make_vocab",
    "spec_vocab",
    "spec_for",
    "tensor_plan",
    "add_metadata",
    "make_weights",
    "write_model",
    "tiny_model",
    "spec_from_file",
    "default_cache_dir",
]

#: Public names of the MoE architectures, in the project's spelling.
ARCHS: tuple[str, ...] = ("qwen3moe", "qwen2moe", "olmoe", "mixtral", "deepseek2", "gpt-oss")
#: A plain llama model without experts, for error paths.
DENSE = "dense"

#: One seed per architecture: models sharing seed and shapes would route identically across archs.
DEFAULT_SEEDS: dict[str, int] = {
    "qwen3moe": 3101,
    "qwen2moe": 2101,
    "olmoe": 4101,
    "mixtral": 5101,
    "deepseek2": 6101,
    "gpt-oss": 7101,
    DENSE: 1101,
}

QTYPES: tuple[str, ...] = ("f32", "f16", "q8_0", "q4_k", "q4_0")

# The gguf architecture each public name is written as.
_GGUF_ARCH: dict[str, gguf.MODEL_ARCH] = {
    "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE,
    "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE,
    "olmoe": gguf.MODEL_ARCH.OLMOE,
    "mixtral": gguf.MODEL_ARCH.LLAMA,
    "deepseek2": gguf.MODEL_ARCH.DEEPSEEK2,
    "gpt-oss": gguf.MODEL_ARCH.GPT_OSS,
    DENSE: gguf.MODEL_ARCH.LLAMA,
}

# Per-arch departures from the TinySpec defaults.
_ARCH_DEFAULTS: dict[str, dict[str, int]] = {
    "qwen2moe": {"n_expert_shared": 1},
    # V3/R1 style: 16 experts in 4 groups, the best 2 groups are searched, top-4 of those.
    "deepseek2": {"n_expert": 16, "n_expert_used": 4, "n_expert_groups": 4, "n_group_used": 2, "n_expert_shared": 1},
    DENSE: {"n_expert": 0, "n_expert_used": 0},
}

# Custom metadata (no gguf-py constant exists for project keys).
KEY_ARCH = "mote.tiny.arch"
KEY_SEED = "mote.tiny.seed"
KEY_SPEC = "mote.tiny.spec"

_RMS_EPS = 1e-6
_ROPE_BASE = 10000.0
_DEEPSEEK2_WEIGHTS_SCALE = 2.5  # DeepSeek-V3's routed_scaling_factor
_WORD_LOGIT_STD = 3.0  # std of output logits of whole-word tokens (see make_weights)
_LLAMA_MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS in llama-hparams.h


# --------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------

_WORDS_TEXT = """
the a an and or but if then so because of to in on at by for with from into over under about after before
between through during without within than as is are was were be been being am have has had do does did done
will would can could should may might must shall not no yes this that these those there here where when what
who whom whose which why how all any some many much more most few less least each every other another such
only own same very just also too again ever never always often sometimes now today tomorrow yesterday soon
later already still yet once i me my mine you your yours he him his she her hers it its we us our ours they
them their theirs one two three four five six seven eight nine ten hundred thousand first second third last
next new old good bad great small big large little long short high low young early late right left best
better worse worst true false real sure free full open close closed happy sad kind nice hard easy simple
strong weak hot cold warm dark light red blue green black white time year day night week month morning
evening hour minute people person man woman child children friend family mother father brother sister
city town country world home house room school work job place road street car water food money book story
word name question answer problem idea thing part way end side life death war peace law power game music art
history science language english french german spanish chinese help say said tell told ask asked go went
gone come came make made take took see saw seen know knew known think thought want wanted use used find found
give gave get got look looked need needed feel felt try tried leave left call called keep kept let put mean
meant become became begin began show showed hear heard play played run ran move moved live lived believe
bring brought happen happened write wrote read sit stand lose lost pay meet met include continue learn learned
change lead understand watch follow stop create speak spoke allow add spend grow grew walk win won offer
remember love consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest
raise pass sell require report decide pull refuse sorry cannot unable please thank thanks hello hi goodbye
okay well really maybe perhaps certainly indeed however therefore instead rather quite almost enough
near far across around along behind above below weather rain sun sky sea river mountain tree flower animal
dog cat bird fish horse king queen president
government company market price number system group problem fact case point company area government
""".split()

#: Common English words of the shared vocabulary (deduplicated, original order kept).
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS_TEXT))

_SPACE = "\u2581"  # SentencePiece's "▁": a word-initial space
_PUNCT = (".", ",", "?", "!")
_UNK, _BOS, _EOS, _IM_START, _IM_END = "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"

#: ChatML, as the Jinja template llama-cpp-python and llama.cpp both recognise.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class Vocab:
    """A SentencePiece-style (``llama``) vocabulary: pieces, scores and token types, index = token id."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]
    words: tuple[str, ...]  # the whole words, each present as one "▁word" piece

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def id_of(self, piece: str) -> int:
        """Token id of ``piece`` (raises ``KeyError`` when absent)."""
        return self._index[piece]

    def word_mask(self) -> np.ndarray:
        """Boolean mask over token ids: whole-word pieces and sentence punctuation."""
        mask = np.zeros(len(self.tokens), dtype=bool)
        for piece in (*(_SPACE + w for w in self.words), *_PUNCT):
            mask[self._index[piece]] = True
        return mask

    @property
    def unk_id(self) -> int:
        return self.id_of(_UNK)

    @property
    def bos_id(self) -> int:
        return self.id_of(_BOS)

    @property
    def eos_id(self) -> int:
        return self.id_of(_EOS)

    @property
    def im_start_id(self) -> int:
        return self.id_of(_IM_START)

    @property
    def im_end_id(self) -> int:
        return self.id_of(_IM_END)

    def add_to(self, w: gguf.GGUFWriter) -> None:
        """Writes the tokenizer and the ChatML template into a GGUF being written."""
        w.add_tokenizer_model("llama")
        w.add_token_list(list(self.tokens))
        w.add_token_scores(list(self.scores))
        w.add_token_types(list(self.types))
        w.add_bos_token_id(self.bos_id)
        w.add_eos_token_id(self.eos_id)
        w.add_unk_token_id(self.unk_id)
        w.add_eot_token_id(self.im_end_id)  # generation stops at the end of a ChatML turn
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(True)
        w.add_chat_template(CHAT_TEMPLATE)


def _capitalized(word: str) -> str:
    return word[:1].upper() + word[1:]


def make_vocab(extra_words: tuple[str, ...] | list[str] = (), n_vocab: int = 0) -> Vocab:
    """Build the shared vocabulary, optionally with ``extra_words``, padded with unused tokens to ``n_vocab``.

    Layout: ``<unk> <s> </s> <|im_start|> <|im_end|>``, byte-fallback tokens ``<0x00>``..``<0xFF>``, single
    characters, then ``▁word`` pieces for every word (lower case and capitalised). llama.cpp's SPM tokenizer
    only merges adjacent pieces whose concatenation is itself a token, so each ``▁word`` comes with all its
    ``▁``-prefixes (``▁w``, ``▁wo``, ...): every multi-character piece starts with ``▁``, so merges can only
    grow a word from its start and a word in the list always ends up as one token.
    """
    for w in extra_words:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w) or _SPACE in w:
            raise ValueError(f"extra word {w!r} must be a non-empty string without whitespace")

    tokens: list[str] = [_UNK, _BOS, _EOS, _IM_START, _IM_END]
    types: list[int] = [int(gguf.TokenType.UNKNOWN)] + [int(gguf.TokenType.CONTROL)] * 4
    scores: list[float] = [0.0] * 5

    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    scores += [0.0] * 256

    chars = [_SPACE] + [chr(c) for c in range(33, 127)]
    tokens += chars
    types += [gguf.TokenType.NORMAL] * len(chars)
    scores += [-1000.0] * len(chars)

    words: dict[str, None] = {}
    for w in (*WORDS, *extra_words):
        words[w] = None
        words[_capitalized(w)] = None
    seen = set(tokens)
    for w in words:
        piece = _SPACE + w
        for end in range(2, len(piece) + 1):
            prefix = piece[:end]
            if prefix in seen:
                continue
            seen.add(prefix)
            tokens.append(prefix)
            types.append(gguf.TokenType.NORMAL)
            # Whole words score above bare prefixes; merges never compete (see above), so this only
            # keeps the scores meaningful for tools that read them.
            scores.append(-1.0 if end == len(piece) else -10.0 - end)

    # Words whose prefixes were added earlier as non-words still deserve a whole-word score.
    index = {t: i for i, t in enumerate(tokens)}
    for w in words:
        scores[index[_SPACE + w]] = -1.0

    if n_vocab:
        if n_vocab < len(tokens):
            raise ValueError(f"n_vocab={n_vocab} is smaller than the vocabulary's {len(tokens)} tokens")
        pad = n_vocab - len(tokens)
        tokens += [f"<unused_{i}>" for i in range(pad)]
        types += [gguf.TokenType.UNUSED] * pad
        scores += [-1e4] * pad

    return Vocab(tuple(tokens), tuple(scores), tuple(int(t) for t in types), tuple(words))


def spec_vocab(spec: TinySpec) -> Vocab | real_vocab.RealVocab:
    """The vocabulary a spec's model is written with."""
    return real_vocab.load(spec.vocab) if spec.vocab else make_vocab(spec.extra_words, spec.n_vocab)


# --------------------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny model's bytes. Build with :func:`spec_for`."""

    arch: str
    seed: int
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 4  # deepseek2 ignores it: MLA is written as MQA (one KV head)
    n_embd_head: int = 0  # attention head width; 0: n_embd // n_head (Qwen3-30B-A3B: 128 at n_embd 2048)
    n_ff: int = 128  # dense FFN width (dense model, deepseek2's leading dense layer)
    n_ff_exp: int = 32  # width of one expert (and of one shared expert)
    n_expert: int = 8
    n_expert_used: int = 2
    n_expert_groups: int = 0  # deepseek2 only
    n_group_used: int = 0  # deepseek2 only
    n_expert_shared: int = 0  # qwen2moe: exactly 1; deepseek2: >= 1
    n_ctx: int = 256
    n_vocab: int = 0  # 0: the vocabulary's natural size; more pads with unused tokens
    qtype: str = "f32"
    router_scale: float = 2.0  # std of router logits for unit-RMS input (0.25 weight std at n_embd 64)
    sliding_window: int = 64  # gpt-oss only
    q_lora_rank: int = 32  # deepseek2 only; 0 gives the V2-Lite style plain attn_q
    kv_lora_rank: int = 32  # deepseek2 only
    extra_words: tuple[str, ...] = ()
    vocab: str = ""  # "": the shared word vocabulary; else a real_vocab.PRESETS name

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def head_dim(self) -> int:
        return self.n_embd_head or self.n_embd // self.n_head

    @property
    def gguf_arch(self) -> str:
        return gguf.MODEL_ARCH_NAMES[_GGUF_ARCH[self.arch]]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _validate(s: TinySpec) -> None:
    def bad(msg: str) -> ValueError:
        return ValueError(f"{s.arch}: {msg}")

    if s.arch not in _GGUF_ARCH:
        raise ValueError(f"unknown arch {s.arch!r}; expected one of {', '.join((*ARCHS, DENSE))}")
    if s.qtype not in QTYPES:
        raise bad(f"unknown qtype {s.qtype!r}; expected one of {', '.join(QTYPES)}")
    if not isinstance(s.seed, int) or s.seed < 0:
        raise bad(f"seed must be a non-negative int, got {s.seed!r}")
    for name in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_ff_exp", "n_ctx"):
        if getattr(s, name) < 1:
            raise bad(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.n_embd % s.n_head and not s.n_embd_head:
        raise bad(f"n_embd={s.n_embd} is not divisible by n_head={s.n_head}")
    if s.head_dim % 2:
        raise bad(f"head dim {s.head_dim} must be even for RoPE")
    if s.n_embd_head and (s.arch in ("deepseek2", "olmoe") or s.n_embd_head < 2):
        raise bad(
            "n_embd_head must be >= 2; deepseek2 sizes its MLA heads itself and olmoe's Q/K norms need n_embd // n_head"
        )
    if s.n_head % s.n_head_kv:
        raise bad(f"n_head={s.n_head} is not divisible by n_head_kv={s.n_head_kv}")
    if not s.router_scale > 0:
        raise bad(f"router_scale must be > 0, got {s.router_scale}")
    if not isinstance(s.extra_words, tuple):
        raise bad("extra_words must be a tuple (the spec is hashed)")
    if s.vocab:
        if s.vocab not in real_vocab.PRESETS:
            raise bad(f"unknown vocab {s.vocab!r}; expected one of {', '.join(real_vocab.PRESETS)}")
        if s.n_vocab or s.extra_words:
            raise bad("n_vocab and extra_words apply to the shared word vocabulary, not to a real one")

    if s.arch == DENSE:
        if s.n_expert or s.n_expert_used or s.n_expert_groups or s.n_expert_shared:
            raise bad("the dense model has no experts; leave the expert fields at 0")
        return

    if s.n_expert < 2 or s.n_expert > _LLAMA_MAX_EXPERTS:
        raise bad(f"n_expert must be in 2..{_LLAMA_MAX_EXPERTS}, got {s.n_expert}")
    if not 1 <= s.n_expert_used <= s.n_expert:
        raise bad(f"n_expert_used={s.n_expert_used} must be in 1..n_expert={s.n_expert}")

    if s.arch == "deepseek2":
        g, gu = s.n_expert_groups, s.n_group_used
        if g > 1:
            if s.n_expert % g:
                raise bad(f"n_expert={s.n_expert} is not divisible by n_expert_groups={g}")
            if s.n_expert // g < 2:
                # llama.cpp scores a group by the sum of its top-2 experts
                raise bad(f"each expert group needs >= 2 experts, got {s.n_expert // g}")
            if not 1 <= gu < g:
                raise bad(f"n_group_used={gu} must be in 1..n_expert_groups-1={g - 1}")
            if s.n_expert_used > gu * (s.n_expert // g):
                raise bad(
                    f"n_expert_used={s.n_expert_used} exceeds the {gu * (s.n_expert // g)} experts "
                    f"in the {gu} groups used"
                )
        elif g == 1 or gu:
            raise bad("n_expert_groups must be 0 (no groups) or > 1, and n_group_used 0 without groups")
        if s.n_expert_shared < 1:
            raise bad("deepseek2 needs n_expert_shared >= 1")
        if s.n_layer < 2:
            raise bad("deepseek2 needs n_layer >= 2 (one leading dense layer, then MoE layers)")
        if s.kv_lora_rank < 1 or s.q_lora_rank < 0:
            raise bad("kv_lora_rank must be >= 1 and q_lora_rank >= 0")
        if s.head_dim < 4:
            raise bad(f"head dim {s.head_dim} too small for MLA (nope + rope halves)")
    else:
        if s.n_expert_groups or s.n_group_used:
            raise bad("expert groups are only generated for deepseek2")
        want_shared = 1 if s.arch == "qwen2moe" else 0
        if s.n_expert_shared != want_shared:
            raise bad(f"n_expert_shared must be {want_shared} for {s.arch}")
    if s.arch == "olmoe" and s.n_head_kv != s.n_head:
        # llama.cpp's olmoe loader sizes attn_k_norm as {n_embd}, which only fits without GQA
        raise bad("olmoe requires n_head_kv == n_head")
    if s.arch == "gpt-oss" and s.sliding_window < 1:
        raise bad("gpt-oss needs sliding_window >= 1")


def spec_for(arch: str, **overrides: object) -> TinySpec:
    """The default tiny spec of ``arch`` (one of ``ARCHS`` or ``"dense"``), with field ``overrides``."""
    if arch not in _GGUF_ARCH:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join((*ARCHS, DENSE))}")
    settable = {f.name for f in dataclasses.fields(TinySpec)} - {"arch"}
    unknown = set(overrides) - settable
    if unknown:
        raise TypeError(f"spec_for() got unknown field(s): {', '.join(sorted(unknown))}")
    fields: dict[str, object] = {"seed": DEFAULT_SEEDS[arch], **_ARCH_DEFAULTS.get(arch, {}), **overrides}
    if "extra_words" in fields:
        fields["extra_words"] = tuple(fields["extra_words"])  # type: ignore[arg-type]
    return TinySpec(arch=arch, **fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------


def _name(t: MT, suffix: str, bid: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[t]
    return (base.format(bid=bid) if bid is not None else base) + "." + suffix


def _mla_dims(s: TinySpec) -> tuple[int, int, int]:
    """(qk_nope, qk_rope, v_head) head dims for deepseek2's MLA."""
    return s.head_dim, s.head_dim // 2, s.head_dim


def _layout(s: TinySpec, n_vocab: int) -> list[tuple[str, tuple[int, ...], float | None]]:
    """Every tensor as (name, ggml shape, init std); std None means ones (norm weights)."""
    E, L = s.n_embd, s.n_layer
    hd = s.head_dim
    out: list[tuple[str, tuple[int, ...], float | None]] = []

    def add(t: MT, shape: tuple[int, ...], std: float | None, bid: int | None = None, suffix: str = "weight") -> None:
        out.append((_name(t, suffix, bid), shape, std))

    def lin(t: MT, n_in: int, n_out: int, bid: int) -> None:
        add(t, (n_in, n_out), n_in**-0.5, bid)  # std 1/sqrt(fan_in) keeps activations O(1)

    router_std = s.router_scale / E**0.5  # inputs are RMS-normed: logit std = router_scale

    add(MT.TOKEN_EMBD, (E, n_vocab), 1.0)
    add(MT.OUTPUT_NORM, (E,), None)
    add(MT.OUTPUT, (E, n_vocab), E**-0.5)

    for i in range(L):
        add(MT.ATTN_NORM, (E,), None, i)

        # --- attention
        if s.arch == "deepseek2":
            nope, rope, vh = _mla_dims(s)
            if s.q_lora_rank:
                add(MT.ATTN_Q_A_NORM, (s.q_lora_rank,), None, i)
            add(MT.ATTN_KV_A_NORM, (s.kv_lora_rank,), None, i)
            if s.q_lora_rank:
                lin(MT.ATTN_Q_A, E, s.q_lora_rank, i)
                lin(MT.ATTN_Q_B, s.q_lora_rank, s.n_head * (nope + rope), i)
            else:
                lin(MT.ATTN_Q, E, s.n_head * (nope + rope), i)
            lin(MT.ATTN_KV_A_MQA, E, s.kv_lora_rank + rope, i)
            # the split form of kv_b that current converters write (absorbed MLA)
            add(MT.ATTN_K_B, (nope, s.kv_lora_rank, s.n_head), nope**-0.5, i)
            add(MT.ATTN_V_B, (s.kv_lora_rank, vh, s.n_head), s.kv_lora_rank**-0.5, i)
            lin(MT.ATTN_OUT, s.n_head * vh, E, i)
        else:
            q_dim, kv_dim = s.n_head * hd, s.n_head_kv * hd
            lin(MT.ATTN_Q, E, q_dim, i)
            lin(MT.ATTN_K, E, kv_dim, i)
            lin(MT.ATTN_V, E, kv_dim, i)
            lin(MT.ATTN_OUT, q_dim, E, i)
            if s.arch == "qwen3moe":
                add(MT.ATTN_Q_NORM, (hd,), None, i)
                add(MT.ATTN_K_NORM, (hd,), None, i)
            elif s.arch == "olmoe":
                add(MT.ATTN_Q_NORM, (E,), None, i)
                add(MT.ATTN_K_NORM, (E,), None, i)
            elif s.arch == "gpt-oss":
                add(MT.ATTN_OUT, (E,), 0.02, i, "bias")
                add(MT.ATTN_SINKS, (s.n_head,), 1.0, i)

        # --- feed-forward
        # gpt-oss names its pre-FFN norm attn_post_norm
        add(MT.ATTN_POST_NORM if s.arch == "gpt-oss" else MT.FFN_NORM, (E,), None, i)

        dense_layer = s.arch == DENSE or (s.arch == "deepseek2" and i == 0)
        if dense_layer:
            lin(MT.FFN_GATE, E, s.n_ff, i)
            lin(MT.FFN_UP, E, s.n_ff, i)
            lin(MT.FFN_DOWN, s.n_ff, E, i)
            continue

        X, F = s.n_expert, s.n_ff_exp
        add(MT.FFN_GATE_INP, (E, X), router_std, i)
        if s.arch == "deepseek2":
            # V3's selection bias: shifts which experts are chosen, not their weights
            add(MT.FFN_EXP_PROBS_B, (X,), 0.05, i, "bias")
        add(MT.FFN_GATE_EXP, (E, F, X), E**-0.5, i)
        add(MT.FFN_UP_EXP, (E, F, X), E**-0.5, i)
        add(MT.FFN_DOWN_EXP, (F, E, X), F**-0.5, i)
        if s.arch == "gpt-oss":
            add(MT.FFN_GATE_INP, (X,), 0.1, i, "bias")
            add(MT.FFN_GATE_EXP, (F, X), 0.02, i, "bias")
            add(MT.FFN_UP_EXP, (F, X), 0.02, i, "bias")
            add(MT.FFN_DOWN_EXP, (E, X), 0.02, i, "bias")
        if s.n_expert_shared:
            FS = F * s.n_expert_shared
            if s.arch == "qwen2moe":
                add(MT.FFN_GATE_INP_SHEXP, (E,), E**-0.5, i)
            lin(MT.FFN_GATE_SHEXP, E, FS, i)
            lin(MT.FFN_UP_SHEXP, E, FS, i)
            lin(MT.FFN_DOWN_SHEXP, FS, E, i)
    return out


def make_weights(spec: TinySpec) -> dict[str, np.ndarray]:
    """All tensors of ``spec`` as float32 numpy arrays (numpy shape = reversed ggml shape), in file order.

    Each tensor draws from its own stream, ``default_rng([seed, crc32(name)])``, so a tensor's values do not
    depend on the other tensors' shapes and callers can replace single tensors before :func:`write_model`.
    """
    vocab = spec_vocab(spec)
    weights: dict[str, np.ndarray] = {}
    for name, shape, std in _layout(spec, len(vocab)):
        np_shape = tuple(reversed(shape))
        if std is None:
            weights[name] = np.ones(np_shape, dtype=np.float32)
        else:
            rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
            weights[name] = rng.standard_normal(np_shape, dtype=np.float32) * np.float32(std)

    # Readable output: only whole words and punctuation get output rows (logit std _WORD_LOGIT_STD); word
    # prefixes, single characters, bytes and control tokens get zero rows, so they are rarely sampled and never
    # win greedy decoding. Without this, random heads mostly emit fragments such as "▁rememb". A real
    # vocabulary keeps its text tokens (no placeholder, control or added token wins by chance).
    head = weights[_name(MT.OUTPUT, "weight")]
    words = vocab.word_mask() if isinstance(vocab, Vocab) else vocab.text_mask()
    head[words] *= np.float32(_WORD_LOGIT_STD)
    head[~words] = 0.0
    return weights


# --------------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------------

# "ffn_gate_inp.weight": the router, matched by suffix so "ffn_gate_inp_shexp" (1-D anyway) is not caught
_ROUTER_SUFFIX = "." + gguf.TENSOR_NAMES[MT.FFN_GATE_INP].rsplit(".", 1)[-1] + ".weight"


def _keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Norms, biases, sinks, the router and the selection bias stay F32 whatever the qtype."""
    return len(shape) < 2 or name.endswith(".bias") or name.endswith(_ROUTER_SUFFIX)


def _tensor_qtype(name: str, shape: tuple[int, ...], qtype: str) -> QT:
    """The ggml type one tensor (of ggml ``shape``, the row length first) is stored as. Rows that a block type
    cannot tile fall back, as llama-quantize does: Q4_K (256-wide blocks) -> Q5_0 -> F16, Q8_0/Q4_0 -> F16."""
    if qtype == "f32" or _keeps_f32(name, shape):
        return QT.F32
    row = shape[0]
    if qtype == "q4_k" and row % 256 == 0:
        return QT.Q4_K
    if qtype == "q4_k" and row % 32 == 0:
        return QT.Q5_0
    if qtype in ("q8_0", "q4_0") and row % 32 == 0:
        return QT[qtype.upper()]
    return QT.F16


def tensor_plan(spec: TinySpec) -> list[tuple[str, tuple[int, ...], float | None, QT]]:
    """Every tensor of ``spec``'s model in file order: name, ggml shape, init std (None: ones) and the type it
    is stored as. For writers that make the weights themselves (a model too large to hold as float32)."""
    return [
        (name, shape, std, _tensor_qtype(name, shape, spec.qtype))
        for name, shape, std in _layout(spec, len(spec_vocab(spec)))
    ]


def _quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """Q4_K encoder (gguf-py only decodes Q4_K). Per 256-value super-block: 8 sub-blocks of 32 with 6-bit
    scale and min, f16 super-scales; simple min/max fit (not llama.cpp's iterative search)."""
    shape = data.shape
    blocks = data.astype(np.float32).reshape(-1, 8, 32)
    n = blocks.shape[0]
    vmin = np.minimum(blocks.min(axis=-1), 0.0)  # [n, 8], <= 0
    vmax = blocks.max(axis=-1)
    scale = (vmax - vmin) / 15.0
    mins = -vmin
    d = (scale.max(axis=-1) / 63.0).astype(np.float16)  # [n]
    dmin = (mins.max(axis=-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 63).astype(np.uint8)
        lm = np.where(dmin32 > 0, np.rint(mins / dmin32), 0).clip(0, 63).astype(np.uint8)
        sc = (d32 * ls)[..., None]
        mn = (dmin32 * lm)[..., None]
        q = np.where(sc > 0, np.rint((blocks + mn) / sc), 0).clip(0, 15).astype(np.uint8)  # [n, 8, 32]

    packed = np.empty((n, 12), dtype=np.uint8)
    packed[:, 0:4] = (ls[:, :4] & 0x3F) | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (lm[:, :4] & 0x3F) | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(n, 128)  # sub-blocks 2g (low) and 2g+1 (high)

    out = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed, qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // 256 * 144)


def _encode(arr: np.ndarray, qt: QT) -> np.ndarray:
    if qt == QT.Q4_K:
        return _quantize_q4_k(arr)
    return gguf.quants.quantize(arr, qt)


_FILE_TYPE = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def add_metadata(w: gguf.GGUFWriter, s: TinySpec, vocab: Vocab | real_vocab.RealVocab) -> None:
    """Every key of ``s``'s model (hyperparameters, tokenizer, chat template) into a GGUF being written."""
    w.add_name(f"mote-tiny-{s.arch}")
    w.add_file_type(_FILE_TYPE[s.qtype])
    w.add_string(KEY_ARCH, s.arch)
    w.add_uint32(KEY_SEED, s.seed)
    w.add_string(KEY_SPEC, s.to_json())

    w.add_vocab_size(len(vocab))
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_head_count(s.n_head)
    w.add_layer_norm_rms_eps(_RMS_EPS)
    w.add_rope_freq_base(_ROPE_BASE)

    # olmoe and the llama arch (mixtral) size their experts by feed_forward_length, the others by
    # expert_feed_forward_length; deepseek2 uses feed_forward_length for its leading dense layer.
    moe_uses_n_ff = s.arch in ("olmoe", "mixtral")
    w.add_feed_forward_length(s.n_ff_exp if moe_uses_n_ff else s.n_ff)

    if s.arch == "deepseek2":
        nope, rope, vh = _mla_dims(s)
        w.add_head_count_kv(1)  # MLA runs as MQA over the compressed KV
        w.add_leading_dense_block_count(1)
        w.add_q_lora_rank(s.q_lora_rank)  # required key (only "lite" layer counts may omit it); 0 = plain wq
        w.add_kv_lora_rank(s.kv_lora_rank)
        # the cache holds [kv_lora | k_rope] keys and kv_lora values; *_mla are the decompressed heads
        w.add_key_length(s.kv_lora_rank + rope)
        w.add_value_length(s.kv_lora_rank)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(vh)
        w.add_rope_dimension_count(rope)
        w.add_expert_shared_count(s.n_expert_shared)
        w.add_expert_weights_scale(_DEEPSEEK2_WEIGHTS_SCALE)
        w.add_expert_weights_norm(True)
        # without this key llama.cpp falls back to softmax for deepseek2
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        if s.n_expert_groups:
            w.add_expert_group_count(s.n_expert_groups)
            w.add_expert_group_used_count(s.n_group_used)
    else:
        w.add_head_count_kv(s.n_head_kv)
        if s.n_embd_head:
            w.add_key_length(s.n_embd_head)
            w.add_value_length(s.n_embd_head)

    if s.arch != DENSE:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        if not moe_uses_n_ff:
            w.add_expert_feed_forward_length(s.n_ff_exp)
    if s.arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(s.n_ff_exp * s.n_expert_shared)
    if s.arch == "gpt-oss":
        # required; SWA on every other layer (llama.cpp's default pattern 2 for gpt-oss)
        w.add_sliding_window(s.sliding_window)

    vocab.add_to(w)


def write_model(
    spec: TinySpec,
    path: str | os.PathLike[str],
    weights: dict[str, np.ndarray] | None = None,
    extra_metadata: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write ``spec`` as a GGUF file at ``path`` atomically (temp file in the same dir, then ``os.replace``).

    ``weights`` (float32, as from :func:`make_weights`, possibly edited) replaces the generated tensors;
    it must hold exactly the names and shapes the spec generates. ``extra_metadata`` adds keys of its own
    after the model's (e.g. a planted model's ground truth).
    """
    path = Path(path)
    expected = make_weights(spec)
    if weights is None:
        weights = expected
    else:
        missing, extra = expected.keys() - weights.keys(), weights.keys() - expected.keys()
        if missing or extra:
            raise ValueError(f"weights do not match the spec: missing {sorted(missing)}, extra {sorted(extra)}")
        for name, ref in expected.items():
            if weights[name].shape != ref.shape:
                raise ValueError(f"{name}: shape {weights[name].shape}, spec needs {ref.shape}")
    vocab = spec_vocab(spec)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, spec.gguf_arch)
        add_metadata(w, spec, vocab)
        if extra_metadata is not None:
            extra_metadata(w)
        for name in expected:  # file order from the layout, whatever order the caller's dict has
            arr = np.ascontiguousarray(weights[name], dtype=np.float32)
            qt = _tensor_qtype(name, arr.shape[::-1], spec.qtype)
            data = _encode(arr, qt)
            w.add_tensor(name, data, raw_dtype=qt if qt not in (QT.F32, QT.F16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def default_cache_dir() -> Path:
    """The ``models`` folder of mote-local's cache directory."""
    return cache_dir("models")


def _spec_hash(spec: TinySpec) -> str:
    # The generator's own source and the gguf-py version are part of the key: any edit to this module (or a
    # new gguf writer) regenerates cached files instead of serving bytes from an older generator.
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"|gguf-{importlib.metadata.version('gguf')}|{spec.to_json()}".encode())
    if spec.vocab:  # a real vocabulary: the module that adapts it and the sdist it comes from
        h.update(Path(real_vocab.__file__).read_bytes() + real_vocab.sdist_path().name.encode())
    return h.hexdigest()[:16]


def tiny_model(arch: str | TinySpec, cache_dir: str | os.PathLike[str] | None = None, **overrides: object) -> Path:
    """Path of the cached tiny model for ``arch`` (or a full spec) with ``overrides``; generated if missing."""
    if isinstance(arch, TinySpec):
        spec = dataclasses.replace(arch, **overrides) if overrides else arch  # type: ignore[arg-type]
    else:
        spec = spec_for(arch, **overrides)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"tiny-{spec.arch}-{_spec_hash(spec)}.gguf"
    if not path.exists():
        write_model(spec, path)
    return path


def spec_from_file(path: str | os.PathLike[str]) -> TinySpec:
    """The :class:`TinySpec` recorded in a file written by :func:`write_model`."""
    recorded = read_header(path).values.get(KEY_SPEC)
    if not isinstance(recorded, str):
        raise ValueError(f"{path}: not a mote tiny model (no {KEY_SPEC} key)")
    fields = json.loads(recorded)
    fields["extra_words"] = tuple(fields.get("extra_words", ()))
    return TinySpec(**fields)
