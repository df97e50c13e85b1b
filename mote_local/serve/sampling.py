"""Per-request token choice and text: OpenAI's sampling fields over one row of logits, and the incremental
detokenizer that turns a request's tokens into streamed text and finds its stop strings.

Each request owns its sampler and random generator, so its output does not depend on which requests it is
batched with: greedy (temperature 0) is argmax, and a seeded request draws the same tokens alone or batched.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

__all__ = ["Sampler", "SamplingParams", "TextStream"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0: off
    seed: int | None = None              # None: a fresh random seed
    presence_penalty: float = 0.0        # over the completion's tokens, as OpenAI defines them
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)


class Sampler:
    """Chooses a request's next tokens from its logits rows."""

    def __init__(self, params: SamplingParams):
        self.params = params
        seed = None if params.seed is None else params.seed % 2**64
        self._rng = np.random.default_rng(seed)
        self._counts: dict[int, int] = {}
        bias = params.logit_bias
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias_values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def sample(self, logits: np.ndarray) -> int:
        p = self.params
        if len(self._bias_ids) or (self._counts and (p.presence_penalty or p.frequency_penalty)):
            logits = logits.astype(np.float32, copy=True)
            logits[self._bias_ids] += self._bias_values
            if self._counts:
                ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
                counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
                logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        if p.temperature <= 0:
            token = int(np.argmax(logits))
        else:
            token = self._draw(logits)
        self._counts[token] = self._counts.get(token, 0) + 1
        return token

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        candidates = np.arange(len(logits))
        values = np.asarray(logits, dtype=np.float64)
        if 0 < p.top_k < len(values):
            candidates = np.argpartition(values, -p.top_k)[-p.top_k:]
            values = values[candidates]
        order = np.argsort(-values, kind="stable")
        candidates, values = candidates[order], values[order]
        values = (values - values[0]) / p.temperature
        probs = np.exp(values)
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
        return int(candidates[self._rng.choice(len(probs), p=probs)])


class TextStream:
    """A request's completion text, token by token: what can be sent now, and whether a stop string ended it.

    Decodes the tokens' bytes incrementally (a character whose bytes span tokens comes out once complete),
    holds back text while its end could be the start of a stop string, and cuts the text before the first
    stop string.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str] = ()):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.stop = [s for s in stop if s]
        self.text = ""   # the text so far (cut at a stop string)
        self._sent = 0   # characters of self.text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Adds a token; returns the text that may be sent now (sets ``stopped`` at a stop string)."""
        if not self.stopped:
            self.text += self._utf8.decode(self._token_bytes(token))
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text, at the end of the completion (an incomplete character as U+FFFD)."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        start = max(0, self._sent - max((len(s) for s in self.stop), default=0))
        cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            out, self._sent = self.text[self._sent:], len(self.text)
            return out
        end = len(self.text)
        if not final and self.stop:
            end -= _held_back(self.text, self.stop)
        end = max(end, self._sent)
        out, self._sent = self.text[self._sent:end], end
        return out


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (it may yet become one)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
