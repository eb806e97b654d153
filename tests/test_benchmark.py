"""`max benchmark` against the real HTTP server over the fake engine, whose per-token delay makes the numbers
predictable enough to check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from maxjax.benchmark import benchmark, percentile, stats_ms
from maxjax.serve.app import ServingState
from maxjax.serve.fake_engine import FakeEngine
from tests.serve_helpers import WORDS, load_tokenizer, running_server

DELAY_S = 0.005


def test_percentile() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert stats_ms([0.001, 0.003]) == {"mean": 2.0, "median": 2.0, "p90": pytest.approx(2.8), "p99": pytest.approx(2.98)}
    assert stats_ms([])["mean"] is None


def test_benchmark_against_the_fake_server(smollm2_gguf: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(smollm2_gguf)
    # eos_after: the benchmark's ignore_eos must keep answers at full length anyway.
    engine = FakeEngine(tok.encode(WORDS), eos_token_id=2, model_name="bench-model", delay_s=DELAY_S, eos_after=3)
    state = ServingState(model_name="bench-model")
    state.set_ready(engine, tok)
    out = tmp_path / "result.json"
    with running_server(state) as srv:
        args = ["--base-url", srv.base_url, "--num-requests", "12", "--concurrency", "4", "--output-tokens", "16",
                "--json", str(out)]  # fmt: skip
        result = CliRunner().invoke(benchmark, args)
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.output and "output tokens/s" in result.output
    summary = json.loads(out.read_text())
    assert summary["model"] == "bench-model"  # found through /v1/models
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 12 * 16
    assert all(r.params.ignore_eos and r.params.max_tokens == 16 and r.params.temperature == 0 for r in engine.requests)
    # Each output is one engine step of DELAY_S: ITL and TPOT sit near it, TTFT is at least one step.
    assert DELAY_S * 0.8 < summary["itl_ms"]["median"] / 1000 < DELAY_S * 10
    assert DELAY_S * 0.8 < summary["tpot_ms"]["mean"] / 1000 < DELAY_S * 10
    assert summary["ttft_ms"]["p99"] >= summary["ttft_ms"]["median"] >= DELAY_S * 1000 * 0.8
    assert summary["request_throughput"] > 0 and summary["output_throughput"] == pytest.approx(
        summary["total_output_tokens"] / summary["duration_s"]
    )


def test_benchmark_without_a_server() -> None:
    result = CliRunner().invoke(benchmark, ["--base-url", "http://127.0.0.1:9/v1", "--num-requests", "1"])
    assert result.exit_code != 0 and "cannot list models" in result.output
