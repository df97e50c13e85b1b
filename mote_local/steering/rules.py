"""The steering rules are the engine's: native/mote-api.cpp holds them once (modes that combine on one
expert, per-layer limits, values, scopes) and every Python path asks it here, before anything is applied.
Python itself checks only types and the file schemas."""

from __future__ import annotations

from typing import Iterable

from mote_local import binding
from mote_local.errors import SteeringError
from mote_local.modelfile.layout import MoeLayout
from mote_local.steering.entries import Entry

__all__ = ["check", "name_model", "shape_of"]


def shape_of(layout: MoeLayout) -> dict:
    """The router shape a model file declares (what the engine checks entries against without loading it)."""
    layout = layout.require_moe()
    return {"n_layer": layout.n_layer, "n_expert": layout.n_expert, "n_expert_used": layout.n_expert_used,
            "n_expert_groups": layout.n_expert_groups, "n_group_used": layout.n_group_used,
            "moe_layers": set(layout.moe_layers)}


def check(entries: Iterable[Entry], strength: float = 1.0, layout: MoeLayout | None = None, *,
          error: type[SteeringError] = SteeringError) -> None:
    """Raises `error` with the engine's reason when the entries (every scope, scaled by `strength`) break a
    steering rule; with a layout, also its ranges and per-layer limits."""
    problem = binding.steer_check(None if layout is None else shape_of(layout), [e.native() for e in entries],
                                  strength)
    if problem:
        raise error(name_model(problem, layout.path.name if layout is not None else None))


def name_model(message: str, name: str | None) -> str:
    """The engine's message with "this model" replaced by the model's file name, when known."""
    return message.replace("this model", name) if name else message
