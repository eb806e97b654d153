"""`POST /tokenize` and `POST /detokenize`, as vLLM serves them: the served tokenizer, through the same rendering the
generation routes use, so a client can count and budget tokens before it asks.

- `/tokenize` with `prompt` (a string): its ids as `/v1/completions` encodes a text prompt (`add_special_tokens`,
  default true, adds what the model's post-processor adds, such as BOS).
- `/tokenize` with `messages` (plus `tools`, `tool_choice`, `parallel_tool_calls`, `chat_template_kwargs`, as
  chat takes them): the chat template rendered with chat.py's own tool plan and `chat_prompt`, so with
  `add_generation_prompt` (default true) the count is exactly the `usage.prompt_tokens` that
  `/v1/chat/completions` reports for the same body. `add_special_tokens` (default false: the template writes
  them) encodes the rendered text with the post-processor's tokens too. Images count as the placeholder tokens
  they take (they are not read: only their number matters); `add_special_tokens` is refused with them.
- Either answers `{"count", "max_model_len", "tokens", "token_strs"}` (`token_strs` null unless
  `return_token_strs`).
- `/detokenize`: `{"tokens": [...]}` to `{"prompt": text}`, special tokens written out (so a rendered chat
  prompt round-trips); an id outside the vocabulary is a 400 naming `tokens`.

Both are behind the API key, like the `/v1` routes (app.py's gate). Unknown fields are a 400 naming them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from maxjax.serve.chat import chat_prompt, tool_plan
from maxjax.serve.choices import check_model
from maxjax.serve.errors import ApiError, validation_error
from maxjax.serve.protocol import Engine, VisionInfo
from maxjax.serve.schemas import ChatCompletionRequest, ChatMessage, parse_request
from maxjax.serve.text import TextTokenizer
from maxjax.serve.tool_use import ChatFeatures


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None


class TokenizePrompt(_Request):
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = None


class TokenizeChat(_Request):
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def chat_request(self, vocab_size: int) -> ChatCompletionRequest:
        """The chat request these fields are part of (its checks: messages not empty, tools well formed)."""
        fields = self.model_dump(include={"messages", "tools", "tool_choice", "parallel_tool_calls",
                                          "chat_template_kwargs"}, exclude_none=True)  # fmt: skip
        fields["messages"] = self.messages
        return parse_request(ChatCompletionRequest, fields, vocab_size=vocab_size)


class Detokenize(_Request):
    tokens: list[int]


def _parse(model: type[_Request], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def tokenize_chat(tokenizer: TextTokenizer, request: TokenizeChat, features: ChatFeatures,
                  vision: VisionInfo | None = None) -> list[int]:
    """The chat prompt's ids: chat.py's rendering (tool plan, template, encoding) unless asked otherwise."""
    chat = request.chat_request(tokenizer.vocab_size)
    if request.add_special_tokens and chat.image_refs():
        raise ApiError("add_special_tokens cannot be used with images: the template writes the special tokens.",
                       param="add_special_tokens")  # fmt: skip
    plan = tool_plan(tokenizer, chat, features)
    # Exactly what /v1/chat/completions counts, with the generation prompt.
    text, ids = chat_prompt(tokenizer, chat, plan, add_generation_prompt=request.add_generation_prompt,
                            vision=vision)  # fmt: skip
    return tokenizer.encode(text, add_special_tokens=True) if request.add_special_tokens else ids


async def tokenize(body: dict[str, Any], *, engine: Engine, tokenizer: TextTokenizer, model: str,
                   features: ChatFeatures) -> dict[str, Any]:
    """`POST /tokenize`: `prompt` or `messages`, never both."""
    if ("prompt" in body) == ("messages" in body):
        raise ApiError("Send either prompt (a string) or messages (a chat), not both or neither.",
                       param="messages" if "messages" in body else "prompt")  # fmt: skip
    if "messages" in body:
        chat: TokenizeChat = _parse(TokenizeChat, body)
        check_model(chat.model, model)
        ids = await asyncio.to_thread(tokenize_chat, tokenizer, chat, features, engine.vision)
        with_strs = chat.return_token_strs
    else:
        text: TokenizePrompt = _parse(TokenizePrompt, body)
        check_model(text.model, model)
        ids = await asyncio.to_thread(tokenizer.encode, text.prompt, add_special_tokens=text.add_special_tokens)
        with_strs = text.return_token_strs
    strs = [tokenizer.token_text(i) for i in ids] if with_strs else None
    return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}


async def detokenize(body: dict[str, Any], *, tokenizer: TextTokenizer, model: str) -> dict[str, Any]:
    """`POST /detokenize`: the text of `tokens`, special tokens included."""
    request = _parse(Detokenize, body)
    check_model(request.model, model)
    bad = [t for t in request.tokens if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise ApiError(f"tokens has id {bad[0]}, outside the vocabulary (size {tokenizer.vocab_size}).",
                       param="tokens")  # fmt: skip
    text = await asyncio.to_thread(tokenizer.decode, request.tokens, skip_special_tokens=False)
    return {"prompt": text}
