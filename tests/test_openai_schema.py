"""Every body and stream event the server sends, validated against OpenAI's published OpenAPI description of its
route (tests/fixtures/openai-openapi/: the schemas of the routes we serve, cut from openai/openai-openapi by
scripts/extract_openai_schemas.py). The `openai` client is lenient; strict clients and generated SDKs are not:
a required field left out, or a value of the wrong type, fails here.

The description is OpenAPI 3.1 (JSON Schema 2020-12), validated with `jsonschema`; where it still writes 3.0's
`nullable: true`, that means "or null" (`_nullable`). Where the description disagrees with what OpenAI's own
API sends, `_wire` relaxes it, each case with the reason, used only where named; nothing else is relaxed.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np
import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from maxjax.config import ServerConfig
from maxjax.serve.app import ServingState
from maxjax.serve.fake_engine import FakeEngine
from maxjax.tokenizer import Tokenizer
from tests.serve_helpers import API_KEY, WORDS, RealServer, Server, load_tokenizer, running_server

SPEC_FILE = Path(__file__).parent / "fixtures" / "openai-openapi" / "openai-schemas.json"
SPEC_URI = "urn:openai-openapi"
WIRE_URI = "urn:openai-wire"
MODEL = "m"
USER = [{"role": "user", "content": "Say something."}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]  # fmt: skip
# Thinking (split off by the qwen3 reasoning parser), text, and one call in the Hermes format the fallback tool
# prompt asks for.
TOOL_ANSWER = '<think>\nCall f.\n</think>\n\nSure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


def _nullable(node: Any) -> Any:
    """3.0's `nullable: true` as 3.1 says it: the schema, or null."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable(value) for key, value in node.items() if not (key == "nullable" and value is True)}
    return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") is True else out


SPEC = _nullable(json.loads(SPEC_FILE.read_text()))
SCHEMAS: dict[str, Any] = SPEC["components"]["schemas"]


def _wire() -> dict[str, Any]:
    """The description, relaxed where it disagrees with what OpenAI's API itself sends (used only where named)."""
    wire = copy.deepcopy(SPEC)
    completion = wire["components"]["schemas"]["CreateCompletionResponse"]
    choice = completion["properties"]["choices"]["items"]["properties"]
    # A streamed completion: the description has no event-stream schema for /completions; OpenAI's chunks are
    # completion objects whose finish_reason is null until the last one, with `usage: null` under include_usage.
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    completion["properties"]["usage"] = {"anyOf": [completion["properties"]["usage"], {"type": "null"}]}
    # With `echo`, the first prompt token has no logprob: OpenAI sends null for it in token_logprobs and
    # top_logprobs (the description says numbers and objects).
    logprobs = choice["logprobs"]["anyOf"][0]["properties"]
    for key in ("token_logprobs", "top_logprobs"):
        logprobs[key]["items"] = {"anyOf": [logprobs[key]["items"], {"type": "null"}]}
    return wire


REGISTRY: Registry[Any] = Registry().with_resources([
    (SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012)),
    (WIRE_URI, Resource.from_contents(_wire(), default_specification=DRAFT202012)),
])  # fmt: skip


def component(name: str, *, wire: bool = False) -> dict[str, Any]:
    assert name in SCHEMAS, f"{name} is not in {SPEC_FILE.name}: add it to EXTRA_ROOTS in the extraction script"
    return {"$ref": f"{WIRE_URI if wire else SPEC_URI}#/components/schemas/{name}"}


def route(path: str, method: str, media: str = "application/json", status: str = "200") -> dict[str, Any]:
    """The schema the description gives for a route's answer."""
    ref = SPEC["paths"][path][method]["responses"][status]["content"][media]["schema"]["$ref"]
    return {"$ref": SPEC_URI + ref}


def _causes(error: ValidationError) -> list[ValidationError]:
    """What made `error`: itself, or, for a union (anyOf / oneOf), the errors of the branches whose `type` tag
    matched the instance (all branches when none did), recursively."""
    if not error.context:
        return [error]
    branches: dict[Any, list[ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    tagged = [subs for subs in branches.values()
              if not any(list(e.relative_path) == ["type"] and e.validator in ("enum", "const") for e in subs)]
    return [cause for subs in (tagged or branches.values()) for sub in subs for cause in _causes(sub)]


def check(instance: Any, schema: dict[str, Any], what: str) -> None:
    """`instance` is valid against `schema`, or the test fails listing what is wrong."""
    errors = list(Draft202012Validator(schema, registry=REGISTRY).iter_errors(instance))
    if errors:
        causes = [cause for error in errors for cause in _causes(error)]
        lines = sorted({f"  at {cause.json_path}: {cause.message[:300]}" for cause in causes})
        pytest.fail(f"{what} is not valid against {schema['$ref']}:\n" + "\n".join(lines[:20]) +
                    f"\n{json.dumps(instance)[:2000]}")  # fmt: skip


def sse_data(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded, ending with the string '[DONE]' where it does."""
    out = []
    for block in text.strip().split("\n\n"):
        (data,) = [line for line in block.split("\n") if line.startswith("data: ")]
        data = data.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def post(srv: Server, path: str, body: dict[str, Any], status: int = 200) -> httpx.Response:
    reply = httpx.post(srv.base_url + path, json={"model": MODEL, **body}, timeout=60)
    assert reply.status_code == status, reply.text
    return reply


@pytest.fixture(scope="module")
def tok(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


def serve(tok: Tokenizer, config: ServerConfig | None = None, **options: Any) -> Any:
    engine = FakeEngine(tok.encode(WORDS), eos_token_id=min(tok.eos_token_ids), model_name=MODEL, max_model_len=512,
                        **options)  # fmt: skip
    state = ServingState(model_name=MODEL)
    state.set_ready(engine, tok)
    return running_server(state, config)


@pytest.fixture(scope="module")
def server(tok: Tokenizer) -> Iterator[Server]:
    with serve(tok, eos_after=6) as srv:
        yield srv


@pytest.fixture(scope="module")
def scripted(tok: Tokenizer) -> Iterator[Server]:
    """Always answers TOOL_ANSWER, read with the qwen3 reasoning parser (so `reasoning_content` is there too)."""
    answer = tok.encode(TOOL_ANSWER)
    with serve(tok, ServerConfig(host="127.0.0.1", port=0, reasoning_parser="qwen3"), answer=answer,
               eos_after=len(answer)) as srv:  # fmt: skip
        yield srv


def test_the_check_fails_on_a_missing_required_field() -> None:
    good = {"id": "c", "object": "chat.completion", "created": 0, "model": MODEL, "choices": [{
        "index": 0, "finish_reason": "stop", "logprobs": None,
        "message": {"role": "assistant", "content": "x", "refusal": None}}]}  # fmt: skip
    check(good, route("/chat/completions", "post"), "a good body")
    del good["choices"][0]["message"]["refusal"]  # type: ignore[index]
    with pytest.raises(pytest.fail.Exception, match=r"choices\[0\]\.message: 'refusal' is a required property"):
        check(good, route("/chat/completions", "post"), "a body without refusal")


# -- chat -----------------------------------------------------------------------------------------------------------

CHAT = route("/chat/completions", "post")
EMBEDDINGS = route("/embeddings", "post")
CHAT_CHUNK = route("/chat/completions", "post", "text/event-stream")


@pytest.mark.parametrize("extra", [
    {},
    {"logprobs": True, "top_logprobs": 2},
    {"n": 2, "max_tokens": 3},
    {"n": 2, "logprobs": True, "max_tokens": 2, "stop": ["fox"]},
])  # fmt: skip
def test_chat_completion(server: Server, extra: dict[str, Any]) -> None:
    body = post(server, "/chat/completions", {"messages": USER, **extra}).json()
    check(body, CHAT, "a chat completion")
    assert len(body["choices"]) == extra.get("n", 1)


@pytest.mark.parametrize("extra", [
    {"stream_options": {"include_usage": True}},
    {"logprobs": True, "top_logprobs": 1, "n": 2, "stream_options": {"include_usage": True}},
    {"max_tokens": 2},
])  # fmt: skip
def test_chat_stream_chunks(server: Server, extra: dict[str, Any]) -> None:
    events = sse_data(post(server, "/chat/completions", {"messages": USER, "stream": True, **extra}).text)
    assert events[-1] == "[DONE]"
    for i, event in enumerate(events[:-1]):
        check(event, CHAT_CHUNK, f"chat chunk {i}")
    if "stream_options" in extra:
        assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] > 0


def test_chat_tool_calls_and_reasoning(scripted: Server) -> None:
    body = post(scripted, "/chat/completions", {"messages": USER, "tools": TOOLS}).json()
    check(body, CHAT, "a chat completion with tool calls")
    message = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls" and message["reasoning_content"] == "Call f."
    assert [json.loads(call["function"]["arguments"]) for call in message["tool_calls"]] == [{"x": 1}]

    stream = {"messages": USER, "tools": TOOLS, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_data(post(scripted, "/chat/completions", stream).text)
    for i, event in enumerate(events[:-1]):
        check(event, CHAT_CHUNK, f"chat chunk {i} (tool calls)")
    assert any(call for e in events[:-1] for c in e["choices"] for call in c["delta"].get("tool_calls", []))


# -- completions ----------------------------------------------------------------------------------------------------

COMPLETION = route("/completions", "post")


@pytest.mark.parametrize("extra", [
    {},
    {"prompt": ["Once", "Twice"], "n": 2, "max_tokens": 3},
    {"logprobs": 2, "max_tokens": 4},
])  # fmt: skip
def test_completion(server: Server, extra: dict[str, Any]) -> None:
    body = post(server, "/completions", {"prompt": "Once upon a time", **extra}).json()
    check(body, COMPLETION, "a completion")


def test_completion_with_echo_and_logprobs(server: Server) -> None:
    body = post(server, "/completions", {"prompt": "The quick brown", "max_tokens": 4, "logprobs": 2, "echo": True})
    # Against the description as OpenAI sends it: the first prompt token's logprob is null (see `_wire`).
    check(body.json(), component("CreateCompletionResponse", wire=True), "a completion with echo and logprobs")


@pytest.mark.parametrize("extra", [{}, {"logprobs": 1, "n": 2, "stream_options": {"include_usage": True}}])
def test_completion_stream_chunks(server: Server, extra: dict[str, Any]) -> None:
    events = sse_data(post(server, "/completions", {"prompt": "Once", "max_tokens": 5, "stream": True, **extra}).text)
    assert events[-1] == "[DONE]"
    for i, event in enumerate(events[:-1]):
        # Completion objects, finish_reason null until the last one (see `_wire`).
        check(event, component("CreateCompletionResponse", wire=True), f"completion chunk {i}")


# -- models ---------------------------------------------------------------------------------------------------------


def test_models(server: Server) -> None:
    listed = httpx.get(server.base_url + "/models").json()
    check(listed, route("/models", "get"), "GET /v1/models")
    one = httpx.get(f"{server.base_url}/models/{MODEL}").json()
    check(one, route("/models/{model}", "get"), "GET /v1/models/{id}")


# -- responses ------------------------------------------------------------------------------------------------------

RESPONSE = route("/responses", "post")
EVENT_SCHEMAS = {
    SCHEMAS[ref["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["enum"][0]: ref["$ref"].rsplit("/", 1)[1]
    for ref in SCHEMAS["ResponseStreamEvent"]["anyOf"]
}
"""Each event type of the stream's union (`ResponseStreamEvent`) and the schema of its own."""


def check_response_events(srv: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    events = sse_data(post(srv, "/responses", {**body, "stream": True}).text)
    for event in events:
        assert event["type"] in EVENT_SCHEMAS, f"{event['type']} is not an event of ResponseStreamEvent"
        check(event, component(EVENT_SCHEMAS[event["type"]]), f"event {event['sequence_number']} ({event['type']})")
    return events


@pytest.mark.parametrize("extra", [{}, {"instructions": "Be brief.", "max_output_tokens": 3}])
def test_response_create_retrieve_delete(server: Server, extra: dict[str, Any]) -> None:
    body = post(server, "/responses", {"input": "Say something.", **extra}).json()
    check(body, RESPONSE, "a response")
    stored = httpx.get(f"{server.base_url}/responses/{body['id']}").json()
    check(stored, route("/responses/{response_id}", "get"), "a stored response")
    gone = httpx.delete(f"{server.base_url}/responses/{body['id']}")
    # The description gives no body for a deletion's 200 (OpenAI sends {id, object, deleted}, as we do).
    assert gone.status_code == 200 and gone.json()["deleted"] is True


def test_response_stream_events(server: Server) -> None:
    events = check_response_events(server, {"input": "Say something."})
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    events = check_response_events(server, {"input": "Go on.", "max_output_tokens": 2})
    assert events[-1]["type"] == "response.incomplete"


def test_response_items_of_thinking_and_calls(scripted: Server) -> None:
    tools = [{"type": "function", "name": "f", "parameters": TOOLS[0]["function"]["parameters"]}]  # type: ignore[index]
    body = post(scripted, "/responses", {"input": "Call f.", "tools": tools}).json()
    check(body, RESPONSE, "a response with reasoning and a call")
    assert [item["type"] for item in body["output"]] == ["reasoning", "message", "function_call"]
    events = check_response_events(scripted, {"input": "Call f.", "tools": tools})
    types = {event["type"] for event in events}
    assert {"response.reasoning_text.delta", "response.function_call_arguments.done"} <= types


def test_response_failed_event(tok: Tokenizer) -> None:
    with serve(tok, fail_after=2) as srv:
        events = check_response_events(srv, {"input": "Hi."})
    assert events[-1]["type"] == "response.failed"


# -- errors ---------------------------------------------------------------------------------------------------------

ERROR = component("ErrorResponse")


def test_error_bodies(server: Server) -> None:
    v1 = server.base_url
    replies = [
        httpx.post(v1 + "/chat/completions", json={"messages": [], "model": MODEL}),
        httpx.post(v1 + "/chat/completions", json={"messages": USER, "temprature": 1}),
        httpx.post(v1 + "/completions", json={"prompt": "x", "model": "other"}),
        httpx.post(v1 + "/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
        httpx.post(v1 + "/responses", json={"input": ""}),
        httpx.get(v1 + "/models/other"),
        httpx.get(v1 + "/responses/resp_unknown"),
        httpx.delete(v1 + "/responses/resp_unknown"),
        httpx.get(v1 + "/no/such/route"),
        httpx.put(v1 + "/chat/completions", json={}),
    ]
    for reply in replies:
        assert 400 <= reply.status_code < 500, reply.text
        check(reply.json(), ERROR, f"the {reply.status_code} of {reply.request.method} {reply.request.url.path}")


def test_error_event_mid_stream(tok: Tokenizer) -> None:
    with serve(tok, fail_after=2) as srv:
        for path, body in [("/chat/completions", {"messages": USER}), ("/completions", {"prompt": "x"})]:
            events = sse_data(post(srv, path, {**body, "stream": True}).text)
            check(events[-1], ERROR, f"the error event of a failed {path} stream")


# -- the real model -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_chat_answer(real_server: RealServer) -> None:
    body = {"model": "smollm2", "messages": USER, "max_tokens": 8, "logprobs": True, "top_logprobs": 2}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    reply = httpx.post(real_server.base_url + "/chat/completions", json=body, headers=headers, timeout=120)
    check(reply.json(), CHAT, "the real model's chat completion")
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    reply = httpx.post(real_server.base_url + "/chat/completions", json=stream, headers=headers, timeout=120)
    for i, event in enumerate(sse_data(reply.text)[:-1]):
        check(event, CHAT_CHUNK, f"the real model's chat chunk {i}")


@pytest.mark.slow
def test_real_embeddings(real_server: RealServer) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for body in ({"input": ["hello", "world"]}, {"input": "hello", "encoding_format": "base64", "dimensions": 8}):
        reply = httpx.post(real_server.base_url + "/embeddings", json={"model": "smollm2", **body}, headers=headers,
                           timeout=120).json()  # fmt: skip
        if body.get("encoding_format") == "base64":
            # The description types `embedding` as an array only; OpenAI's API (and the openai client, which asks
            # for base64 by default) send the base64 text there. Checked as the array it decodes to.
            for item in reply["data"]:
                item["embedding"] = np.frombuffer(base64.b64decode(item["embedding"]), "<f4").tolist()
        check(reply, EMBEDDINGS, f"the real model's embeddings ({body})")

