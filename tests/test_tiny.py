"""Tests of the tiny GGUF model factory. Only the last test needs the engine (skipped without it)."""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from mote_local.synthetic import tiny  # noqa: E402

ALL = (*tiny.ARCHS, tiny.DENSE)
QT = gguf.GGMLQuantizationType
ROUTER = "blk.{}.ffn_gate_inp.weight"


def _field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny")
    return {a: tiny.write_model(tiny.spec_for(a), d / f"{a}.gguf") for a in ALL}


# ---------------------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("arch", ALL)
def test_reads_back(models, arch):
    spec = tiny.spec_for(arch)
    r = gguf.GGUFReader(models[arch])
    garch = _field(r, "general.architecture")
    assert garch == {"mixtral": "llama", "dense": "llama"}.get(arch, arch)
    assert _field(r, tiny.KEY_ARCH) == arch
    assert _field(r, tiny.KEY_SEED) == tiny.DEFAULT_SEEDS[arch]
    assert _field(r, f"{garch}.block_count") == spec.n_layer
    assert _field(r, f"{garch}.embedding_length") == spec.n_embd
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert "<|im_start|>" in _field(r, "tokenizer.chat_template")
    assert len(_field(r, "tokenizer.ggml.tokens")) == len(tiny.make_vocab())
    assert tiny.spec_from_file(models[arch]) == spec

    t = _tensors(r)
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= t.keys()
    last = spec.n_layer - 1
    if arch == tiny.DENSE:
        assert _field(r, "llama.expert_count") is None
        assert f"blk.{last}.ffn_gate.weight" in t and ROUTER.format(last) not in t
        return

    assert _field(r, f"{garch}.expert_count") == spec.n_expert
    assert _field(r, f"{garch}.expert_used_count") == spec.n_expert_used
    router = t[ROUTER.format(last)]
    assert list(router.shape) == [spec.n_embd, spec.n_expert]  # ggml order
    assert router.tensor_type == QT.F32
    for kind in ("gate", "up", "down"):
        shape = list(t[f"blk.{last}.ffn_{kind}_exps.weight"].shape)
        assert shape[2] == spec.n_expert and spec.n_ff_exp in shape[:2]


def test_arch_specifics(models):
    t = {a: _tensors(gguf.GGUFReader(p)) for a, p in models.items()}
    r = {a: gguf.GGUFReader(p) for a, p in models.items()}

    assert "blk.0.attn_q_norm.weight" in t["qwen3moe"]
    assert list(t["qwen3moe"]["blk.0.attn_q_norm.weight"].shape) == [16]
    assert list(t["olmoe"]["blk.0.attn_k_norm.weight"].shape) == [64]

    for name in ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"):
        assert f"blk.0.{name}.weight" in t["qwen2moe"]
    assert _field(r["qwen2moe"], "qwen2moe.expert_shared_feed_forward_length") == 32

    ds, dr = t["deepseek2"], r["deepseek2"]
    assert "blk.0.ffn_gate.weight" in ds and ROUTER.format(0) not in ds  # leading dense layer
    assert "blk.1.exp_probs_b.bias" in ds and ds["blk.1.exp_probs_b.bias"].tensor_type == QT.F32
    assert {
        "blk.1.attn_k_b.weight",
        "blk.1.attn_v_b.weight",
        "blk.1.attn_kv_a_mqa.weight",
        "blk.1.attn_q_a.weight",
        "blk.1.ffn_gate_shexp.weight",
    } <= ds.keys()
    assert _field(dr, "deepseek2.expert_gating_func") == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert _field(dr, "deepseek2.expert_group_count") == 4
    assert _field(dr, "deepseek2.expert_group_used_count") == 2
    assert _field(dr, "deepseek2.leading_dense_block_count") == 1
    assert _field(dr, "deepseek2.expert_weights_norm") is True
    assert _field(dr, "deepseek2.expert_weights_scale") == pytest.approx(2.5)
    assert _field(dr, "deepseek2.attention.head_count_kv") == 1

    g = t["gpt-oss"]
    assert {
        "blk.0.attn_sinks.weight",
        "blk.0.post_attention_norm.weight",
        "blk.0.ffn_gate_inp.bias",
        "blk.0.ffn_down_exps.bias",
        "blk.0.attn_output.bias",
    } <= g.keys()
    assert _field(r["gpt-oss"], "gpt-oss.attention.sliding_window") == 64

    lite = gguf.GGUFReader(
        tiny.write_model(tiny.spec_for("deepseek2", q_lora_rank=0), Path(models["deepseek2"]).with_name("lite.gguf"))
    )
    assert "blk.0.attn_q.weight" in _tensors(lite) and "blk.0.attn_q_a.weight" not in _tensors(lite)
    assert _field(lite, "deepseek2.attention.q_lora_rank") == 0  # the key is required even when 0


# ------------------------------------------------------------------------------------- determinism, seeds


@pytest.mark.parametrize("arch", ALL)
def test_deterministic(models, arch, tmp_path):
    again = tiny.write_model(tiny.spec_for(arch), tmp_path / "again.gguf")
    assert again.read_bytes() == models[arch].read_bytes()


def test_deterministic_quantized(tmp_path):
    spec = tiny.spec_for("qwen3moe", qtype="q8_0")
    a = tiny.write_model(spec, tmp_path / "a.gguf").read_bytes()
    assert a == tiny.write_model(spec, tmp_path / "b.gguf").read_bytes()


def test_seed_changes_weights(tmp_path):
    a = tiny.make_weights(tiny.spec_for("olmoe"))
    b = tiny.make_weights(tiny.spec_for("olmoe", seed=1))
    assert not np.array_equal(a[ROUTER.format(0)], b[ROUTER.format(0)])


def test_archs_route_differently():
    routers = {
        a: tiny.make_weights(
            tiny.spec_for(a, n_expert=8, n_expert_used=2, n_expert_groups=0, n_group_used=0)
            if a == "deepseek2"
            else tiny.spec_for(a)
        )[ROUTER.format(1)]
        for a in tiny.ARCHS
    }
    x = np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32)
    tops = {a: np.argsort(-(x @ w.T), axis=1)[:, :2] for a, w in routers.items()}
    archs = list(tiny.ARCHS)
    for i, a in enumerate(archs):
        for b in archs[i + 1 :]:
            assert not np.allclose(routers[a], routers[b]), (a, b)
            assert (tops[a] != tops[b]).any(axis=1).mean() > 0.5, (a, b)


def test_router_margins():
    """Router logits of unit-RMS inputs have std ~ router_scale: clear top-k margins, no near-ties."""
    spec = tiny.spec_for("qwen3moe")
    w = tiny.make_weights(spec)[ROUTER.format(0)]
    x = np.random.default_rng(1).standard_normal((2000, spec.n_embd)).astype(np.float32)
    x /= np.sqrt((x**2).mean(axis=1, keepdims=True))
    logits = np.sort(x @ w.T, axis=1)[:, ::-1]
    assert logits.std() == pytest.approx(spec.router_scale, rel=0.2)
    k = spec.n_expert_used
    gap = logits[:, k - 1] - logits[:, k]
    assert np.median(gap) > 0.2 and (gap < 1e-3).mean() < 0.01


# ------------------------------------------------------------------------------------------ writing


def test_atomic_write_leaves_no_temp(tmp_path):
    tiny.write_model(tiny.spec_for("mixtral"), tmp_path / "m.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_encode", boom)
    with pytest.raises(RuntimeError):
        tiny.write_model(tiny.spec_for("mixtral"), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_custom_weights_round_trip(tmp_path):
    spec = tiny.spec_for("qwen3moe")
    w = tiny.make_weights(spec)
    w[ROUTER.format(2)] = np.full_like(w[ROUTER.format(2)], 0.5)
    t = _tensors(gguf.GGUFReader(tiny.write_model(spec, tmp_path / "c.gguf", weights=w)))
    np.testing.assert_array_equal(t[ROUTER.format(2)].data, w[ROUTER.format(2)])
    np.testing.assert_array_equal(t["token_embd.weight"].data, w["token_embd.weight"])

    w[ROUTER.format(2)] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        tiny.write_model(spec, tmp_path / "d.gguf", weights=w)


def test_tiny_model_cache(tmp_path, monkeypatch):
    p = tiny.tiny_model("olmoe", cache_dir=tmp_path)
    mtime = p.stat().st_mtime_ns
    assert tiny.tiny_model("olmoe", cache_dir=tmp_path) == p and p.stat().st_mtime_ns == mtime
    assert tiny.tiny_model("olmoe", cache_dir=tmp_path, n_layer=2) != p
    assert tiny.tiny_model(tiny.spec_for("olmoe"), cache_dir=tmp_path) == p

    monkeypatch.setenv("MOTE_CACHE_DIR", str(tmp_path / "env"))
    assert tiny.tiny_model("olmoe").parent == tmp_path / "env" / "models"  # the cache directory's models folder
    p.unlink()
    assert tiny.tiny_model("olmoe", cache_dir=tmp_path).exists()  # regenerated when missing


# ------------------------------------------------------------------------------------------ quantization


def test_qtypes(tmp_path):
    r = gguf.GGUFReader(tiny.write_model(tiny.spec_for("deepseek2", qtype="q8_0"), tmp_path / "q8.gguf"))
    t = _tensors(r)
    assert t["blk.1.ffn_gate_exps.weight"].tensor_type == QT.Q8_0
    assert t[ROUTER.format(1)].tensor_type == QT.F32
    assert t["blk.1.exp_probs_b.bias"].tensor_type == QT.F32
    assert t["blk.1.attn_norm.weight"].tensor_type == QT.F32
    assert t["blk.1.attn_k_b.weight"].tensor_type == QT.F16  # 16-wide rows: no Q8_0 block fits

    spec = tiny.spec_for("qwen3moe", qtype="q4_k", n_embd=256, n_ff_exp=256, n_layer=2)
    t = _tensors(gguf.GGUFReader(tiny.write_model(spec, tmp_path / "q4.gguf")))
    ref = tiny.make_weights(spec)
    name = "blk.0.ffn_up_exps.weight"
    assert t[name].tensor_type == QT.Q4_K
    back = gguf.quants.dequantize(np.asarray(t[name].data), QT.Q4_K).reshape(ref[name].shape)
    assert np.sqrt(((back - ref[name]) ** 2).mean()) < 0.1 * ref[name].std()
    # tiny rows fall back as llama-quantize does
    small = _tensors(gguf.GGUFReader(tiny.write_model(tiny.spec_for("olmoe", qtype="q4_k"), tmp_path / "s.gguf")))
    assert small["blk.0.ffn_up_exps.weight"].tensor_type == QT.Q5_0


def test_tensor_plan_is_what_is_written(tmp_path):
    """The plan a large-model writer follows (names, shapes, types) is the file write_model makes; a head width
    other than n_embd / n_head (Qwen3-30B-A3B: 32 heads of 128 on n_embd 2048) reaches the keys and shapes."""
    spec = tiny.spec_for("qwen3moe", qtype="q4_0", n_head=4, n_head_kv=2, n_embd_head=32)
    t = _tensors(gguf.GGUFReader(path := tiny.write_model(spec, tmp_path / "q4_0.gguf")))
    plan = tiny.tensor_plan(spec)
    assert [name for name, *_ in plan] == list(t)
    for name, shape, _, qt in plan:
        assert (tuple(int(d) for d in t[name].shape), t[name].tensor_type) == (shape, qt)
    assert t["blk.0.ffn_up_exps.weight"].tensor_type == QT.Q4_0 and t[ROUTER.format(0)].tensor_type == QT.F32
    assert tuple(t["blk.0.attn_q.weight"].shape) == (64, 4 * 32)
    assert _field(gguf.GGUFReader(path), "qwen3moe.attention.key_length") == 32


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "arch, overrides, match",
    [
        ("qwen4moe", {}, "unknown arch"),
        ("qwen3moe", {"n_expert_used": 9}, "n_expert_used"),
        ("qwen3moe", {"n_expert_used": 0}, "n_expert_used"),
        ("qwen3moe", {"qtype": "q3_k"}, "qtype"),
        ("qwen3moe", {"n_embd": 66}, "divisible by n_head"),
        ("qwen3moe", {"n_expert_groups": 2, "n_group_used": 1}, "groups"),
        ("deepseek2", {"n_expert": 18}, "not divisible by n_expert_groups"),
        ("deepseek2", {"n_group_used": 4}, "n_group_used"),
        ("deepseek2", {"n_expert_used": 9}, "exceeds"),
        ("deepseek2", {"n_layer": 1}, "leading dense"),
        ("olmoe", {"n_head_kv": 2}, "n_head_kv"),
        ("olmoe", {"n_embd_head": 32}, "n_embd_head"),
        ("qwen3moe", {"vocab": "qwen4"}, "unknown vocab"),
        ("qwen3moe", {"vocab": "qwen3", "n_vocab": 5000}, "real one"),
        ("dense", {"n_expert": 8}, "no experts"),
        ("qwen2moe", {"n_expert_shared": 0}, "n_expert_shared"),
    ],
)
def test_bad_specs(arch, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny.spec_for(arch, **overrides)


def test_unknown_field():
    with pytest.raises(TypeError, match="n_experts"):
        tiny.spec_for("qwen3moe", n_experts=8)


# ------------------------------------------------------------------------------------------ vocabulary


def _spm_tokenize(vocab: tiny.Vocab, text: str) -> list[str]:
    """llama.cpp's SPM merge loop (llm_tokenizer_spm_session), without byte fallback."""
    piece_score = dict(zip(vocab.tokens, vocab.scores))
    syms = list(("\u2581" + text).replace(" ", "\u2581"))
    while True:
        cands = [
            (-piece_score[syms[i] + syms[i + 1]], i)
            for i in range(len(syms) - 1)
            if syms[i] + syms[i + 1] in piece_score
        ]
        if not cands:
            return syms
        _, i = heapq.nsmallest(1, cands)[0]
        syms[i : i + 2] = [syms[i] + syms[i + 1]]


def test_vocab_whole_words():
    v = tiny.make_vocab()
    assert v.tokens[:5] == ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
    assert (v.unk_id, v.bos_id, v.eos_id) == (0, 1, 2)
    assert v.types[v.im_end_id] == gguf.TokenType.CONTROL
    assert v.tokens[5] == "<0x00>" and v.tokens[5 + 255] == "<0xFF>"
    assert len(set(v.tokens)) == len(v)
    assert _spm_tokenize(v, "What happened in the city?") == [
        "\u2581What",
        "\u2581happened",
        "\u2581in",
        "\u2581the",
        "\u2581city",
        "?",
    ]


def test_chat_template_renders_chatml():
    jinja2 = pytest.importorskip("jinja2")
    text = jinja2.Template(tiny.CHAT_TEMPLATE).render(
        messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}],
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_output_head_favours_words():
    spec = tiny.spec_for("mixtral")
    v = tiny.make_vocab()
    head = tiny.make_weights(spec)["output.weight"]
    words = v.word_mask()
    assert words[v.id_of("\u2581city")] and words[v.id_of("?")] and not words[v.id_of("\u2581cit")]
    assert not head[~words].any() and (np.abs(head[words]).sum(axis=1) > 0).all()
    # so greedy decoding picks whole words: max logit over words > 0 for any hidden state
    h = np.random.default_rng(2).standard_normal((100, spec.n_embd)).astype(np.float32)
    assert words[np.argmax(h @ head.T, axis=1)].all()


def test_vocab_extension():
    v = tiny.make_vocab(extra_words=("zorblax",))
    assert _spm_tokenize(v, "the zorblax Zorblax") == ["\u2581the", "\u2581zorblax", "\u2581Zorblax"]
    assert tiny.make_vocab(n_vocab=4000).tokens[-1] == f"<unused_{4000 - len(tiny.make_vocab()) - 1}>"
    with pytest.raises(ValueError):
        tiny.make_vocab(extra_words=("two words",))
    with pytest.raises(ValueError):
        tiny.make_vocab(n_vocab=10)
    spec = tiny.spec_for("qwen3moe", extra_words=["zorblax"])
    assert tiny.make_weights(spec)["token_embd.weight"].shape[0] == len(v)


# ------------------------------------------------------------------------------------------ engine


def _engine_llama():
    try:
        from mote_local_engine.llama_cpp import Llama  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("engine (mote_local_engine.llama_cpp) not built")
    return Llama


@pytest.mark.parametrize("arch", ALL)
def test_engine_loads_and_generates(models, arch):
    Llama = _engine_llama()
    llm = Llama(model_path=str(models[arch]), n_ctx=128, verbose=False)
    try:
        ids = llm.tokenize(b"What happened in the city?", add_bos=False)
        assert [llm.detokenize([i]) for i in ids] == [b" What", b" happened", b" in", b" the", b" city", b"?"]
        out = llm.create_completion("What happened in the city?", max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] == 4
        # only whole words have output rows (see make_weights), so greedy text is words and punctuation
        words = set(tiny.make_vocab().words)
        assert all(w.strip(".,?!") in words for w in out["choices"][0]["text"].split()), out
    finally:
        llm.close()
