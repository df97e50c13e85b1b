"""Convert the trained Hugging Face folder to a Q8_0 GGUF with the pinned llama.cpp's own converter.

Takes convert_hf_to_gguf.py, its conversion package and gguf-py from the pinned llama-cpp-python sdist (the
build's cache, or $MOTE_LLAMA_SDIST; see tools/upstream.py), extracted into a scratch folder (never
committed), and runs it with one change: the converter recognises BPE pre-tokenizers by hashing what known
tokenizers make of a test string, and a vocabulary trained here is not on its list. train.py uses GPT-2's
byte-level split regex, which is llama.cpp's "gpt-2" pre-tokenizer, so that name is given instead of the hash
lookup. The result is checked afterwards by tokenizing held-out text with llama.cpp and with the tokenizers
library (they must agree).

    python3 tools/train_moe/convert.py --hf build/trained/hf --out mote_local/data/trained/trained-q8_0.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, default=ROOT / "build/trained/hf")
    ap.add_argument("--out", type=Path, default=ROOT / "mote_local/data/trained/trained-q8_0.gguf")
    ap.add_argument("--outtype", default="q8_0")
    ap.add_argument("--scratch", type=Path, default=ROOT / "build/trained/converter")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tools"))
    import upstream

    root = upstream.extract(
        upstream.fetch(),
        args.scratch,
        ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion", "vendor/llama.cpp/gguf-py"),
    )
    llama_dir = root / "vendor" / "llama.cpp"
    sys.path.insert(0, str(llama_dir / "gguf-py"))
    sys.path.insert(0, str(llama_dir))
    import conversion.base as base
    import convert_hf_to_gguf

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sys.argv = [
        "convert_hf_to_gguf.py",
        str(args.hf),
        "--outfile",
        str(args.out),
        "--outtype",
        args.outtype,
        "--model-name",
        "mote-trained-debian-reference",
    ]
    convert_hf_to_gguf.main()
    check_tokenizer(args.hf, args.out)


def check_tokenizer(hf: Path, gguf_path: Path) -> None:
    """llama.cpp must split text into the same tokens as the tokenizer the model was trained with."""
    from tokenizers import Tokenizer

    from mote_local.engine.model import Model

    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    texts = [p.read_text(encoding="utf-8")[:4000] for p in sorted((ROOT / "build/trained/data").glob("heldout.*.txt"))]
    with Model(gguf_path) as m:
        for text in texts:
            mine = tok.encode(text).ids
            theirs = m.tokenize(text, add_bos=False)
            if mine != theirs:
                raise SystemExit(
                    f"llama.cpp tokenizes differently from the trained tokenizer: {len(mine)} vs "
                    f"{len(theirs)} tokens on {text[:40]!r}"
                )
    print(f"tokenizer check: llama.cpp and tokenizers agree on {len(texts)} held-out texts")


if __name__ == "__main__":
    main()
