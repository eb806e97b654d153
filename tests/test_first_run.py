"""Idle-time first runs: every executable of the grid runs once on padding, and that changes no answer."""

from __future__ import annotations

import jax

from maxjax.config import KVCacheConfig, SchedulerConfig
from maxjax.pipeline import LoadedModel
from maxjax.serve.engine_core import EngineCore
from maxjax.serve.protocol import GenerationRequest, SamplingParams


def _greedy(core: EngineCore, prompt: tuple[int, ...]) -> list[int]:
    core.add(GenerationRequest("r", prompt, SamplingParams(max_tokens=12, temperature=0.0)))
    ids: list[int] = []
    while core.has_work:
        for _, out in core.step():
            ids.extend(out.token_ids)
    return ids


def test_first_runs_cover_the_grid_and_leave_answers_unchanged(loaded: LoadedModel) -> None:
    core = EngineCore.create(loaded, jax.devices("cpu")[0],
                             SchedulerConfig(max_batch_size=2, max_length=64, prefill_chunk_size=32),
                             KVCacheConfig(num_pages=12))
    prompt = tuple(loaded.tokenizer.encode("The capital of France is"))
    want = _greedy(core, prompt)  # before any first run (the prompt fills no page: no prefix-cache hit after)
    shapes = core.grid.all_shapes()
    served = {s for s in shapes if core.runner.has_run(s)}
    assert served and len(served) < len(shapes)
    runs = 0
    while core.first_run_next():
        runs += 1
    assert runs == len(shapes) - len(served) and all(core.runner.has_run(s) for s in shapes)
    assert not core.first_run_next()
    assert core.scheduler.pages.in_use == 0
    assert _greedy(core, prompt) == want
