"""Control profiles: the random control of the same size and layer distribution, and forced activation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from mote_local.errors import EvalError
from mote_local.modelfile.layout import MoeLayout
from mote_local.steering.entries import Entry, Mode
from mote_local.steering.profile import Profile, ProfileError


def forced_counterpart(entries: Iterable[Entry], strength: float = 1.0) -> list[Entry]:
    """The experts the entries switch off, forced on instead (each keeps its entry's scope); other entries
    are left out. Empty when nothing is switched off."""
    out = {}
    for e in entries:
        if e.switches_off(strength):
            f = Entry(e.layer, e.expert, Mode.FORCE, scope=e.scope)
            out[(f.layer, f.expert, f.scope)] = f
    return sorted(out.values())


def check_control_entries(entries: Iterable[Entry], layout: MoeLayout, strength: float, what: str) -> None:
    """Raises EvalError when the entries cannot steer the model of ``layout``."""
    try:
        Profile(tuple(entries), strength=strength).validate(layout)
    except ProfileError as err:
        raise EvalError(f"{what}: {err}") from None


def random_control(
    entries: Sequence[Entry],
    layout: MoeLayout,
    seed: int,
    *,
    exclude: Iterable[tuple[int, int]] = (),
    strength: float = 1.0,
) -> list[Entry]:
    """A random control profile for ``entries``, deterministic by ``seed``.

    Each layer gets as many experts as the profile steers there, drawn uniformly without replacement from that
    layer's experts other than the profile's own and those in ``exclude``; each drawn expert takes over all the
    entries (modes, values, scopes) of one of the profile's experts. Draws that the engine would refuse (e.g.
    forced experts spread over too many expert groups) are redrawn.
    """
    layout.require_moe()
    by_expert: dict[tuple[int, int], list[Entry]] = defaultdict(list)
    for e in entries:
        by_expert[(e.layer, e.expert)].append(e)
    per_layer: dict[int, list[int]] = defaultdict(list)
    for layer, expert in sorted(by_expert):
        per_layer[layer].append(expert)
    excluded = set(map(tuple, exclude))
    candidates = {}
    for layer, experts in per_layer.items():
        if layer not in layout.moe_layers:
            raise EvalError(f"layer {layer} is not an MoE layer of {layout.path.name}")
        pool = [x for x in range(layout.n_expert) if x not in experts and (layer, x) not in excluded]
        if len(pool) < len(experts):
            raise EvalError(
                f"layer {layer}: the profile steers {len(experts)} of {layout.n_expert} experts, "
                f"leaving only {len(pool)} others to draw a random control of the same size from"
            )
        candidates[layer] = pool
    rng = np.random.default_rng(seed)
    last_error = None
    for _ in range(100):
        out: list[Entry] = []
        for layer in sorted(per_layer):
            drawn = rng.choice(candidates[layer], size=len(per_layer[layer]), replace=False)
            for src, dst in zip(per_layer[layer], drawn):
                out.extend(Entry(layer, int(dst), e.mode, e.value, e.scope) for e in by_expert[(layer, src)])
        out.sort()
        try:
            check_control_entries(out, layout, strength, "random control")
        except EvalError as err:
            last_error = err
            continue
        return out
    raise EvalError(f"no valid random control in 100 draws (seed {seed}): {last_error}")
