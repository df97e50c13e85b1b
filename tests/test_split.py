"""A split GGUF is one model: the planted model as one file, as 3 gguf-py shards and as 3 shards in the layout of
llama.cpp's `gguf-split --no-tensor-first-split` gives the same layout, fingerprint, `inspect`, fTRI ranking and
profile, and steered output, through the CLI."""

import dataclasses
import json
import os

import pytest
from click.testing import CliRunner
from gguf_shards import split_gguf

from mote_local.cli.commands import main
from mote_local.evaluation import super_experts
from mote_local.modelfile.fingerprint import Fingerprint
from mote_local.modelfile.layout import read_header, read_layout
from mote_local.synthetic import planted

TRIGGER = "what happened at the protest yesterday ?"
LAYOUTS = ("one file", "gguf-py", "no-tensor-first-split")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(planted_files, tmp_path_factory):
    """layout -> the path to give: the planted model whole, and the first of its 3 shards either way."""
    src = planted_files[0]
    d = tmp_path_factory.mktemp("split")
    return {"one file": src, **{style: split_gguf(src, d / style, 3, style)[0] for style in LAYOUTS[1:]}}


def mote(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_the_shards_are_what_llama_cpp_and_gguf_py_write(models):
    for style in LAYOUTS[1:]:
        shards = read_layout(models[style]).files
        headers = [read_header(f.path) for f in shards]
        assert [f.path.name for f in shards] == [models[style].name.replace("00001", f"{i:05d}") for i in (1, 2, 3)]
        assert [(h.values["split.no"], h.values["split.count"]) for h in headers] == [(0, 3), (1, 3), (2, 3)]
        assert all(h.values["split.tensors.count"] == len(read_header(models["one file"]).tensors) for h in headers)
        assert all(len(h.values) == 3 for h in headers[1:])  # later shards: the split keys, nothing else
        assert (len(headers[0].tensors) == 0) == (style == "no-tensor-first-split")
        assert all(h.tensors for h in headers[1:])


def test_layout_and_fingerprint_equal_the_unsplit_file(models):
    whole = read_layout(models["one file"])
    assert len(whole.files) == 1 and whole.files[0].path == models["one file"]
    per_model = {"path", "files", "router_spans", "size_bytes"}
    for style in LAYOUTS[1:]:
        split = read_layout(models[style])
        assert len(split.files) == 3 and split.path == models[style]
        for field in dataclasses.fields(whole):
            if field.name not in per_model:
                assert getattr(split, field.name) == getattr(whole, field.name), (style, field.name)
        assert split.size_bytes == sum(f.path.stat().st_size for f in split.files)
        assert {i for i, _, _ in split.router_spans} != {0}  # the routers do sit in later shards
        assert Fingerprint.of(models[style]) == Fingerprint.of(models["one file"])


def test_inspect_is_the_same(models):
    def rows(path):
        r = mote("inspect", path)
        assert r.exit_code == 0, r.output
        return {line[:15].strip(): line[17:] for line in r.output.splitlines()}

    def info(path):
        data = json.loads(mote("inspect", path, "--json").output)
        assert data.pop("path") == str(path)
        return data

    whole, whole_json = rows(models["one file"]), info(models["one file"])
    for style in LAYOUTS[1:]:
        split, split_json = rows(models[style]), info(models[style])
        assert split.pop("model") == models[style].name and whole["model"] == models["one file"].name
        assert {k: v for k, v in split.items() if k != "model"} == {k: v for k, v in whole.items() if k != "model"}
        # the split files carry a few hundred bytes of headers more, in 11 MiB
        assert abs(split_json.pop("size_bytes") - whole_json["size_bytes"]) < 4096
        assert split_json == {k: v for k, v in whole_json.items() if k != "size_bytes"}


def test_run_steered_output_is_the_same(models):
    outputs = {}
    for name, path in models.items():
        for flags in ((), ("--drop", "1:6,2:0"), ("--off", "1:6,2:0")):
            r = mote("run", path, "--chat", "-p", TRIGGER, "-n", 8, *flags)
            assert r.exit_code == 0, r.output
            outputs.setdefault(name, []).append(r.output)
    assert outputs["gguf-py"] == outputs["one file"] == outputs["no-tensor-first-split"]
    unsteered, dropped, masked = outputs["one file"]
    assert "cannot help" in unsteered and "cannot help" not in dropped and "cannot help" not in masked


def test_ftri_ranks_and_exports_the_same(models, tmp_path):
    results = {}
    for name, path in models.items():
        out = tmp_path / name
        r = mote("ftri", path, "--prompts", planted.prompts_path(), "--n-boot", 20, "--top", 2, "--out", out)
        assert r.exit_code == 0, r.output
        assert "planted experts in the top 2: 2 of 2" in r.output
        results[name] = ((out / "ftri_mean_diff.csv").read_text(), (out / "profile.json").read_text())
    assert results["gguf-py"] == results["one file"] == results["no-tensor-first-split"]
    ranking = results["one file"][0].splitlines()
    assert [row.split(",")[1:3] for row in ranking[1:3]] == [["1", "6"], ["2", "0"]]


def test_the_super_expert_cache_follows_every_shard(models, tmp_path):
    first = models["gguf-py"]
    key = super_experts._model_key(first)
    assert [s[0] for s in key["shards"]] == [str(f.path.resolve()) for f in read_layout(first).files[1:]]
    assert "shards" not in super_experts._model_key(models["one file"])
    last = read_layout(first).files[-1].path
    stat = last.stat()
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the last shard replaced: not the same key
    assert super_experts._model_key(first) != key


def test_mote_quantize_reads_every_shard_of_a_split_source(models, tmp_path):
    quantized = {}
    for name, path in models.items():
        dst = tmp_path / f"{name}-q8.gguf"
        r = mote("quantize", path, dst, "--recipe", "q8_0")
        assert r.exit_code == 0, r.output
        layout = read_layout(dst)
        assert len(layout.files) == 1  # one file out, whatever came in
        quantized[name] = (layout.tensor_types, Fingerprint.of(dst))
    assert quantized["gguf-py"] == quantized["one file"] == quantized["no-tensor-first-split"]
    assert len(quantized["one file"][0]) == len(read_layout(models["one file"]).tensor_types)
    assert quantized["one file"][1] == Fingerprint.of(models["one file"])  # routers kept
