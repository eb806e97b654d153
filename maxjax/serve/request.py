"""The engine's request: one object from admission to the end, and the one rule that says it stopped.

A `Request` carries what the client asked for (`params`, the prompt), what it has produced (`tokens`, the
per-token `counts` penalties read), where it stands (`status`, `finish_reason`), a slot for per-request logit
state (a grammar matcher, later), and the scheduler's bookkeeping (`cached`, `pages`, prefix-cache fields),
which only the scheduler changes. Pure Python: the scheduler and its tests use it without JAX.

`check_stop` is the only place that decides a request finished by what it generated; cancelling sets
`abort` (`Request.abort`). The HTTP side keeps only stop strings, which need the text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maxjax.serve.protocol import FinishReason, SamplingParams, TokenLogprob

PageHash = bytes


class Status(enum.Enum):
    WAITING = "waiting"
    """Queued: no batch row or pages yet."""
    RUNNING = "running"
    """Holds a batch row and the pages for its whole possible length."""
    FINISHED = "finished"
    """Done (`finish_reason` says why); the scheduler releases it at the next `update`."""


@dataclass(eq=False)
class Request:
    """One request as the engine and the scheduler track it (compared by identity)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    row: Any = None
    """The request's values converted into the step arrays' types (`admission.admit` sets it)."""
    tokens: list[int] = field(default_factory=list)
    """Prompt followed by the generated tokens."""
    counts: dict[int, int] = field(default_factory=dict)
    """Times each token was generated, in the order each was last generated (kept only when penalties or bans
    read them: updated per token, never rebuilt from the context)."""
    prompt_tokens: tuple[int, ...] = ()
    """Distinct prompt tokens, most recent first (repetition penalty only)."""
    prompt_set: frozenset[int] = frozenset()
    """The same, as a set (repetition penalty only)."""
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """Filled chunk by chunk during prefill when the request asked for them."""
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    stop_token: int | None = None
    """The stop or end-of-sequence token that ended the request, when one did."""
    logit_state: Any = None
    """Per-request state the logits depend on beyond the arrays (a grammar matcher); None for plain requests."""
    # The scheduler's bookkeeping (serve/scheduler.py changes these, nothing else does).
    cached: int = 0
    """Tokens whose keys and values are in the cache, or will be once the steps already dispatched ran."""
    batch_row: int = 0
    """The request's row in the persistent batch while it runs (1..max_batch_size; 0: none)."""
    pages: list[int] = field(default_factory=list)
    prefix_hit: int = 0
    """Prompt tokens found in the prefix cache at admission."""
    registered: int = 0
    """Full prompt pages already registered in the prefix table."""
    hashes: list[PageHash] | None = None
    """Chained hashes of the shareable prompt pages, computed once."""
    pooled: Any = None
    """An embedding request's running pool over the chunks prefilled so far (`pool_chunk`)."""
    images: tuple[Any, ...] = ()
    """The request's `ImageInput`s, in prompt order (`admission.admit` checks them against `image_spans`)."""
    image_spans: tuple[tuple[int, int], ...] = ()
    """[start, end) of each image's soft tokens in the prompt: a prefill chunk never ends inside one, so that
    the tokens of one image see each other (`chunk`)."""
    image_slots: dict[int, int] = field(default_factory=dict)
    """Image index -> its slot in the device's image table, while its soft tokens are being prefilled."""
    key_prompt: list[int] = field(init=False)
    """The prompt as the prefix cache knows it: an image's positions hold keys made from its content
    (negative, so no token id equals one), so that a page is shared only where the same pictures are."""
    reuse_prefix: bool = field(init=False)
    """False when every prompt position must be computed (prompt logprobs, mean or first-token pooling)."""
    prefilled_alone: bool = field(init=False)
    """Prompt logprobs are scored for a prefill step's only row."""

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        self.key_prompt = self.prompt
        if self.images:
            self.key_prompt = list(self.prompt)
            for image, (start, end) in zip(self.images, self.image_spans, strict=True):
                base = int.from_bytes(image.digest[:7], "little") << 12  # room for 4096 tokens an image
                self.key_prompt[start:end] = [-1 - base - j for j in range(end - start)]
        embed = self.params.embed
        self.prefilled_alone = self.params.prompt_logprobs is not None
        self.reuse_prefix = not self.prefilled_alone and (embed is None or embed.kind == "last")

    def pool_chunk(self, hidden: np.ndarray, start: int) -> None:
        """Fold in the hidden states [n, D] of prompt positions start .. start + n - 1 (an embedding request)."""
        kind = self.params.embed.kind if self.params.embed is not None else "last"
        if kind == "mean":
            self.pooled = hidden.sum(axis=0) + (0.0 if self.pooled is None else self.pooled)
        elif kind == "cls":
            self.pooled = hidden[0].copy() if start == 0 else self.pooled
        else:
            self.pooled = hidden[-1].copy()

    def embedding(self) -> tuple[float, ...]:
        """The pooled vector once the whole prompt is in (mean divided by the length; normalized if asked)."""
        embed = self.params.embed
        vector = np.asarray(self.pooled, np.float64)
        if embed is not None and embed.kind == "mean":
            vector = vector / len(self.prompt)
        if embed is None or embed.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return tuple(vector.astype(np.float32).tolist())

    @property
    def key_tokens(self) -> list[int]:
        """`tokens` as the prefix cache knows them (`key_prompt`, then the answer)."""
        return self.tokens if not self.images else self.key_prompt + self.tokens[len(self.prompt):]

    def chunk(self, n: int) -> int:
        """The longest prompt chunk of at most `n` tokens from `cached` on that does not end inside an image (0:
        the next image does not fit in `n`)."""
        end = self.cached + n
        for start, stop in self.image_spans:
            if start < end < stop:
                return max(start - self.cached, 0)
        return n

    def images_in(self, n: int) -> list[int]:
        """The images whose soft tokens are among the next `n` prompt tokens (their indices)."""
        return [i for i, (start, stop) in enumerate(self.image_spans) if start < self.cached + n and stop > self.cached]

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def in_prefill(self) -> bool:
        return self.cached < len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: FinishReason, stop_token: int | None = None) -> None:
        self.status, self.finish_reason, self.stop_token = Status.FINISHED, reason, stop_token

    def abort(self) -> None:
        """Cancelled (the client went away, a stop string matched, the server is shutting down)."""
        if not self.finished:
            self.finish("abort")


def check_stop(request: Request, *, eos_token_ids: frozenset[int], max_length: int) -> FinishReason | None:
    """Whether the request's newest token ended it, and why; sets its status and finish reason when it did.

    - `stop`: the token is one of `stop_token_ids`, or an end-of-sequence token (unless `ignore_eos`), and at
      least `min_tokens` were generated (the sampler bans those tokens before that; this holds either way).
    - `stop`, for a request with a grammar (`logit_state`, already advanced past the token): the answer is
      complete, because nothing but EOS can follow it, or the token is EOS (which its mask allows only then,
      `ignore_eos` or not).
    - `length`: `max_tokens` generated, or the sequence reached `max_length` (the context).
    """
    p = request.params
    token = request.tokens[-1]
    eos = token in eos_token_ids
    grammar = request.logit_state
    if request.generated >= p.min_tokens and (token in p.stop_token_ids or (eos and not p.ignore_eos)):
        request.finish("stop", token)
    elif grammar is not None and (eos or grammar.is_finished()):
        request.finish("stop", token if eos else None)
    elif request.generated >= p.max_tokens or len(request.tokens) >= max_length:
        request.finish("length")
    return request.finish_reason
