#!/usr/bin/env python3
"""The pinned upstream: fetch the llama-cpp-python sdist, patch its llama.cpp, vendor its bindings.

Nothing from upstream is committed to this repository. At build time CMake runs

    upstream.py prepare  --dest BUILD/upstream     # extract the pinned sdist, apply patches/
    upstream.py bindings --dest BUILD/engine       # its Python bindings as mote_local_engine.llama_cpp

Developers changing the patches run

    upstream.py workspace --dest DIR   # a git repo of the pinned source, one commit per patch
    (edit, commit or amend in DIR)
    upstream.py regen --from DIR       # rewrite patches/ from DIR's commits

The sdist comes from $MOTE_LLAMA_SDIST when set (offline builds), else from the cache
($MOTE_CACHE_DIR or ~/.cache/mote-local), else from the package index via `pip download`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PIN = "0.3.36"  # llama-cpp-python; the only place the upstream version is named
SDIST_NAME = f"llama_cpp_python-{PIN}.tar.gz"
SDIST_ROOT = f"llama_cpp_python-{PIN}"
LLAMA_CPP_SUBDIR = "vendor/llama.cpp"
ENGINE_PACKAGE = "mote_local_engine"
ENGINE_LIBRARY = "mote_llama"  # libmote_llama.so: never the name of another llama.cpp build

REPO = Path(__file__).resolve().parent.parent
PATCHES = REPO / "patches"
REGENERATE_HINT = (
    f"regenerate the patch against the pinned llama-cpp-python=={PIN}: "
    "python tools/upstream.py workspace --dest DIR, fix the commit there, "
    "then python tools/upstream.py regen --from DIR"
)


class UpstreamError(Exception):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("MOTE_CACHE_DIR") or Path.home() / ".cache" / "mote-local")


def fetch() -> Path:
    """Path of the pinned sdist, downloading it into the cache when needed."""
    override = os.environ.get("MOTE_LLAMA_SDIST")
    if override:
        path = Path(override)
        if not path.is_file():
            raise UpstreamError(f"MOTE_LLAMA_SDIST={override} is not a file: point it at {SDIST_NAME}")
        return path
    cached = cache_dir() / "sdist" / SDIST_NAME
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        # --no-build-isolation: preparing the sdist's metadata needs only scikit-build-core,
        # which is already present wherever this project builds
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            "llama-cpp-python",
            "--no-build-isolation",
            "-d",
            tmp,
            f"llama-cpp-python=={PIN}",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / SDIST_NAME
        if result.returncode != 0 or not downloaded.is_file():
            raise UpstreamError(
                f"could not download llama-cpp-python=={PIN}: {result.stderr.strip()[-800:]}\n"
                f"For an offline build set MOTE_LLAMA_SDIST to a local {SDIST_NAME}"
            )
        os.replace(downloaded, cached)
    return cached


def extract(sdist: Path, dest: Path, members: tuple[str, ...]) -> Path:
    """Extracts the given sdist subtrees into dest; returns the sdist root inside dest."""
    prefixes = tuple(f"{SDIST_ROOT}/{m}" for m in members)
    with tarfile.open(sdist) as tar:
        # the sdist keeps llama.cpp's submodule .git link, which would point git at a missing repo
        chosen = [m for m in tar.getmembers() if m.name.startswith(prefixes) and Path(m.name).name != ".git"]
        if not chosen:
            raise UpstreamError(f"{sdist} does not contain {members}: is it llama-cpp-python=={PIN}?")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=chosen, **kwargs)
    return dest / SDIST_ROOT


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def _git(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # the ceiling keeps git from treating an enclosing repository (e.g. this one, around the
    # build directory) as the tree to patch
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(cwd.parent))
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=check)


def apply_patches(llama_dir: Path, patches: list[Path] | None = None) -> list[str]:
    """Applies patches (default: patches/) in order, skipping applied ones. Returns what was applied."""
    if shutil.which("git") is None:
        raise UpstreamError("git is needed to apply patches/ to the pinned llama.cpp: install git")
    applied = []
    for patch in patch_files() if patches is None else patches:
        if _git(["apply", "--check", "--reverse", str(patch)], llama_dir, check=False).returncode == 0:
            continue  # already applied
        result = _git(["apply", "--whitespace=nowarn", str(patch)], llama_dir, check=False)
        if result.returncode != 0:
            raise UpstreamError(
                f"{patch.name} does not apply to {llama_dir}:\n{result.stderr.strip()}\n{REGENERATE_HINT}"
            )
        applied.append(patch.name)
    return applied


_PATCHED_FILES = re.compile(r"^\+\+\+ b/(\S+)", re.M)
STAMP = ".mote-patches"  # the patch series a tree was patched with, and the files it touched


def _series() -> tuple[str, list[str]]:
    """(digest of patches/, the upstream files they touch)."""
    texts = [p.read_text() for p in patch_files()]
    touched = sorted({f for text in texts for f in _PATCHED_FILES.findall(text)})
    return hashlib.sha256("\0".join(texts).encode()).hexdigest(), touched


def prepare(dest: Path) -> Path:
    """The patched llama.cpp source tree under dest (extracted once, patched idempotently). A tree patched
    by another version of patches/ gets the files that series touched back from the sdist first."""
    root = dest / SDIST_ROOT
    llama_dir = root / LLAMA_CPP_SUBDIR
    if not (llama_dir / "CMakeLists.txt").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        extract(fetch(), dest, (LLAMA_CPP_SUBDIR + "/", "llama_cpp/"))
    digest, touched = _series()
    stamp = llama_dir / STAMP
    if stamp.is_file():
        old_digest, *old_touched = stamp.read_text().split("\n")
        if old_digest != digest:
            extract(
                fetch(), dest, tuple(f"{LLAMA_CPP_SUBDIR}/{f}" for f in sorted(set(old_touched) | set(touched)) if f)
            )
    apply_patches(llama_dir)
    stamp.write_text("\n".join([digest, *touched]))
    return llama_dir


# Absolute imports of the bindings' own package, rewritten so that the vendored copy never
# resolves to (or shadows) a llama-cpp-python the user has installed.
_IMPORT_AS = re.compile(r"^(\s*)import llama_cpp((?:\.\w+)+) as (\w+)", re.M)
_FROM = re.compile(r"^(\s*)from llama_cpp((?:\.\w+)*) import", re.M)
_IMPORT_DOTTED = re.compile(r"^(\s*)import llama_cpp((?:\.\w+)+)\s*$", re.M)
_IMPORT_BARE = re.compile(r"^(\s*)import llama_cpp\s*$", re.M)


def rewrite_bindings_source(text: str) -> str:
    pkg = f"{ENGINE_PACKAGE}.llama_cpp"
    text = _IMPORT_AS.sub(rf"\1import {pkg}\2 as \3", text)
    text = _FROM.sub(rf"\1from {pkg}\2 import", text)
    text = _IMPORT_DOTTED.sub(rf"\1import {pkg}\2; from {ENGINE_PACKAGE} import llama_cpp", text)
    text = _IMPORT_BARE.sub(rf"\1from {ENGINE_PACKAGE} import llama_cpp", text)
    text = text.replace('_lib_base_name = "llama"', f'_lib_base_name = "{ENGINE_LIBRARY}"')
    # the user's LLAMA_CPP_LIB_PATH is for their own llama-cpp-python, not for this engine
    text = text.replace('"LLAMA_CPP_LIB_PATH"', '"MOTE_LLAMA_LIB_PATH"')
    # the shared library sits in the engine package, one level above the bindings
    text = text.replace(
        'pathlib.Path(os.path.abspath(os.path.dirname(__file__))) / "lib"',
        'pathlib.Path(os.path.abspath(os.path.dirname(__file__))).parent / "lib"',
    )
    return text


def bindings(dest: Path) -> Path:
    """Writes ENGINE_PACKAGE (the pinned bindings, rewritten) under dest; returns its path."""
    with tempfile.TemporaryDirectory() as tmp:
        root = extract(fetch(), Path(tmp), ("llama_cpp/",))
        package = dest / ENGINE_PACKAGE
        target = package / "llama_cpp"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for src in sorted((root / "llama_cpp").glob("*.py")):
            text = rewrite_bindings_source(src.read_text(encoding="utf-8"))
            (target / src.name).write_text(text, encoding="utf-8")
        (target / "py.typed").touch()
        (package / "__init__.py").write_text(
            '"""mote-local\'s engine: llama.cpp patched for expert steering, with the bindings of\n'
            f'llama-cpp-python=={PIN} (generated at build time; do not edit)."""\n\n'
            f'LLAMA_CPP_PYTHON_VERSION = "{PIN}"\nLIBRARY_NAME = "{ENGINE_LIBRARY}"\n',
            encoding="utf-8",
        )
    return package


def workspace(dest: Path) -> Path:
    """A git repository of the pinned llama.cpp with one commit per patch, for editing patches."""
    if dest.exists():
        raise UpstreamError(f"{dest} exists: choose a new directory")
    root = extract(fetch(), dest, (LLAMA_CPP_SUBDIR + "/",))
    llama_dir = root / LLAMA_CPP_SUBDIR
    ident = ["-c", "user.name=mote-local", "-c", "user.email=mote-local@localhost"]
    _git(["init", "-q", "."], llama_dir)
    _git(["add", "-A"], llama_dir)
    _git([*ident, "commit", "-qm", f"llama.cpp from llama-cpp-python=={PIN}"], llama_dir)
    _git(["tag", "pinned"], llama_dir)
    for patch in patch_files():
        _git([*ident, "am", "-q", str(patch)], llama_dir)
    return llama_dir


def regen(src: Path) -> list[Path]:
    """Rewrites patches/ from the commits after the `pinned` tag in a workspace."""
    with tempfile.TemporaryDirectory() as tmp:
        _git(["format-patch", "-q", "--no-signature", "--zero-commit", "-o", tmp, "pinned..HEAD"], src)
        new = sorted(Path(tmp).glob("*.patch"))
        if not new:
            raise UpstreamError(f"{src} has no commits after the pinned tag")
        for old in patch_files():
            old.unlink()
        written = []
        for path in new:
            target = PATCHES / path.name
            shutil.copyfile(path, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="print the path of the pinned sdist, downloading it if needed")
    for name in ("prepare", "bindings", "workspace"):
        sub.add_parser(name).add_argument("--dest", type=Path, required=True)
    sub.add_parser("regen").add_argument("--from", dest="src", type=Path, required=True)
    sub.add_parser("pin", help="print the pinned llama-cpp-python version")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch())
        elif args.command == "prepare":
            print(prepare(args.dest.resolve()))
        elif args.command == "bindings":
            print(bindings(args.dest.resolve()))
        elif args.command == "workspace":
            print(workspace(args.dest.resolve()))
        elif args.command == "regen":
            for path in regen(args.src.resolve()):
                print(path)
        elif args.command == "pin":
            print(PIN)
    except (UpstreamError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or ""
        print(f"error: {err}\n{detail}".rstrip(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
