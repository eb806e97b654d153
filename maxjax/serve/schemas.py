"""The OpenAI request bodies as pydantic models, and the shapes of what we send back.

A request body goes through three gates, each of which answers 400 with an OpenAI error object naming the field:

1. `json.loads` (app.py): malformed JSON, NaN/Infinity literals, a body that is not an object.
2. `ChatCompletionRequest` / `CompletionRequest.model_validate`: types and ranges, field by field. Models are
   `strict` (no "0.5" for 0.5, no `true` for 1) and `extra="forbid"`: an unknown top-level field is a 400, as on
   OpenAI's own API and MAX (the policy is written out in app.py's docstring). `ValidationError`s become an
   `ApiError` through `errors.validation_error`.
3. `.check(vocab_size)`: rules that span fields or need the tokenizer (logit_bias ids, stop_token_ids, token-id
   prompts, `stream_options` without `stream`, tools), raising `ApiError` directly.

Responses are plain dicts typed with `TypedDict`s below: they are built per token while streaming, so they skip
pydantic on the way out. Their shapes are checked end to end by the `openai` client in strict mode (tests).

(Past the package's usual 400 lines because every field of both endpoints is declared here, next to the rule
it is checked by; the response shapes are the part to move out if it grows further.)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from maxjax.serve.errors import ApiError, validation_error
from maxjax.serve.images import ImageRef
from maxjax.serve.protocol import INT32_MAX, SamplingParams

if TYPE_CHECKING:
    from maxjax.serve.grammar import GrammarSpec

MAX_N = 16
"""Most choices one request may ask for (`n`, and `n` per prompt for completions): each is a batch row."""
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
INT64 = 2**63


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    """Accepted and ignored: there is no obfuscation padding to turn off."""


class SamplingRequest(BaseModel):
    """Fields chat and completions share: sampling, stopping, streaming, and the common extensions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    """None means the served model (the `openai` client always sends one)."""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted and ignored: bookkeeping fields of OpenAI's API that change nothing about the tokens.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Extensions that users of vLLM / MAX / llama.cpp send (through `extra_body` with the openai client).
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    """0 or -1: no top-k cut; more than the vocabulary is the whole vocabulary."""
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    structured_outputs: dict[str, Any] | None = None
    """Extension (vLLM's spelling): exactly one of `{"json": schema}`, `{"json_object": true}`, `{"regex": str}`,
    `{"grammar": str}` (Lark, llguidance's dialect); the answer is constrained to match it."""

    @field_validator("structured_outputs")
    @classmethod
    def _structured_outputs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            kinds = [k for k in ("json", "json_object", "regex", "grammar") if value.get(k) not in (None, False)]
            unknown = sorted(set(value) - {"json", "json_object", "regex", "grammar"})
            if unknown:
                raise ValueError(f"structured_outputs has unknown keys {unknown}: use json, json_object, regex or grammar")
            if len(kinds) != 1:
                raise ValueError("structured_outputs needs exactly one of json, json_object, regex or grammar")
            kind = kinds[0]
            if kind in ("regex", "grammar") and not isinstance(value[kind], str):
                raise ValueError(f"structured_outputs.{kind} must be a string")
            if kind == "json" and not isinstance(value[kind], dict | str):
                raise ValueError("structured_outputs.json must be a JSON schema (an object, or its JSON text)")
        return value

    def grammar_spec(self) -> GrammarSpec | None:
        """What the answer must match, from `structured_outputs`; raises `ApiError` (400) for a schema that is not
        JSON. Whether the engine can enforce it is checked when it is compiled (`EngineCore.admit`)."""
        from maxjax.serve.grammar import GrammarError, GrammarSpec

        value = self.structured_outputs
        if value is None:
            return None
        try:
            if value.get("json") is not None:
                schema = value["json"]
                return GrammarSpec.json_schema(json.loads(schema) if isinstance(schema, str) else schema)
            if value.get("json_object"):
                return GrammarSpec.json_object()
            if value.get("regex") is not None:
                return GrammarSpec.regex(value["regex"])
            return GrammarSpec.lark(value["grammar"])
        except (GrammarError, ValueError) as e:
            raise ApiError(f"structured_outputs: {e}", param="structured_outputs") from None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop has {len(stops)} strings: at most {MAX_STOP} are allowed")
        return [s for s in stops if s]  # an empty stop string would stop before the first token: drop it

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias key {key!r} is not a token id (a non-negative integer string)")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias value {bias} for token {key} is out of range: use -100 to 100")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(t < 0 for t in value):
            raise ValueError("stop_token_ids must be non-negative token ids")
        return value

    def check(self, vocab_size: int) -> None:
        """Rules that span fields or need the vocabulary; raises `ApiError`."""
        if self.stream_options is not None and not self.stream:
            raise ApiError("stream_options is only allowed when stream is true.", param="stream_options")
        for key in self.logit_bias or {}:
            if int(key) >= vocab_size:
                raise ApiError(
                    f"logit_bias has token id {key}, outside the vocabulary (size {vocab_size}).",
                    param="logit_bias",
                )
        for token in self.stop_token_ids or ():
            if token >= vocab_size:
                raise ApiError(
                    f"stop_token_ids has token id {token}, outside the vocabulary (size {vocab_size}).",
                    param="stop_token_ids",
                )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_params(
        self, *, max_tokens: int, seed: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """The engine's view of this request, for one choice (the caller picks its seed and token budget)."""
        top_k = self.top_k or 0
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(top_k, 0),
            min_p=self.min_p or 0.0,
            seed=seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            min_tokens=min(self.min_tokens or 0, max_tokens),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=self.grammar_spec(),
        )


_OTHER_MEDIA_PARTS = {"input_audio", "audio", "file", "input_file", "video_url", "input_image", "image"}
_IMAGE_DETAIL = ("auto", "low", "high")


def _content_part(part: Any, index: int, *, role: str | None) -> dict[str, Any]:
    """One chat content part, checked: `{"type": "text", "text"}` (a refusal part becomes one), or an image as
    `{"type": "image_url", "image_url": {"url"}}` (`image_url` may be the URL itself, as some clients send it)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return {"type": "text", "text": part["refusal"]}
    if kind == "image_url":
        assert isinstance(part, dict)
        if role != "user":
            raise ValueError(f"content[{index}]: image parts are only allowed in user messages")
        image = {"url": part["image_url"]} if isinstance(part.get("image_url"), str) else part.get("image_url")
        if (not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]
                or set(part) - {"type", "image_url"} or set(image) - {"url", "detail"}):
            raise ValueError(f'content[{index}]: an image part must look like {{"type": "image_url", "image_url": '
                             '{"url": "data:image/png;base64,..."}}')  # fmt: skip
        if image.get("detail", "auto") not in _IMAGE_DETAIL:
            raise ValueError(f"content[{index}]: image_url.detail must be 'auto', 'low' or 'high'")
        return {"type": "image_url", "image_url": {"url": image["url"]}}
    if kind in _OTHER_MEDIA_PARTS:
        raise ValueError(f"content parts of type '{kind}' are not supported: send text, or images as "
                         '{"type": "image_url", "image_url": {"url": ...}}')  # fmt: skip
    raise ValueError('content parts must look like {"type": "text", "text": "..."}')


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(None, validate_default=True)
    """A string, or a list of parts. Text parts (and refusals) alone are flattened here (joined with newlines); with
    images (user messages only) the list stays, in order: `{"type": "text", "text"}` and `{"type": "image_url",
    "image_url": {"url"}}` parts."""
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """Passed through to the chat template (earlier turns of a conversation that used tools elsewhere)."""
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    """An earlier answer's thinking, sent back as this server returned it; templates that show it get it."""
    annotations: list[Any] | None = None
    """Sent back with an earlier answer (`message.model_dump()`); ignored."""

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            if info.data.get("role") == "assistant":
                return None  # an assistant turn that only called tools
            raise ValueError("message content is required (a string or a list of text parts)")
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("message content must be a string or a list of content parts")
        parts = [_content_part(part, i, role=info.data.get("role")) for i, part in enumerate(value)]
        if any(part["type"] == "image_url" for part in parts):
            return parts
        return "\n".join(part["text"] for part in parts)

    def template_dict(self) -> dict[str, Any]:
        """What the chat template sees: the message with unset fields left out, and each image as `{"type":
        "image"}` (Gemma 3's template writes its `<start_of_image>` for one; `chat_template` flattens it to a
        marker for templates that take a string)."""
        out = self.model_dump(exclude_none=True, exclude={"annotations"})
        if isinstance(self.content, list):
            out["content"] = [{"type": "image"} if p["type"] == "image_url" else p for p in self.content]
        return out

    def image_urls(self) -> list[tuple[int, str]]:
        """(index in `content`, URL) of each image part."""
        if not isinstance(self.content, list):
            return []
        return [(i, p["image_url"]["url"]) for i, p in enumerate(self.content) if p["type"] == "image_url"]


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    """Accepted and ignored: thinking is turned on or off through the template (`chat_template_kwargs`)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extension (vLLM's): extra variables for the chat template, e.g. `{"enable_thinking": false}`."""

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must not be empty")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        kind = None if value is None else value.get("type")
        if value is not None and kind not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format type must be 'text', 'json_object' or 'json_schema'")
        if kind == "json_schema":
            spec = value.get("json_schema") if value is not None else None
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError("response_format json_schema needs json_schema.schema, a JSON schema object")
            if not isinstance(spec.get("strict", False), bool | None):
                raise ValueError("response_format json_schema.strict must be a boolean")
        return value

    def grammar_spec(self) -> GrammarSpec | None:
        """`response_format` (json_object, json_schema with `strict`), or the `structured_outputs` extension."""
        from maxjax.serve.grammar import GrammarError, GrammarSpec

        kind = (self.response_format or {}).get("type", "text")
        if kind != "text" and self.structured_outputs is not None:
            raise ApiError("send response_format or structured_outputs, not both.", param="structured_outputs")
        if kind == "json_object":
            return GrammarSpec.json_object()
        if kind == "json_schema":
            spec = (self.response_format or {})["json_schema"]
            try:
                return GrammarSpec.json_schema(spec["schema"], strict=bool(spec.get("strict")))
            except GrammarError as e:
                raise ApiError(f"response_format.json_schema.schema: {e}",
                               param="response_format.json_schema.schema") from None
        return super().grammar_spec()

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value != ["text"]:
            raise ValueError("only the 'text' modality is supported")
        return value

    def check(self, vocab_size: int) -> None:
        super().check(vocab_size)
        self._check_tools()
        if self.functions or self.function_call not in (None, "none"):
            raise ApiError("functions and function_call are deprecated and not served: send tools and tool_choice.",
                           param="functions")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError("top_logprobs needs logprobs set to true.", param="top_logprobs")
        if self.min_tokens and self.requested_max_tokens and self.min_tokens > self.requested_max_tokens:
            raise ApiError(
                f"min_tokens ({self.min_tokens}) is larger than max_tokens ({self.requested_max_tokens}).",
                param="min_tokens",
            )

    def _check_tools(self) -> None:
        from maxjax.serve.grammar import GrammarError
        from maxjax.serve.tool_use import check_tools, chosen_function

        try:
            functions = check_tools(self.tools or [])
            if self.tool_choice is not None:
                if not self.tools and self.tool_choice != "none":
                    raise GrammarError("tool_choice needs tools", param="tool_choice")
                chosen_function(self.tool_choice, functions)
        except GrammarError as e:
            raise ApiError(f"{e}.", param=e.param) from None
        forced = self.tools and (self.tool_choice == "required" or isinstance(self.tool_choice, dict))
        constrained = (self.response_format or {}).get("type", "text") != "text" or self.structured_outputs is not None
        if forced and constrained:
            raise ApiError("a required tool call and response_format (or structured_outputs) cannot both "
                           "constrain the answer: send one.", param="tool_choice")

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens

    def image_refs(self) -> list[ImageRef]:
        """The images of all messages, in prompt order."""
        return [ImageRef(url, f"messages[{m}].content[{i}]")
                for m, message in enumerate(self.messages) for i, url in message.image_urls()]  # fmt: skip


Prompt = str | list[int]
"""One completions prompt: text, or token ids."""


class CompletionRequest(SamplingRequest):
    prompt: list[Prompt]
    """Normalized to a list: a string, a list of strings, a list of token ids, or a list of lists."""
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)

        if isinstance(value, str):
            prompts: list[Any] = [value]
        elif is_ids(value) and value:
            prompts = [value]
        elif isinstance(value, list) and all(isinstance(p, str) or is_ids(p) for p in value):
            prompts = value
        else:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list of lists")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt must not be empty")
        return prompts

    def check(self, vocab_size: int) -> None:
        super().check(vocab_size)
        if self.suffix:
            raise ApiError("suffix (fill-in-the-middle) is not supported yet.", param="suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ApiError("best_of different from n is not supported.", param="best_of")
        for i, prompt in enumerate(self.prompt):
            if isinstance(prompt, list) and any(not 0 <= t < vocab_size for t in prompt):
                raise ApiError(
                    f"prompt {i} has a token id outside the vocabulary (size {vocab_size}).", param="prompt"
                )
        if self.min_tokens and self.max_tokens and self.min_tokens > self.max_tokens:
            raise ApiError(
                f"min_tokens ({self.min_tokens}) is larger than max_tokens ({self.max_tokens}).", param="min_tokens"
            )


_R = TypeVar("_R", bound=SamplingRequest)


def parse_request(model: type[_R], body: dict[str, Any], *, vocab_size: int) -> _R:
    """Gates 2 and 3: field types and ranges, then the rules that span fields or need the vocabulary."""
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    request.check(vocab_size)
    return request


# -- what goes back ------------------------------------------------------------------------------------------


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[ChatTokenLogprob]


class CompletionLogprobs(TypedDict):
    """The legacy shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ModelCard(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: None
    max_model_len: int
