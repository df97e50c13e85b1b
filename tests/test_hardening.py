"""Hardening: bad model files, bad steering, bad prompt sets, faults (Ctrl-C, SIGKILL, disk full), isolation
between sessions and sequences, and fuzzing of the parsers and statistics.

Everything that could take the interpreter down (llama.cpp aborts on some files its parser accepts) runs in a
subprocess, so that a regression shows as a failed test with the signal, not as a dead pytest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pathlib
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf_shards import split_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mote_local.cli.commands import main
from mote_local.engine.model import Model, Session
from mote_local.errors import ModelFileError, NotMoeError, SteeringError
from mote_local.evaluation import report
from mote_local.evaluation.evaluate import EvalResult, evaluate
from mote_local.ftri import capture as ftri
from mote_local.ftri.stats import METHODS, Activations, FtriResult, analyse
from mote_local.modelfile import hub
from mote_local.modelfile import layout as layout_mod
from mote_local.modelfile.fingerprint import Fingerprint
from mote_local.modelfile.layout import read_header, read_layout
from mote_local.prompts import (
    Prompt,
    PromptSet,
    PromptSetError,
    load_prompt_set,
    select_classes,
)
from mote_local.steering.entries import Entry, Mode, Scope
from mote_local.steering.profile import Profile, ProfileError, ProfileMismatchError
from mote_local.synthetic import planted, tiny

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "what happened in the city yesterday"
VT = gguf.GGUFValueType
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# cases counted for the README's reliability section: every entry of these tables is one bad input
# (see test_case_count at the end)
COUNTED: dict[str, int] = {}


def counted(table: str, cases):
    COUNTED[table] = len(cases)
    return cases


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The environment of CLI subprocesses: this source tree, a private cache."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MOTE_CACHE_DIR": str(tmp_path_factory.mktemp("mote-cache")),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


# runs the CLI in a subprocess after the patch code given (a Python snippet), e.g. a slowed-down decode
_WITH_PATCH = "import sys\n{patch}\nfrom mote_local.cli.commands import main\nmain(sys.argv[1:], prog_name='mote')\n"


def mote(env, *args, patch: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = (
        [sys.executable, "-m", "mote_local.cli"]
        if patch is None
        else [sys.executable, "-c", _WITH_PATCH.format(patch=patch)]
    )
    return subprocess.run(
        cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(returncode: int, stderr: str, *needles: str) -> str:
    """A normal non-zero exit (1 or 2, never a signal) with exactly one line on stderr, naming the problem."""
    assert returncode in (1, 2), f"exit {returncode}:\n{stderr[-3000:]}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def invoke(*args):
    """The CLI in this process (for inputs refused before llama.cpp sees anything)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def copy_patched(src: Path, dst: Path, **values) -> Path:
    """A copy of src with scalar metadata values overwritten in place (keys given with '.' as '__')."""
    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    for key, value in values.items():
        field = reader.fields[key.replace("__", ".")]
        field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader
    return dst


def rewrite(src: Path, dst: Path, arch: str | None = None, set_fields=()) -> Path:
    """src written again with gguf-py: under another architecture (its keys renamed) and/or with fields set
    to (key, value, type) -- a way to change a value's type, which an in-place edit cannot."""
    reader = gguf.GGUFReader(src)
    old = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    arch = arch or old
    overrides = {k: (v, t) for k, v, t in set_fields}
    w = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue
        name = arch + key[len(old) :] if key.startswith(old + ".") else key
        if name in overrides:
            continue
        vtype = field.types[0]
        w.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1] if vtype == VT.ARRAY else None)
    for key, (value, vtype) in overrides.items():
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _part_offsets(field) -> list[int]:
    """File offset of each part of a reader field."""
    offsets = [field.offset]
    for part in field.parts:
        offsets.append(offsets[-1] + part.nbytes)
    return offsets


def _with(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


# ---------------------------------------------------------------------------------------------- 1. model files


@pytest.fixture(scope="module")
def bad_models(tiny_path, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (a broken model file, what its error must say)."""
    d = tmp_path_factory.mktemp("bad-models")
    qwen, deepseek = tiny_path("qwen3moe"), tiny_path("deepseek2")
    data = qwen.read_bytes()
    reader = gguf.GGUFReader(qwen)
    tokens = reader.fields[gguf.Keys.Tokenizer.LIST]
    t6 = _part_offsets(reader.tensors[5].field)  # [name_len, name, n_dims, dims, type, offset, end]
    arch_value = _part_offsets(reader.fields[gguf.Keys.General.ARCHITECTURE])[-2]
    # two ordinary tokens of one byte length: writing one over the other makes the vocabulary hold it twice
    words = [tokens.parts[i].tobytes() for i in tokens.data]
    i, j = next((i, j) for i in range(20, 200) for j in range(i + 1, 200) if len(words[i]) == len(words[j]))
    twice = _with(data, _part_offsets(tokens)[tokens.data[i]], words[j])
    # the same, the way llama.cpp reads a token with a NUL byte in it: as a C string cut at the NUL
    k, m = next(
        (k, m)
        for k in range(20, 400)
        for m in range(20, 400)
        if len(words[m]) < len(words[k]) and words[k].startswith(words[m])
    )
    nul = _with(data, _part_offsets(tokens)[tokens.data[k]] + len(words[m]), b"\0")

    def raw(name: str, content: bytes) -> Path:
        (d / name).write_bytes(content)
        return d / name

    cases: dict[str, tuple[Path, str]] = {
        "empty file": (raw("empty.gguf", b""), "is empty"),
        "random bytes": (raw("random.gguf", random.Random(0).randbytes(65536)), "not a GGUF file"),
        "a text file": (raw("text.gguf", b"this is not a model\n" * 40), "not a GGUF file"),
        "magic only": (raw("magic.gguf", b"GGUF"), "truncated inside the GGUF header"),
        "cut inside the header": (raw("cut-header.gguf", data[:10]), "truncated inside the GGUF header"),
        "cut early in the metadata": (raw("cut-kv0.gguf", data[:200]), "is truncated or has a corrupt header"),
        "cut inside the metadata": (
            raw("cut-kv.gguf", data[: reader.fields[gguf.Keys.Tokenizer.SCORES].offset + 40]),
            "is truncated inside the metadata (key #",
        ),
        "cut inside the tensor table": (
            raw("cut-table.gguf", data[: t6[1] + 3]),
            "is truncated inside the tensor table (tensor #6",
        ),
        "cut at the start of the tensor data": (
            raw("cut-data0.gguf", data[: reader.data_offset + 10]),
            "is truncated inside the tensor data",
        ),
        "cut in the middle of the tensor data": (
            raw("cut-data.gguf", data[: len(data) // 2]),
            "is truncated inside the tensor data",
        ),
        "cut just before the end": (raw("cut-end.gguf", data[:-100]), "is truncated inside the tensor data"),
        "magic flipped": (raw("magic-flip.gguf", _with(data, 0, b"GGUX")), "not a GGUF file"),
        "version flipped": (raw("version.gguf", _with(data, 4, struct.pack("<I", 99))), "GGUF version 99"),
        "big-endian version": (raw("version-be.gguf", _with(data, 4, struct.pack(">I", 3))), "big-endian"),
        "tensor count huge": (raw("ntensors-huge.gguf", _with(data, 8, struct.pack("<Q", 10**12))), "header claims"),
        "tensor count too big": (
            raw("ntensors-more.gguf", _with(data, 8, struct.pack("<Q", len(reader.tensors) + 3))),
            "corrupt tensor table",
        ),
        "tensor count too small": (
            raw("ntensors-less.gguf", _with(data, 8, struct.pack("<Q", 5))),
            "holds no expert router tensor",
        ),
        "metadata count huge": (raw("nkv-huge.gguf", _with(data, 16, struct.pack("<Q", 10**12))), "header claims"),
        "tensor type unknown": (
            raw("type-bad.gguf", _with(data, t6[4], struct.pack("<I", 200))),
            "unknown tensor type 200",
        ),
        "tensor type f32 -> f16": (
            raw("type-f16.gguf", _with(data, t6[4], struct.pack("<I", 1))),
            "corrupt tensor table",
        ),
        "tensor type f32 -> q8_0": (
            raw("type-q8.gguf", _with(data, t6[4], struct.pack("<I", 8))),
            "corrupt tensor table",
        ),
        "tensor dims bigger": (
            raw("dims-big.gguf", _with(data, t6[3] + 8, struct.pack("<Q", 10**6))),
            "corrupt tensor table",
        ),
        "tensor dims smaller": (
            raw("dims-small.gguf", _with(data, t6[3] + 8, struct.pack("<Q", 32))),
            "corrupt tensor table",
        ),
        "tensor dims zero": (raw("dims-zero.gguf", _with(data, t6[3], struct.pack("<Q", 0))), "corrupt tensor table"),
        "tensor with 9 dims": (raw("ndims.gguf", _with(data, t6[2], struct.pack("<I", 9))), "9 dimensions"),
        "tensor offset past the end": (
            raw("offset-big.gguf", _with(data, t6[5], struct.pack("<Q", 10**9))),
            "corrupt tensor table",
        ),
        "tensor offset unaligned": (
            raw(
                "offset-unaligned.gguf",
                _with(data, t6[5], struct.pack("<Q", int(reader.tensors[5].field.parts[5][0]) + 4)),
            ),
            "corrupt tensor table",
        ),
        "tensor offset zero (overlap)": (
            raw("offset-zero.gguf", _with(data, t6[5], struct.pack("<Q", 0))),
            "corrupt tensor table",
        ),
        "architecture not UTF-8": (raw("arch-utf8.gguf", _with(data, arch_value, b"\xff")), "not UTF-8 text"),
        "duplicate token in the vocabulary": (raw("dup-token.gguf", twice), "twice"),
        "token cut short by a NUL byte": (raw("nul-token.gguf", nul), "twice"),
        # hyperparameters llama.cpp asserts on (each aborted the process before layout.py checked them)
        "block_count 0": (copy_patched(qwen, d / "blocks0.gguf", qwen3moe__block_count=0), "block_count is 0"),
        "block_count 600": (copy_patched(qwen, d / "blocks600.gguf", qwen3moe__block_count=600), "block_count is 600"),
        "expert_count 2000": (
            copy_patched(qwen, d / "experts2000.gguf", qwen3moe__expert_count=2000),
            "expert_count is 2000",
        ),
        "expert_count disagrees with the router": (
            copy_patched(qwen, d / "experts16.gguf", qwen3moe__expert_count=16),
            "has shape",
        ),
        "expert_used_count 0": (
            copy_patched(qwen, d / "used0.gguf", qwen3moe__expert_used_count=0),
            "expert_used_count is 0",
        ),
        "expert_used_count > expert_count": (
            copy_patched(qwen, d / "used100.gguf", qwen3moe__expert_used_count=100),
            "expert_used_count is 100",
        ),
        "unknown gating function": (
            copy_patched(deepseek, d / "gating9.gguf", deepseek2__expert_gating_func=9),
            "expert_gating_func is 9",
        ),
        "expert groups do not divide the experts": (
            copy_patched(deepseek, d / "groups3.gguf", deepseek2__expert_group_count=3),
            "do not split into 3 expert groups",
        ),
        "expert_group_used_count too big": (
            copy_patched(deepseek, d / "groupused.gguf", deepseek2__expert_group_used_count=4),
            "expert_group_used_count is 4",
        ),
        "context_length past int32": (
            copy_patched(qwen, d / "ctx.gguf", qwen3moe__context_length=3_355_443_456),
            "context_length is 3355443456",
        ),
        "block_count is a string": (
            rewrite(qwen, d / "blocks-str.gguf", set_fields=[("qwen3moe.block_count", "four", VT.STRING)]),
            "not an integer",
        ),
        "a profile given as the model": (
            Profile((Entry(0, 0, Mode.MASK),)).save(d / "profile.gguf"),
            "not a llama.cpp language model",
        ),
        "a directory": (d, "is a directory"),
        "a missing file": (d / "missing.gguf", "model file not found"),
    }
    cases.update(_bad_splits(qwen, deepseek, d))
    fifo = d / "pipe.gguf"
    os.mkfifo(fifo)  # opening a FIFO for reading blocks: the check must not open it
    cases["a named pipe"] = (fifo, "not a regular file")
    return counted("model files", cases)


def _bad_splits(qwen: Path, deepseek: Path, d: Path) -> dict[str, tuple[Path, str]]:
    """Split models (3 shards) with a shard missing, broken, or from another model or split."""

    def shards(name: str, src: Path = qwen, n: int = 3, style: str = "gguf-py") -> list[Path]:
        return split_gguf(src, d / name, n, style)

    n_tensors = len(gguf.GGUFReader(qwen).tensors)
    missing, no_first, truncated, empty = (
        shards("missing"),
        shards("no-first", style="no-tensor-first-split"),
        shards("truncated"),
        shards("empty"),
    )
    other_split, other_model, renamed = shards("other-split"), shards("other-model"), shards("renamed")
    missing[2].unlink()
    no_first[1].unlink()
    truncated[1].write_bytes(truncated[1].read_bytes()[: truncated[1].stat().st_size // 2])
    empty[1].write_bytes(b"")
    shutil.copyfile(shards("two", n=2)[1], other_split[1])
    shutil.copyfile(shards("deepseek", src=deepseek)[2], other_model[2])
    shutil.copyfile(renamed[0], d / "renamed" / "model.gguf")
    (d / "count").mkdir()
    count = [
        copy_patched(shard, d / "count" / shard.name, split__tensors__count=n_tensors + 1)
        for shard in shards("count-src")
    ]
    return {
        "split: a later shard given": (shards("later")[1], "is shard 2 of 3 of a split model: give its first shard"),
        "split: a shard missing": (missing[0], f"{missing[2]} is missing: it is shard 3 of 3"),
        "split: a shard missing (no tensors in the first)": (no_first[0], f"{no_first[1]} is missing"),
        "split: a shard truncated": (truncated[0], f"{truncated[1]} is truncated inside the tensor data"),
        "split: a shard empty": (empty[0], f"shard 2 of 3 of {empty[0]}: {empty[1]} is empty"),
        "split: a shard of another split": (other_split[0], f"{other_split[1]} is not shard 2 of 3"),
        "split: a shard of another model": (other_model[0], f"{other_model[2]} is not shard 3 of 3"),
        "split: the first shard renamed": (d / "renamed" / "model.gguf", "its name does not end in -00001-of-00003"),
        "split: split.tensors.count wrong": (
            count[0],
            f"hold {n_tensors} tensors, but its split.tensors.count says {n_tensors + 1}",
        ),
    }


# the cases the CLI runs in a subprocess (both `inspect` and `run`); the in-process loop covers every case
CLI_CASES = [
    "empty file",
    "random bytes",
    "cut inside the metadata",
    "cut inside the tensor table",
    "cut in the middle of the tensor data",
    "version flipped",
    "tensor type f32 -> f16",
    "tensor offset unaligned",
    "expert_used_count > expert_count",
    "unknown gating function",
    "block_count 600",
    "duplicate token in the vocabulary",
    "a directory",
    "a named pipe",
    "split: a later shard given",
    "split: a shard missing",
    "split: a shard truncated",
    "split: a shard of another model",
]


def test_every_bad_model_file_gets_a_clear_model_file_error(bad_models):
    for name, (path, needle) in bad_models.items():
        if name == "a named pipe":
            continue  # in a subprocess below: a regression would hang
        with pytest.raises(ModelFileError) as info:
            read_layout(path)
        message = str(info.value)
        assert needle in message and str(path) in message, (name, message)
        assert "\n" not in message, (name, message)


def test_bad_model_files_never_abort_the_process(bad_models, env):
    """Model(path) on every bad file, in one child process: each raises ModelFileError; none aborts."""
    code = (
        "import json, sys\nfrom mote_local.engine.model import Model\n"
        "for name, path in json.loads(sys.argv[1]):\n"
        "    try:\n        Model(path).close(); print(json.dumps([name, 'loaded', '']), flush=True)\n"
        "    except Exception as e:\n        print(json.dumps([name, type(e).__name__, str(e)]), flush=True)\n"
    )
    todo = [[name, str(path)] for name, (path, _) in bad_models.items()]
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(todo)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    results = {row[0]: row[1:] for row in map(json.loads, r.stdout.splitlines())}
    assert r.returncode == 0, f"child died with {r.returncode} after {list(results)[-1:]}: {r.stderr[-2000:]}"
    for name, (_path, needle) in bad_models.items():
        kind, message = results[name]
        assert kind in ("ModelFileError", "NotMoeError") and needle in message, (name, kind, message)


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_inspect_and_run_refuse_bad_model_files_in_one_line(bad_models, env, case):
    path, needle = bad_models[case]
    for command in (["inspect", path], ["run", path, "-p", PROMPT, "-n", "2", "-c", "64"]):
        r = mote(env, *command, timeout=60)
        assert_one_line_error(r.returncode, r.stderr, needle, str(path))


def test_cli_inspect_in_process_for_every_bad_file(bad_models):
    for name, (path, needle) in bad_models.items():
        if name == "a named pipe":
            continue
        r = invoke("inspect", path)
        assert r.exit_code == 1, (name, r.output)
        assert_one_line_error(r.exit_code, r.stderr, needle)


@pytest.fixture(scope="module")
def bad_model_names(tmp_path_factory) -> dict[str, tuple[str, Path | None, str]]:
    """name -> (a model name, the ollama store it is looked up in, what its error must say): names that are not
    paths (hub.resolve_model, hub.resolve_hf); the Hub's own answers are in tests/test_hub.py."""
    d = tmp_path_factory.mktemp("ollama")
    manifests = d / "store" / "manifests" / "registry.ollama.ai" / "library"
    for name, doc in {
        "planted": {"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "ab" * 32}]},
        "notjson": None,
        "nolayer": {
            "layers": [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32}]
        },
        "baddigest": {"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "../../etc/passwd"}]},
    }.items():
        (manifests / name).mkdir(parents=True)
        (manifests / name / "latest").write_text("{not json" if doc is None else json.dumps(doc))
    store = d / "store"
    return counted(
        "model names",
        {
            "hf: no organisation": ("just-a-name", None, "is not a Hugging Face model name"),
            "hf: too many parts": ("a/b/c", None, "is not a Hugging Face model name"),
            "hf: two tags": ("org/name:Q4_K_M:Q8_0", None, "is not a Hugging Face model name"),
            "hf: empty name": ("org/", None, "is not a Hugging Face model name"),
            "ollama: no store": ("ollama:qwen3", d / "nowhere", "no ollama model store at"),
            "ollama: empty name": ("ollama:", store, "is not an ollama model name"),
            "ollama: a name not there": ("ollama:qwen3:30b", store, "ollama model qwen3:30b is not in"),
            "ollama: a tag not there": ("ollama:planted:q8", store, "ollama model planted:q8 is not in"),
            "ollama: the blob missing": (
                "ollama:planted",
                store,
                "the model blob of ollama's planted:latest, is missing",
            ),
            "ollama: a manifest that is not JSON": ("ollama:notjson", store, "is not an ollama manifest"),
            "ollama: a manifest without a model layer": ("ollama:nolayer", store, "is not an ollama manifest"),
            "ollama: a digest that is not sha256": ("ollama:baddigest", store, "not a sha256 digest"),
        },
    )


def test_every_bad_model_name_gets_one_line_naming_the_fix(bad_model_names, monkeypatch):
    for name, (spec, store, needle) in bad_model_names.items():
        monkeypatch.setenv("OLLAMA_MODELS", str(store or "/nonexistent"))
        with pytest.raises(ModelFileError) as info:
            hub.resolve_model(spec) if spec.startswith(hub.OLLAMA_PREFIX) else hub.resolve_hf(spec)
        message = str(info.value)
        assert needle in message and "\n" not in message, (name, message)
        assert any(fix in message for fix in ("ollama pull", "give", "OLLAMA_MODELS")), (name, message)


def test_dense_model_inspects_but_run_refuses(tiny_path, env):
    dense = tiny_path(tiny.DENSE)
    r = invoke("inspect", dense)
    assert r.exit_code == 0 and "dense (no experts)" in r.output
    r = mote(env, "run", dense, "-p", PROMPT, "-n", "2")
    assert_one_line_error(r.returncode, r.stderr, "is a dense model", "Mixture-of-Experts")
    with Model(dense) as m, m.session(n_ctx=64) as s:  # the engine loads it; only steering and capture need experts
        with pytest.raises(NotMoeError):
            s.steer([Entry(0, 0, Mode.MASK)])


def test_unreadable_model_file(tiny_path, tmp_path, env):
    locked = tmp_path / "locked.gguf"
    shutil.copyfile(tiny_path("qwen3moe"), locked)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop this user reading (see the monkeypatched test)")
        with pytest.raises(ModelFileError, match="permission denied"):
            read_layout(locked)
        for command in (["inspect", locked], ["run", locked, "-p", PROMPT]):
            r = mote(env, *command)
            assert_one_line_error(r.returncode, r.stderr, "permission denied", "chmod")
    finally:
        locked.chmod(0o644)


def test_unreadable_model_file_message(tiny_path, monkeypatch):
    """The permission path as root sees it never: open() refused."""

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(layout_mod, "open", refuse, raising=False)
    path = tiny_path("qwen3moe")
    with pytest.raises(ModelFileError, match=r"cannot read .*: permission denied; make the file readable"):
        read_layout(path)
    with pytest.raises(ModelFileError, match="permission denied"):
        Model(path)
    r = invoke("inspect", path)
    assert_one_line_error(r.exit_code, r.stderr, "permission denied")


@pytest.fixture(scope="module")
def granite(tiny_path, tmp_path_factory) -> Path:
    """The tiny mixtral as `granitemoe`: an MoE architecture llama.cpp loads whose file does not say its gating
    (no gating or weight-normalisation key: the graph's defaults decide)."""
    return rewrite(
        tiny_path("mixtral"),
        tmp_path_factory.mktemp("granite") / "granitemoe.gguf",
        "granitemoe",
        [("granitemoe.logit_scale", 1.0, VT.FLOAT32)],
    )


def test_moe_arch_whose_keys_do_not_say_its_gating_is_inspected_from_the_engine_and_steers(granite):
    layout = read_layout(granite)
    keys = read_header(granite).values
    assert layout.arch == "granitemoe" and layout.is_moe
    assert not any(k.endswith((".expert_gating_func", ".expert_weights_norm")) for k in keys)  # the keys do not say
    r = invoke("inspect", granite)
    assert r.exit_code == 0 and "softmax, top-k weights" in next(l for l in r.output.splitlines() if "gating" in l)
    assert json.loads(invoke("inspect", granite, "--json").stdout)["gating"] == "softmax"
    with Model(granite) as m, m.session(n_ctx=64, n_threads=1) as s:
        toks = m.tokenize(PROMPT)
        with s.capture() as cap:
            idle = s.logits(toks)
        layer, busiest = 0, int(np.argmax(cap.stats().counts[0]))
        s.steer([Entry(layer, busiest, Mode.MASK)])
        with s.capture() as cap:
            masked = s.logits(toks)
        assert cap.stats().counts[layer, busiest] == 0 and not np.array_equal(masked, idle)


def test_validation_accepts_every_good_file(tiny_path, model_dir):
    for arch in (*tiny.ARCHS, tiny.DENSE):
        layout = read_layout(tiny_path(arch))
        assert layout.is_moe == (arch != tiny.DENSE)
    for qtype in ("f16", "q8_0", "q4_k"):
        assert read_layout(tiny_path("qwen3moe", qtype=qtype)).is_moe
    path, _ = planted.planted_model(cache_dir=model_dir)
    assert read_layout(path).is_moe


def test_a_layout_is_parsed_once_per_version_of_the_file(tiny_path, tmp_path, monkeypatch):
    monkeypatch.setattr(layout_mod, "_LAYOUTS", {})
    parsed = []
    parse = layout_mod._parse_layout
    monkeypatch.setattr(layout_mod, "_parse_layout", lambda p: parsed.append(p) or parse(p))
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_path("qwen3moe"), path)
    first = read_layout(path)
    with Model(path) as model:
        assert model.fingerprint == Fingerprint.of(path)
    assert read_layout(path) == first and len(parsed) == 1
    # the fingerprint hashes the router tensors' bytes, as gguf's reader sees them
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    routers = b"".join(tensors[f"blk.{il}.ffn_gate_inp.weight"].data.tobytes() for il in first.moe_layers)
    assert Fingerprint.of(path).router_sha256 == hashlib.sha256(routers).hexdigest()
    # the header changed in place, same size: parsed again, and the corrupt value is caught again
    data = bytearray(path.read_bytes())
    at = data.index(b"qwen3moe.expert_count") + len(b"qwen3moe.expert_count") + 4  # after the value type
    data[at : at + 4] = struct.pack("<I", 9999)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="expert"):
        read_layout(path)
    assert len(parsed) == 2


def test_validation_is_cheap_on_a_large_vocabulary(tiny_path):
    path = tiny_path("qwen3moe", n_vocab=30_000)
    started = time.perf_counter()
    gguf.GGUFReader(path)
    reader = time.perf_counter() - started
    started = time.perf_counter()
    read_layout(path)
    checked = time.perf_counter() - started
    # the structure, hyperparameter and vocabulary checks add little to what gguf-py's reader costs alone
    assert checked < 2 * reader + 1.0, (checked, reader)


# ---------------------------------------------------------------------------------------------- 2. steering

STEERING_FLAGS = counted(
    "steering flags",
    {
        "expert out of range": (["--off", "0:99"], "expert 99 is out of range"),
        "layer out of range": (["--drop", "99:0"], "layer 99 is not an MoE layer"),
        "more forced than k": (["--force", "0:0,0:1,0:2"], "selects only 2 per token: force at most 2"),
        "contradictory entries": (["--off", "0:0", "--force", "0:0"], "contradictory entries"),
        "duplicate bias": (["--bias", "0:0=1", "--bias", "0:0=2"], "two bias entries"),
        "NaN bias": (["--bias", "0:0=nan"], "must be finite or -inf"),
        "+inf bias": (["--bias", "0:0=inf"], "must be finite or -inf"),
        "negative gain": (["--gain", "0:0=-1"], "must be a finite number >= 0"),
        "NaN strength": (["--strength", "nan", "--off", "0:0"], "strength must be a finite number"),
        "negative strength on -inf": (["--strength", "-1", "--bias", "0:0=-inf"], "negative strength"),
        "every expert masked": (["--off", ",".join(f"0:{e}" for e in range(7))], "mask at most 6"),
        "malformed flag": (["--off", "0-1"], "missing ':'"),
    },
)


@pytest.fixture(scope="module")
def profile_files(tiny_path, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("bad-profiles")
    qwen = tiny_path("qwen3moe")
    good = Profile.from_entries([Entry(0, 1, Mode.MASK)], model_path=qwen)
    other = Profile.from_entries([Entry(0, 1, Mode.MASK)], model_path=tiny_path("olmoe"))
    gguf_bytes = good.save(d / "good.gguf").read_bytes()

    def text(name: str, content: str | bytes) -> Path:
        path = d / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    head = '{"format": "mote-profile", "version": 1, '
    return counted(
        "profile files",
        {
            "unknown key": (text("unknown.json", head + '"entries": [], "colour": "red"}'), "colour: unknown key"),
            "unknown entry key": (
                text("entry-key.json", head + '"entries": [{"layer": 0, "expert": 1, "mode": "mask", "weight": 2}]}'),
                "entries[0].weight: unknown key",
            ),
            "NaN literal": (
                text("nan.json", head + '"entries": [{"layer": 0, "expert": 1, "mode": "bias", "value": NaN}]}'),
                "NaN is not valid JSON",
            ),
            "unknown mode": (
                text("mode.json", head + '"entries": [{"layer": 0, "expert": 1, "mode": "off"}]}'),
                "unknown mode",
            ),
            "truncated JSON": (text("cut.json", good.to_json()[:60]), "not valid JSON"),
            "not UTF-8": (text("latin.json", b'{"name": "caf\xe9"}'), "not UTF-8 text"),
            "truncated GGUF": (text("cut.gguf", gguf_bytes[: len(gguf_bytes) // 2]), "truncated"),
            "garbage GGUF": (text("garbage.gguf", b"\x00\x01junk" * 50), "not a GGUF file"),
            "a model given as a profile": (qwen, "not a mote profile"),
            "made for another model": (other.save(d / "other.json"), "or pass --force-profile to apply it anyway"),
            "made for another model (GGUF)": (
                other.save(d / "other.gguf"),
                "or pass --force-profile to apply it anyway",
            ),
            "empty": (text("empty.json", ""), "is empty"),
            "unknown suffix": (text("profile.txt", good.to_json()), "cannot tell the profile format"),
            "a directory": (d, "cannot tell the profile format"),
        },
    )


# every numeric option of every command, out of its range: refused in one line naming the flag, before any work
NUMERIC_FLAGS = counted(
    "numeric flags",
    {
        "run -n -2": (["run", "{model}", "-p", "x", "-n", "-2"], "'--n-predict' / '-n': -2"),
        "run --temp -1": (["run", "{model}", "-p", "x", "--temp", "-1"], "'--temp': -1"),
        "run --top-k -1": (["run", "{model}", "-p", "x", "--top-k", "-1"], "'--top-k': -1"),
        "run --top-p 1.5": (["run", "{model}", "-p", "x", "--top-p", "1.5"], "'--top-p': 1.5"),
        "run --seed -1": (["run", "{model}", "-p", "x", "--seed", "-1"], "'--seed': -1"),
        "run --seed 2**32": (["run", "{model}", "-p", "x", "--seed", str(2**32)], "'--seed': 4294967296"),
        "run -c -1": (["run", "{model}", "-p", "x", "-c", "-1"], "'--ctx-size' / '-c': -1"),
        "run -ngl -1": (["run", "{model}", "-p", "x", "-ngl", "-1"], "'--n-gpu-layers' / '-ngl': -1"),
        "run -t 0": (["run", "{model}", "-p", "x", "-t", "0"], "'--threads' / '-t': 0"),
        "run -n x": (["run", "{model}", "-p", "x", "-n", "x"], "'x' is not a valid integer"),
        "chat -n -2": (["chat", "{model}", "-n", "-2"], "'--n-predict' / '-n': -2"),
        "chat --temp -0.5": (["chat", "{model}", "--temp", "-0.5"], "'--temp': -0.5"),
        "chat -t 0": (["chat", "{model}", "-t", "0"], "'--threads' / '-t': 0"),
        "ftri --top 0": (["ftri", "{model}", "--prompts", "{prompts}", "--top", "0"], "'--top': 0"),
        "ftri --n-boot 0": (["ftri", "{model}", "--prompts", "{prompts}", "--n-boot", "0"], "'--n-boot': 0"),
        "ftri --n-boot 10**6": (
            ["ftri", "{model}", "--prompts", "{prompts}", "--n-boot", "1000000"],
            "'--n-boot': 1000000",
        ),
        "ftri --per-layer-cap 0": (
            ["ftri", "{model}", "--prompts", "{prompts}", "--per-layer-cap", "0"],
            "'--per-layer-cap': 0",
        ),
        "ftri -np 0": (["ftri", "{model}", "--prompts", "{prompts}", "-np", "0"], "'--parallel' / '-np': 0"),
        "ftri -np 257": (["ftri", "{model}", "--prompts", "{prompts}", "-np", "257"], "'--parallel' / '-np': 257"),
        "ftri -b 0": (["ftri", "{model}", "--prompts", "{prompts}", "-b", "0"], "'--batch-size' / '-b': 0"),
        "ftri --seed -1": (["ftri", "{model}", "--prompts", "{prompts}", "--seed", "-1"], "'--seed': -1"),
        "ftri -t 0": (["ftri", "{model}", "--prompts", "{prompts}", "-t", "0"], "'--threads' / '-t': 0"),
        "eval --n-random -1": (
            ["eval", "{model}", "--prompts", "{prompts}", "--off", "0:1", "--n-random", "-1"],
            "'--n-random': -1",
        ),
        "eval -n 0": (
            ["eval", "{model}", "--prompts", "{prompts}", "--off", "0:1", "-n", "0"],
            "'--max-tokens' / '-n': 0",
        ),
        "eval --seed -1": (
            ["eval", "{model}", "--prompts", "{prompts}", "--off", "0:1", "--seed", "-1"],
            "'--seed': -1",
        ),
        "eval -c -1": (
            ["eval", "{model}", "--prompts", "{prompts}", "--off", "0:1", "-c", "-1"],
            "'--ctx-size' / '-c': -1",
        ),
        "demo --top 0": (["demo", "--top", "0"], "'--top': 0"),
        "inspect -t 0": (["inspect", "{model}", "--super-experts", "-t", "0"], "'--threads' / '-t': 0"),
        # the model-loading flags (issue 22, items 2 and 5): every command that loads a model takes them
        "inspect -c -1": (["inspect", "{model}", "-c", "-1"], "'--ctx-size' / '-c': -1"),
        "run -b 0": (["run", "{model}", "-p", "x", "-b", "0"], "'--batch-size' / '-b': 0"),
        "run -ub 0": (["run", "{model}", "-p", "x", "-ub", "0"], "'--ubatch-size' / '-ub': 0"),
        "run --n-cpu-moe -1": (["run", "{model}", "-p", "x", "--n-cpu-moe", "-1"], "'--n-cpu-moe' / '-ncmoe': -1"),
        "run --min-p 1.5": (["run", "{model}", "-p", "x", "--min-p", "1.5"], "'--min-p': 1.5"),
        "run --repeat-penalty 0": (["run", "{model}", "-p", "x", "--repeat-penalty", "0"], "'--repeat-penalty': 0"),
        "chat --top-k -1": (["chat", "{model}", "--top-k", "-1"], "'--top-k': -1"),
        "chat --top-p 1.5": (["chat", "{model}", "--top-p", "1.5"], "'--top-p': 1.5"),
        "chat --min-p -0.1": (["chat", "{model}", "--min-p", "-0.1"], "'--min-p': -0.1"),
        "chat --repeat-penalty -1": (["chat", "{model}", "--repeat-penalty", "-1"], "'--repeat-penalty': -1"),
        "chat --seed 2**32": (["chat", "{model}", "--seed", str(2**32)], "'--seed': 4294967296"),
        "eval -ub 0": (
            ["eval", "{model}", "--prompts", "{prompts}", "--off", "0:1", "-ub", "0"],
            "'--ubatch-size' / '-ub': 0",
        ),
    },
)


# flags whose value is refused before llama.cpp loads anything: one line naming the flag (or the value) and the fix
LOADING_FLAGS = counted(
    "model-loading flags",
    {
        "unknown cache type": (["-ctk", "q9_0"], "'--cache-type-k' / '-ctk': 'q9_0'"),
        "unknown V cache type": (["-ctv", "f8"], "'--cache-type-v' / '-ctv': 'f8'"),
        "quantized V cache without flash attention": (["-ctv", "q8_0", "-fa", "off"], "needs flash attention"),
        "quantized K cache on heads too narrow": (["-ctk", "q4_0"], "blocks of 32 values"),
        "unknown flash attention mode": (["-fa", "maybe"], "'--flash-attn' / '-fa': 'maybe'"),
        "override without a buffer type": (["-ot", "exps"], "PATTERN=BUFFER_TYPE"),
        "override to an unknown buffer type": (["-ot", "exps=GPU7"], "unknown buffer type 'GPU7'; this build has CPU"),
        "override pattern that is no regex": (["-ot", "ffn_(up=CPU"], "is not a regular expression"),
        "two models": (["-m", "{model}"], "more than one model"),
        "chat template neither a name nor a file": (
            ["--chat", "--chat-template", "nosuch.jinja"],
            "neither a built-in template",
        ),
        "tensor split that is not numbers": (["-ts", "a,b"], "--tensor-split takes proportions"),
    },
)


@pytest.mark.parametrize("case", list(LOADING_FLAGS))
def test_cli_refuses_bad_model_loading_flags_in_one_line(tiny_path, case):
    flags, needle = LOADING_FLAGS[case]
    model = tiny_path("qwen3moe")
    r = invoke("run", model, "-p", PROMPT, "-n", "1", *(f.format(model=model) for f in flags))
    assert_one_line_error(r.exit_code, r.stderr, needle)


@pytest.mark.parametrize("case", list(NUMERIC_FLAGS))
def test_cli_refuses_numbers_out_of_range_in_one_line_before_any_work(tiny_path, tmp_path, monkeypatch, case):
    args, needle = NUMERIC_FLAGS[case]
    model_loaded = []
    monkeypatch.setattr(Model, "__init__", lambda *a, **k: model_loaded.append(a))
    monkeypatch.chdir(tmp_path)
    r = invoke(*(a.format(model=tiny_path("qwen3moe"), prompts=planted.prompts_path()) for a in args))
    line = assert_one_line_error(r.exit_code, r.stderr, needle)
    assert "Invalid value for" in line and "--help" in line
    assert model_loaded == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", list(STEERING_FLAGS))
def test_cli_refuses_bad_steering_flags_in_one_line(tiny_path, case):
    flags, needle = STEERING_FLAGS[case]
    r = invoke("run", tiny_path("qwen3moe"), "-p", PROMPT, "-n", "2", *flags)
    assert_one_line_error(r.exit_code, r.stderr, needle)


def test_cli_refuses_bad_profiles_in_one_line(tiny_path, profile_files):
    for path, needle in profile_files.values():
        r = invoke("run", tiny_path("qwen3moe"), "-p", PROMPT, "-n", "2", "--profile", path)
        assert_one_line_error(r.exit_code, r.stderr, needle)


@pytest.mark.parametrize("case", ["truncated GGUF", "made for another model", "unknown key"])
def test_cli_refuses_bad_profiles_in_a_real_process(tiny_path, profile_files, env, case):
    path, needle = profile_files[case]
    r = mote(env, "run", tiny_path("qwen3moe"), "-p", PROMPT, "-n", "2", "--profile", path)
    assert_one_line_error(r.returncode, r.stderr, needle)
    r = mote(env, "profile", "validate", path, tiny_path("qwen3moe"))
    assert_one_line_error(r.returncode, r.stderr, needle)


def test_forcing_another_models_profile_still_checks_the_limits(tiny_path, tmp_path):
    olmoe = tiny_path("olmoe")
    too_many = Profile.from_entries([Entry(0, e, Mode.FORCE) for e in range(3)], model_path=olmoe)
    path = too_many.save(tmp_path / "p.json")
    r = invoke("run", tiny_path("qwen3moe"), "-p", PROMPT, "-n", "2", "--profile", path, "--force-profile")
    assert_one_line_error(r.exit_code, r.stderr, "forces 3 experts")


def test_rejected_profile_leaves_the_previous_steering_in_place(load):
    """A profile valid in the prefill but not in the decode phase is refused whole: nothing is applied."""
    model = load("qwen3moe")
    layer = model.layout.moe_layers[1]
    toks = model.tokenize(PROMPT)
    bad = Profile(
        (
            Entry(layer, 7, Mode.BIAS, 1.0),
            *(Entry(layer, e, Mode.FORCE, scope=Scope.DECODE) for e in range(model.layout.n_expert_used + 1)),
        )
    )
    with model.session(n_ctx=128, n_threads=1) as s:
        previous = Profile((Entry(layer, 5, Mode.BIAS, 2.0), Entry(layer, 3, Mode.MASK, scope=Scope.DECODE)))
        s.steer(previous)
        logits, gen = s.logits(toks), s.generate(PROMPT, max_tokens=6).tokens
        for attempt in (
            lambda: s.steer(bad),
            lambda: s.steer(previous.entries, strength=math.nan),
            lambda: s.steer([Entry(layer, model.layout.n_expert, Mode.MASK)]),
        ):
            with pytest.raises(SteeringError):
                attempt()
            assert s.steering == previous
            assert np.array_equal(s.logits(toks), logits)
            assert s.generate(PROMPT, max_tokens=6).tokens == gen


def test_session_refuses_a_profile_made_for_another_model(load, tiny_path):
    model = load("qwen3moe")
    other = Profile.from_entries([Entry(0, 1, Mode.MASK)], model_path=tiny_path("olmoe"))
    with model.session(n_ctx=64, n_threads=1) as s:
        with pytest.raises(ProfileMismatchError):
            s.steer(other)
        assert s.steering == Profile()


# ---------------------------------------------------------------------------------------------- 3. prompt sets


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("bad-prompts")

    def write(name: str, content: str | bytes) -> Path:
        (d / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return d / name

    big = d / "huge.toml"
    with big.open("wb") as f:
        f.truncate((16 << 20) + 1)  # sparse: over the structured-file limit without writing 16 MiB
    return counted(
        "prompt files",
        {
            "empty plain file": (write("empty.txt", ""), "no prompts for class 'empty'"),
            "only comments": (write("comments.txt", "# a\n\n# b\n"), "no prompts"),
            "binary junk (plain)": (write("junk.txt", random.Random(1).randbytes(4096)), "binary file"),
            "binary junk (TOML)": (write("junk.toml", random.Random(2).randbytes(4096)), "binary file"),
            "NUL bytes (YAML)": (write("nul.yaml", b"classes:\x00\x00"), "NUL byte"),
            "control characters (YAML)": (write("ctl.yaml", "classes:\n  c: [\x01]\n"), "not valid YAML"),
            "unknown template slot": (
                write("slot.toml", '[classes.c]\ntemplates = ["a {place}"]\n[classes.c.slots]\ntime = ["x"]\n'),
                "uses slot 'place', which is not defined",
            ),
            "template expanding to an empty prompt": (
                write("blank.toml", '[classes.c]\ntemplates = ["{a}"]\n[classes.c.slots]\na = ["", "x"]\n'),
                "expands to an empty prompt with a=''",
            ),
            "unknown key": (write("key.toml", '[classes.c]\nprompt = ["x"]\n'), "unknown key 'prompt'"),
            "deeply nested TOML": (
                write("deep.toml", "a = " + "[" * 50_000 + "]" * 50_000 + "\n"),
                "nested too deeply",
            ),
            "deeply nested YAML": (write("deep.yaml", "[" * 50_000 + "]" * 50_000 + "\n"), "nested too deeply"),
            "structured file over 16 MiB": (big, "larger than"),
            "a missing file": (d / "missing.txt", "cannot read the prompt file"),
            "a directory": (d, "cannot read the prompt file"),
        },
    )


def test_bad_prompt_files_raise_prompt_set_errors(prompt_files):
    for name, (path, needle) in prompt_files.items():
        with pytest.raises(PromptSetError) as info:
            load_prompt_set(path)
        assert needle in str(info.value) and "\n" not in str(info.value), (name, str(info.value))


def test_cli_refuses_bad_prompt_files_in_one_line(tiny_path, prompt_files, env):
    model = tiny_path("qwen3moe")
    never = prompt_files["a directory"][0] / "never"
    for path, needle in prompt_files.values():
        r = invoke("ftri", model, "--prompts", path, "--out", never)
        assert_one_line_error(r.exit_code, r.stderr, needle)
    for name in ("binary junk (plain)", "deeply nested YAML"):  # and two in a real process
        path, needle = prompt_files[name]
        r = mote(env, "ftri", model, "--prompts", path, "--out", never)
        assert_one_line_error(r.returncode, r.stderr, needle)
    assert not never.exists()


def test_huge_plain_prompt_file_is_streamed_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.txt"
    line = "# " + "x" * 1000 + "\n"
    with path.open("w") as f:
        for _ in range(8 * 1024):  # 8 MiB of comments and one real prompt
            f.write(line)
        f.write("the only prompt\n")
    tracemalloc.start()
    try:
        prompts = load_prompt_set(path).prompts("huge")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [p.text for p in prompts] == ["the only prompt"]
    assert peak < path.stat().st_size / 20, peak


def test_huge_plain_prompt_file_hits_the_cap_early_in_bounded_memory(tmp_path):
    path = tmp_path / "many.txt"
    with path.open("w") as f:
        for i in range(400_000):  # ~7 MiB
            f.write(f"prompt number {i} of a very long file\n")
    tracemalloc.start()
    try:
        with pytest.raises(PromptSetError, match=r"more than 1000 prompts; split the file or raise max_prompts"):
            load_prompt_set(path, max_prompts=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size / 20, peak


def _long_prompt_files(tmp_path: Path, n_words: int) -> tuple[Path, Path]:
    words = "the city was open and the people went home after work".split()
    behaviour = tmp_path / "behaviour.txt"
    behaviour.write_text("what happened in the city\n" + " ".join(words[i % len(words)] for i in range(n_words)) + "\n")
    baseline = tmp_path / "baseline.txt"
    baseline.write_text("the dog ran home\nthe cat sat still\n")
    return behaviour, baseline


def test_ftri_refuses_or_warns_about_prompts_longer_than_the_context(tiny_path, tmp_path, env):
    behaviour, baseline = _long_prompt_files(tmp_path, 300)
    r = mote(
        env,
        "ftri",
        tiny_path("qwen3moe"),
        "--prompts",
        behaviour,
        "--baseline-prompts",
        baseline,
        "--raw",
        "-c",
        "64",
        "--n-boot",
        "5",
        "--out",
        tmp_path / "out",
    )
    if r.returncode == 0:
        assert "context" in r.stderr.lower() and "warning" in r.stderr.lower(), r.stderr
    else:
        assert_one_line_error(r.returncode, r.stderr, "context")


def test_ftri_generated_scope_with_a_prompt_longer_than_its_context(tiny_path, tmp_path, env):
    """The generation session of --scope generated holds 4096 positions: a longer prompt is refused in one line
    (Session.decode's InputError), not a traceback."""
    behaviour, baseline = _long_prompt_files(tmp_path, 5000)
    r = mote(
        env,
        "ftri",
        tiny_path("qwen3moe"),
        "--prompts",
        behaviour,
        "--baseline-prompts",
        baseline,
        "--raw",
        "--scope",
        "generated",
        "--n-boot",
        "5",
        "--out",
        tmp_path / "out",
    )
    assert_one_line_error(r.returncode, r.stderr, "context")


# -c means the same in every command (issue 22, item 5): a context too small for the input is one line naming what
# does not fit (a prompt by its file and line) and -c
CONTEXT_CASES = counted(
    "context sizes",
    {
        # llama.cpp pads a context to a multiple of 256: the prompt is longer than that
        "run -c below the prompt": (
            ["run", "{planted}", "-p", "{long_text}", "-c", "16"],
            ("sequence 0 needs", "more than the context of 256", "-c/--ctx-size"),
        ),
        "chat -c below the first message": (["chat", "{planted}", "-c", "16"], ("more than the context of 256", "-c")),
        "eval -c below a prompt": (
            ["eval", "{planted}", "--prompts", "{prompts}", "--off", "1:6", "-c", "16", "-n", "4"],
            ("the prompt", "prompts.toml:", "more than the context of 16", "-c/--ctx-size"),
        ),
        "ftri -c below a prompt": (
            ["ftri", "{planted}", "--prompts", "{long}", "--baseline-prompts", "{baseline}", "-c", "64"],
            ("the prompt {long}:2 (behaviour:", "more than the context of 64", "-c/--ctx-size"),
        ),
    },
)


@pytest.fixture(scope="module")
def context_inputs(planted_path, tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("context")
    long, baseline = _long_prompt_files(d, 120)
    return {
        "planted": str(planted_path),
        "prompts": str(planted.prompts_path()),
        "long": str(long),
        "baseline": str(baseline),
        "long_text": " ".join(["the city"] * 200),
    }


@pytest.mark.parametrize("case", list(CONTEXT_CASES))
def test_a_context_too_small_is_one_line_naming_the_input_and_c(context_inputs, tmp_path, monkeypatch, case):
    args, needles = CONTEXT_CASES[case]
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(
        main, [a.format(**context_inputs) for a in args], input=context_inputs["long_text"] + "\n/quit\n"
    )
    if args[0] == "chat":  # the REPL says it and goes on
        assert r.exit_code == 0 and all(n in r.output for n in needles), r.output
        assert "error: sequence 0 needs" in r.output
        return
    assert_one_line_error(r.exit_code, r.stderr, *(n.format(**context_inputs) for n in needles))


def test_c_above_the_training_context_warns_in_one_line_and_is_given(planted_path):
    r = invoke("run", planted_path, "-p", PROMPT, "-n", "2", "-c", "2048", "--verbose")
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: -c")]
    assert r.exit_code == 0 and len(warnings) == 1 and "more than the 1024 tokens" in warnings[0]
    assert "n_ctx                 = 2048" in r.stderr  # llama.cpp's own habit: warned, not capped


# a chat template that fails (issue 22, item 4): one line naming the template, why, and --chat-template / --raw,
# in every command that templates; the chat REPL says it and goes on
TEMPLATE_CASES = counted(
    "chat templates",
    {
        "syntax error": ("{% for m in messages %}{{ m.content }", "cannot be read"),
        "raise_exception": (
            "{{ raise_exception('this template takes no user turns') }}",
            "this template takes no user turns",
        ),
        "unknown filter": ("{{ messages[0].content | shout }}", "No filter named 'shout'"),
        "undefined attribute used": ("{{ messages[0].content.no_such.thing }}", "failed on this conversation"),
        "undefined function called": ("{{ strftime_later('%Y') }}", "'strftime_later' is undefined"),
    },
)
TEMPLATED_COMMANDS = {
    "run --chat": ["run", "{model}", "--chat", "-p", "{text}"],
    "ftri": ["ftri", "{model}", "--prompts", "{prompts}", "--n-boot", "5", "--out", "{out}"],
    "eval": ["eval", "{model}", "--prompts", "{prompts}", "--off", "1:6", "-n", "2", "--out", "{out}"],
}


@pytest.mark.parametrize("case", list(TEMPLATE_CASES))
def test_a_broken_chat_template_is_one_line_everywhere(planted_path, tmp_path, case):
    source, needle = TEMPLATE_CASES[case]
    template = tmp_path / "broken.jinja"
    template.write_text(source)
    text = PROMPT
    for name, args in TEMPLATED_COMMANDS.items():
        r = invoke(
            *(
                a.format(model=planted_path, prompts=planted.prompts_path(), out=tmp_path / "out", text=text)
                for a in args
            ),
            "--chat-template",
            template,
        )
        assert_one_line_error(
            r.exit_code, r.stderr, f"the chat template {template}", needle, "--chat-template", "--raw"
        )
        assert not (tmp_path / "out").exists(), name
    r = CliRunner().invoke(
        main, ["chat", str(planted_path), "-n", "4", "--chat-template", str(template)], input=f"{text}\n/help\n/quit\n"
    )
    errors = [line for line in r.output.splitlines() if "error:" in line]
    assert r.exit_code == 0 and len(errors) == 1 and needle in errors[0] and "/quit" in r.output


# ---------------------------------------------------------------------------------------------- 4. faults


@pytest.fixture(scope="module")
def planted_path(model_dir) -> Path:
    return planted.planted_model(cache_dir=model_dir)[0]


def _interrupt_after(env, args, marker: str, patch: str, after: int, timeout: float = 240):
    """Runs the CLI with `patch`, sends SIGINT once `marker` appeared `after` times on stderr.

    The child starts with SIGINT at its default, as under a terminal: a test run started in the
    background of a non-interactive shell inherits SIGINT ignored, and Python would keep ignoring it.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _WITH_PATCH.format(patch=patch), *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    seen, lines = 0, []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(marker):
                seen += 1
                if seen == after:
                    proc.send_signal(signal.SIGINT)
                    break
        lines.append(proc.stderr.read())  # the rest, up to the exit (stdout is small: no deadlock)
        out = proc.stdout.read()
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, "".join(lines)


_SLOW_ROUTE = (
    "import time\nfrom mote_local.engine.model import Session\n_route = Session.route\n"
    "def route(self, seqs, **k):\n    print('ROUTE', file=sys.stderr, flush=True)\n    time.sleep(0.2)\n"
    "    return _route(self, seqs, **k)\nSession.route = route\n"
)
_SLOW_STEP = (
    "import time\nfrom mote_local.engine import batch\n_decode = batch._Run._decode\n"
    "def decode(self, *a, **k):\n    print('STEP', file=sys.stderr, flush=True)\n"
    "    time.sleep(0.1)\n    return _decode(self, *a, **k)\nbatch._Run._decode = decode\n"
)


def test_ctrl_c_during_mote_ftri_keeps_partial_results(planted_path, tmp_path, env):
    out = tmp_path / "ftri"
    code, stdout, stderr = _interrupt_after(
        env,
        [
            "ftri",
            planted_path,
            "--prompts",
            planted.prompts_path(),
            "-np",
            "2",
            "--n-boot",
            "10",
            "--top",
            "2",
            "--out",
            out,
        ],
        "ROUTE",
        _SLOW_ROUTE,
        after=3,
    )
    assert code == 130, stderr[-3000:]  # interrupted is not success, though the partial results are kept
    assert "interrupted: scored the 4 prompts captured so far (marked partial)" in stderr
    summary = json.loads((out / "ftri.json").read_text())
    assert summary["partial"] is True and summary["n_behavior"] == 2 and summary["n_baseline"] == 2
    assert FtriResult.from_dict(summary["results"]["mean_diff"]).scores.shape[1] > 0
    assert Profile.load(out / "profile.json").metadata["partial"] is True
    assert not list(out.glob(".*tmp*"))


def test_ctrl_c_during_mote_eval_keeps_partial_results(planted_path, tmp_path, env):
    _, truth = planted.planted_model(cache_dir=planted_path.parent)
    profile = Profile.from_entries(truth.entries(Mode.DROP), model_path=planted_path).save(tmp_path / "p.json")
    out = tmp_path / "eval"
    code, stdout, stderr = _interrupt_after(
        env,
        [
            "eval",
            planted_path,
            "--prompts",
            planted.prompts_path(),
            "--class",
            "trigger",
            "--profile",
            profile,
            "--n-random",
            "1",
            "-n",
            "4",
            "--out",
            out,
        ],
        "STEP",
        _SLOW_STEP,
        after=6,
    )
    assert code == 0, stderr[-3000:]
    assert "interrupted: the report holds what was measured so far (marked partial)" in stderr
    result = EvalResult.from_json((out / "report.json").read_text())
    assert result.partial and 0 < result.condition("unsteered").n < 36
    assert "PARTIAL" in (out / "report.md").read_text().upper()
    assert (out / "report.html").read_text().rstrip().endswith("</html>")


def test_ctrl_c_during_ftri_generation_is_honoured(load, monkeypatch):
    model = load("qwen3moe")
    real = Session.generate_batch
    calls = []

    def generate_batch(self, prompts, **kw):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C arrives inside the second batch's generation

            def ctrl_c(*_):
                raise KeyboardInterrupt

            kw["on_token"] = ctrl_c
        return real(self, prompts, **kw)

    monkeypatch.setattr(Session, "generate_batch", generate_batch)
    behaviour = [Prompt(f"what happened in the city {w}", "b") for w in ("today", "yesterday", "now")]
    baseline = [Prompt(f"the dog ran {w}", "n") for w in ("home", "away", "fast")]
    run = ftri.capture_activations(
        model, behaviour, baseline, scope="generated", chat=False, max_new_tokens=4, batch_size=2, show_progress=False
    )
    assert run.partial and run.activations.n_prompts == 2  # the first batch, complete
    assert (run.activations.tokens[:, model.layout.moe_layers] > 0).all()


_KILL_PROFILE = """
import sys
from mote_local.steering.profile import Profile
from mote_local.steering.entries import Entry, Mode
entries = tuple(Entry(l, e, Mode.BIAS, -0.5) for l in range(48) for e in range(512))
for i in range(1, 10**6):
    Profile(entries, name=f"v{i}", metadata={"pad": "x" * 100000}).save(sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.parametrize("suffix", [".json", ".gguf"])
def test_sigkill_mid_write_never_leaves_a_torn_profile(tmp_path, env, suffix):
    target = tmp_path / f"profile{suffix}"
    Profile((Entry(0, 0, Mode.MASK),), name="old").save(target)
    rng = random.Random(suffix)
    names = set()
    for trial in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_PROFILE, str(target)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        if trial:  # the first trial kills before any write finished: the old file must survive
            proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        p = Profile.load(target)  # complete, whichever version
        assert p.name == "old" or (p.name.startswith("v") and len(p.entries) == 48 * 512), p.name
        names.add(p.name)
    assert len(names) >= 2  # both the old file and a new one were seen whole


_KILL_REPORT = """
import sys
from mote_local.evaluation.evaluate import EvalResult
from mote_local.evaluation.report import write_report
result = EvalResult.from_json(open(sys.argv[1]).read())
for i in range(1, 10**6):
    result.elapsed_s = float(i)
    write_report(sys.argv[2], result)
    print(i, flush=True)
"""


@pytest.fixture(scope="module")
def small_result(load, tmp_path_factory) -> EvalResult:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return evaluate(
            load("qwen3moe"),
            ["what happened in the city", "the dog ran home"],
            [Entry(1, 3, Mode.DROP)],
            n_random=1,
            max_tokens=3,
            measure_cost=False,
            show_progress=False,
        )


def test_sigkill_mid_write_never_leaves_a_torn_report(small_result, tmp_path, env):
    src = tmp_path / "result.json"
    big = EvalResult.from_json(small_result.to_json())
    big.settings["notes"] = ["padding " * 20] * 5000  # a report large enough to be killed mid-write
    src.write_text(big.to_json())
    out = tmp_path / "report"
    rng = random.Random(3)
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_REPORT, str(src), str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        assert EvalResult.from_json((out / "report.json").read_text()).elapsed_s >= 1  # each file whole
        assert (out / "report.html").read_text().rstrip().endswith("</html>")
        assert (out / "report.md").read_text().strip()
        png = (out / report.PLOT_NAME).read_bytes()
        assert png.startswith(b"\x89PNG") and png[-8:-4] == b"IEND"


def _disk_full_after(half: bool = True):
    """A Path.write_bytes that writes part of the data, then fails as a full disk does."""

    def write_bytes(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2] if half else b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    return write_bytes


def test_disk_full_keeps_the_old_files_and_says_disk_full(small_result, tmp_path, monkeypatch):
    profile_path = tmp_path / "p.json"
    old = Profile((Entry(0, 0, Mode.MASK),), name="old")
    old.save(profile_path)
    out = tmp_path / "report"
    report.write_report(out, small_result)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(pathlib.Path, "write_bytes", _disk_full_after())
    with pytest.raises(OSError, match="disk full while writing") as info:
        Profile((Entry(1, 1, Mode.MASK),), name="new").save(profile_path)
    assert info.value.errno == errno.ENOSPC and str(profile_path) in str(info.value)
    assert Profile.load(profile_path) == old
    with pytest.raises(OSError, match="disk full while writing"):
        report.write_report(out, small_result)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporaries, nothing replaced
    assert sorted(os.listdir(tmp_path)) == ["p.json", "report"]


_DISK_FULL = (
    "import errno, pathlib, gguf\n"
    "def full(*a, **k):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
    "pathlib.Path.write_bytes = full\ngguf.GGUFWriter.write_tensors_to_file = full\n"
)


def test_cli_disk_full_is_one_line(tmp_path, env):
    src = Profile((Entry(0, 1, Mode.MASK),), name="src").save(tmp_path / "src.json")
    for dst in (tmp_path / "old.json", tmp_path / "old.gguf"):
        old = Profile((Entry(0, 2, Mode.MASK),), name="old")
        old.save(dst)
        r = mote(env, "profile", "convert", src, dst, patch=_DISK_FULL)
        assert Profile.load(dst) == old
        assert_one_line_error(r.returncode, r.stderr, "disk full")


# ---------------------------------------------------------------------------------------------- 5. isolation


def test_sessions_in_threads_never_see_each_others_state(load):
    model = load("qwen3moe")
    layers = model.layout.moe_layers
    prompts = [PROMPT, "the old man said hello to the small dog", "good morning my friend", "the red car was fast"]
    steering = [
        [],
        [Entry(layers[0], 0, Mode.FORCE)],
        [Entry(layers[1], 3, Mode.MASK), Entry(layers[2], 1, Mode.BIAS, 2.0)],
        [Entry(layers[3], 5, Mode.GAIN, 0.0), Entry(layers[0], 2, Mode.DROP)],
    ]

    def work(i: int, rounds: int = 6):
        with model.session(n_ctx=128, n_threads=1) as s:
            s.steer(steering[i])
            toks = model.tokenize(prompts[i])
            results = []
            for r in range(rounds):
                with s.capture(probs=r % 2 == 1) as cap:
                    logits = s.logits(toks)
                results.append((logits, cap.stats().counts, s.generate(toks, max_tokens=3).tokens))
            return results

    alone = [work(i) for i in range(4)]
    together: list = [None] * 4
    errors: list = []

    def run(i):
        try:
            together[i] = work(i)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i in range(4):
        for (la, ca, ga), (lb, cb, gb) in zip(alone[i], together[i]):
            assert np.array_equal(la, lb) and np.array_equal(ca, cb) and ga == gb, i


@pytest.fixture(scope="module")
def planted_model_and_classes(planted_path):
    trigger, neutral = select_classes(load_prompt_set(planted.prompts_path()), "trigger", "neutral")
    with Model(planted_path) as m:
        yield m, planted.read_truth(planted_path), trigger, neutral


@pytest.mark.parametrize("n_ubatch", [512, 7, 3])
def test_batched_sequences_are_never_attributed_to_each_other(planted_model_and_classes, n_ubatch):
    model, truth, trigger, neutral = planted_model_and_classes
    sequences, is_trigger = [], []
    for t, n in zip(trigger[::9], neutral[::9]):  # 4 + 4, interleaved in one batch
        sequences += [model.tokenize(t.text), model.tokenize(n.text)]
        is_trigger += [True, False]
    alone = []
    with model.session(n_ctx=128, n_threads=1) as s:
        for seq in sequences:
            with s.capture() as cap:
                s.logits(seq)
            alone.append(cap.stats())
    with model.session(n_ctx=512, n_seq_max=len(sequences), n_batch=512, n_ubatch=n_ubatch, n_threads=1) as s:
        with s.capture(label=None) as cap:
            for i in range(len(sequences)):
                cap.bind(i, 100 + i)
            s.route(sequences)
    for i, ref in enumerate(alone):
        got = cap.stats(100 + i)
        planted_counts = [int(got.counts[l, e]) for l, e in truth.planted]
        if is_trigger[i]:
            assert all(c > 0 for c in planted_counts), (i, planted_counts)
        else:
            assert planted_counts == [0] * len(truth.planted), (i, planted_counts)
        np.testing.assert_array_equal(got.counts, ref.counts)
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        np.testing.assert_allclose(got.weight_sums, ref.weight_sums, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- 6. fuzzing

_json_scalar = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=6)
_json_any = st.recursive(
    _json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)
_entry_doc = st.fixed_dictionaries(
    {},
    optional={
        "layer": st.integers(-2, 2**32) | _json_scalar,
        "expert": st.integers(-2, 300) | _json_scalar,
        "mode": st.sampled_from([m.value for m in Mode] + ["off", ""]) | _json_scalar,
        "value": st.floats() | st.just("-inf") | _json_scalar,
        "scope": st.sampled_from([s.value for s in Scope] + ["later"]) | _json_scalar,
        "extra": _json_scalar,
    },
)
_fingerprint_doc = st.fixed_dictionaries(
    {},
    optional={
        "arch": st.text(max_size=8) | _json_scalar,
        "n_layer": st.integers(-1, 2**64) | _json_scalar,
        "n_expert": st.integers(-1, 300),
        "n_expert_used": st.integers(-1, 9),
        "router_sha256": st.text("0123456789abcdefA", min_size=63, max_size=65) | _json_scalar,
    },
)
_profile_doc = st.fixed_dictionaries(
    {
        "format": st.just("mote-profile") | _json_scalar,
        "version": st.just(1) | _json_scalar,
        "entries": st.lists(_entry_doc | _json_scalar, max_size=5) | _json_scalar,
    },
    optional={
        "name": st.text(max_size=6) | _json_scalar,
        "description": _json_scalar,
        "strength": st.floats() | _json_scalar,
        "fingerprint": _fingerprint_doc | _json_scalar,
        "metadata": _json_any,
        "extra": _json_scalar,
    },
)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(max_size=80)
    | _profile_doc.map(json.dumps)
    | st.tuples(_profile_doc, st.integers(0, 200), st.text(max_size=3)).map(
        lambda t: (lambda s: s[: t[1]] + t[2] + s[t[1] + 1 :])(json.dumps(t[0]))
    )
)
def test_fuzz_profile_json_raises_only_profile_errors(text):
    try:
        p = Profile.from_json(text)
    except ProfileError:
        return
    assert Profile.from_json(p.to_json()) == p


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, b"\xff\xfe\x00{}"], ids=["deep", "not-utf8"])
def test_profile_json_nesting_and_bytes_are_profile_errors(text):
    with pytest.raises(ProfileError):
        Profile.from_json(text)


_GOOD_PROFILE = Profile(
    (Entry(1, 2, Mode.MASK), Entry(3, 4, Mode.BIAS, -1.5, Scope.DECODE), Entry(5, 6, Mode.GAIN, 0.5)),
    2.0,
    Fingerprint("qwen3moe", 4, 8, 2, "a" * 64),
    "n",
    "d",
    {"k": [1, 2]},
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(SLOW, max_examples=300)
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.none() | st.integers(0, 10**6),
)
def test_fuzz_profile_gguf_raises_only_profile_errors(fuzz_dir, flips, cut):
    data = bytearray(_GOOD_PROFILE.to_gguf(fuzz_dir / "good.gguf").read_bytes())
    for pos, value in flips:
        data[pos % len(data)] = value
    path = fuzz_dir / "flipped.gguf"
    path.write_bytes(bytes(data[: cut % len(data)] if cut is not None else data))
    try:
        Profile.load(path)
    except ProfileError:
        pass


@pytest.fixture(scope="module")
def model_bytes(tiny_path) -> tuple[bytes, int]:
    src = tiny_path("qwen3moe")
    return src.read_bytes(), gguf.GGUFReader(src).data_offset


@settings(SLOW, max_examples=60)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=3))
def test_fuzz_model_metadata_raises_only_model_file_errors(model_bytes, fuzz_dir, flips):
    """Byte flips anywhere before the tensor data: read_layout gives a layout or a ModelFileError, nothing else."""
    data, end = bytearray(model_bytes[0]), model_bytes[1]
    for where, value in flips:
        data[int(where * end)] = value
    path = fuzz_dir / "model.gguf"
    path.write_bytes(bytes(data))
    try:
        read_layout(path)
    except ModelFileError:
        pass


def _toml(value) -> str:
    """A TOML value (inline form), enough for fuzzing: any nesting of tables, arrays and scalars."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else "inf"
            if value == math.inf
            else "-inf"
            if value == -math.inf
            else repr(value)
        )
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


_toml_scalar = st.booleans() | st.integers(-5, 2**70) | st.floats() | st.text(max_size=5)
_template_text = st.text(alphabet="ab {}_x", max_size=8)
_class_doc = st.fixed_dictionaries(
    {},
    optional={
        "prompts": st.lists(st.text(max_size=6) | _toml_scalar, max_size=3) | _toml_scalar,
        "templates": st.lists(_template_text | _toml_scalar, max_size=3) | _toml_scalar,
        "responses": st.lists(st.text(max_size=4), max_size=4) | _toml_scalar,
        "slots": st.dictionaries(
            st.sampled_from(["a", "b", "x", "1"]),
            st.lists(st.text(max_size=3) | _toml_scalar, max_size=3) | _toml_scalar,
            max_size=3,
        ),
        "extra": _toml_scalar,
    },
)
_set_doc = st.fixed_dictionaries(
    {},
    optional={
        "classes": st.dictionaries(st.text(max_size=4), _class_doc | _toml_scalar, max_size=3) | _toml_scalar,
        "seed": st.integers(-3, 2**70) | _toml_scalar,
        "sample_cap": st.integers(-3, 20) | _toml_scalar,
        "extra": _toml_scalar,
    },
)


def _check_prompt_set(path: Path) -> None:
    try:
        ps = load_prompt_set(path, max_prompts=1000)
    except PromptSetError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(ps, PromptSet)
    for prompts in ps.classes.values():
        assert prompts and all(isinstance(p.text, str) and p.text.strip() for p in prompts)


@settings(SLOW, max_examples=400)
@given(doc=_set_doc, junk=st.text(max_size=40))
def test_fuzz_prompt_sets_raise_only_prompt_set_errors(fuzz_dir, doc, junk):
    toml_text = "".join(f"{json.dumps(k)} = {_toml(v)}\n" for k, v in doc.items())
    for name, text in (
        ("set.toml", toml_text),
        ("junk.toml", junk),
        ("junk.yaml", junk),
        ("junk.txt", junk),
        ("set.yaml", json.dumps(doc, allow_nan=True)),
    ):
        path = fuzz_dir / name
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        _check_prompt_set(path)


@st.composite
def _activations(draw):
    n_prompts = draw(st.integers(2, 5))
    n_layer, n_expert = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1, 1000, 2**31, 2**50]))
    tokens = draw(hnp.arrays(np.int64, (n_prompts, n_layer), elements=st.integers(0, scale)))
    fraction = draw(hnp.arrays(np.float64, (n_prompts, n_layer, n_expert), elements=st.floats(0, 1)))
    counts = np.floor(tokens[:, :, None] * fraction).astype(np.int64)
    per = draw(hnp.arrays(np.float64, counts.shape, elements=st.floats(0, 1)))
    rest = draw(hnp.arrays(np.bool_, n_prompts - 2))
    return Activations(counts, tokens, counts * per, np.concatenate([[True, False], rest]))


@settings(max_examples=150, deadline=None)
@given(act=_activations(), method=st.sampled_from(METHODS), seed=st.integers(0, 2**32 - 1))
def test_fuzz_statistics_stay_finite_and_bounded_at_any_magnitude(act, method, seed):
    r = analyse(act, method, n_boot=16, top_n=2, sign="abs", seed=seed)
    for a in (r.scores, r.ci_low, r.ci_high, r.stability):
        assert np.all(np.isfinite(a))
    assert np.all((r.stability >= 0) & (r.stability <= 1))
    if method in ("mean_diff", "risk_diff"):
        assert np.all(np.abs(r.scores) <= 1 + 1e-9)
    for x in r.ranked(3):
        assert math.isfinite(x.score) and x.ci_low <= x.ci_high
    json.dumps(r.to_dict(), allow_nan=False)


def test_case_count(bad_models, profile_files, prompt_files):
    """The number of bad-input cases covered, for the README's reliability section (printed with -s)."""
    total = sum(COUNTED.values())
    print(f"\nhardening: {total} bad-input cases in tables ({COUNTED})")
    assert total >= 80
