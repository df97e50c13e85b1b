"""`mote quantize` and the routing class of a model's quantization (issue 15): llama.cpp's quantizer run with
per-tensor types, read back with gguf-py; bad input refused in one line with nothing written; `mote ftri`'s
warning shown only where the measured class moves routing."""

import os

import gguf
import pytest
from click.testing import CliRunner
from gguf_shards import retyped_gguf

from mote_local.engine.model import Model
from mote_local.errors import EngineError, ModelFileError, NotMoeError
from mote_local.modelfile import quantize as qz
from mote_local.modelfile.fingerprint import Fingerprint
from mote_local.modelfile.layout import read_layout
from mote_local.synthetic import tiny

QT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def wide(model_dir):
    """An F32 tiny qwen3moe whose rows every block type tiles (256 wide): no fallback types."""
    return tiny.tiny_model(tiny.spec_for("qwen3moe", n_embd=256, n_ff_exp=256), cache_dir=model_dir)


def _types(path) -> dict[str, QT]:
    return {t.name: QT(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("recipe, experts", [("capture", QT.Q6_K), ("capture-q4", QT.Q4_K)])
def test_capture_recipe_writes_the_per_tensor_types_and_keeps_routers_and_fingerprint(wide, tmp_path, recipe, experts):
    dst = tmp_path / "out.gguf"
    result = qz.quantize(wide, dst, recipe)
    types = _types(dst)
    for name, qtype in types.items():
        if name.endswith("_exps.weight"):
            assert qtype == experts, name
        elif name.endswith(("_norm.weight", "ffn_gate_inp.weight")):
            assert qtype == QT.F32, name  # llama.cpp's quantizer leaves routers and norms alone
        elif name == "output.weight":
            assert qtype == QT.Q8_0  # no router reads it
        else:
            assert qtype == QT.F16, name  # attention, token embedding
    assert {n for n in types if n.endswith("ffn_gate_inp.weight")}
    assert gguf.GGUFReader(dst).fields[qz.RECIPE_KEY].contents() == recipe
    assert result.types["router"] == "F32" and result.types["ffn_up_exps"] == experts.name
    assert Fingerprint.of(dst) == Fingerprint.of(wide)  # profiles made on the source apply
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    with Model(dst) as m, m.session(n_ctx=64) as s:
        assert len(s.generate("the cat", max_tokens=3).tokens) == 3


def test_plan_predicts_llama_cpp_fallback_types(tiny_path, tmp_path):
    src = tiny_path("qwen3moe")  # 64-wide rows: Q4_K cannot tile them, llama.cpp falls back to Q5_0
    dst = tmp_path / "out.gguf"
    qz.quantize(src, dst, "capture-q4")
    planned = {name: new for name, _, new in qz.plan(src, qz.RECIPES["capture-q4"])}
    assert planned == _types(dst)
    assert planned["blk.0.ffn_up_exps.weight"] == QT.Q5_0


def test_bad_input_is_refused_before_the_engine_and_leaves_nothing(wide, tiny_path, tmp_path):
    dst = tmp_path / "out.gguf"
    with pytest.raises(ModelFileError, match="model file not found"):
        qz.quantize(tmp_path / "missing.gguf", dst)
    with pytest.raises(ModelFileError, match="is the source model itself"):
        qz.quantize(wide, wide)
    link = tmp_path / "link.gguf"
    link.symlink_to(wide)
    with pytest.raises(ModelFileError, match="is the source model itself"):
        qz.quantize(wide, link, force=True)
    dst.write_text("keep me")
    with pytest.raises(ModelFileError, match="exists: pass --force"):
        qz.quantize(wide, dst)
    assert dst.read_text() == "keep me"
    with pytest.raises(ModelFileError, match="unknown recipe 'fast'"):
        qz.quantize(wide, tmp_path / "b.gguf", "fast")
    with pytest.raises(ModelFileError, match="is a directory"):
        qz.quantize(wide, tmp_path, force=True)
    with pytest.raises(ModelFileError, match="already quantized .*start from the F32, F16 or BF16 GGUF"):
        qz.quantize(tiny_path("qwen3moe", qtype="q8_0"), tmp_path / "c.gguf")
    with pytest.raises(NotMoeError):
        qz.quantize(tiny_path(tiny.DENSE), tmp_path / "d.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.gguf", "out.gguf"]


def test_a_failing_quantizer_leaves_no_file_and_keeps_the_old_one(wide, tmp_path, monkeypatch):
    from mote_local import binding

    dst = tmp_path / "out.gguf"
    dst.write_text("old")
    monkeypatch.setattr(binding.llama, "llama_model_quantize", lambda *a: 1)
    with pytest.raises(EngineError, match="quantizer failed"):
        qz.quantize(wide, dst, force=True)
    assert dst.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def _class(path):
    return qz.routing_class(read_layout(path).tensor_types)


def test_routing_class_of_tiny_models_of_several_types(tiny_path, wide, tmp_path):
    f32 = _class(tiny_path("qwen3moe"))
    assert f32.name == "F32" and not f32.moves_routing and f32.warning is None
    f16 = _class(tiny_path("qwen3moe", qtype="f16"))
    assert f16.fidelity == qz.MEASURED[("f16", "f16")] and not f16.moves_routing and f16.warning is None
    q8 = _class(tiny_path("qwen3moe", qtype="q8_0"))
    assert q8.fidelity == qz.MEASURED[("q8", "q8")] and not q8.moves_routing
    assert "86.9%" in q8.text
    q4 = _class(tiny_path("qwen3moe", n_embd=256, n_ff_exp=256, qtype="q4_k"))
    assert q4.fidelity == qz.MEASURED[("q4", "q4")] and q4.moves_routing
    assert "18.8%" in q4.warning and "mote quantize SRC.gguf DST.gguf --recipe capture" in q4.warning
    q5 = _class(tiny_path("qwen3moe", qtype="q4_k"))  # 64-wide rows: Q5_0 everywhere, a class not measured
    assert q5.fidelity is None and q5.moves_routing  # judged by a more precise class that moves routing
    assert "Q8_0 with Q5_K experts, more precise, kept only 81.6%" in q5.warning
    for recipe, key in (("capture", ("f16", "q6")), ("capture-q8", ("f16", "q8")), ("capture-q4", ("f16", "q4"))):
        qz.quantize(wide, tmp_path / f"{recipe}.gguf", recipe)
        c = _class(tmp_path / f"{recipe}.gguf")
        assert c.fidelity == qz.MEASURED[key] and c.moves_routing == (not c.fidelity.keeps_routing)
    assert not _class(tmp_path / "capture.gguf").moves_routing  # the recipe `mote ftri` recommends keeps routing


def test_mote_quantize_command(wide, tmp_path):
    from mote_local.cli.commands import main

    dst = tmp_path / "out.gguf"
    r = CliRunner().invoke(main, ["quantize", str(wide), str(dst), "--recipe", "capture-q8"])
    assert r.exit_code == 0, r.output
    assert f"wrote {dst}" in r.output and "ffn_up_exps Q8_0" in r.output and "router F32" in r.output
    assert "keeps routing: capture-q8 kept" in r.output
    assert _types(dst)["blk.0.ffn_down_exps.weight"] == QT.Q8_0
    r = CliRunner().invoke(main, ["quantize", str(wide), str(dst)])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "exists: pass --force" in r.stderr
    assert CliRunner().invoke(main, ["quantize", str(wide), str(dst), "--force"]).exit_code == 0
    r = CliRunner().invoke(main, ["quantize", str(wide), str(dst), "--recipe", "fast"])
    assert r.exit_code == 2 and "'fast' is not one of" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "nope.gguf"), str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and "model file not found" in r.stderr and r.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["out.gguf"]


def _ftri_stderr(model, tmp_path) -> str:
    """What `mote ftri` on a few prompts of the tiny vocabulary writes to stderr."""
    from mote_local.cli.commands import main

    words = list(tiny.WORDS)
    behaviour, baseline = tmp_path / "a.txt", tmp_path / "b.txt"
    behaviour.write_text("\n".join(" ".join(words[i : i + 5]) for i in range(0, 20, 5)) + "\n")
    baseline.write_text("\n".join(" ".join(words[i : i + 5]) for i in range(20, 40, 5)) + "\n")
    r = CliRunner().invoke(
        main,
        [
            "ftri",
            str(model),
            "--prompts",
            str(behaviour),
            "--baseline-prompts",
            str(baseline),
            "--raw",
            "--n-boot",
            "5",
            "--top",
            "2",
            "--out",
            str(tmp_path / f"f-{model.stem}"),
        ],
    )
    assert r.exit_code == 0, r.output
    return r.stderr


def test_mote_ftri_warns_only_where_the_quantization_moves_routing(tiny_path, tmp_path):
    q8 = tiny_path("qwen3moe", qtype="q8_0")  # measured to keep routing: no warning
    q4 = tiny_path("qwen3moe", n_embd=256, n_ff_exp=256, qtype="q4_k")  # measured to move it
    for model, warned in ((q8, False), (q4, True)):
        stderr = _ftri_stderr(model, tmp_path)
        assert ("mote quantize SRC.gguf DST.gguf --recipe capture" in stderr) == warned, stderr
        if warned:
            assert "18.8%" in stderr and len([x for x in stderr.splitlines() if "warning" in x]) == 1


def _types_of(experts: str, rest: str) -> tuple[tuple[str, str], ...]:
    """The tensor types of a model with routed experts of one type and the other weights of another."""
    return (
        ("token_embd.weight", rest),
        ("blk.0.attn_v.weight", rest),
        ("blk.0.ffn_gate_inp.weight", "F32"),
        ("blk.0.ffn_up_exps.weight", experts),
        ("blk.0.ffn_down_exps.weight", experts),
        ("output.weight", "Q6_K"),
    )


@pytest.mark.parametrize(
    "experts, rest, unmeasured",
    [
        ("IQ4_XS", "Q8_0", "IQ4_XS is not measured"),
        ("IQ2_XXS", "F16", "IQ2_XXS is not measured"),
        ("Q4_K", "IQ4_NL", "IQ4_NL is not measured"),
        ("MXFP4", "Q8_0", "MXFP4 is not measured"),
        ("MXFP4", "IQ4_XS", "IQ4_XS, MXFP4 are not measured"),
    ],
)
def test_types_never_measured_are_said_to_be_unmeasured_not_ranked_by_bits(experts, rest, unmeasured):
    c = qz.routing_class(_types_of(experts, rest))
    assert c.fidelity is None and c.moves_routing is None
    assert unmeasured in c.warning and "%" not in c.text  # no borrowed measurement
    # the advice is one the next command accepts: a model with MXFP4 experts has no F32/F16/BF16 GGUF to quantize
    assert ("mote quantize SRC.gguf" in c.warning) == (experts != "MXFP4")


def test_mxfp4_experts_with_float_weights_are_gpt_oss_release_format():
    c = qz.routing_class(_types_of("MXFP4", "BF16"))
    assert c.moves_routing is False and c.warning is None and "release format" in c.text
    assert qz.routing_class(_types_of("Q4_K", "Q8_0")).fidelity == qz.MEASURED[("q8", "q4")]  # measured: as before


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tiny_path, tmp_path_factory):
    """The tiny gpt-oss with MXFP4 routed experts (its release layout), and with Q8_0 attention besides."""
    d, src = tmp_path_factory.mktemp("mxfp4"), tiny_path("gpt-oss")
    release = retyped_gguf(src, d / "release.gguf", {r"_exps\.weight$": QT.MXFP4})
    attn_q8 = retyped_gguf(
        src, d / "attn-q8.gguf", {r"_exps\.weight$": QT.MXFP4, r"\.attn_(q|k|v|output)\.weight$": QT.Q8_0}
    )
    return release, attn_q8


def test_mote_ftri_on_mxfp4_gives_no_advice_that_mote_quantize_refuses(gpt_oss_mxfp4, tmp_path):
    from mote_local.cli.commands import main

    release, attn_q8 = gpt_oss_mxfp4
    r = CliRunner().invoke(main, ["quantize", str(release), str(tmp_path / "q.gguf")])
    assert r.exit_code == 1 and "is already quantized" in r.stderr  # why the usual advice cannot be given here
    for model, warned in ((release, False), (attn_q8, True)):
        stderr = _ftri_stderr(model, tmp_path)
        assert ("warning:" in stderr) == warned and "mote quantize SRC" not in stderr, stderr
        if warned:
            assert "MXFP4 is not measured" in stderr and "release GGUF" in stderr
