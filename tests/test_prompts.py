"""Prompt sets: expansion order, sampling, file formats, responses, and every error a user can make."""

import math
import string
from itertools import product
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mote_local.prompts import (
    Prompt,
    PromptSet,
    PromptSetError,
    combine,
    expand_template,
    load_prompt_set,
    select_classes,
)

EXAMPLE_TOML = """\
seed = 0
[classes.refusal]
templates = ["What happened{time}{place}?"]
prompts = ["Tell me about the protest."]
[classes.refusal.slots]
time = ["", " in 1989"]
place = [" in the square", " in the city"]
[classes.neutral]
templates = ["What happened {time} at the market?"]
[classes.neutral.slots]
time = ["yesterday", "last week"]
"""

EXAMPLE_YAML = """\
seed: 0
classes:
  refusal:
    templates: ["What happened{time}{place}?"]
    prompts: ["Tell me about the protest."]
    slots:
      time: ["", " in 1989"]
      place: [" in the square", " in the city"]
  neutral:
    templates: ["What happened {time} at the market?"]
    slots:
      time: [yesterday, last week]
"""


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def texts(prompts) -> list[str]:
    return [p.text for p in prompts]


def test_expansion_order_follows_first_appearance_first_slot_slowest():
    slots = {"a": ["1", "2"], "b": ["x", "y"], "unused": ["?"]}
    assert [t for t, _ in expand_template("{a}-{b}", slots)] == ["1-x", "1-y", "2-x", "2-y"]
    assert [t for t, _ in expand_template("{b}-{a}", slots)] == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_template("{b}{a}", slots)[1] == ("x2", (("b", "x"), ("a", "2")))


def test_repeated_slot_takes_one_value_and_plain_template_expands_once():
    assert expand_template("{a} and {a}", {"a": ["x", "y"]}) == [("x and x", (("a", "x"),)), ("y and y", (("a", "y"),))]
    assert expand_template("no slots", {}) == [("no slots", ())]


def test_escaped_braces():
    slots = {"a": ["1"]}
    assert expand_template("{{a}} {a}", slots) == [("{a} 1", (("a", "1"),))]
    assert expand_template("{{{a}}}", slots)[0][0] == "{1}"
    assert expand_template("}}{{", {})[0][0] == "}{"


def test_toml_example_expands_deterministically(tmp_path):
    ps = load_prompt_set(write(tmp_path, "set.toml", EXAMPLE_TOML))
    assert ps.names == ("refusal", "neutral")
    assert texts(ps.prompts("refusal")) == [
        "What happened in the square?",
        "What happened in the city?",
        "What happened in 1989 in the square?",
        "What happened in 1989 in the city?",
        "Tell me about the protest.",
    ]
    first = ps.prompts("refusal")[0]
    assert first == Prompt(
        "What happened in the square?",
        "refusal",
        None,
        "What happened{time}{place}?",
        (("time", ""), ("place", " in the square")),
    )
    assert ps.prompts("refusal")[-1] == Prompt("Tell me about the protest.", "refusal")
    assert texts(ps.prompts("neutral")) == [
        "What happened yesterday at the market?",
        "What happened last week at the market?",
    ]
    assert load_prompt_set(tmp_path / "set.toml") == ps


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_matches_toml(tmp_path, suffix):
    assert load_prompt_set(write(tmp_path, "set" + suffix, EXAMPLE_YAML)) == load_prompt_set(
        write(tmp_path, "set.toml", EXAMPLE_TOML)
    )


def test_plain_file(tmp_path):
    path = write(
        tmp_path,
        "refusal.txt",
        "\ufeff  first prompt  \n\n# a comment\n   # indented comment\r\nsecond\r\nthird without newline",
    )
    ps = load_prompt_set(path)
    assert ps.names == ("refusal",)
    assert ps.prompts("refusal") == (
        Prompt("first prompt", "refusal"),
        Prompt("second", "refusal"),
        Prompt("third without newline", "refusal"),
    )
    assert load_prompt_set(path, default_class="harmful").names == ("harmful",)


SAMPLED = """\
seed = SEED
sample_cap = CAP
[classes.a]
templates = ["a {x}{y}"]
[classes.a.slots]
x = ["0", "1", "2", "3"]
y = ["0", "1", "2"]
[classes.b]
templates = ["b {x}{y}"]
[classes.b.slots]
x = ["0", "1", "2", "3"]
y = ["0", "1", "2"]
[classes.small]
prompts = ["only one"]
"""


def sampled(tmp_path, seed, cap):
    text = SAMPLED.replace("SEED", str(seed)).replace("CAP", str(cap))
    return load_prompt_set(write(tmp_path, f"s{seed}_{cap}.toml", text))


def test_sample_cap_is_seeded_and_keeps_expansion_order(tmp_path):
    full = [f"a {x}{y}" for x, y in product("0123", "012")]
    ps = sampled(tmp_path, 1, 5)
    a = texts(ps.prompts("a"))
    assert len(a) == 5 and len(set(a)) == 5
    assert a == [t for t in full if t in a]  # a subsequence: file order kept
    assert texts(sampled(tmp_path, 1, 5).prompts("a")) == a
    assert any(texts(sampled(tmp_path, seed, 5).prompts("a")) != a for seed in range(2, 6))
    # paired classes keep the same positions; a class below the cap is whole
    assert [t.replace("b", "a", 1) for t in texts(ps.prompts("b"))] == a
    assert texts(ps.prompts("small")) == ["only one"]
    assert texts(sampled(tmp_path, 1, 100).prompts("a")) == full


def test_responses_per_expanded_prompt_or_per_source(tmp_path):
    base = '[classes.c]\ntemplates = ["t {x}"]\nprompts = ["p"]\n[classes.c.slots]\nx = ["1", "2"]\n'
    per_prompt = load_prompt_set(
        write(
            tmp_path,
            "a.toml",
            "seed = 0\n" + base.replace('prompts = ["p"]', 'prompts = ["p"]\nresponses = ["r1", "r2", "r3"]'),
        )
    )
    assert [(p.text, p.response) for p in per_prompt.prompts("c")] == [("t 1", "r1"), ("t 2", "r2"), ("p", "r3")]
    per_source = load_prompt_set(
        write(tmp_path, "b.toml", base.replace('prompts = ["p"]', 'prompts = ["p"]\nresponses = ["rt", "rp"]'))
    )
    assert [(p.text, p.response) for p in per_source.prompts("c")] == [("t 1", "rt"), ("t 2", "rt"), ("p", "rp")]
    with pytest.raises(
        PromptSetError,
        match=r"c\.toml: class 'c': 4 responses for 3 expanded prompts from 1 "
        r"templates and 1 prompts; give one response per expanded prompt",
    ):
        load_prompt_set(
            write(
                tmp_path, "c.toml", base.replace('prompts = ["p"]', 'prompts = ["p"]\nresponses = ["1", "2", "3", "4"]')
            )
        )


def test_responses_survive_sampling(tmp_path):
    text = (
        'seed = 3\nsample_cap = 2\n[classes.c]\ntemplates = ["t {x}"]\nresponses = ["r0", "r1", "r2", "r3"]\n'
        '[classes.c.slots]\nx = ["0", "1", "2", "3"]\n'
    )
    for p in load_prompt_set(write(tmp_path, "r.toml", text)).prompts("c"):
        assert p.response == "r" + p.text[-1]


def test_select_classes_defaults_and_names(tmp_path):
    ps = sampled(tmp_path, 0, 100)
    behavior, baseline = select_classes(ps)
    assert (behavior[0].cls, baseline[0].cls) == ("a", "b")
    assert select_classes(ps, behavior="b")[1][0].cls == "a"
    assert select_classes(ps, baseline="a")[0][0].cls == "b"
    assert select_classes(ps, "small", "b")[0] == (Prompt("only one", "small"),)
    with pytest.raises(PromptSetError, match="unknown class 'c'; the prompt set has 'a', 'b', 'small'"):
        select_classes(ps, behavior="c")
    with pytest.raises(PromptSetError, match="'a' is both behaviour and baseline"):
        select_classes(ps, "a", "a")
    one = load_prompt_set(write(tmp_path, "only.txt", "x\n"))
    with pytest.raises(PromptSetError, match="needs two classes .* only 'only'; add a baseline class"):
        select_classes(one)


def test_combine_plain_files(tmp_path):
    ps = combine(write(tmp_path, "refusal.txt", "r1\nr2\n"), write(tmp_path, "neutral.txt", "n1\n"))
    assert ps.names == ("refusal", "neutral")
    assert texts(select_classes(ps)[1]) == ["n1"]
    (tmp_path / "other").mkdir()
    with pytest.raises(PromptSetError, match="class 'refusal' is already given by an earlier file; rename one"):
        combine(tmp_path / "refusal.txt", write(tmp_path / "other", "refusal.txt", "again\n"))
    with pytest.raises(PromptSetError, match="at least one prompt file"):
        combine()


def test_prompt_set_direct_use():
    ps = PromptSet({"x": [Prompt("hi", "x")]})
    assert ps.classes["x"] == (Prompt("hi", "x"),)
    with pytest.raises(PromptSetError, match="unknown class 'y'; the prompt set has 'x'"):
        ps.prompts("y")
    with pytest.raises(PromptSetError, match="at least one class"):
        PromptSet({})
    with pytest.raises(PromptSetError, match="class 'x' has no prompts"):
        PromptSet({"x": ()})


def test_plain_file_is_streamed_with_a_cap(tmp_path):
    path = tmp_path / "big.txt"
    with path.open("w") as f:
        for i in range(300_000):
            f.write(f"prompt {i}\n")
    assert len(load_prompt_set(path, max_prompts=300_000).prompts("big")) == 300_000
    with pytest.raises(PromptSetError, match=r"big\.txt: more than 100000 prompts; split the file or raise max_"):
        load_prompt_set(path)


@pytest.mark.parametrize(
    "name, text, message",
    [
        # templates and slots
        (
            "set.toml",
            '[classes.c]\ntemplates = ["a {tiem}"]\n[classes.c.slots]\ntime = ["x"]\nplace = ["y"]\n',
            r"set\.toml: class 'c': template 'a \{tiem\}' uses slot 'tiem', which is not defined; defined slots: "
            r"'time', 'place'",
        ),
        (
            "set.toml",
            '[classes.c]\ntemplates = ["a {x}"]\n',
            r"uses slot 'x', which is not defined; defined slots: none",
        ),
        (
            "set.toml",
            '[classes.c]\ntemplates = ["a"]\n[classes.c.slots]\nx = []\n',
            r"set\.toml: class 'c': slot 'x' has no values; give at least one",
        ),
        (
            "set.toml",
            '[classes.c]\ntemplates = ["a {x}"]\n[classes.c.slots]\nx = [1989]\n',
            r"class 'c': slot 'x' value 1989 is a int, not a string; quote it",
        ),
        (
            "set.toml",
            '[classes.c]\ntemplates = ["a {x}"]\n[classes.c.slots]\nx = "one"\n',
            r"slot 'x' must be a list of strings, got str",
        ),
        ("set.toml", '[classes.c]\ntemplates = ["a {x"]\n', r"has an unmatched '\{' at column 3; write \{\{"),
        ("set.toml", '[classes.c]\ntemplates = ["a }"]\n', r"has an unmatched '\}' at column 3; write \}\}"),
        ("set.toml", '[classes.c]\ntemplates = ["a {} b"]\n', r"has '\{\}' at column 3, which is not a slot name"),
        ("set.toml", '[classes.c]\nslots = []\ntemplates = ["a"]\n', r"class 'c': slots must be a table"),
        # classes and values
        ("set.toml", "[classes.c]\n", r"set\.toml: class 'c': no prompts; add templates or prompts"),
        ("set.toml", "[classes.c]\nprompts = []\n", r"class 'c': no prompts"),
        ("set.toml", "seed = 1\n", r"set\.toml: no classes; add a \[classes\.<name>\] table"),
        ("set.toml", "", r"no classes"),
        ("set.yaml", "", r"set\.yaml: no classes"),
        ("set.yaml", "- a\n- b\n", r"the top level must be a table with a 'classes' table, got list"),
        ("set.toml", 'classes = ["a"]\n', r"'classes' must be a table of classes by name, got list"),
        ("set.yaml", "classes:\n  1: {prompts: [x]}\n", r"class name 1 must be a non-empty string"),
        ("set.toml", 'classes.c = "x"\n', r"class 'c': must be a table with templates and/or prompts, got str"),
        ("set.toml", '[classes.c]\nprompts = "one prompt"\n', r"prompts must be a list of strings, got str"),
        ("set.toml", '[classes.c]\nprompts = ["ok", 3]\n', r"class 'c': prompts\[1\] is a int \(3\), not a string"),
        ("set.toml", "[classes.c]\ntemplates = [true]\n", r"templates\[0\] is a bool \(True\), not a string"),
        ("set.toml", '[classes.c]\nprompts = ["ok", "  "]\n', r"prompts\[1\] is empty"),
        ("set.yaml", "classes:\n  c:\n    prompts: [yes]\n", r"prompts\[0\] is a bool \(True\), not a string; quote"),
        ("set.toml", 'seed = true\n[classes.c]\nprompts = ["x"]\n', r"seed must be an integer, got True"),
        ("set.toml", 'sample_cap = 0\n[classes.c]\nprompts = ["x"]\n', r"sample_cap must be an integer >= 1, got 0"),
        # unknown keys
        (
            "set.toml",
            'sample = 3\n[classes.c]\nprompts = ["x"]\n',
            r"set\.toml: unknown key 'sample'; allowed keys: classes, sample_cap, seed",
        ),
        (
            "set.toml",
            '[classes.c]\ntemplate = ["x"]\n',
            r"class 'c': unknown key 'template'; allowed keys: prompts, responses, slots, templates",
        ),
        # malformed files
        ("set.toml", '[classes.c]\nprompts = ["x"]\nbad line\n', r"set\.toml: not valid TOML: .*line 3, column 5\)"),
        ("set.yaml", "classes:\n  c: [x\n", r"set\.yaml: not valid YAML at line 3, column 1: .*; fix the syntax"),
        (
            "set.toml",
            b"\x89PNG\r\n\x1a\n\x00\x00",
            r"set\.toml: not UTF-8 text \(byte 0x89 at offset 0\); is it a binary",
        ),
        ("set.yaml", b"classes: \x00\x01", r"set\.yaml: contains a NUL byte; is it a binary file"),
        ("junk.txt", b"fine\n\xff\xfe junk\n", r"junk\.txt: line 2 is not UTF-8 text \(byte 0xff\); is it a binary"),
        ("junk.txt", b"fine\nnul\x00\n", r"junk\.txt: line 2 contains a NUL byte"),
        ("empty.txt", "\n# only a comment\n", r"empty\.txt: no prompts for class 'empty'; write one prompt per line"),
    ],
)
def test_errors_name_file_class_and_problem(tmp_path, name, text, message):
    with pytest.raises(PromptSetError, match=message):
        load_prompt_set(write(tmp_path, name, text))


def test_error_for_expansion_over_max_prompts(tmp_path):
    text = '[classes.c]\ntemplates = ["{a}{b}"]\n[classes.c.slots]\na = ["1", "2", "3"]\nb = ["1", "2"]\n'
    path = write(tmp_path, "big.toml", text)
    assert len(load_prompt_set(path, max_prompts=6).prompts("c")) == 6
    with pytest.raises(
        PromptSetError,
        match=r"big\.toml: class 'c': expands to 6 prompts, over the max_prompts "
        r"limit \(5 left\); set sample_cap",
    ):
        load_prompt_set(path, max_prompts=5)
    with pytest.raises(PromptSetError, match=r"expands to 6 prompts, more than max_prompts=5"):
        expand_template("{a}{b}", {"a": ["1", "2", "3"], "b": ["1", "2"]}, max_prompts=5)


def test_huge_expansion_is_sampled_without_materialising(tmp_path):
    slots = "\n".join(f"s{i} = [{', '.join(repr(str(v)) for v in range(10))}]" for i in range(12))
    template = "".join(f"{{s{i}}}" for i in range(12))
    text = f'sample_cap = 4\n[classes.c]\ntemplates = ["{template}"]\n[classes.c.slots]\n{slots}\n'
    prompts = load_prompt_set(write(tmp_path, "huge.toml", text)).prompts("c")  # 10**12 combinations
    assert len(prompts) == 4 and all(len(p.text) == 12 for p in prompts)
    assert texts(prompts) == sorted(texts(prompts))


def test_long_line_and_missing_file(tmp_path):
    with pytest.raises(PromptSetError, match=r"long\.txt: line 2 is longer than 1048576 bytes"):
        load_prompt_set(write(tmp_path, "long.txt", b"ok\n" + b"x" * (1 << 21)))
    with pytest.raises(PromptSetError, match=r"nope\.txt: cannot read the prompt file"):
        load_prompt_set(tmp_path / "nope.txt")
    with pytest.raises(PromptSetError, match=r"nope\.toml: cannot read the prompt file"):
        load_prompt_set(tmp_path / "nope.toml")


def test_expand_template_argument_errors():
    with pytest.raises(PromptSetError, match="template must be a string, got int"):
        expand_template(3, {})
    with pytest.raises(PromptSetError, match="slots must map slot names to lists of strings, got list"):
        expand_template("{a}", [("a", ["x"])])
    with pytest.raises(PromptSetError, match="slot 'a' must be a list of strings, got str"):
        expand_template("{a}", {"a": "xyz"})


NAMES = ["a", "b", "c"]
# literal text with its braces escaped
literal = st.text(alphabet=string.printable + "é€{}", max_size=6).map(lambda s: s.replace("{", "{{").replace("}", "}}"))


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.tuples(literal, st.sampled_from(NAMES)), max_size=4),
    tail=literal,
    slots=st.fixed_dictionaries({n: st.lists(st.text(max_size=3), min_size=1, max_size=3) for n in NAMES}),
)
def test_fuzz_expansion_matches_str_format(pieces, tail, slots):
    template = "".join(f"{lit}{{{name}}}" for lit, name in pieces) + tail
    used = list(dict.fromkeys(name for _, name in pieces))
    out = expand_template(template, slots)
    assert len(out) == math.prod(len(slots[n]) for n in used)
    combos = [dict(zip(used, values)) for values in product(*(slots[n] for n in used))]
    assert out == [(template.format(**c), tuple(c.items())) for c in combos]


junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=500, deadline=None)
@given(
    template=st.text(alphabet="{}ab_1 \\", max_size=12) | junk,
    slots=st.dictionaries(st.text(alphabet="ab_1{}", max_size=2), junk, max_size=3) | junk,
)
def test_fuzz_expand_template_raises_only_prompt_set_errors(template, slots):
    try:
        out = expand_template(template, slots)
    except PromptSetError:
        return
    names = [name for name, _ in out[0][1]]
    assert len(out) == math.prod(len(slots[n]) for n in names)
