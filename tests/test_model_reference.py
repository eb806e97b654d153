"""SmolLM2-135M against the reference numbers (transformers, float32) in tests/fixtures/smollm2_reference.json.

The logits are checked straight through the model's prefill; the greedy continuations run through the real
engine step (paged KV cache, bucketed batches, in-graph sampling) with all five prompts in one batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maxjax.config import KVCacheConfig, SchedulerConfig
from maxjax.graph.runner import CacheSpec
from maxjax.pipeline import LoadedModel
from maxjax.serve.engine_core import EngineCore
from maxjax.serve.protocol import GenerationRequest, SamplingParams

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "smollm2_reference.json").read_text())
MARGIN_FLOOR = 0.01
"""A greedy token whose top-2 reference logits are closer than this may flip under other correct numerics."""


@pytest.fixture(scope="module")
def last_logits(loaded: LoadedModel) -> np.ndarray:
    """The logits [cases, V] at each reference prompt's last token: every prompt in one jitted prefill, padded
    on the right to the longest (causal attention keeps the padding out of the earlier positions)."""
    cases = REFERENCE["cases"]
    width = max(len(c["prompt_ids"]) for c in cases)
    tokens = np.zeros((len(cases), width), np.int32)
    for row, case in enumerate(cases):
        tokens[row, : len(case["prompt_ids"])] = case["prompt_ids"]
    last = np.array([[len(c["prompt_ids"]) - 1] for c in cases], np.int32)
    cfg = loaded.config
    cache = CacheSpec(cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim).allocate()
    no_past = jnp.zeros((len(cases), 0), jnp.int32), jnp.zeros((len(cases),), jnp.int32)
    logits, _, _ = nnx.jit(lambda model, *args: model(*args))(loaded.model, tokens, cache, *no_past, last)
    return np.asarray(logits[:, 0])


@pytest.mark.parametrize("row", range(len(REFERENCE["cases"])),
                         ids=[f"{c['kind']}-{c['prompt_ids'][:3]}" for c in REFERENCE["cases"]])
def test_prefill_logits_match_reference(last_logits: np.ndarray, row: int) -> None:
    logits = last_logits[row]
    want = REFERENCE["cases"][row]["last_logits_top5"]
    assert np.argsort(-logits)[:5].tolist() == want["ids"]
    np.testing.assert_allclose(logits[want["ids"]], want["values"], atol=1e-3)


def test_chat_prompts_render_to_reference_ids(loaded: LoadedModel) -> None:
    for case in REFERENCE["cases"]:
        if case["kind"] == "chat":
            text = loaded.tokenizer.apply_chat_template(case["input"], add_generation_prompt=True)
            assert loaded.tokenizer.encode(text) == case["prompt_ids"]


def test_greedy_continuations_match_reference_in_one_batch(loaded: LoadedModel) -> None:
    core = EngineCore.create(
        loaded, _cpu(), SchedulerConfig(max_batch_size=8, max_length=128, prefill_chunk_size=32),
        KVCacheConfig(num_pages=64),
    )
    cases = REFERENCE["cases"]
    seqs = []
    for i, case in enumerate(cases):
        params = SamplingParams(max_tokens=len(case["greedy_ids"]), temperature=0.0)
        seqs.append(core.add(GenerationRequest(f"r{i}", tuple(case["prompt_ids"]), params)))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(cases))}
    reasons = {}
    max_rows = 0
    plan = core.scheduler.plan
    prefill_rows = []
    core.scheduler.plan = lambda: (p := plan(), prefill_rows.append(len(p.prefill)))[0]  # type: ignore[method-assign]
    while core.has_work:
        max_rows = max(max_rows, sum(not s.in_prefill for s in core.scheduler.running))
        for seq, out in core.step():
            got[seq.request_id].extend(out.token_ids)
            if out.finish_reason:
                reasons[seq.request_id] = out.finish_reason
    assert max_rows >= 4, "the prompts should have decoded side by side"
    assert max(prefill_rows) >= 2, "prompts that arrive together should share a prefill step"
    assert core.scheduler.pages.in_use == 0
    for i, case in enumerate(cases):
        want = case["greedy_ids"]
        margins = case["greedy_top2_margins"]
        trusted = next((j for j, m in enumerate(margins) if m < MARGIN_FLOOR), len(want))
        assert got[f"r{i}"][:trusted] == want[:trusted], f"case {i}"
        assert reasons[f"r{i}"] == ("stop" if want[-1] in loaded.tokenizer.eos_token_ids else "length")
    assert loaded.tokenizer.decode(got["r0"], skip_special_tokens=True) == "The capital of France is Paris."


def _cpu():  # type: ignore[no-untyped-def]
    import jax

    return jax.devices("cpu")[0]


def test_prefix_cache_hit_gives_the_same_greedy_tokens(loaded: LoadedModel) -> None:
    core = EngineCore.create(loaded, _cpu(), SchedulerConfig(max_batch_size=2, max_length=96, prefill_chunk_size=16),
                             KVCacheConfig(num_pages=32))
    case = REFERENCE["cases"][0]
    runs = []
    prefill_steps = []
    run_prefill = core._run_prefill
    core._run_prefill = lambda chunks: (prefill_steps.append(len(chunks)), run_prefill(chunks))[1]  # type: ignore[method-assign]
    for i in range(2):
        seq = core.add(GenerationRequest(f"r{i}", tuple(case["prompt_ids"]), SamplingParams(max_tokens=8, temperature=0)))
        assert seq is not None
        tokens: list[int] = []
        while core.has_work:
            for _, out in core.step():
                tokens.extend(out.token_ids)
        runs.append((seq.prefix_hit, tokens, len(prefill_steps)))
    assert runs[0][0] == 0 and runs[1][0] == 36, "the second run reuses all but the last prompt token (a tail)"
    assert runs[0][1] == runs[1][1] == case["greedy_ids"][:8]
    assert runs[1][2] == runs[0][2] > 0, "its one prompt token ran in a decode step, not in a prefill step"


def test_the_next_turn_reuses_the_answer_it_repeats(loaded: LoadedModel) -> None:
    """A prompt that repeats an earlier prompt and its answer (a chat's next turn) reuses the keys and values the
    decode steps wrote, the answer's partly filled page too, and goes on as the model does: the reference's
    greedy continuation, teacher-forced."""
    core = EngineCore.create(loaded, _cpu(), SchedulerConfig(max_batch_size=2, max_length=96, prefill_chunk_size=16),
                             KVCacheConfig(num_pages=32))
    case = REFERENCE["cases"][3]
    prompt, greedy = case["prompt_ids"], case["greedy_ids"]
    runs = []
    for i, (ids, n) in enumerate([(prompt, 20), (prompt + greedy[:20], 6)]):
        seq = core.add(GenerationRequest(f"r{i}", tuple(ids), SamplingParams(max_tokens=n, temperature=0)))
        assert seq is not None
        tokens: list[int] = []
        while core.has_work:
            for _, out in core.step():
                tokens.extend(out.token_ids)
        runs.append((seq.prefix_hit, tokens))
    assert runs[0] == (0, greedy[:20])
    assert runs[1] == (len(prompt) + 19, greedy[20:26]), "all but the last prompt token reused; the same tokens"
