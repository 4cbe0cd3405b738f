"""OpenAI API request/response models and OpenAI's error shape (pure pydantic, no Ray).

Requests are validated here rather than by FastAPI so that every client mistake becomes a
400 in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` naming the field.
Unknown request fields are ignored (clients send many optional ones), but fields that would
change the answer and are not supported (n > 1, logprobs, echo, tools) are rejected.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from sd2_ray.vision.scenes import IMAGE_PLACEHOLDER


class OpenAIError(Exception):
    """An error the HTTP layer renders as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OpenAIError(f"request body is not valid JSON: {err}", code="invalid_json") from None


def validate_request(model_cls: type[BaseModel], raw: bytes) -> Any:
    """Parse and validate a request body; any problem becomes a 400 naming the field."""
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise OpenAIError("request body must be a JSON object", code="invalid_request")
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param_name(first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise OpenAIError(f"invalid '{param}': {msg}" if param else msg, param=param, code="invalid_value") from None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_name(loc: tuple) -> str | None:
    """``messages.0.content`` from pydantic's location, without its union type tags."""
    parts = [str(p) for p in loc if isinstance(p, int) or ("[" not in p and "-" not in p and p not in _TYPE_TAGS)]
    return ".".join(parts) or None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, gt=0)
    temperature: StrictFloat = Field(1.0, ge=0, le=2)
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None
    # a 64-bit seed, as OpenAI documents it (torch's generators take no more)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    logprobs: Any | None = None
    # OpenAI's request metadata: string pairs; "category" labels the request's acceptance metrics
    metadata: dict[StrictStr, StrictStr] | None = None

    @field_validator("n")
    @classmethod
    def _single_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, value):
        """OpenAI's documented bounds: at most 16 pairs, keys up to 64 and values up to 512 characters."""
        if value and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("at most 16 pairs, keys of at most 64 and values of at most 512 characters")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return None

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    @property
    def category(self) -> str | None:
        """The task category the client named in ``metadata``, if any."""
        return (self.metadata or {}).get("category") or None

    @property
    def include_usage_in_stream(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """POST /v1/completions. One prompt per request: a string or a list of token ids."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt]
    echo: StrictBool = False
    best_of: StrictInt | None = None
    max_tokens: StrictInt | None = Field(16, gt=0)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("send one prompt per request (batches of prompts are not supported)")
            value = value[0]
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and any(t < 0 for t in value):
            raise ValueError("token ids must be >= 0")
        return value

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of > 1 is not supported")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _known_parts(cls, value):
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise ValueError(f"content part {i}: a text part needs a string 'text'")
                elif kind == "image_url":
                    image = part.get("image_url")
                    if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
                        raise ValueError(
                            f'content part {i}: an image_url part needs "image_url": '
                            '{"url": "data:image/<type>;base64,<data>"}'
                        )
                else:
                    raise ValueError(f"content part {i}: type {kind!r} is not supported (text and image_url are)")
        return value

    def text(self, image_mark: str = IMAGE_PLACEHOLDER) -> str:
        """The text, each image part an ``image_mark`` where it stands. A mark followed by more
        content takes a newline after it, as the kit's image rows (``<image>\nQuestion``) do."""
        if not isinstance(self.content, list):
            return self.content or ""
        out = []
        for i, part in enumerate(self.content):
            if part["type"] == "text":
                out.append(part["text"])
            else:
                out.append(image_mark + ("\n" if i + 1 < len(self.content) else ""))
        return "".join(out)

    def image_urls(self) -> list[tuple[int, str]]:
        """(part index, url) of the image parts, in order."""
        if not isinstance(self.content, list):
            return []
        return [(i, p["image_url"]["url"]) for i, p in enumerate(self.content) if p["type"] == "image_url"]


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions, rendered with the target's chat template."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, gt=0)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value):
        if value:
            raise ValueError("tools are not supported")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def plain_messages(self, image_mark: str = IMAGE_PLACEHOLDER) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text(image_mark)} for m in self.messages]

    def image_parts(self) -> list[tuple[str, str]]:
        """(param, url) of every image part, in prompt order; param names it in a 400."""
        return [
            (f"messages.{m}.content.{i}.image_url.url", url)
            for m, message in enumerate(self.messages)
            for i, url in message.image_urls()
        ]


# ---- responses -------------------------------------------------------------------------------


class SpecUsage(BaseModel):
    """Our extension of ``usage``: speculative-decoding acceptance for this request."""

    num_speculative_tokens: int
    target_passes: int
    num_drafts: int
    drafted_tokens: int
    accepted_tokens: int
    acceptance_rate: float
    mean_accepted_length: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    spec_decode: SpecUsage | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sd2-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event carrying a JSON chunk."""
    data = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
