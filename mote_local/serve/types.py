"""Request and response bodies of `mote serve`, as pydantic models mirroring OpenAI's schema.

Requests are strict: a field OpenAI does not define and mote-local does not add is an error (HTTP 400), and a
field OpenAI defines but this server cannot honour (``n`` > 1, ``logprobs``, ``tools``, …) is an error when
set to anything but its default — never silently ignored.

Fields mote-local adds to OpenAI's (the openai client sends them through ``extra_body``):

``steering``
    ``{"profile": NAME | {profile JSON}, "entries": ["drop 12:17", "bias 3:4=-2", {...}], "strength": S,
    "scope": "all" | "prefill" | "decode" | "thinking", "force": false}``. ``profile`` names a profile the
    server loaded (``GET /v1/profiles``) or is a profile in mote-local's JSON format; ``entries`` are the CLI's
    flags (``off``, ``drop``, ``force`` take ``L:E[,L:E…]``, ``bias`` and ``gain`` take ``L:E=V[,…]``) or
    profile-format entry objects (``{"layer": 1, "expert": 6, "mode": "drop"}``); ``scope`` applies to the text
    entries, as the CLI's ``--scope`` does to its flags; ``strength`` overrides the composed profile's;
    ``force`` applies a profile made for another model, as the CLI's ``--force-profile``. Everything is
    composed as ``mote run`` composes ``--profile`` files and flags.
``return_routing``
    ``true`` adds ``routing`` to the response: per MoE layer, how often each expert was selected and its summed
    weight, over this request's own tokens (prompt and completion).
``routing_detail``
    ``"counts"`` (default) or ``"tokens"``: also the selected expert ids and weights of every token.
``top_k``
    llama.cpp's top-k sampling (0: off), as llama-server accepts it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionRequest",
    "ErrorBody",
    "Routing",
    "SteeringRequest",
    "Usage",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------------ requests

class SteeringRequest(_Strict):
    profile: str | dict[str, Any] | None = None
    entries: list[str | dict[str, Any]] = Field(default_factory=list, max_length=4096)
    strength: float | None = None
    scope: Literal["all", "prefill", "decode", "thinking"] | None = None
    force: bool = False


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class _Sampling(_Strict):
    """What chat and text completions share: OpenAI's sampling fields and mote-local's additions."""

    model: str | None = None  # one model is served; any name reaches it (as llama-server does)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=2**31 - 1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    steering: SteeringRequest | None = None
    return_routing: bool = False
    routing_detail: Literal["counts", "tokens"] = "counts"


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None  # what the openai client echoes back in an assistant turn (null)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    logprobs: Literal[False] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    # a text, one text in a list, or token ids; several prompts per request are not supported
    prompt: str | list[str] | list[int]
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    logprobs: None = None
    suffix: None = None


# ------------------------------------------------------------------------------------------------ responses

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Routing(BaseModel):
    """The routing of one request's own tokens (``return_routing``)."""

    layers: list[int]                  # the MoE layers, in the order of the rows below
    n_expert: int
    n_expert_used: int
    tokens: list[int]                  # tokens counted in each layer (prompt + processed completion tokens)
    counts: list[list[int]]            # [layer][expert]: times the expert was selected
    weight_sums: list[list[float]]     # [layer][expert]: its summed final weight
    # with routing_detail "tokens": one row per token, by position
    positions: list[int] | None = None
    experts: list[list[list[int]]] | None = None    # [token][layer][k] selected expert ids
    weights: list[list[list[float]]] | None = None  # [token][layer][k] their final weights


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _Choice(BaseModel):
    index: int = 0
    finish_reason: str | None = None
    logprobs: None = None


class ChatChoice(_Choice):
    message: AssistantMessage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: Delta


class CompletionChoice(_Choice):
    text: str


class _Reply(BaseModel):
    """What every completion object carries; ``routing`` only with ``return_routing`` (in a stream: the last
    chunk), ``usage`` always except in a stream's content chunks."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    routing: Routing | None = None


class ChatCompletion(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(_Reply):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class Completion(_Reply):
    """A text completion; OpenAI streams text completions as objects of the same shape."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
