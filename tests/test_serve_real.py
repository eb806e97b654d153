"""`max serve` with the real SmolLM2 model in a real process on 127.0.0.1, driven by the real `openai` client.

One server for the session (`real_server` in conftest.py; warm-up compiles its whole bucket grid once). It runs with JAX_LOG_COMPILES, so its
log shows every XLA compilation: the mixed-workload test reads that log to show serving compiles nothing.
"""

from __future__ import annotations

import asyncio
import time

import httpx2 as httpx
import openai
import pytest

from tests.serve_helpers import API_KEY, RealServer


@pytest.fixture(scope="module")
def server(real_server: RealServer) -> RealServer:
    return real_server


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_stream_equals_whole_answer_at_temperature_zero(server: RealServer) -> None:
    client = server.client()
    whole = client.chat.completions.create(model="smollm2", messages=_chat("What is the capital of France?"),
                                           temperature=0, max_tokens=24)
    assert whole.choices[0].message.content == "The capital of France is Paris."
    assert whole.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="smollm2", messages=_chat("What is the capital of France?"),
                                            temperature=0, max_tokens=24, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole.choices[0].message.content


def test_n_three_choices_and_seeded_repeatability(server: RealServer) -> None:
    client = server.client()
    kw = dict(model="smollm2", messages=_chat("Write a word."), temperature=1.0, max_tokens=12, seed=7, n=3)
    first = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    assert [c.index for c in first.choices] == [0, 1, 2]
    again = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_multi_token_stop_string_never_appears(server: RealServer) -> None:
    client = server.client()
    base = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                     temperature=0)
    text = base.choices[0].text
    words = text.split()
    assert len(words) >= 3
    stop = " ".join(words[1:3])  # spans several tokens
    whole = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                      temperature=0, stop=[stop])
    assert stop not in whole.choices[0].text and whole.choices[0].finish_reason == "stop"
    assert text.startswith(whole.choices[0].text)
    pieces = [c.choices[0].text for c in server.loose_client().completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=12, temperature=0, stop=[stop], stream=True,
    ) if c.choices]
    assert stop not in "".join(pieces) and "".join(pieces) == whole.choices[0].text


def test_emoji_and_cjk_stream_without_replacement_characters(server: RealServer) -> None:
    client = server.client()
    for prompt in ("Repeat exactly: 🦙🚀🎉 日本語のテキスト", "Translate to Japanese: good morning"):
        chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=_chat(prompt), temperature=0, max_tokens=24, stream=True) if c.choices]
        assert all("\ufffd" not in c for c in chunks)


def test_logprobs_shapes_and_no_infinities(server: RealServer) -> None:
    client = server.client()
    chat = client.chat.completions.create(model="smollm2", messages=_chat("Say hi."), temperature=0, max_tokens=5,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert len(entry.top_logprobs) == 3 and -9999 <= entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    # Legacy completions with echo: raw JSON (the strict client rejects the null first logprob OpenAI sends).
    body = httpx.post(server.base_url + "/completions", headers={"Authorization": f"Bearer {API_KEY}"}, json={
        "model": "smollm2", "prompt": "The quick brown fox", "max_tokens": 3, "logprobs": 2, "echo": True,
        "temperature": 0}, timeout=60).json()
    lp = body["choices"][0]["logprobs"]
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == prompt_tokens + 3
    assert lp["token_logprobs"][0] is None and all(v > -9999 for v in lp["token_logprobs"][1:])
    assert body["choices"][0]["text"].startswith("The quick brown fox")


def test_malformed_requests_and_api_key(server: RealServer) -> None:
    url = server.base_url + "/chat/completions"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    good = {"model": "smollm2", "messages": _chat("hi"), "max_tokens": 2}
    assert httpx.post(url, json=good, timeout=60).status_code == 401
    assert httpx.post(url, json=good, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
    cases = [
        ({**good, "temperature": 3}, 400), ({**good, "messages": []}, 400), ({**good, "model": "nope"}, 404),
        ({**good, "logit_bias": {"99999999": 1}}, 400), ({**good, "stream_options": {"include_usage": True}}, 400),
        ({**good, "messages": _chat("word " * 700)}, 400), ({**good, "n": 0}, 400), ({**good, "top_logprobs": 50}, 400),
    ]
    for body, status in cases:
        response = httpx.post(url, json=body, headers=auth, timeout=60)
        assert response.status_code == status, (body, response.text)
        assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    too_long = httpx.post(url, json={**good, "messages": _chat("word " * 700)}, headers=auth, timeout=60).json()
    assert too_long["error"]["code"] == "context_length_exceeded"


def test_32_concurrent_streams_complete(server: RealServer) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model="smollm2", messages=_chat(f"Count to {i % 5 + 2}."), max_tokens=16, stream=True,
            temperature=0.7, seed=i)
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main() -> list[tuple[str, str | None]]:
        client = server.async_client()
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32 and all(reason in ("stop", "length") for _, reason in results)
    assert server.metric("maxjax_kv_pages_in_use") == 0


def test_disconnect_mid_stream_frees_pages(server: RealServer) -> None:
    with httpx.stream("POST", server.base_url + "/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 200, "stream": True,
                            "ignore_eos": True}, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.metric("maxjax_kv_pages_in_use") > 0
    deadline = time.time() + 10
    while server.metric("maxjax_kv_pages_in_use") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("maxjax_kv_pages_in_use") == 0


def test_mixed_workload_compiles_nothing(server: RealServer) -> None:
    before = len(server.compile_lines())
    assert before > 0, "JAX_LOG_COMPILES should have logged the warm-up compilations"

    async def workload() -> None:
        client = server.async_client()
        jobs = [
            client.chat.completions.create(model="smollm2", messages=_chat("Tell me a long story about " + "cats " * n),
                                           max_tokens=m, temperature=t, top_p=0.9, n=k, logprobs=True,
                                           top_logprobs=2, presence_penalty=0.5, frequency_penalty=0.2,
                                           extra_body={"repetition_penalty": 1.1, "min_tokens": 2, "min_p": 0.05,
                                                       "top_k": 20})
            for n, m, t, k in [(1, 8, 0.0, 1), (20, 30, 0.8, 2), (60, 5, 1.2, 3), (3, 40, 0.5, 1)]
        ]
        jobs += [client.completions.create(model="smollm2", prompt="Hello " * n, max_tokens=6, logprobs=3,
                                           logit_bias={"28": -5}) for n in (2, 35, 70)]
        jobs += [client.chat.completions.create(model="smollm2", messages=_chat("A JSON object, please."),
                                                max_tokens=12, response_format={"type": "json_object"},
                                                temperature=t, logprobs=True) for t in (0.0, 0.9)]
        tool = {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
        jobs += [client.chat.completions.create(model="smollm2", messages=_chat("Call f."), max_tokens=16,
                                                tools=[tool], tool_choice=choice)  # type: ignore[call-overload]
                 for choice in ("required", "auto")]
        await asyncio.gather(*jobs)

    # echo + logprobs through the raw client: the strict one rejects OpenAI's null first logprob.
    async def raw_echo() -> None:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as http:
            responses = await asyncio.gather(*(http.post(server.base_url + "/completions", json={
                "model": "smollm2", "prompt": "Hello " * n, "max_tokens": 6, "echo": True, "logprobs": 3})
                for n in (2, 35, 70)))
            # The prompts were served before (above), so their pages are in the prefix cache: echo must
            # still score every prompt token.
            for response in responses:
                assert response.status_code == 200, response.text
                body = response.json()
                assert len(body["choices"][0]["logprobs"]["tokens"]) == body["usage"]["prompt_tokens"] + 6

    asyncio.run(workload())
    asyncio.run(raw_echo())
    after = server.compile_lines()
    assert len(after) == before, after[before:]
