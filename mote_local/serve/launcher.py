"""`mote serve MODEL [llama-server flags…]`: llama.cpp's llama-server, built with this package's engine.

The server is `mote_local_engine/bin/mote-server` (llama-server from the pinned sdist with the call sites of
patches/0005; the steering and routing logic is in native/mote-server.cpp). This module only prepares its
command line: it checks the model file and the `--rpc` servers (llama.cpp aborts on a missing one), loads and
validates the `--profile NAME=FILE` profiles (JSON or GGUF, with the rules every command applies) and hands
them to the server compiled, through the file named by $MOTE_SERVER_PROFILES; the `--rpc` endpoints go in
$MOTE_SERVER_RPC, so that the server answers HTTP 503 with the reason once one of them is lost. Every other flag goes to
llama-server verbatim, so llama-server's documentation applies as it is.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mote_local import cache
from mote_local.atomic import atomic_write_text
from mote_local.engine import rpc
from mote_local.errors import InputError, ProfileError
from mote_local.modelfile.layout import MoeLayout, read_layout
from mote_local.steering.profile import Profile, entry_to_json

__all__ = ["Launch", "parse_profile_option", "prepare", "server_binary"]

PROFILES_ENV = "MOTE_SERVER_PROFILES"
RPC_ENV = "MOTE_SERVER_RPC"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Launch:
    argv: list[str]  # the server's command line
    env: dict[str, str]  # what to add to the environment
    profiles: list[str]  # the names requests may use


def server_binary() -> Path:
    """llama-server as this package built it."""
    return rpc.bundled_binary("mote-server", "server")


def parse_profile_option(values: Sequence[str]) -> dict[str, Path]:
    """``--profile NAME=FILE`` (or ``FILE``, named after its stem) options as a name -> path dict."""
    out: dict[str, Path] = {}
    for value in values:
        name, eq, path = value.partition("=")
        if not eq:
            name, path = Path(value).stem, value
        if not path:
            raise InputError(f"--profile {value!r}: expected NAME=FILE")
        if not _NAME_RE.fullmatch(name):
            raise InputError(
                f"--profile {value!r}: name the profile with letters, digits, '.', '_' or '-' (at most 64)"
            )
        if name in out:
            raise InputError(f"--profile {value!r}: the name {name!r} is given twice")
        out[name] = Path(path)
    return out


def compile_profiles(paths: dict[str, Path], layout: MoeLayout, *, force: bool = False) -> str:
    """The profiles as the server reads them: {NAME: {"strength": S, "entries": [...]}}, each validated for
    the model (a file that does not fit is an error naming it)."""
    out = {}
    for name, path in paths.items():
        try:
            profile = Profile.load(path).validate(layout, force=force)
        except ProfileError as err:
            raise ProfileError(f"--profile {name}={path}: {err}") from None
        out[name] = {"strength": profile.strength, "entries": [entry_to_json(e) for e in profile.entries]}
    return json.dumps(out, sort_keys=True)


def _rpc_endpoints(args: Sequence[str]) -> list[str]:
    """The endpoints of llama-server's `--rpc SERVERS` (or `--rpc=SERVERS`) among args."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--rpc":
            if i + 1 >= len(args):
                raise InputError("--rpc needs HOST:PORT[,HOST:PORT…] (e.g. 192.168.1.10:50052)")
            out += rpc.parse_endpoints(args[i + 1])
        elif arg.startswith("--rpc="):
            out += rpc.parse_endpoints(arg.removeprefix("--rpc="))
    return out


def prepare(
    model: Path, profiles: Sequence[str], server_args: Sequence[str], *, force_profiles: bool = False
) -> Launch:
    """The server's command line for MODEL, after every check that can fail with one line."""
    for arg in server_args:
        if arg in ("-m", "--model", "-hf", "--hf-repo", "-mu", "--model-url") or arg.startswith("--model="):
            raise InputError(f"{arg}: mote serve takes the model as its argument (mote serve MODEL …)")
    named = parse_profile_option(profiles)
    layout = read_layout(model)
    env = {}
    if named:
        text = compile_profiles(named, layout.require_moe(), force=force_profiles)
        # named by content: the server reads it when it loads the model, after this process has become it
        path = cache.cache_dir("serve", f"profiles-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        env[PROFILES_ENV] = str(path)
    endpoints = _rpc_endpoints(server_args)
    for endpoint in endpoints:
        rpc.probe(endpoint)  # llama.cpp's client aborts on a missing, busy or incompatible server
    if endpoints:
        env[RPC_ENV] = ",".join(endpoints)  # the server watches them: a lost one is HTTP 503 with the reason
    argv = [str(server_binary()), "--model", str(layout.path), *server_args]
    return Launch(argv=argv, env=env, profiles=sorted(named))
