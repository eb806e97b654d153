"""The bucket grid: the one place that decides which static shapes exist, so warm-up can compile all of them.

A step's shape is (rows, new tokens per row, past pages per row). Decode steps have one new token per row and
round the batch up to a power of two; prefill steps are one row whose chunk rounds up to a power of two from
16; the past each row attends rounds up to a power-of-two number of pages, so a step costs what the live
context costs rather than the maximum length.
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
    """Pages one row can hold: ceil(max_length / page_size)."""
    page_size: int = 16

    @property
    def batch_sizes(self) -> list[int]:
        return _powers_of_two(1, self.max_batch_size)

    @property
    def chunk_sizes(self) -> list[int]:
        return _powers_of_two(16, self.prefill_chunk)

    @property
    def page_counts(self) -> list[int]:
        """Past pages a step may gather: 0 (no past) or a power of two up to max_pages."""
        return [0, *_powers_of_two(1, self.max_pages)]

    def batch_bucket(self, rows: int) -> int:
        return _round_up(rows, self.batch_sizes)

    def chunk_bucket(self, tokens: int) -> int:
        return _round_up(tokens, self.chunk_sizes)

    def pages_bucket(self, pages: int) -> int:
        return _round_up(pages, self.page_counts)

    def decode_shapes(self) -> list[tuple[int, int, int]]:
        """(rows, 1, past pages) for every decode step. A decode row always has a past."""
        return [(b, 1, p) for b in self.batch_sizes for p in self.page_counts if p > 0]

    @property
    def prefill_page_counts(self) -> list[int]:
        """Past pages a prefill chunk may gather: none, or at least a whole chunk's worth. Chunks start at
        multiples of `prefill_chunk`; a prompt whose first pages came from the prefix cache has a shorter past,
        and gathers the smallest of these buckets that holds it (the rest is masked)."""
        first_past = -(-self.prefill_chunk // self.page_size)
        return [p for p in self.page_counts if p == 0 or p >= min(first_past, self.max_pages)]

    def prefill_pages_bucket(self, pages: int) -> int:
        return _round_up(pages, self.prefill_page_counts)

    def prefill_shapes(self) -> list[tuple[int, int, int]]:
        """(1, chunk, past pages) for every prefill step."""
        return [(1, t, p) for t in self.chunk_sizes for p in self.prefill_page_counts]

    def all_shapes(self) -> list[tuple[int, int, int]]:
        return self.prefill_shapes() + self.decode_shapes()
