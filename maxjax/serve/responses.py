"""`POST /v1/responses` (OpenAI's Responses API), and `GET` / `DELETE /v1/responses/{id}` on the stored ones.

The path: validate the body (`ResponsesRequest`, responses_request.py) → with `previous_response_id`, the stored
conversation it continues (its input items and output items, before the new input; a 404 when it is not stored)
→ the chat request it means (`to_chat`) → chat's tool plan, template, token budget and images (chat.py,
choices.py, images.py; an image's 400 names `input`) → one engine request (`ChoiceRunner`, started before any
byte is sent, so a full queue is a real 429) → the answer read into thinking, text and calls (chat_answer.py) and
written as output items (response_events.py): collected into one `response` object, or streamed as typed events
from `response.created` to `response.completed` (cut by `max_output_tokens`: status `incomplete`,
`response.incomplete`; an engine failure after the first byte: `response.failed`).

Stored responses (`store`, default true, as on OpenAI) live in memory, in a `ResponseStore` of the app's: the
last `STORE_SIZE` responses, least recently used evicted first, lost on restart. A continued conversation
therefore has every earlier turn in the store: the whole history goes into the prompt again (the prefix cache
finds most of it).

`usage.input_tokens_details.cached_tokens` is 0: the engine does not report its prefix-cache hits per request.
`usage.output_tokens_details.reasoning_tokens` is the thinking's length re-encoded (the parser splits text, not
tokens).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from quart import Response

from maxjax.config import ImageLimits
from maxjax.serve.chat import chat_prompt, request_images, tool_plan
from maxjax.serve.chat_answer import AnswerReader, read_answer
from maxjax.serve.choices import Choice, ChoiceRunner, check_model, json_response, sse_response, token_budget
from maxjax.serve.errors import ApiError, internal_error, validation_error
from maxjax.serve.metrics import Metrics
from maxjax.serve.protocol import Engine, GenerationRequest
from maxjax.serve.response_events import Item, ResponseEvents, answer_items, item_id, reasoning_of
from maxjax.serve.responses_request import ResponsesRequest, parse_items, renamed
from maxjax.serve.schemas import ChatCompletionRequest
from maxjax.serve.text import ChoiceText, TextTokenizer
from maxjax.serve.tool_parsers import ToolParser
from maxjax.serve.tool_use import ChatFeatures, ToolPlan

logger = logging.getLogger(__name__)

STORE_SIZE = 1024
"""How many responses the server keeps for `GET /v1/responses/{id}` and `previous_response_id`."""


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    items: list[Item]
    """The conversation up to this response: earlier turns and this request's input, as input items."""

    def conversation(self) -> list[Item]:
        """What a response continuing this one follows: its conversation, then its output."""
        return [*self.items, *self.response["output"]]


class ResponseStore:
    """The last `size` stored responses, least recently used evicted first. Used from the event loop only."""

    def __init__(self, size: int = STORE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[str, Stored] = OrderedDict()

    def put(self, stored: Stored) -> None:
        self._entries[stored.response["id"]] = stored
        self._entries.move_to_end(stored.response["id"])
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, response_id: str, *, param: str | None = None) -> Stored:
        """The stored response, or a 404 naming the id."""
        stored = self._entries.get(response_id)
        if stored is None:
            raise self._unknown(response_id, param)
        self._entries.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> None:
        if self._entries.pop(response_id, None) is None:
            raise self._unknown(response_id, None)

    def _unknown(self, response_id: str, param: str | None) -> ApiError:
        return ApiError(
            f"No response with id '{response_id}' is stored here: it was never stored (store: false), was "
            f"deleted, or was evicted (this server keeps the last {self.size}, in memory).",
            status=404, param=param, code="response_not_found",
        )  # fmt: skip


def parse_responses_request(body: dict[str, Any]) -> ResponsesRequest:
    """Field types and ranges, then the rules that span fields; each a 400 naming the field."""
    try:
        request = ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    request.check()
    return request


async def create_response(
    body: dict[str, Any],
    *,
    engine: Engine,
    tokenizer: TextTokenizer,
    model: str,
    metrics: Metrics,
    arrived: float,
    features: ChatFeatures,
    store: ResponseStore,
    image_limits: ImageLimits,
) -> Response:
    request = parse_responses_request(body)
    check_model(request.model, model)
    earlier: list[Item] = []
    if request.previous_response_id is not None:
        earlier = store.get(request.previous_response_id, param="previous_response_id").conversation()
    items = request.input_items()
    chat = request.to_chat(parse_items(earlier, param="previous_response_id") + items, vocab_size=tokenizer.vocab_size)
    plan = tool_plan(tokenizer, chat, features)
    try:
        prompt_text, ids = await asyncio.to_thread(chat_prompt, tokenizer, chat, plan, vision=engine.vision)
    except ApiError as exc:
        raise renamed(exc) from None
    response_id = item_id("resp")
    prompt = _Prompt(response_id, tuple(ids), image_limits)
    runner = await _start(engine, tokenizer, chat, plan, features, prompt, metrics, arrived)
    draft = _Draft(request, response_id, model, len(ids), tokenizer,
                   [*earlier, *(item.model_dump(exclude_none=True) for item in items)])  # fmt: skip
    reader = _ReaderArgs(features, plan.parser, prompt_text)
    if request.stream:
        return sse_response(_stream(runner, draft, reader, store))
    return json_response(await _collect(runner, draft, reader, store))


@dataclass(frozen=True)
class _Prompt:
    """The engine request's id and prompt ids, and what its images may be."""

    request_id: str
    ids: tuple[int, ...]
    image_limits: ImageLimits


async def _start(engine: Engine, tokenizer: TextTokenizer, chat: ChatCompletionRequest, plan: ToolPlan,
                 features: ChatFeatures, prompt: _Prompt, metrics: Metrics, arrived: float) -> ChoiceRunner:
    """Size the budget, read the images, submit the one engine request and return its runner."""
    try:
        max_tokens = token_budget(len(prompt.ids), chat.requested_max_tokens, engine.max_model_len,
                                  default=None, param="input")  # fmt: skip
    except ApiError as exc:
        raise renamed(exc) from None
    try:
        images = await request_images(chat, engine, prompt.image_limits)
    except ApiError as exc:
        exc.param = "input"  # chat's messages[i] is not input[i] (instructions, earlier turns come first)
        raise
    params = chat.sampling_params(max_tokens=max_tokens, seed=chat.seed, logprobs=None)
    if plan.grammar is not None:  # a forced call
        params = dataclasses.replace(params, grammar=plan.grammar)
    text = ChoiceText.for_request(tokenizer, chat, keep=features.keep_ids(tools=plan.parser is not None))
    choice = Choice(0, GenerationRequest(prompt.request_id, prompt.ids, params, images), text)
    runner = ChoiceRunner(engine, [choice], metrics, arrived=arrived)
    await runner.start()
    return runner


@dataclass(frozen=True)
class _ReaderArgs:
    """What reads the answer: the server's reasoning parser, this request's tool parser, the rendered prompt."""

    features: ChatFeatures
    tools: ToolParser | None
    prompt: str

    def whole(self, text: str, finish_reason: str) -> dict[str, Any]:
        return read_answer(text, reasoning=self.features.reasoning_parser, tools=self.tools, prompt=self.prompt,
                           finish_reason=finish_reason)[0]  # fmt: skip

    def stream(self) -> AnswerReader:
        return AnswerReader(reasoning=self.features.reasoning_parser, tools=self.tools, prompt=self.prompt)


@dataclass
class _Draft:
    """One response as it is built: the request's echoed settings, its id, and what the usage needs."""

    request: ResponsesRequest
    response_id: str
    model: str
    input_tokens: int
    tokenizer: TextTokenizer
    items: list[Item]
    """The conversation (earlier turns, this input) stored with it."""
    created_at: int = field(default_factory=lambda: int(time.time()))

    def body(self, status: str, output: list[Item], *, output_tokens: int = 0, error: dict[str, Any] | None = None,
             incomplete: bool = False) -> dict[str, Any]:
        """The `response` object; `usage` only once it is over, and `user` only when the request gave one (OpenAI's
        schema has neither as nullable)."""
        r = self.request
        done = status in ("completed", "incomplete")
        text_format = r.text.format.model_dump(by_alias=True, exclude_none=True) if r.text and r.text.format else None
        # A tool as it was applied: `parameters` and `strict` are required (nullable); not strict unless asked.
        tools = [{**tool.model_dump(exclude_none=True), "parameters": tool.parameters, "strict": bool(tool.strict)}
                 for tool in r.tools or ()]  # fmt: skip
        body: dict[str, Any] = {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if done else None, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": r.parallel_tool_calls is not False,
            "previous_response_id": r.previous_response_id, "store": r.store is not False,
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "text": {"format": text_format or {"type": "text"}},
            "tool_choice": r.tool_choice if r.tool_choice is not None else ("auto" if r.tools else "none"),
            "tools": tools, "truncation": r.truncation or "disabled", "metadata": r.metadata or {},
            "background": False, "reasoning": None,
        }  # fmt: skip
        if r.user is not None:
            body["user"] = r.user
        if done:
            body["usage"] = self._usage(output, output_tokens)
        return body

    def _usage(self, output: list[Item], output_tokens: int) -> dict[str, Any]:
        thinking = reasoning_of(output)
        reasoning_tokens = min(len(self.tokenizer.encode(thinking)), output_tokens) if thinking else 0
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": self.input_tokens + output_tokens,
        }

    def keep(self, store: ResponseStore, body: dict[str, Any]) -> None:
        if self.request.store is not False:
            store.put(Stored(body, self.items))


async def _collect(runner: ChoiceRunner, draft: _Draft, reader: _ReaderArgs, store: ResponseStore) -> dict[str, Any]:
    text, finish = "", "stop"
    async with aclosing(runner.updates()) as updates:
        async for update in updates:
            text += update.piece.text
            finish = update.piece.finish_reason or finish
    incomplete = finish == "length"
    output = answer_items(reader.whole(text, finish), incomplete=incomplete)
    status = "incomplete" if incomplete else "completed"
    body = draft.body(status, output, output_tokens=runner.completion_tokens, incomplete=incomplete)
    draft.keep(store, body)
    return body


async def _stream(runner: ChoiceRunner, draft: _Draft, args: _ReaderArgs, store: ResponseStore) -> AsyncIterator[bytes]:
    events = ResponseEvents()
    reader = args.stream()
    try:
        yield events.event("response.created", response=draft.body("in_progress", []))
        yield events.event("response.in_progress", response=draft.body("in_progress", []))
        finish = "stop"
        async with aclosing(runner.updates()) as updates:
            async for update in updates:
                piece = update.piece
                for event in events.feed(reader.feed(piece.text)):
                    yield event
                if piece.finish_reason is not None:
                    finish = piece.finish_reason
                    for event in events.feed(reader.finish(finish)[0]):
                        yield event
        incomplete = finish == "length"
        for event in events.finish(incomplete=incomplete):
            yield event
        status = "incomplete" if incomplete else "completed"
        body = draft.body(status, events.items, output_tokens=runner.completion_tokens, incomplete=incomplete)
        draft.keep(store, body)
        yield events.event(f"response.{status}", response=body)
    except Exception as exc:
        yield events.event("response.failed", response=draft.body("failed", events.items, error=_failure(exc)))


def _failure(exc: BaseException) -> dict[str, Any]:
    """`response.error` for a failure after the first byte (logged unless it is one the client caused)."""
    if not isinstance(exc, ApiError):
        logger.exception("response failed while streaming", exc_info=exc)
        exc = internal_error(exc)
    return {"code": "rate_limit_exceeded" if exc.status == 429 else "server_error", "message": exc.message}
