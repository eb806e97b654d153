"""Images through the engine: the tiny Gemma 3 with its vision tower (tests/fixtures/arch/gemma3_multimodal/), its
images encoded into the device's image table and read by prefill steps as soft tokens (`ModelRunner.encode_images`,
`EngineCore._place_images`), against the logits transformers recorded (scripts/make_vision_fixtures.py).

The prompts' logprobs come back through the engine's own paths: `prompt_logprobs` for every prompt position and
`logprobs` for the first answer token, each checked against transformers' log-softmax within 1e-4. Then: an image
request beside plain ones in one batch leaves their greedy tokens as they were alone; a picture sent again is
encoded once; the prefix cache shares an image's pages only with the same picture; and once warmed up, nothing
compiles with images in the mix.
"""

from __future__ import annotations

import hashlib
import logging
from functools import cache

import jax
import numpy as np
import pytest

from maxjax.config import KVCacheConfig, SchedulerConfig
from maxjax.hub import resolve_model
from maxjax.pipeline import LoadedModel, load_model
from maxjax.serve.engine_core import EngineCore
from maxjax.serve.protocol import (
    GenerationOutput,
    GenerationRequest,
    ImageInput,
    RequestRejected,
    SamplingParams,
)
from tests.test_vision import FOLDER, TOLERANCE, reference


@cache
def loaded() -> LoadedModel:
    return load_model(resolve_model(str(FOLDER)), platform="cpu")


def engine(chunk: int = 16, batch: int = 4) -> EngineCore:
    return EngineCore.create(loaded(), jax.devices("cpu")[0],
                             SchedulerConfig(max_batch_size=batch, max_length=64, prefill_chunk_size=chunk),
                             KVCacheConfig(num_pages=32))  # fmt: skip


@cache
def shared() -> EngineCore:
    """One engine for the tests that only read what it answers (fewer compiles); the others make their own."""
    return engine()


def image(i: int) -> ImageInput:
    pixels = reference()[1]["pixel_values"][i]
    return ImageInput(pixels, hashlib.blake2b(pixels.tobytes(), digest_size=16).digest())


def prompt(name: str) -> tuple[int, ...]:
    return tuple(int(t) for t in reference()[1][f"tokens_{name}"])


def run(core: EngineCore, *requests: GenerationRequest) -> dict[str, list[GenerationOutput]]:
    for request in requests:
        assert core.add(request) is not None
    outs: dict[str, list[GenerationOutput]] = {}
    while core.has_work:
        for seq, out in core.step():
            outs.setdefault(seq.request_id, []).append(out)
    return outs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_logprobs_with_images_match_transformers() -> None:
    core = shared()
    for name, n in (("one", 1), ("two", 2)):
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=5, logprobs=5)
        out = run(core, GenerationRequest(name, prompt(name), params, images=tuple(image(i) for i in range(n))))[name]
        want = log_softmax(reference()[1][f"logits_{name}"])
        assert out[0].prompt_logprobs is not None and out[0].logprobs is not None
        got = [*out[0].prompt_logprobs[1:], out[0].logprobs[0]]  # position p's logprobs score token p + 1
        assert len(got) == len(want)
        err = max(abs(lp - want[p, t]) for p, entry in enumerate(got) for t, lp in entry.top)  # type: ignore[union-attr]
        assert err <= TOLERANCE, f"{name}: max |logprob error| {err:.2e}"
        assert [e.top[0][0] for e in got] == want.argmax(-1).tolist()  # type: ignore[union-attr]


def test_a_chunk_never_ends_inside_an_image() -> None:
    """With 6 more tokens, the image's soft tokens are at 13..16: a chunk of 16 would end inside it, so the first
    chunk ends before it; the logprobs equal those of one chunk of 32 (a split image would see only part of itself)."""
    tokens = (1, 5, 6, 7, 8, 9, 10, *prompt("one")[1:])
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=5)
    got = {}
    for chunk in (16, 32):
        core = shared() if chunk == 16 else engine(chunk)
        seq = core.add(GenerationRequest("a", tokens, params, images=(image(0),)))
        assert seq is not None
        chunks = []
        while core.has_work:
            plan_chunks = [n for s, n in core.scheduler._plan_prefill([seq])] if seq.in_prefill else []
            chunks += plan_chunks
            out = core.step()
            if out:
                got[chunk] = out[0][1].prompt_logprobs
        assert chunks == ([13, 11] if chunk == 16 else [24])
    for a, b in zip(got[16][1:], got[32][1:], strict=True):  # type: ignore[index]
        np.testing.assert_allclose([lp for _, lp in a.top], [lp for _, lp in b.top], rtol=1e-6, atol=1e-5)


def test_plain_rows_beside_an_image_keep_their_greedy_tokens() -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    plain = [GenerationRequest(f"plain{i}", p, greedy) for i, p in enumerate([(1, 73, 123, 128, 10), (1, 92, 82, 10)])]
    alone = {k: [t for o in v for t in o.token_ids] for k, v in run(shared(), *plain).items()}
    core = engine(chunk=32)  # prefill steps of up to 2 rows of 16
    with_image = GenerationRequest("image", prompt("two"), greedy, images=(image(0), image(1)))
    for request in (plain[0], with_image, plain[1]):
        core.add(request)
    core.step()
    assert core._in_flight is not None
    assert [s.request_id for s, _ in core._in_flight.chunks] == ["plain0", "image"]  # one prefill step (2 x 16)
    outs: dict[str, list[int]] = {}
    while core.has_work:
        for seq, out in core.step():
            outs.setdefault(seq.request_id, []).extend(out.token_ids)
    assert {k: outs[k] for k in alone} == alone
    assert len(outs["image"]) == 8


def test_a_picture_sent_again_is_encoded_once() -> None:
    core = engine()
    params = SamplingParams(max_tokens=2, temperature=0.0)
    first = run(core, GenerationRequest("a", prompt("one"), params, images=(image(0),)))["a"]
    assert (core.images.encoded, core.images.reused) == (1, 0)
    # The same picture in another prompt: its soft tokens are still in the table.
    run(core, GenerationRequest("b", (1, 5, 6, *prompt("one")[1:]), params, images=(image(0),)))
    assert (core.images.encoded, core.images.reused) == (1, 1)
    # The next turn of the first conversation: its pages hold the image already, which is neither encoded nor read.
    answer = [t for o in first for t in o.token_ids]
    turn = GenerationRequest("c", (*prompt("one"), *answer, 10, 44, 45), params, images=(image(0),))
    seq = core.add(turn)
    assert seq is not None
    while core.has_work:
        core.step()
    assert seq.prefix_hit >= 11  # past the image's soft tokens (7..10)
    assert (core.images.encoded, core.images.reused) == (1, 1)


def test_the_prefix_cache_tells_pictures_apart() -> None:
    core = engine()
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=3)
    tokens = (*prompt("one"), 20, 21, 22)  # long enough for a full shared page past the image
    first = run(core, GenerationRequest("a", tokens, params, images=(image(0),)))["a"]
    same = core.add(GenerationRequest("b", tokens, params, images=(image(0),)))
    other = core.add(GenerationRequest("c", tokens, params, images=(image(1),)))
    assert same is not None and other is not None
    outs: dict[str, list[GenerationOutput]] = {}
    while core.has_work:
        for seq, out in core.step():
            outs.setdefault(seq.request_id, []).append(out)
    assert same.prefix_hit > 10 and other.prefix_hit <= 7  # the image's soft tokens start at 7

    def top(out: GenerationOutput) -> np.ndarray:
        assert out.logprobs is not None
        return np.array([[t, lp] for t, lp in out.logprobs[0].top])

    np.testing.assert_allclose(top(outs["b"][0]), top(first[0]), atol=1e-4)
    assert np.abs(top(outs["c"][0]) - top(first[0])).max() > 0.1


def test_the_engine_refuses_images_it_cannot_take() -> None:
    core = shared()
    params = SamplingParams(max_tokens=1)
    with pytest.raises(RequestRejected, match="1 runs for 2 images"):
        core.admit(GenerationRequest("a", prompt("one"), params, images=(image(0), image(1))))
    with pytest.raises(RequestRejected, match="0 runs for 1 images"):
        core.admit(GenerationRequest("a", (1, 2, 3), params, images=(image(0),)))
    small = ImageInput(np.zeros((3, 16, 16), np.float32), b"x" * 16)
    with pytest.raises(RequestRejected, match=r"not the \(3, 32, 32\)"):
        core.admit(GenerationRequest("a", prompt("one"), params, images=(small,)))


def test_nothing_compiles_after_warm_up_with_images_in_the_mix(caplog: pytest.LogCaptureFixture) -> None:
    core = engine()
    warm = core.runner.warm_up()
    assert warm.compiled == len(core.grid.all_shapes()) + len(core.runner.image_buckets) + len(
        {s[1] for s in core.grid.all_shapes() if s[1] > 1})
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True):
        greedy = SamplingParams(max_tokens=4, temperature=0.0)
        run(core, GenerationRequest("two", prompt("two"), greedy, images=(image(0), image(1))),
            GenerationRequest("one", prompt("one"), greedy, images=(image(1),)),
            GenerationRequest("plain", (1, 73, 123), greedy))
    compiles = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
    assert compiles == []
