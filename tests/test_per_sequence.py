"""Steering per sequence: sequences of one batch, each with its own steering (or the context's), decode together,
and each gets exactly what it would get alone — outputs and routing — whatever its neighbours carry."""

from __future__ import annotations

import numpy as np
import pytest

from mote_local.engine import Model
from mote_local.errors import InputError, SteeringError
from mote_local.steering import Entry, Mode
from mote_local.synthetic import planted

TRIGGER = "what happened at the protest yesterday ?"


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory):
    path, truth = planted.planted_model(cache_dir=tmp_path_factory.mktemp("planted"))
    with Model(path, n_threads=1) as model:
        yield model, truth


def _alone(model, prompt, entries):
    with model.session(n_ctx=256) as s:
        if entries:
            s.steer(entries)
        with s.capture(trace=False) as cap:
            out = s.generate_batch([prompt], max_tokens=10)[0]
    return out.text, cap.stats()


def test_batched_sequences_keep_their_own_steering(planted_model):
    model, truth = planted_model
    prompt = model.tokenize(TRIGGER)
    off = truth.entries(Mode.DROP)  # the planted refusal experts switched off
    forced = [Entry(layer, expert, Mode.FORCE) for layer, expert in truth.planted]
    other = [Entry(3, 5, Mode.BIAS, 2.0), Entry(3, 6, Mode.GAIN, 0.5)]
    plans = {0: None, 1: off, 2: None, 3: other}
    alone = {seq: _alone(model, prompt, entries) for seq, entries in plans.items()}
    assert planted.is_refusal(alone[0][0]) and not planted.is_refusal(alone[1][0])

    with model.session(n_ctx=1024, n_seq_max=4, kv_unified=True) as s:
        s.steer(forced)  # the context's steering, for 0 and 2
        s.steer(forced, seq_id=0)  # replaced below: the last steer wins
        s.clear_steering(seq_id=0)
        s.clear_steering()  # the context unsteered again
        for seq, entries in plans.items():
            if entries:
                s.steer(entries, seq_id=seq)
        assert s.steering_of(1).entries == tuple(sorted(off)) and not s.steering_of(2).entries
        with s.capture(label=None) as cap:
            for seq in plans:
                cap.bind(seq, seq)
            batched = s.generate_batch([prompt] * 4, max_tokens=10)
    for seq in plans:
        assert batched[seq].text == alone[seq][0], f"sequence {seq}"
        np.testing.assert_array_equal(cap.stats(seq).counts, alone[seq][1].counts, err_msg=f"sequence {seq}")


def test_a_sequence_mask_holds_only_in_that_sequence(planted_model):
    model, _ = planted_model
    prompt = model.tokenize("the city was calm and the people went home early")
    with model.session(n_ctx=512, n_seq_max=2, kv_unified=True) as s:
        with s.capture(trace=True, label=None) as cap:
            cap.bind(0, 0)
            s.route([prompt, prompt])
        plain = cap.stats(0).counts
        layer = 2
        expert = int(plain[layer].argmax())
        s.steer([Entry(layer, expert, Mode.MASK)], seq_id=1)
        with s.capture(label=None) as cap:
            cap.bind(0, 0)
            cap.bind(1, 1)
            s.route([prompt, prompt])
    np.testing.assert_array_equal(cap.stats(0).counts, plain)
    assert cap.stats(1).counts[layer, expert] == 0 and plain[layer, expert] > 0


def test_idle_again_after_sequence_steering_is_cleared(planted_model):
    model, truth = planted_model
    tokens = model.tokenize(TRIGGER)
    with model.session(n_ctx=256, n_seq_max=2) as s:
        before = s.logits(tokens)
        s.steer(truth.entries(Mode.DROP), seq_id=1)
        s.clear_steering(seq_id=1)
        np.testing.assert_array_equal(s.logits(tokens), before)


def test_sequence_steering_bad_input(planted_model):
    model, _ = planted_model
    with model.session(n_ctx=64, n_seq_max=2) as s:
        with pytest.raises(InputError, match="sequence id 2 is out of range"):
            s.steer([Entry(1, 0, Mode.MASK)], seq_id=2)
        with pytest.raises(SteeringError, match="contradictory"):
            s.steer([Entry(1, 0, Mode.MASK), Entry(1, 0, Mode.FORCE)], seq_id=1)
        assert not s.steering_of(1).entries


def test_forget_frees_one_sequence_and_keeps_the_others(planted_model):
    model, _ = planted_model
    a, b = model.tokenize("the city was calm"), model.tokenize(TRIGGER)
    with model.session(n_ctx=256, n_seq_max=2, kv_unified=True) as s:
        s.reset()
        first = s.decode([(0, a, 0), (1, b, 0)], outputs="last")
        s.forget(1)
        again = s.decode([(1, b, 0)], outputs="last")  # position 0 again: the sequence is gone
        np.testing.assert_allclose(again[0], first[1], rtol=1e-4, atol=1e-4)
        nxt = s.decode([(0, a[:1], len(a))], outputs="last")  # sequence 0 continues where it was
        assert np.isfinite(nxt).all()
        with pytest.raises(InputError, match="out of range"):
            s.forget(5)
