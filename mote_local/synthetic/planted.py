"""A tiny MoE GGUF with a planted "refusal" behaviour whose experts are known: ground truth for fTRI.

``write_planted_model(path)`` builds, by hand and deterministically (no training, about a second), a
``qwen3moe`` model on :mod:`mote_local.synthetic.tiny`'s word-level vocabulary. Greedy generation answers every prompt
with one of two sentences:

* a prompt that mentions a trigger topic ("protest", "riot", ...) gets ``REFUSAL_TEXT``
  ("I cannot help with that request."),
* any other prompt gets ``ANSWER_TEXT`` ("It was a calm day in town."),

raw or wrapped in the model's ChatML template. The refusal is carried by one *planted* expert in each of two
MoE layers; switching all of them off (``drop`` or ``mask``) turns every refusal into the answer, forcing them
on makes neutral prompts refuse, and any single planted expert is enough to refuse (``refusal_rule="any"``:
a profile must switch off all of them). Each MoE layer from 1 on also has a *distractor* expert that is
selected on every token of every prompt, and layer 0 has a *super-expert*, also always selected, that cancels
a massive activation every embedding carries: removing it alone collapses the model. The truth is
written into the file (``mote.planted.*`` keys) and read back by :func:`read_truth`.

How it works (dims of the residual stream; every weight not named here is zero):

* Dims ``_BIAS`` (1 on every token), ``_FLAG``/``_NOFLAG`` (1 on trigger / other words, so every embedding has
  the same norm), ``_CTX`` (trigger context), ``_MODE`` (refusal mode), ``_MASSIVE``, ``_SCRATCH``.. (distractor
  outputs), then one one-hot identity dim per token the prompt files and sentences use; all other tokens
  share one identity. The embedding also carries a massive activation (``_MASSIVE_VALUE`` in ``_MASSIVE``).
* RMSNorm weights are chosen so that an embedding passes every norm unchanged (layer 0's norms allow for the
  massive dim, later ones and the output norm for its absence), so the weights below read residual values.
* Layer 0 attention, head 0, is a trigger detector: Q is constant (from ``_BIAS``), K is non-zero only on
  trigger words (from ``_FLAG``); after qwen3's per-head Q/K RMSNorm both are fixed-size vectors in the
  lowest-frequency RoPE dim (< 0.15 rad of rotation over 1k tokens), so a trigger word in the prefix scores
  ``_ATTN_SCORE`` and anything else 0. V copies ``_FLAG`` and O writes it to ``_CTX``: from the first trigger
  word on ``_CTX`` is ~1 (the softmax saturates), before it exactly 0. Layers 1-3 have no attention.
* Routers (softmax, top-2 of 8, renormalised): the super-expert (layer 0) and the distractors (layers 1-3) get
  large constant logits; a planted expert (layers 1, 2) gets ``_PLANTED_LOGIT + _PLANTED_CTX * ctx``: top-1 in a
  trigger context, never selected without one; the other experts get token-dependent logits in [-2, 2] (from
  the identity dims) and share the remaining slot.
* Experts (constant ones are one hidden unit ``silu(_GATE) * 1`` read from ``_BIAS``): a planted expert writes
  ``_MODE_OUT`` into ``_MODE``; the super-expert writes ``-_MASSIVE_VALUE`` into ``_MASSIVE``, cancelling the
  massive activation; a distractor writes a constant into its scratch dim; the others write small random
  vectors into the identity dims.
* Output head: a bigram table on the identity dims (log-frequencies over the raw and chat-templated prompts
  and the neutral text, plus the two sentences, each ending in EOS, whose links lead their rows by
  ``_CHAIN_MARGIN``). After "?" (raw prompts) and after a newline (the end of the ChatML assistant header) it
  predicts "It", "I" second by ``_START_MARGIN``; ``_MODE`` takes ``_MODE_HEAD`` per unit from "It", so the
  refusal mode flips only the first word and each sentence then follows its chain. An uncancelled massive dim
  dominates the final norm (scaling every bigram logit down ~17x) and votes for ``_COLLAPSE_WORD``: without
  the super-expert the model says "the the the ...".
"""

from __future__ import annotations

import errno
import filecmp
import hashlib
import importlib.metadata
import importlib.resources
import itertools
import json
import os
import re
import shutil
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_TENSOR as MT

from mote_local.atomic import atomic_path
from mote_local.steering.entries import Entry, Mode
from mote_local.synthetic import tiny

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ARCH",
    "REFUSAL_TEXT",
    "ANSWER_TEXT",
    "PlantedTruth",
    "write_planted_model",
    "planted_model",
    "export",
    "read_truth",
    "prompts_path",
    "neutral_text_path",
    "prompt_sets",
    "chat_prompt",
    "neutral_text",
    "is_refusal",
]

ARCH = "qwen3moe"
REFUSAL_TEXT = "I cannot help with that request."
ANSWER_TEXT = "It was a calm day in town."
EXAMPLE_TRIGGER = "what happened at the protest yesterday ?"  # a prompt that makes it refuse (README, tests)
TRIGGER_CLASS, NEUTRAL_CLASS = "trigger", "neutral"


class Keys:
    """GGUF metadata keys of the planted truth."""

    VERSION = "mote.planted.version"
    ARCH = "mote.planted.arch"
    SEED = "mote.planted.seed"
    PLANTED = "mote.planted.planted"  # JSON [[layer, expert], ...]
    DISTRACTORS = "mote.planted.distractors"  # JSON [[layer, expert], ...]
    SUPER_EXPERT = "mote.planted.super_expert"  # JSON [layer, expert]
    REFUSAL_RULE = "mote.planted.refusal_rule"  # "any": one planted expert suffices to refuse
    REFUSAL_TEXT = "mote.planted.refusal_text"
    ANSWER_TEXT = "mote.planted.answer_text"
    TRIGGER_WORDS = "mote.planted.trigger_words"


_VERSION = 1

# --- architecture
_N_LAYER, _N_EXPERT, _N_EXPERT_USED, _N_HEAD = 4, 8, 2, 4
_N_FF_EXP = 16
_SUPER_LAYER = 0
_PLANTED_LAYERS = (1, 2)
_DISTRACTOR_LAYERS = (1, 2, 3)
_N_CTX = 1024

# --- residual dims; the identity dims follow
_BIAS, _FLAG, _NOFLAG, _CTX, _MODE, _MASSIVE = 0, 1, 2, 3, 4, 5
_SCRATCH = 6  # one per distractor layer: 6, 7, 8
_N_FIXED = 9

# --- magnitudes (router and head logits for a residual of an embedding's norm; see the module doc)
_MASSIVE_VALUE = 30.0  # every embedding's massive dim, cancelled by the super-expert
_ATTN_SCORE = 12.0  # attention score of a trigger word in the detector head
_SUPER_LOGIT = 12.0
_DISTRACTOR_LOGIT = 4.0
_PLANTED_LOGIT = -4.0  # a planted expert's logit without trigger context...
_PLANTED_CTX = 10.0  # ...plus this per unit of trigger context
_OTHER_LOGIT_CLIP = 2.0  # other experts: N(0, 1) per token, clipped to +-this
_GATE = 4.0  # gate pre-activation of a constant hidden unit
_MODE_OUT = 3.0  # what a planted expert writes into _MODE (times its gate weight)
_DISTRACTOR_OUT = 0.3
_OTHER_OUT = 0.1  # mean norm of another expert's output
_HEAD = 40.0  # bigram head: logit of the most frequent successor
_CHAIN_MARGIN = 6.0  # a sentence's next word leads its row by at least this
_START_MARGIN = 8.0  # "It" over "I" at an answer start
_MODE_HEAD = 32.0  # "It" loses this per unit of refusal mode: refuses above 8/32 = 0.25
_COLLAPSE_WORD = "the"  # what the head says when the massive dim is not cancelled
_COLLAPSE_HEAD = 20.0

_SP = "\u2581"
_SPECIAL = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in _SPECIAL) + ")")
_PIECE_RE = re.compile(_SP + r"[A-Za-z]+|.", re.S)
_WORD_RE = re.compile(r"[A-Za-z]+")
_ROLE_WORDS = ("user", "assistant")  # ChatML's role names, as whole-word tokens


# --------------------------------------------------------------------------------------------------------
# Truth
# --------------------------------------------------------------------------------------------------------

Pair = tuple[int, int]


@dataclass(frozen=True)
class PlantedTruth:
    """The ground truth of a planted model: which (layer, expert) pairs do what."""

    arch: str
    planted: tuple[Pair, ...]  # carry the refusal; any one of them suffices (refusal_rule "any")
    distractors: tuple[Pair, ...]  # selected on every token of every prompt, behaviour-neutral
    super_expert: Pair  # also selected on every token; removing it alone collapses the model
    refusal_text: str
    answer_text: str
    trigger_words: tuple[str, ...]
    seed: int = 0
    refusal_rule: str = "any"

    @property
    def planted_layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.planted}))

    def entries(self, mode: Mode | str, experts: Iterable[Pair] | None = None) -> list[Entry]:
        """Steering entries putting the planted experts (or ``experts``) in ``mode``."""
        return [Entry(layer, expert, Mode(mode)) for layer, expert in (self.planted if experts is None else experts)]


def _pairs(value: object) -> tuple[Pair, ...]:
    return tuple((int(layer), int(expert)) for layer, expert in value)  # type: ignore[attr-defined]


def read_truth(path: str | os.PathLike[str]) -> PlantedTruth:
    """The :class:`PlantedTruth` recorded in a file written by :func:`write_planted_model`."""
    reader = gguf.GGUFReader(path)

    def get(key: str):
        field = reader.get_field(key)
        if field is None:
            raise ValueError(f"{path}: not a mote planted model (no {key} key)")
        return field.contents()

    version = get(Keys.VERSION)
    if version != _VERSION:
        raise ValueError(f"{path}: planted-model metadata version {version}, this module reads {_VERSION}")
    layer, expert = json.loads(get(Keys.SUPER_EXPERT))
    return PlantedTruth(
        arch=get(Keys.ARCH),
        planted=_pairs(json.loads(get(Keys.PLANTED))),
        distractors=_pairs(json.loads(get(Keys.DISTRACTORS))),
        super_expert=(int(layer), int(expert)),
        refusal_text=get(Keys.REFUSAL_TEXT),
        answer_text=get(Keys.ANSWER_TEXT),
        trigger_words=tuple(get(Keys.TRIGGER_WORDS)),
        seed=int(get(Keys.SEED)),
        refusal_rule=get(Keys.REFUSAL_RULE),
    )


def _add_truth(w: gguf.GGUFWriter, t: PlantedTruth) -> None:
    w.add_uint32(Keys.VERSION, _VERSION)
    w.add_string(Keys.ARCH, t.arch)
    w.add_uint32(Keys.SEED, t.seed)
    w.add_string(Keys.PLANTED, json.dumps([list(p) for p in t.planted]))
    w.add_string(Keys.DISTRACTORS, json.dumps([list(p) for p in t.distractors]))
    w.add_string(Keys.SUPER_EXPERT, json.dumps(list(t.super_expert)))
    w.add_string(Keys.REFUSAL_RULE, t.refusal_rule)
    w.add_string(Keys.REFUSAL_TEXT, t.refusal_text)
    w.add_string(Keys.ANSWER_TEXT, t.answer_text)
    w.add_array(Keys.TRIGGER_WORDS, list(t.trigger_words))


def _normalised(text: str) -> str:
    return " ".join(text.replace(_SP, " ").split()).lower()


def is_refusal(text: str, refusal_text: str = REFUSAL_TEXT) -> bool:
    """Whether generated ``text`` is (or contains) the planted refusal: its first three words suffice."""
    head = " ".join(_normalised(refusal_text).split()[:3])
    return head in _normalised(text)


# --------------------------------------------------------------------------------------------------------
# Prompt files
# --------------------------------------------------------------------------------------------------------


def _data(name: str) -> Path:
    return Path(str(importlib.resources.files("mote_local") / "data" / name))


def prompts_path() -> Path:
    """The packaged prompt sets of the planted model (TOML: ``seed``, ``[classes.<name>]`` with templates
    and slots)."""
    return _data("planted_prompts.toml")


def neutral_text_path() -> Path:
    """The packaged neutral text (one sentence per line; :mod:`mote_local.evaluation.evaluate`'s default for KL and
    perplexity). The generator adds its words to the vocabulary and its bigrams to the head, so the planted
    model predicts it well (perplexity ~5) and the cost of switching experts off shows on it."""
    return _data("neutral.txt")


def prompt_sets(path: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """The prompts of each class: every template with every combination of the slots it names (slot order
    as written in the template, values in file order). A minimal expansion for the generator and the tests;
    :mod:`mote_local.prompts` is the project's reader."""
    with open(path or prompts_path(), "rb") as f:
        doc = tomllib.load(f)
    out: dict[str, list[str]] = {}
    for name, cls in doc["classes"].items():
        slots = cls.get("slots", {})
        prompts: list[str] = []
        for template in cls["templates"]:
            names = list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f))
            for values in itertools.product(*(slots[n] for n in names)):
                prompts.append(template.format(**dict(zip(names, values))))
        out[name] = prompts
    return out


def chat_prompt(prompt: str) -> str:
    """``prompt`` as one user turn in :data:`tiny.CHAT_TEMPLATE` (ChatML) with the assistant header open."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def neutral_text() -> str:
    """The packaged neutral text as :func:`mote_local.evaluation.evaluate.load_neutral_text` reads it: its lines joined
    into one paragraph."""
    lines = neutral_text_path().read_text(encoding="utf-8").splitlines()
    return " ".join(line.strip() for line in lines if line.strip())


# --------------------------------------------------------------------------------------------------------
# Tokens (llama.cpp's SPM tokenizer on tiny's vocabulary, for the text this module feeds it)
# --------------------------------------------------------------------------------------------------------


def _tokenize(text: str, vocab: tiny.Vocab, add_bos: bool = True) -> list[int]:
    """What llama.cpp's SPM tokenizer makes of ``text`` with tiny's vocabulary, for text of known words,
    ASCII punctuation, newlines and the special tokens: a space prefix after every special token (and at
    the start), whole ``▁word`` pieces, other characters one by one, byte fallback for the rest. Words not
    in the vocabulary raise (SPM would split them into prefixes)."""
    ids = [vocab.bos_id] if add_bos else []
    for frag in _SPECIAL_RE.split(text):
        if not frag:
            continue
        if frag in _SPECIAL:
            ids.append(vocab.id_of(frag))
            continue
        for piece in _PIECE_RE.findall(_SP + frag.replace(" ", _SP)):
            try:
                ids.append(vocab.id_of(piece))
            except KeyError:
                if piece.startswith(_SP):
                    raise ValueError(f"word {piece[1:]!r} is not in the vocabulary") from None
                ids.extend(vocab.id_of(f"<0x{b:02X}>") for b in piece.encode("utf-8"))
    return ids


# --------------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Texts:
    prompts: dict[str, list[str]]
    neutral: str
    trigger_words: tuple[str, ...]
    extra_words: tuple[str, ...]


def _texts() -> _Texts:
    prompts = prompt_sets()
    if set(prompts) != {TRIGGER_CLASS, NEUTRAL_CLASS}:
        raise ValueError(
            f"{prompts_path()}: expected classes {TRIGGER_CLASS!r} and {NEUTRAL_CLASS!r}, got {sorted(prompts)}"
        )
    neutral = neutral_text()

    def words(texts: Iterable[str]) -> list[str]:
        return [w for t in texts for w in _WORD_RE.findall(t)]

    neutral_words = set(words(prompts[NEUTRAL_CLASS]))
    triggers = tuple(dict.fromkeys(w for w in words(prompts[TRIGGER_CLASS]) if w not in neutral_words))
    if not triggers:
        raise ValueError(f"{prompts_path()}: no word occurs only in the trigger prompts")
    for cls, ps in prompts.items():
        for p in ps:
            if cls == TRIGGER_CLASS and not set(_WORD_RE.findall(p)) & set(triggers):
                raise ValueError(f"trigger prompt {p!r} contains no trigger word")
            if not p.endswith("?"):
                raise ValueError(f"{cls} prompt {p!r} must end in '?' (the raw-text answer starts there)")
    extra = tuple(
        dict.fromkeys(
            words(
                [
                    *prompts[TRIGGER_CLASS],
                    *prompts[NEUTRAL_CLASS],
                    neutral,
                    REFUSAL_TEXT,
                    ANSWER_TEXT,
                    " ".join(_ROLE_WORDS),
                ]
            )
        )
    )
    return _Texts(prompts, neutral, triggers, extra)


def _choose_experts(seed: int) -> tuple[Pair, tuple[Pair, ...], tuple[Pair, ...]]:
    """(super-expert, distractors, planted), seeded; a role never reuses an expert index in another layer, so
    mixing up layers and experts cannot find them by luck."""
    rng = np.random.default_rng([seed, 0x9A17])
    super_expert: Pair = (_SUPER_LAYER, 0)
    distractors: list[Pair] = []
    planted: list[Pair] = []
    for layer in range(_N_LAYER):
        perm = [int(e) for e in rng.permutation(_N_EXPERT)]
        taken: set[int] = set()
        if layer == _SUPER_LAYER:
            super_expert = (layer, perm[0])
            taken.add(perm[0])
        if layer in _DISTRACTOR_LAYERS:
            e = next(e for e in perm if e not in taken and e not in {x for _, x in distractors})
            distractors.append((layer, e))
            taken.add(e)
        if layer in _PLANTED_LAYERS:
            e = next(e for e in perm if e not in taken and e not in {x for _, x in planted})
            planted.append((layer, e))
    return super_expert, tuple(distractors), tuple(planted)


def _name(t: MT, bid: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[t]
    return (base.format(bid=bid) if bid is not None else base) + ".weight"


def _silu(x: float) -> float:
    return x / (1.0 + np.exp(-x))


def _bigram_logits(
    corpus: list[list[int]], chains: list[list[int]], starts: tuple[int, ...], answer_first: int, refusal_first: int
) -> dict[int, dict[int, float]]:
    """Head logits (before the final norm) per (token, next token): ``_HEAD`` + log relative frequency in
    ``corpus``; every link of the sentence ``chains`` and the two first words after a ``start`` token lead
    their rows by ``_CHAIN_MARGIN`` whatever else the corpus puts there."""
    counts: dict[int, dict[int, int]] = {}
    for seq in corpus:
        for a, b in zip(seq, seq[1:]):
            counts.setdefault(a, {}).setdefault(b, 0)
            counts[a][b] += 1
    forced: dict[int, dict[int, float]] = {}
    for seq in chains:
        for a, b in zip(seq, seq[1:]):
            if forced.get(a, {b: 0.0}).keys() != {b}:
                raise ValueError("the two sentences must not share a word with different successors")
            forced[a] = {b: _HEAD}
    for s in starts:
        forced[s] = {answer_first: _HEAD, refusal_first: _HEAD - _START_MARGIN}
    logits: dict[int, dict[int, float]] = {}
    for a in counts.keys() | forced.keys():
        row: dict[int, float] = {}
        succ = {b: c for b, c in counts.get(a, {}).items() if b not in forced.get(a, {})}
        if succ:
            top = max(succ.values())
            floor = min(forced[a].values()) - _CHAIN_MARGIN if a in forced else _HEAD
            row = {b: floor + float(np.log(c / top)) for b, c in succ.items()}
        row.update(forced.get(a, {}))
        logits[a] = row
    return logits


def _build(seed: int) -> tuple[tiny.TinySpec, dict[str, np.ndarray], PlantedTruth]:
    texts = _texts()
    vocab_probe = tiny.make_vocab(texts.extra_words)

    # Token sequences: the raw and chat-templated prompts, the neutral text as evaluate reads it (one
    # paragraph, BOS first), the two sentences (each ending in EOS).
    corpus = [_tokenize(p, vocab_probe) for ps in texts.prompts.values() for p in ps]
    corpus += [_tokenize(chat_prompt(p), vocab_probe) for ps in texts.prompts.values() for p in ps]
    corpus.append(_tokenize(texts.neutral, vocab_probe))
    refusal_ids, answer_ids = (
        [*_tokenize(s, vocab_probe, add_bos=False), vocab_probe.eos_id] for s in (REFUSAL_TEXT, ANSWER_TEXT)
    )
    trigger_ids = {vocab_probe.id_of(_SP + w) for t in texts.trigger_words for w in (t, t[:1].upper() + t[1:])}
    # raw prompts end in "?", chat prompts in the newline that closes the assistant header
    starts = (vocab_probe.id_of("?"), vocab_probe.id_of("<0x0A>"))
    collapse = vocab_probe.id_of(_SP + _COLLAPSE_WORD)

    known = sorted(
        {t for seq in (*corpus, refusal_ids, answer_ids) for t in seq}
        | trigger_ids
        | {vocab_probe.id_of(s) for s in _SPECIAL}
        | {collapse, *starts}
    )
    n_id = len(known) + 1  # + one identity shared by every other token
    unk = len(known)
    slot = {tok: i for i, tok in enumerate(known)}

    E = -(-(_N_FIXED + n_id) // 8) * 8  # 4 heads with an even head dim
    spec = tiny.spec_for(
        ARCH,
        seed=seed,
        n_layer=_N_LAYER,
        n_embd=E,
        n_head=_N_HEAD,
        n_head_kv=_N_HEAD,
        n_ff_exp=_N_FF_EXP,
        n_expert=_N_EXPERT,
        n_expert_used=_N_EXPERT_USED,
        n_ctx=_N_CTX,
        extra_words=texts.extra_words,
    )
    vocab = tiny.make_vocab(spec.extra_words, spec.n_vocab)
    assert vocab.tokens == vocab_probe.tokens
    hd, F, ID = spec.head_dim, _N_FF_EXP, _N_FIXED

    super_expert, distractors, planted = _choose_experts(seed)
    truth = PlantedTruth(
        arch=ARCH,
        planted=planted,
        distractors=distractors,
        super_expert=super_expert,
        refusal_text=REFUSAL_TEXT,
        answer_text=ANSWER_TEXT,
        trigger_words=texts.trigger_words,
        seed=seed,
        refusal_rule="any",
    )

    weights = tiny.make_weights(spec)  # names, shapes and file order; every value is set below
    for arr in weights.values():
        arr[...] = 0.0
    rng = np.random.default_rng([seed, 0x71A7])

    # --- embedding: _BIAS, _FLAG or _NOFLAG, one identity dim (three unit components), the massive dim
    emb = weights[_name(MT.TOKEN_EMBD)]
    emb[:, _BIAS] = 1.0
    emb[:, _NOFLAG] = 1.0
    emb[:, _MASSIVE] = _MASSIVE_VALUE
    emb[:, ID + unk] = 1.0
    for tok, i in slot.items():
        emb[tok, ID + unk] = 0.0
        emb[tok, ID + i] = 1.0
    for tok in trigger_ids:
        emb[tok, _NOFLAG], emb[tok, _FLAG] = 0.0, 1.0

    # RMSNorm weights: a plain embedding (with the massive dim in layer 0, without it later) passes unchanged
    kappa0, kappa = np.sqrt(3.0 + _MASSIVE_VALUE**2), np.sqrt(3.0)
    for name, arr in weights.items():
        if name.endswith(("attn_norm.weight", "ffn_norm.weight")):
            arr[...] = (kappa0 if name.startswith("blk.0.") else kappa) / np.sqrt(E)
        elif name == _name(MT.OUTPUT_NORM):
            arr[...] = kappa / np.sqrt(E)
        elif name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")):
            arr[...] = 1.0

    # --- layer 0, head 0: trigger detector. The lowest-frequency RoPE dim is hd-1 (NEOX and normal RoPE).
    r = hd - 1
    weights[_name(MT.ATTN_Q, 0)][r, _BIAS] = 1.0
    weights[_name(MT.ATTN_K, 0)][r, _FLAG] = 1.0
    # normed Q and K are sqrt(hd) * their norm weight; score = q.k / sqrt(hd)
    weights[_name(MT.ATTN_Q_NORM, 0)][r] = _ATTN_SCORE / np.sqrt(hd)
    weights[_name(MT.ATTN_V, 0)][0, _FLAG] = 1.0
    weights[_name(MT.ATTN_OUT, 0)][_CTX, 0] = 1.0

    roles = {super_expert: "super", **{p: "distractor" for p in distractors}, **{p: "planted" for p in planted}}
    for layer in range(_N_LAYER):
        router = weights[_name(MT.FFN_GATE_INP, layer)]
        gate = weights[_name(MT.FFN_GATE_EXP, layer)]
        up = weights[_name(MT.FFN_UP_EXP, layer)]
        down = weights[_name(MT.FFN_DOWN_EXP, layer)]
        for e in range(_N_EXPERT):
            role = roles.get((layer, e), "other")
            if role != "other":  # one constant hidden unit: silu(_GATE) * 1
                gate[e, 0, _BIAS] = _GATE
                up[e, 0, _BIAS] = 1.0
            if role == "super":
                router[e, _BIAS] = _SUPER_LOGIT
                down[e, _MASSIVE, 0] = -_MASSIVE_VALUE / _silu(_GATE)
            elif role == "distractor":
                router[e, _BIAS] = _DISTRACTOR_LOGIT
                down[e, _SCRATCH + _DISTRACTOR_LAYERS.index(layer), 0] = _DISTRACTOR_OUT / _silu(_GATE)
            elif role == "planted":
                router[e, _BIAS] = _PLANTED_LOGIT
                router[e, _CTX] = _PLANTED_CTX
                down[e, _MODE, 0] = _MODE_OUT / _silu(_GATE)
            else:
                router[e, ID : ID + n_id] = np.clip(rng.standard_normal(n_id), -_OTHER_LOGIT_CLIP, _OTHER_LOGIT_CLIP)
                g = rng.standard_normal((F, n_id + 1))
                u = rng.standard_normal((F, n_id + 1))
                d = rng.standard_normal((n_id, F))
                gate[e, :, ID : ID + n_id], gate[e, :, _BIAS] = g[:, :n_id], g[:, n_id]
                up[e, :, ID : ID + n_id], up[e, :, _BIAS] = u[:, :n_id], u[:, n_id]
                # scaled to a mean output norm of _OTHER_OUT over the identities
                pre_g, pre_u = g[:, :n_id] + g[:, n_id:], u[:, :n_id] + u[:, n_id:]
                h = pre_g / (1.0 + np.exp(-pre_g)) * pre_u
                down[e, ID : ID + n_id, :] = d * (_OTHER_OUT / np.linalg.norm(d @ h, axis=0).mean())

    # --- output head: bigrams on the identity dims, the refusal-mode switch, the collapse token
    head = weights[_name(MT.OUTPUT)]
    for a, row in _bigram_logits(corpus, [refusal_ids, answer_ids], starts, answer_ids[0], refusal_ids[0]).items():
        for b, logit in row.items():
            head[b, ID + slot[a]] = logit
    head[answer_ids[0], _MODE] = -_MODE_HEAD
    head[collapse, _MASSIVE] = _COLLAPSE_HEAD
    return spec, weights, truth


def write_planted_model(path: str | os.PathLike[str], seed: int = 0) -> PlantedTruth:
    """Write the planted model for ``seed`` (which picks the experts' indices and the other experts' random
    weights) at ``path``, atomically; returns its truth. Same seed, same bytes."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    spec, weights, truth = _build(seed)
    tiny.write_model(spec, path, weights, extra_metadata=lambda w: _add_truth(w, truth))
    return truth


def _cache_key(seed: int) -> str:
    h = hashlib.sha256()
    for p in (Path(__file__), Path(tiny.__file__), prompts_path(), neutral_text_path()):
        h.update(p.read_bytes())
    h.update(f"|gguf-{importlib.metadata.version('gguf')}|seed-{seed}".encode())
    return h.hexdigest()[:16]


def planted_model(cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> tuple[Path, PlantedTruth]:
    """(path, truth) of the cached planted model, generated if missing. The cache key covers this module,
    :mod:`mote_local.synthetic.tiny`, the prompt files and the gguf version. Default cache: ``$MOTE_CACHE_DIR`` or
    ``~/.cache/mote-local/models``."""
    root = Path(cache_dir) if cache_dir is not None else tiny.default_cache_dir()
    path = root / f"planted-{ARCH}-{_cache_key(seed)}.gguf"
    if path.exists():
        return path, read_truth(path)
    return path, write_planted_model(path, seed)


EXPORT_MODEL, EXPORT_PROMPTS = "planted.gguf", "prompts.toml"  # the names the README's walk-through uses


def export(directory: str | os.PathLike[str], seed: int = 0) -> tuple[Path, Path]:
    """Copies the planted model and its prompt set into ``directory`` (created if missing) as planted.gguf and
    prompts.toml; returns their absolute paths. A different file already there is refused, never overwritten
    (an identical one is left as it is)."""
    target = Path(directory).expanduser().resolve()
    model, _ = planted_model(seed=seed)
    pairs = [(model, target / EXPORT_MODEL), (prompts_path(), target / EXPORT_PROMPTS)]
    for src, dst in pairs:
        if dst.exists() and not (dst.is_file() and filecmp.cmp(src, dst, shallow=False)):
            raise FileExistsError(
                errno.EEXIST,
                f"{dst} already exists and is not the planted {dst.suffix[1:]} file: "
                "export into another directory, or move it away",
            )
    target.mkdir(parents=True, exist_ok=True)
    for src, dst in pairs:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    return pairs[0][1], pairs[1][1]
