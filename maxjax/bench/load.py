"""How `max benchmark` loads the server: closed loop, one concurrency level at a time.

At each level `concurrency` workers each send one streaming chat request, wait for it to finish, and send the
next, until `num_requests` have been sent. Every request asks for exactly its prompt's `max_tokens` (with
`ignore_eos: true`, an extension vLLM, MAX and maxjax honour) at temperature 0, with
`stream_options.include_usage` so token counts come from the server.

Per request: TTFT (request sent → first non-empty content), ITL (gaps between consecutive non-empty content
chunks), TPOT ((latency − TTFT) / (output tokens − 1)). A refused, dropped or non-200 request is a failed
result with its error, never an exception: one bad request does not end the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click

from maxjax.bench.workload import Prompt


@dataclass
class RequestResult:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def httpx_module() -> Any:
    """httpx, or its successor httpx2 (what recent `openai` clients install), whichever is there."""
    import importlib

    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise click.ClickException("max benchmark needs httpx: pip install httpx")


def client(api_key: str | None, timeout: float, max_connections: int) -> Any:
    httpx = httpx_module()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits)


async def first_model(http: Any, base_url: str) -> str:
    try:
        listing = await http.get(f"{base_url}/models")
        listing.raise_for_status()
        return str(listing.json()["data"][0]["id"])
    except Exception as exc:
        raise click.ClickException(f"cannot list models at {base_url}/models ({exc}); is the server up?") from exc


async def server_version(http: Any, base_url: str) -> dict[str, Any]:
    """GET /version beside the OpenAI routes (maxjax, vLLM and MAX answer it); what went wrong if it did not."""
    url = base_url.removesuffix("/v1") + "/version"
    try:
        response = await http.get(url)
        response.raise_for_status()
        body = response.json()
        return body if isinstance(body, dict) else {"version": body}
    except Exception as exc:
        return {"error": f"GET {url}: {type(exc).__name__}: {exc}"}


async def _one(http: Any, url: str, body: dict[str, Any]) -> RequestResult:
    sent = time.perf_counter()
    ttft, last, chunks = None, 0.0, 0
    itl: list[float] = []
    usage: dict[str, int] = {}
    try:
        async with http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestResult(False, error=f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data.strip() == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    return RequestResult(False, error=f"stream error: {event['error'].get('message')}")
                usage = event.get("usage") or usage
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - sent
                    else:
                        itl.append(now - last)
                    last = now
                    chunks += 1
    except Exception as exc:  # a refused or dropped connection counts as a failed request, not a crash
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - sent
    return RequestResult(
        True,
        latency=latency,
        ttft=ttft,
        itl=itl,
        output_tokens=usage.get("completion_tokens", chunks),
        prompt_tokens=usage.get("prompt_tokens", 0),
    )


async def run_level(
    http: Any, base_url: str, model: str, prompts: Iterator[Prompt], num_requests: int, concurrency: int,
    on_done: Callable[[RequestResult], None],
) -> tuple[list[RequestResult], float]:  # fmt: skip
    """Send `num_requests` prompts with `concurrency` in flight; the results and the wall time they took."""
    import asyncio

    batch = [next(prompts) for _ in range(num_requests)]  # drawn up front: the clock times the server, not us
    todo = iter(batch)
    results: list[RequestResult] = []

    async def worker() -> None:
        for prompt in todo:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt.text}],
                "max_tokens": prompt.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            result = await _one(http, f"{base_url}/chat/completions", body)
            results.append(result)
            on_done(result)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start
