"""The steering text syntax shared by the CLI flags, the chat commands and request fields:
``off``/``drop``/``force`` take ``LAYER:EXPERT[,...]``, ``bias``/``gain`` take ``LAYER:EXPERT=VALUE[,...]``."""

from __future__ import annotations

import re

from mote_local.errors import ProfileError, SteeringError
from mote_local.steering.entries import VALUED_MODES, Entry, Mode, Scope

__all__ = ["SPEC_KINDS", "parse_spec"]

#: CLI flag kind -> mode (``--off`` is the user's word for mask)
SPEC_KINDS: dict[str, Mode] = {
    "off": Mode.MASK,
    "drop": Mode.DROP,
    "force": Mode.FORCE,
    "bias": Mode.BIAS,
    "gain": Mode.GAIN,
}


def parse_spec(kind: str, text: str, scope: Scope | str = Scope.ALL, *, flag: str | None = None) -> list[Entry]:
    """Entries from a flag value: ``off``/``drop``/``force`` take ``LAYER:EXPERT[,LAYER:EXPERT...]``,
    ``bias``/``gain`` take ``LAYER:EXPERT=VALUE[,...]`` (a bias may be ``-inf``). Errors name the input as the user
    typed it: ``flag`` (default ``--KIND``, the CLI's; the chat passes ``/KIND``)."""
    if kind not in SPEC_KINDS:
        raise ProfileError(f"unknown steering flag --{kind}; expected one of {', '.join('--' + k for k in SPEC_KINDS)}")
    try:
        scope = Scope(scope)
    except ValueError:
        raise ProfileError(f"unknown scope {scope!r}; expected one of {', '.join(s.value for s in Scope)}") from None
    flag = flag or f"--{kind}"
    mode = SPEC_KINDS[kind]
    valued = mode in VALUED_MODES
    form = "LAYER:EXPERT=VALUE" if valued else "LAYER:EXPERT"
    example = {"bias": "3:17=-2.5", "gain": "3:17=0.5"}.get(kind, "3:17,4:2")

    def bad(item: str, why: str) -> ProfileError:
        return ProfileError(
            f"{flag} {item!r}: {why}; expected {form}[,{form}...] (LAYER:EXPERT[=VALUE]), e.g. {flag} {example}"
        )

    if not text.strip():
        raise bad(text, "empty")
    entries = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            raise bad(text, "empty item (a stray comma?)")
        target, eq, raw = item.partition("=")
        if valued and not eq:
            raise bad(item, "a value is required")
        if eq and not valued:
            raise bad(item, f"{flag} takes no value")
        layer, colon, expert = (s.strip() for s in target.partition(":"))
        if not colon:
            raise bad(item, "missing ':' between layer and expert")
        for what, digits in (("layer", layer), ("expert", expert)):
            if not re.fullmatch(r"[0-9]+", digits):
                raise bad(item, f"{what} {digits!r} is not a non-negative integer")
        value = 0.0
        if valued:
            try:
                value = float(raw)
            except ValueError:
                raise bad(item, f"{raw.strip()!r} is not a number") from None
        try:
            entries.append(Entry(int(layer), int(expert), mode, value, scope))
        except SteeringError as err:
            raise bad(item, str(err)) from None
    return entries
