"""The output items of a Responses answer, and the typed events that stream them.

An answer (thinking, text, tool calls, as chat_answer.py reads them) becomes output items in the order they were
written: a `reasoning` item (the thinking as one `reasoning_text` part), a `message` item (the text as one
`output_text` part), a `function_call` item per call (`call_id` is the parser's `call_...`, `id` our own `fc_...`).

Streamed, each item goes out as the `openai` client's `responses.stream` helper expects them (it rejects events
out of order): `response.output_item.added` (the item, status `in_progress`), for text `response.content_part.added`
then `response.output_text.delta`s (`response.reasoning_text.delta`s for thinking), `...done` and
`response.content_part.done`; for a call `response.function_call_arguments.delta`s and `...done`; then
`response.output_item.done` with the finished item. Every event has the next `sequence_number` and goes out as
`event: <type>` plus `data: <json>`. `ResponseEvents` does this from chat-style deltas (`AnswerReader.feed`), one
item open at a time: a delta of another kind (or a new call) closes the open item first.
"""

from __future__ import annotations

import uuid
from typing import Any

from maxjax.serve.choices import sse

Item = dict[str, Any]


def item_id(prefix: str) -> str:
    """An OpenAI-style id: `resp_`, `msg_`, `fc_`, `rs_` and 32 hex digits."""
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(text: str, *, status: str = "completed") -> Item:
    return {"type": "message", "id": item_id("msg"), "status": status, "role": "assistant",
            "content": [text_part(text)]}  # fmt: skip


def text_part(text: str) -> Item:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(text: str, *, status: str = "completed") -> Item:
    return {"type": "reasoning", "id": item_id("rs"), "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}  # fmt: skip


def function_call_item(call_id: str, name: str, arguments: str, *, status: str = "completed") -> Item:
    return {"type": "function_call", "id": item_id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}  # fmt: skip


def answer_items(message: dict[str, Any], *, incomplete: bool) -> list[Item]:
    """A finished answer (`chat_answer.read_answer`'s message) as output items. A message item is there when
    the answer has text, or has nothing else; cut by the length limit, it is `incomplete`."""
    items = []
    if message.get("reasoning_content"):
        items.append(reasoning_item(message["reasoning_content"]))
    calls = message.get("tool_calls") or []
    if message.get("content") or not (calls or items):
        items.append(message_item(message.get("content") or "", status="incomplete" if incomplete else "completed"))
    for call in calls:
        items.append(function_call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
    return items


def reasoning_of(items: list[Item]) -> str:
    """The thinking in `items`, for counting its tokens."""
    return "".join(part["text"] for item in items if item["type"] == "reasoning" for part in item["content"])


class ResponseEvents:
    """The events of one streamed response, numbered, and the output items they built (`items`)."""

    def __init__(self) -> None:
        self.sequence = 0
        self.items: list[Item] = []
        self._open: Item | None = None

    def event(self, kind: str, **fields: Any) -> bytes:
        """One event: `event: <type>` and its JSON, which carries the type and the next sequence number."""
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\n".encode() + sse(payload)

    def feed(self, delta: dict[str, Any]) -> list[bytes]:
        """The events for one chat-style delta: its thinking, the rest of the open call's arguments, its text, then
        its other calls. (A delta joins its text and lists its calls apart, so that is the order they were written
        in, unless one delta held text between two calls: rare, as a delta is the text of one engine step.)"""
        out = []
        if delta.get("reasoning_content"):
            out += self._text("reasoning", delta["reasoning_content"])
        calls = list(delta.get("tool_calls") or ())
        while calls and "id" not in calls[0] and self._open is not None and self._open["type"] == "function_call":
            out += self._call(calls.pop(0))
        if delta.get("content"):
            out += self._text("message", delta["content"])
        for call in calls:
            out += self._call(call)
        return out

    def finish(self, *, incomplete: bool) -> list[bytes]:
        """Close the open item (an answer that wrote nothing gets an empty message, as when not streamed)."""
        out = [] if self.items else self._open_item(message_item("", status="in_progress"))
        return out + self.close(status="incomplete" if incomplete else "completed")

    def close(self, *, status: str = "completed") -> list[bytes]:
        """Finish the open item, if any: its `...done` events, then `response.output_item.done`."""
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self.items.index(item)}
        out = []
        if item["type"] == "function_call":
            out.append(self.event("response.function_call_arguments.done", **where, name=item["name"],
                                  arguments=item["arguments"]))  # fmt: skip
            item["status"] = "completed"  # a call the parser read whole
        else:
            part = item["content"][0]
            if item["type"] == "message":
                out.append(self.event("response.output_text.done", **where, content_index=0, text=part["text"],
                                      logprobs=[]))  # fmt: skip
            else:
                out.append(self.event("response.reasoning_text.done", **where, content_index=0, text=part["text"]))
            out.append(self.event("response.content_part.done", **where, content_index=0, part=part))
            item["status"] = status if item["type"] == "message" else "completed"
        out.append(self.event("response.output_item.done", output_index=where["output_index"], item=item))
        return out

    def _open_item(self, item: Item) -> list[bytes]:
        """Close what is open, then add `item`: announced without its parts, then each part (empty) added."""
        out = self.close()
        parts = item.pop("content", None)
        index = len(self.items)
        self.items.append(item)
        self._open = item
        if parts is not None:
            item["content"] = []
        out.append(self.event("response.output_item.added", output_index=index, item=item))
        for part in parts or ():
            item["content"].append(part)
            out.append(self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                  content_index=0, part=part))  # fmt: skip
        return out

    def _text(self, kind: str, text: str) -> list[bytes]:
        out = []
        if self._open is None or self._open["type"] != kind:
            make = message_item if kind == "message" else reasoning_item
            out += self._open_item(make("", status="in_progress"))
        item = self._open
        assert item is not None
        item["content"][0]["text"] += text
        where = {"item_id": item["id"], "output_index": len(self.items) - 1, "content_index": 0}
        if kind == "message":
            return [*out, self.event("response.output_text.delta", **where, delta=text, logprobs=[])]
        return [*out, self.event("response.reasoning_text.delta", **where, delta=text)]

    def _call(self, call: dict[str, Any]) -> list[bytes]:
        """A chat tool-call delta: an opening entry (id and name) opens a function_call item; later entries add
        to its arguments."""
        fn = call.get("function") or {}
        out = []
        if "id" in call:
            out += self._open_item(function_call_item(call["id"], fn.get("name") or "", "", status="in_progress"))
        item = self._open
        piece = fn.get("arguments") or ""
        if item is None or item["type"] != "function_call" or not piece:
            return out
        item["arguments"] += piece
        return [*out, self.event("response.function_call_arguments.delta", item_id=item["id"],
                                 output_index=len(self.items) - 1, delta=piece)]  # fmt: skip
