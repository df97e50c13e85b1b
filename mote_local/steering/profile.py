"""Steering profiles: a named set of steering entries with a strength, composable and saved as JSON or GGUF.

A profile is data, like repeng's control vectors: ``a + b`` composes two profiles, ``p * 0.5`` scales the
strength, ``-p`` inverts (switched-off experts are forced on and vice versa). A profile remembers the model
it was made for (:class:`Fingerprint`) and refuses another one unless forced.

JSON (``.json``, human-editable; strict: unknown keys, wrong types and missing fields are errors)::

    {
      "format": "mote-profile",            required
      "version": 1,                        required
      "name": "refusal-off",               optional, default ""
      "description": "...",                optional, default ""
      "strength": 1.0,                     optional, default 1.0; scales every bias
      "fingerprint": {                     optional, default null (no model check)
        "arch": "qwen3moe", "n_layer": 48, "n_expert": 128, "n_expert_used": 8,
        "router_sha256": "<64 hex digits>"
      },
      "entries": [                         required, one object per entry
        {"layer": 3, "expert": 17, "mode": "mask"},
        {"layer": 3, "expert": 2, "mode": "bias", "value": -2.5, "scope": "decode"},
        {"layer": 4, "expert": 9, "mode": "bias", "value": "-inf"}
      ],
      "metadata": {}                       optional, default {}; free-form (e.g. the fTRI method)
    }

``mode`` is one of mask, drop, force, bias, gain; ``value`` is required for bias and gain and absent otherwise;
``scope`` is one of all (default), prefill, decode, thinking. JSON has no infinity: a -inf bias is written
as the string ``"-inf"``. NaN, Infinity and other non-standard literals are refused.

GGUF (``.gguf``, laid out like llama.cpp control vectors; llama.cpp never loads it)::

    general.architecture          "moteprofile"
    general.name, .description    the profile's name and description (absent when empty)
    moteprofile.format_version    uint32, 1
    moteprofile.strength          float64
    moteprofile.metadata          string, the metadata as JSON
    moteprofile.mode_names        string array: mode code -> name (the engine's codes: mask=0 … gain=4)
    moteprofile.scope_names       string array: scope code -> name (all=0, prefill, decode, thinking)
    moteprofile.model_hint        the fingerprint's arch (only with a fingerprint)
    moteprofile.fingerprint.*     arch (string), n_layer, n_expert, n_expert_used (uint64), router_sha256 (string)

and, for each layer that has entries, four parallel 1-D tensors, one row per entry: ``expert.{layer}`` (I32),
``mode.{layer}`` (I32 mode code), ``scope.{layer}`` (I32 scope code), ``value.{layer}`` (F64, so that every
value, -inf included, round-trips exactly). A list rather than dense ``[n_expert]`` rows because one expert
may carry several entries (a bias and a gain, or different modes in different scopes).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Real
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from mote_local import binding
from mote_local.atomic import atomic_path, atomic_write_text
from mote_local.errors import ProfileError, ProfileMismatchError, SteeringError
from mote_local.modelfile.fingerprint import Fingerprint, differences
from mote_local.modelfile.layout import MoeLayout, open_gguf
from mote_local.steering import rules
from mote_local.steering.entries import (
    VALUED_MODES,
    Entry,
    Mode,
    Scope,
    applies_in,
)

__all__ = ["Profile", "ProfileError", "ProfileMismatchError", "compose"]


FORMAT = "mote-profile"
VERSION = 1

_SELECTION = (Mode.MASK, Mode.DROP, Mode.FORCE)
_MAX_INDEX = 2**31 - 1  # layers and experts are stored as I32 in GGUF


class GgufKeys:
    ARCH = "moteprofile"
    VERSION = f"{ARCH}.format_version"
    STRENGTH = f"{ARCH}.strength"
    METADATA = f"{ARCH}.metadata"
    MODE_NAMES = f"{ARCH}.mode_names"
    SCOPE_NAMES = f"{ARCH}.scope_names"
    MODEL_HINT = f"{ARCH}.model_hint"
    FINGERPRINT = f"{ARCH}.fingerprint.{{field}}"
    TENSOR = "{column}.{layer}"
    COLUMNS = ("expert", "mode", "scope", "value")


_MODE_ORDER = sorted(Mode, key=lambda m: binding.MODE_CODES[m.value])
_SCOPE_ORDER = sorted(Scope, key=lambda s: binding.SCOPE_CODES[s.value])


@dataclass(frozen=True)
class Profile:
    """Steering entries plus a strength (scales every bias), the model they were made for, and notes.

    Entries are sorted on construction and checked, in every phase, by the engine's steering rules
    (:mod:`mote_local.steering.rules`: on one expert only bias + gain and drop + gain combine; no two bias or
    gain entries for the same expert and scope); :meth:`validate` adds a model's ranges and limits.
    """

    entries: tuple[Entry, ...] = ()
    strength: float = 1.0
    fingerprint: Fingerprint | None = None
    name: str = ""
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "entries", _normalise(self.entries))
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, Real):
            raise ProfileError(f"strength must be a finite number, got {s!r}")
        object.__setattr__(self, "strength", float(s))
        rules.check(self.entries, self.strength, error=ProfileError)  # its finiteness too
        if self.fingerprint is not None and not isinstance(self.fingerprint, Fingerprint):
            raise ProfileError(f"fingerprint must be a Fingerprint or None, got {self.fingerprint!r}")
        for name in ("name", "description"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise ProfileError(f"{name} must be a string, got {v!r}")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ProfileError(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
        if not isinstance(self.metadata, Mapping):
            raise ProfileError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        try:  # a JSON round trip: a private copy, in the form both file formats give back
            metadata = json.loads(json.dumps(self.metadata, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise ProfileError(f"metadata must be JSON-serialisable with finite numbers: {err}") from None
        object.__setattr__(self, "metadata", metadata)

    # construction
    @classmethod
    def from_entries(
        cls, entries: Iterable[Entry], model_path: str | os.PathLike[str] | None = None, **kw: Any
    ) -> Profile:
        """A profile of ``entries``; with ``model_path``, its fingerprint is that model's."""
        if model_path is not None:
            if "fingerprint" in kw:
                raise ProfileError("give model_path or fingerprint, not both")
            kw["fingerprint"] = Fingerprint.of(model_path)
        return cls(tuple(entries), **kw)

    # arithmetic
    def __add__(self, other: Profile) -> Profile:
        """The union of both profiles' steering, at strength 1 (each side's strength folded into its biases).

        The same bias on the same (layer, expert, scope) sums, gains multiply, identical selections merge.
        """
        if not isinstance(other, Profile):
            return NotImplemented
        a, b = self.fingerprint, other.fingerprint
        diff = differences(a, b) if a is not None and b is not None else None
        if diff:
            mine, theirs = diff
            raise ProfileMismatchError(
                f"cannot compose {self._label()} and {other._label()}: they were made for "
                f"different models ({mine} vs {theirs})"
            )
        merged: dict[tuple, Entry] = {}
        for e in self._folded() + other._folded():
            key = (e.layer, e.expert, e.mode, e.scope)
            merged[key] = _combine(merged[key], e) if key in merged else e
        try:
            return Profile(
                tuple(merged.values()),
                1.0,
                a or b,
                name=" + ".join(n for n in (self.name, other.name) if n),
                description="\n".join(d for d in (self.description, other.description) if d),
                metadata=_compose_metadata(self.metadata, other.metadata),
            )
        except SteeringError as err:
            raise ProfileError(f"cannot compose {self._label()} and {other._label()}: {err}") from None

    def __sub__(self, other: Profile) -> Profile:
        """``self + (-other)``."""
        if not isinstance(other, Profile):
            return NotImplemented
        return self + other.inverted()

    def __mul__(self, factor: float) -> Profile:
        """The same entries at ``strength * factor``."""
        if isinstance(factor, bool) or not isinstance(factor, Real):
            return NotImplemented
        return replace(self, strength=self.strength * float(factor))

    __rmul__ = __mul__

    def __neg__(self) -> Profile:
        return self.inverted()

    def inverted(self) -> Profile:
        """Off <-> on: mask, drop and -inf bias become force, force becomes mask; bias b -> -b, gain g -> 1/g."""
        out = []
        for e in self.entries:
            if e.switches_off():
                out.append(Entry(e.layer, e.expert, Mode.FORCE, scope=e.scope))
            elif e.mode is Mode.FORCE:
                out.append(Entry(e.layer, e.expert, Mode.MASK, scope=e.scope))
            elif e.mode is Mode.BIAS:
                out.append(replace(e, value=-e.value))
            elif e.value == 0:
                raise ProfileError(
                    f"cannot invert a zero gain ({_where(e)}): 1/0 has no value; remove that entry "
                    "or use drop to switch the expert off"
                )
            else:
                try:
                    out.append(replace(e, value=1.0 / e.value))
                except SteeringError as err:
                    raise ProfileError(f"cannot invert the gain {e.value} ({_where(e)}): {err}") from None
        try:
            return replace(self, entries=tuple(out))
        except SteeringError as err:
            raise ProfileError(f"cannot invert {self._label()}: {err}") from None

    # use
    def describe(self) -> str:
        """The entries as a person reads them (``drop 1:6, bias 2:0=-5 (strength 2)``), or ``none``."""
        if not self.entries:
            return "none"
        strength = f" (strength {self.strength:g})" if self.strength != 1.0 else ""
        return ", ".join(map(str, self.entries)) + strength

    def for_scope(self, scope: Scope | str) -> tuple[Entry, ...]:
        """The entries that apply in one phase: the ``all`` entries plus that scope's, merged as ``+`` merges
        them (so the engine accepts them). Values are unscaled: pass ``strength`` along with them."""
        scope = Scope(scope)
        merged: dict[tuple, Entry] = {}
        for e in self.entries:
            if applies_in(e.scope, scope):
                key = (e.layer, e.expert, e.mode)
                merged[key] = _combine(merged[key], e) if key in merged else e
        return tuple(sorted(merged.values()))

    def check_fits(self, fingerprint: Fingerprint, model: str, *, way_out: str, what: str | None = None) -> None:
        """Raises ProfileMismatchError when this profile was made for another model than the one ``fingerprint``
        describes (named ``model``). ``what`` names the profile (default: its name) and ``way_out`` says, in the
        caller's own words, how to apply it anyway ("pass --force-profile", "set steering.force to true")."""
        problem = self.fingerprint.mismatch(fingerprint) if self.fingerprint is not None else None
        if problem:
            raise ProfileMismatchError(
                f"{what or self._label()} does not fit {model}: {problem}. Use a profile made "
                f"for this model, or {way_out} to apply it anyway"
            )

    def validate(self, layout: MoeLayout, *, force: bool = False, way_out: str = "pass force=True") -> Profile:
        """This profile if it can steer the model of ``layout``; else a ProfileError saying what does not fit.

        A fingerprint mismatch raises ProfileMismatchError (naming ``way_out``) unless ``force``; the model's limits
        always apply.
        """
        layout.require_moe()
        if not force:
            self.check_fits(Fingerprint.of_layout(layout), layout.path.name, way_out=way_out)
        rules.check(self.entries, self.strength, layout, error=ProfileError)
        return self

    # JSON
    def to_json(self) -> str:
        """The profile as JSON text (one entry per line, for hand editing)."""
        head = {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "description": self.description,
            "strength": self.strength,
            "fingerprint": asdict(self.fingerprint) if self.fingerprint else None,
        }
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
        rows = [json.dumps(entry_to_json(e)) for e in self.entries]
        lines.append('  "entries": ' + ("[\n" + ",\n".join(f"    {r}" for r in rows) + "\n  ]" if rows else "[]"))
        lines.append('  "metadata": ' + json.dumps(self.metadata, indent=2).replace("\n", "\n  "))
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Profile:
        """A profile from JSON text; any schema error is a ProfileError naming its JSON path."""
        try:
            doc = json.loads(text, parse_constant=_Constant)
        except json.JSONDecodeError as err:
            raise ProfileError(f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
        except RecursionError:
            raise ProfileError("not valid JSON for a profile: nested too deeply") from None
        except UnicodeDecodeError:
            raise ProfileError("not UTF-8 text: a JSON profile must be UTF-8") from None
        _object(
            doc, "", {"format", "version", "entries"}, {"name", "description", "strength", "fingerprint", "metadata"}
        )
        if doc["format"] != FORMAT:
            raise ProfileError(f"format: expected {FORMAT!r}, got {doc['format']!r}: this is not a mote profile")
        version = _int(doc["version"], "version")
        if version != VERSION:
            raise ProfileError(f"version: this mote-local reads version {VERSION} profiles, got version {version}")
        fp = doc.get("fingerprint")
        if fp is not None:
            _object(fp, "fingerprint", {f.name for f in fields(Fingerprint)}, set())
            for name in ("n_layer", "n_expert", "n_expert_used"):
                _int(fp[name], f"fingerprint.{name}")
            for name in ("arch", "router_sha256"):
                _str(fp[name], f"fingerprint.{name}")
            try:
                fp = Fingerprint(**fp)
            except ProfileError as err:
                raise ProfileError(f"fingerprint.{err}") from None
        if not isinstance(doc["entries"], list):
            raise ProfileError(f"entries: expected an array, got {_kind(doc['entries'])}")
        entries = [_entry_from_json(row, f"entries[{i}]") for i, row in enumerate(doc["entries"])]
        metadata = doc.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ProfileError(f"metadata: expected an object, got {_kind(metadata)}")
        _no_constants(metadata, "metadata")
        return cls(
            tuple(entries),
            strength=_number(doc.get("strength", 1.0), "strength"),
            fingerprint=fp,
            name=_str(doc.get("name", ""), "name"),
            description=_str(doc.get("description", ""), "description"),
            metadata=metadata,
        )

    # GGUF
    def to_gguf(self, path: str | os.PathLike[str]) -> Path:
        """Writes the profile as a GGUF file (atomically); returns the path."""
        with atomic_path(path) as tmp:
            w = gguf.GGUFWriter(tmp, GgufKeys.ARCH)
            try:
                w.add_name(self.name)
                w.add_description(self.description)
                w.add_uint32(GgufKeys.VERSION, VERSION)
                w.add_float64(GgufKeys.STRENGTH, self.strength)
                w.add_string(GgufKeys.METADATA, json.dumps(self.metadata))
                w.add_array(GgufKeys.MODE_NAMES, [m.value for m in _MODE_ORDER])
                w.add_array(GgufKeys.SCOPE_NAMES, [s.value for s in _SCOPE_ORDER])
                if self.fingerprint is not None:
                    fp = self.fingerprint
                    w.add_string(GgufKeys.MODEL_HINT, fp.arch)
                    w.add_string(GgufKeys.FINGERPRINT.format(field="arch"), fp.arch)
                    w.add_string(GgufKeys.FINGERPRINT.format(field="router_sha256"), fp.router_sha256)
                    for name in ("n_layer", "n_expert", "n_expert_used"):
                        w.add_uint64(GgufKeys.FINGERPRINT.format(field=name), getattr(fp, name))
                for layer, group in itertools.groupby(self.entries, key=lambda e: e.layer):
                    rows = list(group)
                    columns: dict[str, np.ndarray] = {
                        "expert": np.array([e.expert for e in rows], dtype=np.int32),
                        "mode": np.array([_MODE_ORDER.index(e.mode) for e in rows], dtype=np.int32),
                        "scope": np.array([_SCOPE_ORDER.index(e.scope) for e in rows], dtype=np.int32),
                        "value": np.array([e.value for e in rows], dtype=np.float64),
                    }
                    for column, data in columns.items():
                        w.add_tensor(GgufKeys.TENSOR.format(column=column, layer=layer), data)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_tensors_to_file()
            finally:
                w.close()
        return Path(path)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Profile:
        """A profile from a GGUF file written by :meth:`to_gguf`; errors name the file."""
        p = _check_file(path)
        reader = open_gguf(p, ProfileError)
        try:
            return _from_reader(reader)
        except ProfileError as err:
            raise type(err)(f"{p}: {err}") from None

    # files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the profile atomically, as JSON or GGUF by the file's suffix; returns the path."""
        if _format_of(path) == "json":
            return atomic_write_text(path, self.to_json())
        return self.to_gguf(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Reads a profile saved by :meth:`save` (format by suffix); errors name the file."""
        if _format_of(path) == "gguf":
            return cls.from_gguf(path)
        p = _check_file(path)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ProfileError(f"{p} is not UTF-8 text: not a JSON profile (binary or corrupt file)") from None
        try:
            return cls.from_json(text)
        except ProfileError as err:
            raise type(err)(f"{p}: {err}") from None

    def _folded(self) -> tuple[Entry, ...]:
        """The entries with the strength applied to their biases."""
        # -inf * 0 would be NaN; at strength 0 the engine ignores every bias, -inf included
        return tuple(
            replace(e, value=e.value * self.strength if self.strength else 0.0) if e.mode is Mode.BIAS else e
            for e in self.entries
        )

    def _label(self) -> str:
        return f"profile {self.name!r}" if self.name else "the profile"


# entries


def _where(e: Entry) -> str:
    return f"layer {e.layer} expert {e.expert}" + ("" if e.scope is Scope.ALL else f" ({e.scope.value})")


def _normalise(entries: Iterable[Entry]) -> tuple[Entry, ...]:
    """Sorted, with repeated identical selection entries kept once (the rules are the engine's: see __post_init__)."""
    entries = tuple(entries)
    for e in entries:
        if not isinstance(e, Entry):
            raise ProfileError(f"expected a steering Entry, got {e!r}")
        for what in ("layer", "expert"):
            if not 0 <= getattr(e, what) <= _MAX_INDEX:
                raise ProfileError(f"{what} must be in 0..{_MAX_INDEX}, got {getattr(e, what)}")
    out: list[Entry] = []
    for e in sorted(entries):
        if not (out and e == out[-1] and e.mode in _SELECTION):
            out.append(e)
    return tuple(out)


def _combine(a: Entry, b: Entry) -> Entry:
    """Two entries of one mode on one expert as one: biases sum, gains multiply, selections are the same."""
    value = 0.0
    if a.mode is Mode.BIAS:
        value = a.value + b.value
    elif a.mode is Mode.GAIN:
        value = a.value * b.value
    return Entry(a.layer, a.expert, a.mode, value, a.scope if b.scope is Scope.ALL else b.scope)


def _compose_metadata(a: dict, b: dict) -> dict:
    kept = [m for m in (a, b) if m]
    if len(kept) == 2 and a != b:
        return {"composed_of": [a, b]}
    return dict(kept[0]) if kept else {}


# JSON schema checks: each names the JSON path of what it rejects


class _Constant:
    """A NaN/Infinity literal, which Python's json accepts and JSON does not."""

    def __init__(self, name: str):
        self.name = name


def _kind(v: object) -> str:
    if isinstance(v, _Constant):
        return v.name
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    name = names.get(type(v), type(v).__name__)
    return name if isinstance(v, (dict, list, type(None))) else f"{name} {v!r}"


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _object(v: object, path: str, required: set[str], optional: set[str]) -> dict:
    if not isinstance(v, dict):
        raise ProfileError(f"{path or 'top level'}: expected an object, got {_kind(v)}")
    for key in v:
        if key not in required | optional:
            raise ProfileError(
                f"{_at(path, key)}: unknown key; allowed keys are {', '.join(sorted(required | optional))}"
            )
    missing = sorted(required - v.keys())
    if missing:
        raise ProfileError(f"{_at(path, missing[0])}: missing (required)")
    return v


def _int(v: object, path: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProfileError(f"{path}: expected an integer, got {_kind(v)}")
    return v


def _str(v: object, path: str) -> str:
    if not isinstance(v, str):
        raise ProfileError(f"{path}: expected a string, got {_kind(v)}")
    return v


def _number(v: object, path: str) -> float:
    if isinstance(v, _Constant):
        raise ProfileError(
            f'{path}: {v.name} is not valid JSON; numbers must be finite (a -inf bias is written as the string "-inf")'
        )
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProfileError(f"{path}: expected a number, got {_kind(v)}")
    return float(v)


def _no_constants(v: object, path: str) -> None:
    if isinstance(v, _Constant):
        _number(v, path)
    elif isinstance(v, dict):
        for key, item in v.items():
            _no_constants(item, _at(path, key))
    elif isinstance(v, list):
        for i, item in enumerate(v):
            _no_constants(item, f"{path}[{i}]")


def compose(
    files: Sequence[tuple[str, Profile]],
    entries: Sequence[Entry],
    layout: MoeLayout,
    *,
    strength: float | None = None,
    scope: Scope | str | None = None,
    force: bool = False,
    way_out: str = "pass force=True",
    fingerprint: Fingerprint | None = None,
) -> Profile | None:
    """The steering a command or a request asks for: profile files (each ``(what, profile)``, ``what`` naming it in
    errors) composed with loose entries (``scope``, when given, applies to those entries), at ``strength`` when
    given, validated for the model of ``layout`` (whose ``fingerprint`` a caller that keeps it may pass); None when
    nothing was asked. A file made for another model is refused, naming ``way_out``, unless ``force``; the model's
    limits always apply."""
    if not files and not entries:
        return None
    fingerprint = fingerprint or Fingerprint.of_layout(layout)
    total: Profile | None = None
    for what, profile in files:
        if not force:
            profile.check_fits(fingerprint, layout.path.name, way_out=way_out, what=what)
        total = profile if total is None else total + profile
    if scope is not None:
        entries = [replace(e, scope=Scope(scope)) for e in entries]
    if entries:
        loose = Profile(tuple(entries), fingerprint=fingerprint)
        total = loose if total is None else total + loose
    assert total is not None  # files or entries were given
    if strength is not None:
        total = replace(total, strength=strength)
    return total.validate(layout, force=True)  # each file's fit was checked above


def entry_to_json(e: Entry) -> dict[str, Any]:
    """An entry as the profile format writes it (value only for valued modes, scope only when not all)."""
    row: dict[str, Any] = {"layer": e.layer, "expert": e.expert, "mode": e.mode.value}
    if e.mode in VALUED_MODES:
        row["value"] = "-inf" if e.value == -math.inf else e.value
    if e.scope is not Scope.ALL:
        row["scope"] = e.scope.value
    return row


def _entry_from_json(doc: object, path: str) -> Entry:
    row = _object(doc, path, {"layer", "expert", "mode"}, {"value", "scope"})
    mode = _choice(row["mode"], f"{path}.mode", Mode)
    scope = _choice(row.get("scope", Scope.ALL.value), f"{path}.scope", Scope)
    layer, expert = _int(row["layer"], f"{path}.layer"), _int(row["expert"], f"{path}.expert")
    value = 0.0
    if mode in VALUED_MODES and "value" not in row:
        raise ProfileError(f"{path}.value: missing (a {mode.value} entry needs a value)")
    if "value" in row:
        raw = row["value"]
        if isinstance(raw, str) and raw != "-inf":
            raise ProfileError(f'{path}.value: expected a number or the string "-inf", got {_kind(raw)}')
        value = -math.inf if raw == "-inf" else _number(raw, f"{path}.value")
    try:
        return Entry(layer, expert, mode, value, scope)
    except SteeringError as err:
        raise ProfileError(f"{path}: {err}") from None


def _choice(v: object, path: str, enum: type[Mode] | type[Scope]) -> Any:
    names = [m.value for m in enum]
    if not isinstance(v, str) or v not in names:
        given = repr(v) if isinstance(v, str) else _kind(v)
        raise ProfileError(f"{path}: unknown {enum.__name__.lower()} {given}; expected one of {', '.join(names)}")
    return enum(v)


# files


def _format_of(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in (".json", ".gguf"):
        raise ProfileError(
            f"cannot tell the profile format of {Path(path).name!r}: name it *.json "
            "(human-editable) or *.gguf (llama.cpp-style)"
        )
    return suffix[1:]


def _check_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise ProfileError(f"profile file not found: {p}")
    if p.is_dir():
        raise ProfileError(f"{p} is a directory: give the path of a profile file")
    if p.stat().st_size == 0:
        raise ProfileError(f"{p} is empty: not a mote profile (was its write interrupted?)")
    return p


def _from_reader(reader: gguf.GGUFReader) -> Profile:
    def key(name: str, required: bool = True) -> Any:
        f = reader.fields.get(name)
        if f is None and required:
            raise ProfileError(f"key {name} is missing: not a complete mote profile")
        return None if f is None else f.contents()

    arch = key(gguf.Keys.General.ARCHITECTURE, required=False)
    if arch != GgufKeys.ARCH:
        raise ProfileError(
            f"a GGUF file of arch {arch!r}, not a mote profile (arch {GgufKeys.ARCH!r}); "
            "give a profile file, not a model"
        )
    version = key(GgufKeys.VERSION)
    if version != VERSION:
        raise ProfileError(f"{GgufKeys.VERSION}: this mote-local reads version {VERSION} profiles, got {version}")
    try:
        modes = [Mode(n) for n in key(GgufKeys.MODE_NAMES)]
        scopes = [Scope(n) for n in key(GgufKeys.SCOPE_NAMES)]
    except (ValueError, TypeError) as err:
        raise ProfileError(f"bad mode or scope name table: {err}") from None
    fingerprint = None
    if key(GgufKeys.FINGERPRINT.format(field="arch"), required=False) is not None:
        fingerprint = Fingerprint(
            **{f.name: key(GgufKeys.FINGERPRINT.format(field=f.name)) for f in fields(Fingerprint)}
        )
    try:
        metadata = json.loads(key(GgufKeys.METADATA))
    except (ValueError, TypeError) as err:
        raise ProfileError(f"{GgufKeys.METADATA} is not valid JSON: {err}") from None

    columns: dict[int, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"(\w+)\.([0-9]+)", t.name)
        if not m or m[1] not in GgufKeys.COLUMNS:
            raise ProfileError(
                f"unexpected tensor {t.name!r}; a profile holds only "
                f"{', '.join(c + '.LAYER' for c in GgufKeys.COLUMNS)}"
            )
        columns.setdefault(int(m[2]), {})[m[1]] = np.array(t.data).reshape(-1)
    entries = []
    for layer, cols in sorted(columns.items()):
        if set(cols) != set(GgufKeys.COLUMNS) or len({len(c) for c in cols.values()}) != 1:
            raise ProfileError(
                f"layer {layer}: tensors {', '.join(f'{c}.{layer}' for c in GgufKeys.COLUMNS)} "
                "must all be present, with one row per entry"
            )
        for expert, mode, scope, value in zip(*(cols[c].tolist() for c in GgufKeys.COLUMNS)):
            if not (0 <= mode < len(modes) and 0 <= scope < len(scopes)):
                raise ProfileError(
                    f"layer {layer} expert {expert}: mode code {mode} or scope code {scope} "
                    "is not in the file's name tables"
                )
            try:
                entries.append(Entry(layer, int(expert), modes[int(mode)], value, scopes[int(scope)]))
            except SteeringError as err:
                raise ProfileError(f"layer {layer}: {err}") from None
    return Profile(
        tuple(entries),
        key(GgufKeys.STRENGTH),
        fingerprint,
        name=key(gguf.Keys.General.NAME, required=False) or "",
        description=key(gguf.Keys.General.DESCRIPTION, required=False) or "",
        metadata=metadata,
    )
