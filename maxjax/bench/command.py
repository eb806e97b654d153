"""The `max benchmark` command: flags in, a workload and a sweep of concurrency levels out, then the table on
stdout and, if asked, JSON and a plot. Progress goes to stderr: a bar per level on a terminal, plain lines
otherwise (CI logs, pipes).

Only click is imported here at module level: `max --help` must not pay for an HTTP client or matplotlib.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from maxjax.bench.load import RequestResult
    from maxjax.bench.report import Sweep
    from maxjax.bench.workload import Prompt

DEFAULT_INPUT_LEN = 256
DEFAULT_OUTPUT_LEN = 64


class ConcurrencyLevels(click.ParamType):
    """`8` or `1,4,16,64`: the levels to run, in that order."""

    name = "N[,N...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            levels = tuple(int(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a number or a comma-separated list of them, e.g. 1,4,16,64", param, ctx)
        if min(levels) < 1:
            self.fail(f"{value!r}: every level must be at least 1", param, ctx)
        return levels


@contextmanager
def progress(concurrency: int, total: int) -> Iterator[Callable[[RequestResult], None]]:
    """A callback for each finished request: it moves a tqdm bar on a terminal, or logs each quarter done."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, desc=f"concurrency {concurrency}", unit="req", file=sys.stderr) as bar:
            failed = 0

            def on_bar(result: RequestResult) -> None:
                nonlocal failed
                failed += not result.ok
                if failed:
                    bar.set_postfix(failed=failed, refresh=False)
                bar.update(1)

            yield on_bar
        return
    click.echo(f"concurrency {concurrency}: sending {total} requests", err=True)
    done, failed = 0, 0

    def on_line(result: RequestResult) -> None:
        nonlocal done, failed
        done, failed = done + 1, failed + (not result.ok)
        if done * 4 // total > (done - 1) * 4 // total:
            click.echo(f"concurrency {concurrency}: {done}/{total} done, {failed} failed", err=True)

    yield on_line


def workload(
    prompts: str | None, input_len: int | None, output_len: int | None, dataset: Path | None, seed: int | None
) -> tuple[Iterator[Prompt], str, dict[str, Any]]:
    """The prompt stream, a phrase that describes it, and the flag values it settled (for --json)."""
    import random

    from maxjax.bench import workload as w

    if dataset is not None:
        if prompts is not None or input_len is not None:
            raise click.UsageError("--dataset gives the prompts: drop --prompts and --input-len")
        lengths = f"{output_len} tokens out" if output_len else "answer lengths from the dataset"
        return w.dataset_prompts(dataset, output_len), f"{dataset.name}, {lengths}", {}
    output_len = output_len or DEFAULT_OUTPUT_LEN
    if (prompts or ("random" if input_len else "fixed")) == "fixed":
        if input_len is not None:
            raise click.UsageError("--input-len is for --prompts random; the built-in prompts have their own")
        described = f"the {len(w.PROMPTS)} built-in prompts, {output_len} tokens out"
        return w.fixed_prompts(output_len), described, {"prompts": "fixed", "output_len": output_len}
    input_len = input_len or DEFAULT_INPUT_LEN
    seed = random.randrange(2**31) if seed is None else seed
    described = f"random prompts of about {input_len} tokens (seed {seed}), {output_len} tokens out"
    settled = {"prompts": "random", "input_len": input_len, "output_len": output_len, "seed": seed}
    return w.random_prompts(input_len, output_len, seed), described, settled


async def sweep(
    base_url: str, model: str | None, levels: tuple[int, ...], num_requests: int, prompts: Iterator[Prompt],
    described: str, flags: dict[str, Any], api_key: str | None, timeout: float,
) -> Sweep:  # fmt: skip
    from maxjax.bench import load
    from maxjax.bench.report import Sweep, summarize

    async with load.client(api_key, timeout, max_connections=max(levels)) as http:
        model = model or await load.first_model(http, base_url)
        version = await load.server_version(http, base_url)
        summaries = []
        for concurrency in levels:
            with progress(concurrency, num_requests) as on_done:
                results, duration = await load.run_level(
                    http, base_url, model, prompts, num_requests, concurrency, on_done
                )
            summaries.append(summarize(results, duration, concurrency))
    return Sweep(model, base_url, described, num_requests, version, flags, summaries)


@click.command("benchmark")
@click.option("--base-url", default="http://127.0.0.1:8000/v1", show_default=True, help="The server's OpenAI base URL.")
@click.option("--model", default=None, help="Model id to request. [default: the first one /v1/models lists]")
@click.option("--concurrency", default="8", show_default=True, type=ConcurrencyLevels(),
              help="Requests in flight; a comma list (1,4,16,64) runs each level in turn.")
@click.option("--num-requests", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests sent at each concurrency level.")
@click.option("--prompts", type=click.Choice(["random", "fixed"]), default=None,
              help="random: word prompts of --input-len tokens, each unlike any before; fixed: the built-in "
                   "questions. [default: random with --input-len, else fixed]")
@click.option("--input-len", type=click.IntRange(min=1), default=None,
              help=f"Prompt length in tokens, roughly (random prompts). [default: {DEFAULT_INPUT_LEN}]")
@click.option("--output-len", "--output-tokens", "output_len", type=click.IntRange(min=1), default=None,
              help="Tokens per answer (the EOS is ignored). "
                   f"[default: {DEFAULT_OUTPUT_LEN}, or each --dataset answer's length]")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A ShareGPT-style JSON file: each conversation's first human turn is a prompt.")
@click.option("--seed", type=int, default=None, help="Seed for random prompts. [default: a fresh one, shown]")
@click.option("--api-key", default=None, help="Sent as 'Authorization: Bearer <key>'.")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds before one request is given up.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results here, with the server's /version and these flags.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Draw throughput and latency against concurrency into this PNG (needs maxjax[bench]).")
@click.pass_context
def benchmark(
    ctx: click.Context, base_url: str, model: str | None, concurrency: tuple[int, ...], num_requests: int,
    prompts: str | None, input_len: int | None, output_len: int | None, dataset: Path | None, seed: int | None,
    api_key: str | None, timeout: float, json_path: Path | None, plot_path: Path | None,
) -> None:  # fmt: skip
    """Measure TTFT, ITL, TPOT and throughput of a running OpenAI-compatible server, at one or more
    concurrency levels (closed loop)."""
    import asyncio

    from maxjax.bench import report

    if plot_path is not None:
        report.check_matplotlib()
    stream, described, settled = workload(prompts, input_len, output_len, dataset, seed)
    levels = tuple(dict.fromkeys(min(c, num_requests) for c in concurrency))  # capped, repeats dropped
    if levels != concurrency:
        click.echo(f"note: no level can have more than --num-requests {num_requests} in flight: running "
                   f"concurrency {','.join(map(str, levels))}", err=True)  # fmt: skip
    flags = {name: str(v) if isinstance(v, Path) else v for name, v in ctx.params.items()}
    flags |= {"concurrency": list(levels), "api_key": "<set>" if api_key else None, **settled}

    result = asyncio.run(
        sweep(base_url.rstrip("/"), model, levels, num_requests, stream, described, flags, api_key, timeout)
    )
    click.echo(report.format_table(result))
    if json_path is not None:
        report.write_json(result, json_path)
    if plot_path is not None:
        report.write_plot(result, plot_path)
    if failed := [s["concurrency"] for s in result.levels if s["completed"] == 0]:
        raise click.ClickException(f"no request succeeded at concurrency {', '.join(map(str, failed))}")
