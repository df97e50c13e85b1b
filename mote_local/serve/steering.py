"""A request's ``steering`` field as a validated Profile: the named profiles the server loaded, inline profile
JSON and the CLI's flag syntax, composed the way ``mote run`` composes ``--profile`` files and flags."""

from __future__ import annotations

import json
from pathlib import Path

from mote_local.errors import ProfileError
from mote_local.modelfile.fingerprint import Fingerprint
from mote_local.modelfile.layout import MoeLayout
from mote_local.serve.types import SteeringRequest
from mote_local.steering.entries import Entry, Scope
from mote_local.steering.profile import FORMAT, VERSION, Profile, compose
from mote_local.steering.spec import SPEC_KINDS, parse_spec

__all__ = ["load_profiles", "request_profile", "steering_key"]

#: the steering of one phase as the scheduler compares it: (entries in effect, strength); () when idle
SteeringKey = tuple


def load_profiles(paths: dict[str, Path], layout: MoeLayout, *, force: bool = False) -> dict[str, Profile]:
    """The server's named profiles, each validated for the model (a file that does not fit is an error)."""
    out = {}
    for name, path in paths.items():
        try:
            out[name] = Profile.load(path).validate(layout, force=force, way_out="pass --force-profile")
        except ProfileError as err:
            raise ProfileError(f"--profile {name}={path}: {err}") from None
    return out


def request_profile(req: SteeringRequest | None, layout: MoeLayout, fingerprint: Fingerprint,
                    named: dict[str, Profile]) -> Profile | None:
    """The composed, validated profile of a request's ``steering``; None for an unsteered request.

    Every error is a ProfileError whose message names the field and then says what the CLI says.
    """
    if req is None:
        return None
    files: list[tuple[str, Profile]] = []
    if isinstance(req.profile, str):
        if req.profile not in named:
            have = ", ".join(sorted(named)) if named else "none (start the server with --profile NAME=FILE)"
            raise ProfileError(f"steering.profile: unknown profile {req.profile!r}; this server has {have}")
        files.append((f"steering.profile {req.profile!r}", named[req.profile]))
    elif req.profile is not None:
        try:
            files.append(("steering.profile", Profile.from_json(json.dumps(req.profile, allow_nan=False))))
        except ValueError as err:  # ProfileError, or a NaN/Infinity the JSON body carried
            raise ProfileError(f"steering.profile: {err}") from None
    entries: list[Entry] = []
    for i, item in enumerate(req.entries):
        entries += _entry(item, req.scope, f"steering.entries[{i}]")
    if not files and not entries and (req.strength is not None or req.scope is not None):
        raise ProfileError("steering: strength and scope need a profile or entries to act on")
    return compose(files, entries, layout, strength=req.strength, force=req.force,
                   way_out="set steering.force to true", fingerprint=fingerprint)


def _entry(item: str | dict, scope: str | None, where: str) -> list[Entry]:
    """Entries of one item of ``steering.entries``: "KIND SPEC" text, or a profile-format entry object."""
    if isinstance(item, str):
        kind, _, spec = item.strip().removeprefix("--").partition(" ")
        if kind not in SPEC_KINDS or not spec.strip():
            raise ProfileError(f"{where}: {item!r}: expected KIND SPEC with KIND one of {', '.join(SPEC_KINDS)}, "
                               "e.g. 'drop 12:17' or 'bias 3:4=-2'")
        try:
            return parse_spec(kind, spec.strip(), Scope(scope or Scope.ALL))
        except ProfileError as err:
            raise ProfileError(f"{where}: {err}") from None
    doc = {"format": FORMAT, "version": VERSION, "entries": [item]}
    try:
        return list(Profile.from_json(json.dumps(doc, allow_nan=False)).entries)
    except ValueError as err:  # the profile format's message names the key: entries[0].mode: ...
        text = str(err)
        raise ProfileError(where + text.removeprefix("entries[0]") if text.startswith("entries[0]")
                           else f"{where}: {text}") from None


def steering_key(profile: Profile | None, phase: Scope) -> SteeringKey:
    """What the engine must hold for this profile in ``phase``: the entries in effect (scoped ``all``, being
    those of one phase) and the strength. Equal keys steer identically; () is unsteered."""
    if profile is None:
        return ()
    entries = tuple(Entry(e.layer, e.expert, e.mode, e.value) for e in profile.for_scope(phase))
    return (entries, profile.strength) if entries else ()
