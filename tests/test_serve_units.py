"""The parts of `mote serve` that need no server: sampling, streamed text and stop strings, the batch planner,
the steering field and the settings."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mote_local.errors import InputError, ProfileError
from mote_local.serve.sampling import Sampler, SamplingParams, TextStream
from mote_local.serve.scheduler import Job, Slot, plan_batch
from mote_local.serve.settings import Settings, parse_profile_option
from mote_local.serve.steering import request_profile, steering_key
from mote_local.serve.types import SteeringRequest
from mote_local.steering.entries import Entry, Mode, Scope
from mote_local.steering.profile import Profile

# ------------------------------------------------------------------------------------------------ sampling


def test_greedy_is_argmax_and_logit_bias_moves_it():
    row = np.array([0.0, 3.0, 1.0, 2.9], np.float32)
    assert Sampler(SamplingParams(temperature=0)).sample(row) == 1
    assert Sampler(SamplingParams(temperature=0, logit_bias={3: 0.5})).sample(row) == 3
    assert Sampler(SamplingParams(temperature=0, logit_bias={1: -100})).sample(row) == 3


def test_penalties_count_the_completion_tokens():
    row = np.array([0.0, 3.0, 2.5], np.float32)
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=0.3))
    assert [s.sample(row) for _ in range(3)] == [1, 1, 2]  # 3.0, then 2.7 > 2.5, then 2.4 < 2.5
    s = Sampler(SamplingParams(temperature=0, presence_penalty=1.0))
    assert [s.sample(row) for _ in range(3)] == [1, 2, 1]  # 2.0 < 2.5 after one; 2.0 > 1.5 once both appeared


def test_sampling_follows_temperature_top_k_top_p_and_seed():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    s = Sampler(SamplingParams(temperature=1.0, seed=1))
    draws = Counter(s.sample(logits) for _ in range(n))
    for token, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert abs(draws[token] / n - p) < 0.03
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=2))
    assert set(s.sample(logits) for _ in range(400)) == {0, 1}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=3))  # 0.5 + 0.3 reaches 0.75
    assert set(s.sample(logits) for _ in range(400)) == {0, 1}
    hot = Sampler(SamplingParams(temperature=100.0, seed=4))
    assert abs(Counter(hot.sample(logits) for _ in range(n))[3] / n - 0.25) < 0.03  # nearly uniform
    same = [Sampler(SamplingParams(seed=9)) for _ in range(2)]
    assert [same[0].sample(logits) for _ in range(50)] == [same[1].sample(logits) for _ in range(50)]
    other, again = Sampler(SamplingParams(seed=10)), Sampler(SamplingParams(seed=9))
    assert [other.sample(logits) for _ in range(50)] != [again.sample(logits) for _ in range(50)]


# ------------------------------------------------------------------------------------------------ text

PIECES = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"!", 6: "\u00e4".encode()[:1], 7: "\u00e4".encode()[1:]}


def test_text_stream_sends_text_as_it_comes():
    ts = TextStream(PIECES.get)
    assert [ts.push(t) for t in (1, 2, 3, 4, 5)] == ["Hel", "lo", " wor", "ld", "!"]
    assert ts.finish() == "" and ts.text == "Hello world!"


def test_text_stream_cuts_at_a_stop_string_across_tokens():
    ts = TextStream(PIECES.get, ["o w"])
    out = [ts.push(t) for t in (1, 2, 3)]
    assert "".join(out) == "Hell" and ts.stopped and ts.text == "Hell"
    assert ts.push(4) == "" and ts.finish() == "" and ts.text == "Hell"  # nothing after the stop
    ts = TextStream(PIECES.get, ["world", "xyz"])
    out = [ts.push(t) for t in (1, 2, 3)]
    assert out == ["Hel", "lo", " "]  # " wor" may become "world": held back
    assert ts.push(4) == "" and ts.stopped and ts.text == "Hello "
    ts = TextStream(PIECES.get, ["wox"])  # a held-back prefix that does not become the stop string is sent
    assert "".join(ts.push(t) for t in (1, 2, 3, 4)) + ts.finish() == "Hello world"


def test_text_stream_waits_for_a_whole_character():
    ts = TextStream(PIECES.get)
    assert ts.push(6) == ""  # half a character
    assert ts.push(7) == "\u00e4"
    assert ts.push(5) == "!"
    ts = TextStream(PIECES.get)
    ts.push(6)
    assert ts.finish() == "\ufffd"  # an incomplete character at the end
    ts = TextStream(PIECES.get, ["\u00e4!"])  # a stop string whose first character is still incomplete
    assert [ts.push(t) for t in (1, 6, 7, 5)] == ["Hel", "", "", ""] and ts.text == "Hel"


# ------------------------------------------------------------------------------------------------ batches

def _slot(seq: int, prompt: int = 1, served: int = 0, phase: Scope = Scope.PREFILL,
          profile: Profile | None = None) -> Slot:
    s = Slot(seq, Job(prompt=[7] * prompt, max_tokens=1, deliver=lambda e: None, profile=profile), served=served)
    s.feed, s.phase = [7] * (prompt if phase is Scope.PREFILL else 1), phase
    return s


def test_plan_batch_serves_every_reply_then_prompts_oldest_first_within_the_budget():
    replying = [_slot(0, phase=Scope.DECODE, served=9), _slot(1, phase=Scope.THINKING, served=9)]
    old, new = _slot(2, prompt=300, served=1), _slot(3, prompt=300, served=5)
    plan = [(s.seq_id, n) for s, n in plan_batch(replying + [new, old], budget=512)]
    assert plan == [(0, 1), (1, 1), (2, 300), (3, 210)]  # 2 + 300 + 210 = 512: the newer prompt is cut
    assert [(s.seq_id, n) for s, n in plan_batch([new, old], budget=100)] == [(2, 100)]
    # replies are never starved by prompts, even past the budget
    many = [_slot(i, phase=Scope.DECODE) for i in range(6)]
    assert [(s.seq_id, n) for s, n in plan_batch(many + [old], budget=4)] == [(i, 1) for i in range(6)]
    assert plan_batch([], budget=512) == []


def test_steering_keys_resolve_each_phase():
    decode_only = Profile((Entry(1, 2, Mode.DROP, scope=Scope.DECODE),))
    everywhere = Profile((Entry(1, 2, Mode.DROP),), name="another name, same steering")
    assert steering_key(decode_only, Scope.PREFILL) == () == steering_key(None, Scope.DECODE)
    assert steering_key(decode_only, Scope.DECODE) == steering_key(everywhere, Scope.PREFILL)  # scope resolved
    assert steering_key(decode_only, Scope.THINKING) == steering_key(everywhere, Scope.THINKING)  # thinking decodes
    thinking = Profile((Entry(1, 2, Mode.DROP, scope=Scope.THINKING),))
    assert steering_key(thinking, Scope.DECODE) == ()
    slot = _slot(0, profile=decode_only)
    assert slot.key == ()
    slot.phase = Scope.DECODE
    assert slot.key == ((Entry(1, 2, Mode.DROP),), 1.0)


# ------------------------------------------------------------------------------------------------ steering


@pytest.fixture(scope="module")
def layout(tiny_path):
    from mote_local.modelfile.layout import read_layout
    return read_layout(tiny_path("qwen3moe"))


def test_request_profile_composes_like_the_cli(layout):
    from mote_local.modelfile.fingerprint import Fingerprint

    fp = Fingerprint.of_layout(layout)
    named = {"p": Profile((Entry(1, 2, Mode.BIAS, -1.0),), 2.0, fp)}
    assert request_profile(None, layout, fp, named) is None
    p = request_profile(SteeringRequest(profile="p", entries=["bias 1:2=-1", "drop 0:3"], scope="decode"),
                        layout, fp, named)
    # the named profile's strength folds into its bias (-2), the text entries come at strength 1, scoped
    assert set(p.entries) == {Entry(1, 2, Mode.BIAS, -2.0), Entry(1, 2, Mode.BIAS, -1.0, Scope.DECODE),
                              Entry(0, 3, Mode.DROP, scope=Scope.DECODE)}
    assert p.strength == 1.0
    p = request_profile(SteeringRequest(entries=[{"layer": 0, "expert": 1, "mode": "gain", "value": 0.5}],
                                        strength=3), layout, fp, named)
    assert p.entries == (Entry(0, 1, Mode.GAIN, 0.5),) and p.strength == 3
    with pytest.raises(ProfileError, match=r"steering.entries\[1\]: --drop '1:x'"):
        request_profile(SteeringRequest(entries=["drop 1:1", "drop 1:x"]), layout, fp, named)


# ------------------------------------------------------------------------------------------------ settings

def test_settings_refuse_what_cannot_serve(tmp_path):
    m = tmp_path / "m.gguf"
    with pytest.raises(InputError, match="parallel"):
        Settings(model=m, parallel=0)
    with pytest.raises(InputError, match="positions per request"):
        Settings(model=m, n_ctx=64, parallel=8)
    with pytest.raises(InputError, match="profile name"):
        Settings(model=m, profiles={"bad name": m})
    with pytest.raises(InputError, match="API key"):
        Settings(model=m, api_key=" ")
    assert Settings(model=m, n_ctx=4096, parallel=4).slot_ctx == 1024
    assert Settings(model=m).model_id == "m"


def test_profile_option():
    assert parse_profile_option(["a=x.json", "dir/b.gguf"]) == {"a": Path("x.json"), "b": Path("dir/b.gguf")}
    with pytest.raises(InputError, match="given twice"):
        parse_profile_option(["a=x.json", "a=y.json"])
    with pytest.raises(InputError, match="NAME=FILE"):
        parse_profile_option(["a="])
