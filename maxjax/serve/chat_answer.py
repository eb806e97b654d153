"""One chat choice's answer as the client gets it: thinking, content and tool calls, split from the model's text.

The text goes through the reasoning parser first (when the server has one: `<think>...</think>` becomes
`reasoning_content`), then what is left through the tool parser (when the request has tools: calls become
`tool_calls`, the rest is `content`). `AnswerReader` does this while the answer streams (`feed` each text delta,
then `finish`, each returning a chunk's `delta`); `read_answer` does it for a finished answer. A finished
answer's malformed call is given back as content; a streamed one that broke after its name went out keeps what
was sent (see tool_parsers.py).
"""

from __future__ import annotations

from typing import Any

from maxjax.serve.reasoning import ReasoningParser, ReasoningStream
from maxjax.serve.tool_parsers import ToolCall, ToolCallStream, ToolParser, chat_delta, tool_finish_reason


def read_answer(
    text: str, *, reasoning: ReasoningParser | None, tools: ToolParser | None, prompt: str, finish_reason: str
) -> tuple[dict[str, Any], str]:
    """A finished answer as (`message`, finish_reason): `content` (None when the answer was only calls),
    `reasoning_content` (None without thinking), `refusal` (always None) and `annotations` (always []), which
    OpenAI's schema requires, and `tool_calls` when there are any; "tool_calls" is the finish reason when it made
    calls."""
    thinking, content = reasoning.split(text, prompt=prompt) if reasoning is not None else (None, text)
    message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": thinking,
                               "refusal": None, "annotations": []}
    if tools is not None:
        parsed = tools.parse(content)
        message["content"] = parsed.content
        if parsed.calls:
            message["tool_calls"] = [call.to_openai() for call in parsed.calls]
        finish_reason = tool_finish_reason(finish_reason, parsed.calls)
    return message, finish_reason


class AnswerReader:
    """A streamed answer, one text delta at a time."""

    def __init__(self, *, reasoning: ReasoningParser | None, tools: ToolParser | None, prompt: str) -> None:
        self._reasoning: ReasoningStream | None = reasoning.stream(prompt=prompt) if reasoning is not None else None
        self._tools: ToolCallStream | None = tools.stream() if tools is not None else None

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._tools.calls) if self._tools is not None else []

    def feed(self, text: str) -> dict[str, Any]:
        """The delta for a chunk (`{}` when everything is held back for now)."""
        if self._reasoning is None and self._tools is None:
            return {"content": text} if text else {}
        if self._reasoning is not None:
            thinking, content = self._reasoning.feed(text)
        else:
            thinking, content = "", text
        return self._delta(thinking, self._tools.feed(content) if self._tools is not None else content)

    def finish(self, finish_reason: str) -> tuple[dict[str, Any], str]:
        """The last delta (whatever was held back) and the choice's finish reason."""
        thinking, content = self._reasoning.finish() if self._reasoning is not None else ("", "")
        if self._tools is None:
            return self._delta(thinking, content), finish_reason
        events = (self._tools.feed(content) if content else []) + self._tools.finish()
        return self._delta(thinking, events), tool_finish_reason(finish_reason, self._tools.calls)

    @staticmethod
    def _delta(thinking: str, content: Any) -> dict[str, Any]:
        delta = chat_delta(content) if isinstance(content, list) else ({"content": content} if content else {})
        return {"reasoning_content": thinking, **delta} if thinking else delta
