"""`admission.admit`: the one place a request's values become step inputs. Every value is checked against the
range of the array it goes into, so nothing a request carries can fail a step (and with it the engine)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from maxjax.graph.memory import CPU_SHARE, plan_kv_pages, plan_pool
from maxjax.serve.admission import admit
from maxjax.serve.protocol import GenerationRequest, RequestRejected, SamplingParams

VOCAB = 1000


def _admit(prompt: tuple[int, ...] = (1, 2, 3), **params: object) -> object:
    return admit(GenerationRequest("r", prompt, SamplingParams(**params)), VOCAB)  # type: ignore[arg-type]


@pytest.mark.parametrize(("params", "param"), [
    ({"top_k": 2**31}, "top_k"), ({"top_k": -1}, "top_k"), ({"max_tokens": 2**31}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": 2**40}, "min_tokens"),
    ({"temperature": math.nan}, "temperature"), ({"temperature": 1e308}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"min_p": math.inf}, "min_p"), ({"presence_penalty": -3.0}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logit_bias": {VOCAB: 1.0}}, "logit_bias"), ({"logit_bias": {5: math.nan}}, "logit_bias"),
    ({"stop_token_ids": (2**31,)}, "stop_token_ids"), ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
])
def test_out_of_range_values_are_this_requests_rejection(params: dict[str, object], param: str) -> None:
    with pytest.raises(RequestRejected) as info:
        _admit(**params)
    assert info.value.param == param and param.split("_")[0] in str(info.value)


@pytest.mark.parametrize("prompt", [(VOCAB,), (-1,), (2**31,), ()])
def test_prompt_ids_outside_the_vocabulary_are_rejected(prompt: tuple[int, ...]) -> None:
    with pytest.raises(RequestRejected) as info:
        _admit(prompt)
    assert info.value.param == "prompt"


def test_values_are_converted_into_the_step_arrays_types() -> None:
    row = _admit(top_k=2**31 - 1, seed=2**63 - 1, temperature=0.7, logit_bias={3: -100.0}).row  # type: ignore[attr-defined]
    assert row.top_k == VOCAB and row.top_k.dtype == np.int32  # past the vocabulary: the whole vocabulary
    assert row.seed == (2**63 - 1) % 2**32 and row.seed.dtype == np.uint32
    assert row.temperature == np.float32(0.7) and row.logit_bias == {3: -100.0}
    assert _admit(seed=-5).row.seed == (-5) % 2**32  # type: ignore[attr-defined]


def test_the_cpu_default_pool_takes_a_quarter_of_the_machine_in_whole_sequences() -> None:
    import jax

    cpu = jax.devices("cpu")[0]
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    page = 1 << 20  # 1 MiB pages, 512 pages a full-length sequence
    plan = plan_pool(device=cpu, bytes_per_page=page, page_size=16, max_batch_size=1024, max_length=8192,
                     weight_bytes=0)
    assert (plan.num_pages - 1) % 512 == 0 and plan.num_pages * page <= total * CPU_SHARE + page
    assert "--device-memory-utilization" in plan.why and "--kv-cache-pages" in plan.why
    small = plan_pool(device=cpu, bytes_per_page=page, page_size=16, max_batch_size=2, max_length=64,
                      weight_bytes=0)
    assert small.num_pages == 2 * 4 + 1  # what the batch and length can use, when that is less
    assert plan_pool(device=cpu, bytes_per_page=page, page_size=16, max_batch_size=2, max_length=64,
                     weight_bytes=0, num_pages=7).num_pages == 7


def test_a_budget_below_one_sequence_names_the_fix() -> None:
    with pytest.raises(ValueError, match="--device-memory-utilization"):
        plan_kv_pages(bytes_per_page=1 << 20, page_size=16, max_batch_size=4, max_length=8192, budget_bytes=-5)
