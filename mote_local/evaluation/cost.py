"""Capability cost on neutral text: KL(unsteered || steered) of next-token distributions and perplexity,
from full logits, log-softmax in float64, in bounded row blocks."""

from __future__ import annotations

import importlib.resources
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mote_local.engine.batch import logits_many
from mote_local.engine.model import Model, Session
from mote_local.errors import EvalError
from mote_local.steering.entries import Entry
from mote_local.steering.profile import Profile

_ROW_BLOCK = 64  # rows of float64 log-softmax at a time: bounded memory on large vocabularies


def load_neutral_text(source: str | os.PathLike | None = None) -> str:
    """The neutral text: the packaged default (``mote_local/data/neutral.txt``, one sentence per line, joined
    into one paragraph) or a file's contents as they are."""
    if source is None:
        text = importlib.resources.files("mote_local").joinpath("data", "neutral.txt").read_text(encoding="utf-8")
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    p = Path(source)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"neutral text file not found: {p}") from None
    except UnicodeDecodeError:
        raise EvalError(f"{p} is not UTF-8 text") from None
    if not text.strip():
        raise EvalError(f"the neutral text file {p} is empty")
    return text


def resolve_text(text: str | os.PathLike | None) -> tuple[str, str]:
    """(text, where it came from): a PathLike is a file, a str is the text itself, None the default."""
    if text is None:
        return load_neutral_text(), "mote_local/data/neutral.txt"
    if isinstance(text, os.PathLike):
        return load_neutral_text(text), str(text)
    if not isinstance(text, str) or not text.strip():
        raise EvalError("the neutral text is empty")
    return text, "given text"


def n_ctx_train(model: Model) -> int:
    value = model.metadata.get(f"{model.layout.arch}.context_length")
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def text_chunks(model: Model, text: str, chunk_tokens: int, max_tokens: int) -> list[list[int]]:
    """The text's tokens (BOS first, at most max_tokens) in chunks of at most chunk_tokens, each opening with
    BOS when the model uses one; every chunk has at least 2 tokens."""
    toks = model.tokenize(text, add_bos=True)[:max_tokens]
    bos = model.bos_token
    has_bos = bool(toks) and toks[0] == bos and bos >= 0
    body = toks[1:] if has_bos else toks
    step = chunk_tokens - 1 if has_bos else chunk_tokens
    chunks = []
    for i in range(0, len(body), step):
        c = ([bos] if has_bos else []) + body[i : i + step]
        if len(c) >= 2:
            chunks.append(c)
    if not chunks:
        raise EvalError("the neutral text is too short: it needs at least 2 tokens")
    return chunks


def _log_softmax64(block: np.ndarray) -> np.ndarray:
    x = block.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


class CostSums:
    """Sums of KL and next-token NLL over positions."""

    def __init__(self):
        self.kl_sum = 0.0
        self.kl_n = 0
        self.nll_sum = 0.0
        self.nll_n = 0

    def add(self, ref: np.ndarray, logits: np.ndarray, tokens: Sequence[int]) -> None:
        n = len(tokens)
        nxt = np.asarray(tokens[1:], dtype=np.int64)
        for a in range(0, n, _ROW_BLOCK):
            b = min(n, a + _ROW_BLOCK)
            lq = _log_softmax64(logits[a:b])
            lp = lq if ref is logits else _log_softmax64(ref[a:b])
            p = np.exp(lp)
            with np.errstate(invalid="ignore"):
                terms = np.where(p > 0, p * (lp - lq), 0.0)
            self.kl_sum += float(terms.sum())
            self.kl_n += b - a
            rows = np.arange(a, min(b, n - 1))
            if len(rows):
                self.nll_sum -= float(lq[rows - a, nxt[rows]].sum())
                self.nll_n += len(rows)

    @property
    def kl(self) -> float | None:
        return max(0.0, self.kl_sum / self.kl_n) if self.kl_n else None

    @property
    def perplexity(self) -> float | None:
        if not self.nll_n:
            return None
        mean = self.nll_sum / self.nll_n
        return math.exp(mean) if mean < 700 else math.inf  # a -inf logit on a true token: infinite


def capability_cost(
    session: Session, chunks: Sequence[Sequence[int]], conditions: Mapping[str, tuple[Sequence[Entry], float]]
) -> dict[str, tuple[float | None, float | None]]:
    """{condition: (mean KL(unsteered ‖ steered), perplexity)} over the chunks' positions (None: no positions).

    ``conditions`` maps a name to (entries, strength); the unsteered reference is computed here, once per chunk.
    Each chunk's reference and its steered runs decode together, as many per decode call as the session's
    sequences and memory allow (:func:`mote_local.engine.batch.logits_many`), each in the prefill phase.
    """
    costs = {name: CostSums() for name in conditions}
    steered = [(name, Profile(tuple(entries), strength)) for name, (entries, strength) in conditions.items() if entries]
    sequences: list[tuple[Sequence[int], Profile | None]] = []
    for chunk in chunks:
        sequences.append((chunk, None))
        sequences += [(chunk, profile) for _, profile in steered]
    per_chunk = 1 + len(steered)
    ref: np.ndarray  # the chunk's unsteered logits: logits_many yields them before its steered ones
    for j, logits in logits_many(session, sequences):
        chunk = chunks[j // per_chunk]
        if j % per_chunk == 0:
            ref = logits
            for name, (entries, _) in conditions.items():
                if not entries:
                    costs[name].add(ref, ref, chunk)
        else:
            costs[steered[j % per_chunk - 1][0]].add(ref, logits, chunk)
    return {name: (c.kl, c.perplexity) for name, c in costs.items()}
