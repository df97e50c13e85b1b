"""Loading a MoE GGUF, steering its experts, capturing its routing, generating text.

    model = Model("model.gguf", n_gpu_layers=99)
    with model.session(n_ctx=1024) as s:
        s.steer([Entry(3, 17, Mode.MASK)])
        print(s.generate("What happened?").text)
        with s.capture() as cap:
            s.logits(model.tokenize("Hello there"))
        print(cap.stats().counts)

A Session is one llama.cpp context: steering and capture belong to it, so two sessions on one
model steer independently. Loading, tokenizing and sampling are llama-cpp-python's, through the
private copy of its bindings that the build vendors (mote_local_engine.llama_cpp).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import ctypes
import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mote_local import binding
from mote_local.binding import llama, llama_chat_format, llama_internals
from mote_local.engine import options, rpc
from mote_local.engine.options import FLASH_ATTN, LOAD_MODES, ModelOptions, require_fit
from mote_local.errors import (
    CaptureError,
    ChatTemplateError,
    EngineError,
    InputError,
    ModelFileError,
    SteeringError,
)
from mote_local.modelfile.fingerprint import Fingerprint
from mote_local.modelfile.layout import MoeLayout, read_layout
from mote_local.steering import rules
from mote_local.steering.entries import Entry, Scope
from mote_local.steering.profile import Profile

# llama.cpp's fallback for a model without a chat template (common/chat.cpp: ChatML)
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
# llama.cpp's built-in template names (llama_chat_apply_template) that llama-cpp-python's formatters also have
BUILTIN_TEMPLATES = {
    "llama2": "format_llama2",
    "llama3": "format_llama3",
    "zephyr": "format_zephyr",
    "gemma": "format_gemma",
    "openchat": "format_openchat",
    "chatglm3": "format_chatglm3",
}
TEMPLATE_NAMES = ("chatml", *BUILTIN_TEMPLATES)
TEMPLATE_FIX = "choose another with --chat-template NAME|FILE (chat_template= in Python), or --raw for plain text"
# gpt-oss's harmony format: the reply's channels
HARMONY_CHANNEL, HARMONY_FINAL = "<|channel|>", "<|channel|>final<|message|>"
HARMONY_ENDS = ("<|return|>", "<|end|>", "<|call|>")
REPEAT_LAST_N = 64  # llama.cpp's --repeat-last-n default


def _apply_params(params, options: dict, what: str) -> None:
    known = {name for name, _ in params._fields_}
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"unknown {what} option {name!r}; llama.cpp's options are: {', '.join(sorted(known))}")
        setattr(params, name, value)


def _tensor_split(values: Sequence[float]) -> ctypes.Array:
    split = [float(v) for v in values]
    if not split or len(split) > llama.LLAMA_MAX_DEVICES or min(split) < 0 or sum(split) <= 0:
        raise InputError(
            f"tensor_split needs 1-{llama.LLAMA_MAX_DEVICES} proportions, none negative and not all "
            f"zero (e.g. 1,1), got {values!r}"
        )
    return (ctypes.c_float * llama.LLAMA_MAX_DEVICES)(*split)


class Model:
    """A GGUF model loaded by the patched engine. Close it (or use `with`) to free its memory."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        rpc_servers: Sequence[str] = (),
        tensor_split: Sequence[float] | None = None,
        tensor_overrides: Sequence[tuple[str, str]] = (),
        mmap: bool = True,
        mlock: bool = False,
        chat_template: str | None = None,
        chat_template_origin: str | None = None,
        system_prompt: str | None = None,
        session_settings: dict | None = None,
        verbose: bool = False,
        **model_params,
    ):
        """n_gpu_layers layers (the last ones; 99: all) go to the GPUs and `rpc_servers` ("HOST:PORT" of
        `mote rpc-server`s, which come first), split in proportion to `tensor_split` (one value per device:
        the servers in order, then local GPUs) or to the devices' free memory. `tensor_overrides` puts the
        tensors whose names match a pattern into a buffer type (llama.cpp's -ot: [("exps", "CPU")], the first
        match wins); `mmap` and `mlock` are llama.cpp's load modes.

        `chat_template` replaces the model's own: a built-in name (TEMPLATE_NAMES) or a jinja template's text
        (`chat_template_origin` names it in errors, e.g. its file); `system_prompt` opens every conversation
        that has no system message. `session_settings` (Session's n_batch, n_ubatch, flash_attn, type_k,
        type_v) apply to every session of the model, over what its caller asks."""
        self.layout: MoeLayout = read_layout(path)  # a clear error for a bad file, before llama.cpp sees it
        self.path = self.layout.path
        self.rpc_servers = rpc.parse_endpoints(rpc_servers)
        if self.rpc_servers and n_gpu_layers == 0:
            raise InputError(
                "rpc servers hold only offloaded layers and n_gpu_layers is 0: pass n_gpu_layers "
                "(-ngl; 99 offloads every layer)"
            )
        params = llama.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        if tensor_split is not None:
            params.tensor_split = _tensor_split(tensor_split)
        params.load_mode = LOAD_MODES[bool(mmap), bool(mlock)]
        # llama.cpp reads the override array and its patterns while loading: both live as long as the model
        self._tensor_overrides = options.buft_overrides(tensor_overrides)
        if self._tensor_overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(self._tensor_overrides[0], ctypes.c_void_p)
        _apply_params(params, model_params, "model")
        if chat_template is not None and not chat_template.strip():
            raise InputError("the chat template is empty: give a template name or a jinja file")
        self._template_override = chat_template
        self._template_origin = chat_template_origin
        self.system_prompt = system_prompt
        self.session_settings = dict(session_settings or {})
        self.verbose = verbose
        binding.set_verbose(verbose)  # llama.cpp's log is process-wide: the last model loaded decides
        self._closed = True  # until loaded
        self._rpc_baseline = rpc.lost_replies(self.rpc_servers)
        devices = rpc.attach(self.rpc_servers)
        if devices is not None:
            params.devices = ctypes.cast(devices, ctypes.c_void_p)
        try:
            self._model = llama_internals.LlamaModel(path_model=str(self.path), params=params, verbose=verbose)
        except ValueError as err:
            rpc.detach(self.rpc_servers)
            raise ModelFileError(
                f"llama.cpp could not load {self.path}: {err} (run with verbose=True to see llama.cpp's reason)"
            ) from None
        self._closed = False
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self.check_servers()
        self.router = binding.router_info(self._model.model)
        self.n_vocab = self._model.n_vocab()
        self.n_threads = n_threads  # the default of its sessions (None: every core)

    # lifetime
    def close(self, *, reason: str = "its model was closed") -> None:
        """Frees the model, after closing its sessions (a context is freed before its model); idempotent."""
        if self._closed:
            return
        self._closed = True  # first: closing a session may read it, which checks the servers again
        for session in list(self._sessions):
            session.close(reason=reason)
        self._model.close()
        rpc.detach(self.rpc_servers)

    def check_servers(self) -> None:
        """Raises EngineError, closing the model, when one of its rpc servers stopped answering (died, or the
        network broke): its layers are gone, and whatever the last call returned is not to be trusted."""
        lost = [] if self._closed else rpc.lost_since(self._rpc_baseline)
        if lost:
            self.close(reason=f"its model was closed when the rpc server {', '.join(lost)} was lost")
            raise EngineError(
                f"lost the connection to the rpc server {', '.join(lost)} (it stopped, or the network "
                f"broke); {self.path.name} is closed: restart `mote rpc-server` there and load the "
                "model again"
            )

    @property
    def closed(self) -> bool:
        return self._closed

    def _require_open(self) -> None:
        if self._closed:
            raise EngineError(f"the model {self.path.name} is closed: load it again with Model(...)")

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # vocabulary
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        self._require_open()
        return self._model.tokenize(text.encode("utf-8"), add_bos, special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The tokens' pieces joined; bytes that are not UTF-8 become U+FFFD."""
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """One token's piece as llama.cpp renders it: raw bytes, since a character may span tokens."""
        self._require_open()
        size = 64  # llama-cpp-python's own helper cuts pieces at 32 bytes; real vocabularies have longer ones
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama.llama_token_to_piece(self._model.vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    @functools.cached_property
    def fingerprint(self) -> Fingerprint:
        """What a profile made for this model records (computed once)."""
        return Fingerprint.of_layout(self.layout)

    @property
    def bos_token(self) -> int:
        return llama.llama_vocab_bos(self._model.vocab)

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self._model.vocab, token))

    @property
    def metadata(self) -> dict[str, str]:
        return self._model.metadata()

    @functools.cached_property
    def head_widths(self) -> tuple[int, int]:
        """The width of one attention head's K and V (what a quantized cache's blocks must divide)."""
        meta, arch = self.metadata, self.layout.arch
        heads = int(meta.get(f"{arch}.attention.head_count", 0) or 0)
        default = int(meta.get(f"{arch}.embedding_length", 0) or 0) // heads if heads else 0
        return tuple(
            int(meta.get(f"{arch}.attention.{kind}_length", default) or default)  # type: ignore[return-value]
            for kind in ("key", "value")
        )

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (tokenizer.chat_template), or None."""
        return self.metadata.get("tokenizer.chat_template")

    @property
    def template_fallback(self) -> bool:
        """Whether conversations get ChatML because the model has no template and none was given (llama.cpp's
        fallback; the CLI says so once)."""
        return self._template_override is None and not self.chat_template

    @functools.cached_property
    def _formatter(self) -> tuple[str, Callable[[list[dict]], str]]:
        """(the template as errors name it, messages -> the prompt text ready for the assistant's turn)."""
        given = self._template_override
        if given in BUILTIN_TEMPLATES:
            render = getattr(llama_chat_format, BUILTIN_TEMPLATES[given])
            return f"the built-in template {given}", lambda messages: render(messages=messages).prompt
        if given == "chatml":
            name, source = "the built-in template chatml", CHATML
        elif given is not None:
            name, source = f"the chat template {self._template_origin or '(--chat-template)'}", given
        elif self.chat_template:
            name, source = f"the chat template of {self.path.name}", self.chat_template
        else:
            name, source = f"ChatML (the fallback: {self.path.name} has no chat template)", CHATML
        try:
            formatter = llama_chat_format.Jinja2ChatFormatter(
                template=source,
                eos_token=self._token_text(llama.llama_vocab_eos(self._model.vocab)),
                bos_token=self._token_text(self.bos_token),
                add_generation_prompt=True,
            )
        except Exception as err:  # a template is code from the file: any failure is its own
            raise ChatTemplateError(f"{name} cannot be read ({_one_line(err)}); {TEMPLATE_FIX}") from None
        return name, lambda messages: formatter(messages=messages).prompt

    def format_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The conversation in the chat template (the one given, else the model's own, else ChatML as llama.cpp
        falls back), ready for the assistant's turn. A template that fails raises ChatTemplateError naming it,
        why, and the way out."""
        name, render = self._formatter
        try:
            return render(self._with_system(messages))
        except Exception as err:  # raise_exception(), an unknown filter, a type error inside the template, …
            raise ChatTemplateError(f"{name} failed on this conversation ({_one_line(err)}); {TEMPLATE_FIX}") from None

    def prompt_text(self, conversation: str | Sequence[dict[str, str]], *, chat: bool = True) -> str:
        """The text a conversation (one user message as text, or messages) becomes: through the chat template
        with ``chat`` (format_chat), else the messages' plain text (one per line)."""
        messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
        return self.format_chat(messages) if chat else _plain_text(self._with_system(messages))

    def prompt_tokens(self, conversation: str | Sequence[dict[str, str]], *, chat: bool = True) -> list[int]:
        """What the model is given for a conversation, ready for the assistant's turn: the one path from a
        conversation to tokens, which every command takes.

        The text of prompt_text, tokenized with a BOS token where the vocabulary asks for one
        (tokenizer.ggml.add_bos_token) unless the text starts with it already, as templates that write
        ``{{ bos_token }}`` do.
        """
        text = self.prompt_text(conversation, chat=chat)
        bos = self._token_text(self.bos_token)
        return self.tokenize(text, add_bos=not (bos and text.startswith(bos)))

    def reply_message(self, reply: str) -> dict[str, str]:
        """The assistant's reply as the conversation keeps it for the next turn, by its template's rules: a
        harmony (gpt-oss) reply keeps its final channel's content, the analysis channel is dropped (gpt-oss's
        template refuses channel tokens in earlier turns' content)."""
        if HARMONY_CHANNEL in reply:
            _, final, content = reply.rpartition(HARMONY_FINAL)
            content = content if final else ""  # cut short while thinking: nothing final to keep
            for end in HARMONY_ENDS:
                content = content.split(end)[0]
            reply = content
        return {"role": "assistant", "content": reply}

    def _with_system(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        messages = list(messages)
        if self.system_prompt and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _token_text(self, token: int) -> str:
        return self._model.token_get_text(token) if token >= 0 else ""

    @functools.cached_property
    def think_markers(self) -> ThinkMarkers | None:
        """What opens and closes a thinking span, in tokens: gpt-oss's analysis channel where the chat
        template speaks harmony, else <think> … </think>; None when those markers are not single tokens."""
        harmony = "<|channel|>" in (self.chat_template or "")
        specials = ("<|channel|>", "<|message|>", "<|end|>") if harmony else ("<think>", "</think>")
        if any(len(self.tokenize(s, add_bos=False)) != 1 for s in specials):
            return None
        opener = self.tokenize("<|channel|>analysis<|message|>" if harmony else "<think>", add_bos=False)
        return ThinkMarkers(tuple(opener), self.tokenize(specials[-1], add_bos=False)[0])

    def phase_tracker(self, prompt: Sequence[int] = ()) -> PhaseTracker:
        """Follows a generation from this prompt on, token by token, to the steering phase of each decode."""
        return PhaseTracker(self.think_markers, prompt)

    def session(self, **ctx_params) -> Session:
        self._require_open()
        return Session(self, **ctx_params)

    @functools.cached_property
    def routers(self) -> tuple[LayerRouter, ...]:
        """What the engine's graph does in each layer (built once in a small context and asked, not guessed
        from GGUF keys): layers whose graph never calls the router have n_calls == 0."""
        self._require_open()
        with self.session(n_ctx=64, n_batch=32, n_threads=1) as probe:
            return tuple(LayerRouter.of(binding.layer_router(probe._ctx_ptr, il)) for il in range(self.router.n_layer))


@contextlib.contextmanager
def opened(model: Model | str | os.PathLike, **options) -> Iterator[Model]:
    """The model itself when it is loaded (left open), else the file loaded with ``options`` and closed after."""
    if isinstance(model, Model):
        yield model
        return
    with Model(model, **options) as m:
        yield m


def open_model(path: str | os.PathLike, model_options: ModelOptions | None = None, **model_params) -> Model:
    """The model at ``path`` loaded with a command's options (mote_local.engine.options): placement, memory,
    chat template and system prompt, and the context settings its sessions open with."""
    o = model_options or ModelOptions()
    return Model(
        path,
        **o.load.model_kwargs(),
        **o.chat.model_kwargs(),
        session_settings=o.context.session_settings(),
        **model_params,
    )


# llama.cpp's llama_expert_gating_func_type
GATING_NAMES = {0: "none", 1: "softmax", 2: "sigmoid", 3: "softmax over the selected logits", 4: "sqrt-softplus"}


@dataclass(frozen=True)
class LayerRouter:
    """One layer's router as the engine's graph runs it."""

    n_calls: int  # router calls in the layer (0: the layer routes nothing)
    n_expert: int
    n_expert_used: int
    gating: str  # GATING_NAMES
    norm_w: bool  # selected weights normalised to sum 1
    w_scale: float  # factor on the weights (1.0: none)
    selection_bias: bool  # a per-expert selection bias (exp_probs_b) is added before top-k

    @classmethod
    def of(cls, r) -> LayerRouter:
        return cls(
            r.n_calls,
            r.n_expert,
            r.n_expert_used,
            GATING_NAMES.get(r.gating, f"type {r.gating}"),
            bool(r.norm_w),
            r.w_scale if r.w_scale != 0.0 else 1.0,
            bool(r.selection_bias),
        )


def _plain_text(messages: Sequence[dict[str, str]]) -> str:
    """A conversation without a template: the messages' text, one per line (a single prompt stays as it is)."""
    return "\n".join(m["content"] for m in messages)


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass(frozen=True)
class ThinkMarkers:
    """The tokens that open a thinking span and the one token that closes it."""

    opener: tuple[int, ...]
    closer: int

    def tracker(self, prompt: Sequence[int] = ()) -> ThinkTracker:
        """A tracker that has seen the prompt: a template that opens the reply with the opener (DeepSeek-R1's
        ``<think>``) starts the generation inside the span."""
        tracker = ThinkTracker(self)
        for token in prompt:
            tracker.feed(token)
        return tracker


class ThinkTracker:
    """Follows a token stream through thinking spans; ``inside`` says whether the tokens fed so far end inside
    one (after the opener's last token, up to the closer): the tokens fed while it is True and that leave it
    True lie strictly between the markers."""

    def __init__(self, markers: ThinkMarkers):
        self.markers = markers
        self.inside = False
        self._recent: collections.deque[int] = collections.deque(maxlen=len(markers.opener))

    def feed(self, token: int) -> None:
        if self.inside:
            self.inside = token != self.markers.closer
            return
        self._recent.append(token)
        if tuple(self._recent) == self.markers.opener:
            self.inside = True
            self._recent.clear()


class PhaseTracker:
    """The steering phase of each decode of a generation: thinking while the tokens are inside the model's
    thinking markers (from the prompt on, where the template opens the span), else decode."""

    def __init__(self, markers: ThinkMarkers | None, prompt: Sequence[int] = ()):
        self._thinking = markers.tracker(prompt) if markers is not None else None

    def after(self, token: int) -> Scope:
        """The phase of the decode that reads ``token``, the generation's next."""
        if self._thinking is None:
            return Scope.DECODE
        self._thinking.feed(token)
        return Scope.THINKING if self._thinking.inside else Scope.DECODE


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    interrupted: bool = False


@dataclass
class RoutingStats:
    """Routing accumulated for one label: per (layer, expert) selections and weight sums."""

    counts: np.ndarray  # int64 [n_layer, n_expert]
    weight_sums: np.ndarray  # float64 [n_layer, n_expert]
    prob_sums: np.ndarray | None  # float64 [n_layer, n_expert], with probs=True
    tokens: np.ndarray  # int64 [n_layer]: tokens counted in each layer
    moe_layers: tuple[int, ...]
    # float64 [n_layer, n_expert], with output_norms=True: sum over routed tokens of the final gate weight x the
    # L2 norm of the expert's output before weighting (the REAP / EASY-EP family's output-aware quantity)
    output_norm_sums: np.ndarray | None = None


@dataclass
class RoutingTrace:
    """One row per (token, MoE layer) counted."""

    label: np.ndarray
    seq_id: np.ndarray
    pos: np.ndarray
    layer: np.ndarray
    ids: np.ndarray  # [rows, n_expert_used]
    weights: np.ndarray  # [rows, n_expert_used]
    probs: np.ndarray | None  # [rows, n_expert]


class Capture:
    """Routing capture on a session; results stay readable after the `with` block ends."""

    def __init__(self, session: Session, probs: bool, trace: bool, output_norms: bool = False):
        self._session = session
        self.probs = probs
        self.output_norms = output_norms
        self.trace_enabled = trace
        self.active = False
        self._stats: dict[int, RoutingStats] = {}
        self._trace: RoutingTrace | None = None

    def bind(self, seq_id: int, label: int, pos_begin: int = 0, pos_end: int | None = None) -> None:
        """Counts tokens of sequence seq_id at positions [pos_begin, pos_end) under label."""
        self._require_active()
        with self._session._exclusive():
            binding.capture_bind(self._session._ctx_ptr, seq_id, label, pos_begin, -1 if pos_end is None else pos_end)

    def unbind_all(self) -> None:
        self._require_active()
        with self._session._exclusive():
            binding.capture_unbind_all(self._session._ctx_ptr)

    def reset(self) -> None:
        """Forgets what was counted so far; bindings stay."""
        self._require_active()
        with self._session._exclusive():
            binding.capture_reset(self._session._ctx_ptr)

    @property
    def labels(self) -> list[int]:
        if not self.active:
            return sorted(self._stats)
        with self._session._exclusive():
            return binding.capture_labels(self._session._ctx_ptr)

    def stats(self, label: int = 0) -> RoutingStats:
        if not self.active:
            if label not in self._stats:
                raise CaptureError(f"no routing was captured for label {label}")
            return self._stats[label]
        router = self._session.model.router
        with self._session._exclusive():
            counts, weights, probs, norms, tokens = binding.capture_read(
                self._session._ctx_ptr, label, router.n_layer, router.n_expert, self.probs, self.output_norms
            )
        return RoutingStats(counts, weights, probs, tokens, self._session.model.layout.moe_layers, norms)

    def trace(self) -> RoutingTrace:
        if not self.trace_enabled:
            raise CaptureError("this capture keeps no trace: start it with trace=True")
        if not self.active:
            assert self._trace is not None
            return self._trace
        router = self._session.model.router
        with self._session._exclusive():
            meta, ids, weights, probs = binding.capture_trace(
                self._session._ctx_ptr, router.n_expert_used, router.n_expert, self.probs
            )
        return RoutingTrace(meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3], ids, weights, probs)

    def _require_active(self) -> None:
        if not self.active:
            raise CaptureError("this capture has ended: start a new one with session.capture()")

    def _finish(self) -> None:
        """Snapshots the results, then stops the engine's capture."""
        self._stats = {label: self.stats(label) for label in self.labels}
        self._trace = self.trace() if self.trace_enabled else None
        self.active = False
        binding.capture_stop(self._session._ctx_ptr)


def _serialised(method):
    """A Session method that uses the engine: serialised with every other call on the session (a session is
    safe to share across threads), and refused once the session or its model is closed."""

    @functools.wraps(method)
    def wrapper(self: Session, *args, **kwargs):
        with self._exclusive():
            return method(self, *args, **kwargs)

    return wrapper


class Session:
    """One llama.cpp context on a model, with its own steering and routing capture."""

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_seq_max: int = 1,
        n_threads: int | None = None,
        flash_attn: str = "auto",
        **ctx_params,
    ):
        """The model's session_settings (what its user chose: -b, -ub, -fa, -ctk, -ctv) win over the caller's;
        type_k / type_v are ggml types (options.KV_CACHE_TYPES)."""
        chosen = model.session_settings
        n_batch, n_ubatch = chosen.get("n_batch", n_batch), chosen.get("n_ubatch", n_ubatch)
        flash_attn = chosen.get("flash_attn", flash_attn)
        ctx_params = {**ctx_params, **{k: chosen[k] for k in ("type_k", "type_v") if k in chosen}}
        if flash_attn not in FLASH_ATTN:
            raise InputError(f"flash_attn must be one of {', '.join(FLASH_ATTN)}, got {flash_attn!r}")
        options.check_cache_types(
            ctx_params.get("type_k"), ctx_params.get("type_v"), *model.head_widths, model.path.name
        )
        self.model = model
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch or min(n_batch, 512)
        params.n_seq_max = n_seq_max
        if n_seq_max > n_batch:  # llama.cpp's output buffer holds a row per sequence: sized to n_batch, it aborts
            params.n_outputs_max = n_seq_max
        threads = n_threads or model.n_threads or max(1, os.cpu_count() or 1)
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        params.no_perf = True
        _apply_params(params, ctx_params, "context")
        try:
            self._ctx = llama_internals.LlamaContext(model=model._model, params=params, verbose=model.verbose)
        except ValueError as err:
            raise EngineError(
                f"llama.cpp could not create a context ({err}); try a smaller context size "
                f"({options.CONTEXT_FLAG}; n_ctx in Python), or see llama.cpp's reason with "
                "--verbose"
            ) from None
        self._ctx_ptr = self._ctx.ctx
        model.check_servers()
        self._lock = threading.RLock()
        self._closed_because: str | None = None
        model._sessions.add(self)
        # llama.cpp may adjust what was asked for (e.g. n_batch is capped by n_ctx)
        self.n_ctx = self._ctx.n_ctx()
        self.n_batch = llama.llama_n_batch(self._ctx_ptr)
        self.n_ubatch = llama.llama_n_ubatch(self._ctx_ptr)
        self.n_seq_max = llama.llama_n_seq_max(self._ctx_ptr)
        self._profile = Profile()
        self._seq_profiles: dict[int, Profile] = {}
        self._phase = Scope.PREFILL
        self._capture: Capture | None = None

    def close(self, *, reason: str = "it was closed") -> None:
        """Frees the context (idempotent); every later call raises an error that says why."""
        with self._lock:
            if self._closed_because is not None:
                return
            if self._capture is not None and self._capture.active:
                self._capture._finish()
            self._closed_because = reason
            self._ctx.close()
            self._ctx_ptr = None

    @property
    def closed(self) -> bool:
        return self._closed_because is not None

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            if self._closed_because is not None:
                raise EngineError(
                    f"this session cannot be used: {self._closed_because}; open a new one with model.session()"
                )
            try:
                yield
            finally:
                if self.model.rpc_servers:
                    self.model.check_servers()  # its error replaces one that the lost server caused

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # steering
    @_serialised
    def steer(
        self,
        steering: Profile | Iterable[Entry],
        strength: float | None = None,
        *,
        force: bool = False,
        seq_id: int | None = None,
    ) -> None:
        """Replaces this session's steering; on error the previous steering stays in place.

        Takes a Profile or entries (with `strength`, default 1). Entries scoped to a phase
        (prefill, decode, thinking) are switched on and off between decode calls. A profile made
        for another model (its fingerprint differs) is refused unless `force`.
        """
        profile = steering if isinstance(steering, Profile) else Profile(tuple(steering))
        if not force:
            profile.check_fits(self.model.fingerprint, self.model.path.name, way_out="pass force=True")
        if strength is not None:
            profile = Profile(profile.entries, float(strength), profile.fingerprint, profile.name)
        self.model.layout.require_moe()
        # the engine checks every phase against what its graph routes, and keeps the old steering on error
        native = [e.native() for e in profile.entries]
        if seq_id is not None:
            self._check_seq_id(seq_id)
        with rules.naming_model(self.model.path.name):
            if seq_id is None:
                binding.steer_set(self._ctx_ptr, native, profile.strength)
            else:
                binding.steer_set_seq(self._ctx_ptr, seq_id, native, profile.strength)
        if seq_id is None:
            self._profile = profile
        elif profile.entries:
            self._seq_profiles[seq_id] = profile
        else:
            self._seq_profiles.pop(seq_id, None)

    @_serialised
    def clear_steering(self, seq_id: int | None = None) -> None:
        """Clears the context's steering and every sequence's; with seq_id, only that sequence's own."""
        if seq_id is None:
            binding.steer_clear(self._ctx_ptr)
            self._profile = Profile()
            self._seq_profiles.clear()
        elif self._seq_profiles.pop(seq_id, None) is not None:
            binding.steer_set_seq(self._ctx_ptr, seq_id, [], 1.0)

    def steering_of(self, seq_id: int) -> Profile:
        """The steering a sequence's tokens get: its own, or the context's."""
        return self._seq_profiles.get(seq_id, self._profile)

    def set_phase(self, phase: Scope | str, seq_id: int | None = None) -> None:
        """Which scoped entries apply from the next decode (generate() switches them itself); with seq_id,
        for that sequence's own steering only (a server decoding prompts and replies in one batch)."""
        phase = Scope(phase)
        if phase is Scope.ALL:
            raise SteeringError("a phase is prefill, decode or thinking")
        with self._exclusive():
            if seq_id is None:
                self._set_phase(phase)
            elif seq_id in self._seq_profiles:
                binding.steer_phase(self._ctx_ptr, binding.SCOPE_CODES[phase.value], seq_id)

    def _check_seq_id(self, seq_id: int) -> None:
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or not 0 <= seq_id < self.n_seq_max:
            raise InputError(f"sequence id {seq_id!r} is out of range: this session has n_seq_max={self.n_seq_max}")

    def _set_phase(self, phase: Scope) -> None:
        """Selects which scoped entries the engine applies from the next decode."""
        if phase is not self._phase:
            binding.steer_phase(self._ctx_ptr, binding.SCOPE_CODES[phase.value])
            self._phase = phase

    @property
    def steering(self) -> Profile:
        return self._profile

    # capture
    @contextlib.contextmanager
    def capture(
        self, *, probs: bool = False, trace: bool = False, output_norms: bool = False, label: int | None = 0
    ) -> Iterator[Capture]:
        """Captures routing inside the block. Sequence 0 counts under `label` unless label is None.
        output_norms also sums, per expert, gate weight x the L2 norm of its output (RoutingStats.output_norm_sums)."""
        with self._exclusive():
            if self._capture is not None and self._capture.active:
                raise CaptureError("a capture is already running on this session")
            self.model.layout.require_moe()
            flags = (
                (binding.CAPTURE_PROBS if probs else 0)
                | (binding.CAPTURE_TRACE if trace else 0)
                | (binding.CAPTURE_OUTPUT_NORMS if output_norms else 0)
            )
            with rules.naming_model(self.model.path.name):
                binding.capture_start(self._ctx_ptr, flags)
            cap = self._capture = Capture(self, probs, trace, output_norms)
            cap.active = True
        try:
            if label is not None:
                cap.bind(0, label)
            yield cap
        finally:
            with self._lock:
                if cap.active and not self.closed:
                    cap._finish()

    @property
    def capturing(self) -> bool:
        return self._capture is not None and self._capture.active

    # evaluation
    @_serialised
    def reset(self) -> None:
        """Forgets the context's memory (KV cache) of all sequences."""
        llama.llama_memory_clear(self._ctx.memory, True)

    @_serialised
    def forget(self, seq_id: int) -> None:
        """Forgets one sequence's memory (KV cache), the others' stays (a server freeing a slot)."""
        self._check_seq_id(seq_id)
        llama.llama_memory_seq_rm(self._ctx.memory, seq_id, -1, -1)

    @_serialised
    def decode(
        self, sequences: Sequence[tuple[int, Sequence[int], int]], *, outputs: str = "all", keep_logits: bool = True
    ) -> np.ndarray | None:
        """Decodes (seq_id, tokens, first position) sequences together, in chunks of n_batch tokens.

        outputs="all" returns logits for every token; "last" only for each sequence's last token (while
        capturing, every token is still an output of the engine, since the last layer routes only outputs,
        and the rows asked for are returned). Returns [n_outputs, n_vocab]; with keep_logits=False nothing is
        copied out and None is returned (routing only: memory then does not grow with the vocabulary or the
        number of tokens).
        """
        if outputs not in ("all", "last"):
            raise InputError(f"outputs is 'all' or 'last', got {outputs!r}")
        every = outputs == "all" or self.capturing
        flat: list[tuple[int, int, int, bool]] = []  # (token, pos, seq_id, output)
        wanted: list[bool] = []  # per output row: whether the caller asked for it
        for seq_id, tokens, pos0 in sequences:
            if not 0 <= seq_id < self.n_seq_max:
                raise InputError(f"sequence id {seq_id} is out of range: this session has n_seq_max={self.n_seq_max}")
            require_fit(pos0 + len(tokens), self.n_ctx, f"sequence {seq_id}")
            for i, t in enumerate(tokens):
                if not 0 <= int(t) < self.model.n_vocab:
                    raise InputError(f"token id {t} is out of range for a vocabulary of {self.model.n_vocab}")
                last = i == len(tokens) - 1
                flat.append((int(t), pos0 + i, seq_id, every or last))
                if every or last:
                    wanted.append(outputs == "all" or last)
        if not flat:
            raise InputError("nothing to decode: no tokens given")
        logits = []
        batch = llama_internals.LlamaBatch(
            n_tokens=min(len(flat), self.n_batch), embd=0, n_seq_max=self.n_seq_max, verbose=False
        )
        try:
            for start in range(0, len(flat), self.n_batch):
                chunk = flat[start : start + self.n_batch]
                b = batch.batch
                b.n_tokens = len(chunk)
                for j, (tok, pos, seq_id, out) in enumerate(chunk):
                    b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, out
                    b.seq_id[j][0] = seq_id
                rc = llama.llama_decode(self._ctx_ptr, b)
                if rc != 0:
                    raise EngineError(f"llama_decode failed (code {rc}); see llama.cpp's log with verbose=True")
                n_out = sum(1 for c in chunk if c[3])
                if n_out and keep_logits:
                    ptr = llama.llama_get_logits(self._ctx_ptr)
                    logits.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.model.n_vocab)).copy())
        finally:
            batch.close()
        if not keep_logits:
            return None
        if not logits:
            return np.zeros((0, self.model.n_vocab), dtype=np.float32)
        rows = np.concatenate(logits)
        return rows if all(wanted) else rows[np.asarray(wanted)]

    def _check_sequence_count(self, n: int) -> None:
        if n > self.n_seq_max:
            raise InputError(
                f"{n} sequences but this session has n_seq_max={self.n_seq_max}: "
                "open the session with a larger n_seq_max"
            )

    @_serialised
    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Next-token logits [len(tokens), n_vocab] for every position of one fresh sequence (prefill)."""
        self._set_phase(Scope.PREFILL)
        self.reset()
        return self.decode([(0, tokens, 0)])

    @_serialised
    def route(self, sequences: Sequence[Sequence[int]], *, keep_logits: bool = True) -> np.ndarray | None:
        """Decodes several fresh sequences (ids 0..n-1) in one batch, every token an output; keep_logits=False
        routes without copying any logits out (what fTRI's prompt scope needs)."""
        self._check_sequence_count(len(sequences))
        self._set_phase(Scope.PREFILL)
        self.reset()
        return self.decode([(i, seq, 0) for i, seq in enumerate(sequences)], keep_logits=keep_logits)

    @_serialised
    def generate_batch(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int = 32,
        on_token: Callable[[int, int, int], None] | None = None,
    ) -> list[Generation]:
        """Greedy continuations of several fresh sequences (ids 0..n-1) decoded together: one decode
        call per step for every sequence still generating.

        on_token(seq_id, token, pos) is called for each generated token before it is decoded (so a
        capture binding changed there applies to that token). Every generated token is decoded, as
        in generate(). Several sequences in one batch change llama.cpp's float accumulation order, so
        a continuation may part from generate()'s where two logits nearly tie. Decode-scoped steering
        applies while generating; thinking-scoped entries are not switched per sequence. Ctrl-C
        returns what was generated so far, each Generation marked interrupted.
        """
        prompts = [list(p) for p in prompts]
        if not prompts or not all(prompts):
            raise InputError("generate_batch needs one or more non-empty prompts")
        self._check_sequence_count(len(prompts))
        out: list[list[int]] = [[] for _ in prompts]
        pos = [len(p) for p in prompts]
        interrupted = False
        try:
            self._set_phase(Scope.PREFILL)
            self.reset()
            logits = self.decode([(i, p, 0) for i, p in enumerate(prompts)], outputs="last")
            live = list(range(len(prompts)))
            self._set_phase(Scope.DECODE)
            for _ in range(max_tokens):
                feed = []
                for i, token in zip(live, np.argmax(logits, axis=1).tolist()):
                    if self.model.is_eog(token) or pos[i] >= self.n_ctx:
                        continue
                    out[i].append(token)
                    if on_token is not None:
                        on_token(i, token, pos[i])
                    feed.append((i, [token], pos[i]))
                    pos[i] += 1
                if not feed:
                    break
                logits = self.decode(feed, outputs="last")
                live = [i for i, _, _ in feed]
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self._set_phase(Scope.PREFILL)
        return [Generation(self.model.detokenize(o), o, list(p), interrupted) for o, p in zip(out, prompts)]

    @_serialised
    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        seed: int = 0,
        add_bos: bool = True,
        on_token: Callable[[str], None] | None = None,
    ) -> Generation:
        """Greedy (temperature 0) or seeded sampled continuation of a fresh sequence, through llama.cpp's
        sampler chain in its order: repeat penalty (over the last 64 tokens, the prompt's included; 1: off),
        then greedy, or top-k (0: off), top-p, min-p (0: off), temperature and a seeded draw.

        on_token receives the generated text as it comes (streaming), in whole characters: a character
        whose bytes span tokens arrives once complete. Thinking-scoped steering applies while the tokens
        are inside the model's thinking markers (from the prompt on, where the template opens the span).
        A KeyboardInterrupt stops generation and returns what was generated so far, with `interrupted` set.
        """
        prompt_tokens = self.model.tokenize(prompt, add_bos=add_bos) if isinstance(prompt, str) else list(prompt)
        if not prompt_tokens:
            raise InputError("the prompt is empty")
        sampler = llama_internals.LlamaSampler()
        if repeat_penalty != 1.0:
            sampler.add_penalties(self.model.n_vocab, REPEAT_LAST_N, repeat_penalty, 0.0, 0.0)
            for token in prompt_tokens:
                sampler.accept(token)
        if temperature <= 0:
            sampler.add_greedy()
        else:
            if top_k > 0:
                sampler.add_top_k(top_k)
            sampler.add_top_p(top_p, 1)
            if min_p > 0:
                sampler.add_min_p(min_p, 1)
            sampler.add_temp(temperature)
            sampler.add_dist(seed)
        self.reset()
        out: list[int] = []
        interrupted = False
        phases = self.model.phase_tracker(prompt_tokens)
        text = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            self._set_phase(Scope.PREFILL)
            self.decode([(0, prompt_tokens, 0)], outputs="last")
            pos = len(prompt_tokens)
            for _ in range(max_tokens):
                token = sampler.sample(self._ctx, -1)
                sampler.accept(token)
                if self.model.is_eog(token):
                    break
                out.append(token)
                if on_token is not None and (piece := text.decode(self.model.token_bytes(token))):
                    on_token(piece)
                if pos >= self.n_ctx:
                    break
                self._set_phase(phases.after(token))
                self.decode([(0, [token], pos)])
                pos += 1
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sampler.close()
            self._set_phase(Scope.PREFILL)
        if on_token is not None and (rest := text.decode(b"", final=True)):
            on_token(rest)  # an incomplete character at the end, as U+FFFD
        return Generation(self.model.detokenize(out), out, prompt_tokens, interrupted)
