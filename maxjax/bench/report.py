"""What `max benchmark` makes of its timings: each level's figures (`summarize`), and the whole sweep as a table
(`format_table`), a PNG (`write_plot`, with matplotlib from the `bench` extra) or JSON (`write_json`).

Latencies are reported in milliseconds as mean / median / p90 / p99; throughputs are over the wall time of the
level, from its first request sent to its last answer read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from maxjax.bench.load import RequestResult


@dataclass
class Sweep:
    """One `max benchmark` run: what was asked of which server, and a summary per concurrency level."""

    model: str
    base_url: str
    workload: str
    num_requests: int
    server_version: dict[str, Any]
    flags: dict[str, Any]
    levels: list[dict[str, Any]]


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


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "concurrency": concurrency,
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


# (header, width, the level's figure)
COLUMNS: tuple[tuple[str, int, Any], ...] = (
    ("concurrency", 11, lambda s: str(s["concurrency"])),
    ("ok / failed", 13, lambda s: f"{s['completed']} / {s['failed']}"),
    ("out tok/s", 11, lambda s: _num(s["output_throughput"])),
    ("req/s", 9, lambda s: _num(s["request_throughput"])),
    ("TTFT p50", 10, lambda s: _num(s["ttft_ms"]["median"])),
    ("TTFT p90", 10, lambda s: _num(s["ttft_ms"]["p90"])),
    ("TTFT p99", 10, lambda s: _num(s["ttft_ms"]["p99"])),
    ("ITL p50", 9, lambda s: _num(s["itl_ms"]["median"])),
    ("ITL p90", 9, lambda s: _num(s["itl_ms"]["p90"])),
    ("TPOT mean", 11, lambda s: _num(s["tpot_ms"]["mean"])),
)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(sweep: Sweep) -> str:
    """A header naming the run, then one row per concurrency level (latencies in ms), then any errors."""
    version = sweep.server_version.get("version", "unknown")
    lines = [
        f"{'model':<12}{sweep.model} (server version {version})",
        f"{'base url':<12}{sweep.base_url}",
        f"{'workload':<12}{sweep.workload}, {sweep.num_requests} requests per level",
        "",
        "".join(f"{name:>{width}}" for name, width, _ in COLUMNS) + "   (ms)",
    ]
    lines += ["".join(f"{cell(s):>{width}}" for _, width, cell in COLUMNS) for s in sweep.levels]
    lines += [f"error at concurrency {s['concurrency']}: {e}" for s in sweep.levels for e in s["errors"]]
    return "\n".join(lines)


def write_json(sweep: Sweep, path: Path) -> None:
    path.write_text(json.dumps(asdict(sweep), indent=2) + "\n")


def check_matplotlib() -> None:
    """Fail before the run, not after it, when --plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install 'maxjax[bench]'") from None


def write_plot(sweep: Sweep, path: Path) -> None:
    """Two panels against concurrency: output tokens/s, and TTFT p50/p90/p99 with ITL p50/p90 (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

    def series(metric: str, key: str) -> list[float]:
        return [math.nan if (v := s[metric][key]) is None else v for s in sweep.levels]

    levels = [s["concurrency"] for s in sweep.levels]
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{sweep.model}: {sweep.workload}, {sweep.num_requests} requests per level")
    throughput, latency = fig.subplots(1, 2)

    tok_s = [s["output_throughput"] for s in sweep.levels]
    throughput.plot(levels, tok_s, marker="o", color="tab:blue")
    for x, y in zip(levels, tok_s, strict=True):
        throughput.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center")
    throughput.set(title="Throughput", ylabel="output tokens/s", ylim=(0, max(tok_s, default=0) * 1.15 or 1))

    ttft, itl = ("ttft", "o", "tab:red", ("p50", "p90", "p99")), ("itl", "s", "tab:green", ("p50", "p90"))
    for metric, marker, color, keys in (ttft, itl):
        for key, style in zip(keys, ("-", "--", ":"), strict=False):
            ys = series(f"{metric}_ms", "median" if key == "p50" else key)
            latency.plot(levels, ys, style, marker=marker, color=color, label=f"{metric.upper()} {key}")
    latency.set(title="Latency", ylabel="ms (log scale)", yscale="log")
    latency.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    latency.yaxis.set_major_formatter(ScalarFormatter())
    latency.legend(fontsize="small")

    for ax in (throughput, latency):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("concurrency (requests in flight)")
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120)
