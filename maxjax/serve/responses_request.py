"""The body of `POST /v1/responses` (OpenAI's Responses API), checked, and turned into the chat request it means.

A Responses request is a chat request in another shape, so it is served by the chat path (chat.py's template
rendering and tool plan, choices.py's runner, chat_answer.py's parsers) once `ResponsesRequest.to_chat` has
rewritten it:

- `input` (a string: one user message; or a list of items) and `instructions` (a system message, first) become
  `messages`. Items: `message` (roles user/system/developer/assistant; content a string or `input_text` /
  `output_text` / `refusal` parts, and in user messages `input_image` parts: chat's `image_url`, read by chat's
  path), `function_call` (an assistant turn's `tool_calls`; consecutive calls share one turn),
  `function_call_output` (a `tool` message) and `reasoning` (accepted, left out of the prompt: templates have no
  place for earlier thinking). Images by `file_id`, files and item references are a 400.
- `tools` (flat: `{"type": "function", "name", "parameters", "strict"}`) and `tool_choice` (`{"type":
  "function", "name"}`) become chat's nested shapes; other tool types are a 400.
- `text.format` (`text`, `json_object`, `json_schema` with name/schema/strict) becomes `response_format`, so the
  grammar is the one chat compiles; `max_output_tokens` becomes `max_completion_tokens`.
- The sampling extensions chat accepts (`seed`, `top_k`, `min_p`, `stop`, ...) pass through under their own names,
  and chat's model checks them; so do `temperature` and `top_p`. A 400 that chat raises under one of its own names
  is renamed to the Responses field (`_RENAMED`).

Fields that change nothing about the tokens (`metadata`, `user`, `service_tier`, `reasoning`, `include`,
`truncation`, ...) are accepted and ignored, as chat does; `background: true` and `top_logprobs` are a 400 saying
they are not served. Unknown fields are a 400 naming them (the policy in app.py's docstring).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from maxjax.serve.errors import ApiError, validation_error
from maxjax.serve.schemas import ChatCompletionRequest, parse_request

_MEDIA_PARTS = {"input_image", "input_file", "input_audio", "image_url"}
_IMAGE_DETAIL = ("auto", "low", "high")


def _text_of(parts: Any, *, kinds: tuple[str, ...], images: bool = False) -> str | list[dict[str, Any]]:
    """A content list of text parts as one string (joined with newlines, as chat joins its parts). With `images`,
    `input_image` parts are allowed too, and a list that has one stays a list of `input_text` and `input_image`
    parts, in order."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise ValueError("content must be a string or a list of content parts")
    out: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in kinds and isinstance(part.get("text"), str):
            out.append({"type": "input_text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append({"type": "input_text", "text": part["refusal"]})
        elif kind == "input_image" and images:
            out.append(_image_part(part, i))
        elif kind == "input_image":
            raise ValueError(f"content[{i}]: input_image parts are only allowed in user messages")
        elif kind in _MEDIA_PARTS:
            also = ", and images as 'input_image' parts" if images else ""
            raise ValueError(f"content parts of type '{kind}' are not supported here: send text parts{also}")
        else:
            shown = " or ".join(f"'{k}'" for k in kinds)
            raise ValueError(f'content parts must look like {{"type": {shown}, "text": "..."}}')
    if any(part["type"] == "input_image" for part in out):
        return out
    return "\n".join(part["text"] for part in out)


def _image_part(part: dict[str, Any], index: int) -> dict[str, Any]:
    """An `input_image` part, checked: its `image_url` (a data URL, or a local file the server may read)."""
    if part.get("file_id") is not None:
        raise ValueError(f"content[{index}]: images by file_id are not supported (this server stores no files): "
                         "send image_url, a base64 data URL")  # fmt: skip
    unknown = sorted(set(part) - {"type", "image_url", "detail", "file_id"})
    if not isinstance(part.get("image_url"), str) or not part["image_url"] or unknown:
        raise ValueError(f'content[{index}]: an image part must look like {{"type": "input_image", "image_url": '
                         '"data:image/png;base64,..."}')  # fmt: skip
    if part.get("detail", "auto") not in _IMAGE_DETAIL:
        raise ValueError(f"content[{index}]: detail must be 'auto', 'low' or 'high'")
    return {"type": "input_image", "image_url": part["image_url"]}


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]]
    """A string, or a list of `input_text` / `output_text` / `refusal` parts, joined here; in a user message
    with `input_image` parts, a list of `input_text` and `input_image` parts, in order."""
    phase: str | None = None
    """Sent back by clients that echo an earlier output message; ignored."""

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any, info: ValidationInfo) -> Any:
        return _text_of(value, kinds=("input_text", "output_text", "text"), images=info.data.get("role") == "user")

    def chat_content(self) -> str | list[dict[str, Any]]:
        """The content as chat takes it (images as `image_url` parts)."""
        if isinstance(self.content, str):
            return self.content
        return [{"type": "text", "text": p["text"]} if p["type"] == "input_text"
                else {"type": "image_url", "image_url": {"url": p["image_url"]}} for p in self.content]  # fmt: skip


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    """A string, or a list of `input_text` parts, joined here."""

    @field_validator("output", mode="before")
    @classmethod
    def _output(cls, value: Any) -> Any:
        return _text_of(value, kinds=("input_text",))


class ReasoningItem(_Item):
    type: Literal["reasoning"]
    summary: list[dict[str, Any]] = []
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
_ITEM_TYPES: dict[str, type[InputItem]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}


def parse_items(raw: list[Any], *, param: str = "input") -> list[InputItem]:
    """Each input item checked against the model of its `type` (`message` when only `role` is given); a 400
    names the item's field (`input[2].content`)."""
    items = []
    for i, item in enumerate(raw):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        model = _ITEM_TYPES.get(kind) if isinstance(kind, str) else None
        if model is None:
            known = ", ".join(f"'{k}'" for k in _ITEM_TYPES)
            raise ApiError(f"{param}[{i}] has type {kind!r}: the input items served are {known}.",
                           param=f"{param}[{i}]")  # fmt: skip
        try:
            items.append(model.model_validate(item))
        except ValidationError as exc:
            raise _located(exc, (param, i)) from None
    return items


def _located(exc: ValidationError, prefix: tuple[str | int, ...]) -> ApiError:
    """`validation_error` for an error found inside a part of the body: its location under `prefix`."""
    details: list[InitErrorDetails] = []
    for err in exc.errors(include_url=False):
        detail = InitErrorDetails(type=err["type"], loc=(*prefix, *err["loc"]), input=err["input"])
        if "ctx" in err:
            detail["ctx"] = err["ctx"]
        details.append(detail)
    return validation_error(ValidationError.from_exception_data(exc.title, details))


def item_messages(items: list[InputItem]) -> list[dict[str, Any]]:
    """The items as chat messages: a call joins the assistant turn right before it (its text, or the calls before
    it), else opens one; reasoning is left out."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.chat_content()})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages


class FunctionTool(BaseModel):
    """A Responses function tool: flat, where chat nests the function under `function`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def to_chat(self) -> dict[str, Any]:
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _named_schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.schema_ is None or not self.name):
            raise ValueError("text.format of type 'json_schema' needs a name and a schema (a JSON schema object)")
        return self

    def to_chat(self) -> dict[str, Any]:
        """As chat's `response_format`."""
        if self.type != "json_schema":
            return {"type": self.type}
        spec = {"name": self.name, "schema": self.schema_, "strict": self.strict, "description": self.description}
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_obfuscation: bool | None = None
    """Accepted and ignored: there is no obfuscation padding to turn off."""


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    """Accepted and ignored."""


_PASSED_TO_CHAT = ("temperature", "top_p", "seed", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "stop", "stop_token_ids", "ignore_eos", "min_tokens", "logit_bias",
                   "chat_template_kwargs")  # fmt: skip
"""Fields that go to chat under the same name, checked by `ChatCompletionRequest` (so a 400 names them)."""

_RENAMED = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
            "response_format.json_schema.schema": "text.format.schema", "response_format": "text.format",
            "messages": "input"}  # fmt: skip
"""Chat's names for the fields a Responses request calls otherwise, for the `param` of a 400."""


def renamed(exc: ApiError) -> ApiError:
    """A 400 raised under chat's field names, under the Responses request's."""
    for chat_name, name in _RENAMED.items():
        if exc.param is not None and (exc.param == chat_name or exc.param[len(chat_name) :][:1] in (".", "[")
                                      and exc.param.startswith(chat_name)):
            exc.param = name + exc.param[len(chat_name) :]
            return exc
    return exc


class ResponsesRequest(BaseModel):
    """A `POST /v1/responses` body. `input` items are checked by `input_items` (each against its type's model),
    the sampling fields by chat's model in `to_chat`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    """"none", "auto", "required" (checked by chat's tool checks) or `{"type": "function", "name": ...}`."""
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    # Accepted and ignored: bookkeeping that changes nothing about the tokens.
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    # Sampling, and the extensions chat takes (through `extra_body`): checked by chat under the same names.
    temperature: float | None = None
    top_p: float | None = None
    seed: Any = None
    top_k: Any = None
    min_p: Any = None
    repetition_penalty: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    stop: Any = None
    stop_token_ids: Any = None
    ignore_eos: Any = None
    min_tokens: Any = None
    logit_bias: Any = None
    chat_template_kwargs: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        if not isinstance(value, str | list):
            raise ValueError("input must be a string or a list of input items")
        if not value:
            raise ValueError("input must not be empty")
        return value

    def check(self) -> None:
        """What no single field's type says; raises `ApiError`."""
        if self.background:
            raise ApiError("background responses are not served: leave background unset or false.",
                           param="background")  # fmt: skip
        if self.top_logprobs:
            raise ApiError("top_logprobs is not served on /v1/responses: use /v1/chat/completions with logprobs.",
                           param="top_logprobs")  # fmt: skip
        if self.stream_options is not None and not self.stream:
            raise ApiError("stream_options is only allowed when stream is true.", param="stream_options")

    def input_items(self) -> list[InputItem]:
        """`input` as items: a string is one user message."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return parse_items(self.input)

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        """`tool_choice` in chat's shape (`{"type": "function", "function": {"name": ...}}`)."""
        choice = self.tool_choice
        if not isinstance(choice, dict):
            return choice
        if set(choice) != {"type", "name"} or choice["type"] != "function" or not isinstance(choice["name"], str):
            raise ApiError('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}.',
                           param="tool_choice")  # fmt: skip
        return {"type": "function", "function": {"name": choice["name"]}}

    def to_chat(self, items: list[InputItem], *, vocab_size: int) -> ChatCompletionRequest:
        """The chat request this one means for the conversation `items` (earlier turns, then `input`)."""
        messages = item_messages(items)
        if self.instructions:
            messages.insert(0, {"role": "system", "content": self.instructions})
        if not messages:
            raise ApiError("input has nothing to answer: send a message.", param="input")
        body: dict[str, Any] = {"messages": messages, "max_completion_tokens": self.max_output_tokens,
                                "tool_choice": self.chat_tool_choice(),
                                "parallel_tool_calls": self.parallel_tool_calls}  # fmt: skip
        if self.tools:
            body["tools"] = [tool.to_chat() for tool in self.tools]
        if self.text and self.text.format:
            body["response_format"] = self.text.format.to_chat()
        body.update({name: getattr(self, name) for name in _PASSED_TO_CHAT})
        try:
            request = parse_request(ChatCompletionRequest, {k: v for k, v in body.items() if v is not None},
                                    vocab_size=vocab_size)  # fmt: skip
            request.grammar_spec()  # a schema that does not compile is this request's 400, named as sent
        except ApiError as exc:
            raise renamed(exc) from None
        return request
