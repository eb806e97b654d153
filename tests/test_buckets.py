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


def test_context_length_adds_no_shapes_and_prefill_rows_share_one_token_budget() -> None:
    """Every page table is max_pages wide; a prefill step holds rows x chunk <= prefill_chunk tokens."""
    grid = BucketGrid(max_batch_size=32, prefill_chunk=512, max_pages=512)
    assert grid.decode_shapes() == [(b, 1, 512) for b in (1, 2, 4, 8, 16, 32)]
    prefill = grid.prefill_shapes()
    assert {(r, t) for r, t, _ in prefill if r == 1} == {(1, t) for t in (16, 32, 64, 128, 256, 512)}
    assert all(r * t <= 512 and w == 512 for r, t, w in prefill)
    assert (32, 16, 512) in prefill and (16, 32, 512) in prefill and (2, 512, 512) not in prefill
    assert len(set(grid.all_shapes())) == 27


def test_every_planned_prefill_step_has_a_bucket() -> None:
    grid = BucketGrid(max_batch_size=8, prefill_chunk=64, max_pages=40)
    shapes = {(r, t) for r, t, _ in grid.prefill_shapes()}
    for rows in range(1, 9):
        for tokens in range(1, 65):
            bucket = grid.prefill_bucket(rows, tokens)
            assert bucket is None or bucket in shapes
            assert bucket is not None or rows > 1  # one chunk always fits
    assert grid.prefill_bucket(1, 64) == (1, 64) and grid.prefill_bucket(3, 10) == (4, 16)
    assert grid.prefill_bucket(2, 32) == (2, 32)
    assert grid.prefill_bucket(3, 17) is None and grid.prefill_bucket(1, 65) is None


def test_prefill_width_is_the_widest_bucket_the_rows_leave_room_for() -> None:
    grid = BucketGrid(max_batch_size=32, prefill_chunk=512, max_pages=512)
    assert [grid.prefill_width(r) for r in (1, 2, 3, 16, 17, 32, 33)] == [512, 256, 128, 32, 16, 16, 0]
    for rows in range(1, 33):
        assert grid.prefill_bucket(rows, grid.prefill_width(rows)) is not None
