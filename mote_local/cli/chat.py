"""The chat REPL: the model's chat template, streaming replies, and live expert toggles.

The loop reads lines from an input function and writes through an output function, so tests
drive it with scripted input, the same way a person types at the terminal.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mote_local.engine.model import Generation, Model, RoutingStats, Session
from mote_local.errors import MoteError
from mote_local.steering.entries import Entry, Mode, Scope
from mote_local.steering.profile import Profile
from mote_local.steering.spec import parse_spec

HELP = """commands:
  /off L:E[,L:E…]     switch experts off (mask)        /drop L:E[,…]   drop their weight (k-1 experts)
  /force L:E[,…]      force experts on                 /bias L:E=V     router-logit bias
  /gain L:E=G         scale an expert's output         /strength S     scale every bias
  /scope SCOPE        scope of new toggles: all, prefill, decode, thinking
  /profile load PATH | save PATH | show                 /reset          no steering, no history
  /trace              routing of the last reply        /diff           the last turn again, unsteered | steered now
  /help               this text                        /quit           leave"""

SHADES = " .:-=+*#%@"
TOGGLES = {"off": "off", "drop": "drop", "force": "force", "bias": "bias", "gain": "gain"}


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
    """One conversation with a model, its steering and the routing of its last reply."""

    def __init__(self, model: Model, session: Session, *, max_tokens: int = 128, temperature: float = 0.0,
                 seed: int = 0, write: Callable[..., None] = print):
        self.model = model
        self.session = session
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.write = write
        self.state = ChatState()

    # steering
    def steer(self, profile: Profile) -> None:
        """Applies a profile; on error the engine keeps the previous steering and so does the chat."""
        from mote_local.evaluation.super_experts import super_experts_switched_off

        self.session.steer(profile)
        self.state.profile = profile
        for layer, expert in super_experts_switched_off(self.model.path, profile.entries, profile.strength):
            self.write(f"warning: layer {layer} expert {expert} is a super-expert: the model may collapse")

    # conversation
    def ask(self, text: str, history: list[dict[str, str]], *, steered: bool = True, stream: bool = True) -> Turn:
        messages = history + [{"role": "user", "content": text}]
        prompt = self.model.tokenize(self.model.format_chat(messages), add_bos=False)
        if not steered:
            self.session.clear_steering()
        try:
            with self.session.capture(label=None) as cap:
                cap.bind(0, 0, pos_begin=len(prompt))  # the reply's tokens only
                reply = self.session.generate(prompt, max_tokens=self.max_tokens, temperature=self.temperature,
                                              seed=self.seed, add_bos=False,
                                              on_token=(lambda t: self.write(t, end="")) if stream else None)
            routing = cap.stats(0) if 0 in cap.labels else None
        finally:
            if not steered:
                self.session.steer(self.state.profile)
        return Turn(text, reply, routing, list(history))

    def say(self, text: str) -> Turn:
        turn = self.ask(text, self.state.history)
        self.write(" [interrupted]" if turn.reply.interrupted else "")
        self.state.history += [{"role": "user", "content": text}, {"role": "assistant", "content": turn.reply.text}]
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
        elif name in TOGGLES:
            if not arg:
                raise MoteError(f"/{name} needs LAYER:EXPERT[,…] (e.g. /{name} 3:17)")
            current = self.state.profile
            self.steer(replace(current, entries=current.entries + tuple(parse_spec(name, arg, self.state.scope))))
            self.write(f"steering: {describe(self.state.profile)}")
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
            action, _, path = arg.partition(" ")
            if action == "show":
                self.write(describe(self.state.profile))
            elif action in ("load", "save") and path.strip():
                target = Path(shlex.split(path)[0]).expanduser()
                if action == "load":
                    self.steer(Profile.load(target).validate(self.model.layout))
                    self.write(f"loaded {target}: {describe(self.state.profile)}")
                else:
                    Profile.from_entries(self.state.profile.entries, model_path=self.model.path,
                                         strength=self.state.profile.strength).save(target)
                    self.write(f"saved {target}")
            else:
                raise MoteError("/profile needs: load PATH, save PATH or show")
        elif name == "reset":
            self.session.clear_steering()
            self.state = ChatState()
            self.write("steering and history cleared")
        elif name == "trace":
            if self.state.last is None or self.state.last.routing is None:
                raise MoteError("no reply yet: /trace shows the routing of the last reply")
            self.write(render_routing(self.state.last.routing, self.state.profile.entries))
        elif name == "diff":
            if self.state.last is None:
                raise MoteError("no reply yet: /diff regenerates the last turn without steering")
            last = self.state.last
            plain = self.ask(last.user, last.history, steered=False, stream=False)
            steered = self.ask(last.user, last.history, stream=False)  # with the steering in effect now
            self.write(side_by_side(("unsteered", plain.reply.text), ("steered", steered.reply.text)))
        else:
            raise MoteError(f"unknown command /{name}: /help lists the commands")
        return True

    def loop(self, read: Callable[[str], str]) -> None:
        """Reads lines until /quit or end of input; errors are reported and the chat goes on."""
        self.write("mote chat — /help for commands, /quit to leave")
        while True:
            try:
                line = read("> ").strip()
            except EOFError:
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


def describe(profile: Profile) -> str:
    if not profile.entries:
        return "none"
    parts = []
    for e in profile.entries:
        value = f"={e.value:g}" if e.mode in (Mode.BIAS, Mode.GAIN) else ""
        scope = "" if e.scope is Scope.ALL else f"@{e.scope.value}"
        parts.append(f"{e.mode.value} {e.layer}:{e.expert}{value}{scope}")
    return ", ".join(parts) + (f" (strength {profile.strength:g})" if profile.strength != 1.0 else "")


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
    lines = [f"routing of the last reply ({int(stats.tokens[layers[0]])} tokens; share of tokens per expert, "
             "* = steered)", header]
    for row, il in enumerate(layers):
        cells = []
        for e in columns:
            shade = SHADES[min(len(SHADES) - 1, int(round(share[row, e] * (len(SHADES) - 1))))]
            mark = "*" if (il, e) in steered else " "
            cells.append(f"  {shade * 2}{mark}")
        lines.append(f"{il:>5} " + "".join(cells))
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
