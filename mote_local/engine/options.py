"""The settings a model is loaded, given a context and sampled with, in llama.cpp's terms: one typed home for
what every command's flags mean (mote_local.cli.options declares the flags), their checks, and how they map to
llama.cpp's parameters. ``mote_local.engine.model.open_model`` loads a model with them:

    open_model("model.gguf", ModelOptions(LoadOptions(overrides=tuple(cpu_moe_overrides())),
                                          ContextOptions(n_ubatch=256)))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from mote_local import binding
from mote_local.engine import rpc
from mote_local.errors import InputError
from mote_local.modelfile.layout import MoeLayout

# llama.cpp's expert tensors (common.h LLM_FFN_EXPS_REGEX), which --cpu-moe and --n-cpu-moe keep on the CPU
EXPERT_TENSORS = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
CPU = "CPU"
# llama.cpp's llama_flash_attn_type
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
# the KV cache types llama.cpp's -ctk/-ctv allow (arg.cpp kv_cache_types), as ggml_type values
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6, "q5_1": 7}
UNQUANTIZED_CACHE = ("f32", "f16", "bf16")
CACHE_BLOCK = 32  # the block of every quantized cache type above: a head's width must be a multiple of it
# llama.cpp's llama_load_mode: (mmap, mlock) -> mode; mmap unless --no-mmap, as llama.cpp's default (auto)
LOAD_MODES = {(True, False): -1, (False, False): 0, (True, True): 3, (False, True): 2}
CONTEXT_FLAG = "-c/--ctx-size"
DEFAULT_CONTEXT = 4096


def parse_overrides(text: str) -> list[tuple[str, str]]:
    """llama.cpp's -ot value: PATTERN=BUFFER_TYPE[,PATTERN=BUFFER_TYPE…] as (pattern, buffer type) pairs."""
    pairs = []
    for item in text.split(","):
        pattern, sep, buft = item.partition("=")
        if not sep or not pattern or not buft:
            raise InputError(f"-ot/--override-tensor takes PATTERN=BUFFER_TYPE[,…] (e.g. exps=CPU), got {item!r}")
        pairs.append((pattern, buft))
    return pairs


def buft_overrides(overrides: Sequence[tuple[str, str]]):
    """llama_model_params.tensor_buft_overrides for (pattern, buffer type name) pairs, with the pattern bytes it
    points into (binding.tensor_buft_overrides), or None without overrides. A pattern that is no regular
    expression or a buffer type this build lacks is an InputError naming it (and the buffer types there are)."""
    if not overrides:
        return None
    available = binding.buffer_types()
    for pattern, name in overrides:
        try:
            re.compile(pattern)
        except re.error as err:
            raise InputError(f"-ot/--override-tensor: {pattern!r} is not a regular expression ({err})") from None
        if name not in available:
            raise InputError(
                f"-ot/--override-tensor {pattern}={name}: unknown buffer type {name!r}; this build has "
                f"{', '.join(sorted(available))}"
            )
    return binding.tensor_buft_overrides([(pattern, available[name]) for pattern, name in overrides])


def cpu_moe_overrides(n_layers: int | None = None) -> list[tuple[str, str]]:
    """--cpu-moe (every layer's experts on the CPU) or --n-cpu-moe N (the first N layers'), as llama.cpp
    spells them."""
    if n_layers is None:
        return [(EXPERT_TENSORS, CPU)]
    return [(rf"blk\.{il}{EXPERT_TENSORS}", CPU) for il in range(n_layers)]


@dataclass(frozen=True)
class LoadOptions:
    """How the model is loaded and placed: -ngl, --rpc, -ts, -ot / --cpu-moe / --n-cpu-moe (``overrides``, the
    first match wins as in llama.cpp), --no-mmap, --mlock, -t, --verbose."""

    n_gpu_layers: int | None = None  # None: 0, or every layer with rpc servers
    rpc_servers: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    mmap: bool = True
    mlock: bool = False
    n_threads: int | None = None
    verbose: bool = False

    def model_kwargs(self) -> dict:
        """Model's keyword arguments."""
        return {
            "n_gpu_layers": rpc.offloaded_layers(self.n_gpu_layers, self.rpc_servers),
            "rpc_servers": list(self.rpc_servers),
            "tensor_split": self.tensor_split,
            "tensor_overrides": list(self.overrides),
            "mmap": self.mmap,
            "mlock": self.mlock,
            "n_threads": self.n_threads,
            "verbose": self.verbose,
        }


@dataclass(frozen=True)
class ContextOptions:
    """The context every session of the model opens with: -c (0: the training context), -b, -ub, -fa, -ctk, -ctv.
    None keeps what the command or llama.cpp chooses; a setting given wins over the command's own choice
    (n_ctx excepted: each command sizes its contexts, -c bounds what a prompt may need)."""

    n_ctx: int | None = None  # None: DEFAULT_CONTEXT, at most the training context
    n_batch: int | None = None
    n_ubatch: int | None = None
    flash_attn: str | None = None
    type_k: str | None = None
    type_v: str | None = None

    def __post_init__(self) -> None:
        if self.flash_attn is not None and self.flash_attn not in FLASH_ATTN:
            raise InputError(f"-fa/--flash-attn takes {', '.join(FLASH_ATTN)}, got {self.flash_attn!r}")
        for flag, value in (("-ctk/--cache-type-k", self.type_k), ("-ctv/--cache-type-v", self.type_v)):
            if value is not None and value not in KV_CACHE_TYPES:
                raise InputError(
                    f"{flag} takes one of {', '.join(KV_CACHE_TYPES)} (llama.cpp's cache types), got {value!r}"
                )
        if self.type_v not in (None, *UNQUANTIZED_CACHE) and self.flash_attn == "off":
            raise InputError(
                f"a quantized V cache (-ctv {self.type_v}) needs flash attention: drop -fa off (or use -ctv f16)"
            )

    def session_settings(self) -> dict:
        """Session keyword arguments for the settings given (llama.cpp's names for the cache types)."""
        out = {name: getattr(self, name) for name in ("n_batch", "n_ubatch", "flash_attn") if getattr(self, name)}
        for name in ("type_k", "type_v"):
            if getattr(self, name) is not None:
                out[name] = KV_CACHE_TYPES[getattr(self, name)]
        return out


@dataclass(frozen=True)
class SamplingOptions:
    """--temp, --top-k, --top-p, --min-p, --repeat-penalty (over the last 64 tokens), --seed: llama.cpp's
    sampler settings and defaults, except the temperature (0, greedy: runs repeat) and the seed (0, fixed)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        """Session.generate's keyword arguments (the same names)."""
        return asdict(self)


@dataclass(frozen=True)
class ChatOptions:
    """--chat-template (a built-in name of llama.cpp's, or a jinja template's text) and -sys/--system-prompt."""

    template: str | None = None
    template_origin: str | None = None  # what the template is called in messages (its file)
    system_prompt: str | None = None

    def model_kwargs(self) -> dict:
        return {
            "chat_template": self.template,
            "chat_template_origin": self.template_origin,
            "system_prompt": self.system_prompt,
        }


@dataclass(frozen=True)
class ModelOptions:
    """Everything a command loads a model with."""

    load: LoadOptions = field(default_factory=LoadOptions)
    context: ContextOptions = field(default_factory=ContextOptions)
    chat: ChatOptions = field(default_factory=ChatOptions)


def check_cache_types(type_k: int | None, type_v: int | None, head_k: int, head_v: int, model: str) -> None:
    """A quantized K or V cache (ggml types, KV_CACHE_TYPES) needs heads a whole number of blocks wide, or
    llama.cpp refuses the context: refused here first, naming the flag."""
    names = {v: k for k, v in KV_CACHE_TYPES.items()}
    for flag, ggml_type, width in (("-ctk", type_k, head_k), ("-ctv", type_v, head_v)):
        name = names.get(ggml_type) if ggml_type is not None else None
        if name is not None and name not in UNQUANTIZED_CACHE and width % CACHE_BLOCK:
            raise InputError(
                f"{flag} {name} stores blocks of {CACHE_BLOCK} values, but the attention heads of {model} "
                f"are {width} wide: choose {'/'.join(UNQUANTIZED_CACHE)} for {model}"
            )


def context_size(layout: MoeLayout, asked: int | None) -> tuple[int, str | None]:
    """(the context to open, a warning or None): without -c, DEFAULT_CONTEXT or the training context if that is
    smaller; -c 0 is the training context; more than the training context is given, with llama.cpp's warning,
    not capped."""
    trained = layout.context_length
    if asked is None:
        return min(DEFAULT_CONTEXT, trained) if trained else DEFAULT_CONTEXT, None
    if asked == 0:
        if not trained:
            raise InputError(
                f"-c 0 asks for the training context of {layout.path.name}, which the file does not "
                "give: pass the context size, e.g. -c 4096"
            )
        return trained, None
    if trained and asked > trained:
        return asked, (
            f"warning: -c {asked} is more than the {trained} tokens {layout.path.name} was trained on: "
            "possible training context overflow (the model may degrade past them)"
        )
    return asked, None


def require_fit(n_tokens: int, n_ctx: int, what: str) -> None:
    """Raises InputError naming ``what`` and -c when n_tokens positions do not fit a context of n_ctx."""
    if n_tokens > n_ctx:
        raise InputError(
            f"{what} needs {n_tokens} positions, more than the context of {n_ctx}: shorten it or raise "
            f"the context ({CONTEXT_FLAG}; n_ctx in Python)"
        )
