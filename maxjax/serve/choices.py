"""Running the choices of one request on the engine; what chat and completions share.

A request with `n` choices (times the number of prompts, for completions) becomes that many engine requests,
`<id>-<index>`, each with its own seed (`seed + j` for the j-th choice of a prompt, so a prompt's first choice
is the same whether or not other prompts or choices ride along). `ChoiceRunner`:

1. `start()` submits them all before any byte of the response is sent, so a full queue is a real 429 with
   Retry-After (the engine raises `QueueFullError` from `generate`); on failure it closes what it submitted.
2. `updates()` drives one task per choice, each turning engine outputs into `Piece`s (`text.ChoiceText`), and
   yields them merged in arrival order as `Update`s. A choice whose stop string matched has its engine iterator
   closed at once (the engine frees its row).
3. However `updates()` ends - finished, an error, or the client went away (Quart closes the response generator,
   which cancels the tasks) - every engine iterator is closed before it returns. A runner whose `updates()`
   never starts (the client left before the first byte of a stream) is closed by a timer after
   `UNSTARTED_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from quart import Response

from maxjax.serve.errors import ApiError, internal_error, model_error, queue_full, shutting_down
from maxjax.serve.metrics import Metrics
from maxjax.serve.protocol import (
    Aborted,
    Engine,
    GenerationOutput,
    GenerationRequest,
    QueueFullError,
    RequestRejected,
    TokenLogprob,
)
from maxjax.serve.schemas import Usage
from maxjax.serve.text import ChoiceText, Piece

logger = logging.getLogger(__name__)



def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def choice_seed(seed: int | None, j: int) -> int | None:
    return None if seed is None else seed + j


def token_budget(prompt_len: int, requested: int | None, max_model_len: int, *, default: int | None, param: str) -> int:
    """How many tokens a choice may generate: what was asked if it fits, else 400 `context_length_exceeded`.

    With nothing asked, `default` (completions: 16) or the rest of the context (chat), cut to what fits.
    """
    room = max_model_len - prompt_len
    if room < 1:
        raise ApiError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has {prompt_len} "
            "tokens. Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ApiError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion). "
            "Shorten the prompt or lower max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def dumps(payload: Any) -> bytes:
    """JSON for the wire. `allow_nan=False`: a NaN that got this far is a bug, and must not reach a client."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sse(payload: Any) -> bytes:
    """One server-sent event."""
    return b"data: " + dumps(payload) + b"\n\n"


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(payload), status=status, headers=headers, content_type="application/json")


SSE_DONE = b"data: [DONE]\n\n"


def sse_response(events: AsyncIterator[bytes]) -> Response:
    """A streamed answer: server-sent events, never cached."""
    return Response(events, content_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def stream_error(exc: BaseException) -> bytes:
    """The event a client gets when something fails after the 200 and the first bytes went out."""
    if not isinstance(exc, ApiError):
        logger.exception("request failed while streaming", exc_info=exc)
        exc = internal_error(exc)
    return sse(exc.body())


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Choice:
    """One engine request and the text it builds."""

    index: int
    request: GenerationRequest
    text: ChoiceText


@dataclass
class Update:
    index: int
    piece: Piece
    prompt_logprobs: Sequence[TokenLogprob | None] | None = None
    """Only on a choice's first update, when the engine sent them."""
    embedding: tuple[float, ...] | None = None
    """An embedding request's vector (its one update)."""


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


UNSTARTED_TIMEOUT_S = 10.0
"""How long submitted engine requests wait for `ChoiceRunner.updates()` before they are closed."""


class ChoiceRunner:
    def __init__(self, engine: Engine, choices: Sequence[Choice], metrics: Metrics, *, arrived: float,
                 unstarted_timeout: float = UNSTARTED_TIMEOUT_S) -> None:
        """`arrived`: `time.perf_counter()` when the request came in (time to first token counts from there)."""
        self.engine = engine
        self.choices = list(choices)
        self.metrics = metrics
        self.arrived = arrived
        self.iterators: list[AsyncIterator[GenerationOutput]] = []
        self.completion_tokens = 0
        self._closed = False
        self.unstarted_timeout = unstarted_timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        """The watchdog's close, referenced until it is done."""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # A streamed response whose body never starts (the client left between the headers and the first byte)
        # never runs `updates()`: close its engine requests after a while anyway, or their rows would generate
        # for no one. `updates()` starts within microseconds of the headers when the client is there.
        self._watchdog = loop.call_later(self.unstarted_timeout, self._close_if_unstarted)
        try:
            for choice in self.choices:
                self.iterators.append(self.engine.generate(choice.request))
        except RequestRejected as exc:
            await self.close()
            raise ApiError(str(exc), param=exc.param) from None
        except Aborted as exc:
            await self.close()
            raise shutting_down(str(exc)) from None
        except QueueFullError as exc:
            await self.close()
            raise queue_full() from exc
        self.metrics.count_tokens(prompt=sum(len(c.request.prompt_ids) for c in self.choices))

    async def close(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await _aclose_all(self.iterators)

    def _close_if_unstarted(self) -> None:
        if not self._closed:
            logger.info("closing %d engine requests whose response body never started", len(self.iterators))
            task = asyncio.ensure_future(self.close())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def updates(self) -> AsyncGenerator[Update, None]:
        queue: asyncio.Queue[Update | _Failed | None] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._drive(choice, it, queue), name=choice.request.request_id)
            for choice, it in zip(self.choices, self.iterators, strict=True)
        ]
        running = len(tasks)
        self._closed = True  # from here on the tasks own the iterators and close them
        if self._watchdog is not None:
            self._watchdog.cancel()
        try:
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, _Failed):
                    raise item.exc
                else:
                    self.completion_tokens += len(item.piece.token_ids)
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            # Each task closes its engine iterator on the way out; wait for that before the response ends.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drive(
        self, choice: Choice, it: AsyncIterator[GenerationOutput], queue: asyncio.Queue[Update | _Failed | None]
    ) -> None:
        last = None
        try:
            async for output in it:
                now = time.perf_counter()
                if last is None:
                    self.metrics.observe_first_token(now - self.arrived)
                elif output.token_ids:
                    self.metrics.observe_inter_token((now - last) / len(output.token_ids))
                first = last is None
                last = now
                piece = choice.text.add(output)
                self.metrics.count_tokens(generated=len(piece.token_ids))
                queue.put_nowait(Update(choice.index, piece, output.prompt_logprobs if first else None,
                                        output.embedding))
                if piece.finish_reason is not None:
                    break  # finished, or a stop string matched: closing the iterator (below) frees the row
            else:
                raise RuntimeError(f"engine ended request {choice.request.request_id} without a finish reason")
            queue.put_nowait(None)
        except Aborted as exc:
            queue.put_nowait(_Failed(shutting_down(str(exc))))
        except QueueFullError as exc:  # an engine that raises it on the first step rather than in generate()
            queue.put_nowait(_Failed(ApiError(str(exc) or "The server is busy.", status=429, type="rate_limit_error")))
        except Exception as exc:
            queue.put_nowait(_Failed(exc))
        finally:
            await _aclose(it)


async def _aclose_all(iterators: Sequence[AsyncIterator[Any]]) -> None:
    for it in iterators:
        await _aclose(it)


async def _aclose(it: AsyncIterator[Any]) -> None:
    """Close an engine iterator (cancelling its request); never let a failure to close hide the real outcome."""
    aclose = getattr(it, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("closing an engine iterator failed")


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise model_error(requested)

