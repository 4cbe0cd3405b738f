"""Pure request handling for the transformers engine: prompts -> engine requests, committed
token ids -> text with stop strings, acceptance -> usage. No Ray, no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sd2_ray.serve.images import ImagePolicy, check_image_parts, expand_image_tokens, pixel_values
from sd2_ray.serve.openai_schema import ChatCompletionRequest, CompletionRequest, OpenAIError, SpecUsage
from sd2_ray.specdec.types import GenerationRequest, SamplingParams, SpecStats

REPLACEMENT_CHAR = "\ufffd"  # a byte-level BPE token cut in the middle of a UTF-8 character


@dataclass
class PreparedRequest:
    """A validated request, tokenised and bounded by the context length."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    category: str | None = None  # from the request's metadata; labels its acceptance metrics
    images: tuple = ()  # (3, H, W) pixel values, one per image of the prompt (vision targets)

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids=list(self.prompt_ids), max_new_tokens=self.max_tokens, sampling=self.sampling, images=self.images
        )


def check_model_name(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise OpenAIError(
            f"model '{requested}' does not exist; this server serves '{served}'", param="model", code="model_not_found"
        )


def sampling_params(req: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    return SamplingParams(temperature=float(req.temperature), top_p=float(req.top_p), seed=req.seed)


def bound_max_tokens(prompt_len: int, requested: int | None, max_model_len: int, default: int) -> int:
    """max_tokens within the context; a prompt or request that cannot fit is the client's 400."""
    if prompt_len == 0:
        raise OpenAIError("prompt is empty after tokenization", param="prompt", code="empty_prompt")
    if prompt_len >= max_model_len:
        raise OpenAIError(
            f"prompt is {prompt_len} tokens, longer than the context of {max_model_len} "
            "tokens (it must leave room for at least one new token)",
            param="prompt",
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if requested is None:
        return min(default, room)
    if requested > room:
        raise OpenAIError(
            f"this model's context is {max_model_len} tokens; the prompt has {prompt_len} "
            f"and max_tokens asks for {requested} more ({prompt_len + requested} total)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def prepare_completion(
    req: CompletionRequest, tokenizer, max_model_len: int, vocab_size: int, vision: ImagePolicy | None = None
) -> PreparedRequest:
    """A completion prompt; for a vision target it must hold no image token (no images come with it)."""
    if isinstance(req.prompt, str):
        prompt_ids = list(tokenizer(req.prompt)["input_ids"])
    else:
        prompt_ids = list(req.prompt)
        bad = [t for t in prompt_ids if t >= vocab_size]
        if bad:
            raise OpenAIError(
                f"token id {bad[0]} is outside the vocabulary (size {vocab_size})", param="prompt", code="invalid_value"
            )
    prompt_ids = expand_image_tokens(prompt_ids, 0, vision, param="prompt")
    max_tokens = bound_max_tokens(len(prompt_ids), req.max_tokens, max_model_len, default=16)
    return PreparedRequest(prompt_ids, max_tokens, sampling_params(req), req.stop_strings, req.category)


def render_messages(messages: list[dict[str, str]], tokenizer) -> str:
    """The target's chat template with the generation prompt; plain lines when it has none."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # templates raise on e.g. non-alternating roles: the client's mistake
            raise OpenAIError(
                f"messages cannot be rendered with the model's chat template: {err}",
                param="messages",
                code="invalid_value",
            ) from None
    return "\n".join(m["content"] for m in messages) + "\n"


def prepare_chat(
    req: ChatCompletionRequest,
    tokenizer,
    max_model_len: int,
    default_max_tokens: int,
    vision: ImagePolicy | None = None,
) -> PreparedRequest:
    """A chat request's prompt ids and, for a vision target, its images' pixel values (decoded
    last: the cheap checks and the context bound answer first)."""
    from sd2_ray.models.tokens import encode_rendered

    parts = req.image_parts()
    check_image_parts(parts, vision)
    messages = req.plain_messages(vision.mark) if vision is not None else req.plain_messages()
    # the same ids distillation, fine-tuning and eval give the same conversation
    prompt_ids = encode_rendered(render_messages(messages, tokenizer), tokenizer)
    prompt_ids = expand_image_tokens(prompt_ids, len(parts), vision)
    max_tokens = bound_max_tokens(len(prompt_ids), req.requested_max_tokens, max_model_len, default=default_max_tokens)
    images = pixel_values(parts, vision) if vision is not None else ()
    return PreparedRequest(prompt_ids, max_tokens, sampling_params(req), req.stop_strings, req.category, images)


class TextStream:
    """Incremental detokenisation with stop strings.

    ``feed`` returns only text that can no longer change: a trailing partial UTF-8 character
    and any tail that could still grow into a stop string are held back until more tokens
    arrive (or ``finish``). When a stop string appears, the text is cut before it and
    ``stopped`` turns True, so the caller can tell the engine to stop that request.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, new_ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._release(len(self.text))
        self.text = text
        safe = len(text) - self.hold
        while safe > self.sent and text[safe - 1] == REPLACEMENT_CHAR:
            safe -= 1
        return self._release(safe)

    def finish(self) -> str:
        return self._release(len(self.text))

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self.sent - self.hold)  # a stop string may straddle text already sent
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


def spec_usage(stats: SpecStats) -> SpecUsage:
    return SpecUsage(
        num_speculative_tokens=stats.num_speculative_tokens,
        target_passes=stats.target_passes,
        num_drafts=stats.num_drafts,
        drafted_tokens=stats.num_draft_tokens,
        accepted_tokens=stats.num_accepted_tokens,
        acceptance_rate=round(stats.acceptance_rate, 4),
        mean_accepted_length=round(stats.mean_accepted_length, 4),
    )


def acceptance_log_line(request_id: str, prompt_tokens: int, completion_tokens: int, stats: SpecStats) -> str:
    return (
        f"{request_id}: prompt={prompt_tokens} completion={completion_tokens} "
        f"passes={stats.target_passes} drafted={stats.num_draft_tokens} "
        f"accepted={stats.num_accepted_tokens} MAL={stats.mean_accepted_length:.2f} "
        f"per_position={[round(p, 2) for p in stats.per_position_acceptance()]}"
    )


def context_length(target_config: Any, configured: int | None) -> int:
    """The served context: the configured one, capped by what the target's positions allow."""
    positions = getattr(target_config, "max_position_embeddings", None) or configured or 2048
    return min(configured, positions) if configured else positions
