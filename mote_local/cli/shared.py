"""What the command line and the chat REPL share: the checks before they steer a model (that a file is a
steering profile and not, say, fTRI's result file; which super-experts a steering switches off; where a profile
may be saved) and how many tokens -n asks for. Messages name the way out in the caller's own words: a flag on the
command line, a command in the REPL."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mote_local.engine.model import Model
from mote_local.errors import ProfileError
from mote_local.evaluation.super_experts import SuperExpertCheck, check_super_experts
from mote_local.ftri.outputs import FTRI_FORMAT
from mote_local.steering.entries import off_experts
from mote_local.steering.profile import Profile


def load_profile(path: str | os.PathLike) -> Profile:
    """Profile.load, which also recognises the fTRI result file and points to the profile written beside it."""
    try:
        return Profile.load(path)
    except ProfileError:
        if _is_ftri_result(Path(path)):
            raise ProfileError(
                f"{path} is an fTRI result, not a steering profile: use "
                f"{Path(path).with_name('profile.json')}, which the same fTRI run wrote"
            ) from None
        raise


def _is_ftri_result(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FTRI_FORMAT


def profile_target(path: str | os.PathLike) -> Path:
    """Where to save a profile: its directory must exist (a typo must not create a directory tree)."""
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise ProfileError(
            f"cannot save {target}: the directory {target.parent} does not exist; create it first or save elsewhere"
        )
    return target


def super_experts_off(model: Model, profile: Profile, n_threads: int | None = None) -> SuperExpertCheck:
    """The super-experts among the experts the profile switches off (checked on the model, cached)."""
    return check_super_experts(model, off_experts(profile.entries, profile.strength), n_threads=n_threads)


def super_expert_note(model: Model, check: SuperExpertCheck, layer: int, expert: int) -> str:
    return (
        f"a super-expert of {model.path.name} (switched off alone it costs {check.kl[(layer, expert)]:.3g} nats "
        f"of KL on neutral text, a typical expert {check.median:.2g})"
    )


def tokens_to_generate(n_predict: int, n_ctx: int) -> int:
    """-n as llama.cpp reads it: -1 is until the end of generation, bounded by the context."""
    return n_ctx if n_predict < 0 else n_predict
