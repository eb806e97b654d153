"""The bucket grid: every step shape the scheduler can produce is in it, and nothing more than needed."""

from __future__ import annotations

import pytest

from maxjax.graph.buckets import BucketGrid


def test_sizes_round_up_to_powers_of_two_and_the_maximum() -> None:
    grid = BucketGrid(max_batch_size=24, prefill_chunk=64, max_pages=40)
    assert grid.batch_sizes == [1, 2, 4, 8, 16, 24]
    assert grid.chunk_sizes == [16, 32, 64]
    assert grid.page_counts == [0, 1, 2, 4, 8, 16, 32, 40]
    assert grid.batch_bucket(5) == 8 and grid.batch_bucket(24) == 24
    assert grid.chunk_bucket(1) == 16 and grid.pages_bucket(33) == 40
    with pytest.raises(ValueError):
        grid.batch_bucket(25)


@pytest.mark.parametrize("prompt_len", [1, 15, 16, 17, 63, 64, 65, 200, 640])
def test_every_prefill_chunk_of_a_prompt_has_a_bucket(prompt_len: int) -> None:
    grid = BucketGrid(max_batch_size=4, prefill_chunk=64, max_pages=40, page_size=16)
    shapes = set(grid.prefill_shapes())
    cached = 0
    while cached < prompt_len:
        n = min(grid.prefill_chunk, prompt_len - cached)
        past_pages = grid.pages_bucket(-(-cached // 16)) if cached else 0
        assert (1, grid.chunk_bucket(n), past_pages) in shapes
        cached += n


def test_prefill_past_buckets_skip_what_chunking_never_produces() -> None:
    grid = BucketGrid(max_batch_size=4, prefill_chunk=64, max_pages=40, page_size=16)
    assert {p for _, _, p in grid.prefill_shapes()} == {0, 4, 8, 16, 32, 40}
    assert all(p > 0 for _, _, p in grid.decode_shapes())
