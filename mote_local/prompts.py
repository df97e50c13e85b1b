"""Prompt sets: the behaviour and baseline prompts that fTRI compares.

A plain file holds one prompt per line (blank lines and ``#`` comments skipped) and makes one class. A
structured file (TOML, or YAML by suffix) holds several classes of plain prompts and templates with slots::

    seed = 0              # optional, for sample_cap
    sample_cap = 100      # optional: per class, a seeded sample of the expansion, in expansion order
    [classes.refusal]
    templates = ["What happened {time}{place}?"]
    prompts = ["Tell me about the protest."]
    responses = ["I cannot help with that."]   # one per expanded prompt, or one per template/prompt
    [classes.refusal.slots]
    time = ["", " in 1989"]
    place = [" in the square", " in the city"]

Expansion is deterministic: each template's prompts in file order, then the plain prompts; within a template
the cartesian product of its slots' values, the first slot (by first appearance) varying slowest. ``{{`` and
``}}`` are literal braces.
"""

from __future__ import annotations

import json
import math
import random
import re
import tomllib
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

from mote_local.errors import MoteError

__all__ = [
    "MAX_PROMPTS",
    "Prompt",
    "PromptSet",
    "PromptSetError",
    "combine",
    "expand_template",
    "load_prompt_set",
    "select_classes",
]

MAX_PROMPTS = 100_000
MAX_LINE_BYTES = 1 << 20
MAX_STRUCTURED_BYTES = 16 << 20
STRUCTURED_SUFFIXES = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}
_TOP_KEYS = ("classes", "sample_cap", "seed")
_CLASS_KEYS = ("prompts", "responses", "slots", "templates")
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

SlotValues = tuple[tuple[str, str], ...]


class PromptSetError(MoteError, ValueError):
    """A prompt file or template is invalid; the message names the file, the class and the fix."""


@dataclass(frozen=True)
class Prompt:
    text: str
    cls: str
    response: str | None = None
    template: str | None = None
    slots: SlotValues = ()
    # where it was written, "FILE:LINE" (the template's line for an expanded one), for messages; not its identity
    origin: str | None = field(default=None, compare=False)

    def describe(self) -> str:
        """The prompt as messages name it: where it comes from, its class and its start."""
        start = self.text if len(self.text) <= 40 else self.text[:40] + "…"
        slots = f" with {', '.join(f'{k}={v!r}' for k, v in self.slots)}" if self.slots else ""
        return f"{self.origin + ' ' if self.origin else ''}({self.cls}: {start!r}{slots})"


@dataclass(frozen=True)
class PromptSet:
    """Classes of prompts, by name, in file order."""

    classes: dict[str, tuple[Prompt, ...]]

    def __post_init__(self) -> None:
        classes = {name: tuple(prompts) for name, prompts in self.classes.items()}
        if not classes:
            raise PromptSetError("a prompt set needs at least one class")
        empty = [name for name, prompts in classes.items() if not prompts]
        if empty:
            raise PromptSetError(f"class {empty[0]!r} has no prompts; give every class at least one")
        object.__setattr__(self, "classes", classes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.classes)

    def prompts(self, cls: str) -> tuple[Prompt, ...]:
        if cls not in self.classes:
            raise PromptSetError(f"unknown class {cls!r}; the prompt set has {_listing(self.names)}")
        return self.classes[cls]


def _listing(names: Sequence[Any]) -> str:
    return ", ".join(repr(n) for n in names) if names else "none"


@contextmanager
def _context(where: str) -> Iterator[None]:
    """Prefix a PromptSetError raised inside with where it happened (file, class)."""
    try:
        yield
    except PromptSetError as e:
        raise PromptSetError(f"{where}: {e}") from None


def _slot_values(name: str, values: Any) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise PromptSetError(f"slot {name!r} must be a list of strings, got {type(values).__name__} {values!r}")
    if not values:
        raise PromptSetError(f'slot {name!r} has no values; give at least one ("" for an empty filler)')
    for v in values:
        if not isinstance(v, str):
            raise PromptSetError(f"slot {name!r} value {v!r} is a {type(v).__name__}, not a string; quote it")
    return tuple(values)


@dataclass(frozen=True)
class _Template:
    """A parsed template: literals interleave with the slot names of its fields."""

    text: str
    literals: tuple[str, ...]  # one more than fields
    fields: tuple[str, ...]
    names: tuple[str, ...]  # distinct slots, in order of first appearance
    values: tuple[tuple[str, ...], ...]  # per name

    @property
    def count(self) -> int:
        return math.prod(len(v) for v in self.values)

    def item(self, k: int) -> tuple[str, SlotValues]:
        """The k-th prompt of the cartesian product (first slot slowest)."""
        chosen: list[str] = []
        for vals in reversed(self.values):
            k, r = divmod(k, len(vals))
            chosen.append(vals[r])
        chosen.reverse()
        by_name = dict(zip(self.names, chosen))
        text = self.literals[0] + "".join(by_name[f] + lit for f, lit in zip(self.fields, self.literals[1:]))
        return text, tuple(zip(self.names, chosen))


def _compile(template: Any, slots: Any) -> _Template:
    if not isinstance(template, str):
        raise PromptSetError(f"template must be a string, got {type(template).__name__} {template!r}")
    if not isinstance(slots, Mapping):
        raise PromptSetError(f"slots must map slot names to lists of strings, got {type(slots).__name__}")
    literals: list[str] = []
    fields: list[str] = []
    buf: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        buf.append(template[pos : m.start()])
        pos = m.end()
        token, name = m.group(), m.group(1)
        if token in ("{{", "}}"):
            buf.append(token[0])
        elif name is not None and name.isidentifier():
            literals.append("".join(buf))
            buf = []
            fields.append(name)
        elif name is not None:
            raise PromptSetError(
                f"template {template!r} has {token!r} at column {m.start() + 1}, which is not a "
                "slot name (letters, digits, _); write {{ and }} for literal braces"
            )
        else:
            raise PromptSetError(
                f"template {template!r} has an unmatched {token!r} at column {m.start() + 1}; "
                f"write {token * 2} for a literal brace"
            )
    buf.append(template[pos:])
    literals.append("".join(buf))
    names = tuple(dict.fromkeys(fields))
    for name in names:
        if name not in slots:
            raise PromptSetError(
                f"template {template!r} uses slot {name!r}, which is not defined; "
                f"defined slots: {_listing(list(slots))}"
            )
    values = tuple(_slot_values(name, slots[name]) for name in names)
    return _Template(template, tuple(literals), tuple(fields), names, values)


def expand_template(
    template: str, slots: Mapping[str, Sequence[str]], *, max_prompts: int = MAX_PROMPTS
) -> list[tuple[str, SlotValues]]:
    """Every (text, ((slot, value), ...)) of a template, the first slot (by first appearance) varying slowest."""
    t = _compile(template, slots)
    if t.count > max_prompts:
        raise PromptSetError(
            f"template {template!r} expands to {t.count} prompts, more than max_prompts="
            f"{max_prompts}; use fewer slot values, or sample_cap in a prompt file"
        )
    return [t.item(k) for k in range(t.count)]


def load_prompt_set(path: str | Path, *, default_class: str | None = None, max_prompts: int = MAX_PROMPTS) -> PromptSet:
    """A prompt set from a .toml/.yaml/.yml file (its own classes) or a plain file (one class, named
    default_class or the file's stem). More than max_prompts prompts is an error."""
    path = Path(path)
    fmt = STRUCTURED_SUFFIXES.get(path.suffix.lower())
    if fmt is not None:
        return _load_structured(path, fmt, max_prompts)
    cls = default_class or path.stem
    return PromptSet({cls: _read_plain(path, cls, max_prompts)})


def combine(*paths: str | Path, max_prompts: int = MAX_PROMPTS) -> PromptSet:
    """One prompt set from several files (a plain file is one class named by its stem); max_prompts per file."""
    if not paths:
        raise PromptSetError("combine needs at least one prompt file")
    classes: dict[str, tuple[Prompt, ...]] = {}
    for path in paths:
        for name, prompts in load_prompt_set(path, max_prompts=max_prompts).classes.items():
            if name in classes:
                raise PromptSetError(
                    f"{path}: class {name!r} is already given by an earlier file; rename one "
                    "(a plain file's class is its file name without the suffix)"
                )
            classes[name] = prompts
    return PromptSet(classes)


def select_classes(
    ps: PromptSet, behavior: str | None = None, baseline: str | None = None
) -> tuple[tuple[Prompt, ...], tuple[Prompt, ...]]:
    """(behaviour prompts, baseline prompts); by default the first class is behaviour, the next baseline."""
    names = ps.names
    if len(names) < 2:
        raise PromptSetError(
            f"fTRI needs two classes (behaviour and baseline), but the prompt set has only "
            f"{_listing(names)}; add a baseline class or combine two files"
        )
    for given in (behavior, baseline):
        if given is not None and given not in ps.classes:
            raise PromptSetError(f"unknown class {given!r}; the prompt set has {_listing(names)}")
    if behavior is None:
        behavior = next(n for n in names if n != baseline)
    if baseline is None:
        baseline = next(n for n in names if n != behavior)
    if behavior == baseline:
        raise PromptSetError(f"class {behavior!r} is both behaviour and baseline; choose two different classes")
    return ps.classes[behavior], ps.classes[baseline]


def _read_plain(path: Path, cls: str, max_prompts: int) -> tuple[Prompt, ...]:
    """Streamed line by line, so memory stays bounded by max_prompts and MAX_LINE_BYTES."""
    prompts: list[Prompt] = []
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise PromptSetError(
                        f"{path}: line {lineno} is longer than {MAX_LINE_BYTES} bytes; is it a "
                        "binary file? Put one prompt per line"
                    )
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise PromptSetError(
                        f"{path}: line {lineno} is not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                        "is it a binary file? Save prompts as UTF-8"
                    ) from None
                if "\x00" in text:
                    raise PromptSetError(f"{path}: line {lineno} contains a NUL byte; is it a binary file?")
                text = text.lstrip("\ufeff").strip() if lineno == 1 else text.strip()
                if not text or text.startswith("#"):
                    continue
                if len(prompts) >= max_prompts:
                    raise PromptSetError(
                        f"{path}: more than {max_prompts} prompts; split the file or raise max_prompts"
                    )
                prompts.append(Prompt(text, cls, origin=f"{path}:{lineno}"))
    except OSError as e:
        raise PromptSetError(f"{path}: cannot read the prompt file: {e.strerror or e}") from None
    if not prompts:
        raise PromptSetError(f"{path}: no prompts for class {cls!r}; write one prompt per line ('#' starts a comment)")
    return tuple(prompts)


def _load_structured(path: Path, fmt: str, max_prompts: int) -> PromptSet:
    try:
        if path.stat().st_size > MAX_STRUCTURED_BYTES:
            raise PromptSetError(
                f"{path}: larger than {MAX_STRUCTURED_BYTES} bytes; put long prompt lists in "
                "plain files (one prompt per line) and combine them"
            )
        raw = path.read_bytes()
    except OSError as e:
        raise PromptSetError(f"{path}: cannot read the prompt file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptSetError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); is it a "
            f"binary file? Save it as UTF-8 {fmt}"
        ) from None
    if "\x00" in text:
        raise PromptSetError(f"{path}: contains a NUL byte; is it a binary file?")
    data = _parse_toml(path, text) if fmt == "TOML" else _parse_yaml(path, text)
    return _build(path, data, max_prompts, _line_finder(path, text))


def _line_finder(path: Path, text: str):
    """string -> "FILE:LINE" of the first line that holds it as written (plain, or with JSON/TOML escapes), or
    "FILE" where it is not found verbatim (a YAML block scalar, say)."""
    lines = text.splitlines()

    def find(value: str) -> str:
        for needle in (value, json.dumps(value)[1:-1]):
            for lineno, line in enumerate(lines, 1):
                if needle and needle in line:
                    return f"{path}:{lineno}"
        return str(path)

    return find


def _parse_toml(path: Path, text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PromptSetError(f"{path}: not valid TOML: {_one_line(e)}; fix the syntax there") from None
    except RecursionError:
        raise PromptSetError(f"{path}: arrays or tables nested too deeply to be a prompt set") from None


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise PromptSetError(
            f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the prompt set as TOML"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PromptSetError(f"{path}: not valid YAML{where}: {_one_line(problem)}; fix the syntax there") from None
    except RecursionError:
        raise PromptSetError(f"{path}: lists or mappings nested too deeply to be a prompt set") from None


def _one_line(message: object) -> str:
    """A parser's message on one line (the CLI prints every error as one line)."""
    return " ".join(str(message).split())


def _check_keys(table: Mapping[Any, Any], allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            raise PromptSetError(f"unknown key {key!r}; allowed keys: {', '.join(allowed)}")


def _int_option(data: Mapping[str, Any], key: str, minimum: int | None) -> int | None:
    value = data.get(key)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum)
    ):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise PromptSetError(f"{key} must be an integer{bound}, got {value!r}")
    return value


def _strings(spec: Mapping[str, Any], key: str) -> list[str] | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, list):
        raise PromptSetError(f"{key} must be a list of strings, got {type(value).__name__}; write {key} = [...]")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise PromptSetError(f"{key}[{i}] is a {type(v).__name__} ({v!r}), not a string; quote it")
        if not v.strip():
            raise PromptSetError(f"{key}[{i}] is empty; remove it or write the text")
    return value


def _build(path: Path, data: Any, max_prompts: int, locate) -> PromptSet:
    with _context(str(path)):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PromptSetError(f"the top level must be a table with a 'classes' table, got {type(data).__name__}")
        _check_keys(data, _TOP_KEYS)
        seed = _int_option(data, "seed", None) or 0
        cap = _int_option(data, "sample_cap", 1)
        classes = data.get("classes")
        if not classes:
            raise PromptSetError("no classes; add a [classes.<name>] table with templates or prompts")
        if not isinstance(classes, dict):
            raise PromptSetError(f"'classes' must be a table of classes by name, got {type(classes).__name__}")
        out: dict[str, tuple[Prompt, ...]] = {}
        for name, spec in classes.items():
            if not isinstance(name, str) or not name:
                raise PromptSetError(f"class name {name!r} must be a non-empty string")
            with _context(f"class {name!r}"):
                out[name] = _build_class(name, spec, seed, cap, max_prompts - sum(map(len, out.values())), locate)
        return PromptSet(out)


def _build_class(name: str, spec: Any, seed: int, cap: int | None, budget: int, locate) -> tuple[Prompt, ...]:
    if not isinstance(spec, dict):
        raise PromptSetError(f"must be a table with templates and/or prompts, got {type(spec).__name__}")
    _check_keys(spec, _CLASS_KEYS)
    slots = spec.get("slots", {})
    if not isinstance(slots, dict):
        raise PromptSetError(f"slots must be a table of slot names to lists of strings, got {type(slots).__name__}")
    for slot, values in slots.items():
        _slot_values(slot, values)
    templates = [_compile(t, slots) for t in _strings(spec, "templates") or []]
    plain = _strings(spec, "prompts") or []
    responses = _strings(spec, "responses")
    sizes = [t.count for t in templates] + [1] * len(plain)
    starts = [0, *accumulate(sizes)][:-1]
    total = sum(sizes)
    if total == 0:
        raise PromptSetError("no prompts; add templates or prompts")
    if responses is not None and len(responses) not in (total, len(sizes)):
        raise PromptSetError(
            f"{len(responses)} responses for {total} expanded prompts from {len(templates)} "
            f"templates and {len(plain)} prompts; give one response per expanded prompt or one "
            "per template/prompt"
        )
    if cap is not None and total > cap:
        # same seed for every class: classes of equal size keep the same positions, so paired classes stay paired
        indices: Sequence[int] = sorted(random.Random(seed).sample(range(total), cap))
    else:
        indices = range(total)
    if len(indices) > budget:
        raise PromptSetError(
            f"expands to {len(indices)} prompts, over the max_prompts limit ({budget} left); set "
            "sample_cap or raise max_prompts"
        )
    out: list[Prompt] = []
    for i in indices:
        src = bisect_right(starts, i) - 1
        response = None if responses is None else responses[i if len(responses) == total else src]
        if src < len(templates):
            t = templates[src]
            text, values = t.item(i - starts[src])
            if not text.strip():
                raise PromptSetError(
                    f"template {t.text!r} expands to an empty prompt with "
                    f"{', '.join(f'{k}={v!r}' for k, v in values) or 'no slots'}; give those "
                    "slots non-empty values or add text to the template"
                )
            out.append(Prompt(text, name, response, t.text, values, locate(t.text)))
        else:
            plain_text = plain[src - len(templates)]
            out.append(Prompt(plain_text, name, response, origin=locate(plain_text)))
    return tuple(out)
