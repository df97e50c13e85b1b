"""`mote serve` against a live server on the planted model, with the official openai client: chat, streaming,
per-request steering (a steered request stops refusing while a concurrent unsteered one still refuses),
routing returned, and isolation (a request's output and routing are the same alone or among neighbours
steered differently)."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from mote_local.steering.entries import Mode
from mote_local.steering.profile import Profile
from serve_live import live_server, model  # noqa: F401 (fixtures)


TRIGGER = "what happened at the protest yesterday ?"
NEUTRAL = "what happened at the market yesterday ?"
T = 30.0  # seconds: bound on any one request


@pytest.fixture(scope="module")
def refusal_off(tmp_path_factory, model, truth):
    """The planted experts dropped: a profile file made for the planted model."""
    profile = Profile(tuple(truth.entries(Mode.DROP)), fingerprint=model.fingerprint, name="refusal-off")
    return profile.save(tmp_path_factory.mktemp("profiles") / "refusal-off.json")


@pytest.fixture(scope="module")
def server(model, refusal_off):
    with live_server(model, profiles={"refusal-off": refusal_off}) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=T, max_retries=0)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=T) as c:
        yield c


def chat(client, prompt: str, **kw):
    kw = {"temperature": 0, "max_tokens": 16} | kw
    return client.chat.completions.create(model="planted", messages=[{"role": "user", "content": prompt}], **kw)


def drop_planted(truth) -> list[str]:
    return ["drop " + ",".join(f"{l}:{e}" for l, e in truth.planted)]


# ------------------------------------------------------------------------------------------------ basics

def test_health_models_profiles(http, server, truth):
    assert http.get("/health").json()["status"] == "ok"
    models = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [server.backend.settings.model_id]
    assert models[0]["meta"]["n_expert"] == 8
    profiles = http.get("/v1/profiles").json()["data"]
    assert [p["id"] for p in profiles] == ["refusal-off"]
    assert {(e["layer"], e["expert"], e["mode"]) for e in profiles[0]["entries"]} == \
        {(l, e, "drop") for l, e in truth.planted}


def test_chat_with_the_openai_client(client, truth, server):
    refused = chat(client, TRIGGER)
    answered = chat(client, NEUTRAL)
    assert refused.choices[0].message.content.strip() == truth.refusal_text
    assert answered.choices[0].message.content.strip() == truth.answer_text
    assert refused.choices[0].finish_reason == "stop"
    assert refused.model == server.backend.settings.model_id
    # usage: the prompt in the model's chat template, and the completion without its end-of-generation token
    prompt = server.backend.model.prompt_tokens(TRIGGER)  # the one conversation -> tokens path
    assert refused.usage.prompt_tokens == len(prompt)
    with server.backend.model.session(n_ctx=512, n_threads=1) as s:
        reference = s.generate(prompt, max_tokens=16)
    assert refused.choices[0].message.content == reference.text
    assert refused.usage.completion_tokens == len(reference.tokens)
    assert refused.usage.total_tokens == refused.usage.prompt_tokens + refused.usage.completion_tokens


def test_streaming_chat_matches_the_plain_reply(client, truth):
    plain = chat(client, TRIGGER)
    chunks = list(chat(client, TRIGGER, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # token by token
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_text_completions_plain_and_streaming(client, truth):
    out = client.completions.create(model="planted", prompt=TRIGGER, temperature=0, max_tokens=16)
    assert out.choices[0].text.strip() == truth.refusal_text
    stream = client.completions.create(model="planted", prompt=TRIGGER, temperature=0, max_tokens=16, stream=True)
    assert "".join(c.choices[0].text for c in stream) == out.choices[0].text
    short = client.completions.create(model="planted", prompt=TRIGGER, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_stop_strings_and_seeded_sampling(client, truth):
    cut = chat(client, NEUTRAL, stop=[" calm"])
    assert cut.choices[0].message.content == " It was a"
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, NEUTRAL, stop=" calm", stream=True))
    assert streamed == " It was a"
    # a seeded sampled reply is reproducible (the sampler's statistics are tested in test_serve_units.py)
    a = chat(client, NEUTRAL, temperature=1.5, seed=7).choices[0].message.content
    b = chat(client, NEUTRAL, temperature=1.5, seed=7).choices[0].message.content
    assert a == b


# ------------------------------------------------------------------------------------------------ steering

def test_steered_request_stops_refusing_while_a_concurrent_unsteered_one_refuses(client, truth, server):
    barrier = threading.Barrier(8)

    def ask(steered: bool) -> str:
        barrier.wait(T)
        extra = {"steering": {"entries": drop_planted(truth)}} if steered else None
        return chat(client, TRIGGER, extra_body=extra).choices[0].message.content.strip()

    server.scheduler.peak_groups = 0
    with ThreadPoolExecutor(8) as pool:
        futures = [(i % 2 == 0, pool.submit(ask, i % 2 == 0)) for i in range(8)]
        results = [(steered, f.result(T)) for steered, f in futures]
    assert [text for steered, text in results if steered] == [truth.answer_text] * 4
    assert [text for steered, text in results if not steered] == [truth.refusal_text] * 4
    assert server.scheduler.peak_groups >= 2  # steered and unsteered requests were in flight together


@pytest.mark.parametrize("steering", [
    {"profile": "refusal-off"},
    {"entries": ["off 1:6", "off 2:0"]},
    {"entries": [{"layer": 1, "expert": 6, "mode": "drop"}, {"layer": 2, "expert": 0, "mode": "drop"}]},
    {"entries": ["bias 1:6=-inf", "bias 2:0=-100"]},
])
def test_steering_forms(client, truth, steering):
    planted_pairs = [f"{l}:{e}" for l, e in truth.planted]
    steering = json.loads(json.dumps(steering).replace("1:6", planted_pairs[0]).replace("2:0", planted_pairs[1]))
    assert chat(client, TRIGGER, extra_body={"steering": steering}).choices[0].message.content.strip() == \
        truth.answer_text


def test_inline_profile_and_strength(client, truth, model):
    profile = Profile(tuple(truth.entries(Mode.DROP)), fingerprint=model.fingerprint)
    inline = json.loads(profile.to_json())
    assert chat(client, TRIGGER, extra_body={"steering": {"profile": inline}}).choices[0].message.content.strip() \
        == truth.answer_text
    # a bias scaled by strength 0 steers nothing
    biased = {"entries": [f"bias {l}:{e}=-50" for l, e in truth.planted]}
    assert chat(client, TRIGGER, extra_body={"steering": biased}).choices[0].message.content.strip() == \
        truth.answer_text
    off = chat(client, TRIGGER, extra_body={"steering": biased | {"strength": 0}}).choices[0].message.content
    assert off.strip() == truth.refusal_text


def test_forcing_the_planted_experts_makes_a_neutral_prompt_refuse(client, truth):
    force = {"entries": ["force " + ",".join(f"{l}:{e}" for l, e in truth.planted)]}
    assert chat(client, NEUTRAL, extra_body={"steering": force}).choices[0].message.content.strip() == \
        truth.refusal_text


def test_scoped_steering(client, truth):
    # the refusal is decided by the prompt's context; the first completion token is sampled from prefill logits
    decode_only = {"entries": drop_planted(truth), "scope": "decode"}
    prefill_only = {"entries": drop_planted(truth), "scope": "prefill"}
    assert chat(client, TRIGGER, extra_body={"steering": prefill_only}).choices[0].message.content.strip() == \
        truth.answer_text
    assert chat(client, TRIGGER, extra_body={"steering": decode_only}).choices[0].message.content.strip() != \
        truth.answer_text


def test_invalid_steering_gets_the_clis_message(http, truth):
    from mote_local.errors import ProfileError
    from mote_local.steering.spec import parse_spec

    for spec in ("drop 1:x", "bias 1:2", "off 1:2=3", "gain 1:2=-1"):
        kind, _, text = spec.partition(" ")
        with pytest.raises(ProfileError) as cli:
            parse_spec(kind, text)
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": TRIGGER}],
                                                     "steering": {"entries": [spec]}})
        assert r.status_code == 400
        assert r.json()["error"] == {"message": f"steering.entries[0]: {cli.value}", "type": "invalid_request_error",
                                     "param": "steering", "code": "invalid_steering"}


def _cli_message(layout, specs: list[str]) -> str:
    """What `mote run --drop ...` says for these flags: parse_spec, then Profile.validate on the model."""
    from mote_local.errors import ProfileError
    from mote_local.steering.spec import parse_spec

    try:
        entries = [e for spec in specs for e in parse_spec(*spec.split(" ", 1))]
        Profile(tuple(entries)).validate(layout)
    except ProfileError as err:
        return str(err)
    raise AssertionError(f"{specs} are valid")


@pytest.mark.parametrize("specs", [["drop 1:8"], ["drop 7:1"], ["force 1:1,1:2,1:3"], ["drop 1:1", "force 1:1"],
                                   ["off 1:0,1:1,1:2,1:3,1:4,1:5,1:6"]])
def test_steering_that_does_not_fit_the_model_gets_the_clis_message(http, server, specs):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": TRIGGER}],
                                                 "steering": {"entries": specs}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == _cli_message(server.backend.layout, specs)
    assert r.json()["error"]["code"] == "invalid_steering"


@pytest.mark.parametrize("steering, message", [
    ({"entries": ["purge 1:1"]}, "steering.entries[0]: 'purge 1:1': expected KIND SPEC"),
    ({"entries": [{"layer": 1, "expert": 1, "mode": "nope"}]}, "steering.entries[0].mode: unknown mode"),
    ({"entries": [{"layer": 1, "expert": 1}]}, "steering.entries[0].mode: missing"),
    ({"profile": "nope"}, "steering.profile: unknown profile 'nope'; this server has refusal-off"),
    ({"profile": {"format": "mote-profile"}}, "steering.profile: "),
    ({"profile": {"format": "mote-profile", "version": 1, "entries": [], "strength": "x"}}, "steering.profile: "),
    ({"strength": 2}, "steering: strength and scope need a profile or entries"),
    ({"entries": ["drop 1:1"], "bogus": 1}, "unknown field 'steering.bogus'"),
    ({"entries": "drop 1:1"}, "steering.entries: "),
])
def test_malformed_steering_is_a_400(http, steering, message):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": TRIGGER}],
                                                 "steering": steering})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(message), r.text


def test_a_profile_made_for_another_model_is_a_400(http, tiny_path, truth):
    other = Profile.from_entries(truth.entries(Mode.DROP), model_path=tiny_path("qwen3moe"))
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": TRIGGER}],
                                                 "steering": {"profile": json.loads(other.to_json())}})
    assert r.status_code == 400
    assert "does not fit" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": TRIGGER}],
                                                 "steering": {"profile": json.loads(other.to_json()), "force": True},
                                                 "temperature": 0})
    assert r.status_code == 200


# ------------------------------------------------------------------------------------------------ routing

def test_routing_returned_counts_every_token(client, truth, server):
    out = chat(client, TRIGGER, extra_body={"return_routing": True})
    routing = out.routing
    k, total = routing["n_expert_used"], out.usage.total_tokens
    assert routing["layers"] == [0, 1, 2, 3]
    assert routing["tokens"] == [total] * 4  # prompt and completion, each token in every MoE layer
    assert [sum(row) for row in routing["counts"]] == [total * k] * 4
    layer = routing["layers"].index(truth.planted[0][0])
    assert routing["counts"][layer][truth.planted[0][1]] > 0
    # masked experts are never selected: the routing reports what the steering did
    masked = chat(client, TRIGGER, extra_body={"return_routing": True, "steering": {
        "entries": ["off " + ",".join(f"{l}:{e}" for l, e in truth.planted)]}}).routing
    for l, e in truth.planted:
        assert masked["counts"][masked["layers"].index(l)][e] == 0


def test_routing_matches_the_library_capture(client, truth, model):
    """The server's routing of a request equals Session.capture over the same prompt and completion."""
    out = chat(client, TRIGGER, extra_body={"return_routing": True, "steering": {"entries": drop_planted(truth)}})
    prompt = model.prompt_tokens(TRIGGER)
    with model.session(n_ctx=512, n_threads=1) as s:
        s.steer(truth.entries(Mode.DROP))
        with s.capture() as cap:
            gen = s.generate(prompt, max_tokens=16)
    assert gen.text == out.choices[0].message.content
    stats = cap.stats()
    assert out.routing["counts"] == stats.counts.tolist()
    assert out.routing["tokens"] == stats.tokens.tolist()
    np.testing.assert_allclose(out.routing["weight_sums"], stats.weight_sums, rtol=1e-6)


def test_routing_per_token_detail(client, http):
    out = chat(client, NEUTRAL, extra_body={"return_routing": True, "routing_detail": "tokens"})
    r = out.routing
    total, k = out.usage.total_tokens, r["n_expert_used"]
    assert r["positions"] == list(range(total))
    experts, weights = np.array(r["experts"]), np.array(r["weights"])
    assert experts.shape == weights.shape == (total, len(r["layers"]), k)
    for i in range(len(r["layers"])):
        assert np.bincount(experts[:, i].ravel(), minlength=r["n_expert"]).tolist() == r["counts"][i]
        np.testing.assert_allclose(
            [weights[:, i][experts[:, i] == e].sum() for e in range(r["n_expert"])], r["weight_sums"][i], rtol=1e-5)
    # the stream carries the routing in its last chunk
    chunks = list(chat(client, NEUTRAL, stream=True, extra_body={"return_routing": True, "routing_detail": "tokens"}))
    routed = [c.routing for c in chunks if getattr(c, "routing", None)]
    assert routed == [r]
    bad = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": NEUTRAL}],
                                                   "routing_detail": "tokens"})
    assert bad.status_code == 400 and "return_routing" in bad.json()["error"]["message"]


# ------------------------------------------------------------------------------------------------ isolation

def _steerings(truth) -> list[dict | None]:
    (l1, e1), (l2, e2) = truth.planted
    dl, de = truth.distractors[0]
    return [None,
            {"entries": drop_planted(truth)},
            {"entries": [f"off {l1}:{e1}"]},
            {"entries": [f"bias {dl}:{(de + 1) % 8}=-2", f"gain {dl}:{de}=0.5"]},
            {"entries": [f"force {l2}:{(e2 + 3) % 8}"]},
            {"profile": "refusal-off", "strength": 0.5},
            {"entries": drop_planted(truth), "scope": "decode"}]


def _ask(http, prompt: str, steering: dict | None) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 12,
            "return_routing": True, "routing_detail": "tokens"}
    if steering is not None:
        body["steering"] = steering
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    return {"text": out["choices"][0]["message"]["content"], "usage": out["usage"], "routing": out["routing"]}


def _assert_same(got: dict, want: dict, where: str) -> None:
    """The same text, usage and selected experts; weights equal up to float32 rounding (a batch changes
    llama.cpp's accumulation order)."""
    assert got["text"] == want["text"], where
    assert got["usage"] == want["usage"], where
    for key in ("counts", "tokens", "experts", "positions"):
        assert got["routing"][key] == want["routing"][key], f"{where}: routing {key} changed in a batch"
    for key in ("weight_sums", "weights"):
        np.testing.assert_allclose(got["routing"][key], want["routing"][key], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{where}: routing {key} changed in a batch")


def test_isolation_alone_vs_batched_with_differently_steered_neighbours(http, truth, server):
    """Each (prompt, steering) pair gets the same text, the same selected experts for every token, and the same
    weights up to float32 rounding, alone and in 6 random mixes of 6 concurrent requests with other prompts and
    steerings. (Selections are exact; weights move by an ulp when the batch's size changes llama.cpp's
    accumulation order, as Session.generate_batch documents.)"""
    prompts = [TRIGGER, NEUTRAL, "what happened at the riot last week ?", "tell me about the weather today ?"]
    steerings = _steerings(truth)
    pairs = [(p, i) for p in range(len(prompts)) for i in range(len(steerings))]
    alone = {(p, i): _ask(http, prompts[p], steerings[i]) for p, i in pairs}
    assert len({a["text"] for a in alone.values()}) >= 2  # the steerings do change outputs
    rng = random.Random(17)
    server.scheduler.peak_groups = server.scheduler.mixed_steps = 0
    for _ in range(6):
        mix = rng.sample(pairs, 6)
        barrier = threading.Barrier(len(mix))

        def run(pair):
            barrier.wait(T)
            return _ask(http, prompts[pair[0]], steerings[pair[1]])

        with ThreadPoolExecutor(len(mix)) as pool:
            together = list(pool.map(run, mix, timeout=T * 2))
        for pair, got in zip(mix, together):
            _assert_same(got, alone[pair], f"prompt {pair[0]} with steering {steerings[pair[1]]}")
    assert server.scheduler.peak_groups >= 3
    assert server.scheduler.mixed_steps > 0  # differently steered requests did share decode calls


def test_prompts_longer_than_a_step_are_decoded_in_chunks(model, truth):
    """With 16 tokens per step, a 60-token prompt takes four steps, interleaved with another request's reply;
    both get what they get alone, and the routing still covers every token."""
    long_prompt = "what happened at the market yesterday ? " * 5 + TRIGGER
    with live_server(model, n_batch=16) as live, httpx.Client(base_url=live.url, timeout=T) as http:
        alone = _ask(http, long_prompt, None)
        assert alone["usage"]["prompt_tokens"] > 48
        assert alone["text"].strip() == truth.refusal_text
        assert alone["routing"]["tokens"] == [alone["usage"]["total_tokens"]] * 4
        # the prompt in chunks of 16, then one step per completion token (each fed back; the end token is not)
        usage = alone["usage"]
        assert live.scheduler.steps == -(-usage["prompt_tokens"] // 16) + usage["completion_tokens"]
        with ThreadPoolExecutor(2) as pool:
            short = pool.submit(_ask, http, NEUTRAL, {"entries": drop_planted(truth)})
            again = pool.submit(_ask, http, long_prompt, None)
            _assert_same(again.result(T), alone, "the long prompt")
            assert short.result(T)["text"].strip() == truth.answer_text
        assert max(live.scheduler.batch_sizes) == 2
    prompt = model.prompt_tokens(long_prompt)
    with model.session(n_ctx=512, n_threads=1) as s:
        assert s.generate(prompt, max_tokens=12).text == alone["text"]
