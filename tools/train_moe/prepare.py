"""Corpus, held-out texts and prompt sets for the trained model, from Debian's parallel reference guide.

Reads /usr/share/debian-reference/debian-reference.{en,de,fr,es,it}.txt.gz (Debian packages
debian-reference-en/-de/-fr/-es/-it, version 2.100), cuts each language into its numbered sections
("9.4.3. Der Befehl ps"), which carry the same numbers in every translation, and splits the sections
deterministically: a section whose number hashes (sha256) to 0 mod 10 is held out from training in every
language. So the held-out German and English texts are translations of each other that the model never saw.

Writes into OUT (default: build/trained/data):
  train.txt                     training text, one paragraph per line, sections in a seeded shuffle
  heldout.<lang>.txt            held-out sections of one language (perplexity texts)
and into PROMPTS (default: mote_local/data/trained):
  prompts.toml                  class de and class en: the opening words of the same held-out paragraphs,
                                paired by position (prompt i of de is the translation of prompt i of en)
  prompts_target.toml           the target-span design: the same language-neutral prompt (a section number)
                                with the German or the English heading and opening words as the response
  heldout_de.txt, heldout_en.txt  the first held-out sections of each language (capability-cost texts)

    python3 tools/train_moe/prepare.py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
from pathlib import Path

LANGS = ("en", "de", "fr", "es", "it")
SOURCE = Path("/usr/share/debian-reference")
HEADING = re.compile(r"^(\d+(?:\.\d+)+)\.\s+(\S.*)$")
PROMPT_WORDS = 16  # words of a paragraph's opening that make a prompt
HELDOUT_CHARS = 6000  # characters of each shipped capability-cost text


def held_out(number: str) -> bool:
    return int(hashlib.sha256(number.encode()).hexdigest(), 16) % 10 == 0


def sections(lang: str) -> dict[str, tuple[str, list[str]]]:
    """Section number -> (heading, paragraphs), from the body (the last occurrence of each number: the
    tables of contents come first)."""
    lines = gzip.open(SOURCE / f"debian-reference.{lang}.txt.gz", "rt", encoding="utf-8").read().splitlines()
    heads = [(i, m.group(1), m.group(2).strip()) for i, line in enumerate(lines) for m in [HEADING.match(line)] if m]
    body_start = {}
    for i, number, title in heads:
        body_start[number] = (i, title)
    order = sorted(body_start.items(), key=lambda kv: kv[1][0])
    out = {}
    for k, (number, (start, title)) in enumerate(order):
        end = order[k + 1][1][0] if k + 1 < len(order) else len(lines)
        paragraphs, current = [], []
        for line in lines[start + 1 : end]:
            stripped = line.strip()
            if not stripped or stripped.startswith(("+", "|")):  # paragraph break, or a drawn table
                if current:
                    paragraphs.append(" ".join(current))
                current = []
                continue
            if re.match(
                r"^(Chapter|Kapitel|Chapitre|Capítulo|Capitolo|Appendix|Anhang|Annexe|Apéndice|"
                r"Appendice)\b",
                stripped,
            ) and not line.startswith(" "):
                continue
            current.append(stripped)
        if current:
            paragraphs.append(" ".join(current))
        out[number] = (title, paragraphs)
    return out


def prose(paragraph: str) -> bool:
    """A paragraph of running text: enough words, mostly alphabetic, ends like a sentence."""
    words = paragraph.split()
    alpha = sum(bool(re.fullmatch(r"[^\W\d_]+[,.;:]?", w)) for w in words)
    return len(words) >= 14 and alpha >= 0.8 * len(words) and paragraph.rstrip().endswith((".", ":"))


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a TOML basic string


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/trained/data"))
    ap.add_argument("--prompts", type=Path, default=Path("mote_local/data/trained"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-pairs", type=int, default=64)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.prompts.mkdir(parents=True, exist_ok=True)

    by_lang = {lang: sections(lang) for lang in LANGS}
    common = sorted(
        set.intersection(*(set(s) for s in by_lang.values())), key=lambda n: tuple(int(x) for x in n.split("."))
    )
    train_numbers = [n for n in common if not held_out(n)]
    test_numbers = [n for n in common if held_out(n)]

    # training text: every (language, section) a unit, shuffled with the seed; the heading opens the unit
    units = []
    for lang in LANGS:
        for n in train_numbers:
            title, paragraphs = by_lang[lang][n]
            units.append("\n".join([f"{n}. {title}", *paragraphs]))
    random.Random(args.seed).shuffle(units)
    (args.out / "train.txt").write_text("\n\n".join(units) + "\n", encoding="utf-8")
    for lang in LANGS:
        text = "\n\n".join("\n".join([f"{n}. {by_lang[lang][n][0]}", *by_lang[lang][n][1]]) for n in test_numbers)
        (args.out / f"heldout.{lang}.txt").write_text(text + "\n", encoding="utf-8")

    # paired prompts: held-out sections whose k-th paragraph is prose in both German and English
    pairs = []
    for n in test_numbers:
        de, en = by_lang["de"][n][1], by_lang["en"][n][1]
        for k in range(min(len(de), len(en))):
            ratio = len(de[k].split()) / max(1, len(en[k].split()))
            if prose(de[k]) and prose(en[k]) and 0.6 <= ratio <= 1.6:
                pairs.append(
                    (
                        n,
                        " ".join(de[k].split()[:PROMPT_WORDS]),
                        " ".join(en[k].split()[:PROMPT_WORDS]),
                        by_lang["de"][n][0],
                        by_lang["en"][n][0],
                    )
                )
    pairs = pairs[: args.max_pairs]
    header = (
        "# Prompts of the trained model (tools/train_moe/prepare.py writes this file; do not edit).\n"
        "# The opening words of held-out paragraphs of the Debian Reference (sections the model never saw),\n"
        "# German and English, paired by position: de prompt i is the translation of en prompt i.\n"
    )
    lines = [header, "[classes.de]", "prompts = ["]
    lines += [f"    {toml_str(p[1])}," for p in pairs] + ["]", "", "[classes.en]", "prompts = ["]
    lines += [f"    {toml_str(p[2])}," for p in pairs] + ["]"]
    (args.prompts / "prompts.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    header = (
        "# Target-span design (tools/train_moe/prepare.py writes this file; do not edit): the same\n"
        "# language-neutral prompt (a held-out section number) in both classes; the response is that\n"
        "# section's heading and opening words in German (class de) or English (class en).\n"
    )
    lines = [header]
    for lang, pos in (("de", (1, 3)), ("en", (2, 4))):
        lines += [f"[classes.{lang}]", "prompts = ["] + [f"    {toml_str(p[0] + '.')}," for p in pairs] + ["]"]
        lines += ["responses = ["] + [f"    {toml_str(' ' + p[pos[1]] + chr(10) + p[pos[0]])}," for p in pairs]
        lines += ["]", ""]
    (args.prompts / "prompts_target.toml").write_text("\n".join(lines), encoding="utf-8")

    for lang in ("de", "en"):
        text = (args.out / f"heldout.{lang}.txt").read_text(encoding="utf-8")
        cut = text[:HELDOUT_CHARS]
        cut = cut[: cut.rfind("\n") + 1] if "\n" in cut else cut
        (args.prompts / f"heldout_{lang}.txt").write_text(cut, encoding="utf-8")
    n_train = sum(len(u) for u in units)
    print(
        f"{len(common)} sections in all {len(LANGS)} languages: {len(train_numbers)} train, {len(test_numbers)} "
        f"held out; training text {n_train / 1e6:.2f} M characters; {len(pairs)} paired prompts"
    )


if __name__ == "__main__":
    main()
