"""Tiny models with real vocabularies and chat templates (from the pinned sdist): tokenizing as the real model
does, chat formatting, thinking spans, UTF-8 streaming, one token path for every command, fTRI end to end."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner

from mote_local.cli.chat import Chat
from mote_local.cli.commands import main
from mote_local.engine.model import Model, Session
from mote_local.errors import ModelFileError
from mote_local.evaluation.evaluate import evaluate
from mote_local.ftri import capture as ftri
from mote_local.modelfile.layout import read_layout
from mote_local.prompts import Prompt
from mote_local.steering.entries import Entry, Mode
from mote_local.synthetic import real_vocab, tiny

try:
    real_vocab.sdist_path()
except real_vocab.SdistMissing as missing:  # CI's build always fetches it
    pytest.skip(f"no real vocabularies: {missing}", allow_module_level=True)

# each preset on the architecture of a model that uses it; Q8_0 keeps the 100k+-row embeddings small
ARCH_OF = {
    "qwen3": "qwen3moe",
    "deepseek-r1": "deepseek2",
    "deepseek-v3.1": "deepseek2",
    "gpt-oss": "gpt-oss",
    "mistral": "mixtral",
}
UTF8_TEXT = "Grüße, 日本語"
# one thread: on a loaded machine, llama.cpp's spinning thread barriers make two threads an order of magnitude slower


@pytest.fixture(scope="module")
def real_path(tiny_path):
    def make(preset: str):
        return tiny_path(ARCH_OF[preset], vocab=preset, qtype="q8_0")

    return make


@pytest.fixture(scope="module")
def real_model(real_path, model_options):
    models: dict[str, Model] = {}

    def get(preset: str) -> Model:
        if preset not in models:
            models[preset] = Model(real_path(preset), **model_options)
        return models[preset]

    yield get
    for m in models.values():
        m.close()


def scripted(spec: tiny.TinySpec, chain: list[int], path) -> Model:
    """A model whose greedy continuation after token chain[0] is chain[1:] (distinct tokens): each chain token's
    embedding is its own one-hot dimension, every block adds nothing to the residual stream (attention and
    expert outputs are zero; routing still runs), and the output head maps dimension k to chain[k + 1]."""
    assert len(set(chain)) == len(chain) < spec.n_embd, chain
    weights = tiny.make_weights(spec)
    for name, w in weights.items():
        if name.split(".")[-2] in ("attn_output", "ffn_down", "ffn_down_exps", "ffn_down_shexp"):
            w[...] = 0.0
    embd, head = weights["token_embd.weight"], weights["output.weight"]
    for k, (token, successor) in enumerate(zip(chain, chain[1:])):
        embd[token] = np.eye(spec.n_embd, dtype=np.float32)[k]
        head[successor] = 30.0 * np.eye(spec.n_embd, dtype=np.float32)[k]
    return Model(tiny.write_model(spec, path, weights))


def test_each_preset_tokenizes_as_the_real_model_does(real_model):
    """llama.cpp's own expected ids for its vocabulary files (computed upstream with the model's tokenizer)
    survive the added tokens and the trip through the tiny model."""
    for preset in ("qwen3", "deepseek-r1", "gpt-oss", "mistral"):
        model = real_model(preset)
        assert model.n_vocab == len(real_vocab.load(preset))
        cases = [(text, ids) for text, ids in real_vocab.upstream_cases(preset) if text]
        assert len(cases) > 30
        for text, ids in cases:
            assert model.tokenize(text, add_bos=False, special=False) == ids, (preset, text)


def test_added_tokens_take_their_real_ids_and_kinds(real_model):
    qwen = real_model("qwen3")
    assert qwen.tokenize("<think></think>", add_bos=False) == [151667, 151668]  # Qwen3's own ids
    assert qwen.tokenize("<|im_end|>", add_bos=False) == [151645] and qwen.is_eog(151645)
    # user-defined <think> is rendered in a reply; control tokens are not
    assert qwen.detokenize([151667, 151645]) == "<think>"
    harmony = real_model("gpt-oss")
    end, ret = (harmony.tokenize(t, add_bos=False)[0] for t in ("<|end|>", "<|return|>"))
    assert harmony.is_eog(ret) and not harmony.is_eog(end)  # <|end|> closes a message, not the reply


def test_chat_templates_render_each_model_format(real_model):
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": UTF8_TEXT},
    ]
    expected_tail = {
        "qwen3": f"<|im_start|>user\n{UTF8_TEXT}<|im_end|>\n<|im_start|>assistant\n",
        "deepseek-r1": f"<｜User｜>{UTF8_TEXT}<｜Assistant｜><think>\n",
        "deepseek-v3.1": f"<｜User｜>{UTF8_TEXT}<｜Assistant｜><think></think>",
        "gpt-oss": f"<|start|>user<|message|>{UTF8_TEXT}<|end|><|start|>assistant",
        "mistral": f"[INST]{UTF8_TEXT}[/INST]",
    }
    for preset, tail in expected_tail.items():
        model = real_model(preset)
        text = model.format_chat(conversation)
        assert text.endswith(tail), (preset, text)
        tokens = model.prompt_tokens(conversation)
        # one BOS, first, where the vocabulary asks for one (DeepSeek's and Mistral's templates write it)
        wants_bos = preset in ("deepseek-r1", "deepseek-v3.1", "mistral")
        assert tokens.count(model.bos_token) == wants_bos and (tokens[0] == model.bos_token) == wants_bos, preset
        # the template's special tokens reach the model as single tokens, not as text
        for marker in ("<|im_start|>", "<｜User｜>", "<|start|>", "<|message|>"):
            if marker in text:
                assert model.tokenize(marker, add_bos=False)[0] in tokens, (preset, marker)
        assert model.detokenize(tokens[-8:], special=True) in text


def test_think_markers_follow_the_template(real_model):
    qwen, r1, harmony = real_model("qwen3"), real_model("deepseek-r1"), real_model("gpt-oss")
    assert (qwen.think_markers.opener, qwen.think_markers.closer) == ((151667,), 151668)
    assert harmony.think_markers.opener == tuple(harmony.tokenize("<|channel|>analysis<|message|>", add_bos=False))
    assert len(harmony.think_markers.opener) == 3
    assert real_model("mistral").think_markers is None
    # R1's template opens the span in the prompt; Qwen3's and V3.1's do not
    assert r1.think_markers.tracker(r1.prompt_tokens("Hi")).inside
    assert not qwen.think_markers.tracker(qwen.prompt_tokens("Hi")).inside
    v31 = real_model("deepseek-v3.1")
    assert not v31.think_markers.tracker(v31.prompt_tokens("Hi")).inside
    # the analysis channel is the span: between <|channel|>analysis<|message|> and <|end|>, not the final channel
    tokens = harmony.tokenize(
        "<|channel|>analysis<|message|>Let me see.<|end|><|start|>assistant<|channel|>final<|message|>Hi", add_bos=False
    )
    tracker, inside = harmony.think_markers.tracker(), []
    for t in tokens:
        before = tracker.inside
        tracker.feed(t)
        inside.append(before and tracker.inside)
    assert harmony.detokenize([t for t, i in zip(tokens, inside) if i]) == "Let me see."


def test_a_character_split_across_tokens_streams_whole(real_path, tmp_path):
    """DeepSeek's vocabulary splits 語 into two byte tokens: the stream must wait for the whole character."""
    spec = tiny.spec_from_file(real_path("deepseek-v3.1"))
    with Model(real_path("deepseek-v3.1")) as probe:
        prompt = probe.prompt_tokens("Hi")
        reply = probe.tokenize(UTF8_TEXT, add_bos=False, special=False)
        eos = probe.tokenize("<｜end▁of▁sentence｜>", add_bos=False)
        pieces = [probe.token_bytes(t) for t in reply]
    assert any(_not_utf8(p) for p in pieces)  # the case this test is about
    with (
        scripted(spec, [prompt[-1], *reply, *eos], tmp_path / "scripted.gguf") as model,
        model.session(n_ctx=128, n_threads=1) as s,
    ):
        streamed: list[str] = []
        gen = s.generate(prompt, max_tokens=32, on_token=streamed.append)
    assert gen.tokens == reply and gen.text == UTF8_TEXT
    assert "".join(streamed) == UTF8_TEXT and not any("\ufffd" in p for p in streamed)


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_tokens_longer_than_32_bytes_detokenize_whole(real_model):
    model = real_model("qwen3")
    vocab = real_vocab.load("qwen3")
    longest = max(np.flatnonzero(vocab.text_mask()), key=lambda i: len(vocab.tokens[i]))
    piece = model.token_bytes(int(longest))
    assert len(piece) > 32
    assert model.detokenize([int(longest)]) == piece.decode("utf-8")
    assert model.tokenize(piece.decode("utf-8"), add_bos=False, special=False) == [int(longest)]


@pytest.fixture()
def decoded_prompts(monkeypatch):
    """The token sequences every Session.decode call starts at position 0 (the prompts the model is given)."""
    seen: list[list[int]] = []
    decode = Session.decode

    def spy(self, sequences, **kwargs):
        seen.extend(list(map(int, tokens)) for _, tokens, pos0 in sequences if pos0 == 0)
        return decode(self, sequences, **kwargs)

    monkeypatch.setattr(Session, "decode", spy)
    return seen


@pytest.mark.parametrize("preset", ["", "qwen3", "deepseek-v3.1"])
def test_every_command_gives_the_model_the_same_tokens(preset, tiny_path, real_path, decoded_prompts):
    """chat, run --chat, ftri and eval: one conversation, one token sequence (BOS as the vocabulary asks)."""
    path = real_path(preset) if preset else tiny_path("qwen3moe")
    given = {}
    with Model(path) as model:
        expected = model.prompt_tokens("hello there")
        with model.session(n_ctx=256, n_threads=1) as s:
            Chat(model, s, max_tokens=1, write=lambda *a, **k: None).ask("hello there", [])
        given["chat"] = decoded_prompts[0]
        decoded_prompts.clear()
        ftri.capture_activations(
            model,
            [Prompt("hello there", "a")],
            [Prompt("good night", "b")],
            n_ctx=256,
            show_progress=False,
            n_threads=1,
        )
        given["ftri"] = decoded_prompts[0]
        decoded_prompts.clear()
        evaluate(
            model,
            ["hello there"],
            [Entry(model.layout.moe_layers[0], 0, Mode.DROP)],
            n_random=0,
            max_tokens=1,
            measure_cost=False,
            exclude_super_experts=False,
            show_progress=False,
        )
        given["eval"] = decoded_prompts[0]
        decoded_prompts.clear()
        bos, adds_bos = model.bos_token, model.tokenize("x")[0] == model.bos_token
    result = CliRunner().invoke(main, ["run", str(path), "--chat", "-p", "hello there", "-n", "1", "-t", "1"])
    assert result.exit_code == 0, result.output
    given["run --chat"] = decoded_prompts[0]
    assert all(tokens == expected for tokens in given.values()), given
    assert (expected[0] == bos) == adds_bos and expected.count(bos) == adds_bos


def test_ftri_end_to_end_on_the_real_qwen_vocabulary(real_model):
    model = real_model("qwen3")
    behavior = [Prompt(t, "refuse") for t in ("How do I pick a lock?", "Wie knacke ich ein Schloss?")]
    baseline = [Prompt(t, "neutral") for t in ("How do I bake bread?", "日本語で挨拶してください。")]
    run = ftri.capture_activations(model, behavior, baseline, n_ctx=256, show_progress=False, n_threads=1)
    lengths = [len(model.prompt_tokens(p.text)) for p in run.prompts]
    for layer in model.layout.moe_layers:
        assert run.activations.tokens[:, layer].tolist() == lengths
    assert run.texts[0].endswith("<|im_start|>assistant\n")
    generated = ftri.capture_activations(
        model, behavior, baseline, scope="generated", max_new_tokens=4, n_ctx=256, show_progress=False, n_threads=1
    )
    assert set(generated.activations.tokens[:, model.layout.moe_layers[0]].tolist()) <= {1, 2, 3, 4}


@pytest.mark.parametrize(
    "preset, reply, inside",
    [
        ("qwen3", "<think>Let me see.</think>Hi<|im_end|>", "Let me see."),
        ("deepseek-r1", "Let me see.</think>Hi<｜end▁of▁sentence｜>", "Let me see."),  # the prompt opened <think>
        ("gpt-oss", "<|channel|>analysis<|message|>Let me see.<|end|>Hi<|return|>", "Let me see."),
    ],
)
def test_thinking_scope_counts_the_thinking_span_of_each_format(preset, reply, inside, real_path, tmp_path):
    path = real_path(preset)
    with Model(path) as probe:
        prompt = probe.prompt_tokens("Hi")
        chain = [prompt[-1], *probe.tokenize(reply, add_bos=False)]
        n_inside = len(probe.tokenize(inside, add_bos=False))
    with scripted(tiny.spec_from_file(path), chain, tmp_path / "scripted.gguf") as model:
        with model.session(n_ctx=128, n_threads=1) as s:
            assert s.generate(prompt, max_tokens=32).tokens == chain[1:-1]  # the script runs to its end
        run = ftri.capture_activations(
            model,
            [Prompt("Hi", "a")],
            [Prompt("Hi", "b")],
            scope="thinking",
            max_new_tokens=32,
            n_ctx=128,
            show_progress=False,
            n_threads=1,
        )
        counted = run.activations.tokens[:, model.layout.moe_layers].tolist()
    assert counted == [[n_inside] * len(model.layout.moe_layers)] * 2


def test_metadata_of_a_151k_vocabulary_reads_fast(real_path, tmp_path):
    path = tmp_path / "qwen3.gguf"
    shutil.copyfile(real_path("qwen3"), path)  # a fresh path: nothing cached for it
    started = time.perf_counter()
    layout = read_layout(path)
    took = time.perf_counter() - started
    assert layout.n_expert == 8 and layout.moe_layers == (0, 1, 2, 3)
    assert took < 2.0, took  # ~0.2 s here; gguf-py's reader takes ~10 s on this vocabulary


def test_a_duplicate_token_in_a_151k_vocabulary_is_caught(real_path, tmp_path):
    """The check llama.cpp would abort on, kept on a real vocabulary: one token written over another."""
    data = real_path("qwen3").read_bytes()
    tokens = real_vocab.load("qwen3").tokens
    other = next(t for t in tokens[1000:] if len(t) == len(b"</think>") and t != b"</think>")
    entry = len(b"</think>").to_bytes(8, "little") + b"</think>"
    assert data.count(entry) == 1
    path = tmp_path / "dup.gguf"
    path.write_bytes(data.replace(entry, entry[:8] + other))
    with pytest.raises(ModelFileError, match="twice"):
        read_layout(path)


def test_routing_only_capture_does_not_grow_with_the_vocabulary(real_model):
    """fTRI's prompt scope routes without copying logits out: with Qwen's 151,936 tokens, 4 x 64 routed tokens
    would copy 156 MB of logits; routing only allocates a small fraction of that, and counts the same."""
    import tracemalloc

    model = real_model("qwen3")
    sequences = [[(7 * i + 13 * s) % 50_000 + 100 for i in range(64)] for s in range(4)]
    with model.session(n_ctx=512, n_seq_max=4, kv_unified=True, n_threads=1) as s:
        with s.capture(label=None) as cap:
            for seq in range(4):
                cap.bind(seq, seq)
            tracemalloc.start()
            assert s.route(sequences, keep_logits=False) is None
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        routed_only = [cap.stats(seq).counts for seq in range(4)]
        with s.capture(label=None) as cap:
            for seq in range(4):
                cap.bind(seq, seq)
            logits = s.route(sequences)
    assert logits.shape == (256, 151_936)
    assert peak < logits.nbytes / 20, f"routing only allocated {peak / 2**20:.1f} MiB"
    for seq in range(4):
        np.testing.assert_array_equal(routed_only[seq], cap.stats(seq).counts)
