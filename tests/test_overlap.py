"""The overlapped engine step (`EngineCore.step`): a step is dispatched before the one before it is fetched, and
that changes no answer. The same requests (some ending on a stop token, one cancelled mid-way, one with a
penalty, which makes the step wait for its tokens) run with the overlap and without it, in one engine."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from maxjax.config import KVCacheConfig, SchedulerConfig
from maxjax.pipeline import LoadedModel
from maxjax.serve.engine_core import EngineCore
from maxjax.serve.protocol import GenerationRequest, SamplingParams

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "smollm2_reference.json").read_text())


@pytest.fixture(scope="module")
def core(loaded: LoadedModel) -> EngineCore:
    return EngineCore.create(loaded, jax.devices("cpu")[0],
                             SchedulerConfig(max_batch_size=4, max_length=128, prefill_chunk_size=32),
                             KVCacheConfig(num_pages=64))


def _run(core: EngineCore, *, overlap: bool) -> tuple[dict[str, tuple[list[int], str | None]], int]:
    """Every reference prompt greedily (more requests than batch rows), a sampled one with a seed and a
    presence penalty, and one cancelled after its third token. Returns each request's tokens and finish
    reason, and how many steps returned with another step still running."""
    core.overlap = overlap
    requests = [GenerationRequest(f"r{i}", tuple(c["prompt_ids"]), SamplingParams(max_tokens=len(c["greedy_ids"]) + 4,
                                                                                   temperature=0.0))
                for i, c in enumerate(REFERENCE["cases"])]
    prompt = tuple(REFERENCE["cases"][0]["prompt_ids"])
    requests.append(GenerationRequest("penalty", prompt, SamplingParams(max_tokens=12, temperature=0.8, seed=7,
                                                                        presence_penalty=1.5)))
    requests.append(GenerationRequest("cancelled", prompt, SamplingParams(max_tokens=40, ignore_eos=True,
                                                                          temperature=0.0)))
    seqs = {r.request_id: core.add(r) for r in requests}
    got: dict[str, tuple[list[int], str | None]] = {r.request_id: ([], None) for r in requests}
    overlapped = 0
    while core.has_work:
        for seq, out in core.step():
            tokens, reason = got[seq.request_id]
            assert reason is None, f"{seq.request_id} got a token after it finished"
            tokens.extend(out.token_ids)
            got[seq.request_id] = (tokens, out.finish_reason)
            if seq.request_id == "cancelled" and len(tokens) == 3:
                core.cancel(seqs["cancelled"])  # type: ignore[arg-type]
        overlapped += core.has_work and core._in_flight is not None
    assert core.scheduler.pages.in_use == 0 and not core.scheduler.running
    assert sorted(core.scheduler._free_rows) == list(range(1, 5)), "every batch row is free again"
    return got, overlapped


def test_overlapped_steps_give_the_same_answers(core: EngineCore) -> None:
    plain, never = _run(core, overlap=False)
    overlapped, steps = _run(core, overlap=True)
    assert never == 0 and steps > 10
    assert overlapped == plain
    assert plain["cancelled"] == (plain["cancelled"][0][:3], None) and len(plain["cancelled"][0]) == 3
    stopped = [rid for rid, (_, reason) in plain.items() if reason == "stop"]
    assert stopped, "some reference prompt ends on a stop token: the overlap runs one step past it"
    for i, case in enumerate(REFERENCE["cases"]):
        assert plain[f"r{i}"][0][:3] == case["greedy_ids"][:3]
