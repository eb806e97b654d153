"""Tool calls in generated text: each model family's format, read whole or while the text streams.

A model given tools writes its calls into its text in the format its chat template taught it. A parser turns
that text into OpenAI tool calls:

- `hermes` (Hermes 2/3, Qwen2.5, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one
  block per call, possibly after some text.
- `llama3_json` (Llama 3.1 / 3.2 / 3.3): `{"name": ..., "parameters": {...}}` as the whole answer, or after
  `<|python_tag|>`; several calls separated by `;`.
- `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (7B v0.3, Nemo), or
  `[TOOL_CALLS]name[ARGS]{...}` once per call (newer tokenizers; `[CALL_ID]id` may come before `[ARGS]`).

Every JSON call object may spell its arguments "arguments" or "parameters", put its keys in any order, carry
"type" and "id", and give the arguments as a JSON string holding an object.

`ToolParser.parse(text)` reads a finished answer. `ToolParser.stream()` gives a `ToolCallStream`, fed the text
deltas, whose events are `ContentDelta` and `ToolCallDelta` (an entry of OpenAI's `delta.tool_calls`: for each
call one delta with its `id`, name and `arguments: ""`, then the arguments in pieces). Both run the same
reading code, so a stream, however its text is cut, ends with the calls and content `parse` finds (except for
the one case below). The rules they share:

- Content is the text outside the calls, as written, except whitespace touching a call (before, between and
  after calls), which is dropped; `None` when nothing is left.
- Arguments are the model's JSON without the whitespace between tokens (strings as written; raw control
  characters inside them escaped, so strict parsers accept the result): compact JSON, as OpenAI sends it, and
  the same string whether streamed or not.
- A call that is not well formed (broken JSON, no name, something else where its closing marker should be) is
  given back as text; parsing never raises on what the model wrote. A closing marker may be missing only where
  the text ends.
- The stream holds back only what is undecided: text that could be the start of a marker, trailing whitespace
  (dropped if a call follows), and a call until its name and the start of its arguments have arrived.

One difference, the price of streaming: a streamed call goes out as soon as its name and the opening `{` of its
arguments are known, and what went out cannot be taken back. If that call then turns out broken (a bracket
that does not match, the text ending inside it, junk before its closing marker), the stream keeps it with the
arguments sent so far and reads on from the fault as text, where `parse` gives the whole block back as text.

Markers such as `<|python_tag|>` and `[TOOL_CALLS]` are special tokens: the detokenizer must keep the ones a
parser lists in `keep_tokens`, or the parser never sees them.

How it works: each format's `_read_answer` is a generator over a `_Reader` holding the text so far, written as
a plain recursive-descent reader. A reading step that needs more text than has arrived yields `None`; the
stream resumes it when the next delta comes, and at the end of the text every step decides with what it has.
The file is longer than most in this package because that reader (an incremental JSON reader, ~300 lines) is
only there for these formats and is read together with them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Container, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias, TypeVar


def new_call_id() -> str:
    """An OpenAI-style tool call id: `call_` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """The arguments object as compact JSON text (what OpenAI sends as `function.arguments`)."""

    def to_openai(self) -> dict[str, Any]:
        """The call as an entry of `message.tool_calls`."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ParsedToolCalls:
    content: str | None
    """The text outside the calls; None when there is none."""
    calls: list[ToolCall]


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One entry of a chunk's `delta.tool_calls`: a call's opening (id and name set, arguments "") or a piece of
    its arguments (id and name None)."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


StreamEvent: TypeAlias = ContentDelta | ToolCallDelta

_T = TypeVar("_T")
# A reading step: yields events, or None to wait for more text; returns what it read.
_Steps: TypeAlias = Generator[StreamEvent | None, None, _T]


def chat_delta(events: Iterable[StreamEvent]) -> dict[str, Any]:
    """One feed's events as the `delta` of one chat.completion.chunk; {} when there is nothing to send.

    Content is joined; argument pieces of one call that follow each other are joined; a call's opening entry
    is kept as its own entry (with `arguments: ""`)."""
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif event.id is None and calls and calls[-1]["index"] == event.index and "id" not in calls[-1]:
            calls[-1]["function"]["arguments"] += event.arguments
        else:
            calls.append(event.to_openai())
    delta: dict[str, Any] = {}
    if content:
        delta["content"] = "".join(content)
    if calls:
        delta["tool_calls"] = calls
    return delta


def tool_finish_reason(reason: str, calls: Sequence[ToolCall]) -> str:
    """The choice's finish reason once its calls are known: "tool_calls" when it made any (as vLLM does, even
    when the engine stopped it for length), else the engine's own."""
    return "tool_calls" if calls else reason


class _Malformed(Exception):
    """What is being read is not a well-formed call (raised inside a unit, caught by `_Reader.unit`)."""


_JSON_SPACE = " \t\r\n"
_LITERAL_ENDS = _JSON_SPACE + ",}]"
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_NAME_KEYS = ("name",)
_ARGUMENT_KEYS = ("arguments", "parameters")
_CALL_KEYS = (*_NAME_KEYS, *_ARGUMENT_KEYS, "type", "id")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(text: str) -> Any:
    """json.loads, but NaN and Infinity (which Python accepts) are not JSON."""
    return json.loads(text, parse_constant=_reject_constant)


class _Compact:
    """Follows one JSON object or array as it arrives: finds its end, drops the whitespace between tokens and
    escapes raw control characters inside strings."""

    def __init__(self) -> None:
        self.closers: list[str] = []
        self.in_string = False
        self.escaped = False

    def feed(self, text: str, start: int) -> tuple[int, str, Literal["more", "done", "broken"]]:
        """Read text[start:]; return where reading stopped, the compact text of what was read, and whether the
        value is unfinished, finished, or broken (a closing bracket that does not match, left unread)."""
        out: list[str] = []
        at = start
        while at < len(text):
            ch = text[at]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                elif ch < " ":
                    ch = _CONTROL_ESCAPES.get(ch) or f"\\u{ord(ch):04x}"
            elif ch in _JSON_SPACE:
                at += 1
                continue
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.closers.append("}" if ch == "{" else "]")
            elif ch in "}]":
                expected = self.closers.pop() if self.closers else None
                if ch != expected:
                    return at, "".join(out), "broken"
            out.append(ch)
            at += 1
            if not self.closers:
                return at, "".join(out), "done"
        return at, "".join(out), "more"


def _compact(text: str) -> str:
    """A whole JSON object or array (known to parse) in compact form."""
    at = len(text) - len(text.lstrip())
    _, compact, state = _Compact().feed(text, at)
    assert state == "done", text
    return compact


def _checked_arguments(text: str) -> str:
    """Arguments read whole: a JSON object, or a JSON string holding one; compact either way."""
    try:
        value = _json(text)
        if isinstance(value, str):
            text = value.strip()
            value = _json(text)
            text = _compact(text) if isinstance(value, dict) else text
    except ValueError:
        raise _Malformed("the arguments are not JSON") from None
    if not isinstance(value, dict):
        raise _Malformed("the arguments are not a JSON object")
    return text


def _partial_marker(text: str, start: int, markers: tuple[str, ...]) -> int:
    """The length of the longest end of text[start:] that a marker begins with (a marker cut by the delta)."""
    for length in range(min(max(map(len, markers)) - 1, len(text) - start), 0, -1):
        tail = text[len(text) - length :]
        if any(marker.startswith(tail) for marker in markers):
            return length
    return 0


@dataclass
class _OpenCall:
    """A streamed call whose opening delta went out; its arguments are arriving."""

    id: str
    name: str
    index: int
    pieces: list[str] = field(default_factory=list)


class _Reader:
    """The text of one answer as it arrives, read by a format's `_read_answer`.

    Text is read in units: one marker's worth of calls (`unit`). Outside units it is content (`text_until`,
    `hold_space`). The buffer is only cut between units, so a position a reading step holds inside a unit stays
    valid while it waits for more text.
    """

    def __init__(self, stream_arguments: bool) -> None:
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.stream_arguments = stream_arguments
        self.mark: int | None = None  # where the current unit's text not yet turned into a sent call starts
        self.held_space = ""  # whitespace that may come before a call: dropped if one follows
        self.after_call = False  # whitespace right after a call is dropped too
        self.open: _OpenCall | None = None
        self.pending: list[tuple[str, str]] = []  # calls read whole, sent once their unit is complete
        self.calls: list[ToolCall] = []

    def append(self, text: str) -> None:
        if self.mark is None and self.pos:
            self.buf = self.buf[self.pos :]
            self.pos = 0
        self.buf += text

    # --- content ---

    def _release(self, text: str, *, final: bool = False) -> ContentDelta | None:
        """Send text as content, keeping back its trailing whitespace (unless the answer is over)."""
        text = self.held_space + text
        if self.after_call:
            text = text.lstrip()
            if not text:
                self.held_space = ""
                return None
            self.after_call = False
        body = text if final else text.rstrip()
        self.held_space = text[len(body) :]
        return ContentDelta(body) if body else None

    def text_until(self, markers: tuple[str, ...]) -> _Steps[str | None]:
        """Send content up to the next marker; return that marker (left unread), or None at the end."""
        while True:
            found = [(at, marker) for marker in markers if (at := self.buf.find(marker, self.pos)) >= 0]
            if found:
                at, marker = min(found)
                event = self._release(self.buf[self.pos : at])
                self.pos = at
                if event:
                    yield event
                return marker
            if self.eof:
                event = self._release(self.buf[self.pos :], final=True)
                self.pos = len(self.buf)
                if event:
                    yield event
                return None
            end = len(self.buf) - _partial_marker(self.buf, self.pos, markers)
            event = self._release(self.buf[self.pos : end])
            self.pos = end
            if event:
                yield event
            yield None

    def hold_space(self) -> _Steps[None]:
        """Read whitespace where a call may begin: held back, or dropped right after a call."""
        while True:
            start = self.pos
            while self.pos < len(self.buf) and self.buf[self.pos].isspace():
                self.pos += 1
            if not self.after_call:
                self.held_space += self.buf[start : self.pos]
            if self.pos < len(self.buf) or self.eof:
                return
            yield None

    # --- calls ---

    def unit(self, read: Callable[[_Reader], _Steps[None]]) -> _Steps[bool]:
        """Read one marker's worth of calls with `read`, from the marker on; return whether it was well formed.
        A malformed unit's text goes out as content, except what already went out as streamed calls."""
        self.mark = self.pos
        try:
            yield from read(self)
        except _Malformed:
            if self.open is not None:
                self._close_open()
            self.pending.clear()
            text, self.mark = self.buf[self.mark : self.pos], None
            if event := self._release(text):
                yield event
            return False
        for name, arguments in self.pending:
            yield from self._announce(name, arguments)
        self.pending.clear()
        self.mark = None
        return True

    def call_object(self) -> _Steps[None]:
        """One call written as a JSON object. Until a name or arguments key has been read, only keys a call has
        are accepted (so a plain JSON answer is soon known not to be a call); later, other keys are passed over."""
        yield from self.expect("{")
        name: str | None = None
        arguments: str | None = None
        while True:
            yield from self.skip_space()
            key = yield from self.string()
            if name is None and arguments is None and key not in _CALL_KEYS:
                raise _Malformed(f"{key!r} is not a key of a tool call")
            yield from self.skip_space()
            yield from self.expect(":")
            yield from self.skip_space()
            if key in _NAME_KEYS and name is None:
                name = yield from self.string()
                if not name.strip():
                    raise _Malformed("an empty function name")
            elif key in _ARGUMENT_KEYS and arguments is None:
                arguments = yield from self.arguments(name)
            else:
                yield from self.value()
            yield from self.skip_space()
            if (yield from self.accept("}")):
                break
            yield from self.expect(",")
        if name is None:
            raise _Malformed("a tool call without a name")
        yield from self.finish_call(name, "{}" if arguments is None else arguments)

    def arguments(self, name: str | None) -> _Steps[str]:
        """A call's arguments, compact. Streamed as they arrive when the call's name is known and they are an
        object; otherwise read whole and checked."""
        if self.stream_arguments and name is not None and (yield from self.peek()) == "{":
            yield from self._open_call(name)
            return (yield from self.value(stream=True))
        return _checked_arguments((yield from self.value()))

    def finish_call(self, name: str, arguments: str) -> _Steps[None]:
        """A call has been read: close it if it was streamed, send it if streaming, else keep it for its unit."""
        if self.open is not None:
            self._close_open()
        elif self.stream_arguments:
            yield from self._announce(name, arguments)
            self.mark = self.pos
        else:
            self.pending.append((name, arguments))

    def _open_call(self, name: str) -> _Steps[None]:
        self.open = _OpenCall(new_call_id(), name, len(self.calls))
        self.held_space, self.after_call = "", True
        yield ToolCallDelta(self.open.index, "", id=self.open.id, name=name)

    def _close_open(self) -> None:
        assert self.open is not None
        self.calls.append(ToolCall(self.open.id, self.open.name, "".join(self.open.pieces)))
        self.open = None
        self.mark = self.pos

    def _announce(self, name: str, arguments: str) -> _Steps[None]:
        call = ToolCall(new_call_id(), name, arguments)
        index = len(self.calls)
        self.calls.append(call)
        self.held_space, self.after_call = "", True
        yield ToolCallDelta(index, "", id=call.id, name=name)
        yield ToolCallDelta(index, arguments)

    # --- tokens ---

    def peek(self) -> _Steps[str]:
        """The next character, left unread ("" at the end of the text)."""
        while self.pos >= len(self.buf):
            if self.eof:
                return ""
            yield None
        return self.buf[self.pos]

    def accept(self, literal: str) -> _Steps[bool]:
        """Read `literal` if the text goes on with it; decided as soon as the text shows it does or does not."""
        while True:
            seen = self.buf[self.pos : self.pos + len(literal)]
            if not literal.startswith(seen):
                return False
            if len(seen) == len(literal):
                self.pos += len(literal)
                return True
            if self.eof:
                return False
            yield None

    def expect(self, literal: str) -> _Steps[None]:
        if not (yield from self.accept(literal)):
            raise _Malformed(f"expected {literal!r}")

    def skip_space(self) -> _Steps[None]:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _JSON_SPACE:
                self.pos += 1
            if self.pos < len(self.buf) or self.eof:
                return
            yield None

    def string_token(self) -> _Steps[str]:
        """A JSON string as written, quotes and escapes included."""
        if (yield from self.peek()) != '"':
            raise _Malformed("expected a JSON string")
        end, escaped = self.pos + 1, False
        while True:
            while end < len(self.buf):
                ch = self.buf[end]
                end += 1
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    token, self.pos = self.buf[self.pos : end], end
                    return token
            if self.eof:
                raise _Malformed("the text ends inside a string")
            yield None

    def string(self) -> _Steps[str]:
        token = yield from self.string_token()
        try:
            value = _json(token)
        except ValueError:
            raise _Malformed(f"{token!r} is not a JSON string") from None
        assert isinstance(value, str)
        return value

    def value(self, *, stream: bool = False) -> _Steps[str]:
        """One JSON value, compact. With `stream`, it is the open call's arguments: each piece read goes out."""
        first = yield from self.peek()
        if first == '"':
            return (yield from self.string_token())
        if first not in ("{", "["):
            return (yield from self._literal())
        scan = _Compact()
        text: list[str] = []
        while True:
            self.pos, piece, state = scan.feed(self.buf, self.pos)
            text.append(piece)
            if stream and piece:
                assert self.open is not None
                self.open.pieces.append(piece)
                yield ToolCallDelta(self.open.index, piece)
            if state == "done":
                return "".join(text)
            if state == "broken":
                raise _Malformed("a closing bracket that does not match")
            if self.eof:
                raise _Malformed("the text ends inside a JSON value")
            yield None

    def _literal(self) -> _Steps[str]:
        """A number, true, false or null."""
        end = self.pos
        while True:
            while end < len(self.buf) and self.buf[end] not in _LITERAL_ENDS:
                end += 1
            if end < len(self.buf) or self.eof:
                break
            yield None
        token = self.buf[self.pos : end]
        try:
            _json(token)
        except ValueError:
            raise _Malformed(f"{token!r} is not a JSON value") from None
        self.pos = end
        return token

    def bare_name(self) -> _Steps[str]:
        """A function name written without quotes (Mistral's `[TOOL_CALLS]name[ARGS]`)."""
        end = self.pos
        while True:
            while end < len(self.buf) and (self.buf[end].isalnum() or self.buf[end] in "_-."):
                end += 1
            if end < len(self.buf) or self.eof:
                break
            yield None
        if end == self.pos:
            raise _Malformed("expected a function name")
        name, self.pos = self.buf[self.pos : end], end
        return name


class ToolCallStream:
    """One answer's tool calls while its text streams in: `feed` each text delta, then `finish` once."""

    def __init__(self, parser: ToolParser, *, stream_arguments: bool = True) -> None:
        self._reader = _Reader(stream_arguments)
        self._steps = parser._read_answer(self._reader)
        self._done = False

    @property
    def calls(self) -> list[ToolCall]:
        """The calls whose arguments are complete, in order (after `finish`, every call sent)."""
        return self._reader.calls

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._reader.eof:
            raise RuntimeError("ToolCallStream.feed after finish")
        self._reader.append(delta)
        return self._advance()

    def finish(self) -> list[StreamEvent]:
        """The end of the text: whatever was held back goes out, as content or as a last call."""
        self._reader.eof = True
        events = self._advance()
        assert self._done and self._reader.open is None
        return events

    def _advance(self) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        while not self._done:
            try:
                step = next(self._steps)
            except StopIteration:
                self._done = True
                break
            if step is None:
                assert not self._reader.eof, "a reader waited for text after the end"
                break
            events.append(step)
        return events


class ToolParser:
    """One model family's tool-call format. Holds no state: one instance serves every request."""

    name: ClassVar[str]
    keep_tokens: ClassVar[tuple[str, ...]]
    """Markers that are special tokens in the family's tokenizer: decode them into the text this parser reads."""

    def parse(self, text: str) -> ParsedToolCalls:
        """A finished answer's calls and content; malformed calls stay in the content."""
        stream = ToolCallStream(self, stream_arguments=False)
        events = stream.feed(text) + stream.finish()
        content = "".join(event.text for event in events if isinstance(event, ContentDelta))
        return ParsedToolCalls(content or None, list(stream.calls))

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def _read_answer(self, reader: _Reader) -> _Steps[None]:
        """Read a whole answer, content and units of calls, until the end of the text."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    name = "hermes"
    keep_tokens = ("<tool_call>", "</tool_call>")
    START, END = keep_tokens

    def _read_answer(self, reader: _Reader) -> _Steps[None]:
        while (yield from reader.text_until((self.START,))) is not None:
            yield from reader.unit(self._call)

    def _call(self, reader: _Reader) -> _Steps[None]:
        yield from reader.expect(self.START)
        yield from reader.skip_space()
        yield from reader.call_object()
        yield from reader.skip_space()
        # The closing tag may be missing when the answer ends right after the call.
        if not (yield from reader.accept(self.END)) and (yield from reader.peek()) != "":
            raise _Malformed(f"expected {self.END}")


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x's JSON calls. A call is read where one may begin: at the start of the answer, right after a
    call (`;` between them is optional), or after `<|python_tag|>`. A `{` elsewhere in prose is content."""

    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"
    keep_tokens = (PYTHON_TAG,)

    def _read_answer(self, reader: _Reader) -> _Steps[None]:
        call_may_begin = True
        while True:
            if call_may_begin:
                yield from reader.hold_space()
                ahead = yield from reader.peek()
                if ahead == "{" or (ahead == ";" and reader.after_call):
                    call_may_begin = yield from reader.unit(self._separated_call)
                    continue
            if (yield from reader.text_until((self.PYTHON_TAG,))) is None:
                return
            call_may_begin = yield from reader.unit(self._tagged_call)

    def _separated_call(self, reader: _Reader) -> _Steps[None]:
        if (yield from reader.accept(";")):
            yield from reader.skip_space()
        yield from reader.call_object()

    def _tagged_call(self, reader: _Reader) -> _Steps[None]:
        # Built-in tools (brave_search.call(...)) follow the tag as Python, not JSON: they stay content.
        yield from reader.expect(self.PYTHON_TAG)
        yield from reader.skip_space()
        yield from reader.call_object()


class MistralToolParser(ToolParser):
    name = "mistral"
    TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    keep_tokens = (TOOL_CALLS, ARGS, CALL_ID)

    def _read_answer(self, reader: _Reader) -> _Steps[None]:
        while (yield from reader.text_until((self.TOOL_CALLS,))) is not None:
            yield from reader.unit(self._calls)

    def _calls(self, reader: _Reader) -> _Steps[None]:
        yield from reader.expect(self.TOOL_CALLS)
        yield from reader.skip_space()
        if (yield from reader.accept("[")):
            # [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
            while True:
                yield from reader.skip_space()
                yield from reader.call_object()
                yield from reader.skip_space()
                if (yield from reader.accept("]")):
                    return
                yield from reader.expect(",")
        # [TOOL_CALLS]name[ARGS]{...}; the model's own [CALL_ID] is read over (ours replaces it)
        name = yield from reader.bare_name()
        if (yield from reader.accept(self.CALL_ID)):
            yield from reader.bare_name()
        yield from reader.expect(self.ARGS)
        yield from reader.skip_space()
        arguments = yield from reader.arguments(name)
        yield from reader.finish_call(name, arguments)


TOOL_PARSERS: dict[str, ToolParser] = {
    parser.name: parser for parser in (HermesToolParser(), Llama3JsonToolParser(), MistralToolParser())
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser named `name` (as `--tool-call-parser` gives it)."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        choices = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"unknown tool-call parser {name!r}: choose one of {choices}") from None


# What a chat template teaches, checked in this order (a Hermes fine-tune of Llama or Mistral keeps its base
# model's tokens, but its template speaks <tool_call>).
_TEMPLATE_CLUES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mistral", ("[TOOL_CALLS]", "[AVAILABLE_TOOLS]")),
    ("hermes", ("<tool_call>",)),
    ("llama3_json", ("<|python_tag|>", "Environment: ipython", "JSON for a function call")),
)
# Tokens that only the family's tokenizer has, for templates that say nothing about tools.
_VOCAB_CLUES: tuple[tuple[str, str], ...] = (
    ("mistral", "[TOOL_CALLS]"),
    ("hermes", "<tool_call>"),
    ("llama3_json", "<|python_tag|>"),
)


def detect_tool_parser(chat_template: str | None, vocab: Container[str] = ()) -> str | None:
    """The name of the parser a model's chat template points to, else its vocabulary; None if neither does."""
    template = chat_template or ""
    for name, clues in _TEMPLATE_CLUES:
        if any(clue in template for clue in clues):
            return name
    for name, token in _VOCAB_CLUES:
        if token in vocab:
            return name
    return None
