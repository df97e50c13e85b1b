"""The super-expert guard: :func:`find_super_experts` switches every expert off alone and measures the KL
it causes on neutral text; experts far above the median are flagged (the few experts a model cannot lose).
A full scan costs a forward pass per expert (thousands on a real model), so :func:`check_super_experts` measures
only the experts a command is about to switch off, against a few random experts as the reference.
Results are cached per model file; :func:`cached_super_experts` reads the cache without recomputing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mote_local.atomic import atomic_write_text
from mote_local.cache import cache_dir
from mote_local.engine.model import Model, opened
from mote_local.errors import EvalError
from mote_local.evaluation.cost import CostSums, resolve_text
from mote_local.modelfile.layout import read_layout
from mote_local.progress import progress_bar
from mote_local.steering.entries import VALUED_MODES, Entry, Mode

SUPER_FORMAT = "mote-super-experts"
SUPER_VERSION = 1


@dataclass
class SuperExperts:
    """Per-expert KL(unsteered ‖ one expert switched off) on a text, and the experts flagged as super-experts.

    ``kl`` is [n_layer, n_expert] with NaN where nothing was measured (dense layers, layers not asked for).
    Unpacks as ``kl, flagged = find_super_experts(...)``.
    """

    kl: np.ndarray
    flagged: list[tuple[int, int]]
    median: float
    factor: float
    floor: float
    mode: str
    layers: list[int]
    n_tokens: int
    text_sha256: str
    model: str
    elapsed_s: float = 0.0

    def __iter__(self) -> Iterator[Any]:
        yield self.kl
        yield self.flagged

    @property
    def flagged_set(self) -> set[tuple[int, int]]:
        return set(self.flagged)

    def to_dict(self) -> dict[str, Any]:
        kl = [
            [None if math.isnan(v) else "inf" if math.isinf(v) else float(v) for v in row] for row in self.kl.tolist()
        ]  # not measured: null; JSON has no infinity
        return {
            "kl": kl,
            "flagged": [list(f) for f in self.flagged],
            "median": self.median,
            "factor": self.factor,
            "floor": self.floor,
            "mode": self.mode,
            "layers": list(self.layers),
            "n_tokens": self.n_tokens,
            "text_sha256": self.text_sha256,
            "model": self.model,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SuperExperts:
        kl = np.array(
            [[np.nan if v is None else math.inf if v == "inf" else v for v in row] for row in d["kl"]], dtype=np.float64
        )
        return cls(
            kl=kl,
            flagged=[(int(a), int(b)) for a, b in d["flagged"]],
            median=float(d["median"]),
            factor=float(d["factor"]),
            floor=float(d["floor"]),
            mode=str(d["mode"]),
            layers=[int(x) for x in d["layers"]],
            n_tokens=int(d["n_tokens"]),
            text_sha256=str(d["text_sha256"]),
            model=str(d["model"]),
            elapsed_s=float(d.get("elapsed_s", 0)),
        )


def _super_cache_dir() -> Path:
    return cache_dir("super-experts")


def _model_key(model_path: str | os.PathLike) -> dict[str, Any]:
    """The model's files as they are now: the (first) file's resolved path, size and mtime, and those of the other
    shards of a split model, so that a shard replaced since invalidates what was measured."""

    def stat(p: Path) -> tuple[str, int, int]:
        st = p.stat()
        return str(p.resolve()), st.st_size, st.st_mtime_ns

    first, *shards = [stat(f.path) for f in read_layout(model_path).files]
    key: dict[str, Any] = dict(zip(("path", "size", "mtime_ns"), first))
    if shards:
        key["shards"] = [list(s) for s in shards]
    return key


def super_experts_cache_path(model_path: str | os.PathLike) -> Path:
    """Where the super-expert result of a model file is cached (key: resolved path, size, mtime)."""
    key = _model_key(model_path)
    digest = hashlib.sha256(f"{key['path']}|{key['size']}|{key['mtime_ns']}".encode()).hexdigest()[:24]
    return _super_cache_dir() / f"{Path(key['path']).stem}-{digest}.json"


def _read_super_cache(model_path: str | os.PathLike) -> SuperExperts | None:
    try:
        path = super_experts_cache_path(model_path)
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        if doc.get("format") != SUPER_FORMAT or doc.get("version") != SUPER_VERSION:
            return None
        if doc.get("model_key") != _model_key(model_path):
            return None
        return SuperExperts.from_dict(doc["result"])
    except (KeyError, TypeError, ValueError):
        return None


def cached_super_experts(model_path: str | os.PathLike) -> set[tuple[int, int]] | None:
    """The super-experts flagged for this model file by an earlier :func:`find_super_experts` (or, failing
    that, among the experts an earlier :func:`check_super_experts` measured), or None when nothing was cached
    (or the file changed since). Never computes anything."""
    found = _read_super_cache(model_path)
    if found is not None:
        return found.flagged_set
    checks = _read_checks(model_path)
    if checks is None:
        return None
    kl, reference = checks
    return set(_flag(kl, reference, list(kl), CHECK_FACTOR, CHECK_FLOOR)[0])


def find_super_experts(
    model: Model | str | os.PathLike,
    text: str | os.PathLike | None = None,
    *,
    factor: float = 10.0,
    layers: Iterable[int] | None = None,
    mode: Mode | str = Mode.DROP,
    floor: float = 1.0,
    max_tokens: int = 256,
    use_cache: bool = True,
    show_progress: bool | None = None,
    n_threads: int | None = None,
) -> SuperExperts:
    """Switches each expert off alone (every MoE layer × expert, or only ``layers``) and measures the mean
    KL(unsteered ‖ switched off) of next-token distributions over the text's first ``max_tokens`` tokens (the
    neutral text by default). Flags experts whose KL exceeds ``factor`` × the median over the measured experts
    and the absolute ``floor`` (nats; 1.0 — a collapse, not a nudge: always-selected but harmless experts,
    whose loss only re-weights their partner, cost ~0.1–0.2 nats on the planted model and stay unflagged). One
    forward pass of the text per expert; a few hundred tokens are plenty.

    The result is cached as JSON per model file; with ``use_cache`` an earlier result for the same text,
    mode, layers and thresholds is returned without recomputing.
    """
    with opened(model) as m:
        return _find_super_experts(
            m, text, factor, layers, Mode(mode), floor, max_tokens, use_cache, show_progress, n_threads
        )


def _find_super_experts(
    model: Model,
    text,
    factor: float,
    layers,
    mode: Mode,
    floor: float,
    max_tokens: int,
    use_cache: bool,
    show_progress: bool | None,
    n_threads: int | None,
) -> SuperExperts:
    layout = model.layout.require_moe()
    if mode in VALUED_MODES:
        raise EvalError(f"find_super_experts switches experts off or on: mode {mode.value} needs a value")
    if not factor > 0 or not floor >= 0:
        raise EvalError("factor must be > 0 and floor >= 0")
    layers = sorted(set(layout.moe_layers if layers is None else layers))
    bad = [il for il in layers if il not in layout.moe_layers]
    if bad or not layers:
        raise EvalError(
            f"layers {bad or '(none)'}: not MoE layers of {layout.path.name}; its MoE layers are "
            f"{list(layout.moe_layers)}"
        )
    body, _ = resolve_text(text)
    toks = model.tokenize(body, add_bos=True)[:max_tokens]
    if len(toks) < 2:
        raise EvalError("the text is too short: it needs at least 2 tokens")
    text_sha = hashlib.sha256(body.encode("utf-8")).hexdigest()
    if use_cache:
        found = _read_super_cache(model.path)
        if (
            found is not None
            and found.text_sha256 == text_sha
            and found.mode == mode.value
            and found.layers == layers
            and found.n_tokens == len(toks)
            and found.factor == factor
            and found.floor == floor
        ):
            return found
    started = time.perf_counter()
    kl = np.full((layout.n_layer, layout.n_expert), np.nan)
    every = [(il, x) for il in layers for x in range(layout.n_expert)]
    for (il, x), value in _kl_switched_off(
        model, toks, every, mode, "super-expert scan", show_progress, n_threads
    ).items():
        kl[il, x] = value
    flagged, median = _flag({pair: kl[pair] for pair in every}, every, every, factor, floor)
    result = SuperExperts(
        kl=kl,
        flagged=flagged,
        median=median,
        factor=float(factor),
        floor=float(floor),
        mode=mode.value,
        layers=layers,
        n_tokens=len(toks),
        text_sha256=text_sha,
        model=str(model.path),
        elapsed_s=time.perf_counter() - started,
    )
    doc = {
        "format": SUPER_FORMAT,
        "version": SUPER_VERSION,
        "model_key": _model_key(model.path),
        "result": result.to_dict(),
    }
    try:
        atomic_write_text(super_experts_cache_path(model.path), json.dumps(doc) + "\n")
    except OSError as err:  # a read-only cache must not lose the result
        warnings.warn(f"could not cache the super-expert scan: {err}", stacklevel=2)
    return result


def _kl_switched_off(
    model: Model,
    toks: Sequence[int],
    experts: Sequence[tuple[int, int]],
    mode: Mode,
    desc: str,
    show_progress: bool | None,
    n_threads: int | None,
) -> dict[tuple[int, int], float]:
    """{(layer, expert): mean KL(unsteered ‖ that expert alone switched off)} over the tokens' positions."""
    out: dict[tuple[int, int], float] = {}
    with model.session(n_ctx=len(toks) + 8, n_batch=len(toks) + 8, n_threads=n_threads) as s:
        ref = s.logits(toks)
        with progress_bar(len(experts), desc, "expert", show_progress) as bar:
            for il, x in experts:
                s.steer([Entry(il, x, mode)])
                cost = CostSums()
                cost.add(ref, s.logits(toks), toks)
                assert cost.kl is not None  # the callers checked that toks has positions
                out[(il, x)] = cost.kl
                bar.update(1)
    return out


def _flag(
    kl: Mapping[tuple[int, int], float],
    reference: Sequence[tuple[int, int]],
    asked: Sequence[tuple[int, int]],
    factor: float,
    floor: float,
) -> tuple[list[tuple[int, int]], float]:
    """(the asked experts whose KL exceeds factor × the reference experts' median and the floor, that median)."""
    finite = [kl[x] for x in reference if math.isfinite(kl[x])]
    median = float(np.median(finite)) if finite else 0.0
    return sorted((int(il), int(x)) for il, x in asked if kl[(il, x)] > max(factor * median, floor)), median


# the spot check: only the experts a command switches off, against a few random ones
CHECK_FORMAT = "mote-super-expert-checks"
CHECK_VERSION = 1
CHECK_FACTOR, CHECK_FLOOR = 10.0, 1.0
CHECK_TOKENS = 64
CHECK_REFERENCE = 8


@dataclass
class SuperExpertCheck:
    """The verdict on some experts: each one's KL when switched off alone, those flagged as super-experts, and
    the typical expert's KL they were compared with (the median of the reference experts, or of a full scan)."""

    kl: dict[tuple[int, int], float]
    flagged: list[tuple[int, int]]
    median: float


def _checks_cache_path(model_path: str | os.PathLike) -> Path:
    return super_experts_cache_path(model_path).with_suffix(".checks.json")


def _read_checks(
    model_path: str | os.PathLike, text_sha256: str | None = None, n_tokens: int | None = None
) -> tuple[dict[tuple[int, int], float], list[tuple[int, int]]] | None:
    """(measured KLs, reference experts) of earlier spot checks of this model file, or None (none, the file
    changed, or another text or length when one is given)."""
    try:
        doc = json.loads(_checks_cache_path(model_path).read_text(encoding="utf-8"))
        if (
            doc["format"] != CHECK_FORMAT
            or doc["version"] != CHECK_VERSION
            or doc["model_key"] != _model_key(model_path)
        ):
            return None
        if text_sha256 is not None and (doc["text_sha256"], doc["n_tokens"]) != (text_sha256, n_tokens):
            return None
        kl = {_pair(k): float(v) for k, v in doc["kl"].items()}
        reference = [_pair(k) for k in doc["reference"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (kl, reference) if all(x in kl for x in reference) else None


def _pair(key: str) -> tuple[int, int]:
    layer, expert = key.split(":")
    return int(layer), int(expert)


def check_super_experts(
    model: Model,
    experts: Iterable[tuple[int, int]],
    text: str | os.PathLike | None = None,
    *,
    factor: float = CHECK_FACTOR,
    floor: float = CHECK_FLOOR,
    n_reference: int = CHECK_REFERENCE,
    max_tokens: int = CHECK_TOKENS,
    seed: int = 0,
    show_progress: bool | None = None,
    n_threads: int | None = None,
) -> SuperExpertCheck:
    """Which of ``experts`` are super-experts, without scanning every expert.

    A full scan (:func:`find_super_experts`) cached for this model file answers when it measured them all.
    Otherwise each expert is switched off alone (drop) and the KL it causes is measured on the first
    ``max_tokens`` tokens of the neutral text, as is the KL of ``n_reference`` random experts (seeded, the
    same ones every time); an expert is flagged when its KL exceeds ``factor`` × the reference median and the
    ``floor`` (nats), the full scan's rule. Measurements are cached per model file, so a later check of the
    same experts costs nothing.
    """
    layout = model.layout.require_moe()
    asked = sorted(set((int(il), int(x)) for il, x in experts))
    bad = [f"{il}:{x}" for il, x in asked if il not in layout.moe_layers or not 0 <= x < layout.n_expert]
    if bad:
        raise EvalError(
            f"{', '.join(bad)}: not experts of {layout.path.name} (MoE layers "
            f"{list(layout.moe_layers)}, experts 0..{layout.n_expert - 1})"
        )
    full = _read_super_cache(model.path)
    if full is not None and all(np.isfinite(full.kl[x]) for x in asked):
        return SuperExpertCheck(
            {x: float(full.kl[x]) for x in asked}, [x for x in asked if x in full.flagged_set], full.median
        )
    if not asked:
        return SuperExpertCheck({}, [], 0.0)
    body, _ = resolve_text(text)
    toks = model.tokenize(body, add_bos=True)[:max_tokens]
    if len(toks) < 2:
        raise EvalError("the text is too short: it needs at least 2 tokens")
    text_sha = hashlib.sha256(body.encode("utf-8")).hexdigest()
    pool = [(il, x) for il in layout.moe_layers for x in range(layout.n_expert)]
    picks = np.random.default_rng(seed).choice(len(pool), size=min(n_reference, len(pool)), replace=False)
    reference = [pool[i] for i in sorted(picks)]
    kl = (_read_checks(model.path, text_sha, len(toks)) or ({}, []))[0]
    todo = [x for x in dict.fromkeys(reference + asked) if x not in kl]
    if todo:
        kl.update(_kl_switched_off(model, toks, todo, Mode.DROP, "super-expert check", show_progress, n_threads))
        doc = {
            "format": CHECK_FORMAT,
            "version": CHECK_VERSION,
            "model_key": _model_key(model.path),
            "text_sha256": text_sha,
            "n_tokens": len(toks),
            "reference": [f"{il}:{x}" for il, x in reference],
            "kl": {f"{il}:{x}": v for (il, x), v in sorted(kl.items())},
        }
        try:
            atomic_write_text(_checks_cache_path(model.path), json.dumps(doc) + "\n")
        except OSError as err:  # a read-only cache costs a re-measurement next time, nothing else
            warnings.warn(f"could not cache the super-expert check: {err}", stacklevel=2)
    flagged, median = _flag(kl, reference, asked, factor, floor)
    return SuperExpertCheck({x: kl[x] for x in asked}, flagged, median)
