"""Admission: the one place where what a request carries becomes step inputs.

`admit` checks every value against the range of the array it goes into and converts it once (`_Row`, kept on the
`Request`), so building a step never raises for a request's values: a bad value is that request's
`RequestRejected` (a 400), nobody else's. `EngineCore.admit` calls it on the HTTP thread, before anything is
queued, and adds the checks that need the engine (the pool's size, the grammar).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from maxjax.graph.sampling import TOP_LOGPROBS
from maxjax.serve.protocol import INT32_MAX, GenerationRequest, RequestRejected, SamplingParams, VisionInfo
from maxjax.serve.request import Request


@dataclass(frozen=True)
class _Row:
    """A request's values in the dtypes of the step's per-row arrays, converted once, at admission."""

    temperature: np.float32
    top_p: np.float32
    top_k: np.int32
    min_p: np.float32
    seed: np.uint32
    presence: np.float32
    frequency: np.float32
    repetition: np.float32
    logit_bias: dict[int, float]
    adjusts: bool
    """The request edits its logits (penalties, biases, bans): its rows need the adjustment slots, and its
    next step the tokens sampled before it (`EngineCore.step` waits for them)."""


def admit(request: GenerationRequest, vocab_size: int, vision: VisionInfo | None = None) -> Request:
    """The one place where what a request carries becomes step inputs: every value is checked against the range
    of the array it goes into (token ids against the vocabulary and int32, top_k capped at the vocabulary, the
    seed folded into the key's 32 bits) and converted here, so building a step never raises for a request.
    Raises `RequestRejected` naming the field: that request's 400, nobody else's."""
    p = request.params

    def number(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> np.float32:
        if not (lo < value if lo_open else lo <= value) or not value <= hi or not math.isfinite(value):
            raise RequestRejected(f"{name} {value!r} is out of range: use {lo} to {hi}", param=name)
        return np.float32(value)

    def token_ids(name: str, ids: Iterable[int]) -> None:
        if any(not 0 <= t < vocab_size for t in ids):
            raise RequestRejected(f"{name} has a token id outside the vocabulary (size {vocab_size})", param=name)

    token_ids("prompt", request.prompt_ids)
    token_ids("logit_bias", p.logit_bias)
    token_ids("stop_token_ids", p.stop_token_ids)
    if not request.prompt_ids:
        raise RequestRejected("the prompt is empty", param="prompt")
    if not 1 <= p.max_tokens <= INT32_MAX:
        raise RequestRejected(f"max_tokens {p.max_tokens} is out of range: use 1 to {INT32_MAX}", param="max_tokens")
    if not 0 <= p.min_tokens <= INT32_MAX:
        raise RequestRejected(f"min_tokens {p.min_tokens} is out of range: use 0 to {INT32_MAX}", param="min_tokens")
    if not 0 <= p.top_k <= INT32_MAX:
        raise RequestRejected(f"top_k {p.top_k} is out of range: use 0 (off) to {INT32_MAX}", param="top_k")
    for name, k in (("logprobs", p.logprobs), ("prompt_logprobs", p.prompt_logprobs)):
        if k is not None and not 0 <= k <= TOP_LOGPROBS:
            raise RequestRejected(f"{name} {k} is out of range: use 0 to {TOP_LOGPROBS}", param=name)
    row = _Row(
        temperature=number("temperature", p.temperature, 0.0, 2.0),
        top_p=number("top_p", p.top_p, 0.0, 1.0, lo_open=True),
        top_k=np.int32(min(p.top_k, vocab_size)),
        min_p=number("min_p", p.min_p, 0.0, 1.0),
        seed=np.uint32((p.seed if p.seed is not None else random.getrandbits(32)) % 2**32),
        presence=number("presence_penalty", p.presence_penalty, -2.0, 2.0),
        frequency=number("frequency_penalty", p.frequency_penalty, -2.0, 2.0),
        repetition=number("repetition_penalty", p.repetition_penalty, 0.0, 10.0, lo_open=True),
        logit_bias={t: float(number("logit_bias", b, -100.0, 100.0)) for t, b in p.logit_bias.items()},
        adjusts=_adjusts(p),
    )
    spans = image_spans(request, vision)
    req = Request(request.request_id, list(request.prompt_ids), p, row=row, images=request.images, image_spans=spans)
    if p.repetition_penalty != 1.0:
        req.prompt_tokens = tuple(dict.fromkeys(reversed(request.prompt_ids)))
        req.prompt_set = frozenset(req.prompt_tokens)
    return req


def image_spans(request: GenerationRequest, vision: VisionInfo | None) -> tuple[tuple[int, int], ...]:
    """[start, end) of each image's soft tokens in the prompt: the runs of the image placeholder, one per image,
    each `tokens_per_image` long; `RequestRejected` when the prompt and the images disagree."""
    if vision is None:
        if request.images:
            raise RequestRejected("this model does not take images: send text only", param="messages")
        return ()
    ids = np.asarray(request.prompt_ids)
    is_image = np.concatenate([[False], ids == vision.image_token_id, [False]])
    edges = np.flatnonzero(is_image[1:] != is_image[:-1])
    spans = tuple(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
    m = vision.tokens_per_image
    if len(spans) != len(request.images) or any(stop - start != m for start, stop in spans):
        raise RequestRejected(
            f"the prompt holds {int(is_image.sum())} image tokens in {len(spans)} runs for {len(request.images)} "
            f"images: each image takes one run of {m}", param="messages")
    return spans


def _adjusts(p: SamplingParams) -> bool:
    """Whether the request edits its logits (penalties, biases, bans), so its rows need the adjustment slots."""
    return bool(p.logit_bias or p.min_tokens or p.presence_penalty or p.frequency_penalty
                or p.repetition_penalty != 1.0)
