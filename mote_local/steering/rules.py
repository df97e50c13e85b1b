"""The steering rules are the engine's: native/mote-api.cpp holds them once (modes that combine on one
expert, per-layer limits, values, scopes) and every Python path asks it here, before anything is applied.

Python checks types and the file schemas, and each Entry checks its own value where it is made (see
:class:`~mote_local.steering.entries.Entry`): the engine applies those value rules too, but an entry read
from a profile file, a flag or a chat command must be refused where it is read, with the error naming that
place, before it joins a set. Everything that needs the whole set or a model is checked only here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from mote_local import binding
from mote_local.errors import CaptureError, MoteError, SteeringError
from mote_local.modelfile.layout import MoeLayout
from mote_local.steering.entries import Entry

__all__ = ["check", "naming_model", "shape_of"]


def shape_of(layout: MoeLayout) -> dict:
    """The router shape a model file declares (what the engine checks entries against without loading it)."""
    layout = layout.require_moe()
    return {
        "n_layer": layout.n_layer,
        "n_expert": layout.n_expert,
        "n_expert_used": layout.n_expert_used,
        "n_expert_groups": layout.n_expert_groups,
        "n_group_used": layout.n_group_used,
        "moe_layers": set(layout.moe_layers),
    }


def check(
    entries: Iterable[Entry],
    strength: float = 1.0,
    layout: MoeLayout | None = None,
    *,
    error: type[SteeringError] = SteeringError,
) -> None:
    """Raises `error` with the engine's reason when the entries (every scope, scaled by `strength`) break a
    steering rule; with a layout, also its ranges and per-layer limits."""
    shape = None if layout is None else shape_of(layout)
    with naming_model(None if layout is None else layout.path.name, error):
        binding.steer_check(shape, [e.native() for e in entries], strength)


@contextlib.contextmanager
def naming_model(name: str | None, error: type[MoteError] | None = None) -> Iterator[None]:
    """The engine's steering and capture errors inside the block, raised again with "this model" replaced by
    the model's file name when known, and as `error` when given."""
    try:
        yield
    except (SteeringError, CaptureError) as err:
        message = str(err).replace("this model", name) if name else str(err)
        raise (error or type(err))(message) from None
