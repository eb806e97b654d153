"""A deterministic stand-in for the engine, to drive the whole HTTP server in tests (as JetStream's mock engine).

It speaks `protocol.Engine` exactly: `generate` raises `QueueFullError` when `max_queue` requests are live, and
returns a stream that yields one `GenerationOutput` per "step" (after `delay_s`), honouring `max_tokens`, the
context length, end-of-sequence (`eos_after`, `ignore_eos`, `min_tokens`), `stop_token_ids`, `logprobs` and
`prompt_logprobs`. Closing a stream before its last output records its request id in `cancelled`: that is how
the tests see that the HTTP layer let go of a row (client disconnect, stop string).

The tokens are drawn (unless `answer` fixes them) from `pool` by a PRNG seeded from the prompt ids and, with temperature > 0, the seed (or,
without one, the request id, so `n` unseeded choices differ). `script(prompt_ids, params, request_id)` gives the
same sequence ahead of time, so a test can decode it and pick a stop string that spans tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import Sequence

from maxjax.serve.metrics import Metrics
from maxjax.serve.protocol import (
    Aborted,
    GenerationOutput,
    GenerationRequest,
    Pooling,
    QueueFullError,
    RequestRejected,
    SamplingParams,
    TokenLogprob,
    VisionInfo,
)
from maxjax.serve.request import Request, check_stop


class FakeEngine:
    def __init__(
        self,
        pool: Sequence[int],
        *,
        eos_token_id: int,
        model_name: str = "fake-model",
        max_model_len: int = 2048,
        delay_s: float = 0.0,
        max_queue: int | None = None,
        eos_after: int | None = None,
        tokens_per_step: int = 1,
        fail_after: int | None = None,
        nonfinite_logprobs: bool = False,
        metrics: Metrics | None = None,
        answer: Sequence[int] | None = None,
        vision: VisionInfo | None = None,
    ) -> None:
        """
        pool: token ids to generate from (ordinary text tokens make readable output).
        eos_after: emit the end-of-sequence token as the token after this many (None: never).
        tokens_per_step: tokens in each output (more than one exercises multi-token outputs).
        fail_after: raise RuntimeError after this many outputs (to test errors mid-stream).
        nonfinite_logprobs: put -inf and NaN among the logprobs (to test that the server clamps them).
        answer: every request gets these tokens in this order (repeated to its length) instead of random ones.
        vision: take images as this says (None: a text-only model); a request with images whose prompt does not
            hold `tokens_per_image` placeholders for each of them is refused, as the real engine refuses it.
        """
        assert pool, "the fake engine needs a non-empty token pool"
        self.pool = tuple(pool)
        self.eos_token_id = eos_token_id
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.delay_s = delay_s
        self.max_queue = max_queue
        self.eos_after = eos_after
        self.tokens_per_step = tokens_per_step
        self.fail_after = fail_after
        self.nonfinite_logprobs = nonfinite_logprobs
        self.metrics = metrics
        self.answer = tuple(answer or ())
        self.pooling = Pooling()
        self.vision = vision
        self.requests: list[GenerationRequest] = []
        self.live: set[str] = set()
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.aborting = False

    def generate(self, request: GenerationRequest) -> _FakeStream:
        if self.aborting:
            raise Aborted("the server is shutting down")
        if request.images:
            self._check_images(request)
        if self.max_queue is not None and len(self.live) >= self.max_queue:
            raise QueueFullError(f"{len(self.live)} requests are live (max_queue={self.max_queue})")
        self.requests.append(request)
        self.live.add(request.request_id)
        self._report()
        return _FakeStream(self, request)

    def _check_images(self, request: GenerationRequest) -> None:
        if self.vision is None:
            raise RequestRejected("this model does not take images", param="messages")
        placeholders = request.prompt_ids.count(self.vision.image_token_id)
        if placeholders != len(request.images) * self.vision.tokens_per_image:
            raise RequestRejected(f"the prompt holds {placeholders} image placeholders for {len(request.images)} "
                                  f"images of {self.vision.tokens_per_image} tokens", param="messages")

    def stop(self) -> None:
        """Nothing runs in the background."""

    def open_requests(self) -> int:
        return len(self.live)

    def abort_all(self) -> None:
        self.aborting = True

    def script(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str = "") -> list[int]:
        """The tokens a request would get, before any stopping rule (eos, stop ids, lengths) cuts them."""
        if self.answer:
            return [self.answer[i % len(self.answer)] for i in range(params.max_tokens)]
        rng = self._rng(prompt_ids, params, request_id)
        return [rng.choice(self.pool) for _ in range(params.max_tokens)]

    def _rng(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str) -> random.Random:
        if params.temperature == 0:
            salt = "greedy"
        else:
            salt = f"seed:{params.seed}" if params.seed is not None else f"id:{request_id}"
        digest = hashlib.sha256(f"{list(prompt_ids)}|{salt}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "little"))

    def _end(self, request_id: str, *, cancelled: bool) -> None:
        if request_id in self.live:
            self.live.discard(request_id)
            (self.cancelled if cancelled else self.finished).append(request_id)
            self._report()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.set_running_batch_size(len(self.live))
            self.metrics.set_queue_depth(0)

    def _logprob(self, rng: random.Random, token: int, k: int) -> TokenLogprob:
        logprob = -rng.uniform(0.01, 3.0)
        others = [t for t in self.pool if t != token]
        top = [(token, logprob)] + [(t, logprob - rng.uniform(0.1, 2.0) * (i + 1)) for i, t in enumerate(others[:k])]
        top = top[:k]
        if self.nonfinite_logprobs and k:
            # The last of the returned alternatives is always -inf; the token's own logprob is NaN half the time.
            top[-1] = (top[-1][0], -math.inf)
            logprob = math.nan if rng.random() < 0.5 else logprob
        return TokenLogprob(token, logprob, tuple(top))


class _FakeStream:
    """One request's outputs; `aclose()` before the last one is a cancellation."""

    def __init__(self, engine: FakeEngine, request: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        p = request.params
        self.tokens = engine.script(request.prompt_ids, p, request.request_id)
        self.rng = engine._rng(request.prompt_ids, p, request.request_id + "/logprobs")
        self.state = Request(request.request_id, list(request.prompt_ids), p)
        self.outputs = 0
        self.done = False

    def __aiter__(self) -> _FakeStream:
        return self

    async def __anext__(self) -> GenerationOutput:
        if self.done:
            raise StopAsyncIteration
        engine, p = self.engine, self.request.params
        await asyncio.sleep(self.engine.delay_s)
        if engine.aborting:
            engine._end(self.request.request_id, cancelled=True)
            self.done = True
            raise Aborted("the server shut down before this request finished")
        if engine.fail_after is not None and self.outputs >= engine.fail_after:
            engine._end(self.request.request_id, cancelled=False)
            self.done = True
            raise RuntimeError("the fake engine failed, as asked")
        ids: list[int] = []
        while len(ids) < engine.tokens_per_step and not self.state.finished:
            n = self.state.generated
            if engine.eos_after is not None and n == engine.eos_after and n >= p.min_tokens and not p.ignore_eos:
                token = engine.eos_token_id
            else:
                token = self.tokens[n] if n < len(self.tokens) else engine.pool[0]
            ids.append(token)
            self.state.tokens.append(token)
            check_stop(self.state, eos_token_ids=frozenset({engine.eos_token_id}), max_length=engine.max_model_len)
        finish = self.state.finish_reason
        logprobs = None
        if p.logprobs is not None:
            logprobs = tuple(engine._logprob(self.rng, t, p.logprobs) for t in ids)
        prompt_logprobs = None
        if p.prompt_logprobs is not None and self.outputs == 0:
            prompt = self.request.prompt_ids
            prompt_logprobs = (None,) + tuple(engine._logprob(self.rng, t, p.prompt_logprobs) for t in prompt[1:])
        self.outputs += 1
        if finish is not None:
            self.done = True
            engine._end(self.request.request_id, cancelled=False)
        return GenerationOutput(tuple(ids), logprobs, prompt_logprobs, finish, self.state.stop_token)

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.engine._end(self.request.request_id, cancelled=True)
