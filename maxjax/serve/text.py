"""From token ids to the text of one choice: detokenize, cut at stop strings, format logprobs.

The engine hands back token ids a step at a time (`GenerationOutput`); `ChoiceText.add` turns each output into a
`Piece`: the text that may be shown now, the tokens it used, their logprobs, and a finish reason once the choice
is over. Two things are held back, never shown early:

- bytes that do not yet form a whole UTF-8 character (the tokenizer's incremental detokenizer holds them);
- text that could be the start of a stop string (`StopMatcher`): a stop string spanning several tokens never
  appears, not even partly, in a delta or in the final text. With `include_stop_str_in_output` the stop string
  itself is kept, but text is still held until it is known whether it completes one.

Tokens are fed one at a time, so a stop string is found at the token that completes it; later tokens of the
same engine output are dropped and not counted. Special tokens (end-of-sequence, chat markers) never reach the
text, except those a parser reads (`keep`: `[TOOL_CALLS]`, `<think>` and the like, where they are special); the
token that ended generation (an end-of-sequence or `stop_token_ids` id) is left out of the text too, but it is
counted in usage and has its logprob, as with vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from maxjax.serve.protocol import LOGPROB_FLOOR, FinishReason, GenerationOutput, TokenLogprob
from maxjax.serve.schemas import ChatTokenLogprob, CompletionLogprobs, SamplingRequest, TopLogprob


def finite_logprob(value: float) -> float:
    """Clamp a logprob into [LOGPROB_FLOOR, 0]; NaN becomes the floor."""
    if math.isnan(value):
        return LOGPROB_FLOOR
    return min(max(value, LOGPROB_FLOOR), 0.0)


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class TextTokenizer(Protocol):
    """The part of `maxjax.tokenizer.Tokenizer` the HTTP layer uses (a protocol, so tests can use small fakes)."""

    vocab_size: int
    eos_token_ids: frozenset[int]

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def token_text(self, token_id: int) -> str: ...
    def is_special(self, token_id: int) -> bool: ...
    def chat_template_source(self, template: str | None = None, *, has_tools: bool = False) -> str | None: ...
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        template: str | None = None,
        **extra: Any,
    ) -> str: ...
    def detokenizer(self, *, skip_special_tokens: bool = False, continuation: bool = False) -> Detokenizer: ...


class StopMatcher:
    """Releases text only once it cannot be the start of a stop string."""

    def __init__(self, stops: Sequence[str], *, include_stop: bool = False) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include_stop = include_stop
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to show, whether a stop string matched). After a match, stop pushing."""
        pending = self.held + text
        if not self.stops:
            self.held = ""
            return pending, False
        # Earlier text was released only when it could not start a stop string, so a match lies within `pending`.
        match: tuple[int, int] | None = None
        for stop in self.stops:
            at = pending.find(stop)
            if at >= 0 and (match is None or (at, len(stop)) < match):
                match = (at, len(stop))
        if match is not None:
            at, length = match
            self.held = ""
            return pending[: at + length if self.include_stop else at], True
        hold = max((self._overlap(pending, stop) for stop in self.stops), default=0)
        self.held = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """Length of the longest proper prefix of `stop` that `text` ends with."""
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return k
        return 0

    def flush(self) -> str:
        """The held text, once the choice ends without a match (it was not a stop string after all)."""
        held, self.held = self.held, ""
        return held


@dataclass
class Piece:
    """What one engine output adds to a choice."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per token in `token_ids` when logprobs were asked for, else empty."""
    offsets: list[int] = field(default_factory=list)
    """Character offset of each token's text in the choice's text (the legacy `text_offset`)."""
    finish_reason: FinishReason | None = None


class ChoiceText:
    """The running text of one choice. Feed it every `GenerationOutput`, in order."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        offset: int = 0,
        keep: frozenset[int] = frozenset(),
    ) -> None:
        """`offset`: characters already in front of this choice's text (the echoed prompt), for `text_offset`.
        `keep`: special tokens whose text stays in (markers a tool or reasoning parser reads)."""
        self.tokenizer = tokenizer
        # continuation: generated text follows a prompt, so a SentencePiece leading space is real text.
        self.detok = tokenizer.detokenizer(continuation=True)
        self.matcher = StopMatcher(stop, include_stop=include_stop_str_in_output)
        self.include_stop = include_stop_str_in_output
        self.keep = keep
        self.chars = offset
        """Characters detokenized so far (shown or held), plus the echo offset."""
        self.finished = False

    @classmethod
    def for_request(cls, tokenizer: TextTokenizer, request: SamplingRequest, *, offset: int = 0,
                    keep: frozenset[int] = frozenset()) -> ChoiceText:
        """A choice's text under a chat or completion request's stop rules."""
        return cls(
            tokenizer,
            stop=request.stop or (),
            include_stop_str_in_output=bool(request.include_stop_str_in_output),
            offset=offset,
            keep=keep,
        )

    def add(self, output: GenerationOutput) -> Piece:
        assert not self.finished, "ChoiceText got an output after the choice finished"
        piece = Piece()
        ids = output.token_ids
        for i, token in enumerate(ids):
            piece.token_ids.append(token)
            if output.logprobs is not None:
                piece.logprobs.append(output.logprobs[i])
            piece.offsets.append(self.chars)
            is_last = i == len(ids) - 1
            ended_by_token = is_last and output.stop_token == token  # the engine decided that (request.check_stop)
            skipped = self.tokenizer.is_special(token) and token not in self.keep
            if skipped or (ended_by_token and not self.include_stop):
                continue
            new = self.detok.add(token)
            self.chars += len(new)
            shown, matched = self.matcher.push(new)
            piece.text += shown
            if matched:
                piece.finish_reason = "stop"
                self.finished = True
                return piece
        if output.finish_reason is not None:
            piece.text += self._finish_text()
            piece.finish_reason = piece.finish_reason or output.finish_reason
            self.finished = True
        return piece

    def _finish_text(self) -> str:
        """Flush the detokenizer and the matcher; a stop string may still complete in the flushed bytes."""
        tail = self.detok.flush()
        self.chars += len(tail)
        shown, matched = self.matcher.push(tail)
        return shown if matched else shown + self.matcher.flush()


def chat_logprobs(tokenizer: TextTokenizer, entries: Sequence[TokenLogprob], top_n: int) -> list[ChatTokenLogprob]:
    """`logprobs.content[]` of a chat choice: token, logprob, bytes and the `top_n` best alternatives."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        return {
            "token": tokenizer.token_text(token_id),
            "logprob": finite_logprob(logprob),
            "bytes": list(tokenizer.token_bytes(token_id)),
        }

    out: list[ChatTokenLogprob] = []
    for entry in entries:
        head = top(entry.token_id, entry.logprob)
        out.append(
            {
                "token": head["token"],
                "logprob": head["logprob"],
                "bytes": head["bytes"],
                "top_logprobs": [top(t, lp) for t, lp in entry.top[:top_n]],
            }
        )
    return out


def completion_logprobs(
    tokenizer: TextTokenizer,
    token_ids: Sequence[int],
    entries: Sequence[TokenLogprob | None],
    offsets: Sequence[int],
    top_n: int,
) -> CompletionLogprobs:
    """The legacy `{tokens, token_logprobs, top_logprobs, text_offset}`; a None entry (the first prompt token
    under `echo`) has null logprob and null alternatives. The sampled token is always among the alternatives,
    as on OpenAI (so there may be `top_n + 1` of them)."""
    result: CompletionLogprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry, offset in zip(token_ids, entries, offsets, strict=True):
        result["tokens"].append(tokenizer.token_text(token))
        result["text_offset"].append(offset)
        if entry is None:
            result["token_logprobs"].append(None)
            result["top_logprobs"].append(None)
            continue
        logprob = finite_logprob(entry.logprob)
        result["token_logprobs"].append(logprob)
        alternatives = {tokenizer.token_text(t): finite_logprob(lp) for t, lp in entry.top[:top_n]}
        alternatives.setdefault(tokenizer.token_text(token), logprob)
        result["top_logprobs"].append(alternatives)
    return result


def prompt_offsets(tokenizer: TextTokenizer, prompt_ids: Sequence[int], *,
                   special: bool = False) -> tuple[str, list[int]]:
    """The echoed prompt text and each prompt token's character offset in it. Special tokens are left out (a
    text prompt's tokenizer-added BOS is not in its text), or with `special` kept (a prompt of token ids echoes
    what every id decodes to)."""
    detok = tokenizer.detokenizer()
    text, offsets = "", []
    for token in prompt_ids:
        offsets.append(len(text))
        if special or not tokenizer.is_special(token):
            text += detok.add(token)
    return text + detok.flush(), offsets
