"""Steering profiles: arithmetic, validation against tiny models, fingerprints, JSON/GGUF files, atomic writes."""

import errno
import json
import math
import os

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mote_local import atomic
from mote_local.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from mote_local.errors import NotMoeError, SteeringError
from mote_local.modelfile.fingerprint import Fingerprint
from mote_local.modelfile.layout import read_layout
from mote_local.steering.entries import Entry, Mode, Scope
from mote_local.steering.profile import Profile, ProfileError, ProfileMismatchError
from mote_local.steering.spec import parse_spec

INF = math.inf
SHA_A = "a" * 64
SHA_B = "b" * 64
FP = Fingerprint("qwen3moe", 4, 8, 2, SHA_A)


def E(layer, expert, mode, value=0.0, scope=Scope.ALL):
    return Entry(layer, expert, Mode(mode), value, Scope(scope))


def P(*entries, **kw):
    return Profile(tuple(entries), **kw)


@pytest.fixture(scope="module")
def models(tiny_path):
    return {arch: tiny_path(arch) for arch in ("qwen3moe", "olmoe", "deepseek2")}


# ------------------------------------------------------------------------------------------ atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    assert atomic_write_text(target, "one\n") == target  # creates the missing directory
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["f.txt"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_atomic_write_keeps_target_permissions(tmp_path):
    target = tmp_path / "f"
    target.write_text("old")
    target.chmod(0o600)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o600


def test_atomic_path_failure_midway_leaves_target_untouched(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"original")
    with pytest.raises(RuntimeError, match="writer crashed"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target and tmp.suffix == ".bin"
            tmp.write_bytes(b"half a fi")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"original"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_disk_full_names_path(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"original")

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError, match="disk full") as info:
        atomic_write_bytes(target, b"new content")
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
    assert target.read_bytes() == b"original"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_profile_save_failing_midway_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "p.gguf"
    old = P(E(1, 2, "mask"), name="old")
    old.save(path)
    before = path.read_bytes()

    def crash(self, *a, **k):
        self.fout[0].write(b"partial tensor data")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        P(E(3, 4, "force"), name="new").save(path)
    assert path.read_bytes() == before and Profile.load(path) == old
    assert os.listdir(tmp_path) == ["p.gguf"]


# ------------------------------------------------------------------------------------------ construction


def test_entries_are_sorted_and_identical_selections_merge():
    p = P(E(3, 1, "mask"), E(1, 5, "bias", 2.0), E(1, 0, "force"), E(3, 1, "mask"))
    assert p.entries == (E(1, 0, "force"), E(1, 5, "bias", 2.0), E(3, 1, "mask"))
    assert Profile([e for e in p.entries]) == p  # any iterable, same normal form


@pytest.mark.parametrize(
    "entries, message",
    [
        ((E(2, 7, "mask"), E(2, 7, "force")), "contradictory entries for layer 2 expert 7"),
        ((E(2, 7, "mask"), E(2, 7, "drop")), "layer 2 expert 7"),
        ((E(2, 7, "force"), E(2, 7, "bias", 1.0)), "bias (all) cannot be combined with force (all)"),
        ((E(2, 7, "mask"), E(2, 7, "bias", -1.0)), "layer 2 expert 7"),
        ((E(2, 7, "drop"), E(2, 7, "bias", 2.0)), "bias (all) cannot be combined with drop (all)"),
        ((E(2, 7, "force"), E(2, 7, "gain", 2.0)), "force (all) cannot be combined with gain (all)"),
        ((E(2, 7, "mask"), E(2, 7, "gain", 2.0)), "layer 2 expert 7"),
        ((E(2, 7, "mask"), E(2, 7, "force", scope="decode")), "force (decode) cannot be combined with mask (all)"),
        ((E(2, 7, "bias", 1.0), E(2, 7, "bias", 2.0)), "two bias entries for layer 2 expert 7"),
        (
            (E(2, 7, "gain", 1.0, "decode"), E(2, 7, "gain", 1.0, "decode")),
            "two gain entries for layer 2 expert 7 (decode)",
        ),
    ],
)
def test_contradictions_are_refused(entries, message):
    with pytest.raises(ProfileError) as info:
        P(*entries)
    assert message in str(info.value)


def test_allowed_combinations():
    # the steering contract (README, Python API: modes combine): on one expert only bias + gain and drop + gain combine
    P(
        E(1, 1, "drop"),
        E(1, 1, "gain", 0.0),
        E(1, 2, "force"),
        E(1, 3, "bias", 1.0),
        E(1, 3, "gain", 0.5),
        E(1, 4, "mask", scope="prefill"),
        E(1, 4, "force", scope="decode"),
        E(1, 5, "bias", 1.0),
        E(1, 5, "bias", 2.0, "decode"),
    )


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"strength": math.nan}, "strength must be a finite number"),
        ({"strength": True}, "strength must be a finite number"),
        ({"strength": -1.0, "entries": (E(1, 1, "bias", -INF),)}, "cannot be scaled by a negative strength"),
        ({"metadata": {"x": math.nan}}, "metadata must be JSON-serialisable"),
        ({"metadata": {"x": object()}}, "metadata must be JSON-serialisable"),
        ({"metadata": [1]}, "metadata must be a dict"),
        ({"entries": ((1, 2, "mask"),)}, "expected a steering Entry"),
        ({"entries": (E(-1, 2, "mask"),)}, "layer must be in 0.."),
        ({"fingerprint": "qwen3moe"}, "fingerprint must be a Fingerprint"),
        ({"name": "\ud800"}, "name is not valid Unicode"),
    ],
)
def test_bad_profile_fields(kw, message):
    with pytest.raises(ProfileError, match=message):
        Profile(**kw)


def test_metadata_is_a_private_copy():
    meta = {"method": "risk_difference", "top": [1, 2]}
    p = P(metadata=meta)
    meta["top"].append(3)
    assert p.metadata == {"method": "risk_difference", "top": [1, 2]}
    assert hash(p) == hash(P(metadata={"other": 1}))  # hashable despite the dict


def test_errors_are_steering_errors():
    assert issubclass(ProfileMismatchError, ProfileError) and issubclass(ProfileError, SteeringError)


# ------------------------------------------------------------------------------------------ arithmetic


def test_compose_is_union_with_sums_and_products():
    a = P(E(1, 1, "mask"), E(1, 2, "bias", 1.5), E(1, 3, "gain", 0.5), E(2, 0, "force"), name="a")
    b = P(E(1, 1, "mask"), E(1, 2, "bias", -0.5), E(1, 3, "gain", 4.0), E(3, 3, "drop"), name="b")
    c = a + b
    assert c.entries == (E(1, 1, "mask"), E(1, 2, "bias", 1.0), E(1, 3, "gain", 2.0), E(2, 0, "force"), E(3, 3, "drop"))
    assert c.strength == 1.0 and c.name == "a + b"


def test_compose_folds_strengths_into_biases():
    a = P(E(1, 2, "bias", 1.5), E(1, 3, "gain", 0.5), E(1, 4, "bias", -INF), strength=2.0)
    b = P(E(1, 2, "bias", -1.0), strength=0.25)
    c = a + b
    assert c.strength == 1.0
    assert c.entries == (E(1, 2, "bias", 1.5 * 2.0 + -1.0 * 0.25), E(1, 3, "gain", 0.5), E(1, 4, "bias", -INF))
    # at strength 0 every bias is ignored by the engine, -inf included: folding keeps that
    assert (P(E(1, 4, "bias", -INF), strength=0.0) + P()).entries == (E(1, 4, "bias", 0.0),)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.floats(-1e3, 1e3)), max_size=6, unique_by=lambda t: t[:2]
    ),
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.floats(-1e3, 1e3)), max_size=6, unique_by=lambda t: t[:2]
    ),
    st.floats(-10, 10),
    st.floats(-10, 10),
)
def test_compose_is_exact(xs, ys, sa, sb):
    a = P(*(E(l, x, "bias", v) for l, x, v in xs), strength=sa)
    b = P(*(E(l, x, "bias", v) for l, x, v in ys), strength=sb)
    want: dict = {}
    for p in (a, b):
        for e in p.entries:
            v = e.value * p.strength
            want[e.layer, e.expert] = want[e.layer, e.expert] + v if (e.layer, e.expert) in want else v
    got = {(e.layer, e.expert): e.value * (a + b).strength for e in (a + b).entries}
    assert got == want


def test_compose_contradiction_names_entry():
    with pytest.raises(
        ProfileError, match="cannot compose profile 'a' and profile 'b': contradictory entries for layer 4 expert 2"
    ):
        P(E(4, 2, "mask"), name="a") + P(E(4, 2, "force"), name="b")


def test_compose_fingerprints():
    other = Fingerprint("olmoe", 4, 16, 2, SHA_B)
    assert (P(fingerprint=FP) + P()).fingerprint == FP
    assert (P() + P(fingerprint=FP)).fingerprint == FP
    with pytest.raises(ProfileMismatchError, match="different models") as info:
        P(fingerprint=FP) + P(fingerprint=other)
    assert "arch qwen3moe" in str(info.value) and "16 experts" in str(info.value)
    assert "layers" not in str(info.value)


def test_compose_metadata_and_descriptions():
    a, b = P(metadata={"m": 1}, description="x"), P(metadata={"m": 2}, description="y")
    assert (a + b).metadata == {"composed_of": [{"m": 1}, {"m": 2}]}
    assert (a + P()).metadata == {"m": 1} and (a + a).metadata == {"m": 1}
    assert (a + b).description == "x\ny"


def test_scaling():
    p = P(E(1, 1, "bias", 2.0), strength=1.5)
    assert (p * 2).strength == 3.0 and (2 * p).strength == 3.0 and (p * 2).entries == p.entries
    assert (p * -1).strength == -1.5
    with pytest.raises(TypeError):
        p * "2"
    with pytest.raises(ProfileError, match="negative strength"):
        P(E(1, 1, "bias", -INF)) * -1


def test_inversion():
    p = P(
        E(1, 1, "mask"),
        E(1, 2, "drop"),
        E(1, 3, "force"),
        E(1, 4, "bias", -2.0, "decode"),
        E(1, 5, "gain", 4.0),
        E(1, 6, "bias", -INF),
        strength=0.5,
        name="x",
    )
    q = -p
    assert q == p.inverted()
    assert q.entries == (
        E(1, 1, "force"),
        E(1, 2, "force"),
        E(1, 3, "mask"),
        E(1, 4, "bias", 2.0, "decode"),
        E(1, 5, "gain", 0.25),
        E(1, 6, "force"),
    )
    assert q.strength == 0.5 and q.name == "x"
    r = P(E(1, 1, "mask"), E(1, 3, "force"), E(1, 4, "bias", -2.0), E(1, 5, "gain", 4.0))
    assert -(-r) == r  # noqa: B002  (negated twice, on purpose)


def test_inversion_refusals():
    with pytest.raises(ProfileError, match=r"cannot invert a zero gain \(layer 2 expert 3\)"):
        -P(E(2, 3, "gain", 0.0))
    with pytest.raises(ProfileError, match="cannot invert the profile: contradictory entries for layer 2 expert 3"):
        -P(E(2, 3, "drop"), E(2, 3, "gain", 2.0))  # would be force + gain


def test_subtraction():
    assert P(E(1, 1, "bias", 1.0)) - P(E(1, 1, "bias", 0.25), E(1, 2, "mask")) == P(
        E(1, 1, "bias", 0.75), E(1, 2, "force")
    )


def test_for_scope():
    p = P(
        E(1, 1, "mask"),
        E(1, 2, "bias", 1.0),
        E(1, 2, "bias", 0.5, "decode"),
        E(1, 3, "force", scope="prefill"),
        E(1, 4, "gain", 2.0, "thinking"),
        E(1, 4, "gain", 3.0),
    )
    assert p.for_scope("decode") == (E(1, 1, "mask"), E(1, 2, "bias", 1.5, "decode"), E(1, 4, "gain", 3.0))
    assert p.for_scope(Scope.PREFILL) == (
        E(1, 1, "mask"),
        E(1, 2, "bias", 1.0),
        E(1, 3, "force", scope="prefill"),
        E(1, 4, "gain", 3.0),
    )
    assert p.for_scope("thinking")[-1] == E(1, 4, "gain", 6.0, "thinking")
    assert p.for_scope("all") == (E(1, 1, "mask"), E(1, 2, "bias", 1.0), E(1, 4, "gain", 3.0))


# ------------------------------------------------------------------------------------------ fingerprints


def test_fingerprint_of_models(models, tiny_path):
    qwen, olmoe = Fingerprint.of(models["qwen3moe"]), Fingerprint.of(models["olmoe"])
    assert qwen == Fingerprint.of(models["qwen3moe"])
    assert (qwen.arch, qwen.n_layer, qwen.n_expert, qwen.n_expert_used) == ("qwen3moe", 4, 8, 2)
    assert qwen.router_sha256 != olmoe.router_sha256
    assert qwen.mismatch(qwen) is None
    msg = qwen.mismatch(olmoe)
    assert msg.startswith("the profile was made for a model with arch qwen3moe")
    assert "this model has arch olmoe" in msg and "router weights sha256" in msg
    assert "8 experts" not in msg and "layers" not in msg  # only what differs
    reseeded = Fingerprint.of(tiny_path("qwen3moe", seed=77))
    assert qwen.mismatch(reseeded) == (
        f"the profile was made for a model with router weights sha256 "
        f"{qwen.router_sha256[:12]}…; this model has router weights sha256 "
        f"{reseeded.router_sha256[:12]}…"
    )


def test_fingerprint_of_dense_model_is_refused(tiny_path):
    with pytest.raises(NotMoeError, match="dense model"):
        Fingerprint.of(tiny_path("dense"))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"arch": ""}, "arch must be a non-empty string"),
        ({"n_expert": -1}, "n_expert must be an integer >= 0"),
        ({"n_layer": True}, "n_layer must be an integer"),
        ({"router_sha256": "ABC"}, "router_sha256 must be 64 lowercase hex digits"),
    ],
)
def test_bad_fingerprint(kw, message):
    fields = {"arch": "x", "n_layer": 1, "n_expert": 2, "n_expert_used": 1, "router_sha256": SHA_A} | kw
    with pytest.raises(ProfileError, match=message):
        Fingerprint(**fields)


def test_entries_and_profiles_read_as_the_steering_syntax():
    entries = [
        E(1, 6, "drop"),
        E(2, 0, "bias", -5),
        E(2, 1, "bias", -INF),
        E(3, 1, "force", scope="decode"),
        E(0, 3, "mask"),
        E(1, 2, "gain", 0.5),
    ]
    assert [str(e) for e in entries] == [
        "drop 1:6",
        "bias 2:0=-5",
        "bias 2:1=-inf",
        "force 3:1@decode",
        "mask 0:3",
        "gain 1:2=0.5",
    ]
    for e in entries:  # the text after the mode is what the flags parse back
        kind = {"mask": "off"}.get(e.mode.value, e.mode.value)
        assert parse_spec(kind, str(e).split(" ", 1)[1].split("@")[0], e.scope) == [e]
    assert P(*entries[:2], strength=2.0).describe() == "drop 1:6, bias 2:0=-5 (strength 2)"
    assert P().describe() == "none"


def test_from_entries_fills_fingerprint(models):
    p = Profile.from_entries([E(1, 2, "mask")], models["qwen3moe"], name="n", strength=2.0)
    assert p.fingerprint == Fingerprint.of(models["qwen3moe"]) and p.name == "n" and p.strength == 2.0
    assert Profile.from_entries(iter([E(1, 2, "mask")])).fingerprint is None
    with pytest.raises(ProfileError, match="not both"):
        Profile.from_entries([], models["qwen3moe"], fingerprint=FP)


# ------------------------------------------------------------------------------------------ validation


def test_validate_accepts_a_fitting_profile(models):
    layout = read_layout(models["qwen3moe"])
    p = Profile.from_entries(
        [E(0, 1, "mask"), E(3, 7, "force"), E(3, 6, "force"), E(2, 0, "bias", -INF), E(1, 1, "gain", 0.0)],
        models["qwen3moe"],
    )
    assert p.validate(layout) is p


def test_validate_refuses_another_model(models):
    p = Profile.from_entries([E(1, 1, "mask")], models["olmoe"], name="olmoe-refusal")
    layout = read_layout(models["qwen3moe"])
    with pytest.raises(ProfileMismatchError) as info:
        p.validate(layout)
    msg = str(info.value)
    assert "profile 'olmoe-refusal' does not fit" in msg and layout.path.name in msg
    assert "arch olmoe" in msg and "arch qwen3moe" in msg and "pass force=True to apply it anyway" in msg
    with pytest.raises(ProfileMismatchError, match="or set steering.force to true to apply it anyway"):
        p.validate(layout, way_out="set steering.force to true")
    assert p.validate(layout, force=True) is p


@pytest.mark.parametrize(
    "arch, entries, message",
    [
        ("deepseek2", [E(0, 1, "mask")], "layer 0 is not an MoE layer of tiny-deepseek2"),
        ("qwen3moe", [E(4, 1, "mask")], "its MoE layers are 0..3"),
        ("qwen3moe", [E(1, 8, "mask")], "expert 8 is out of range"),
        ("qwen3moe", [E(1, e, "force") for e in range(3)], "layer 1 forces 3 experts but"),
        (
            "qwen3moe",
            [E(1, 0, "force"), E(1, 1, "force", scope="decode"), E(1, 2, "force", scope="decode")],
            "layer 1 forces 3 experts during decode but tiny-qwen3moe",
        ),
        ("qwen3moe", [E(2, e, "mask") for e in range(7)], "layer 2 masks 7 of 8 experts, leaving fewer than the 2"),
        ("qwen3moe", [E(2, e, "mask") for e in range(6)] + [E(2, 6, "bias", -INF)], "layer 2 masks 7 of 8"),
        (
            "deepseek2",
            [E(1, 0, "force"), E(1, 4, "force"), E(1, 8, "force")],
            "layer 1 forces experts in 3 expert groups but tiny-deepseek2",
        ),
    ],
)
def test_validate_refusals(models, arch, entries, message):
    layout = read_layout(models[arch])
    with pytest.raises(ProfileError) as info:
        P(*entries).validate(layout)
    assert message in str(info.value)
    assert not isinstance(info.value, ProfileMismatchError)


def test_validate_phases_are_separate(models):
    layout = read_layout(models["qwen3moe"])
    P(
        E(1, 0, "force", scope="prefill"),
        E(1, 1, "force", scope="prefill"),
        E(1, 2, "force", scope="decode"),
        E(1, 3, "force", scope="decode"),
    ).validate(layout)
    # a -inf bias at strength 0 masks nothing
    P(*(E(2, e, "bias", -INF) for e in range(7)), strength=0.0).validate(layout)
    layout_ds = read_layout(models["deepseek2"])
    P(E(1, 0, "force"), E(1, 4, "force")).validate(layout_ds)


def test_an_expert_selected_in_two_scopes_counts_once_against_the_limits(models):
    # k = 2 of 8: six masked experts and two forced ones are the limits, whichever scopes name them
    layout = read_layout(models["qwen3moe"])
    P(*(E(2, e, "mask") for e in range(6)), E(2, 0, "mask", scope="prefill"), E(2, 1, "mask", scope="decode")).validate(
        layout
    )
    P(E(1, 0, "force"), E(1, 1, "force"), E(1, 1, "force", scope="thinking")).validate(layout)
    with pytest.raises(ProfileError, match="layer 2 masks 7 of 8 experts during prefill"):
        P(*(E(2, e, "mask") for e in range(6)), E(2, 6, "mask", scope="prefill")).validate(layout)


def test_validate_dense_layout(tiny_path):
    with pytest.raises(NotMoeError):
        P().validate(read_layout(tiny_path("dense")))


# ------------------------------------------------------------------------------------------ JSON

EXAMPLE = P(
    E(3, 17, "mask"),
    E(3, 2, "bias", -2.5, "decode"),
    E(4, 9, "bias", -INF),
    E(4, 1, "gain", 0.1),
    E(5, 5, "force", scope="thinking"),
    E(6, 0, "drop", scope="prefill"),
    strength=0.7,
    fingerprint=FP,
    name="refusal",
    description="top 6 by risk difference",
    metadata={"method": "risk_difference", "scores": [0.1, 2.5e-7], "nested": {"ok": True, "n": None}},
)


def test_json_round_trip_and_layout():
    text = EXAMPLE.to_json()
    assert Profile.from_json(text) == EXAMPLE
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert list(doc) == ["format", "version", "name", "description", "strength", "fingerprint", "entries", "metadata"]
    assert doc["format"] == "mote-profile" and doc["version"] == 1
    assert doc["fingerprint"]["router_sha256"] == SHA_A
    assert {"layer": 4, "expert": 9, "mode": "bias", "value": "-inf"} in doc["entries"]
    assert {"layer": 3, "expert": 17, "mode": "mask"} in doc["entries"]  # no value, no default scope
    assert text.count("\n") < 30  # one line per entry: editable by hand


def test_json_minimal_document():
    p = Profile.from_json(
        '{"format": "mote-profile", "version": 1, "entries": [{"layer": 1, "expert": 2, "mode": "gain", "value": 2}]}'
    )
    assert p == P(E(1, 2, "gain", 2.0))
    assert Profile.from_json(P().to_json()) == P()


def _doc(**changes):
    doc = json.loads(EXAMPLE.to_json())
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if value is _DELETE:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return json.dumps(doc)


_DELETE = object()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not valid JSON: Expecting property name"),
        ("[]", "top level: expected an object, got an array"),
        (_doc(format="other"), "format: expected 'mote-profile', got 'other'"),
        (_doc(format=_DELETE), "format: missing (required)"),
        (_doc(version=2), "version: this mote-local reads version 1 profiles, got version 2"),
        (_doc(version="1"), "version: expected an integer, got a string '1'"),
        (_doc(strenght=1.0), "strenght: unknown key; allowed keys are description, entries"),
        (_doc(strength="high"), "strength: expected a number, got a string 'high'"),
        (_doc(name=3), "name: expected a string, got an integer 3"),
        (_doc(entries={}), "entries: expected an array, got an object"),
        (_doc(entries__1=[3, 17]), "entries[1]: expected an object, got an array"),
        (_doc(entries__3__mode="off"), "entries[3].mode: unknown mode 'off'; expected one of mask, drop"),
        (_doc(entries__3__mode=_DELETE), "entries[3].mode: missing (required)"),
        (_doc(entries__3__scope="always"), "entries[3].scope: unknown scope 'always'; expected one of all"),
        (_doc(entries__2__layer=3.0), "entries[2].layer: expected an integer, got a number 3.0"),
        (_doc(entries__2__expert=True), "entries[2].expert: expected an integer, got a boolean True"),
        (_doc(entries__2__valu=1), "entries[2].valu: unknown key; allowed keys are expert, layer, mode, scope, value"),
        (_doc(entries__0__value="inf"), 'entries[0].value: expected a number or the string "-inf", got a string'),
        (_doc(entries__0__value=_DELETE), "entries[0].value: missing (a bias entry needs a value)"),
        (_doc(entries__1__value=1.0), "entries[1]: mask takes no value"),
        (_doc(entries__2__value=-1.0), "entries[2]: gain for layer 4 expert 1 must be a finite number >= 0"),
        (_doc(fingerprint__n_expert="8"), "fingerprint.n_expert: expected an integer, got a string '8'"),
        (_doc(fingerprint__arch=_DELETE), "fingerprint.arch: missing (required)"),
        (_doc(fingerprint__router_sha256="xyz"), "fingerprint.router_sha256 must be 64 lowercase hex digits"),
        (_doc(fingerprint__extra=1), "fingerprint.extra: unknown key"),
        (_doc(metadata=[]), "metadata: expected an object, got an array"),
        (_doc(entries__1__layer=-1), "layer must be in 0.."),
        (_doc(entries__0__mode="mask"), "entries[0]: mask takes no value"),
    ],
)
def test_json_schema_errors(text, message):
    with pytest.raises(ProfileError) as info:
        Profile.from_json(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "literal, path",
    [
        ('"strength": NaN', "strength: NaN is not valid JSON"),
        ('"strength": Infinity', "strength: Infinity is not valid JSON"),
        (
            '"entries": [{"layer": 1, "expert": 1, "mode": "bias", "value": -Infinity}]',
            "entries[0].value: -Infinity is not valid JSON; numbers must be finite "
            "(a -inf bias is written as the string",
        ),
        ('"metadata": {"a": [1, NaN]}', "metadata.a[1]: NaN is not valid JSON"),
    ],
)
def test_json_non_finite_literals(literal, path):
    text = '{"format": "mote-profile", "version": 1, "entries": [], ' + literal + "}"
    text = text.replace('"entries": [], "entries"', '"entries"')
    with pytest.raises(ProfileError) as info:
        Profile.from_json(text)
    assert path in str(info.value)


# ------------------------------------------------------------------------------------------ GGUF


def test_gguf_round_trip_and_layout(tmp_path):
    path = EXAMPLE.to_gguf(tmp_path / "p.gguf")
    assert Profile.from_gguf(path) == EXAMPLE
    reader = gguf.GGUFReader(path)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "moteprofile"
    assert field("moteprofile.model_hint") == "qwen3moe"
    assert field("moteprofile.fingerprint.router_sha256") == SHA_A
    assert field("moteprofile.fingerprint.n_expert") == 8
    assert field("moteprofile.strength") == 0.7
    assert field("general.name") == "refusal"
    assert json.loads(field("moteprofile.metadata")) == EXAMPLE.metadata
    assert field("moteprofile.mode_names") == ["mask", "drop", "force", "bias", "gain"]
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"{c}.{layer}" for c in ("expert", "mode", "scope", "value") for layer in (3, 4, 5, 6)}
    assert tensors["value.4"].tensor_type == gguf.GGMLQuantizationType.F64
    np.testing.assert_array_equal(tensors["expert.3"].data, [2, 17])
    np.testing.assert_array_equal(tensors["value.4"].data, [0.1, -INF])
    np.testing.assert_array_equal(tensors["mode.4"].data, [4, 3])  # gain, bias: the engine's codes


def test_gguf_without_fingerprint_or_entries(tmp_path):
    p = P(strength=2.0)
    assert Profile.from_gguf(p.to_gguf(tmp_path / "e.gguf")) == p
    assert "moteprofile.model_hint" not in gguf.GGUFReader(tmp_path / "e.gguf").fields


def test_gguf_model_is_not_a_profile(models):
    with pytest.raises(ProfileError, match="a GGUF file of arch 'qwen3moe', not a mote profile") as info:
        Profile.from_gguf(models["qwen3moe"])
    assert str(models["qwen3moe"]) in str(info.value)


@pytest.mark.parametrize("suffix", [".json", ".gguf"])
def test_save_load_by_suffix(tmp_path, suffix):
    path = tmp_path / f"p{suffix.upper()}"
    assert EXAMPLE.save(path) == path
    assert Profile.load(path) == EXAMPLE
    assert path.read_bytes().startswith(b"GGUF" if suffix == ".gguf" else b"{")
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("suffix", [".json", ".gguf"])
def test_load_bad_files_names_the_file(tmp_path, suffix):
    missing = tmp_path / f"missing{suffix}"
    with pytest.raises(ProfileError, match=f"profile file not found: {missing}"):
        Profile.load(missing)
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(ProfileError, match=f"{empty} is empty"):
        Profile.load(empty)
    good = tmp_path / f"good{suffix}"
    EXAMPLE.save(good)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ProfileError) as info:
        Profile.load(cut)
    assert str(cut) in str(info.value)
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"\xff\xfe\x00junk" * 10)
    with pytest.raises(ProfileError) as info:
        Profile.load(garbage)
    assert str(garbage) in str(info.value)


def test_load_schema_error_names_file_and_path(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(_doc(entries__3__mode="off"))
    with pytest.raises(ProfileError, match=f"^{path}: entries\\[3\\].mode: unknown mode"):
        Profile.load(path)


def test_unknown_suffix(tmp_path):
    with pytest.raises(ProfileError, match=r"cannot tell the profile format of 'p.txt': name it \*.json"):
        EXAMPLE.save(tmp_path / "p.txt")
    with pytest.raises(ProfileError, match="cannot tell the profile format"):
        Profile.load(tmp_path / "p")


# ------------------------------------------------------------------------------------------ property: round trips

_COMBOS = [("mask",), ("drop",), ("force",), ("bias",), ("gain",), ("drop", "gain"), ("bias", "gain")]
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def profiles(draw):
    keys = draw(st.lists(st.tuples(st.integers(0, 95), st.integers(0, 255)), unique=True, max_size=16))
    entries = []
    for layer, expert in keys:
        scope = draw(st.sampled_from(list(Scope)))
        for mode in draw(st.sampled_from(_COMBOS)):
            value = 0.0
            if mode == "bias":
                value = draw(st.floats(-(2.0**100), 2.0**100, width=32) | st.just(-INF))
            elif mode == "gain":
                value = draw(st.floats(min_value=0, max_value=2.0**100, width=32))
            entries.append(E(layer, expert, mode, value, scope))
    strength = draw(st.floats(-1e6, 1e6))
    if any(e.value == -INF for e in entries):
        strength = abs(strength)
    fingerprint = draw(
        st.none()
        | st.builds(
            Fingerprint,
            arch=st.sampled_from(["qwen3moe", "olmoe", "deepseek2"]),
            n_layer=st.integers(0, 200),
            n_expert=st.integers(0, 512),
            n_expert_used=st.integers(0, 64),
            router_sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
        )
    )
    return Profile(
        tuple(draw(st.permutations(entries))),
        strength,
        fingerprint,
        draw(_text),
        draw(_text),
        draw(st.dictionaries(_text, _json, max_size=4)),
    )


@settings(max_examples=150, deadline=None)
@given(profiles())
def test_json_round_trip_property(p):
    assert Profile.from_json(p.to_json()) == p


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=profiles())
def test_gguf_round_trip_property(tmp_path, p):
    assert Profile.load(p.save(tmp_path / "p.gguf")) == p


# ------------------------------------------------------------------------------------------ CLI specs


@pytest.mark.parametrize(
    "kind, text, entries",
    [
        ("off", "3:17,4:2", [E(3, 17, "mask"), E(4, 2, "mask")]),
        ("off", " 3 : 17 ", [E(3, 17, "mask")]),
        ("drop", "3:17", [E(3, 17, "drop")]),
        ("force", "0:0,1:1", [E(0, 0, "force"), E(1, 1, "force")]),
        ("bias", "3:17=-2.5", [E(3, 17, "bias", -2.5)]),
        ("bias", "3:17=-inf,2:1=1e-3", [E(3, 17, "bias", -INF), E(2, 1, "bias", 0.001)]),
        ("gain", "3:17=0.5", [E(3, 17, "gain", 0.5)]),
    ],
)
def test_parse_spec(kind, text, entries):
    assert parse_spec(kind, text) == entries


def test_parse_spec_scope():
    assert parse_spec("off", "1:2", scope="decode") == [E(1, 2, "mask", scope="decode")]
    with pytest.raises(ProfileError, match="unknown scope 'later'; expected one of all, prefill"):
        parse_spec("off", "1:2", scope="later")


@pytest.mark.parametrize(
    "kind, text, message",
    [
        ("mute", "3:17", "unknown steering flag --mute; expected one of --off, --drop"),
        ("off", "", "--off '': empty; expected LAYER:EXPERT[,LAYER:EXPERT...]"),
        ("off", "3:17,", "empty item (a stray comma?)"),
        ("off", "317", "--off '317': missing ':' between layer and expert"),
        ("off", "3:x", "expert 'x' is not a non-negative integer"),
        ("off", "-1:2", "layer '-1' is not a non-negative integer"),
        ("off", "3:17=1", "--off '3:17=1': --off takes no value; expected LAYER:EXPERT"),
        (
            "bias",
            "3:17",
            "--bias '3:17': a value is required; expected LAYER:EXPERT=VALUE[,LAYER:EXPERT=VALUE...] "
            "(LAYER:EXPERT[=VALUE]), e.g. --bias 3:17=-2.5",
        ),
        ("bias", "3:17=abc", "'abc' is not a number"),
        ("bias", "3:17=nan", "bias for layer 3 expert 17 must be finite or -inf"),
        ("gain", "3:17=-1", "gain for layer 3 expert 17 must be a finite number >= 0"),
    ],
)
def test_parse_spec_errors(kind, text, message):
    with pytest.raises(ProfileError) as info:
        parse_spec(kind, text)
    assert message in str(info.value)
