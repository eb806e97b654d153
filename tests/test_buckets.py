"""The bucket grid: every step shape the scheduler can produce is in it, and nothing more than needed."""

from __future__ import annotations

import pytest

from maxjax.graph.buckets import BucketGrid


def test_sizes_round_up_to_powers_of_two_and_the_maximum() -> None:
    grid = BucketGrid(max_batch_size=24, prefill_chunk=64, max_pages=40)
    assert grid.batch_sizes == [1, 2, 4, 8, 16, 24]
    assert grid.chunk_sizes == [16, 32, 64]
    assert grid.batch_bucket(5) == 8 and grid.batch_bucket(24) == 24
    assert grid.chunk_bucket(1) == 16 and grid.chunk_bucket(33) == 64
    with pytest.raises(ValueError):
        grid.batch_bucket(25)
    with pytest.raises(ValueError):
        grid.chunk_bucket(65)


def test_one_executable_per_batch_size_and_per_chunk_size() -> None:
    """Context length adds no shapes: every page table is max_pages wide."""
    grid = BucketGrid(max_batch_size=32, prefill_chunk=512, max_pages=512)
    assert grid.decode_shapes() == [(b, 1, 512) for b in (1, 2, 4, 8, 16, 32)]
    assert grid.prefill_shapes() == [(1, t, 512) for t in (16, 32, 64, 128, 256, 512)]
    assert len(set(grid.all_shapes())) == 12
