"""GGUF files for tests written again with gguf-py: split the two ways big models ship, or retyped.

* ``"gguf-py"``: gguf-py's own sharding (``GGUFWriter(split_max_tensors=N)``, what ``convert_hf_to_gguf.py
  --split-max-tensors`` does): the first shard holds every metadata key and the first N tensors.
* ``"no-tensor-first-split"``: the layout of llama.cpp's ``gguf-split --split --split-max-tensors N
  --no-tensor-first-split`` (tools/gguf-split/gguf-split.cpp, split_strategy): the first shard holds every
  metadata key and no tensor, each later one N tensors. gguf-py writes it with ``small_first_shard``.

In both, every shard carries ``split.no`` (u16), ``split.count`` (u16) and ``split.tensors.count`` (i32), later
shards nothing else, and the shards are named ``NAME-%05d-of-%05d.gguf``.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np

STYLES = ("gguf-py", "no-tensor-first-split")
_SKIPPED = ("GGUF.", gguf.Keys.General.ARCHITECTURE, "split.")


def split_gguf(src: Path, dest: Path, n_shards: int, style: str = "gguf-py") -> list[Path]:
    """Writes ``src`` as ``n_shards`` shards ``dest/STEM-0000i-of-0000n.gguf`` (STEM: src's); their paths, the
    first first. Tensors are spread evenly over the shards that hold tensors, in their order in src."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    reader = gguf.GGUFReader(src)
    holding = n_shards - 1 if style == "no-tensor-first-split" else n_shards
    dest.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(
        dest / src.name,
        _arch(reader),
        split_max_tensors=-(-len(reader.tensors) // holding),
        small_first_shard=style == "no-tensor-first-split",
    )
    _copy(reader, writer)
    shards = [dest / f"{src.stem}-{i:05d}-of-{n_shards:05d}.gguf" for i in range(1, n_shards + 1)]
    assert all(p.is_file() for p in shards), f"gguf-py wrote other shard names than {shards}"
    return shards


def retyped_gguf(src: Path, dst: Path, types: dict[str, gguf.GGMLQuantizationType]) -> Path:
    r"""A copy of the F32 model ``src`` whose tensors matching a pattern of ``types`` (searched, first match) are
    quantized to its type with gguf-py (e.g. {r"_exps\.weight$": MXFP4}: gpt-oss's release layout)."""

    def retype(t):
        qtype = next((q for pattern, q in types.items() if re.search(pattern, t.name)), None)
        return (t.data, t.tensor_type) if qtype is None else (gguf.quants.quantize(np.array(t.data), qtype), qtype)

    reader = gguf.GGUFReader(src)
    _copy(reader, gguf.GGUFWriter(dst, _arch(reader)), retype)
    return dst


def _arch(reader: gguf.GGUFReader) -> str:
    return reader.fields[gguf.Keys.General.ARCHITECTURE].contents()


def _copy(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, retype=None) -> None:
    """Every metadata key but the writer's own and every tensor of ``reader`` into ``writer``, written out."""
    for name, field in reader.fields.items():
        if name.startswith(_SKIPPED):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    for t in reader.tensors:
        data, qtype = retype(t) if retype else (t.data, t.tensor_type)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
