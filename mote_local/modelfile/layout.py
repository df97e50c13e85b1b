"""The MoE layout of a GGUF file, read with the `gguf` package (no engine needed).

Reading the file's metadata first lets every entry point reject a bad file with a clear message
before llama.cpp sees it. Two kinds of file must never reach llama.cpp:

* files its GGUF parser rejects: it only logs why, so the user would see "failed to load". The
  header, the metadata and tensor tables and every tensor's data range are checked here first, so
  a truncated or corrupt file gets a message that says where it is broken;
* files its parser accepts but whose hyperparameters trip a GGML_ASSERT/GGML_ABORT (for example
  more experts used per token than experts, or an unknown expert gating function): those abort the
  whole Python process. :func:`read_layout` checks the same limits that llama.cpp asserts.

A split model (``NAME-00001-of-0000N.gguf`` …) is read whole from its first shard's path, as llama.cpp loads it
(:func:`read_model_header`), so its layout and router bytes are those of the same model in one file.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import gguf
import numpy as np

from mote_local.errors import ModelFileError, NotMoeError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # the versions llama.cpp and gguf-py read
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp refuses tensor names of this length or longer
LLAMA_MAX_LAYERS = 512  # llama-hparams.h: block_count must be 1..LLAMA_MAX_LAYERS
LLAMA_MAX_EXPERTS = 1024

# llama.cpp's llama_expert_gating_func_type runs 0 (the architecture's default) to 4 (sqrt-softplus); any other
# value reaches a GGML_ABORT in build_moe_ffn. What the graph does with it is the engine's to say (Model.routers).
GATING_FUNC_MAX = 4
# architectures that llama.cpp treats as dense when they declare at most one expert
_DENSE_IF_ONE_EXPERT = ("hunyuan-dense", "hunyuan_vl")

_FIX_TRUNCATED = "the file is incomplete (download or copy it again)"
_FIX_CORRUPT = "the file is corrupt (download or convert it again)"


@dataclass(frozen=True)
class MoeLayout:
    path: Path
    arch: str
    n_layer: int
    moe_layers: tuple[int, ...]
    n_expert: int
    n_expert_used: int
    n_shared_experts: int
    n_expert_groups: int
    n_group_used: int
    file_type: str
    size_bytes: int  # of every file of the model
    context_length: int  # the training context (0 when the file does not say)
    files: tuple[ModelFile, ...] = ()  # the model's files: one, or the shards of a split model, first first
    # (index in files, offset in that file, bytes) of each MoE layer's router tensor
    router_spans: tuple[tuple[int, int, int], ...] = ()
    tensor_types: tuple[tuple[str, str], ...] = ()  # (name, ggml type name) of every tensor, in file order

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and bool(self.moe_layers)

    def require_moe(self) -> MoeLayout:
        if not self.is_moe:
            raise NotMoeError(
                f"{self.path} is a dense model ({self.arch}, no experts): mote-local needs a Mixture-of-Experts GGUF"
            )
        return self


def check_model_file(path: str | os.PathLike) -> Path:
    """The path as a Path, or a ModelFileError saying why it cannot be a model file."""
    p = Path(path)
    try:
        exists, is_dir, is_file = p.exists(), p.is_dir(), p.is_file()
    except OSError as err:  # e.g. a name too long for the file system
        raise ModelFileError(f"cannot access {p}: {err.strerror or err}") from None
    if not exists:
        raise ModelFileError(f"model file not found: {p}")
    if is_dir:
        raise ModelFileError(f"{p} is a directory: give the path of a .gguf file")
    if not is_file:
        raise ModelFileError(f"{p} is not a regular file (a device, pipe or socket): give the path of a .gguf file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except PermissionError:
        raise ModelFileError(
            f"cannot read {p}: permission denied; make the file readable (chmod +r) or run as a user who may read it"
        ) from None
    except OSError as err:
        raise ModelFileError(f"cannot read {p}: {err.strerror or err}") from None
    if p.stat().st_size == 0:
        raise ModelFileError(f"{p} is empty: not a GGUF model")
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{p} is not a GGUF file (it does not start with 'GGUF')")
    return p


# ---------------------------------------------------------------------------------------------- structure


class _Broken(Exception):
    """What is wrong with a GGUF file, in words (without the file name)."""


# struct format of each scalar GGUF value type
_VT = gguf.GGUFValueType
_SCALAR_FORMAT = {
    _VT.UINT8: "B",
    _VT.INT8: "b",
    _VT.UINT16: "H",
    _VT.INT16: "h",
    _VT.UINT32: "I",
    _VT.INT32: "i",
    _VT.FLOAT32: "f",
    _VT.BOOL: "?",
    _VT.UINT64: "Q",
    _VT.INT64: "q",
    _VT.FLOAT64: "d",
}
_STRING, _ARRAY, _UINT32 = _VT.STRING, _VT.ARRAY, _VT.UINT32


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _check_header(data: bytes, size: int) -> None:
    """Magic, version and the two counts of a GGUF header (the first 24 bytes)."""
    if data[:4] != GGUF_MAGIC:
        raise _Broken("is not a GGUF file (it does not start with 'GGUF')")
    if size < 24:
        raise _Broken(f"is truncated inside the GGUF header ({size} bytes; a header alone takes 24): " + _FIX_TRUNCATED)
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in GGUF_VERSIONS:
        if struct.unpack_from(">I", data, 4)[0] in GGUF_VERSIONS:
            raise _Broken(
                "is a big-endian GGUF file: llama.cpp reads little-endian GGUF files only; convert it "
                "again on a little-endian machine"
            )
        raise _Broken(
            f"has a corrupt header: GGUF version {version} (llama.cpp reads versions "
            f"{' and '.join(map(str, GGUF_VERSIONS))}); {_FIX_CORRUPT}"
        )
    # every metadata entry takes at least 13 bytes, every tensor entry at least 24
    if n_kv * 13 + n_tensors * 24 > size - 24:
        raise _Broken(
            f"is truncated or has a corrupt header: the header claims {n_kv} metadata keys and "
            f"{n_tensors} tensors, more than a file of {size} bytes can hold (download or copy it again)"
        )


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes; running off the end is truncation."""

    def __init__(self, buf, size: int, pos: int, where: str):
        self.buf, self.size, self.pos, self.where = buf, size, pos, where

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Broken(f"is truncated inside the {self.where}: it ends at byte {self.size}; {_FIX_TRUNCATED}")
        self.pos = start + n
        return start

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def raw_string(self, what: str) -> bytes:
        n = self.unpack("<Q")
        if n > self.size:
            raise _Broken(f"has a corrupt {self.where}: {what} claims a length of {n} bytes; {_FIX_CORRUPT}")
        start = self.take(n)
        return bytes(self.buf[start : start + n])

    def string(self, what: str) -> str:
        try:
            return self.raw_string(what).decode("utf-8")
        except UnicodeDecodeError:
            raise _Broken(f"has a corrupt {self.where}: {what} is not UTF-8 text; {_FIX_CORRUPT}") from None


def _tensor_layout(tensors: list[tuple[str, int, int]], data_start: int, alignment: int, size: int) -> None:
    """(name, offset in the data section, n_bytes) in file order: back to back, aligned, inside the file.

    llama.cpp requires each tensor's offset to be where the previous one ends (padded to the alignment)
    and maps every tensor's bytes from the file; anything else is a corrupt table or a truncated file.
    """
    expected, previous = 0, None
    for name, offset, n_bytes in tensors:
        if offset != expected:
            culprit = f"tensor {previous!r} has a wrong shape or type, or " if previous else ""
            raise _Broken(
                f"has a corrupt tensor table: tensor {name!r} starts at offset {offset} of the data but "
                f"the tensors before it end at {expected} ({culprit}{name!r} a wrong offset); " + _FIX_CORRUPT
            )
        expected, previous = offset + _pad(n_bytes, alignment), name
    total = expected - _pad(tensors[-1][2], alignment) + tensors[-1][2]
    for name, offset, n_bytes in tensors:
        end = data_start + offset + n_bytes
        if end > size:
            present = max(0, size - data_start) / max(total, 1)
            raise _Broken(
                f"is truncated inside the tensor data: tensor {name!r} needs bytes {data_start + offset}"
                f"..{end} but the file ends at byte {size} (only {int(100 * present)}% of the tensor "
                f"data is there); {_FIX_TRUNCATED}"
            )


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: the row length first
    type: gguf.GGMLQuantizationType
    offset: int  # in the file
    n_bytes: int
    file: int = 0  # which of the model's files holds it (GgufHeader.files), for a split model


@dataclass(frozen=True)
class ModelFile:
    """One file of a model: the whole model, or one shard of a split one."""

    path: Path
    size_bytes: int
    data_offset: int  # where its tensor data starts: everything above is its header


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file says before its tensor data, read in one bounds-checked pass.

    ``values`` holds every single value and every array of up to ``SMALL_ARRAY`` numbers (per-layer
    hyperparameters) as Python values; longer arrays (a vocabulary, its scores and merges) are stepped over
    unless asked for by key, then they are in ``arrays``: strings as raw bytes (a token need not be UTF-8),
    numbers as a numpy array.
    """

    values: dict[str, object]
    arrays: dict[str, tuple[bytes, ...] | np.ndarray]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    files: tuple[ModelFile, ...] = ()  # the file read; of a split model read whole, every shard

    def tensor(self, name: str) -> TensorInfo | None:
        return self._by_name.get(name)

    @functools.cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


SMALL_ARRAY = 4096
_U64 = struct.Struct("<Q")


def _string_array(cur: _Cursor, count: int, keep: bool) -> tuple[bytes, ...] | None:
    """Steps over `count` strings (the hot loop of a 150k-token vocabulary); their bytes when `keep`."""
    buf, size, pos = cur.buf, cur.size, cur.pos
    unpack, kept = _U64.unpack_from, []
    for _ in range(count):
        start = pos + 8
        if start > size:
            break
        end = start + unpack(buf, pos)[0]
        if end > size:
            break
        if keep:
            kept.append(buf[start:end])
        pos = end
    else:
        cur.pos = pos
        return tuple(kept) if keep else None
    cur.pos = pos
    cur.raw_string("a string value")  # the broken entry, read again for the message
    raise AssertionError("unreachable: the entry above is broken")


def _read_header(p: Path, arrays: tuple[str, ...] = ()) -> GgufHeader:
    """Walks the whole GGUF header with bounds checks and checks the tensor table against the file;
    raises _Broken saying where it is broken."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        _check_header(f.read(24), size)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _walk(buf, size, arrays)
    return replace(header, files=(ModelFile(p, size, header.data_offset),))


def _walk(buf, size: int, wanted: tuple[str, ...]) -> GgufHeader:
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    cur = _Cursor(buf, size, 24, "metadata")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    values: dict[str, object] = {}
    arrays: dict[str, tuple[bytes, ...] | np.ndarray] = {}
    for i in range(n_kv):
        cur.where = f"metadata (key #{i + 1} of {n_kv})"
        key = cur.string("a key name")
        cur.where = f"metadata (key #{i + 1} of {n_kv}, {key!r})"
        if not key or key in values or key in arrays:
            raise _Broken(f"has a corrupt {cur.where}: {'an empty' if not key else 'a duplicate'} key; " + _FIX_CORRUPT)
        vtype = cur.unpack("<I")
        if vtype == _ARRAY:
            vtype, count = cur.unpack("<I"), cur.unpack("<Q")
            if count > size:
                raise _Broken(f"has a corrupt {cur.where}: an array of {count} values; {_FIX_CORRUPT}")
            if vtype == _STRING:
                strings = _string_array(cur, count, key in wanted)
                if strings is not None:
                    arrays[key] = strings
            elif vtype in _SCALAR_FORMAT:
                fmt = _SCALAR_FORMAT[vtype]
                start = cur.take(struct.calcsize(fmt) * count)
                if key in wanted:
                    arrays[key] = np.frombuffer(buf[start : cur.pos], dtype=np.dtype("<" + fmt))
                elif count <= SMALL_ARRAY:
                    values[key] = list(struct.unpack_from(f"<{count}{fmt}", buf, start))
            else:
                raise _Broken(f"has a corrupt {cur.where}: unknown array type {vtype}; {_FIX_CORRUPT}")
        elif vtype == _STRING:
            try:
                values[key] = cur.raw_string("a string value").decode("utf-8")
            except UnicodeDecodeError:
                raise _Broken(f"has a corrupt metadata value: {key} is not UTF-8 text; {_FIX_CORRUPT}") from None
        elif vtype in _SCALAR_FORMAT:
            value = values[key] = cur.unpack("<" + _SCALAR_FORMAT[vtype])
            if key == gguf.Keys.General.ALIGNMENT:
                if vtype != _UINT32:
                    raise _Broken(f"has a corrupt {cur.where}: the alignment must be one uint32; {_FIX_CORRUPT}")
                if value == 0 or value & (value - 1):
                    raise _Broken(
                        f"has a corrupt {cur.where}: alignment {value} is not a power of two; " + _FIX_CORRUPT
                    )
                alignment = value
        else:
            raise _Broken(f"has a corrupt {cur.where}: unknown value type {vtype}; {_FIX_CORRUPT}")
    if values.get(gguf.Keys.General.ALIGNMENT, alignment) != alignment:  # an alignment array
        raise _Broken(
            f"has a corrupt metadata key {gguf.Keys.General.ALIGNMENT!r}: the alignment must be one "
            f"uint32; {_FIX_CORRUPT}"
        )
    tensors = _tensor_table(cur, n_tensors)
    data_offset = _pad(cur.pos, alignment)
    if tensors:
        _tensor_layout(
            [(name, offset, n_bytes) for name, _, _, offset, n_bytes in tensors], data_offset, alignment, size
        )
    return GgufHeader(
        values,
        arrays,
        tuple(
            TensorInfo(name, shape, qtype, data_offset + offset, n_bytes)
            for name, shape, qtype, offset, n_bytes in tensors
        ),
        data_offset,
    )


def _tensor_table(
    cur: _Cursor, n_tensors: int
) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, int, int]]:
    """(name, shape, type, offset in the data section, n_bytes) of every tensor, each entry checked alone."""
    tensors = []
    names = set()
    for i in range(n_tensors):
        cur.where = f"tensor table (tensor #{i + 1} of {n_tensors})"
        name = cur.string("a tensor name")
        cur.where = f"tensor table (tensor #{i + 1} of {n_tensors}, {name!r})"
        if len(name.encode()) >= GGML_MAX_NAME or name in names:
            raise _Broken(
                f"has a corrupt {cur.where}: {'a duplicate' if name in names else 'too long a'} name; {_FIX_CORRUPT}"
            )
        names.add(name)
        n_dims = cur.unpack("<I")
        if n_dims > GGML_MAX_DIMS:
            raise _Broken(f"has a corrupt {cur.where}: {n_dims} dimensions (at most {GGML_MAX_DIMS}); " + _FIX_CORRUPT)
        dims = tuple(cur.unpack("<q") for _ in range(n_dims))
        ttype = cur.unpack("<I")
        offset = cur.unpack("<Q")
        try:
            qtype = gguf.GGMLQuantizationType(ttype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Broken(f"has a corrupt {cur.where}: unknown tensor type {ttype}; {_FIX_CORRUPT}") from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        if any(d < 0 for d in dims) or n_elements >= 2**63 or (dims and dims[0] % block):
            raise _Broken(
                f"has a corrupt {cur.where}: shape {list(dims)} does not fit type {qtype.name}; " + _FIX_CORRUPT
            )
        tensors.append((name, dims, qtype, offset, n_elements // block * type_size))
    return tensors


def read_header(
    path: str | os.PathLike, arrays: tuple[str, ...] = (), error: type[Exception] = ModelFileError
) -> GgufHeader:
    """The header of a GGUF file (see GgufHeader); a corrupt or truncated file raises `error` saying where it
    is broken. Fast on any vocabulary: a 150k-token one is stepped over, not decoded, unless asked for."""
    p = Path(path)
    try:
        return _read_header(p, arrays)
    except _Broken as err:
        raise error(f"{p} {err}") from None


# ---------------------------------------------------------------------------------------------- split models

# A split model (llama.cpp's gguf-split, gguf-py's GGUFWriter(split_max_tensors=N)): every shard says which it is
# and how many there are; the first holds all the metadata and the tensor count, the others only these keys.
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = (
    gguf.Keys.Split.LLM_KV_SPLIT_NO,
    gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
    gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT,
)
_SHARD_SUFFIX = "-{:05d}-of-{:05d}.gguf"  # llama.cpp's llama_split_path: PREFIX-%05d-of-%05d.gguf, from 1
_FIX_SHARDS = "download the shards of this model again, all into one folder"


def shard_path(given: Path, given_no: int, no: int, count: int) -> Path | None:
    """The path of shard ``no`` (from 0) of ``count``, beside shard ``given_no`` at ``given``, as llama.cpp
    derives it (llama_split_prefix, llama_split_path); None when ``given``'s name is not that shard's name."""
    suffix = _SHARD_SUFFIX.format(given_no + 1, count)
    if not given.name.endswith(suffix) or given.name == suffix:
        return None
    return given.with_name(given.name[: -len(suffix)] + _SHARD_SUFFIX.format(no + 1, count))


def _split_value(p: Path, header: GgufHeader, key: str, default: int | None = None) -> int:
    value = header.values.get(key, default)
    if value is None:
        raise ModelFileError(f"{p} is a shard of a split model without a {key} key; {_FIX_SHARDS}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelFileError(f"{p}: metadata key {key} holds {value!r}, not a shard number; {_FIX_CORRUPT}")
    return value


def read_model_header(path: str | os.PathLike, arrays: tuple[str, ...] = ()) -> GgufHeader:
    """The header of a model read as llama.cpp loads it: one file, or every shard of a split model from its first
    shard's path (the first shard's metadata, every shard's tensors in order, each shard in ``files``).

    A shard given in place of the first, a missing, truncated or corrupt shard, or one of another model or split
    raises ModelFileError naming the shard and the fix, before llama.cpp would refuse or misread it."""
    p = Path(path)
    first = read_header(p, arrays)
    count = _split_value(p, first, SPLIT_COUNT, 0)
    if count <= 1:
        return first
    no = _split_value(p, first, SPLIT_NO)
    if no != 0:
        given = shard_path(p, no, 0, count)
        which = f"{given}" if given is not None else f"the file whose name ends in {_SHARD_SUFFIX.format(1, count)}"
        raise ModelFileError(
            f"{p} is shard {no + 1} of {count} of a split model: give its first shard, {which} "
            "(llama.cpp loads every shard from the first one's path)"
        )
    if shard_path(p, 0, 0, count) is None:
        raise ModelFileError(
            f"{p} is the first of {count} shards of a split model, but its name does not end in "
            f"{_SHARD_SUFFIX.format(1, count)}, which llama.cpp needs to find the other shards: "
            f"give the shards their names back (NAME{_SHARD_SUFFIX.format(1, count)} … "
            f"NAME{_SHARD_SUFFIX.format(count, count)})"
        )
    n_tensors = _split_value(p, first, SPLIT_TENSORS)
    files, tensors = list(first.files), list(first.tensors)
    holder: dict[str, Path] = {t.name: p for t in first.tensors}
    for i in range(1, count):
        sp = cast(Path, shard_path(p, 0, i, count))  # the first shard's name was checked above
        if not (sp.exists() or sp.is_symlink()):
            raise ModelFileError(
                f"{sp} is missing: it is shard {i + 1} of {count} of the split model {p}; download "
                "it into the folder of the first shard"
            )
        try:
            shard = read_header(check_model_file(sp))
        except ModelFileError as err:
            raise ModelFileError(f"shard {i + 1} of {count} of {p}: {err}") from None
        says = (shard.values.get(SPLIT_NO), shard.values.get(SPLIT_COUNT), shard.values.get(SPLIT_TENSORS))
        if says != (i, count, n_tensors):
            what = (
                "is not a shard of a split model (no split keys)"
                if says == (None, None, None)
                else f"says it is shard {_shard_words(says[0])} of {says[1]}, of a model of {says[2]} tensors"
            )
            raise ModelFileError(
                f"{sp} is not shard {i + 1} of {count} of {p} (a model of {n_tensors} tensors): it "
                f"{what}; it belongs to another model or another split: {_FIX_SHARDS}"
            )
        for t in shard.tensors:
            if t.name in holder:
                raise ModelFileError(
                    f"{sp} (shard {i + 1} of {count} of {p}) holds the tensor {t.name!r}, which "
                    f"{holder[t.name].name} holds too: one of them is a shard of another model or "
                    f"another split; {_FIX_SHARDS}"
                )
            holder[t.name] = sp
            tensors.append(replace(t, file=i))
        files.extend(shard.files)
    if len(tensors) != n_tensors:
        raise ModelFileError(
            f"the {count} shards of {p} hold {len(tensors)} tensors, but its {SPLIT_TENSORS} "
            f"says {n_tensors}: a shard is from another model or another split; {_FIX_SHARDS}"
        )
    return replace(first, tensors=tuple(tensors), files=tuple(files))


def _shard_words(no) -> str:
    return str(no + 1) if isinstance(no, int) else repr(no)


def open_gguf(p: Path, error: type[Exception] = ModelFileError) -> gguf.GGUFReader:
    """gguf-py's reader of the GGUF file p, after read_header has checked its structure."""
    read_header(p, error=error)
    try:
        return gguf.GGUFReader(p)
    except Exception as err:
        raise error(
            f"{p} is not a readable GGUF file ({type(err).__name__}: {err}); the file may be truncated or corrupt"
        ) from None


# ---------------------------------------------------------------------------------------------- layout

# Layouts already read in this process, by resolved path of the (first) file: (digests of the headers of the
# model's files, layout). One command reads a model's layout several times.
_LAYOUTS: dict[Path, tuple[tuple[bytes | None, ...], MoeLayout]] = {}
_LAYOUTS_KEPT = 8


def _header_digests(files: tuple[ModelFile, ...]) -> tuple[bytes | None, ...]:
    """A digest of each file's size and header (None: the file cannot be read any more)."""
    digests: list[bytes | None] = []
    for f in files:
        try:
            with open(f.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                digests.append(
                    hashlib.blake2b(fh.read(f.data_offset) + size.to_bytes(8, "little"), digest_size=16).digest()
                )
        except OSError:
            digests.append(None)
    return tuple(digests)


def read_layout(path: str | os.PathLike) -> MoeLayout:
    """The MoE layout of a GGUF model (one file, or every shard of a split model from the first one's path),
    validated so that llama.cpp will not abort on it.

    A model read before in this process is not parsed again while the sizes and headers of its files (all that
    the layout depends on) are unchanged.
    """
    p = check_model_file(path)
    key = p.resolve()
    cached = _LAYOUTS.get(key)
    if cached is not None and cached[1].files[0].path.name == p.name:  # the other shards' names follow the first's
        files = tuple(replace(f, path=p.with_name(f.path.name)) for f in cached[1].files)
        if None not in cached[0] and _header_digests(files) == cached[0]:
            return replace(cached[1], path=p, files=files)
    layout = _parse_layout(p)
    _LAYOUTS.pop(key, None)
    _LAYOUTS[key] = (_header_digests(layout.files), layout)
    while len(_LAYOUTS) > _LAYOUTS_KEPT:
        _LAYOUTS.pop(next(iter(_LAYOUTS)))
    return layout


def _parse_layout(p: Path) -> MoeLayout:
    header = read_model_header(p, arrays=(gguf.Keys.Tokenizer.LIST,))
    meta = header.values
    arch = meta.get(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise ModelFileError(f"{p} has no general.architecture key: not a llama.cpp model")

    def optional_integer(template: str, *, per_layer: bool = False) -> int | None:
        """An integer key, None where absent; per_layer keys may hold one value per layer (the largest counts)."""
        name = template.format(arch=arch)
        value = meta.get(name)
        if value is None:
            return None
        values = value if per_layer and isinstance(value, list) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ModelFileError(f"{p}: metadata key {name} holds {value!r}, not an integer; {_FIX_CORRUPT}")
        return max(values)

    def integer(template: str, *, per_layer: bool = False) -> int:
        """An integer key, 0 where absent."""
        value = optional_integer(template, per_layer=per_layer)
        return 0 if value is None else value

    def corrupt(what: str) -> ModelFileError:
        return ModelFileError(f"{p}: {what}; llama.cpp would abort on it: {_FIX_CORRUPT}")

    n_layer = optional_integer(gguf.Keys.LLM.BLOCK_COUNT)
    if n_layer is None:
        raise ModelFileError(
            f"{p} has no {arch}.block_count key: not a llama.cpp language model (a vocabulary-only or projector file?)"
        )
    if not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise corrupt(f"{arch}.block_count is {n_layer}, outside llama.cpp's 1..{LLAMA_MAX_LAYERS}")
    nextn = integer(gguf.Keys.LLM.NEXTN_PREDICT_LAYERS)
    if not 0 <= nextn <= n_layer:
        raise corrupt(f"{arch}.nextn_predict_layers is {nextn}, more than the {n_layer} layers")
    n_expert = integer(gguf.Keys.LLM.EXPERT_COUNT)
    n_expert_used = integer(gguf.Keys.LLM.EXPERT_USED_COUNT, per_layer=True)
    groups = integer(gguf.Keys.LLM.EXPERT_GROUP_COUNT)
    group_used = integer(gguf.Keys.LLM.EXPERT_GROUP_USED_COUNT)
    if arch in _DENSE_IF_ONE_EXPERT and n_expert <= 1:
        n_expert = n_expert_used = 0
    _check_experts(corrupt, arch, n_expert, n_expert_used, groups, group_used)

    router = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP]
    found = {il: header.tensor(f"{router.format(bid=il)}.weight") for il in range(n_layer)}
    routers = {il: t for il, t in found.items() if t is not None}
    moe_layers = tuple(routers)
    if n_expert > 0 and not moe_layers:
        # a truncated conversion, or an architecture that keeps expert keys without routing (ernie4_5's
        # and paddleocr's llama.cpp graphs route nothing): either way there is no router to steer or capture
        raise ModelFileError(
            f"{p} declares {n_expert} experts per layer ({arch}.expert_count) but holds no "
            f"expert router tensor ({router.format(bid='N')}.weight): nothing routes through "
            f"experts, so there is nothing to steer or capture; if {arch} models should have "
            f"routers, {_FIX_CORRUPT}"
        )
    for il in moe_layers:
        shape = list(routers[il].shape)
        if len(shape) < 2 or shape[1] != n_expert:
            raise ModelFileError(
                f"{p}: router tensor {router.format(bid=il)}.weight has shape {shape}, but "
                f"{arch}.expert_count says {n_expert} experts; {_FIX_CORRUPT}"
            )

    gating_id = integer(gguf.Keys.LLM.EXPERT_GATING_FUNC)
    if not 0 <= gating_id <= GATING_FUNC_MAX:
        raise corrupt(
            f"{arch}.expert_gating_func is {gating_id}, not a gating function llama.cpp knows (0..{GATING_FUNC_MAX})"
        )
    shared = optional_integer(gguf.Keys.LLM.EXPERT_SHARED_COUNT)
    if shared is None:
        shexp = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP].format(bid=moe_layers[0]) if moe_layers else ""
        up_shexp = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_UP_SHEXP].format(bid=moe_layers[0]) if moe_layers else ""
        shared = 1 if moe_layers and (header.tensor(f"{shexp}.weight") or header.tensor(f"{up_shexp}.weight")) else 0
    file_type = meta.get(gguf.Keys.General.FILE_TYPE)
    try:
        file_type_name = (
            gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")  # type: ignore[call-overload]
            if file_type is not None
            else "unknown"
        )
    except (TypeError, ValueError):
        file_type_name = f"type {file_type}"
    context_length = integer(gguf.Keys.LLM.CONTEXT_LENGTH)
    if not 0 <= context_length < 2**31:
        raise ModelFileError(
            f"{p}: {arch}.context_length is {context_length}, more than llama.cpp can address "
            f"(2**31 - 1 tokens); {_FIX_CORRUPT}"
        )
    _check_vocabulary(p, header.arrays.get(gguf.Keys.Tokenizer.LIST))
    return MoeLayout(
        path=p,
        arch=arch,
        n_layer=n_layer,
        moe_layers=moe_layers,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_shared_experts=shared,
        n_expert_groups=groups,
        n_group_used=group_used,
        file_type=file_type_name,
        size_bytes=sum(f.size_bytes for f in header.files),
        context_length=max(context_length, 0),
        files=header.files,
        router_spans=tuple((t.file, t.offset, t.n_bytes) for t in routers.values()),
        tensor_types=tuple((t.name, t.type.name) for t in header.tensors),
    )


def _check_vocabulary(p: Path, tokens: object) -> None:
    """llama.cpp asserts that no two tokens of the vocabulary are the same string; a flipped byte in the token
    list is enough to trip it and abort the process. Tokens are compared as llama.cpp reads them: as C strings
    (up to the first NUL byte), an empty one counting as "[EMPTY_<id>]"."""
    if not isinstance(tokens, tuple):
        return  # llama.cpp refuses a missing or mistyped token list with an error of its own
    words = [t.split(b"\0", 1)[0] if b"\0" in t else t for t in tokens]
    if len(set(words)) == len(words) and all(words):
        return  # the common case, at C speed; the loop below names the culprit
    seen: dict[bytes, int] = {}
    for i, word in enumerate(words):
        word = word or f"[EMPTY_{i}]".encode()
        first = seen.setdefault(word, i)
        if first != i:
            raise ModelFileError(
                f"{p}: the vocabulary ({gguf.Keys.Tokenizer.LIST}) holds the token "
                f"{word.decode('utf-8', 'replace')!r} twice (ids {first} and {i}); llama.cpp would "
                f"abort on it: {_FIX_CORRUPT}"
            )


def _check_experts(corrupt, arch: str, n_expert: int, used: int, groups: int, group_used: int) -> None:
    """The expert hyperparameters llama.cpp asserts in llama_model::load_hparams (a failure aborts)."""
    if not 0 <= n_expert <= LLAMA_MAX_EXPERTS:
        raise corrupt(f"{arch}.expert_count is {n_expert}, outside llama.cpp's 0..{LLAMA_MAX_EXPERTS}")
    if used < 0 or used > n_expert:
        raise corrupt(f"{arch}.expert_used_count is {used} but the model has {n_expert} experts per layer")
    if n_expert > 0:
        if used == 0:
            raise corrupt(f"{arch}.expert_used_count is 0 (or missing) but the model has {n_expert} experts per layer")
        if not 0 <= groups < n_expert:
            raise corrupt(f"{arch}.expert_group_count is {groups}, not fewer than the {n_expert} experts")
        if groups > 1:
            if n_expert % groups:
                raise corrupt(f"{n_expert} experts do not split into {groups} expert groups")
            if not 0 < group_used < groups:
                raise corrupt(f"{arch}.expert_group_used_count is {group_used}, not in 1..{groups - 1}")
    elif used or groups:
        raise corrupt(
            f"the model has no experts but {arch}.expert_used_count is {used} and {arch}.expert_group_count is {groups}"
        )
