"""Decode speed with every row constrained by a JSON schema against the same requests unconstrained.

Runs the real engine in-process (`EngineCore.step`, no HTTP) on the default model: `--batch` requests with the
same prompts, each generating exactly `--tokens` tokens (greedy; unconstrained rows ignore EOS, constrained rows
follow a schema whose shortest answer is longer than that, so both stop by length). Reports tokens per second
over the whole run, median of `--runs`, the two cases interleaved. A constrained step waits for the step before
it (its mask needs the last token), so the overlap is off for it; the unconstrained case is measured both ways.

    .venv/bin/python scripts/bench_constrained.py --batch 1 16
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from maxjax.config import PipelineConfig
from maxjax.custom import registry_with
from maxjax.devices import DeviceSpec
from maxjax.hub import resolve_model
from maxjax.pipeline import open_checkpoint
from maxjax.serve.engine_core import EngineCore
from maxjax.serve.grammar import GrammarSpec
from maxjax.serve.launch import build_engine
from maxjax.serve.protocol import GenerationRequest, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"words": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 6},
                             "minItems": 60, "maxItems": 60}},
    "required": ["words"],
    "additionalProperties": False,
}
"""At least 60 strings: longer than any `--tokens` this script is run with, so every row stops by length."""


def run(core: EngineCore, prompt: list[int], rows: int, tokens: int, grammar: GrammarSpec | None) -> float:
    for i in range(rows):
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=grammar is None, grammar=grammar)
        core.add(GenerationRequest(f"r{i}", tuple(prompt), params))
    start, generated = time.perf_counter(), 0
    while core.has_work:
        generated += sum(len(out.token_ids) for _, out in core.step())
    assert generated == rows * tokens, (generated, rows * tokens)
    return generated / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    config = PipelineConfig()
    config = dataclasses.replace(config, kv_cache=dataclasses.replace(config.kv_cache, num_pages=2048))
    checkpoint = open_checkpoint(resolve_model(None), registry_with(()))
    core, _ = build_engine(checkpoint, DeviceSpec.parse(None).select()[0], config)
    core.runner.load_cached(wait=True)
    core.first_runs()
    prompt = checkpoint.tokenizer.apply_chat_template(
        [{"role": "user", "content": "List some short words as JSON."}], add_generation_prompt=True)
    ids = checkpoint.tokenizer.encode(prompt)
    spec = GrammarSpec.json_schema(SCHEMA, strict=True)
    cases = {"free, overlapped": (None, True), "free, one step at a time": (None, False),
             "every row constrained": (spec, True)}
    for rows in args.batch:
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, (grammar, overlap) in cases.items():
                core.overlap = overlap
                rates[name].append(run(core, ids, rows, args.tokens, grammar))
        free = statistics.median(rates["free, overlapped"])
        for name, got in rates.items():
            rate = statistics.median(got)
            print(f"batch {rows:3d}  {name:26s} {rate:7.1f} tok/s  ({rate / free:.2f}x)  runs {[round(r, 1) for r in got]}")


if __name__ == "__main__":
    main()
