"""The chat REPL: the model's chat template, streaming replies, and live expert toggles.

The loop reads lines from an input function and writes through an output function, so tests
drive it with scripted input, the same way a person types at the terminal; on a terminal the
input function is the standard library's readline (line editing, history kept between chats).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np

from mote_local.cache import cache_dir
from mote_local.cli.shared import (
    load_profile,
    profile_target,
    super_expert_note,
    super_experts_off,
    tokens_to_generate,
)
from mote_local.engine.model import Generation, Model, RoutingStats, Session
from mote_local.engine.options import SamplingOptions
from mote_local.errors import MoteError, SteeringError
from mote_local.steering.entries import Entry, Scope, applies_in, off_experts
from mote_local.steering.profile import Profile, compose
from mote_local.steering.spec import SPEC_KINDS, parse_spec

HELP = """commands:
  /off L:E[,L:E…]     switch experts off (mask)        /drop L:E[,…]   drop their weight (k-1 experts)
  /force L:E[,…]      force experts on                 /bias L:E=V     router-logit bias
  /gain L:E=G         scale an expert's output         /unset L:E[,…]  stop steering these experts
  /strength S         scale every bias                 /scope SCOPE    scope of new toggles: all, prefill, decode,
                                                                       thinking
  /profile show | load PATH | save PATH                 (load --any-model PATH: a profile made for another model)
  /reset              no steering (the conversation stays)
  /clear              a new conversation (the steering stays)
  /trace              routing of the last reply        /diff           the last turn again, unsteered | steered now
  /help               this text                        /quit           leave (or Ctrl-D)
A toggle replaces what its expert had that it cannot be combined with: /bias 1:6=-5 then /bias 1:6=-inf keeps -inf.
Ctrl-C stops a reply."""

SHADES = " .:-=+o#%@"
STEERED_MARK = "*"
ANY_MODEL = "--any-model"
PROFILE_USAGE = f"/profile needs: show, load PATH, load {ANY_MODEL} PATH or save PATH"
PHASES = (Scope.PREFILL, Scope.DECODE, Scope.THINKING)


@dataclass
class Turn:
    user: str
    reply: Generation
    routing: RoutingStats | None
    history: list[dict[str, str]]  # the conversation before this turn


@dataclass
class ChatState:
    profile: Profile = field(default_factory=Profile)
    scope: Scope = Scope.ALL
    history: list[dict[str, str]] = field(default_factory=list)
    last: Turn | None = None


class Chat:
    """One conversation with a model, its steering and the routing of its last reply.

    ``max_tokens`` -1 generates each reply until its end (bounded by the context); ``sampling`` is the sampler's
    settings (default greedy); ``chat`` False talks without a template (the messages as plain text);
    ``n_threads`` is for the super-expert checks' own context (the session has its threads).
    """

    def __init__(
        self,
        model: Model,
        session: Session,
        *,
        max_tokens: int = 128,
        sampling: SamplingOptions | None = None,
        chat: bool = True,
        write: Callable[..., None] = print,
        n_threads: int | None = None,
    ):
        self.model = model
        self.session = session
        self.max_tokens = max_tokens
        self.sampling = sampling or SamplingOptions()
        self.chat = chat
        self.write = write
        self.n_threads = n_threads
        self.state = ChatState()

    # steering
    def steer(self, profile: Profile) -> None:
        """Applies a profile whose fit to the model was checked (or overridden) already: it becomes the chat's
        steering of this model. On error the engine keeps the previous steering and so does the chat. Warns
        about each super-expert it switches off that was on before."""
        before = set(off_experts(self.state.profile.entries, self.state.profile.strength))
        profile = replace(profile, fingerprint=self.model.fingerprint)
        self.session.steer(profile)
        self.state.profile = profile
        check = super_experts_off(self.model, profile, self.n_threads)
        for layer, expert in check.flagged:
            if (layer, expert) not in before:
                note = super_expert_note(self.model, check, layer, expert)
                self.write(
                    f"warning: layer {layer} expert {expert} is {note}: the model may collapse; "
                    f"/unset {layer}:{expert} switches it back on"
                )

    def toggle(self, name: str, arg: str) -> None:
        """/off, /drop, /force, /bias, /gain: the new entries replace those of their experts they cannot be
        combined with (the same mode included), in overlapping scopes."""
        new = _parse(name, name, arg, self.state.scope)
        current = self.state.profile
        self.steer(replace(current, entries=_toggled(current.entries, new)))
        self.write(f"steering: {self.state.profile.describe()}")

    def unset(self, arg: str) -> None:
        experts = {(e.layer, e.expert) for e in _parse("unset", "off", arg)}
        current = self.state.profile
        idle = sorted(experts - {(e.layer, e.expert) for e in current.entries})
        self.steer(replace(current, entries=tuple(e for e in current.entries if (e.layer, e.expert) not in experts)))
        note = f" ({', '.join(f'{l}:{x}' for l, x in idle)} had no steering)" if idle else ""
        self.write(f"steering: {self.state.profile.describe()}{note}")

    def profile_command(self, arg: str) -> None:
        action, _, rest = arg.partition(" ")
        try:
            words = shlex.split(rest)
        except ValueError as err:  # an unclosed quote
            raise MoteError(f"/profile {action}: {err}") from None
        any_model = ANY_MODEL in words
        paths = [w for w in words if w != ANY_MODEL]
        if action == "show" and not words:
            self.write(self.state.profile.describe())
        elif action == "load" and len(paths) == 1:
            way_out = f"load it with /profile load {ANY_MODEL} {shlex.quote(paths[0])}"
            loaded = compose(
                [(paths[0], load_profile(Path(paths[0]).expanduser()))],
                [],
                self.model.layout,
                force=any_model,
                way_out=way_out,
            )
            self.steer(cast(Profile, loaded))  # one file given: never None
            self.write(f"loaded {paths[0]}: {self.state.profile.describe()}")
        elif action == "save" and len(paths) == 1 and not any_model:
            target = profile_target(paths[0])
            Profile.from_entries(
                self.state.profile.entries, model_path=self.model.path, strength=self.state.profile.strength
            ).save(target)
            self.write(f"saved {target}")
        else:
            raise MoteError(PROFILE_USAGE)

    # conversation
    def ask(self, text: str, history: list[dict[str, str]], *, steered: bool = True, stream: bool = True) -> Turn:
        messages = history + [{"role": "user", "content": text}]
        prompt = self.model.prompt_tokens(messages, chat=self.chat)
        max_tokens = tokens_to_generate(self.max_tokens, self.session.n_ctx)
        if not steered:
            self.session.clear_steering()
        try:
            with self.session.capture(label=None) as cap:
                cap.bind(0, 0, pos_begin=len(prompt))  # the reply's tokens only
                reply = self.session.generate(
                    prompt,
                    max_tokens=max_tokens,
                    **self.sampling.generate_kwargs(),
                    on_token=(lambda t: self.write(t, end="")) if stream else None,
                )
            routing = cap.stats(0) if 0 in cap.labels else None
        finally:
            if not steered:
                self.session.steer(self.state.profile)
        return Turn(text, reply, routing, list(history))

    def say(self, text: str) -> Turn:
        turn = self.ask(text, self.state.history)
        self.write(" [interrupted]" if turn.reply.interrupted else "")
        self.state.history += [{"role": "user", "content": text}, self.model.reply_message(turn.reply.text)]
        self.state.last = turn
        return turn

    # commands
    def command(self, line: str) -> bool:
        """Runs one slash command; returns False when the chat should end."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.write(HELP)
        elif name in SPEC_KINDS:
            self.toggle(name, arg)
        elif name == "unset":
            self.unset(arg)
        elif name == "strength":
            try:
                value = float(arg)
            except ValueError:
                raise MoteError(f"/strength needs a number, got {arg!r}") from None
            self.steer(replace(self.state.profile, strength=value))
            self.write(f"strength {value:g}")
        elif name == "scope":
            try:
                self.state.scope = Scope(arg)
            except ValueError:
                raise MoteError(f"/scope needs one of {', '.join(s.value for s in Scope)}, got {arg!r}") from None
            self.write(f"new toggles apply in scope {self.state.scope.value}")
        elif name == "profile":
            self.profile_command(arg)
        elif name == "reset":
            self.session.clear_steering()
            self.state.profile, self.state.scope = Profile(), Scope.ALL
            self.write("steering cleared (the conversation goes on; /clear starts a new one)")
        elif name == "clear":
            self.state.history, self.state.last = [], None
            self.write(f"conversation cleared (steering: {self.state.profile.describe()})")
        elif name == "trace":
            if self.state.last is None or self.state.last.routing is None:
                raise MoteError("no reply yet: /trace shows the routing of the last reply")
            self.write(render_routing(self.state.last.routing, self.state.profile.entries))
        elif name == "diff":
            if self.state.last is None:
                raise MoteError("no reply yet: /diff regenerates the last turn without steering")
            last = self.state.last
            plain = self.ask(last.user, last.history, steered=False, stream=False).reply
            # Ctrl-C in the first reply stops the /diff; the table says what was cut short
            steered = None if plain.interrupted else self.ask(last.user, last.history, stream=False).reply
            self.write(
                side_by_side(
                    ("unsteered" + (" [interrupted]" if plain.interrupted else ""), plain.text),
                    (
                        "steered"
                        + (
                            " [not generated: interrupted]"
                            if steered is None
                            else " [interrupted]"
                            if steered.interrupted
                            else ""
                        ),
                        "" if steered is None else steered.text,
                    ),
                )
            )
        else:
            raise MoteError(f"unknown command /{name}: /help lists the commands")
        return True

    def loop(self, read: Callable[[str], str]) -> None:
        """Reads lines until /quit or end of input; errors are reported and the chat goes on."""
        self.write("mote chat — /help for commands, /quit to leave")
        while True:
            try:
                line = read("> ").strip()
            except EOFError:  # Ctrl-D: finish the prompt's line
                self.write("")
                break
            except KeyboardInterrupt:
                self.write("\n(/quit to leave)")
                continue
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        break
                else:
                    self.say(line)
            except MoteError as err:
                self.write(f"error: {err}")
                if self.model.closed:  # its rpc server was lost: nothing more can be said
                    break
            except OSError as err:  # /profile save into a read-only directory, …
                self.write(f"error: {err.strerror or err}: {err.filename}" if err.filename else f"error: {err}")
            except KeyboardInterrupt:
                self.write("\n(interrupted)")


def _parse(name: str, kind: str, arg: str, scope: Scope = Scope.ALL) -> list[Entry]:
    """The entries of a toggle command; errors name the command as typed (/bias), not the CLI flag."""
    if not arg:
        example = {"bias": "3:17=-2.5", "gain": "3:17=0.5"}.get(name, "3:17")
        raise MoteError(
            f"/{name} needs LAYER:EXPERT{'=VALUE' if kind in ('bias', 'gain') else ''}[,…] (e.g. /{name} {example})"
        )
    try:
        return parse_spec(kind, arg, scope, flag=f"/{name}")
    except SteeringError as err:
        raise MoteError(str(err)) from None


def _overlap(a: Scope, b: Scope) -> bool:
    return any(applies_in(a, phase) and applies_in(b, phase) for phase in PHASES)


def _toggled(entries: Iterable[Entry], new: Sequence[Entry]) -> tuple[Entry, ...]:
    """The entries with the new ones in: an old entry of the same expert in an overlapping scope stays only
    where the steering rules let the two be combined (bias + gain, …) and their modes differ."""

    def replaced(old: Entry) -> bool:
        rivals = [e for e in new if (e.layer, e.expert) == (old.layer, old.expert) and _overlap(e.scope, old.scope)]
        if not rivals:
            return False
        if any(e.mode is old.mode for e in rivals):
            return True
        try:
            Profile((old, *rivals))
        except SteeringError:
            return True
        return False

    return tuple(e for e in entries if not replaced(e)) + tuple(new)


def render_routing(stats: RoutingStats, entries: Sequence[Entry], top: int = 8) -> str:
    """Layers × most-used experts as a compact shaded grid; steered experts are marked with *."""
    layers = [il for il in stats.moe_layers if stats.tokens[il] > 0]
    if not layers:
        return "no routed tokens in the last reply"
    share = stats.counts[layers] / np.maximum(stats.tokens[layers], 1)[:, None]
    steered = {(e.layer, e.expert): e.mode.value for e in entries}
    columns = [int(e) for e in np.argsort(-share.sum(axis=0), kind="stable")[:top]]
    columns = sorted(set(columns) | {e for (l, e) in steered if l in layers})
    header = "layer " + "".join(f"{e:>5}" for e in columns)
    lines = [
        f"routing of the last reply ({int(stats.tokens[layers[0]])} tokens; share of tokens per expert, "
        f"{STEERED_MARK} = steered)",
        header,
    ]
    top_shade = len(SHADES) - 1
    for row, il in enumerate(layers):
        cells = []
        for e in columns:
            shade = SHADES[min(top_shade, int(round(share[row, e] * top_shade)))]
            mark = STEERED_MARK if (il, e) in steered else " "
            cells.append(f"  {shade * 2}{mark}")
        lines.append(f"{il:>5} " + "".join(cells))
    lines.append(
        "shades: "
        + " ".join(f"'{c * 2}' {i / top_shade:.0%}" for i, c in enumerate(SHADES))
        + " of the reply's tokens chose the expert (nearest)"
    )
    if steered:
        lines.append("steered: " + ", ".join(f"{l}:{e} {m}" for (l, e), m in sorted(steered.items())))
    return "\n".join(lines)


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int = 38) -> str:
    import textwrap

    a = [left[0]] + textwrap.wrap(left[1], width) or [""]
    b = [right[0]] + textwrap.wrap(right[1], width) or [""]
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    return "\n".join(f"{x:<{width}} | {y}" for x, y in zip(a, b))


def terminal_reader(history_file: Path | None) -> Callable[[str], str]:
    """input() with the standard library's line editing (arrows, Ctrl-R, …) and a history kept in
    ``history_file`` (the last HISTORY_LINES lines) between chats."""
    try:
        # imported for a terminal only: the import can write terminal escapes to stdout, and turns on
        # input()'s line editing
        import readline
    except ImportError:  # a Python built without it (Windows): plain input()
        return input
    if history_file is not None:
        try:
            readline.read_history_file(history_file)
        except OSError:  # none yet
            pass

    def read(prompt: str) -> str:
        line = input(prompt)
        if history_file is not None and line.strip():
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                readline.set_history_length(HISTORY_LINES)
                readline.write_history_file(history_file)
            except OSError:  # a read-only cache: history for this chat only
                pass
        return line

    return read


HISTORY_LINES = 1000


def history_path() -> Path:
    """The chat history, in mote-local's cache directory."""
    return cache_dir("chat-history")
