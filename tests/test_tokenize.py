"""`/tokenize` and `/detokenize`: the counts the generation routes report, round trips, the API key, and 400s that
name the field; the fake engine for the HTTP side, the real SmolLM2 server for the counts end to end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from openai import OpenAI

from maxjax.config import ServerConfig
from maxjax.serve.app import ServingState
from maxjax.serve.fake_engine import FakeEngine
from maxjax.tokenizer import Tokenizer
from tests.serve_helpers import API_KEY, WORDS, RealServer, Server, load_tokenizer, running_server

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]  # fmt: skip


@pytest.fixture(scope="module")
def tok(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def server(tok: Tokenizer) -> Iterator[Server]:
    engine = FakeEngine(tok.encode(WORDS), eos_token_id=min(tok.eos_token_ids), model_name="m", max_model_len=777,
                        eos_after=2)  # fmt: skip
    state = ServingState(model_name="m")
    state.set_ready(engine, tok)
    with running_server(state, ServerConfig(host="127.0.0.1", port=0, api_key=API_KEY)) as srv:
        yield srv


def post(url: str, body: dict[str, Any], *, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url, json=body, headers=headers, timeout=60)


def tokenize(url: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = post(url + "/tokenize", body)
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    assert result["count"] == len(result["tokens"])
    return result


def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, _strict_response_validation=True)


def test_a_prompt_is_encoded_as_completions_encode_it(server: Server, tok: Tokenizer) -> None:
    result = tokenize(server.url, {"prompt": "Hello there, world."})
    assert result["tokens"] == tok.encode("Hello there, world.", add_special_tokens=True)
    assert result["max_model_len"] == 777 and result["token_strs"] is None
    reply = client(server.url).completions.create(model="m", prompt="Hello there, world.", max_tokens=2)
    assert reply.usage is not None and reply.usage.prompt_tokens == result["count"]
    strs = tokenize(server.url, {"prompt": "Hello there", "return_token_strs": True})["token_strs"]
    assert "".join(strs).replace("Ġ", " ") == "Hello there"


@pytest.mark.parametrize("extra", [{}, {"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "none"}])
def test_a_chat_counts_what_chat_completions_reports(server: Server, extra: dict[str, Any]) -> None:
    result = tokenize(server.url, {"messages": CHAT, **extra})
    reply = client(server.url).chat.completions.create(model="m", messages=CHAT, max_tokens=2, **extra)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens == result["count"]


def test_without_the_generation_prompt_and_with_special_tokens(server: Server, tok: Tokenizer) -> None:
    full = tokenize(server.url, {"messages": CHAT})["tokens"]
    bare = tokenize(server.url, {"messages": CHAT, "add_generation_prompt": False})["tokens"]
    assert len(bare) < len(full) and full[: len(bare)] == bare
    assert tok.decode(full[len(bare) :]) == "<|im_start|>assistant\n"
    text = tok.decode(full)
    special = tokenize(server.url, {"messages": CHAT, "add_special_tokens": True})["tokens"]
    assert special == tok.encode(text, add_special_tokens=True)


def test_detokenize_round_trips(server: Server) -> None:
    for body in ({"prompt": "A café, naïve & 🙂."}, {"messages": CHAT}):
        ids = tokenize(server.url, body)["tokens"]
        reply = post(server.url + "/detokenize", {"tokens": ids})
        assert reply.status_code == 200, reply.text
        text = reply.json()["prompt"]
        assert tokenize(server.url, {"prompt": text, "add_special_tokens": False})["tokens"] == ids
        if "prompt" in body:
            assert text == body["prompt"]
        else:
            assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("assistant\n")


def test_both_routes_are_behind_the_api_key(server: Server) -> None:
    for route, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert post(server.url + route, body, key=None).status_code == 401
        assert post(server.url + route, body, key="wrong").status_code == 401
        assert post(server.url + route, body).status_code == 200


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": CHAT}, "messages"),
    ("/tokenize", {"prompt": 3}, "prompt"),
    ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/tokenize", {"messages": CHAT, "max_tokens": 3}, "max_tokens"),
    ("/tokenize", {"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
    ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {}, "tokens"),
])  # fmt: skip
def test_bad_bodies_are_a_400_naming_the_field(server: Server, route: str, body: dict[str, Any], param: str) -> None:
    reply = post(server.url + route, body)
    error = reply.json()["error"]
    assert reply.status_code == (404 if param == "model" else 400), error
    assert error["param"] == param, error


# -- the real model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"tools": TOOLS, "tool_choice": "required"}])
def test_real_chat_count_is_the_usage_prompt_tokens(real_server: RealServer, extra: dict[str, Any]) -> None:
    result = tokenize(real_server.url, {"model": "smollm2", "messages": CHAT, **extra})
    assert result["max_model_len"] == 512
    reply = real_server.client().chat.completions.create(model="smollm2", messages=CHAT, max_tokens=2, **extra)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens == result["count"]
    text = post(real_server.url + "/detokenize", {"tokens": result["tokens"]}).json()["prompt"]
    assert tokenize(real_server.url, {"prompt": text, "add_special_tokens": False})["tokens"] == result["tokens"]
