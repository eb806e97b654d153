"""`max benchmark` against the real HTTP server over the fake engine, whose per-token delay makes the numbers
predictable enough to check; its workloads, errors and outputs (table, JSON, PNG) without one."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest
from click.testing import CliRunner

import maxjax
from maxjax.bench.command import benchmark
from maxjax.bench.report import percentile, stats_ms
from maxjax.bench.workload import Prompt, dataset_prompts, random_prompts
from maxjax.serve.app import ServingState
from maxjax.serve.fake_engine import FakeEngine
from tests.serve_helpers import WORDS, Server, load_tokenizer, running_server

DELAY_S = 0.005


@pytest.fixture
def fake_server(smollm2_gguf: Path) -> Iterator[tuple[Server, FakeEngine]]:
    tok = load_tokenizer(smollm2_gguf)
    # eos_after: the benchmark's ignore_eos must keep answers at full length anyway.
    engine = FakeEngine(tok.encode(WORDS), eos_token_id=2, model_name="bench-model", delay_s=DELAY_S, eos_after=3)
    state = ServingState(model_name="bench-model")
    state.set_ready(engine, tok)
    with running_server(state) as srv:
        yield srv, engine


def one_line_error(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


def test_percentile() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert stats_ms([0.001, 0.003]) == {"mean": 2.0, "median": 2.0, "p90": pytest.approx(2.8), "p99": pytest.approx(2.98)}
    assert stats_ms([])["mean"] is None


def test_benchmark_against_the_fake_server(fake_server: tuple[Server, FakeEngine], tmp_path: Path) -> None:
    srv, engine = fake_server
    out = tmp_path / "result.json"
    args = ["--base-url", srv.base_url, "--num-requests", "12", "--concurrency", "4", "--output-tokens", "16",
            "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(benchmark, args)
    assert result.exit_code == 0, result.output
    assert "TTFT p50" in result.output and "out tok/s" in result.output
    assert "concurrency 4: sending 12 requests" in result.output  # not a terminal: plain progress lines
    run = json.loads(out.read_text())
    assert run["model"] == "bench-model"  # found through /v1/models
    assert run["server_version"] == {"version": maxjax.__version__}
    flags = run["flags"]
    assert flags["concurrency"] == [4] and flags["num_requests"] == 12 and flags["output_len"] == 16
    assert flags["prompts"] == "fixed" and flags["json_path"] == str(out) and flags["api_key"] is None
    [summary] = run["levels"]
    assert summary["concurrency"] == 4
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


def test_sweep_table_json_and_plot(fake_server: tuple[Server, FakeEngine], tmp_path: Path) -> None:
    srv, engine = fake_server
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["--base-url", srv.base_url, "--concurrency", "1,2,4", "--num-requests", "4", "--input-len", "32",
            "--output-len", "6", "--seed", "7", "--json", str(out), "--plot", str(png)]  # fmt: skip
    result = CliRunner().invoke(benchmark, args)
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line[:11].strip() in ("1", "2", "4")]
    assert [row[0] for row in rows] == ["1", "2", "4"]
    assert all(row[1:4] == ["4", "/", "0"] and len(row) == 12 for row in rows)  # ok / failed, then 8 figures

    run = json.loads(out.read_text())
    assert [s["concurrency"] for s in run["levels"]] == [1, 2, 4]
    assert all(s["completed"] == 4 and s["total_output_tokens"] == 4 * 6 for s in run["levels"])
    assert run["flags"] | {"prompts": "random", "input_len": 32, "seed": 7} == run["flags"]
    # About --input-len tokens of words (one token each in SmolLM2), plus the chat template's own.
    assert 32 <= run["levels"][0]["total_prompt_tokens"] / 4 <= 32 + 40
    # Random prompts: no two requests of the whole sweep share one (nor its first words).
    prompts = [r.prompt_ids for r in engine.requests]
    assert len(prompts) == 12 and len(set(prompts)) == 12

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_random_prompts_differ_by_request_and_seed() -> None:
    first = [p.text for p in islice(random_prompts(50, 8, seed=1), 20)]
    again = [p.text for p in islice(random_prompts(50, 8, seed=1), 20)]
    other = [p.text for p in islice(random_prompts(50, 8, seed=2), 20)]
    assert first == again  # seeded: reproducible
    assert len({" ".join(t.split()[:3]) for t in first}) == 20  # each differs from the others in its first words
    assert not set(first) & set(other)
    assert all(len(t.split()) == 50 for t in first)


def test_dataset_prompts(tmp_path: Path) -> None:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "one two three"}]},
        {"conversations": [{"from": "gpt", "value": "no question"}]},  # skipped: no human turn
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Why?"},
                           {"from": "gpt", "value": "Because."}, {"from": "human", "value": "later turn"}]},
    ]))  # fmt: skip
    first_three = [Prompt("Hi there", 3), Prompt("Why?", 1), Prompt("Hi there", 3)]  # cycled
    assert list(islice(dataset_prompts(path, None), 3)) == first_three
    assert [p.max_tokens for p in islice(dataset_prompts(path, 9), 2)] == [9, 9]


@pytest.mark.parametrize(
    "content, says",
    [
        ("{not json", "not JSON"),
        ('{"conversations": []}', "not a list"),
        ('[{"conversation": []}]', "entry 0"),
        ('[{"conversations": [{"from": "human", "value": 3}]}]', "entry 0"),
        ('[{"conversations": [{"from": "gpt", "value": "x"}]}]', "no conversation has a human turn"),
    ],
)
def test_a_bad_dataset_is_one_line(tmp_path: Path, content: str, says: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = CliRunner().invoke(benchmark, ["--base-url", "http://127.0.0.1:9/v1", "--dataset", str(path)])
    assert result.exit_code != 0
    line = one_line_error(result.output)
    assert line.startswith(f"Error: --dataset {path}: ") and says in line


def test_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    args = ["--base-url", "http://127.0.0.1:9/v1", "--plot", str(tmp_path / "p.png")]
    result = CliRunner().invoke(benchmark, args)
    assert result.exit_code != 0
    assert "pip install 'maxjax[bench]'" in one_line_error(result.output)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--concurrency", "1,x"], "comma-separated"),
        (["--concurrency", "4,0"], "at least 1"),
        (["--input-len", "64", "--prompts", "fixed"], "--input-len is for --prompts random"),
    ],
)
def test_flag_errors(args: list[str], says: str) -> None:
    result = CliRunner().invoke(benchmark, ["--base-url", "http://127.0.0.1:9/v1", *args])
    assert result.exit_code == 2 and says in result.output


def test_benchmark_without_a_server() -> None:
    result = CliRunner().invoke(benchmark, ["--base-url", "http://127.0.0.1:9/v1", "--num-requests", "1"])
    assert result.exit_code != 0 and "cannot list models" in result.output
