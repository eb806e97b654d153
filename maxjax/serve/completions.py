"""`POST /v1/completions`: raw prompts in, continuations out (whole, or streamed as SSE).

The path: validate (`CompletionRequest`, then `.check`) → tokenize text prompts with the model's special tokens
(BOS where the model wants one; token-id prompts go in as given) → a token budget per prompt (`max_tokens`,
default 16) → `len(prompts) * n` engine requests, choice `i * n + j` being the j-th sample of prompt i → collect
or stream `text_completion` objects.

`echo` puts the prompt in front of each choice's text. With `echo` and `logprobs`, the prompt's tokens get
logprobs too (the engine's `prompt_logprobs`; the first prompt token has none, so null), and `text_offset`
counts from the start of the echoed prompt. The logprobs are OpenAI's legacy shape:
`{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from quart import Response

from maxjax.serve.choices import (
    SSE_DONE,
    Choice,
    ChoiceRunner,
    Update,
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
from maxjax.serve.metrics import Metrics
from maxjax.serve.protocol import Engine, GenerationRequest, TokenLogprob
from maxjax.serve.schemas import CompletionLogprobs, CompletionRequest, parse_request
from maxjax.serve.text import ChoiceText, TextTokenizer, completion_logprobs, prompt_offsets

DEFAULT_MAX_TOKENS = 16


@dataclass
class _Prompt:
    ids: tuple[int, ...]
    echo: str = ""
    """The text put in front of each choice (empty without `echo`)."""
    offsets: list[int] = field(default_factory=list)
    """Each prompt token's character offset in `echo` (only with `echo` and `logprobs`)."""


def _prepare_prompts(tokenizer: TextTokenizer, request: CompletionRequest) -> list[_Prompt]:
    prompts = []
    for prompt in request.prompt:
        ids = tuple(tokenizer.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else prompt)
        item = _Prompt(ids)
        if request.echo:
            text, offsets = prompt_offsets(tokenizer, ids, special=not isinstance(prompt, str))
            item.echo = prompt if isinstance(prompt, str) else text
            item.offsets = offsets if request.logprobs is not None else []
        prompts.append(item)
    return prompts


async def create_completion(
    body: dict[str, Any],
    *,
    engine: Engine,
    tokenizer: TextTokenizer,
    model: str,
    metrics: Metrics,
    arrived: float,
) -> Response:
    request = parse_request(CompletionRequest, body, vocab_size=tokenizer.vocab_size)
    check_model(request.model, model)
    prompts = await asyncio.to_thread(_prepare_prompts, tokenizer, request)
    top_n = request.logprobs
    prompt_logprobs = top_n if request.echo else None
    n = request.n or 1
    request_id = new_id("cmpl")
    choices = []
    for i, prompt in enumerate(prompts):
        max_tokens = token_budget(
            len(prompt.ids), request.max_tokens, engine.max_model_len, default=DEFAULT_MAX_TOKENS, param="prompt"
        )
        for j in range(n):
            params = request.sampling_params(
                max_tokens=max_tokens, seed=choice_seed(request.seed, j), logprobs=top_n, prompt_logprobs=prompt_logprobs
            )
            text = ChoiceText.for_request(tokenizer, request, offset=len(prompt.echo))
            index = i * n + j
            choices.append(Choice(index, GenerationRequest(f"{request_id}-{index}", prompt.ids, params), text))
    runner = ChoiceRunner(engine, choices, metrics, arrived=arrived)
    await runner.start()
    head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model}
    view = _View(tokenizer, [prompts[i // n] for i in range(len(choices))], top_n, echo=bool(request.echo))
    prompt_tokens = sum(len(p.ids) for p in prompts)
    if request.stream:
        stream = _stream(runner, view, head, prompt_tokens, include_usage=request.include_usage)
        return sse_response(stream)
    return await _collect(runner, view, head, prompt_tokens)


class _View:
    """Turns a choice's updates into (text, legacy logprobs), putting the echoed prompt before the first one."""

    def __init__(self, tokenizer: TextTokenizer, prompts: Sequence[_Prompt], top_n: int | None, *, echo: bool) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.top_n = top_n
        self.echo = echo
        self.started = [False] * len(prompts)

    def render(self, update: Update) -> tuple[str, CompletionLogprobs | None]:
        piece, prompt = update.piece, self.prompts[update.index]
        text = piece.text
        ids: list[int] = list(piece.token_ids)
        entries: list[TokenLogprob | None] = list(piece.logprobs)
        offsets = list(piece.offsets)
        if self.echo and not self.started[update.index]:
            text = prompt.echo + text
            if self.top_n is not None:
                if update.prompt_logprobs is None or len(update.prompt_logprobs) != len(prompt.ids):
                    raise RuntimeError("the engine sent no prompt logprobs (or the wrong number) for echo")
                ids = list(prompt.ids) + ids
                entries = list(update.prompt_logprobs) + entries
                offsets = prompt.offsets + offsets
        self.started[update.index] = True
        if self.top_n is None:
            return text, None
        return text, completion_logprobs(self.tokenizer, ids, entries, offsets, self.top_n)


def _merge(into: CompletionLogprobs | None, more: CompletionLogprobs | None) -> CompletionLogprobs | None:
    if into is None or more is None:
        return more if into is None else into
    into["tokens"] += more["tokens"]
    into["token_logprobs"] += more["token_logprobs"]
    into["top_logprobs"] += more["top_logprobs"]
    into["text_offset"] += more["text_offset"]
    return into


async def _collect(runner: ChoiceRunner, view: _View, head: dict[str, Any], prompt_tokens: int) -> Response:
    n = len(runner.choices)
    texts = [""] * n
    logprobs: list[CompletionLogprobs | None] = [None] * n
    finish: list[str | None] = [None] * n
    async with aclosing(runner.updates()) as updates:
        async for update in updates:
            text, lp = view.render(update)
            texts[update.index] += text
            logprobs[update.index] = _merge(logprobs[update.index], lp)
            finish[update.index] = update.piece.finish_reason or finish[update.index]
    choices = [
        {"index": i, "text": texts[i], "logprobs": logprobs[i], "finish_reason": finish[i]} for i in range(n)
    ]
    return json_response({**head, "choices": choices, "usage": usage(prompt_tokens, runner.completion_tokens)})


async def _stream(
    runner: ChoiceRunner, view: _View, head: dict[str, Any], prompt_tokens: int, *, include_usage: bool
) -> AsyncIterator[bytes]:
    base = {**head, "usage": None} if include_usage else head

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, finish_reason: str | None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({**base, "choices": [choice]})

    try:
        async with aclosing(runner.updates()) as updates:
            async for update in updates:
                text, logprobs = view.render(update)
                # The finish reason rides on the chunk with the last tokens (vLLM's form); a chunk of its own
                # only when the end brought nothing to send (a stop string cut it, or only EOS came).
                if text or logprobs or update.piece.finish_reason is not None:
                    yield chunk(update.index, text, logprobs, update.piece.finish_reason)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(prompt_tokens, runner.completion_tokens)})
        yield SSE_DONE
    except Exception as exc:
        yield stream_error(exc)
