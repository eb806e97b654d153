"""The scheduler: which sequences run in the next step, and where their keys and values live. Pure Python.

The invariant, kept by `admit` and `finish`: every running sequence holds, from admission to its end, the pages
for its whole possible length (prompt + max new tokens, capped at max_length); the pages of all running
sequences and the free list partition pages 1..N-1 (page 0 is the scratch page padding writes go to). So a
step never runs out of pages mid-sequence, and a request that does not fit waits in the queue until enough
pages are freed.

Each engine iteration asks for one `Plan`: at most one prefill chunk (of the oldest sequence still reading its
prompt) and one decode step for every sequence that has its prompt cached. Chunking the prompt keeps a long
prompt from stalling the running decodes.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any


class PageAllocator:
    """Free list of KV pages 1..num_pages-1."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self._free), (n, len(self._free))
        pages = self._free[-n:] if n else []
        del self._free[len(self._free) - n :]
        return pages[::-1]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
        assert len(self._free) <= self.num_pages - 1


@dataclass
class Sequence:
    """One request's tokens and cache pages, as the scheduler tracks them."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    payload: Any = None
    """Whatever the engine attaches (sampling parameters, the output channel)."""
    tokens: list[int] = field(default_factory=list)
    """Prompt followed by the generated tokens."""
    cached: int = 0
    """Tokens whose keys and values are in the cache."""
    pages: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def in_prefill(self) -> bool:
        return self.cached < len(self.prompt)


@dataclass(frozen=True)
class Plan:
    prefill: Sequence | None
    """The sequence whose next prompt chunk runs this step."""
    prefill_tokens: int
    """How many prompt tokens that chunk covers."""
    decode: list[Sequence]
    """Sequences that decode one token this step."""

    @property
    def empty(self) -> bool:
        return self.prefill is None and not self.decode


class Scheduler:
    def __init__(self, *, num_pages: int, page_size: int, max_batch_size: int, max_length: int, chunk_size: int,
                 max_queue: int = 1 << 30):
        self.pages = PageAllocator(num_pages)
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        self.chunk_size = chunk_size
        self.max_queue = max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []

    def pages_for(self, seq: Sequence) -> int:
        """Pages a sequence needs for its whole possible length."""
        total = min(len(seq.prompt) + seq.max_new_tokens, self.max_length)
        return -(-total // self.page_size)

    def add(self, seq: Sequence) -> bool:
        """Queue a sequence; False when the queue is full. Raises ValueError when it can never fit."""
        if len(seq.prompt) >= self.max_length:
            raise ValueError(f"prompt of {len(seq.prompt)} tokens leaves no room in max_length {self.max_length}")
        if self.pages_for(seq) > self.pages.num_pages - 1:
            raise ValueError(f"sequence needs {self.pages_for(seq)} pages; the pool has {self.pages.num_pages - 1}")
        if len(self.waiting) >= self.max_queue:
            return False
        self.waiting.append(seq)
        return True

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            need = self.pages_for(self.waiting[0])
            if need > self.pages.free:
                return  # first come, first served: later requests do not overtake a large one
            seq = self.waiting.popleft()
            seq.pages = self.pages.allocate(need)
            self.running.append(seq)

    def plan(self) -> Plan:
        self._admit()
        prefill = next((s for s in self.running if s.in_prefill), None)
        tokens = min(self.chunk_size, len(prefill.prompt) - prefill.cached) if prefill else 0
        decode = [s for s in self.running if not s.in_prefill]
        return Plan(prefill=prefill, prefill_tokens=tokens, decode=decode)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (done, cancelled or failed) and free its pages, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
            self.pages.release(seq.pages)
            seq.pages = []
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)
