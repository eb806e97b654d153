"""The Responses API (`/v1/responses`): the fake engine for the shape of every answer (items, the event sequence,
stored conversations, errors), a scripted answer for thinking and calls, and the real SmolLM2 server with the
real `openai` client for text, streaming, structured output and function calls."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

from maxjax.config import ServerConfig
from maxjax.serve.app import ServingState
from maxjax.serve.chat_answer import AnswerReader, read_answer
from maxjax.serve.fake_engine import FakeEngine
from maxjax.serve.reasoning import get_reasoning_parser
from maxjax.serve.response_events import ResponseEvents, answer_items
from maxjax.serve.responses import ResponseStore, Stored
from maxjax.serve.tool_parsers import get_tool_parser
from maxjax.tokenizer import Tokenizer
from tests.serve_helpers import WORDS, RealServer, Server, load_tokenizer, running_server

ADD = {"type": "function", "name": "add", "strict": True, "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}  # fmt: skip
ANSWER = ('<think>\nSimple sums.\n</think>\n\nSure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}'
          "\n</tool_call>")  # fmt: skip


class Sum(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


@pytest.fixture(scope="module")
def tok(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


def serve(tok: Tokenizer, config: ServerConfig | None = None, **options: Any) -> Any:
    options.setdefault("max_model_len", 512)
    engine = FakeEngine(tok.encode(WORDS), eos_token_id=min(tok.eos_token_ids), model_name="m", **options)
    state = ServingState(model_name="m")
    state.set_ready(engine, tok)
    return running_server(state, config)


@pytest.fixture(scope="module")
def server(tok: Tokenizer) -> Iterator[Server]:
    with serve(tok, eos_after=6) as srv:
        yield srv


@pytest.fixture(scope="module")
def scripted(tok: Tokenizer) -> Iterator[Server]:
    """Always answers ANSWER (thinking, text, one call), read with the qwen3 reasoning parser."""
    answer = tok.encode(ANSWER)
    with serve(tok, ServerConfig(host="127.0.0.1", port=0, reasoning_parser="qwen3"), answer=answer,
               eos_after=len(answer)) as srv:  # fmt: skip
        yield srv


def client(srv: Server | RealServer) -> OpenAI:
    return OpenAI(base_url=srv.base_url, api_key="test-key-123", max_retries=0, _strict_response_validation=True)


def raw_events(srv: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The streamed events, each checked to be `event: <type>` then `data: <json>` of that type."""
    reply = httpx.post(srv.base_url + "/responses", json={"model": "m", **body, "stream": True}, timeout=60)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in reply.text.strip().split("\n\n"):
        head, data = block.split("\n")
        out.append(json.loads(data.removeprefix("data: ")))
        assert head == f"event: {out[-1]['type']}"
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


TEXT_EVENTS = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
               "response.output_text.done", "response.content_part.done", "response.output_item.done"]  # fmt: skip


def squeezed(types: list[str]) -> list[str]:
    """Event types with runs of one delta type shown once."""
    return [t for i, t in enumerate(types) if not (t.endswith(".delta") and i and types[i - 1] == t)]


def test_a_string_and_a_list_of_items_are_answered(server: Server) -> None:
    reply = client(server).responses.create(model="m", input="Say something.", instructions="Be brief.")
    assert reply.status == "completed" and reply.output_text and reply.id.startswith("resp_")
    [item] = reply.output
    assert item.type == "message" and item.id.startswith("msg_") and item.status == "completed"
    assert reply.usage is not None and reply.usage.output_tokens == 7  # six words and the end-of-sequence token
    assert reply.usage.total_tokens == reply.usage.input_tokens + 7 and reply.instructions == "Be brief."
    engine = server.state.engine
    assert isinstance(engine, FakeEngine)
    prompt = server.state.tokenizer.decode(engine.requests[-1].prompt_ids)  # type: ignore[union-attr]
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "Say something." in prompt
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Hi."}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
             {"role": "user", "content": "Again."}]  # fmt: skip
    reply = client(server).responses.create(model="m", input=items)  # type: ignore[arg-type]
    prompt = server.state.tokenizer.decode(engine.requests[-1].prompt_ids)  # type: ignore[union-attr]
    assert reply.output_text and "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAgain." in prompt


def test_the_stream_is_the_typed_event_sequence(server: Server) -> None:
    events = raw_events(server, {"input": "Say something.", "temperature": 0})
    types = [e["type"] for e in events]
    assert squeezed(types) == ["response.created", "response.in_progress", *TEXT_EVENTS, "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    final = events[-1]["response"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == text
    assert final["id"] == events[0]["response"]["id"] and final["usage"]["output_tokens"] == 7
    # The openai client's stream helper takes them in this order and gives the same text.
    with client(server).responses.stream(model="m", input="Say something.", temperature=0) as stream:
        seen = [event.type for event in stream]
        assert stream.get_final_response().output_text == text
    assert seen[-1] == "response.completed"


def test_cut_by_max_output_tokens_is_incomplete(server: Server) -> None:
    reply = client(server).responses.create(model="m", input="Go on.", max_output_tokens=3)
    assert reply.status == "incomplete" and reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens" and reply.output[0].status == "incomplete"
    events = raw_events(server, {"input": "Go on.", "max_output_tokens": 3})
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["usage"]["output_tokens"] == 3


def test_thinking_text_and_calls_become_items(scripted: Server) -> None:
    reply = client(scripted).responses.create(model="m", input="Add 1 and 2.", tools=[ADD])  # type: ignore[list-item]
    assert [item.type for item in reply.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call = reply.output
    assert reasoning.content and reasoning.content[0].text == "Simple sums."  # type: ignore[union-attr]
    assert reply.output_text == "Sure." and call.type == "function_call"
    assert call.name == "add" and json.loads(call.arguments) == {"a": 1, "b": 2} and call.call_id.startswith("call_")
    assert reply.usage is not None and reply.usage.output_tokens_details.reasoning_tokens > 0

    events = raw_events(scripted, {"input": "Add 1 and 2.", "tools": [ADD]})
    types = squeezed([e["type"] for e in events])
    assert types == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
                     "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                     *TEXT_EVENTS,
                     "response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]  # fmt: skip
    final = events[-1]["response"]["output"]
    streamed_call = final[2]
    assert streamed_call["arguments"] == call.arguments and streamed_call["name"] == "add"
    assert [i["type"] for i in final] == ["reasoning", "message", "function_call"]
    with client(scripted).responses.stream(model="m", input="Add.", tools=[ADD]) as stream:  # type: ignore[list-item]
        for _ in stream:
            pass
        assert stream.get_final_response().output[2].type == "function_call"


def test_a_conversation_continues_from_a_stored_response(server: Server) -> None:
    c = client(server)
    first = c.responses.create(model="m", input="First question.", instructions="Old rules.")
    second = c.responses.create(model="m", input="Second question.", previous_response_id=first.id,
                                instructions="New rules.")  # fmt: skip
    engine = server.state.engine
    assert isinstance(engine, FakeEngine)
    prompt = server.state.tokenizer.decode(engine.requests[-1].prompt_ids)  # type: ignore[union-attr]
    assert "First question." in prompt and first.output_text in prompt and "Second question." in prompt
    assert "New rules." in prompt and "Old rules." not in prompt  # instructions are not carried over
    assert second.previous_response_id == first.id
    assert c.responses.retrieve(second.id).output_text == second.output_text
    c.responses.delete(first.id)
    for call in (lambda: c.responses.retrieve(first.id), lambda: c.responses.delete(first.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError) as caught:
        c.responses.create(model="m", input="Third.", previous_response_id=first.id)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "previous_response_id"
    unstored = c.responses.create(model="m", input="Secret.", store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_output_items_sent_back_as_input(scripted: Server) -> None:
    """The usual client loop: the calls of one reply, plus their outputs, as the next input."""
    c = client(scripted)
    first = c.responses.create(model="m", input="Add 1 and 2.", tools=[ADD])  # type: ignore[list-item]
    call = first.output[2]
    assert call.type == "function_call"
    items = [{"role": "user", "content": "Add 1 and 2."}, *first.output,
             {"type": "function_call_output", "call_id": call.call_id, "output": "3"}]  # fmt: skip
    reply = c.responses.create(model="m", input=items, tools=[ADD])  # type: ignore[arg-type,list-item]
    assert reply.status == "completed"
    engine = scripted.state.engine
    assert isinstance(engine, FakeEngine)
    prompt = scripted.state.tokenizer.decode(engine.requests[-1].prompt_ids)  # type: ignore[union-attr]
    assert '{"name": "add", "arguments": {"a": 1, "b": 2}}' in prompt and "<tool_response>\n3\n" in prompt


def _shape(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What an item says, without its ids."""
    return [(i["type"], i.get("name"), i.get("arguments"), [p["text"] for p in i.get("content", [])], i["status"])
            for i in items]  # fmt: skip


def test_streamed_items_add_up_to_the_whole_answer() -> None:
    reasoning, tools = get_reasoning_parser("qwen3"), get_tool_parser("hermes")
    whole = answer_items(read_answer(ANSWER, reasoning=reasoning, tools=tools, prompt="", finish_reason="stop")[0],
                         incomplete=False)  # fmt: skip
    assert [i["type"] for i in whole] == ["reasoning", "message", "function_call"]
    rng = random.Random(0)
    for _ in range(20):
        reader, events = AnswerReader(reasoning=reasoning, tools=tools, prompt=""), ResponseEvents()
        cuts = sorted(rng.sample(range(1, len(ANSWER)), 10))
        for a, b in zip([0, *cuts], [*cuts, None], strict=True):
            events.feed(reader.feed(ANSWER[a:b]))
        events.feed(reader.finish("stop")[0])
        events.finish(incomplete=False)
        assert _shape(events.items) == _shape(whole)


def test_the_store_keeps_the_most_recently_used() -> None:
    store = ResponseStore(size=2)
    for name in "abc":
        if name == "c":
            store.get("a")  # a is used again: b is the least recently used
        store.put(Stored({"id": name, "output": []}, []))
    assert store.get("a") and store.get("c")
    with pytest.raises(Exception, match="evicted"):
        store.get("b")


def test_an_engine_failure_mid_stream_is_response_failed(tok: Tokenizer) -> None:
    with serve(tok, fail_after=2) as srv:
        events = raw_events(srv, {"input": "Hi."})
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["code"] == "server_error"


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"),
    ({"input": ""}, "input"),
    ({"input": "x", "max_output_token": 5}, "max_output_token"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 10_000}, "max_output_tokens"),
    ({"input": "x", "temperature": 3.0}, "temperature"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "top_logprobs": 3}, "top_logprobs"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),  # text-only
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input[0].content"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name"),
    ({"input": "x", "tools": [ADD], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "x", "tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "add"}}},
     "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tools": [ADD], "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": 3}, "input"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}}, "text.format"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "stream_options": {"include_obfuscation": False}}, "stream_options"),
    ({"input": "x", "seed": "1"}, "seed"),
    ({"input": "x", "model": "other"}, "model"),
])  # fmt: skip
def test_bad_bodies_are_a_400_naming_the_field(server: Server, body: dict[str, Any], param: str) -> None:
    reply = httpx.post(server.base_url + "/responses", json=body, timeout=30)
    error = reply.json()["error"]
    assert reply.status_code == (404 if param == "model" else 400), error
    assert error["param"] == param, error


# -- the real model ------------------------------------------------------------------------------------------


def test_real_text_from_a_string_and_from_items(real_server: RealServer) -> None:
    c = client(real_server)
    reply = c.responses.create(model="smollm2", input="Name a colour.", max_output_tokens=16, temperature=0.0)
    assert reply.output_text.strip() and reply.usage is not None and 0 < reply.usage.output_tokens <= 16
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Name a fruit."}]}]
    reply = c.responses.create(model="smollm2", input=items, max_output_tokens=16, temperature=0.0)  # type: ignore[arg-type]
    assert reply.output_text.strip()


def test_real_stream_ends_completed(real_server: RealServer) -> None:
    with client(real_server).responses.stream(model="smollm2", input="Say hello.", max_output_tokens=48,
                                              temperature=0.0) as stream:  # fmt: skip
        events = list(stream)
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert squeezed(types)[2:-1] == TEXT_EVENTS
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert last.response.output_text.strip()  # type: ignore[union-attr]
    if last.type == "response.completed":  # the helper's final response is there only for a completed one
        assert stream.get_final_response().output_text == last.response.output_text


def test_real_json_schema_always_parses(real_server: RealServer) -> None:
    schema = Sum.model_json_schema()
    text = {"format": {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}}
    for seed in range(3):
        reply = client(real_server).responses.create(
            model="smollm2", input="Give two small numbers a and b as JSON.", text=text, temperature=0.8,  # type: ignore[arg-type]
            max_output_tokens=40, extra_body={"seed": seed})
        assert reply.status == "completed", reply.output_text
        Sum.model_validate_json(reply.output_text)


def test_real_required_call_then_its_output(real_server: RealServer) -> None:
    c = client(real_server)
    first = c.responses.create(model="smollm2", input="Add 2 and 3.", tools=[ADD], tool_choice="required",  # type: ignore[list-item]
                               parallel_tool_calls=False, max_output_tokens=40, temperature=0.0)  # fmt: skip
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "add" and call.call_id.startswith("call_")
    Sum.model_validate_json(call.arguments)
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "5"}
    second = c.responses.create(model="smollm2", input=[output], previous_response_id=first.id, tools=[ADD],  # type: ignore[list-item]
                                max_output_tokens=24, temperature=0.0)  # fmt: skip
    assert second.status in ("completed", "incomplete") and second.error is None
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    assert c.responses.retrieve(second.id).id == second.id
    c.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(second.id)
