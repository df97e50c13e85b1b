"""The `mote serve` launcher without a running server: profiles resolved, validated and compiled for the server,
`--rpc` servers checked first, llama-server's flags passed on verbatim, and `mote serve --help` listing both."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from mote_local.cli.commands import main
from mote_local.errors import MoteError
from mote_local.serve.launcher import PROFILES_ENV, parse_profile_option, prepare, server_binary
from mote_local.steering.entries import Mode
from mote_local.steering.profile import Profile


def test_profile_option():
    assert parse_profile_option(["a=x.json", "y/b.gguf"]) == {"a": Path("x.json"), "b": Path("y/b.gguf")}
    for bad, fragment in (
        (["a="], "expected NAME=FILE"),
        (["a=x", "a=y"], "given twice"),
        (["bad name=x.json"], "letters, digits"),
    ):
        with pytest.raises(MoteError, match=fragment):
            parse_profile_option(bad)


def test_profiles_are_validated_and_compiled_and_flags_pass_verbatim(planted_files, truth, tmp_path, monkeypatch):
    monkeypatch.setenv("MOTE_CACHE_DIR", str(tmp_path / "cache"))
    path = planted_files[0]
    profile = Profile.from_entries(truth.entries(Mode.DROP), model_path=path)
    saved = profile.save(tmp_path / "off.json")
    launch = prepare(path, [f"off={saved}"], ["-c", "2048", "--jinja", "--temp", "0.5"])
    assert launch.argv == [str(server_binary()), "--model", str(path), "-c", "2048", "--jinja", "--temp", "0.5"]
    assert launch.profiles == ["off"]
    compiled = json.loads(open(launch.env[PROFILES_ENV]).read())
    assert compiled == {
        "off": {"strength": 1.0, "entries": [{"layer": l, "expert": e, "mode": "drop"} for l, e in truth.planted]}
    }


def test_what_cannot_serve_is_one_line_before_the_server_starts(planted_files, tiny_path, truth, tmp_path):
    path = planted_files[0]
    other = Profile.from_entries(truth.entries(Mode.DROP), model_path=tiny_path("qwen3moe")).save(tmp_path / "o.json")
    (tmp_path / "broken.json").write_text("{")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens there once the socket is closed
    cases = [
        ([f"x={other}"], [], "--profile x="),
        ([f"x={tmp_path / 'broken.json'}"], [], "not valid JSON"),
        ([f"x={tmp_path / 'none.json'}"], [], "not found"),
        ([], ["--rpc", "nohost"], "HOST:PORT"),
        ([], [f"--rpc=127.0.0.1:{closed}"], "127.0.0.1"),
        ([], ["-m", "other.gguf"], "takes the model as its argument"),
    ]
    for profiles, args, fragment in cases:
        with pytest.raises(MoteError) as err:
            prepare(path, profiles, args)
        assert fragment in str(err.value) and "\n" not in str(err.value), (profiles, args, err.value)
    with pytest.raises(MoteError):
        prepare(tmp_path / "missing.gguf", [], [])
    # a profile for another model loads with --force-profile
    assert prepare(path, [f"x={other}"], [], force_profiles=True).profiles == ["x"]


def test_help_lists_mote_serves_options_and_llama_servers():
    out = CliRunner().invoke(main, ["serve", "--help"])
    assert out.exit_code == 0, out.output
    assert "--profile NAME=FILE" in out.output and "--force-profile" in out.output
    assert "llama-server's options" in out.output
    for flag in ("--ctx-size", "--parallel", "--api-key", "--jinja", "--rpc"):  # llama-server's own help
        assert flag in out.output


def test_the_command_reports_bad_input_in_one_line(planted_files, tmp_path):
    out = CliRunner().invoke(main, ["serve", str(planted_files[0]), "--profile", f"x={tmp_path / 'no.json'}"])
    assert out.exit_code != 0
    assert "not found" in out.output and "Traceback" not in out.output
    assert os.environ.get(PROFILES_ENV) is None
