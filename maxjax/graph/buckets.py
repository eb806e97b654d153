"""The bucket grid: the one place that decides which static shapes exist, so warm-up can compile all of them.

A step's shape is (rows, new tokens per row, page-table width). Decode steps have one new token per row and
round the batch up to a power of two. Prefill steps hold one prompt chunk per row, the chunk rounded up to a
power of two from 16, and as many rows as fit in `prefill_chunk` tokens (rows x chunk): requests that arrive
together are prefilled together, reading the weights once instead of once per prompt. The page table is
always `max_pages` wide: attention reads only as many blocks of it as the longest past in the batch needs (a
run-time trip count), so context length adds no shapes and a step still costs what its live context costs. That keeps the grid to one executable per batch size and per (rows, chunk) pair of prefill.
"""

from __future__ import annotations

from dataclasses import dataclass


def _powers_of_two(lo: int, hi: int) -> list[int]:
    """lo, 2lo, 4lo, ... up to and including hi (hi itself is added when it is not a power of two)."""
    out = []
    n = lo
    while n < hi:
        out.append(n)
        n *= 2
    out.append(hi)
    return out


def _round_up(n: int, sizes: list[int]) -> int:
    for s in sizes:
        if n <= s:
            return s
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


@dataclass(frozen=True)
class BucketGrid:
    max_batch_size: int
    prefill_chunk: int
    """Most prompt tokens in one prefill step (a power of two >= 16)."""
    max_pages: int
    """Pages one row can hold: ceil(max_length / page_size); the width of every page table."""
    page_size: int = 16

    @classmethod
    def for_limits(cls, *, max_batch_size: int, max_length: int, prefill_chunk_size: int,
                   page_size: int) -> BucketGrid:
        """The grid for these limits: chunks no longer than the longest sequence needs (16 at least), page tables
        as wide as `max_length`."""
        chunk = min(prefill_chunk_size, 1 << (max_length - 1).bit_length())
        return cls(max_batch_size=max_batch_size, prefill_chunk=max(chunk, 16),
                   max_pages=-(-max_length // page_size), page_size=page_size)

    @property
    def batch_sizes(self) -> list[int]:
        return _powers_of_two(1, self.max_batch_size)

    @property
    def chunk_sizes(self) -> list[int]:
        return _powers_of_two(16, self.prefill_chunk)

    def batch_bucket(self, rows: int) -> int:
        return _round_up(rows, self.batch_sizes)

    def chunk_bucket(self, tokens: int) -> int:
        return _round_up(tokens, self.chunk_sizes)

    def decode_shapes(self) -> list[tuple[int, int, int]]:
        """(rows, 1, max_pages) for every decode step."""
        return [(b, 1, self.max_pages) for b in self.batch_sizes]

    def prefill_width(self, rows: int) -> int:
        """The longest chunk a prefill step of `rows` rows may give each row (0: no such step)."""
        if rows == 1:
            return self.prefill_chunk
        if rows > self.max_batch_size:
            return 0
        fits = [t for t in self.chunk_sizes if self.batch_bucket(rows) * t <= self.prefill_chunk]
        return fits[-1] if fits else 0

    def prefill_bucket(self, rows: int, tokens: int) -> tuple[int, int] | None:
        """The (rows, chunk) bucket of a prefill step of `rows` chunks, the longest `tokens` long; None when
        that is more than one prefill step may hold."""
        if tokens > self.prefill_width(rows):
            return None
        return self.batch_bucket(rows), self.chunk_bucket(tokens)

    def prefill_shapes(self) -> list[tuple[int, int, int]]:
        """(rows, chunk, max_pages) for every prefill step, with or without a cached past."""
        return [(b, t, self.max_pages) for t in self.chunk_sizes for b in self.batch_sizes
                if t <= self.prefill_width(b)]

    def all_shapes(self) -> list[tuple[int, int, int]]:
        return self.prefill_shapes() + self.decode_shapes()
