#!/usr/bin/env python3
"""llama.cpp's own server test suite (tools/server/tests/unit in the pinned sdist) against a llama-server binary.

The suite downloads tiny Hugging Face models; here none can be downloaded, so a pytest plugin (written next to
the extracted suite) maps every model it asks for (--hf-repo, --hf-file, --model-url, --model) to one local
model: a tiny qwen3moe with Qwen3's real vocabulary and chat template that the project generates
(mote_local/synthetic/real_vocab.py). No test or assertion is edited. Each binary runs the same files; the
result is a per-file table of passes and the tests whose outcome differs.

    python tools/server_suite.py run --bin stock=PATH --bin mote=PATH [--files test_basic.py …] [--slow] [--out DIR]

As upstream's tests.sh by default, the tests marked slow are left out unless --slow is given.

`mote` may be the installed server (python -c "from mote_local.serve.launcher import server_binary; …").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upstream

SUITE = f"{upstream.SDIST_ROOT}/{upstream.LLAMA_CPP_SUBDIR}/tools/server/tests/"

PLUGIN = '''
"""Maps the suite's Hugging Face models to one local GGUF (written by tools/server_suite.py)."""
import os
import utils

_MODEL = os.environ["MOTE_SUITE_MODEL"]
_start = utils.ServerProcess.start


def _local_start(self, *args, **kwargs):
    if self.model_hf_repo or self.model_hf_file or self.model_url or self.model_file:
        self.model_hf_repo = self.model_hf_file = self.model_url = None
        self.model_file = _MODEL
    self.model_draft = None if self.model_draft is None else _MODEL
    self.offline = True
    return _start(self, *args, **kwargs)


utils.ServerProcess.start = _local_start
utils.ServerPreset.load_all = staticmethod(lambda: None)  # nothing to download
'''


def extract(dest: Path) -> Path:
    """The suite from the pinned sdist, unpatched, with the model plugin beside it."""
    if not (dest / "unit").is_dir():
        with tarfile.open(upstream.fetch()) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(SUITE)]
            for m in members:
                m.name = m.name[len(SUITE) :]
            tar.extractall(dest, members=members, filter="data")
    (dest / "mote_suite_plugin.py").write_text(PLUGIN)
    return dest


def local_model(dest: Path) -> Path:
    """A tiny qwen3moe with Qwen3's real vocabulary and template."""
    from mote_local.synthetic import tiny

    return tiny.tiny_model("qwen3moe", cache_dir=dest, vocab="qwen3")


def run_suite(
    suite: Path, binary: Path, model: Path, files: list[str], junit: Path, timeout: int, slow: bool, port: int
) -> None:
    env = {
        "LLAMA_SERVER_BIN_PATH": str(binary),
        "MOTE_SUITE_MODEL": str(model),
        "LLAMA_CACHE": str(suite / "tmp"),
        "PORT": str(port),
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "mote_suite_plugin",
        "-q",
        "-o",
        "addopts=",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        f"--timeout={timeout}",
        *([] if slow else ["-m", "not slow"]),
        *[f"unit/{f}" for f in files],
    ]
    subprocess.run(cmd, cwd=suite, env=os.environ | env)


def outcomes(junit: Path) -> dict[str, str]:
    """test id -> passed / failed / skipped."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("skipped") is not None:
            out[name] = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            out[name] = "failed"
        else:
            out[name] = "passed"
    return out


def table(results: dict[str, dict[str, str]]) -> str:
    kinds = list(results)
    files = sorted({t.split("::")[0] for r in results.values() for t in r})
    lines = ["| file | tests | " + " | ".join(f"{k} passes" for k in kinds) + " |", "|---|---:|" + "---:|" * len(kinds)]
    for f in files:
        n = len({t for r in results.values() for t in r if t.split("::")[0] == f})
        passes = [sum(1 for t, o in results[k].items() if t.split("::")[0] == f and o == "passed") for k in kinds]
        lines.append(f"| {f} | {n} | " + " | ".join(str(p) for p in passes) + " |")
    totals = [sum(o == "passed" for o in results[k].values()) for k in kinds]
    n_all = len({t for r in results.values() for t in r})
    lines.append(f"| **all** | {n_all} | " + " | ".join(f"**{p}**" for p in totals) + " |")
    return "\n".join(lines)


def report(results: dict[str, dict[str, str]]) -> None:
    print(table(results))
    if len(results) >= 2:
        base, other = list(results)[:2]
        differ = sorted(t for t in results[base] if results[base][t] != results[other].get(t))
        print(f"\n{len(differ)} tests differ ({base} vs {other}):")
        for t in differ:
            print(f"  {t}: {results[base][t]} vs {results[other].get(t, 'absent')}")
        passed = [t for t, o in results[base].items() if o == "passed"]
        kept = sum(results[other].get(t) == "passed" for t in passed)
        print(
            f"\nof the {len(passed)} tests {base} passes, {other} passes {kept} "
            f"({100 * kept / max(1, len(passed)):.1f}%)"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the suite against each binary, then report")
    run.add_argument("--bin", action="append", required=True, metavar="NAME=PATH", help="a server binary; repeatable")
    run.add_argument("--files", nargs="*", default=None, help="test files (default: every file of unit/)")
    run.add_argument("--out", type=Path, default=Path("build/server-suite"))
    run.add_argument("--timeout", type=int, default=300, help="seconds per test")
    run.add_argument("--slow", action="store_true", help="also the tests marked slow (upstream's tests.sh skips them)")
    run.add_argument("--port", type=int, default=8080, help="the port the servers listen on")
    rep = sub.add_parser("report", help="the table of earlier runs")
    rep.add_argument("--xml", action="append", required=True, metavar="NAME=JUNIT")
    args = ap.parse_args(argv)
    if args.command == "report":
        report({n: outcomes(Path(x)) for n, _, x in (item.partition("=") for item in args.xml)})
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()  # the suite runs in its own directory
    suite = extract(args.out / "suite")
    model = local_model(args.out)
    files = args.files or sorted(p.name for p in (suite / "unit").glob("test_*.py"))
    results = {}
    for item in args.bin:
        name, _, path = item.partition("=")
        junit = args.out / f"{name}.xml"
        run_suite(suite, Path(path).resolve(), model, files, junit, args.timeout, args.slow, args.port)
        results[name] = outcomes(junit)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
