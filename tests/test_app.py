"""The HTTP server end to end: a real Hypercorn on 127.0.0.1, the fake engine, the real SmolLM2 tokenizer, and the
real `openai` client in strict mode (plus raw httpx for what the client will not send or parse)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from maxjax.config import ServerConfig
from maxjax.serve.app import ServingState
from maxjax.serve.choices import Choice, ChoiceRunner
from maxjax.serve.fake_engine import FakeEngine
from maxjax.serve.metrics import Metrics
from maxjax.serve.protocol import GenerationRequest, SamplingParams
from maxjax.serve.text import LOGPROB_FLOOR, ChoiceText
from maxjax.tokenizer import Tokenizer
from tests.serve_helpers import WORDS, Server, load_tokenizer, running_server

MODEL = "org/smol-135m"  # a slash, as HF ids have: /v1/models/<id> must still route
MAX_LEN = 256
USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def tok(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


def make_engine(tok: Tokenizer, **options: Any) -> FakeEngine:
    options.setdefault("max_model_len", MAX_LEN)
    return FakeEngine(tok.encode(WORDS), eos_token_id=min(tok.eos_token_ids), model_name=MODEL, **options)


def ready_state(engine: FakeEngine, tok: Tokenizer) -> ServingState:
    state = ServingState(model_name=MODEL, model_root="/models/smol.gguf")
    state.set_ready(engine, tok)
    return state


@pytest.fixture(scope="module")
def server(tok: Tokenizer) -> Iterator[Server]:
    with running_server(ready_state(make_engine(tok), tok)) as srv:
        yield srv


@pytest.fixture
def engine(server: Server) -> FakeEngine:
    assert isinstance(server.state.engine, FakeEngine)
    return server.state.engine


def client(srv: Server, api_key: str = "unused", *, strict: bool = True) -> OpenAI:
    """strict=False only for streamed completions: their chunks carry `finish_reason: null` until the last one (as
    OpenAI's do), which the client's `Completion` model, used for each chunk, does not allow in strict mode."""
    return OpenAI(base_url=srv.base_url, api_key=api_key, max_retries=0, _strict_response_validation=strict)


def events(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded ('[DONE]' kept as the string)."""
    out = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat_prompt_ids(tok: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


# -- happy paths --------------------------------------------------------------------------------------------------


def test_models(server: Server) -> None:
    c = client(server)
    (card,) = c.models.list().data
    assert card.id == MODEL and card.owned_by == "maxjax"
    extra = card.model_extra or {}
    assert extra["max_model_len"] == MAX_LEN and extra["root"] == "/models/smol.gguf"
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        c.models.retrieve("org/other")
    assert info.value.code == "model_not_found"
    assert httpx.get(server.url + "/version").json()["version"]


def test_stream_equals_non_stream(server: Server) -> None:
    c = client(server)
    whole = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, temperature=0)
    chunks = list(
        c.chat.completions.create(model=MODEL, messages=USER, max_tokens=20, temperature=0, stream=True)
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 20
    assert len({(ch.id, ch.created, ch.model) for ch in chunks}) == 1

    text = c.completions.create(model=MODEL, prompt="Once", max_tokens=12, temperature=0)
    streamed = client(server, strict=False).completions.create(
        model=MODEL, prompt="Once", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == text.choices[0].text


def test_chat_stream_shape(server: Server, engine: FakeEngine) -> None:
    body = {"messages": USER, "max_tokens": 6, "n": 3, "seed": 11, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    response = httpx.post(server.base_url + "/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    evs = events(response.text)
    assert evs[-1] == "[DONE]" and response.text.endswith("data: [DONE]\n\n")
    chunks = evs[:-1]
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["model"] == MODEL
    assert all("usage" in c for c in chunks) and all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 18
    per_index: dict[int, list[dict[str, Any]]] = {0: [], 1: [], 2: []}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        per_index[choice["index"]].append(choice)
    for choices in per_index.values():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in ch["delta"] for ch in choices[1:])
        # The finish reason rides on the chunk with the last token: one role chunk, then one chunk a token.
        assert choices[-1]["delta"]["content"] and choices[-1]["finish_reason"] == "length"
        assert all(ch["finish_reason"] is None for ch in choices[:-1]) and len(choices) == 1 + 6
    # n choices are separate engine requests with their own seeds.
    requests = engine.requests[-3:]
    assert [r.request_id for r in requests] == [f"{chunks[0]['id']}-{i}" for i in range(3)]
    assert [r.params.seed for r in requests] == [11, 12, 13]
    texts = ["".join(ch["delta"].get("content", "") for ch in per_index[i]) for i in range(3)]
    assert len(set(texts)) == 3


def test_n_choices_and_prompt_lists(server: Server) -> None:
    c = client(server)
    chat = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, n=3)
    assert [ch.index for ch in chat.choices] == [0, 1, 2]
    assert chat.usage is not None and chat.usage.completion_tokens == 12
    completion = c.completions.create(model=MODEL, prompt=["a b", "c"], n=2, max_tokens=3, temperature=0)
    assert [ch.index for ch in completion.choices] == [0, 1, 2, 3]
    # Greedy: the two samples of one prompt agree; the two prompts differ.
    texts = [ch.text for ch in completion.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    ids = c.completions.create(model=MODEL, prompt=[[10, 11], [12]], max_tokens=2)
    assert len(ids.choices) == 2 and ids.usage is not None and ids.usage.prompt_tokens == 3


def test_token_budgets(server: Server, engine: FakeEngine, tok: Tokenizer) -> None:
    c = client(server)
    c.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, max_completion_tokens=7)
    assert engine.requests[-1].params.max_tokens == 7
    c.chat.completions.create(model=MODEL, messages=USER)  # no limit: the rest of the context
    assert engine.requests[-1].params.max_tokens == MAX_LEN - len(chat_prompt_ids(tok, USER))
    default = c.completions.create(model=MODEL, prompt="x")
    assert default.usage is not None and default.usage.completion_tokens == 16


def test_sampling_fields_reach_the_engine(server: Server, engine: FakeEngine) -> None:
    extensions = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2, "stop_token_ids": [7],
                  "ignore_eos": True}  # fmt: skip
    client(server).chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=-0.5, logit_bias={"5": 10}, seed=3, extra_body=extensions,
    )  # fmt: skip
    assert engine.requests[-1].params == SamplingParams(
        max_tokens=4, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=3, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, logit_bias={5: 10.0}, min_tokens=2, stop_token_ids=(7,),
        ignore_eos=True,
    )  # fmt: skip


def test_end_of_sequence(tok: Tokenizer) -> None:
    with running_server(ready_state(make_engine(tok, eos_after=3), tok)) as srv:
        c = client(srv)
        out = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=10)
        assert out.choices[0].finish_reason == "stop" and out.usage is not None
        assert out.usage.completion_tokens == 4  # three words and the end-of-sequence token
        assert "<|" not in (out.choices[0].message.content or "")
        longer = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, extra_body={"min_tokens": 6})
        assert longer.usage is not None and longer.usage.completion_tokens == 10
        ignored = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, extra_body={"ignore_eos": True})
        assert ignored.choices[0].finish_reason == "length"


# -- stop strings -------------------------------------------------------------------------------------------------


def spanning_stop(tok: Tokenizer, engine: FakeEngine, prompt_ids: list[int]) -> tuple[str, str]:
    """A stop string that spans two tokens of what the engine will generate, and the text before it."""
    ids = engine.script(prompt_ids, SamplingParams(max_tokens=30, temperature=0))
    cut = tok.decode(ids[:5])
    text = tok.decode(ids[:6])
    start = len(cut) - 2  # the last two characters of token 5 and the first of token 6
    stop = text[start : len(cut) + 1]
    first = text.find(stop)
    return stop, tok.decode(ids)[:first]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens_never_leaks(server: Server, engine: FakeEngine, tok: Tokenizer, stream: bool) -> None:
    stop, before = spanning_stop(tok, engine, chat_prompt_ids(tok, USER))
    c = client(server)
    kwargs: dict[str, Any] = {"model": MODEL, "messages": USER, "max_tokens": 30, "temperature": 0, "stop": [stop]}
    if stream:
        text, finish = "", None
        for chunk in c.chat.completions.create(**kwargs, stream=True):
            text += chunk.choices[0].delta.content or ""
            assert before.startswith(text)  # no delta ever shows a piece of the stop string
            finish = chunk.choices[0].finish_reason
    else:
        out = c.chat.completions.create(**kwargs)
        text, finish = out.choices[0].message.content, out.choices[0].finish_reason
    assert text == before and finish == "stop"
    # The engine request was closed at the stop string, not run to max_tokens.
    assert engine.requests[-1].request_id in engine.cancelled

    kept = c.chat.completions.create(**kwargs, extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].message.content == before + stop


def test_stop_string_in_completions(server: Server, engine: FakeEngine, tok: Tokenizer) -> None:
    prompt = tok.encode("The story")
    stop, before = spanning_stop(tok, engine, prompt)
    c = client(server)
    out = c.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop, echo=True)
    assert out.choices[0].text == "The story" + before
    streamed = client(server, strict=False).completions.create(
        model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == before


# -- logprobs -----------------------------------------------------------------------------------------------------


def test_chat_logprobs(server: Server) -> None:
    c = client(server)
    out = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        assert LOGPROB_FLOOR <= entry.logprob <= 0
    assert "".join(e.token for e in content) == out.choices[0].message.content
    stream = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, logprobs=True, stream=True)
    entries = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content or []]
    assert len(entries) == 5 and all(e.top_logprobs == [] for e in entries)
    assert c.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs_with_echo(server: Server, tok: Tokenizer) -> None:
    # Raw httpx: with echo the first prompt token's logprob is null (the wire contract), which the openai client's
    # strict models do not allow for.
    prompt = "The quick brown"
    body = {"prompt": prompt, "max_tokens": 4, "logprobs": 2, "echo": True}
    choice = httpx.post(server.base_url + "/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    n_prompt = len(tok.encode(prompt, add_special_tokens=True))
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_prompt + 4
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(len(t) in (2, 3) for t in lp["top_logprobs"][1:])
    assert choice["text"].startswith(prompt) and "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    plain = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=0)
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.text_offset == [0, *plain.choices[0].logprobs.text_offset[1:]]


def test_non_finite_logprobs_are_clamped(tok: Tokenizer) -> None:
    with running_server(ready_state(make_engine(tok, nonfinite_logprobs=True), tok)) as srv:
        body = {"messages": USER, "max_tokens": 8, "logprobs": True, "top_logprobs": 2, "stream": True}
        raw = httpx.post(srv.base_url + "/chat/completions", json=body).text
        assert "Infinity" not in raw and "NaN" not in raw
        out = client(srv).chat.completions.create(model=MODEL, messages=USER, max_tokens=8, logprobs=True, top_logprobs=2)
        values = [t.logprob for e in out.choices[0].logprobs.content or [] for t in [e, *e.top_logprobs]]  # type: ignore[union-attr]
        assert values and all(math.isfinite(v) and v >= LOGPROB_FLOOR for v in values)
        assert LOGPROB_FLOOR in values


# -- errors -------------------------------------------------------------------------------------------------------

BAD_CHAT = [
    ({"messages": []}, "messages", None),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", None),  # a text-only model (tests/test_images.py: a model that takes images)
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", None),
    ({"messages": USER, "temperature": 3}, "temperature", None),
    ({"messages": USER, "top_p": 0}, "top_p", None),
    ({"messages": USER, "presence_penalty": 9}, "presence_penalty", None),
    ({"messages": USER, "n": 0}, "n", None),
    ({"messages": USER, "n": 99}, "n", None),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", None),
    ({"messages": USER, "logit_bias": {"999999": 1}}, "logit_bias", None),
    ({"messages": USER, "logit_bias": {"5": 200}}, "logit_bias", None),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options", None),
    ({"messages": USER, "response_format": {"type": "json_schema"}}, "response_format", None),
    ({"messages": USER, "response_format": {"type": "xml"}}, "response_format", None),
    ({"messages": USER, "structured_outputs": {"regex": 5}}, "structured_outputs", None),
    ({"messages": USER, "structured_outputs": {"json": "{not json"}}, "structured_outputs", None),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0]", None),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "often"},
     "tool_choice", None),
    ({"messages": USER, "functions": [{"name": "f"}]}, "functions", None),
    ({"messages": USER, "frobnicate": 1}, "frobnicate", None),
    ({"messages": USER, "max_tokens": MAX_LEN}, "max_tokens", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "word " * MAX_LEN}]}, "messages", "context_length_exceeded"),
]  # fmt: skip
BAD_COMPLETION = [
    ({"prompt": ""}, "prompt", None),
    ({"prompt": []}, "prompt", None),
    ({"prompt": [[1], []]}, "prompt", None),
    ({"prompt": [10**9]}, "prompt", None),
    ({"prompt": "x", "logprobs": 21}, "logprobs", None),
    ({"prompt": "x", "suffix": "y"}, "suffix", None),
    ({"prompt": list(range(10, 10 + MAX_LEN))}, "prompt", "context_length_exceeded"),
]


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error") or status in (429, 503)
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


@pytest.mark.parametrize(("body", "param", "code"), BAD_CHAT)
def test_bad_chat_requests(server: Server, body: dict[str, Any], param: str, code: str | None) -> None:
    assert_error(httpx.post(server.base_url + "/chat/completions", json=body), 400, param, code)


@pytest.mark.parametrize(("body", "param", "code"), BAD_COMPLETION)
def test_bad_completion_requests(server: Server, body: dict[str, Any], param: str, code: str | None) -> None:
    assert_error(httpx.post(server.base_url + "/completions", json=body), 400, param, code)


def test_bad_bodies(server: Server) -> None:
    url = server.base_url + "/chat/completions"
    assert_error(httpx.post(url, content=b'{"messages": ['), 400)
    assert_error(httpx.post(url, content=b"\xff\xfe\x00garbage"), 400)
    assert_error(httpx.post(url, json=[1, 2]), 400)
    assert_error(httpx.post(url, content=b'{"messages": [], "temperature": NaN}'), 400)
    assert_error(httpx.post(url, data={"messages": "x"}), 400)  # a form post
    assert_error(httpx.post(url, content=b"{}", headers={"content-type": "text/plain"}), 400)
    assert_error(httpx.post(url, json={"model": "gpt-4", "messages": USER}), 404, "model", "model_not_found")
    assert_error(httpx.get(url), 405)
    assert_error(httpx.get(server.base_url + "/nope"), 404)
    assert_error(httpx.get(server.base_url + "/models/nope"), 404, "model", "model_not_found")


def test_errors_through_the_client(server: Server) -> None:
    c = client(server)
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=MODEL, messages=USER, temperature=5)
    assert info.value.param == "temperature"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", stream_options={"include_usage": True})


def test_engine_failure(tok: Tokenizer) -> None:
    with running_server(ready_state(make_engine(tok, fail_after=2), tok)) as srv:
        c = client(srv)
        with pytest.raises(openai.APIError) as info:  # an `error` event in a 200 stream makes the client raise
            for _ in c.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, stream=True):
                pass
        assert "failed" in info.value.message
        assert_error(httpx.post(srv.base_url + "/completions", json={"prompt": "x"}), 500)


# -- auth, loading, overload, disconnects ----------------------------------------------------------------------------


def test_api_key(tok: Tokenizer) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, api_key="sesame")
    with running_server(ready_state(make_engine(tok), tok), config) as srv:
        assert client(srv, "sesame").models.list().data[0].id == MODEL
        with pytest.raises(openai.AuthenticationError):
            client(srv, "wrong").chat.completions.create(model=MODEL, messages=USER)
        assert_error(httpx.post(srv.base_url + "/completions", json={"prompt": "x"}), 401)
        assert httpx.get(srv.base_url + "/models", headers={"Authorization": "sesame"}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # operations routes stay open
        assert httpx.get(srv.url + "/metrics").status_code == 200


def test_health_while_loading(tok: Tokenizer) -> None:
    state = ServingState(model_name=MODEL)
    with running_server(state) as srv:
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.headers["retry-after"]
        loading = httpx.get(srv.base_url + "/models")
        assert_error(loading, 503)
        assert loading.headers["retry-after"]
        state.set_ready(make_engine(tok), tok)
        assert httpx.get(srv.url + "/health").status_code == 200
        assert client(srv).models.list().data[0].id == MODEL


def test_queue_full_is_429(tok: Tokenizer) -> None:
    engine = make_engine(tok, max_queue=1, delay_s=0.02)
    with running_server(ready_state(engine, tok)) as srv:
        url = srv.base_url + "/chat/completions"
        with httpx.stream("POST", url, json={"messages": USER, "max_tokens": 100, "stream": True}) as held:
            lines = held.iter_lines()  # kept referenced: a dropped iterator closes the connection
            next(lines)  # the first request holds the only row
            busy = httpx.post(url, json={"messages": USER})
            assert_error(busy, 429)
            assert busy.headers["retry-after"]
            assert_error(httpx.post(url, json={"messages": USER, "stream": True}), 429)  # a status, not a stream
            with pytest.raises(openai.RateLimitError):
                client(srv).chat.completions.create(model=MODEL, messages=USER)
            # n=2 needs two rows: refused as a whole, and nothing is left behind in the engine.
        assert_error(httpx.post(url, json={"messages": USER, "n": 2}), 429)
        assert not engine.live or wait_for(lambda: not engine.live)


def wait_for(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_disconnect_cancels_the_engine_request(tok: Tokenizer, route: str) -> None:
    engine = make_engine(tok, delay_s=0.01)
    with running_server(ready_state(engine, tok)) as srv:
        url, body = (
            (srv.base_url + "/chat/completions", {"messages": USER, "n": 2})
            if route == "chat"
            else (srv.base_url + "/completions", {"prompt": "x"})
        )
        with httpx.stream("POST", url, json={**body, "max_tokens": 200, "stream": True}) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
        ids = [r.request_id for r in engine.requests]
        assert wait_for(lambda: set(ids) <= set(engine.cancelled)), (ids, engine.cancelled)
        assert not engine.live and not engine.finished


def test_disconnect_while_waiting_for_a_whole_answer(tok: Tokenizer) -> None:
    engine = make_engine(tok, delay_s=0.01)
    with running_server(ready_state(engine, tok)) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.base_url + "/completions", json={"prompt": "x", "max_tokens": 200, "n": 2}, timeout=0.2)
        ids = [r.request_id for r in engine.requests]
        assert len(ids) == 2 and wait_for(lambda: set(ids) <= set(engine.cancelled)), engine.cancelled


def test_a_body_never_sent_still_frees_the_rows(tok: Tokenizer) -> None:
    """The client can leave between the headers and the first byte of a stream: the generator that would have
    closed the engine requests never starts, so the runner closes them when it has not started in time."""
    engine = make_engine(tok)

    async def main() -> None:
        request = GenerationRequest("r-0", (1, 2), SamplingParams(max_tokens=50))
        runner = ChoiceRunner(engine, [Choice(0, request, ChoiceText(tok))], Metrics(), arrived=0.0,
                              unstarted_timeout=0.05)
        await runner.start()
        assert engine.live == {"r-0"}
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert engine.cancelled == ["r-0"] and not engine.live


def test_async_client_concurrent_streams(server: Server) -> None:
    async def main() -> list[str]:
        c = AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, _strict_response_validation=True)

        async def one(i: int) -> str:
            stream = await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"n{i}"}], max_tokens=8, temperature=0, stream=True
            )
            return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

        try:
            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await c.close()

    texts = asyncio.run(main())
    assert len(texts) == 8 and all(texts)


def test_metrics(server: Server) -> None:
    client(server).chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    httpx.post(server.base_url + "/chat/completions", json={"messages": []})
    page = httpx.get(server.url + "/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    text = page.text
    assert 'maxjax_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'maxjax_requests_total{route="/v1/chat/completions",status="400"}' in text
    for series in ("maxjax_time_to_first_token_seconds_bucket", "maxjax_inter_token_latency_seconds_count",
                   "maxjax_running_batch_size", "maxjax_queue_depth", "maxjax_kv_pages_in_use",
                   "maxjax_generation_tokens_total", "maxjax_prompt_tokens_total"):  # fmt: skip
        assert series in text, series
    server.state.metrics.set_kv_pages_in_use(42)
    assert "maxjax_kv_pages_in_use 42.0" in httpx.get(server.url + "/metrics").text


# -- the process: serve() ------------------------------------------------------------------------------------------

SERVE_SCRIPT = """
import sys, time
from maxjax.config import ServerConfig
from maxjax.errors import UserError
from maxjax.serve.http_server import serve

class Tok:
    vocab_size = 10
    eos_token_ids = frozenset({0})

class Engine:
    model_name, max_model_len = "m", 16

    def open_requests(self):
        return 0

    def stop(self):
        pass

def load(state):
    if sys.argv[2] == "fail":
        raise UserError("no such model: /nowhere (give a path or an HF id)")
    time.sleep(0.2)
    state.set_ready(Engine(), Tok())

serve(ServerConfig(host="127.0.0.1", port=int(sys.argv[1]), served_model_name="m"), load)
"""


def start_serve(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    from maxjax.serve.http_server import bind

    sock = bind("127.0.0.1", 0)  # find a free port, then let the child take it
    port = sock.getsockname()[1]
    sock.close()
    script = tmp_path / "serve_it.py"
    script.write_text(textwrap.dedent(SERVE_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(port), mode], stderr=subprocess.PIPE, text=True, env=env)
    return proc, port


def test_serve_exits_non_zero_when_loading_fails(tmp_path: Path) -> None:
    proc, _ = start_serve(tmp_path, "fail")
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "no such model: /nowhere" in stderr and "Traceback" not in stderr


def test_serve_loads_in_background_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc, port = start_serve(tmp_path, "ok")
    try:
        url = f"http://127.0.0.1:{port}/health"
        statuses: set[int] = set()

        def healthy() -> bool:
            try:
                statuses.add(httpx.get(url).status_code)
            except httpx.TransportError:
                return False
            return 200 in statuses

        assert wait_for(healthy, timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.communicate()


# -- shutting down ------------------------------------------------------------------------------------------------


def test_a_draining_server_refuses_new_requests_with_503_and_retry_after(tok: Tokenizer) -> None:
    state = ready_state(make_engine(tok), tok)
    with running_server(state) as srv:
        state.draining = True
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "shutting_down"
        response = httpx.post(srv.base_url + "/chat/completions", json={"model": MODEL, "messages": USER})
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.json()["error"]["code"] == "server_shutting_down"


def test_streams_ended_at_shutdown_get_a_final_error_event(tok: Tokenizer) -> None:
    engine = make_engine(tok, delay_s=0.05)
    with running_server(ready_state(engine, tok)) as srv:
        with httpx.stream("POST", srv.base_url + "/chat/completions", timeout=30, json={
                "model": MODEL, "messages": USER, "max_tokens": 200, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert engine.open_requests() == 1
            engine.abort_all()
            rest = [line for line in lines if line.startswith("data:")]
        assert json.loads(rest[-1][5:])["error"]["code"] == "server_shutting_down"
        assert engine.open_requests() == 0
        refused = httpx.post(srv.base_url + "/completions", json={"model": MODEL, "prompt": "Hi"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"


def test_completion_stream_ends_on_its_last_tokens(server: Server) -> None:
    """Every streamed chunk that carries tokens carries their logprobs, and the finish reason comes with the last
    of them: `max_tokens` chunks, no extra empty one (a client counting chunks or reading logprobs per chunk)."""
    body = {"prompt": "Once", "max_tokens": 5, "logprobs": 1, "stream": True}
    response = httpx.post(server.base_url + "/completions", json=body)
    assert response.status_code == 200
    choices = [c["choices"][0] for c in events(response.text)[:-1]]
    assert len(choices) == 5 and all(ch["text"] and ch["logprobs"]["tokens"] for ch in choices)
    assert [ch["finish_reason"] for ch in choices] == [None] * 4 + ["length"]
