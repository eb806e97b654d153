"""The thinking of `<think>...</think>` models (Qwen3, DeepSeek-R1), split from their answer.

Such a model writes `<think>`, its reasoning, `</think>`, then the answer. The reasoning goes to the client as
`message.reasoning_content` (`delta.reasoning_content` when streaming), the answer as `content`; vLLM and SGLang
use the same field. Two things vary between templates:

- The opening tag may already be in the prompt (DeepSeek-R1's template ends the prompt with `<think>\\n`, as do
  Qwen3's thinking-only models): the answer then starts inside the thinking and only `</think>` appears. Pass
  the rendered prompt and the parser sees this for itself; without it, each family's usual template decides
  (`deepseek_r1`: inside, `qwen3`: outside).
- The model may not think at all (Qwen3 with `enable_thinking=False`, whose template writes an empty think
  block into the prompt): an answer that does not open with `<think>` is all content, and reasoning is None.

Whitespace touching the tags is dropped (the newlines after `<think>`, before `</think>` and after it); other
text is kept as written, and an answer with no thinking is passed through untouched. A reasoning part that is
empty is None. If the text ends inside the thinking (cut by `max_tokens`), all of it is reasoning and the
content is "".

`split(text)` reads a finished answer; `stream()` gives a `ReasoningStream`, fed text deltas, that returns
(reasoning, content) pieces. Both run the same state machine, so a stream, however its text is cut, adds up to
what `split` returns. The stream holds back only text that could be the start of a tag and, inside the
thinking, trailing whitespace (dropped if `</think>` follows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ReasoningDelta(NamedTuple):
    reasoning: str
    content: str


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that `tag` begins with (a tag cut by the delta)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[len(text) - length :]):
            return length
    return 0


class ReasoningStream:
    """One answer's reasoning and content while its text streams in: `feed` each delta, then `finish` once.

    States: `start` (only whitespace so far: an opening tag may come), `thinking`, `closed` (after `</think>`:
    whitespace dropped) and `answer` (everything passes through).
    """

    def __init__(self, *, starts_in_reasoning: bool) -> None:
        self.starts_in_reasoning = starts_in_reasoning
        self._state: Literal["start", "thinking", "closed", "answer"] = "start"
        self._held = ""
        self._reasoning_begun = False

    def feed(self, delta: str) -> ReasoningDelta:
        return self._read(delta, final=False)

    def finish(self) -> ReasoningDelta:
        """The end of the text: what was held back goes out."""
        return self._read("", final=True)

    def _read(self, delta: str, *, final: bool) -> ReasoningDelta:
        text, self._held = self._held + delta, ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            if self._state == "start":
                body = text.lstrip()
                if body.startswith(THINK_OPEN):
                    text, self._state = body[len(THINK_OPEN) :], "thinking"
                elif THINK_OPEN.startswith(body) and not final:
                    self._held = text
                    break
                else:
                    # No opening tag: the prompt opened the thinking, or the model does not think.
                    self._state = "thinking" if self.starts_in_reasoning else "answer"
            elif self._state == "thinking":
                at = text.find(THINK_CLOSE)
                if at >= 0:
                    reasoning.append(self._reasoning(text[:at].rstrip()))
                    text, self._state = text[at + len(THINK_CLOSE) :], "closed"
                    continue
                kept = (
                    text.rstrip() if final else text[: len(text) - _partial_tag(text, THINK_CLOSE)].rstrip()
                )
                reasoning.append(self._reasoning(kept))
                self._held = "" if final else text[len(kept) :]
                break
            elif self._state == "closed":
                text = text.lstrip()
                if text:
                    self._state = "answer"
            else:
                content.append(text)
                break
        return ReasoningDelta("".join(reasoning), "".join(content))

    def _reasoning(self, text: str) -> str:
        """Reasoning text, its leading whitespace dropped until the first visible character."""
        if not self._reasoning_begun:
            text = text.lstrip()
            self._reasoning_begun = bool(text)
        return text


@dataclass(frozen=True)
class ReasoningParser:
    """One family's thinking format, selected by `--reasoning-parser`. Holds no state."""

    name: str
    opens_in_prompt: bool
    """Whether the family's usual template puts `<think>` at the end of the prompt (used when no prompt is
    given to `split` or `stream`)."""

    keep_tokens: ClassVar[tuple[str, ...]] = (THINK_OPEN, THINK_CLOSE)
    """The tags: the detokenizer must keep them in the text this parser reads."""

    def starts_in_reasoning(self, prompt: str | None = None) -> bool:
        """Whether an answer to `prompt` (the rendered chat template) begins inside the thinking."""
        if prompt is None:
            return self.opens_in_prompt
        return prompt.rstrip().endswith(THINK_OPEN)

    def split(self, text: str, *, prompt: str | None = None) -> tuple[str | None, str]:
        """A finished answer as (reasoning_content, content); reasoning_content is None when there is none."""
        stream = self.stream(prompt=prompt)
        head, tail = stream.feed(text), stream.finish()
        return (head.reasoning + tail.reasoning) or None, head.content + tail.content

    def stream(self, *, prompt: str | None = None) -> ReasoningStream:
        return ReasoningStream(starts_in_reasoning=self.starts_in_reasoning(prompt))


REASONING_PARSERS: dict[str, ReasoningParser] = {
    parser.name: parser
    for parser in (
        ReasoningParser("qwen3", opens_in_prompt=False),
        ReasoningParser("deepseek_r1", opens_in_prompt=True),
    )
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    """The parser named `name` (as `--reasoning-parser` gives it)."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        choices = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}: choose one of {choices}") from None
