"""`max benchmark`: serving latency and throughput of any OpenAI-compatible server, measured as a client sees it.

Closed loop: `--concurrency` workers each send one streaming chat request, wait for it to finish, and send the
next, until `--num-requests` have been sent. Prompts come from a fixed built-in set (so runs compare), each
request asks for exactly `--output-tokens` tokens (`max_tokens` with `ignore_eos: true`, an extension vLLM, MAX
and maxjax honour) at temperature 0, with `stream_options.include_usage` so token counts come from the server.

Per request: TTFT (request sent → first non-empty content), ITL (gaps between consecutive non-empty content
chunks), TPOT ((latency − TTFT) / (output tokens − 1)). Over the run: each of those as mean / median / p90 / p99
in milliseconds, output tokens/s and requests/s over the wall time of the whole run.

Only click is imported at module level: `max --help` must not pay for an HTTP client.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

PROMPTS = (
    "Explain how a hash table works, with an example.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between TCP and UDP?",
    "Summarize the causes of the French Revolution in a few paragraphs.",
    "Give me a recipe for a simple vegetable soup.",
    "Describe the water cycle to a ten-year-old.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "What should I consider when choosing a laptop for programming?",
    "Explain the difference between weather and climate.",
    "Write a polite email declining a meeting invitation.",
    "How do vaccines train the immune system?",
    "List some tips for learning a new language as an adult.",
    "Explain what a large language model is and how it generates text.",
    "Describe a walk through a busy market in the early morning.",
    "What are the pros and cons of working from home?",
    "Explain recursion, and give an example in any programming language.",
)


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


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); `values` must be sorted and non-empty."""
    k = (len(values) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ms = sorted(v * 1000 for v in values)
    return {
        "mean": sum(ms) / len(ms),
        "median": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
    }


def summarize(results: list[RequestResult], duration: float, settings: dict[str, Any]) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        **settings,
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "total_prompt_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "ttft_ms": stats_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": stats_ms([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": stats_ms([gap for r in done for gap in r.itl]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def format_table(summary: dict[str, Any]) -> str:
    def num(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"{'model':<28}{summary['model']}",
        f"{'base url':<28}{summary['base_url']}",
        f"{'requests (ok / failed)':<28}{summary['completed']} / {summary['failed']}",
        f"{'concurrency':<28}{summary['concurrency']}",
        f"{'duration (s)':<28}{num(summary['duration_s'])}",
        f"{'output tokens':<28}{summary['total_output_tokens']}",
        f"{'requests/s':<28}{num(summary['request_throughput'])}",
        f"{'output tokens/s':<28}{num(summary['output_throughput'])}",
        "",
        f"{'(ms)':<12}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}",
    ]
    for name in ("ttft", "tpot", "itl"):
        s = summary[f"{name}_ms"]
        lines.append(f"{name.upper():<12}" + "".join(f"{num(s[k]):>10}" for k in ("mean", "median", "p90", "p99")))
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def _httpx() -> Any:
    """httpx, or its successor httpx2 (what recent `openai` clients install), whichever is there."""
    import importlib

    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise click.ClickException("max benchmark needs httpx: pip install httpx")


async def _one(client: Any, url: str, body: dict[str, Any]) -> RequestResult:
    sent = time.perf_counter()
    ttft, last, chunks = None, 0.0, 0
    itl: list[float] = []
    usage: dict[str, int] = {}
    try:
        async with client.stream("POST", url, json=body) as response:
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


async def run_benchmark(
    base_url: str, model: str | None, num_requests: int, concurrency: int, output_tokens: int, api_key: str | None,
    timeout: float,
) -> dict[str, Any]:  # fmt: skip
    import asyncio

    httpx = _httpx()
    base_url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        if model is None:
            try:
                listing = await client.get(f"{base_url}/models")
                listing.raise_for_status()
                model = listing.json()["data"][0]["id"]
            except Exception as exc:
                raise click.ClickException(
                    f"cannot list models at {base_url}/models ({exc}); is the server up?"
                ) from exc
        sent = iter(range(num_requests))
        results: list[RequestResult] = []

        async def worker() -> None:
            for i in sent:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": output_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                results.append(await _one(client, f"{base_url}/chat/completions", body))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    settings = {"base_url": base_url, "model": model, "num_requests": num_requests, "concurrency": concurrency,
                "output_tokens": output_tokens}  # fmt: skip
    return summarize(results, duration, settings)


@click.command("benchmark")
@click.option("--base-url", default="http://127.0.0.1:8000/v1", show_default=True, help="The server's OpenAI base URL.")
@click.option("--model", default=None, help="Model id to request. [default: the first one /v1/models lists]")
@click.option("--num-requests", default=64, show_default=True, type=click.IntRange(min=1), help="Requests to send.")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(min=1), help="Requests in flight.")
@click.option("--output-tokens", default=64, show_default=True, type=click.IntRange(min=1), help="Tokens per answer.")
@click.option("--api-key", default=None, help="Sent as 'Authorization: Bearer <key>'.")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds before one request is given up.")  # fmt: skip
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write results here.")
def benchmark(
    base_url: str, model: str | None, num_requests: int, concurrency: int, output_tokens: int, api_key: str | None,
    timeout: float, json_path: Path | None,
) -> None:  # fmt: skip
    """Measure TTFT, TPOT, ITL and throughput of a running OpenAI-compatible server (closed loop)."""
    import asyncio

    summary = asyncio.run(
        run_benchmark(base_url, model, num_requests, min(concurrency, num_requests), output_tokens, api_key, timeout)
    )
    click.echo(format_table(summary))
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    if summary["completed"] == 0:
        raise click.ClickException("no request succeeded")
