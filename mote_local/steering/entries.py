"""Steering entries: which expert of which MoE layer is switched off, forced on, biased or scaled."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from mote_local import binding
from mote_local.errors import SteeringError


class Mode(str, Enum):
    MASK = "mask"  # never selected; the token gets its next-best expert
    DROP = "drop"  # selected as usual, weight zeroed before top-k normalisation (served by k-1)
    FORCE = "force"  # selected for every token: router logit lifted to the best remaining one + epsilon
    BIAS = "bias"  # additive router-logit bias before gating (scaled by strength); -inf == mask
    GAIN = "gain"  # expert output multiplied by value >= 0 after weighting and normalisation


class Scope(str, Enum):
    """When an entry applies; the session switches the engine's steering between decode calls."""

    ALL = "all"
    PREFILL = "prefill"  # while the prompt is processed
    DECODE = "decode"  # while tokens are generated
    THINKING = "thinking"  # while generating inside the model's think markers


def applies_in(scope: Scope, phase: Scope) -> bool:
    """Whether an entry of `scope` is in effect during `phase` (thinking is decoding too)."""
    return scope in (Scope.ALL, phase) or (phase is Scope.THINKING and scope is Scope.DECODE)


VALUED_MODES = (Mode.BIAS, Mode.GAIN)
FLOAT32_MAX = 3.4028234663852886e38  # the engine holds values as 32-bit floats


@dataclass(frozen=True, order=True)
class Entry:
    """One steering entry, checked on its own where it is made: layer and expert are integers, the value fits
    the engine's 32-bit float, mask, drop and force carry none, a bias is finite or -inf and a gain finite and
    >= 0. The engine holds the value rules too (:mod:`mote_local.steering.rules` asks it for every set); they
    are checked here as well so that an entry read from a profile file, a flag or a chat command is refused
    where it is read, and the error names that place."""

    layer: int
    expert: int
    mode: Mode
    value: float = 0.0
    scope: Scope = Scope.ALL

    def __post_init__(self):
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "scope", Scope(self.scope))
        for name in ("layer", "expert"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SteeringError(f"{name} must be an integer, got {v!r}")
        value = float(self.value)
        if self.mode is Mode.BIAS and (math.isnan(value) or value == math.inf):
            raise SteeringError(f"bias for layer {self.layer} expert {self.expert} must be finite or -inf, got {value}")
        if self.mode is Mode.GAIN and not (math.isfinite(value) and value >= 0):
            raise SteeringError(
                f"gain for layer {self.layer} expert {self.expert} must be a finite number >= 0, got {value}"
            )
        if math.isfinite(value) and abs(value) > FLOAT32_MAX:
            raise SteeringError(
                f"{self.mode.value} {value:g} for layer {self.layer} expert {self.expert} is beyond "
                f"the engine's 32-bit float range (±{FLOAT32_MAX:.4g})"
            )
        if self.mode not in VALUED_MODES and value != 0.0:
            raise SteeringError(f"{self.mode.value} takes no value (layer {self.layer} expert {self.expert})")
        object.__setattr__(self, "value", value)

    def native(self) -> tuple[int, int, int, float, int]:
        return (
            self.layer,
            self.expert,
            binding.MODE_CODES[self.mode.value],
            self.value,
            binding.SCOPE_CODES[self.scope.value],
        )

    def __str__(self) -> str:
        """The entry as people read it: its mode, then LAYER:EXPERT[=VALUE] as steering.spec parses it, then the
        scope when not all (``drop 1:6``, ``bias 2:0=-5``, ``force 3:1@decode``, ``mask 0:3``)."""
        value = f"={self.value:g}" if self.mode in VALUED_MODES else ""
        scope = "" if self.scope is Scope.ALL else f"@{self.scope.value}"
        return f"{self.mode.value} {self.layer}:{self.expert}{value}{scope}"

    def switches_off(self, strength: float = 1.0) -> bool:
        """Whether this entry takes the expert out of the token's experts: mask, drop, or a -inf bias at positive
        strength (the engine scales biases by strength)."""
        return self.mode in (Mode.MASK, Mode.DROP) or (
            self.mode is Mode.BIAS and self.value == -math.inf and strength > 0
        )


def off_experts(entries: Iterable[Entry], strength: float = 1.0) -> list[tuple[int, int]]:
    """The (layer, expert) pairs that the entries switch off, sorted."""
    return sorted({(e.layer, e.expert) for e in entries if e.switches_off(strength)})
