"""What one client can do to a real `max serve` (the real SmolLM2 model, over HTTP): no request body takes it
down or gets a 5xx, and SIGTERM drains it cleanly.

The fuzz test builds bodies from every field of both endpoints with boundary values (hypothesis, derandomized
and bounded, so it is the same examples every run) and sends them to the session's real server.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from maxjax.serve.schemas import ChatCompletionRequest, CompletionRequest
from tests.serve_helpers import API_KEY, MAX, RealServer, free_port, real_server_args

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
COMPLETION = {"model": "smollm2", "prompt": "Hi", "max_tokens": 3}


def _post(server: RealServer, route: str, body: Any, **kw: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + route, content=content, timeout=120,
                      headers={**AUTH, "Content-Type": "application/json"}, **kw)


def _assert_still_serves(server: RealServer) -> None:
    response = _post(server, "/completions", {**COMPLETION, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_top_k_past_int32_is_a_400_and_the_server_keeps_serving(real_server: RealServer) -> None:
    response = _post(real_server, "/completions", {"prompt": "Hi", "max_tokens": 3, "top_k": 2147483648})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "top_k"
    # A top_k past the vocabulary but inside int32 is the whole vocabulary, not an error.
    big = _post(real_server, "/completions", {**COMPLETION, "top_k": 2**31 - 1, "seed": 2**63 - 1})
    assert big.status_code == 200, big.text
    _assert_still_serves(real_server)


def test_models_root_is_the_model_as_given(real_server: RealServer, smollm2_gguf: Path) -> None:
    card = httpx.get(real_server.base_url + "/models", headers=AUTH).json()["data"][0]
    assert card["root"] == str(smollm2_gguf)  # what --model said; never a path the server resolved


# -- the fuzzed edge --------------------------------------------------------------------------------------------

DEEP = "\0deep\0"
"""Stands for a value nested thousands of levels deep (written into the raw body: json.dumps would recurse)."""
HUGE = "x" * 400_000

BOUNDARY: list[Any] = [
    0, -1, 1, 2**31 - 1, 2**31, -(2**31) - 1, 2**63, -(2**63), 2**64, 1e308, -1e308, 5e-324, 0.5,
    "NaN", "Infinity", "", "0", [], [0], [-1], [2**31], {}, {"": 0}, {"1": 1e308}, None, True, False,
    [""], ["a", ""], [[]], [[2**31]], HUGE, [HUGE], DEEP,
]
FIELDS = {
    "/chat/completions": (CHAT, sorted(ChatCompletionRequest.model_fields)),
    "/completions": (COMPLETION, sorted(CompletionRequest.model_fields)),
}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    route = draw(st.sampled_from(sorted(FIELDS)))
    base, fields = FIELDS[route]
    body = dict(base)
    for name in draw(st.lists(st.sampled_from([*fields, "unknown_field", "messages", "prompt"]), min_size=1,
                              max_size=3, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            body.pop(name, None)  # a required field left out, now and then
            continue
        value = draw(st.sampled_from(BOUNDARY))
        if name == "messages" and draw(st.booleans()):
            value = [{"role": draw(st.sampled_from(["user", "system", "assistant", "tool", "robot", 7])),
                      "content": value}]
        body[name] = value
    raw = json.dumps(body)
    raw = raw.replace(json.dumps(DEEP), "[" * 20_000 + "]" * 20_000)
    if draw(st.integers(0, 19)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated JSON
    return route, raw.encode()


@settings(max_examples=70, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=bodies())
def test_fuzzed_bodies_never_get_a_5xx(real_server: RealServer, case: tuple[str, bytes]) -> None:
    route, raw = case
    response = _post(real_server, route, raw)
    event(f"HTTP {response.status_code}")  # pytest --hypothesis-show-statistics shows the mix
    assert response.status_code < 500, (raw[:300], response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert '"server_error"' not in response.text, response.text[-500:]
    else:
        assert response.json()["choices"], response.text[:500]


def test_the_server_serves_after_the_fuzzing(real_server: RealServer) -> None:
    _assert_still_serves(real_server)
    assert real_server.metric("maxjax_kv_pages_in_use") == 0
    steps = real_server.metric("maxjax_engine_steps_total")
    host = real_server.metric("maxjax_engine_host_seconds_total")
    assert steps > 0 and 0 < host / steps < 1.0, (steps, host)  # where a step's host time goes, per /metrics


# -- graceful shutdown --------------------------------------------------------------------------------------------


@pytest.fixture
def own_server(real_server: RealServer, smollm2_gguf: Path, real_compile_cache: Path,
               tmp_path: Path) -> Iterator[Any]:
    """Start `max serve` with the real server's flags (so it loads that server's compiled executables) and
    extra flags of the test's; yields (start(extra) -> (process, url), log path)."""
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "server.log"

    def start(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        with log.open("w") as out:
            proc = subprocess.Popen([MAX, "serve", *real_server_args(smollm2_gguf, real_compile_cache), *extra,
                                     "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    yield start, log
    for proc in procs:
        proc.kill()
        proc.wait()


def _stream(url: str, max_tokens: int) -> httpx.Response:
    client = httpx.Client(headers=AUTH, timeout=120)
    request = client.build_request("POST", url + "/v1/completions", json={
        "model": "smollm2", "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
        "temperature": 0, "stream": True})
    return client.send(request, stream=True)


def test_sigterm_lets_open_streams_finish_refuses_new_ones_and_exits_zero(own_server: Any) -> None:
    start, log = own_server
    proc, url = start("--shutdown-timeout", "60")
    response = _stream(url, 48)
    lines = response.iter_lines()
    first = next(line for line in lines if line.startswith("data:"))
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "the server did not start draining"
        time.sleep(0.02)
    refused = httpx.post(url + "/v1/completions", headers=AUTH, json=COMPLETION, timeout=30)
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert refused.json()["error"]["code"] == "server_shutting_down"
    events = [first, *(line for line in lines if line.startswith("data:"))]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[5:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 40  # the whole answer came
    assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]


def test_streams_still_open_at_the_shutdown_timeout_end_with_an_error_event(own_server: Any) -> None:
    start, log = own_server
    proc, url = start("--shutdown-timeout", "0")
    response = _stream(url, 200)
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data:"))
    proc.send_signal(signal.SIGTERM)
    events = [line for line in lines if line.startswith("data:")]
    last = json.loads(events[-1][5:])
    assert last["error"]["code"] == "server_shutting_down", events[-3:]
    assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
    assert "ending 1 requests still open" in log.read_text()
