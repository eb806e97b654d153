"""`POST /v1/chat/completions`: messages in, one assistant message per choice out (whole, or streamed as SSE).

The path: validate the body (`ChatCompletionRequest`, then `.check`) → plan the tools (`tool_use.ToolPlan`: what
the template sees, a forced call's grammar, the parser) → render the chat template and tokenize, each image's
place expanded into its placeholder tokens (in a worker thread: a long conversation must not stall other streams)
→ size the token budget against the context → read, decode and preprocess the images (`images.py`, in a worker
thread too) → one engine request per choice (`ChoiceRunner`, each carrying the images) → read each choice's text
into content, `reasoning_content` and `tool_calls` (`chat_answer`) and either collect it into a
`chat.completion`, or send it as `chat.completion.chunk` events as it comes.

Stream shape (what the `openai` client and its users rely on): every chunk has the same id, created and model;
each choice index opens with `delta: {"role": "assistant", "content": ""}`; later chunks carry no role (their
delta has `content`, `reasoning_content` and/or `tool_calls`; a chunk whose text a parser holds back still
carries its tokens' logprobs); each index's `finish_reason` is set on the chunk carrying its last tokens (a chunk
with an empty delta only when the end brought no text); with `stream_options.include_usage` every chunk has
`usage: null` and one last chunk has `choices: []` and the usage;
then `data: [DONE]`. A failure after the first byte is an event with a top-level `error` (the client raises).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from quart import Response

from maxjax.chat_template import IMAGE_MARKER, takes_content_parts
from maxjax.config import ImageLimits
from maxjax.serve.chat_answer import AnswerReader, read_answer
from maxjax.serve.choices import (
    SSE_DONE,
    Choice,
    ChoiceRunner,
    check_model,
    choice_seed,
    json_response,
    new_id,
    sse,
    sse_response,
    stream_error,
    token_budget,
    usage,
)
from maxjax.serve.errors import ApiError
from maxjax.serve.grammar import GrammarError
from maxjax.serve.images import check_images, image_prompt_ids, load_images
from maxjax.serve.metrics import Metrics
from maxjax.serve.protocol import (
    Engine,
    GenerationRequest,
    ImageInput,
    SamplingParams,
    TokenLogprob,
    VisionInfo,
)
from maxjax.serve.schemas import ChatCompletionRequest, ChatTokenLogprob, parse_request
from maxjax.serve.text import ChoiceText, TextTokenizer, chat_logprobs
from maxjax.serve.tool_use import ChatFeatures, ToolPlan

logger = logging.getLogger(__name__)


def chat_prompt(tokenizer: TextTokenizer, request: ChatCompletionRequest, plan: ToolPlan, *,
                add_generation_prompt: bool = True, vision: VisionInfo | None = None) -> tuple[str, list[int]]:
    """Render the chat template and tokenize; a template that refuses the messages is the client's 400. With
    images (`vision`: the model's, None for a text-only model, which refuses them), each image's place in the
    rendered text (the boi token's text, which a template that loops over content writes for an image part, else
    `chat_template.IMAGE_MARKER`) becomes its block of placeholder tokens (`images.image_prompt_ids`)."""
    images = len(request.image_refs())
    taken = check_images(images, vision) if images else None  # before rendering: a text-only model refuses them
    extra = dict(request.chat_template_kwargs or {})
    if plan.template_tools is not None:
        extra.setdefault("tools", plan.template_tools)
    try:
        text = tokenizer.apply_chat_template(plan.messages, add_generation_prompt=add_generation_prompt, **extra)
    except Exception as exc:
        logger.info("chat template failed: %s", exc)
        raise ApiError(f"The chat template could not render these messages: {exc}", param="messages") from exc
    if taken is None:
        # The template writes the special tokens (BOS included) itself.
        return text, tokenizer.encode(text, add_special_tokens=False)
    source = tokenizer.chat_template_source(has_tools=bool(extra.get("tools")))
    parts = source is not None and takes_content_parts(source)
    marker = tokenizer.token_text(taken.boi_token_id) if parts else IMAGE_MARKER
    return text, image_prompt_ids(tokenizer, text, marker=marker, images=images, vision=taken)


async def request_images(request: ChatCompletionRequest, engine: Engine,
                         limits: ImageLimits) -> tuple[ImageInput, ...]:
    """The request's images, read and preprocessed in a worker thread (`images.load_images`); a 400 names the
    first that cannot be used."""
    refs = request.image_refs()
    if not refs:
        return ()
    return await asyncio.to_thread(load_images, refs, check_images(len(refs), engine.vision), limits)


def tool_plan(tokenizer: TextTokenizer, request: ChatCompletionRequest, features: ChatFeatures) -> ToolPlan:
    """What the request does about tools (the history as the template takes it, a forced call, the parser)."""
    try:
        return ToolPlan.make(
            [m.template_dict() for m in request.messages],
            request.tools,
            request.tool_choice,
            parallel=request.parallel_tool_calls is not False,
            template_source=tokenizer.chat_template_source(has_tools=bool(request.tools)),
            features=features,
        )
    except GrammarError as e:
        raise ApiError(f"{e}.", param=e.param) from None


async def create_chat_completion(
    body: dict[str, Any],
    *,
    engine: Engine,
    tokenizer: TextTokenizer,
    model: str,
    metrics: Metrics,
    arrived: float,
    features: ChatFeatures,
    image_limits: ImageLimits,
) -> Response:
    request = parse_request(ChatCompletionRequest, body, vocab_size=tokenizer.vocab_size)
    check_model(request.model, model)
    plan = tool_plan(tokenizer, request, features)
    prompt_text, ids = await asyncio.to_thread(chat_prompt, tokenizer, request, plan, vision=engine.vision)
    prompt_ids = tuple(ids)
    max_tokens = token_budget(
        len(prompt_ids), request.requested_max_tokens, engine.max_model_len, default=None, param="messages"
    )
    images = await request_images(request, engine, image_limits)
    top_n = (request.top_logprobs or 0) if request.logprobs else None
    request_id = new_id("chatcmpl")
    keep = features.keep_ids(tools=plan.parser is not None)

    def params(i: int) -> SamplingParams:
        p = request.sampling_params(max_tokens=max_tokens, seed=choice_seed(request.seed, i), logprobs=top_n)
        return p if plan.grammar is None else dataclasses.replace(p, grammar=plan.grammar)

    choices = [
        Choice(
            index=i,
            request=GenerationRequest(f"{request_id}-{i}", prompt_ids, params(i), images),
            text=ChoiceText.for_request(tokenizer, request, keep=keep),
        )
        for i in range(request.n or 1)
    ]
    runner = ChoiceRunner(engine, choices, metrics, arrived=arrived)
    await runner.start()
    head = {"id": request_id, "created": int(time.time()), "model": model}
    answer = functools.partial(
        AnswerReader, reasoning=features.reasoning_parser, tools=plan.parser, prompt=prompt_text
    )
    if request.stream:
        stream = _stream(runner, tokenizer, head, top_n, len(prompt_ids), answer, include_usage=request.include_usage)
        return sse_response(stream)
    read = functools.partial(read_answer, reasoning=features.reasoning_parser, tools=plan.parser, prompt=prompt_text)
    return await _collect(runner, tokenizer, head, top_n, len(prompt_ids), read)


async def _collect(
    runner: ChoiceRunner,
    tokenizer: TextTokenizer,
    head: dict[str, Any],
    top_n: int | None,
    prompt_tokens: int,
    read: Callable[..., tuple[dict[str, Any], str]],
) -> Response:
    n = len(runner.choices)
    texts = [""] * n
    entries: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    async with aclosing(runner.updates()) as updates:
        async for update in updates:
            texts[update.index] += update.piece.text
            entries[update.index] += update.piece.logprobs
            finish[update.index] = update.piece.finish_reason or finish[update.index]
    answers = [read(texts[i], finish_reason=finish[i] or "stop") for i in range(n)]
    body = {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "message": message,
                "logprobs": None if top_n is None else _logprobs(chat_logprobs(tokenizer, entries[i], top_n)),
                "finish_reason": reason,
            }
            for i, (message, reason) in enumerate(answers)
        ],
        "usage": usage(prompt_tokens, runner.completion_tokens),
    }
    return json_response(body)


async def _stream(
    runner: ChoiceRunner,
    tokenizer: TextTokenizer,
    head: dict[str, Any],
    top_n: int | None,
    prompt_tokens: int,
    answer: Callable[[], AnswerReader],
    *,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    base = {**head, "object": "chat.completion.chunk"}
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({**base, "choices": [choice]})

    readers = [answer() for _ in runner.choices]
    try:
        for i in range(len(runner.choices)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async with aclosing(runner.updates()) as updates:
            async for update in updates:
                piece, reader = update.piece, readers[update.index]
                delta = reader.feed(piece.text)
                finish_reason = None
                if piece.finish_reason is not None:
                    tail, finish_reason = reader.finish(piece.finish_reason)
                    delta = _joined(delta, tail)
                # The finish reason rides on the chunk with the last tokens (vLLM's form); an empty delta of its
                # own only when the end brought nothing to send (a stop string cut it, or only EOS came). A chunk
                # whose text a parser holds back still carries its tokens' logprobs.
                if delta or piece.logprobs or finish_reason is not None:
                    logprobs = None
                    if top_n is not None and piece.logprobs:
                        logprobs = _logprobs(chat_logprobs(tokenizer, piece.logprobs, top_n))
                    yield chunk(update.index, delta, logprobs, finish_reason)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, runner.completion_tokens)})
        yield SSE_DONE
    except Exception as exc:
        yield stream_error(exc)


def _logprobs(content: list[ChatTokenLogprob]) -> dict[str, Any]:
    """A choice's `logprobs`: OpenAI's schema requires `refusal` beside `content` (null: we never refuse)."""
    return {"content": content, "refusal": None}


def _joined(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two deltas as one: texts joined, tool-call entries listed in order."""
    out = dict(first)
    for key, value in second.items():
        out[key] = out[key] + value if key in out else value
    return out
