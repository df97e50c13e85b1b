"""Quantizations that keep routing: recipes of per-tensor types, llama.cpp's quantizer run with them, and how
far a model file's own quantization is measured to move routing.

A recipe names a ggml type per tensor group (routed experts, everything else); :func:`quantize` hands it to
``llama_model_quantize`` as tensor-type overrides (``llama_model_quantize_params.tt_overrides``), so the
quantization is llama.cpp's own, tensor for tensor. The quantizer never quantizes the routers
(``ffn_gate_inp``) nor norms; they keep the source's type, and with them the model's fingerprint.

:func:`routing_class` reads a model's tensor types (``MoeLayout.tensor_types``) and answers from ``MEASURED``,
the agreement with f32 routing measured on the bench model (bench/RESULTS.md). Classification needs no
engine; quantizing loads it (``mote_local.binding``) when it runs.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf

from mote_local.atomic import atomic_path
from mote_local.errors import EngineError, ModelFileError
from mote_local.modelfile.layout import read_layout, read_model_header

__all__ = [
    "Recipe",
    "RECIPES",
    "GROUPS",
    "MEASURED",
    "Fidelity",
    "RoutingClass",
    "QuantizeResult",
    "quantize",
    "plan",
    "routing_class",
    "group_types",
    "check_paths",
]

QT = gguf.GGMLQuantizationType

# Tensor groups as regular expressions over GGUF tensor names, searched (not matched) as llama.cpp's quantizer
# searches its --tensor-type patterns (std::regex, ECMAScript: these patterns mean the same in Python's re).
ROUTED_EXPERTS = r"\.ffn_[a-z_]+_exps\.weight$"  # ffn_gate_exps, ffn_up_exps, ffn_down_exps, ffn_gate_up_exps
GROUPS: dict[str, str] = {
    "attn_q": r"\.attn_q(_a|_b)?\.weight$",
    "attn_k": r"\.attn_k(_b)?\.weight$",
    "attn_v": r"\.attn_v(_b)?\.weight$",
    "attn_qkv": r"\.attn_(qkv|kv_a_mqa|kv_b)\.weight$",
    "attn_output": r"\.attn_output\.weight$",
    "ffn_gate_exps": r"\.ffn_gate_exps\.weight$",
    "ffn_up_exps": r"\.ffn_up_exps\.weight$",
    "ffn_down_exps": r"\.ffn_down_exps\.weight$",
    "ffn_gate_up_exps": r"\.ffn_gate_up_exps\.weight$",
    "shared_experts": r"\.ffn_[a-z_]+_shexp\.weight$",
    "dense_ffn": r"\.ffn_(gate|up|down)\.weight$",
    "token_embd": r"^token_embd\.weight$",
    "output": r"^output\.weight$",
}
_ANY = "."  # the last rule of every recipe: whatever no group named

# What llama.cpp's quantizer leaves alone whatever it is asked (src/llama-quant.cpp,
# tensor_allows_quantization): tensors of fewer than 2 dimensions, names not ending in "weight", norms, routers,
# and a few per-architecture tables. The names here are the ones an MoE GGUF carries.
_NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "position_embd.weight",
    "token_types.weight",
    "ssm_conv1d",
    "attn_rel_b.weight",
)
FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16, QT.F64})

# llama_ftype recorded as general.file_type, by the type of the routed experts (the bulk of an MoE's weights)
_FTYPE_FOR = {
    QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
    QT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
    QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QT.F16: gguf.LlamaFileType.MOSTLY_F16,
    QT.BF16: gguf.LlamaFileType.MOSTLY_BF16,
}
RECIPE_KEY = "mote.quantize.recipe"  # the recipe a file was made with, written into its metadata


@dataclass(frozen=True)
class Recipe:
    """Per-tensor types: the first rule whose pattern a tensor's name contains decides; ``default`` covers the
    rest. Tensors llama.cpp never quantizes (routers, norms) keep the source's type."""

    name: str
    summary: str
    rules: tuple[tuple[str, QT], ...]
    default: QT

    @property
    def ftype(self) -> gguf.LlamaFileType:
        experts = next((t for p, t in self.rules if p == ROUTED_EXPERTS), self.default)
        return _FTYPE_FOR.get(experts, gguf.LlamaFileType.MOSTLY_Q8_0)

    def type_for(self, name: str) -> QT:
        for pattern, qtype in self.rules:
            if re.search(pattern, name):
                return qtype
        return self.default


def _capture(experts: QT, name: str) -> Recipe:
    """Routed experts at ``experts``; the output projection, which no router reads, Q8_0; the rest F16."""
    return Recipe(
        name,
        f"routed experts {experts.name}, output Q8_0, everything else F16",
        ((ROUTED_EXPERTS, experts), (GROUPS["output"], QT.Q8_0)),
        QT.F16,
    )


# The routing drift of a quantization comes mostly from the few non-expert tensors (attention V and O, the token
# embedding: 3% of the benchmark model's weights); with them at F16 the routed experts can take Q6_K and still
# keep routing (bench/RESULTS.md, "Capture-friendly quantization"). `capture` is that recipe. The output
# projection comes after every router: its type cannot change the routing of given tokens.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        _capture(QT.Q6_K, "capture"),
        _capture(QT.Q8_0, "capture-q8"),
        _capture(QT.Q4_K, "capture-q4"),
        Recipe("q8_0", "every quantizable tensor Q8_0 (as llama-quantize Q8_0)", (), QT.Q8_0),
    )
}


# -------------------------------------------------------------------------------------------------- planning


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp's quantizer may change this tensor's type (routers, norms, biases: never)."""
    return len(shape) >= 2 and name.endswith("weight") and not any(s in name for s in _NEVER_QUANTIZED)


def _fallback(qtype: QT, row: int) -> QT:
    """llama.cpp's tensor_type_fallback: a row its blocks cannot tile takes a smaller block, else F16."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if row % block == 0:
        return qtype
    smaller = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}.get(qtype, qtype)
    return smaller if row % gguf.GGML_QUANT_SIZES[smaller][0] == 0 else QT.F16


def _n_bytes(qtype: QT, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def plan(src: str | os.PathLike, recipe: Recipe) -> list[tuple[str, QT, QT]]:
    """(name, source type, type after quantizing) of every tensor of ``src`` under ``recipe``."""
    header = read_model_header(src)
    out = []
    for t in header.tensors:
        new = _fallback(recipe.type_for(t.name), t.shape[0]) if quantizable(t.name, t.shape) else t.type
        out.append((t.name, t.type, new))
    return out


def check_paths(src: str | os.PathLike, dst: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """The source as a readable MoE GGUF and a destination that may be written; a ModelFileError otherwise."""
    src_p, dst_p = Path(src), Path(dst)
    layout = read_layout(src_p).require_moe()
    if dst_p.exists() or dst_p.is_symlink():
        if dst_p.is_dir():
            raise ModelFileError(f"{dst_p} is a directory: give the path of the .gguf file to write")
        try:
            same = os.path.samefile(src_p, dst_p)
        except OSError:
            same = False
        if same:
            raise ModelFileError(f"{dst_p} is the source model itself: write the quantization to another file")
        if not force:
            raise ModelFileError(f"{dst_p} exists: pass --force to replace it, or choose another file")
    return layout.path, dst_p


def _check_source_precision(src: Path) -> None:
    """Every tensor the quantizer may change must be F32/F16/BF16: llama.cpp refuses to requantize, and a
    requantized file would carry the source's routing drift under the recipe's name."""
    quantized = [
        (t.name, t.type)
        for t in read_model_header(src).tensors
        if quantizable(t.name, t.shape) and t.type not in FLOAT_TYPES
    ]
    if quantized:
        name, old = quantized[0]
        raise ModelFileError(
            f"{src} is already quantized ({name} is {old.name}, {len(quantized)} tensors in all): "
            "quantizing it again cannot bring back the routing it lost; start from the F32, F16 or "
            "BF16 GGUF (convert_hf_to_gguf.py --outtype f16)"
        )


def _check_space(dst: Path, steps: list[tuple[str, QT, QT]], src: Path) -> int:
    header = read_model_header(src)
    shapes = {t.name: t.shape for t in header.tensors}
    need = sum(_n_bytes(new, shapes[name]) for name, _, new in steps) + header.data_offset
    where = dst.parent if dst.parent.exists() else Path(".")
    free = shutil.disk_usage(where).free
    if need > free:
        raise ModelFileError(
            f"not enough disk space for {dst}: the quantization needs about {need / 2**20:,.0f} MiB, "
            f"{free / 2**20:,.0f} MiB are free there"
        )
    return need


# ------------------------------------------------------------------------------------------------ quantizing


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    recipe: Recipe
    size_bytes: int
    tensor_types: tuple[tuple[str, str], ...]  # (name, type) of every tensor of the written file

    @property
    def types(self) -> dict[str, str]:
        """Tensor group -> its types in the written file ("Q8_0", or "Q4_K, Q6_K")."""
        return group_types(self.tensor_types)


def quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    recipe: Recipe | str = "capture",
    *,
    force: bool = False,
    threads: int = 0,
) -> QuantizeResult:
    """Quantizes the higher-precision GGUF ``src`` into ``dst`` with ``recipe``'s per-tensor types, through
    llama.cpp's quantizer. ``dst`` is written atomically: on any failure no partial file is left and an existing
    ``dst`` (replaced only with ``force``) keeps its content."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ModelFileError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
        recipe = RECIPES[recipe]
    src_p, dst_p = check_paths(src, dst, force)
    steps = plan(src_p, recipe)
    _check_source_precision(src_p)
    _check_space(dst_p, steps, src_p)

    from mote_local.binding import llama  # the engine, loaded only to quantize

    rules = [*recipe.rules, (_ANY, recipe.default)]
    keep = [p.encode() for p, _ in rules]  # the C array points into these bytes: keep them alive
    overrides = (llama.llama_model_tensor_override * (len(rules) + 1))(
        *[llama.llama_model_tensor_override(p, int(t)) for p, (_, t) in zip(keep, rules)],
        llama.llama_model_tensor_override(None, 0),
    )  # {NULL, …} ends the list
    kv = (llama.llama_model_kv_override * 2)()
    kv[0].tag, kv[0].key = llama.LLAMA_KV_OVERRIDE_TYPE_STR, RECIPE_KEY.encode()
    kv[0].value.val_str = recipe.name.encode()[:127]  # type: ignore[union-attr]  # a ctypes union field
    params = llama.llama_model_quantize_default_params()
    params.ftype = int(recipe.ftype)
    params.nthread = threads
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama.llama_model_tensor_override))
    params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(llama.llama_model_kv_override))
    with atomic_path(dst_p) as tmp:
        rc = llama.llama_model_quantize(str(src_p).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise EngineError(
                f"llama.cpp's quantizer failed on {src_p} (code {rc}; its message is above); "
                f"nothing was written to {dst_p}"
            )
    del keep
    return QuantizeResult(dst_p, recipe, dst_p.stat().st_size, read_layout(dst_p).tensor_types)


# ------------------------------------------------------------------------------------- routing fidelity


def _group_of(name: str) -> str | None:
    for group, pattern in GROUPS.items():
        if re.search(pattern, name):
            return group
    return None


def group_types(tensor_types: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The types of each tensor group present (routers as "router"), e.g. {"ffn_up_exps": "Q4_K", ...}."""
    seen: dict[str, list[str]] = {}
    for name, tname in tensor_types:
        group = "router" if name.endswith("ffn_gate_inp.weight") else _group_of(name)
        if group is not None and tname not in seen.setdefault(group, []):
            seen[group].append(tname)
    return {g: ", ".join(v) for g, v in seen.items()}


# Precision buckets, most precise first: F16 (or F32), BF16, then by bits per weight. A side of the model (routed
# experts, everything else) is in the bucket of its least precise tensor.
_BUCKETS = ("f16", "bf16", "q8", "q6", "q5", "q4", "low")
_BITS_FLOOR = (("q8", 8.5), ("q6", 6.5), ("q5", 5.5), ("q4", 4.5))
# The types whose routing drift follows bits per weight alongside the measured ones: llama.cpp's integer block
# types (Q4_0 … Q8_1 and the K-quants). IQ*, MXFP4, the ternary types and others quantize otherwise and are
# not measured: their bits per weight say nothing about their routing.
_BLOCK_INTEGER = re.compile(r"^Q[2-8]_(0|1|K)$")


def _bucket_of(type_name: str) -> str | None:
    """The type's precision bucket; None for a type whose routing was never measured nor can be ordered."""
    if type_name in ("F32", "F64", "F16"):
        return "f16"
    if type_name == "BF16":
        return "bf16"
    if not _BLOCK_INTEGER.match(type_name):
        return None
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return next((name for name, floor in _BITS_FLOOR if size * 8 / block >= floor), "low")


def _bucket(type_names: list[str]) -> str:
    """The least precise bucket of the types (callers pass only types that have one)."""
    return max((b for t in type_names if (b := _bucket_of(t)) is not None), key=_BUCKETS.index, default="f16")


def _at_least(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether class a is at least as precise as class b on both sides."""
    return all(_BUCKETS.index(x) <= _BUCKETS.index(y) for x, y in zip(a, b))


@dataclass(frozen=True)
class Fidelity:
    """Routing of one quantization class against f32, measured on the bench model."""

    set_identical: float  # share of per-token top-k expert sets identical to f32's
    ftri_top: int  # of the fTRI top-10 (mean_diff), how many f32 also ranks top-10
    example: str  # the file that was measured

    @property
    def keeps_routing(self) -> bool:
        """The bar issue 15 sets: >= 85% identical top-k sets and the same fTRI top-10."""
        return self.set_identical >= 0.85 and self.ftri_top == 10


# (non-expert bucket, routed-expert bucket) -> measured fidelity: bench/RESULTS.md, "## Capture-friendly
# quantization (issue 15)", measured by bench/bench_quant.py on bench_ftri's model (64 experts, top-8).
MEASURED: dict[tuple[str, str], Fidelity] = {
    ("f16", "f16"): Fidelity(0.992, 10, "F16"),
    ("bf16", "bf16"): Fidelity(0.951, 10, "BF16"),
    ("f16", "q8"): Fidelity(0.968, 10, "capture-q8"),
    ("f16", "q6"): Fidelity(0.927, 10, "capture"),
    ("f16", "q4"): Fidelity(0.765, 9, "capture-q4"),
    ("q8", "q8"): Fidelity(0.869, 10, "Q8_0"),
    ("q8", "q6"): Fidelity(0.855, 10, "Q8_0 with Q6_K experts"),
    ("q8", "q5"): Fidelity(0.816, 10, "Q8_0 with Q5_K experts"),
    ("q8", "q4"): Fidelity(0.736, 10, "Q8_0 with Q4_K experts"),
    ("q4", "q4"): Fidelity(0.188, 8, "Q4_K_M"),
}
RESULTS_SECTION = 'bench/RESULTS.md, "Capture-friendly quantization"'


# What to do about a quantization that moves routing. `mote quantize` takes F32/F16/BF16 sources only; a model whose
# experts are MXFP4 (gpt-oss's release format: its experts were trained in MXFP4) has no such source to offer.
_ADVICE_QUANTIZE = (
    "for fTRI quantize the model's F32/F16/BF16 GGUF with `mote quantize SRC.gguf DST.gguf --recipe capture`"
)
_ADVICE_MXFP4 = (
    "for fTRI use the model's release GGUF: MXFP4 routed experts with BF16/F32 everything else (`mote "
    "quantize` takes F32/F16/BF16 sources only)"
)


@dataclass(frozen=True)
class RoutingClass:
    name: str  # "F32", "Q8_0 non-expert weights, Q4 routed experts", ...
    fidelity: Fidelity | None  # None: full precision, or a class not measured
    moves_routing: bool | None  # None: not known, its types were never measured
    text: str  # one line for the user
    advice: str = _ADVICE_QUANTIZE  # what to do where it moves routing (or may)

    @property
    def warning(self) -> str | None:
        if self.moves_routing is False:
            return None
        return f"warning: {self.text}; {self.advice}"


def routing_class(tensor_types: tuple[tuple[str, str], ...]) -> RoutingClass:
    """How far a model's quantization moves routing, from its tensor types and the measured table.

    Tensors are split into routed experts and everything else that shapes the router's input (attention,
    shared experts, dense FFNs, the token embedding); the output projection and the unquantized routers and
    norms do not count. A class not measured is judged by a measured one it is at least as precise as (it keeps
    routing if that one did), or one at least as precise as it (it moves routing if that one did), where bits per
    weight order them: among floats and llama.cpp's integer block types. A class with any other type (IQ*,
    MXFP4, ...) is said to be not measured, with advice that the next command accepts."""
    experts: list[str] = []
    rest: list[str] = []
    for name, tname in tensor_types:
        if not quantizable(name, (0, 0)) or re.search(GROUPS["output"], name):
            continue
        (experts if re.search(ROUTED_EXPERTS, name) else rest).append(tname)
    if all(t == QT.F32.name for t in experts + rest):
        return RoutingClass("F32", None, False, "F32 weights: the reference routing")
    where = f"({RESULTS_SECTION})"
    unmeasured = sorted({t for t in experts + rest if _bucket_of(t) is None})
    if unmeasured:
        return _unmeasured(experts, rest, unmeasured)
    key = (_bucket(rest), _bucket(experts))
    name = f"{_label(key[0])} non-expert weights, {_label(key[1])} routed experts"
    measured = MEASURED.get(key)
    if measured is not None:
        verdict = "keeps" if measured.keeps_routing else "moves"
        return RoutingClass(
            name,
            measured,
            not measured.keeps_routing,
            f"this quantization ({name}) {verdict} routing: {measured.example} kept "
            f"{100 * measured.set_identical:.1f}% of per-token expert sets identical to f32 and "
            f"{measured.ftri_top}/10 of its fTRI top-10 {where}",
        )
    below = [f for k, f in MEASURED.items() if _at_least(key, k) and f.keeps_routing]
    if below:
        f = max(below, key=lambda f: f.set_identical)
        return RoutingClass(
            name,
            None,
            False,
            f"this quantization ({name}) keeps routing at least as well as "
            f"{f.example}, which kept {100 * f.set_identical:.1f}% {where}",
        )
    above = [f for k, f in MEASURED.items() if _at_least(k, key) and not f.keeps_routing]
    if above:
        f = min(above, key=lambda f: f.set_identical)
        return RoutingClass(
            name,
            None,
            True,
            f"this quantization ({name}) moves routing: {f.example}, more "
            f"precise, kept only {100 * f.set_identical:.1f}% of per-token "
            f"expert sets identical to f32 {where}",
        )
    return RoutingClass(name, None, None, f"this quantization ({name}) may move routing: not measured {where}")


def _unmeasured(experts: list[str], rest: list[str], types: list[str]) -> RoutingClass:
    """A class with types whose routing was never measured (IQ*, MXFP4, ...): said so, not guessed from bits."""

    def side(names: list[str]) -> str:
        odd = sorted({t for t in names if _bucket_of(t) is None})
        return "/".join(odd) if odd else _label(_bucket(names))

    name = f"{side(rest)} non-expert weights, {side(experts)} routed experts"
    mxfp4 = bool(experts) and set(experts) == {QT.MXFP4.name}
    if mxfp4 and all(_bucket_of(t) in ("f16", "bf16") for t in rest):
        return RoutingClass(
            name,
            None,
            False,
            f"{name}: gpt-oss's release format (its experts were trained in MXFP4), the model's own "
            "routing; experts quantized to MXFP4 from higher precision were not measured",
        )
    return RoutingClass(
        name,
        None,
        None,
        f"this quantization ({name}) may move routing: {', '.join(types)} "
        f"{'is' if len(types) == 1 else 'are'} not measured ({RESULTS_SECTION} measured F16, BF16, "
        "Q8_0, Q6_K, Q5_K and Q4_K)",
        _ADVICE_MXFP4 if mxfp4 else _ADVICE_QUANTIZE,
    )


def _label(bucket: str) -> str:
    return {"f16": "F16/F32", "bf16": "BF16", "q8": "Q8_0", "q6": "Q6_K", "q5": "Q5", "q4": "Q4", "low": "below-Q4"}[
        bucket
    ]
