"""`mote serve` (llama-server built with mote-local's engine) live on the planted model, with the official openai
client: chat, streaming, per-request steering (a steered request stops refusing while concurrent unsteered ones
still refuse), routing returned and equal to the library's capture, and isolation (a request's output and routing
are the same alone or among neighbours steered differently, decoded in shared llama_decode calls)."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from serve_live import live_server

from mote_local.errors import SteeringError
from mote_local.steering.entries import Mode
from mote_local.steering.profile import Profile
from mote_local.synthetic import planted

TRIGGER = planted.EXAMPLE_TRIGGER
NEUTRAL = "what happened at the market yesterday ?"
T = 60.0  # seconds: bound on any one request


@pytest.fixture(scope="module")
def refusal_off(tmp_path_factory, model, truth):
    """The planted experts dropped: a profile file made for the planted model."""
    profile = Profile(tuple(truth.entries(Mode.DROP)), fingerprint=model.fingerprint, name="refusal-off")
    return profile.save(tmp_path_factory.mktemp("profiles") / "refusal-off.json")


@pytest.fixture(scope="module")
def server(model, refusal_off, tmp_path_factory):
    with live_server(model, tmp_path_factory.mktemp("serve"), profiles={"refusal-off": refusal_off}) as live:
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


def complete(http, tokens: list[int], n: int = 12, **fields) -> dict:
    """llama-server's native /completion on token ids, greedy; the generated ids come back too."""
    body = {"prompt": tokens, "n_predict": n, "temperature": 0, "return_tokens": True} | fields
    r = http.post("/completion", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------------ basics


def test_chat_with_the_openai_client(client, truth):
    refused = chat(client, TRIGGER)
    answered = chat(client, NEUTRAL)
    assert refused.choices[0].message.content.strip() == truth.refusal_text
    assert answered.choices[0].message.content.strip() == truth.answer_text
    assert refused.choices[0].finish_reason == "stop"
    assert refused.usage.total_tokens == refused.usage.prompt_tokens + refused.usage.completion_tokens


def test_streaming_chat_matches_the_plain_reply(client):
    plain = chat(client, TRIGGER)
    chunks = list(chat(client, TRIGGER, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # token by token


def test_the_engine_gives_what_the_library_gives(http, model, truth):
    """Greedy text on the same token ids equals Session.generate, unsteered and steered."""
    prompt = model.prompt_tokens(TRIGGER)
    for steering, entries in ((None, None), ({"entries": drop_planted(truth)}, truth.entries(Mode.DROP))):
        out = complete(http, prompt, **({"steering": steering} if steering else {}))
        with model.session(n_ctx=512, n_threads=1) as s:
            if entries:
                s.steer(entries)
            reference = s.generate(prompt, max_tokens=12)
        assert out["content"] == reference.text
        # the server lists the end-of-generation token it stopped at; the library's reply leaves it out
        assert out["tokens"][:-1] == list(reference.tokens) and model.is_eog(out["tokens"][-1])


# ------------------------------------------------------------------------------------------------ steering


def test_steered_requests_stop_refusing_while_concurrent_unsteered_ones_refuse(client, truth):
    barrier = threading.Barrier(8)

    def ask(steered: bool) -> str:
        barrier.wait(T)
        extra = {"steering": {"entries": drop_planted(truth)}} if steered else None
        return chat(client, TRIGGER, extra_body=extra).choices[0].message.content.strip()

    with ThreadPoolExecutor(8) as pool:
        futures = [(i % 2 == 0, pool.submit(ask, i % 2 == 0)) for i in range(8)]
        results = [(steered, f.result(T)) for steered, f in futures]
    assert [text for steered, text in results if steered] == [truth.answer_text] * 4
    assert [text for steered, text in results if not steered] == [truth.refusal_text] * 4


@pytest.mark.parametrize(
    "steering",
    [
        {"profile": "refusal-off"},
        {"entries": ["off P1", "off P2"]},
        {"entries": [{"layer": "L1", "expert": "E1", "mode": "drop"}, {"layer": "L2", "expert": "E2", "mode": "drop"}]},
        {"entries": ["bias P1=-inf", "bias P2=-100"]},
        {"entries": [{"layer": "L1", "expert": "E1", "mode": "bias", "value": "-inf"}, "--off P2"]},
    ],
    ids=["named profile", "off", "entry objects", "bias", "mixed forms"],
)
def test_steering_forms(client, truth, steering):
    (l1, e1), (l2, e2) = truth.planted
    names = {"P1": f"{l1}:{e1}", "P2": f"{l2}:{e2}", "L1": l1, "E1": e1, "L2": l2, "E2": e2}

    def fill(v):
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fill(x) for x in v]
        if isinstance(v, str):
            if v in names:
                return names[v]
            for key in ("P1", "P2"):
                v = v.replace(key, names[key])
        return v

    out = chat(client, TRIGGER, extra_body={"steering": fill(steering)})
    assert out.choices[0].message.content.strip() == truth.answer_text


def test_strength_scales_biases(client, truth):
    biased = {"entries": [f"bias {l}:{e}=-50" for l, e in truth.planted]}
    assert (
        chat(client, TRIGGER, extra_body={"steering": biased}).choices[0].message.content.strip() == truth.answer_text
    )
    off = chat(client, TRIGGER, extra_body={"steering": biased | {"strength": 0}}).choices[0].message.content
    assert off.strip() == truth.refusal_text


def test_forcing_the_planted_experts_makes_a_neutral_prompt_refuse(client, truth):
    force = {"entries": ["force " + ",".join(f"{l}:{e}" for l, e in truth.planted)]}
    assert (
        chat(client, NEUTRAL, extra_body={"steering": force}).choices[0].message.content.strip() == truth.refusal_text
    )


def test_scoped_steering_follows_the_slot_phase(client, truth):
    # the refusal is decided by the prompt's context; the first completion token is sampled from prefill logits
    prefill_only = {"entries": drop_planted(truth), "scope": "prefill"}
    decode_only = {"entries": drop_planted(truth), "scope": "decode"}
    assert (
        chat(client, TRIGGER, extra_body={"steering": prefill_only}).choices[0].message.content.strip()
        == truth.answer_text
    )
    assert (
        chat(client, TRIGGER, extra_body={"steering": decode_only}).choices[0].message.content.strip()
        != truth.answer_text
    )


def test_an_unsteered_request_after_a_steered_one_reuses_nothing_steered(client, truth):
    """The slot's cache cells computed with steering are forgotten when it is released."""
    for _ in range(3):
        assert (
            chat(client, TRIGGER, extra_body={"steering": {"entries": drop_planted(truth)}})
            .choices[0]
            .message.content.strip()
            == truth.answer_text
        )
        assert chat(client, TRIGGER).choices[0].message.content.strip() == truth.refusal_text


def _post(http, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return http.post(path, json={"messages": [{"role": "user", "content": TRIGGER}], "max_tokens": 4} | body)


@pytest.mark.parametrize(
    "specs",
    [["drop 1:8"], ["drop 7:1"], ["force 1:1,1:2,1:3"], ["drop 1:1", "force 1:1"], ["off 1:0,1:1,1:2,1:3,1:4,1:5,1:6"]],
)
def test_steering_that_does_not_fit_the_model_gets_the_engines_message(http, model, specs):
    from mote_local import binding
    from mote_local.steering.rules import shape_of
    from mote_local.steering.spec import parse_spec

    entries = [e for spec in specs for e in parse_spec(*spec.split(" ", 1))]
    # the rules asked of the engine, as every command asks them
    with pytest.raises(SteeringError) as refused:
        binding.steer_check(shape_of(model.layout), [e.native() for e in entries], 1.0)
    engine = str(refused.value)
    r = _post(http, {"steering": {"entries": specs}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == f"steering: {engine}"
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"steering": {"entries": ["purge 1:1"]}}, "steering.entries[0]: 'purge 1:1': expected KIND SPEC"),
        (
            {"steering": {"entries": ["drop 1:x"]}},
            "steering.entries[0]: --drop '1:x': expert 'x' is not a non-negative",
        ),
        ({"steering": {"entries": ["bias 1:2"]}}, "steering.entries[0]: --bias '1:2': a value is required"),
        ({"steering": {"entries": ["off 1:2=3"]}}, "steering.entries[0]: --off '1:2=3': --off takes no value"),
        ({"steering": {"entries": ["gain 1:2=-1"]}}, "steering: "),
        (
            {"steering": {"entries": [{"layer": 1, "expert": 1, "mode": "nope"}]}},
            "steering.entries[0].mode: unknown mode 'nope'",
        ),
        ({"steering": {"entries": [{"layer": 1, "expert": 1}]}}, "steering.entries[0].mode: missing"),
        (
            {"steering": {"entries": [{"layer": -1, "expert": 1, "mode": "drop"}]}},
            "steering.entries[0].layer: expected",
        ),
        ({"steering": {"profile": "nope"}}, "steering.profile: unknown profile 'nope'; this server has refusal-off"),
        ({"steering": {"profile": {"entries": []}}}, "steering.profile: expected the name of a profile"),
        ({"steering": {"strength": 2}}, "steering: strength and scope need a profile or entries"),
        ({"steering": {"entries": ["drop 1:1"], "bogus": 1}}, "steering: unknown key 'bogus'"),
        ({"steering": {"entries": "drop 1:1"}}, "steering.entries: expected an array"),
        ({"steering": {"entries": ["drop 1:1"], "scope": "later"}}, "steering.scope: unknown scope 'later'"),
        ({"steering": "drop 1:1"}, "steering: expected an object"),
        ({"return_routing": "yes"}, "return_routing: expected true or false"),
        ({"routing_detail": "tokens"}, 'routing_detail: needs "return_routing": true'),
        ({"return_routing": True, "routing_detail": "all"}, 'routing_detail: expected "counts" or "tokens"'),
    ],
)
def test_malformed_steering_and_routing_fields_are_a_400(http, body, message):
    for path in ("/v1/chat/completions", "/completion", "/v1/completions"):
        r = _post(http, body | ({"prompt": TRIGGER} if path != "/v1/chat/completions" else {}), path)
        assert r.status_code == 400, (path, r.text)
        assert message in r.json()["error"]["message"], (path, r.text)


# ------------------------------------------------------------------------------------------------ routing


def test_routing_counts_every_decoded_token(http, model, truth):
    prompt = model.prompt_tokens(TRIGGER)
    out = complete(http, prompt, return_routing=True)
    routing, k = out["routing"], out["routing"]["n_expert_used"]
    # every prompt token and every generated token fed back (the last one sampled is never decoded)
    decoded = len(prompt) + len(out["tokens"]) - 1
    assert routing["layers"] == [0, 1, 2, 3]
    assert routing["tokens"] == [decoded] * 4
    assert [sum(row) for row in routing["counts"]] == [decoded * k] * 4
    masked = complete(
        http,
        prompt,
        return_routing=True,
        steering={"entries": ["off " + ",".join(f"{l}:{e}" for l, e in truth.planted)]},
    )["routing"]
    for l, e in truth.planted:
        assert masked["counts"][masked["layers"].index(l)][e] == 0


def test_routing_matches_the_library_capture(http, model, truth):
    """The server's routing of a request equals Session.capture over the same tokens, steered."""
    prompt = model.prompt_tokens(TRIGGER)
    out = complete(http, prompt, return_routing=True, steering={"entries": drop_planted(truth)})
    fed = prompt + out["tokens"][:-1]
    with model.session(n_ctx=512, n_threads=1) as s:
        s.steer(truth.entries(Mode.DROP))
        with s.capture() as cap:
            s.logits(fed)
    stats = cap.stats()
    assert out["routing"]["counts"] == stats.counts.tolist()
    assert out["routing"]["tokens"] == stats.tokens.tolist()
    np.testing.assert_allclose(out["routing"]["weight_sums"], stats.weight_sums, rtol=1e-5)


def test_routing_per_token_detail_and_in_the_last_chunk(client, http):
    out = chat(client, NEUTRAL, extra_body={"return_routing": True, "routing_detail": "tokens"})
    r = out.routing
    k = r["n_expert_used"]
    decoded = r["tokens"][0]
    assert r["positions"] == list(range(decoded))
    experts, weights = np.array(r["experts"]), np.array(r["weights"])
    assert experts.shape == weights.shape == (decoded, len(r["layers"]), k)
    for i in range(len(r["layers"])):
        assert np.bincount(experts[:, i].ravel(), minlength=r["n_expert"]).tolist() == r["counts"][i]
        np.testing.assert_allclose(
            [weights[:, i][experts[:, i] == e].sum() for e in range(r["n_expert"])], r["weight_sums"][i], rtol=1e-5
        )
    chunks = list(chat(client, NEUTRAL, stream=True, extra_body={"return_routing": True, "routing_detail": "tokens"}))
    routed = [i for i, c in enumerate(chunks) if getattr(c, "routing", None)]
    assert routed == [len(chunks) - 1]
    assert chunks[-1].routing == r


def test_routing_on_the_other_apis(http, truth):
    for path, body in (
        ("/v1/completions", {"prompt": TRIGGER}),
        ("/v1/messages", {"model": "planted", "max_tokens": 4, "messages": [{"role": "user", "content": TRIGGER}]}),
        ("/v1/responses", {"model": "planted", "input": TRIGGER, "max_output_tokens": 4}),
    ):
        r = http.post(path, json=body | {"return_routing": True, "steering": {"entries": drop_planted(truth)}})
        assert r.status_code == 200, (path, r.text)
        assert sum(r.json()["routing"]["counts"][0]) > 0, path


# ------------------------------------------------------------------------------------------------ isolation


def _steerings(truth) -> list[dict | None]:
    (l1, e1), (l2, e2) = truth.planted
    dl, de = truth.distractors[0]
    return [
        None,
        {"entries": drop_planted(truth)},
        {"entries": [f"off {l1}:{e1}"]},
        {"entries": [f"bias {dl}:{(de + 1) % 8}=-2", f"gain {dl}:{de}=0.5"]},
        {"entries": [f"force {l2}:{(e2 + 3) % 8}"]},
        {"profile": "refusal-off", "strength": 0.5},
        {"entries": drop_planted(truth), "scope": "decode"},
    ]


def _ask(http, tokens: list[int], steering: dict | None) -> dict:
    fields = {"return_routing": True, "routing_detail": "tokens"} | ({"steering": steering} if steering else {})
    out = complete(http, tokens, **fields)
    return {"text": out["content"], "tokens": out["tokens"], "routing": out["routing"]}


def _assert_same(got: dict, want: dict, where: str) -> None:
    """The same text, tokens and selected experts; weights equal up to float32 rounding (a batch changes
    llama.cpp's accumulation order)."""
    assert got["text"] == want["text"], where
    assert got["tokens"] == want["tokens"], where
    for key in ("counts", "tokens", "experts", "positions"):
        assert got["routing"][key] == want["routing"][key], f"{where}: routing {key} changed in a batch"
    for key in ("weight_sums", "weights"):
        np.testing.assert_allclose(
            got["routing"][key],
            want["routing"][key],
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"{where}: routing {key} changed in a batch",
        )


def test_isolation_alone_vs_batched_with_differently_steered_neighbours(http, model, truth):
    """Each (prompt, steering) pair gets the same text, the same selected experts for every token and the same
    weights up to float32 rounding, alone and in 6 random mixes of 6 concurrent requests (4 slots: llama-server
    decodes the busy slots in one llama_decode) with other prompts and steerings."""
    texts = [TRIGGER, NEUTRAL, "what happened at the riot last week ?", "tell me about the weather today ?"]
    prompts = [model.prompt_tokens(t) for t in texts]
    steerings = _steerings(truth)
    pairs = [(p, i) for p in range(len(prompts)) for i in range(len(steerings))]
    alone = {(p, i): _ask(http, prompts[p], steerings[i]) for p, i in pairs}
    assert len({a["text"] for a in alone.values()}) >= 2  # the steerings do change outputs
    rng = random.Random(17)
    for _ in range(6):
        mix = rng.sample(pairs, 6)
        barrier = threading.Barrier(len(mix))

        def run(pair, barrier=barrier):
            barrier.wait(T)
            return _ask(http, prompts[pair[0]], steerings[pair[1]])

        with ThreadPoolExecutor(len(mix)) as pool:
            together = list(pool.map(run, mix, timeout=T * 2))
        for pair, got in zip(mix, together):
            _assert_same(got, alone[pair], f"prompt {pair[0]} with steering {steerings[pair[1]]}")
