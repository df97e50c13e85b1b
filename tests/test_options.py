"""The model-loading flags (mote_local.cli.options, mote_local.engine.options): llama.cpp's spellings parse, every
flag reaches the engine (read back from llama.cpp's own log and the context), placement overrides leave outputs,
steering and capture unchanged on CPU, -c means the same everywhere, and chat templates never crash."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

from mote_local import binding
from mote_local.cli.chat import Chat
from mote_local.cli.commands import main
from mote_local.engine.model import Generation, Model, Session, open_model
from mote_local.engine.options import ContextOptions, LoadOptions, ModelOptions, cpu_moe_overrides, parse_overrides
from mote_local.errors import ChatTemplateError
from mote_local.prompts import load_prompt_set
from mote_local.steering.entries import Entry, Mode
from mote_local.synthetic import planted, real_vocab

PROMPT = "what happened in the city yesterday"
pytestmark = pytest.mark.usefixtures("private_cache")


SDIST_TEMPLATES = "vendor/llama.cpp/models/templates"


def mote(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture(scope="module")
def wide(tiny_path):
    """A qwen3moe whose attention heads are 32 wide (a quantized KV cache stores blocks of 32)."""
    return tiny_path("qwen3moe", n_embd_head=32)


# ---------------------------------------------------------------------------------------------- flags reach the engine


def test_llama_cpp_spellings_reach_the_engine_through_the_cli(wide):
    r = mote(
        "run",
        wide,
        "-p",
        PROMPT,
        "-n",
        2,
        "--verbose",
        "-c",
        128,
        "-b",
        64,
        "-ub",
        16,
        "-fa",
        "on",
        "-ctk",
        "q8_0",
        "-ctv",
        "q4_0",
        "--no-mmap",
        "-t",
        1,
    )
    assert r.exit_code == 0, r.output
    log = r.stderr
    for line in (
        "n_batch               = 64",
        "n_ubatch              = 16",
        "flash_attn            = enabled",
        "K (q8_0)",
        "V (q4_0)",
        "(load_mode = none)",
    ):
        assert line in log, line
    r = mote("run", wide, "-p", PROMPT, "-n", 2, "--verbose", "--mlock", "-fa", "off", "-c", 128)
    assert r.exit_code == 0, r.output
    assert "(load_mode = mmap+mlock)" in r.stderr and "flash_attn            = disabled" in r.stderr


@pytest.mark.parametrize(
    "flags, layers",
    [
        (["-ot", r"blk\.[13]\.ffn_(up|down|gate)_exps=CPU"], [1, 3]),
        (["--cpu-moe"], [0, 1, 2, 3]),
        (["-ncmoe", "2"], [0, 1]),
        (["-ot", "attn_q=CPU,exps=CPU"], [0, 1, 2, 3]),
    ],
)
def test_tensor_overrides_reach_the_loader(tiny_path, flags, layers):
    r = mote("run", tiny_path("qwen3moe"), "-p", PROMPT, "-n", 2, "--verbose", *flags)
    assert r.exit_code == 0, r.output
    overridden = {
        line.split()[1]
        for line in r.stderr.splitlines()
        if line.startswith("tensor ") and "buffer type overridden to CPU" in line
    }
    experts = {f"blk.{il}.ffn_{kind}_exps.weight" for il in layers for kind in ("gate", "up", "down")}
    assert experts <= overridden
    assert {t for t in overridden if "_exps" in t} == experts


def test_session_settings_of_the_model_win_and_read_back(wide):
    options = ModelOptions(
        LoadOptions(n_threads=1), ContextOptions(n_batch=48, n_ubatch=8, flash_attn="on", type_k="q8_0")
    )
    with binding.log_lines() as log, open_model(wide, options) as m, m.session(n_ctx=256, n_batch=256) as s:
        assert (s.n_batch, s.n_ubatch) == (48, 8)
        assert binding.llama.llama_n_threads(s._ctx_ptr) == 1
        logits = s.logits(m.tokenize(PROMPT))
    assert np.isfinite(logits).all()
    assert any("K (q8_0)" in line for line in log)


def outputs_under(path, overrides) -> dict:
    """Greedy text, steered text, capture counts and prompt logits of one model loaded with these overrides."""
    with Model(path, tensor_overrides=overrides) as m, m.session(n_ctx=256) as s:
        tokens = m.tokenize(PROMPT)
        plain = s.generate(tokens, max_tokens=8).text
        logits = s.logits(tokens)
        layer = m.layout.moe_layers[0]
        s.steer([Entry(layer, 0, Mode.FORCE), Entry(layer, 1, Mode.MASK)])
        with s.capture(trace=True) as cap:
            steered = s.generate(tokens, max_tokens=8).text
        stats = cap.stats()
    return {"plain": plain, "steered": steered, "logits": logits, "counts": stats.counts, "weights": stats.weight_sums}


def test_expert_placement_on_cpu_changes_nothing(tiny_path):
    path = tiny_path("qwen3moe")
    base = outputs_under(path, ())
    for overrides in (parse_overrides("exps=CPU"), cpu_moe_overrides(), cpu_moe_overrides(2)):
        got = outputs_under(path, overrides)
        assert got["plain"] == base["plain"] and got["steered"] == base["steered"]
        assert base["steered"] != base["plain"]  # the steering did something
        np.testing.assert_array_equal(got["counts"], base["counts"])
        np.testing.assert_allclose(got["weights"], base["weights"], rtol=1e-6)
        np.testing.assert_array_equal(got["logits"], base["logits"])


def test_sampling_flags_reach_the_sampler(tiny_path):
    model = tiny_path("qwen3moe")

    def run(*flags):
        r = mote("run", model, "-p", PROMPT, "-n", 12, *flags)
        assert r.exit_code == 0, r.output
        return r.output

    greedy = run()
    hot = ["--temp", "50", "--seed", "3"]
    # at a temperature that flattens everything, only the truncations keep the greedy token
    assert run(*hot, "--top-k", "0", "--min-p", "0", "--top-p", "1") != greedy
    assert run(*hot, "--top-k", "1") == greedy
    assert run(*hot, "--top-k", "0", "--min-p", "1") == greedy
    assert run(*hot, "--top-k", "0", "--min-p", "0", "--top-p", "0") == greedy
    # a repeat penalty reaches greedy decoding too: a reply that repeats a token changes under it
    assert len(set(greedy.split())) < len(greedy.split()), greedy
    assert run("--repeat-penalty", "100") != greedy


def test_chat_has_the_sampling_flags(planted_files):
    path = planted_files[0]
    r = mote(
        "chat",
        path,
        "-n",
        8,
        "--temp",
        "50",
        "--seed",
        1,
        "--top-k",
        1,
        "--top-p",
        0.5,
        "--min-p",
        0.1,
        "--repeat-penalty",
        1.0,
        input=planted.EXAMPLE_TRIGGER + "\n/quit\n",
    )
    assert r.exit_code == 0 and planted.REFUSAL_TEXT in r.output  # top-k 1 is greedy whatever the temperature


# ---------------------------------------------------------------------------------------------- models by name


def fake_hub(monkeypatch, **functions):
    """mote_local.modelfile.hub's resolvers replaced (the module is another change's; its absence here is fine)."""
    try:
        import mote_local.modelfile.hub as hub
    except ImportError:
        hub = types.ModuleType("mote_local.modelfile.hub")
        monkeypatch.setitem(sys.modules, "mote_local.modelfile.hub", hub)
    for name, fn in functions.items():
        monkeypatch.setattr(hub, name, fn, raising=False)


def test_model_by_m_hf_and_ollama_name(planted_files, monkeypatch):
    path = planted_files[0]
    asked = []
    fake_hub(
        monkeypatch,
        resolve_hf=lambda spec, **kw: asked.append(("hf", spec)) or path,
        resolve_model=lambda name: asked.append(("name", name)) or path,
    )
    outputs = [
        mote("run", *source, "--chat", "-p", planted.EXAMPLE_TRIGGER, "-n", -1).output
        for source in (
            ["-m", path],
            ["-hf", "org/planted-GGUF:Q8_0"],
            ["ollama:planted:latest"],
            ["-m", "ollama:planted"],
        )
    ]
    assert all(planted.REFUSAL_TEXT in o for o in outputs), outputs
    assert asked == [("hf", "org/planted-GGUF:Q8_0"), ("name", "ollama:planted:latest"), ("name", "ollama:planted")]
    r = CliRunner().invoke(main, ["run", "-p", "x"])
    assert r.exit_code == 2 and "no model: give one of MODEL, -m PATH" in r.stderr


# ---------------------------------------------------------------------------------------------- -c everywhere


def test_c_0_is_the_training_context_and_more_warns_once(tiny_path):
    model = tiny_path("qwen3moe")
    trained = mote("inspect", model, "--json").output
    import json

    info = json.loads(trained)
    assert info["n_ctx"] == info["n_ctx_train"] == 256
    assert json.loads(mote("inspect", model, "--json", "-c", 0).output)["n_ctx"] == 256
    r = mote("run", model, "-p", PROMPT, "-n", 2, "-c", 0, "--verbose")
    assert "n_ctx                 = 256" in r.stderr
    r = mote("run", model, "-p", PROMPT, "-n", 2, "-c", 512)
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert r.exit_code == 0 and len(warnings) == 1 and "-c 512 is more than the 256 tokens" in warnings[0]


def test_a_too_long_prompt_is_named_by_its_file_and_line(tiny_path, tmp_path):
    behaviour = tmp_path / "behaviour.txt"
    behaviour.write_text("# a comment\nwhat happened in the city\n\n" + "the dog ran home " * 40 + "\n")
    baseline = tmp_path / "baseline.txt"
    baseline.write_text("the cat sat still\nthe dog ran away\n")
    r = CliRunner().invoke(
        main,
        [
            "ftri",
            str(tiny_path("qwen3moe")),
            "--prompts",
            str(behaviour),
            "--baseline-prompts",
            str(baseline),
            "--raw",
            "-c",
            "64",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == 1 and f"the prompt {behaviour}:4 (behaviour: 'the dog ran home" in r.stderr
    assert "raise the context (-c/--ctx-size" in r.stderr


def test_structured_prompts_carry_their_line(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        '[classes.a]\nprompts = ["first one"]\ntemplates = [\n  "what {x}?",\n]\n'
        '[classes.a.slots]\nx = ["now", "then"]\n[classes.b]\nprompts = ["say \\"hi\\""]\n'
    )
    ps = load_prompt_set(path)
    assert [p.origin for p in ps.prompts("a")] == [f"{path}:4", f"{path}:4", f"{path}:2"]
    assert ps.prompts("b")[0].origin == f"{path}:9"
    assert ps.prompts("a")[0].describe() == f"{path}:4 (a: 'what now?' with x='now')"


def test_decode_returns_the_rows_asked_for_while_capturing(load):
    model = load("qwen3moe")
    seqs = [model.tokenize(PROMPT), model.tokenize("the old man said hello")]
    with model.session(n_ctx=256, n_seq_max=2, kv_unified=True) as s:
        s.reset()
        plain = s.decode([(i, t, 0) for i, t in enumerate(seqs)], outputs="last")
        s.reset()
        with s.capture(label=None) as cap:
            cap.bind(0, 0)
            captured = s.decode([(i, t, 0) for i, t in enumerate(seqs)], outputs="last")
        assert cap.stats(0).tokens[model.layout.moe_layers[-1]] == len(seqs[0])  # every token still routed
    assert plain.shape == captured.shape == (2, model.n_vocab)
    np.testing.assert_allclose(captured, plain, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- chat templates


def test_no_template_falls_back_to_chatml_and_says_so_once(tiny_path, tmp_path):
    import gguf

    src = tiny_path("qwen3moe")
    bare = tmp_path / "bare.gguf"
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(bare, arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "tokenizer.chat_template"):
            continue
        writer.add_key_value(
            name,
            field.contents(),
            field.types[0],
            field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None,
        )
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with Model(bare) as m:
        assert m.template_fallback and m.chat_template is None
        text = m.prompt_text("hello")
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    r = mote("run", bare, "--chat", "-p", "hello", "-n", 2)
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert r.exit_code == 0 and len(notes) == 1 and "using ChatML, as llama.cpp does" in notes[0]
    assert "note:" not in mote("run", bare, "-p", "hello", "-n", 2).stderr  # --raw: no template asked for


def test_builtin_names_system_prompt_and_raw(tiny_path):
    with Model(tiny_path("qwen3moe"), chat_template="llama3", system_prompt="be brief") as m:
        text = m.prompt_text("hello")
        assert "<|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>" in text
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        assert m.prompt_text("hello", chat=False) == "be brief\nhello"
    with Model(tiny_path("qwen3moe"), chat_template="chatml") as m:
        assert (
            m.prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
            == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
        )


def test_chat_raw_sends_plain_text(planted_files, monkeypatch):
    seen = []
    generate = Session.generate

    def spy(self, prompt, **kw):
        seen.append(list(prompt))
        return generate(self, prompt, **kw)

    monkeypatch.setattr(Session, "generate", spy)
    mote("chat", planted_files[0], "--raw", "-n", 2, input="hello\n/quit\n")
    with Model(planted_files[0]) as m:
        assert seen == [m.tokenize("hello")]


def sdist_template(name: str) -> str:
    import tarfile

    with tarfile.open(real_vocab.sdist_path()) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f"{SDIST_TEMPLATES}/{name}"))
        return tar.extractfile(member).read().decode()


def test_gpt_oss_second_turn_follows_its_template(tiny_path, monkeypatch):
    try:
        template = sdist_template("openai-gpt-oss-120b.jinja")
    except real_vocab.SdistMissing as missing:
        pytest.skip(f"no sdist: {missing}")
    path = tiny_path("gpt-oss", vocab="gpt-oss", qtype="q8_0")
    reply = "<|channel|>analysis<|message|>They greet me.<|end|><|start|>assistant<|channel|>final<|message|>Hello!"
    monkeypatch.setattr(Session, "generate", lambda self, prompt, **kw: Generation(reply, [], list(prompt)))
    with (
        Model(path, chat_template=template, chat_template_origin="openai-gpt-oss-120b.jinja") as m,
        m.session(n_ctx=1024) as s,
    ):
        raw_history = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "and now?"},
        ]
        with pytest.raises(ChatTemplateError, match="openai-gpt-oss-120b.jinja failed on this conversation"):
            m.format_chat(raw_history)  # the reply put back raw: the template refuses it
        out = []
        chat = Chat(m, s, max_tokens=4, write=lambda text="", end="\n": out.append(text))
        chat.say("hi")
        chat.say("and now?")
        assert chat.state.history[1] == {"role": "assistant", "content": "Hello!"}
        text = m.format_chat(chat.state.history + [{"role": "user", "content": "third"}])
    assert "<|channel|>final<|message|>Hello!" in text and "They greet me." not in text
    assert not [line for line in out if line.startswith("error")]


def test_real_templates_of_the_sdist_render(tiny_path):
    try:
        names = [
            "Qwen-Qwen3-0.6B.jinja",
            "deepseek-ai-DeepSeek-V3.1.jinja",
            "openai-gpt-oss-120b.jinja",
            "meta-llama-Llama-3.1-8B-Instruct.jinja",
        ]
        templates = {name: sdist_template(name) for name in names}
    except real_vocab.SdistMissing as missing:
        pytest.skip(f"no sdist: {missing}")
    conversation = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    for name, template in templates.items():
        with Model(tiny_path("qwen3moe"), chat_template=template, chat_template_origin=name) as m:
            text = m.format_chat(conversation)
        assert "be kind" in text and "bye" in text and text.index("hi") < text.index("bye"), name
