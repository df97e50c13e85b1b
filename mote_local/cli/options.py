"""The model-loading flags, declared once for every command that loads a model, with llama.cpp's spellings
(multi-letter short flags such as -ngl, -ctk, -ot, -fa, -ub, -sys, -hf parse as llama.cpp's do). Each group
reaches its command as one typed argument (mote_local.engine.options); ``open_model`` loads the model.

    @main.command()
    @model_options(chat=True)
    def run(model: Path, options: ModelOptions, ...): ...
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from mote_local.engine.options import (
    FLASH_ATTN,
    KV_CACHE_TYPES,
    ChatOptions,
    ContextOptions,
    LoadOptions,
    ModelOptions,
    SamplingOptions,
    context_size,
    cpu_moe_overrides,
    parse_overrides,
)
from mote_local.errors import InputError
from mote_local.modelfile.layout import MoeLayout

SAMPLER_SEED = click.IntRange(0, 2**32 - 1)  # llama.cpp's sampler seeds are 32-bit
OLLAMA_PREFIX = "ollama:"

# (name, click decorator) of each group: the names leave the command's keyword arguments and come back as one
_SOURCE = [
    ("model_arg", click.argument("model_arg", metavar="[MODEL]", required=False)),
    (
        "model_path",
        click.option(
            "--model",
            "-m",
            "model_path",
            metavar="PATH",
            default=None,
            help="The model file (instead of MODEL); ollama:NAME[:TAG] names an ollama model.",
        ),
    ),
    (
        "hf_repo",
        click.option(
            "--hf-repo",
            "-hf",
            "hf_repo",
            metavar="ORG/NAME[:QUANT]",
            default=None,
            help="A model on Hugging Face, fetched into its cache (QUANT picks the file as llama.cpp "
            "does; every shard of a split model).",
        ),
    ),
]


def _override(ctx, param, values):
    try:
        return tuple(pair for value in values for pair in parse_overrides(value))
    except InputError as err:
        raise click.BadParameter(str(err), ctx, param) from None


def threads_option(f):
    return click.option(
        "--threads",
        "-t",
        type=click.IntRange(min=1),
        default=None,
        help="CPU threads for generation and prompt processing (default: every core).",
    )(f)


_LOAD = [
    (
        "n_gpu_layers",
        click.option(
            "--n-gpu-layers",
            "-ngl",
            "n_gpu_layers",
            type=click.IntRange(min=0),
            default=None,
            help="Layers to offload to the GPUs and rpc servers (default: 0; every layer with --rpc).",
        ),
    ),
    (
        "rpc_servers",
        click.option(
            "--rpc",
            "rpc_servers",
            metavar="HOST:PORT[,…]",
            default=None,
            help="Spread the offloaded layers over llama.cpp rpc-servers (start them with `mote rpc-server`).",
        ),
    ),
    (
        "tensor_split",
        click.option(
            "--tensor-split",
            "-ts",
            "tensor_split",
            metavar="P,P[,…]",
            default=None,
            help="Offloaded layers per device, in proportion: the --rpc servers in order, then local GPUs.",
        ),
    ),
    (
        "override_tensor",
        click.option(
            "--override-tensor",
            "-ot",
            "override_tensor",
            multiple=True,
            metavar="PATTERN=BUFT[,…]",
            callback=_override,
            help="Put the tensors whose names match PATTERN (a regular expression) into "
            "buffer type BUFT (CPU, CUDA0, …); repeatable, the first match wins.",
        ),
    ),
    (
        "cpu_moe",
        click.option(
            "--cpu-moe",
            "-cmoe",
            "cpu_moe",
            is_flag=True,
            help="Keep every MoE expert tensor on the CPU (= -ot '\\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU').",
        ),
    ),
    (
        "n_cpu_moe",
        click.option(
            "--n-cpu-moe",
            "-ncmoe",
            "n_cpu_moe",
            type=click.IntRange(min=0),
            default=None,
            metavar="N",
            help="Keep the MoE expert tensors of the first N layers on the CPU.",
        ),
    ),
    (
        "no_mmap",
        click.option(
            "--no-mmap", "no_mmap", is_flag=True, help="Read the model into memory instead of mapping the file."
        ),
    ),
    ("mlock", click.option("--mlock", "mlock", is_flag=True, help="Keep the model in RAM (no swapping).")),
    ("threads", threads_option),
    ("verbose", click.option("--verbose", "verbose", is_flag=True, help="Show llama.cpp's log.")),
]


def _load(
    n_gpu_layers, rpc_servers, tensor_split, override_tensor, cpu_moe, n_cpu_moe, no_mmap, mlock, threads, verbose
) -> LoadOptions:
    from mote_local.engine.rpc import parse_endpoints, parse_tensor_split

    overrides = list(override_tensor)
    if cpu_moe:
        overrides += cpu_moe_overrides()
    if n_cpu_moe:
        overrides += cpu_moe_overrides(n_cpu_moe)
    return LoadOptions(
        n_gpu_layers=n_gpu_layers,
        rpc_servers=tuple(parse_endpoints(rpc_servers)) if rpc_servers is not None else (),
        tensor_split=tuple(parse_tensor_split(tensor_split)) if tensor_split is not None else None,
        overrides=tuple(overrides),
        mmap=not no_mmap,
        mlock=mlock,
        n_threads=threads,
        verbose=verbose,
    )


_CONTEXT = [
    (
        "ctx_size",
        click.option(
            "--ctx-size",
            "-c",
            "ctx_size",
            type=click.IntRange(min=0),
            default=None,
            help="Context size (default: 4096, or the training context if smaller; 0: the "
            "training context; more than that warns).",
        ),
    ),
    (
        "batch_size",
        click.option(
            "--batch-size",
            "-b",
            "batch_size",
            type=click.IntRange(min=1),
            default=None,
            help="Logical batch: tokens per decode call (llama.cpp's n_batch; default: the command's own).",
        ),
    ),
    (
        "ubatch_size",
        click.option(
            "--ubatch-size",
            "-ub",
            "ubatch_size",
            type=click.IntRange(min=1),
            default=None,
            help="Physical batch: tokens per compute step (llama.cpp's n_ubatch; default 512).",
        ),
    ),
    (
        "flash_attn",
        click.option(
            "--flash-attn",
            "-fa",
            "flash_attn",
            type=click.Choice(list(FLASH_ATTN)),
            default=None,
            help="Flash attention (default: auto).",
        ),
    ),
    (
        "cache_type_k",
        click.option(
            "--cache-type-k",
            "-ctk",
            "cache_type_k",
            type=click.Choice(list(KV_CACHE_TYPES)),
            default=None,
            help="KV cache type of K (default: f16).",
        ),
    ),
    (
        "cache_type_v",
        click.option(
            "--cache-type-v",
            "-ctv",
            "cache_type_v",
            type=click.Choice(list(KV_CACHE_TYPES)),
            default=None,
            help="KV cache type of V (default: f16; quantized needs flash attention).",
        ),
    ),
]


def _context(ctx_size, batch_size, ubatch_size, flash_attn, cache_type_k, cache_type_v) -> ContextOptions:
    return ContextOptions(
        n_ctx=ctx_size,
        n_batch=batch_size,
        n_ubatch=ubatch_size,
        flash_attn=flash_attn,
        type_k=cache_type_k,
        type_v=cache_type_v,
    )


def _template(ctx, param, value):
    """--chat-template: a built-in name, or a jinja file read here (as (text, file))."""
    from mote_local.engine.model import TEMPLATE_NAMES

    if value is None or value in TEMPLATE_NAMES:
        return value, None
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as err:
        why = "no such file" if isinstance(err, FileNotFoundError) else getattr(err, "strerror", None) or str(err)
        raise click.BadParameter(
            f"{value!r} is neither a built-in template ({', '.join(TEMPLATE_NAMES)}) nor a readable jinja file ({why})",
            ctx,
            param,
        ) from None


_CHAT = [
    (
        "chat_template",
        click.option(
            "--chat-template",
            "chat_template",
            metavar="NAME|FILE",
            default=None,
            callback=_template,
            help="The chat template instead of the model's: a built-in name (chatml, llama2, "
            "llama3, zephyr, gemma, openchat, chatglm3) or a jinja file.",
        ),
    ),
    (
        "system_prompt",
        click.option(
            "--system-prompt",
            "-sys",
            "system_prompt",
            metavar="TEXT",
            default=None,
            help="A system message that opens every conversation.",
        ),
    ),
]


def _chat(chat_template, system_prompt) -> ChatOptions:
    text, origin = chat_template
    return ChatOptions(template=text, template_origin=origin, system_prompt=system_prompt)


_SAMPLING = [
    (
        "temp",
        click.option(
            "--temp",
            "temp",
            type=click.FloatRange(min=0),
            default=0.0,
            show_default=True,
            help="Temperature (0: greedy).",
        ),
    ),
    (
        "top_k",
        click.option(
            "--top-k",
            "top_k",
            type=click.IntRange(min=0),
            default=40,
            show_default=True,
            help="Sample among the K most likely tokens (0: all).",
        ),
    ),
    (
        "top_p",
        click.option(
            "--top-p",
            "top_p",
            type=click.FloatRange(0, 1),
            default=0.95,
            show_default=True,
            help="Sample among the most likely tokens that make up this probability (1: off).",
        ),
    ),
    (
        "min_p",
        click.option(
            "--min-p",
            "min_p",
            type=click.FloatRange(0, 1),
            default=0.05,
            show_default=True,
            help="Drop tokens less likely than this times the most likely one (0: off).",
        ),
    ),
    (
        "repeat_penalty",
        click.option(
            "--repeat-penalty",
            "repeat_penalty",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="Penalise tokens among the last 64 (1: off); applies to greedy too.",
        ),
    ),
    ("seed", click.option("--seed", "seed", type=SAMPLER_SEED, default=0, show_default=True)),
]


def _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed) -> SamplingOptions:
    return SamplingOptions(
        temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed
    )


def _group(declared: list, build):
    """A decorator that adds the declared click parameters and hands the command what ``build(**them)`` returns
    (keyword arguments), in their place."""
    names = [name for name, _ in declared]

    def decorate(callback):
        @functools.wraps(callback)
        def command(*args, **kwargs):
            raw = {name: kwargs.pop(name) for name in names}
            return callback(*args, **build(**raw), **kwargs)

        for _, declare in reversed(declared):
            command = declare(command)
        return command

    return decorate


sampling_options = _group(_SAMPLING, lambda **raw: {"sampling": _sampling(**raw)})


def model_options(*, chat: bool = True):
    """MODEL (or -m / -hf / ollama:NAME), every loading, context and (with ``chat``) chat-template flag: the
    command gets ``model`` (a Path) and ``options`` (ModelOptions)."""
    declared = _SOURCE + _LOAD + _CONTEXT + (_CHAT if chat else [])

    def build(**raw) -> dict:
        model = _resolve_source(raw.pop("model_arg"), raw.pop("model_path"), raw.pop("hf_repo"))
        load = _load(**{k: raw.pop(k) for k, _ in _LOAD})
        context = _context(**{k: raw.pop(k) for k, _ in _CONTEXT})
        chat_options = _chat(**raw) if chat else ChatOptions()
        return {"model": model, "options": ModelOptions(load, context, chat_options)}

    return _group(declared, build)


def _resolve_source(positional: str | None, model_path: str | None, hf_repo: str | None) -> Path:
    given = [g for g in (positional, model_path, hf_repo) if g]
    if len(given) != 1:
        what = "no model" if not given else "more than one model"
        raise click.UsageError(f"{what}: give one of MODEL, -m PATH (or ollama:NAME[:TAG]) and -hf ORG/NAME[:QUANT]")
    if hf_repo:
        from mote_local.modelfile.hub import resolve_hf  # only when asked: it imports huggingface_hub

        return Path(resolve_hf(hf_repo))
    name = given[0]
    if name.startswith(OLLAMA_PREFIX):
        from mote_local.modelfile.hub import resolve_model

        return Path(resolve_model(name))
    return Path(name)


def open_model(model: Path, options: ModelOptions, *, chat: bool = True, capture: bool = False, **model_params):
    """The model loaded with the command's options (with ``capture``, the way fTRI's capture runs fastest); with
    ``chat``, says once when it has no chat template and conversations get ChatML (llama.cpp's fallback)."""
    from mote_local.engine.model import open_model as load
    from mote_local.ftri.capture import open_capture_model

    m = (open_capture_model if capture else load)(model, options, **model_params)
    if chat and m.template_fallback:
        click.echo(
            f"note: {m.path.name} has no chat template: using ChatML, as llama.cpp does (--chat-template "
            "NAME|FILE chooses one, --raw gives plain text)",
            err=True,
        )
    return m


def context_for(layout: MoeLayout, options: ModelOptions) -> int:
    """The context -c asks for (0: the training context); more than the training context warns, in one line."""
    n_ctx, warning = context_size(layout, options.context.n_ctx)
    if warning:
        click.echo(warning, err=True)
    return n_ctx
