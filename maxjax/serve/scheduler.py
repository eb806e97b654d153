"""The scheduler: which sequences run in the next step, and where their keys and values live. Pure Python.

The invariant, kept by `_admit` and `finish`: every running sequence holds, from admission to its end, the pages
for its whole possible length (prompt + max new tokens, capped at max_length). Pages 1..N-1 (page 0 is the
scratch page padding writes go to) are each either in use (referenced by one or more running sequences), free,
or cached (unreferenced but still holding a known prompt prefix, reclaimed least recently used first when the
free list runs dry). So a step never runs out of pages mid-sequence, and a request that does not fit waits in
the queue, first come first served, until enough pages are freed.

Prefix caching: a full page of prompt tokens is known by a hash of its tokens chained with the hash of the
page before it, so equal hashes mean equal prefixes. Once a sequence's prompt is in the cache its full pages
are registered; a later request whose prompt starts with the same pages shares them (read-only: nothing is
ever written into a full prompt page again) and prefills only the rest. The page holding a prompt's last
token is never shared, so every prompt runs at least one token of prefill and gets its own logits.

Requests are `serve/request.Request`s; the scheduler alone changes their bookkeeping fields (`cached`, `pages`,
`batch_row`, the prefix-cache ones): `plan()` before a step, `advance(plan)` once it is dispatched (the next
plan may come before its tokens do), `retire(requests)` after its tokens are appended.

Each engine iteration asks for one `Plan`: one prefill step and one decode step for every sequence that has
its prompt cached. The prefill step holds the next prompt chunk of the oldest sequences still reading their
prompts, as many rows as make it cover the most tokens (requests that arrive together are prefilled together);
a sequence that needs prompt logprobs is prefilled alone. Chunking the prompt keeps a long prompt from
stalling the running decodes.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from maxjax.serve.request import PageHash, Request, Status


class PageAllocator:
    """Pages 1..num_pages-1 with reference counts, and the table of cached prompt prefixes."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))
        self._refs = [0] * num_pages
        self._by_hash: dict[PageHash, int] = {}
        self._hash_of: dict[int, PageHash] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        """Cached pages nobody references, least recently used first."""

    @property
    def free(self) -> int:
        """Pages an allocation can take: the free list plus cached pages nobody uses."""
        return len(self._free) + len(self._evictable)

    @property
    def in_use(self) -> int:
        return self.num_pages - 1 - self.free

    def allocate(self, n: int) -> list[int]:
        assert n <= self.free, (n, self.free)
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self._refs[page] -= 1
            assert self._refs[page] >= 0, page
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def lookup(self, hashes: list[PageHash]) -> list[int]:
        """Cached pages holding the longest prefix of `hashes` (not yet referenced by the caller)."""
        pages = []
        for h in hashes:
            page = self._by_hash.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def unreferenced(self, pages: list[int]) -> int:
        """How many of `pages` nobody references (sharing them takes them off the evictable list)."""
        return sum(1 for page in pages if self._refs[page] == 0)

    def share(self, pages: list[int]) -> None:
        for page in pages:
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1

    def register(self, page: int, h: PageHash) -> None:
        """Record that `page` holds the prefix `h` (first writer wins; the page must be in use)."""
        assert self._refs[page] > 0
        if h not in self._by_hash and page not in self._hash_of:
            self._by_hash[h] = page
            self._hash_of[page] = h


def prefix_hashes(tokens: list[int], page_size: int, pages: int) -> list[PageHash]:
    """Chained hashes of the first `pages` full pages of `tokens`."""
    out = []
    digest = b""
    for i in range(pages):
        chunk = tokens[i * page_size : (i + 1) * page_size]
        digest = hashlib.blake2b(digest + repr(chunk).encode(), digest_size=16).digest()
        out.append(digest)
    return out


@dataclass(frozen=True)
class Plan:
    prefill: list[tuple[Request, int]]
    """The sequences whose next prompt chunk runs this step, each with how many prompt tokens it covers."""
    decode: list[Request]
    """Requests that decode one token this step."""
    admitted: list[Request] = field(default_factory=list)
    """Requests that took a batch row and their pages for this plan (their per-row values go in once)."""

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, *, num_pages: int, page_size: int, max_batch_size: int, max_length: int, chunk_size: int,
                 max_queue: int = 1 << 30, prefix_caching: bool = True,
                 prefill_width: Callable[[int], int] | None = None):
        """`prefill_width(rows)`: the longest chunk each row of a prefill step of `rows` rows may have (0: no such
        step; the bucket grid decides); by default a prefill step holds one chunk of up to `chunk_size`."""
        self.pages = PageAllocator(num_pages)
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        self.chunk_size = chunk_size
        self.max_queue = max_queue
        self.prefix_caching = prefix_caching
        self.prefill_width = prefill_width or (lambda rows: chunk_size if rows == 1 else 0)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._free_rows = list(range(max_batch_size, 0, -1))
        """Rows of the persistent batch nobody holds (row 0 is the scratch row of padding)."""

    def pages_for(self, seq: Request) -> int:
        """Pages a sequence needs for its whole possible length."""
        total = min(len(seq.prompt) + seq.max_new_tokens, self.max_length)
        return -(-total // self.page_size)

    def check_fits(self, seq: Request) -> None:
        """Raise ValueError when the sequence can never run (reads only the scheduler's fixed limits)."""
        if len(seq.prompt) >= self.max_length:
            raise ValueError(f"prompt of {len(seq.prompt)} tokens leaves no room in max_length {self.max_length}")
        if self.pages_for(seq) > self.pages.num_pages - 1:
            raise ValueError(
                f"the request needs {self.pages_for(seq) * self.page_size} tokens of KV cache; the pool holds "
                f"{(self.pages.num_pages - 1) * self.page_size}: ask for fewer tokens"
            )

    def add(self, seq: Request) -> bool:
        """Queue a sequence; False when the queue is full. Raises ValueError when it can never fit."""
        self.check_fits(seq)
        if len(self.waiting) >= self.max_queue:
            return False
        self.waiting.append(seq)
        return True

    def _shareable_pages(self, seq: Request) -> int:
        """Full prompt pages before the one holding the last prompt token."""
        return (len(seq.prompt) - 1) // self.page_size if self.prefix_caching else 0

    def _hashes(self, seq: Request) -> list[PageHash]:
        if seq.hashes is None:
            seq.hashes = prefix_hashes(seq.prompt, self.page_size, self._shareable_pages(seq))
        return seq.hashes

    def _admit(self) -> list[Request]:
        admitted = []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            hits = self.pages.lookup(self._hashes(seq)) if seq.reuse_prefix else []
            need = self.pages_for(seq) - len(hits)
            if need > self.pages.free - self.pages.unreferenced(hits):
                break  # first come, first served: later requests do not overtake a large one
            self.waiting.popleft()
            self.pages.share(hits)
            seq.pages = hits + self.pages.allocate(need)
            seq.cached = seq.prefix_hit = len(hits) * self.page_size
            seq.registered = len(hits)
            seq.status = Status.RUNNING
            seq.batch_row = self._free_rows.pop()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def prefilled(self, seq: Request) -> None:
        """Register the prompt pages that are now complete in the cache, for later requests to share."""
        if not self.prefix_caching:
            return
        complete = min(seq.cached // self.page_size, self._shareable_pages(seq))
        hashes = self._hashes(seq)
        for i in range(seq.registered, complete):
            self.pages.register(seq.pages[i], hashes[i])
        seq.registered = max(seq.registered, complete)

    def plan(self) -> Plan:
        """The next step. It may be planned while the step before is still running (its tokens unknown): a
        request whose last token by length is already on the way gets no more steps; one that the step in
        flight ends with a stop token gets one step too many, whose token is dropped."""
        admitted = self._admit()
        prefill = self._plan_prefill([s for s in self.running if s.in_prefill])
        decode = [s for s in self.running if not s.in_prefill and not s.finished and not self._last_planned(s)]
        return Plan(prefill=prefill, decode=decode, admitted=admitted)

    def _last_planned(self, seq: Request) -> bool:
        """Whether the steps already planned sample the last token its length allows (`max_tokens`, or the
        context): every step past the prompt samples one, so this is known before their tokens are."""
        sampled = seq.cached - len(seq.prompt) + 1
        return sampled >= seq.max_new_tokens or seq.cached + 1 >= self.max_length

    def _plan_prefill(self, waiting: list[Request]) -> list[tuple[Request, int]]:
        """The oldest sequences still reading their prompts, as many as make the prefill step cover the most
        prompt tokens: more rows mean shorter chunks each (rows x chunk is bounded), and a row whose prompt is
        longer than its chunk goes on in a later step."""
        best: list[tuple[Request, int]] = []
        best_tokens = 0
        for rows in range(1, len(waiting) + 1):
            if rows > 1 and (waiting[0].prefilled_alone or waiting[rows - 1].prefilled_alone):
                break  # prompt logprobs are computed for a step's only row
            width = min(self.chunk_size, self.prefill_width(rows))
            if width <= 0:
                break
            chunks = [(s, min(width, len(s.prompt) - s.cached)) for s in waiting[:rows]]
            tokens = sum(n for _, n in chunks)
            if tokens > best_tokens:
                best, best_tokens = chunks, tokens
        return best

    def advance(self, plan: Plan) -> None:
        """Once the step that runs `plan` is dispatched: what it caches counts as cached (the device runs steps
        in order, so the next step may read it), and prompt pages complete by then are registered for sharing."""
        for seq, n in plan.prefill:
            seq.cached += n
            self.prefilled(seq)
        for seq in plan.decode:
            seq.cached += 1

    def retire(self, seqs: list[Request]) -> None:
        """Those of `seqs` that finished leave (after their step's tokens were appended and checked)."""
        for seq in seqs:
            if seq.finished:
                self.finish(seq)

    def finish(self, seq: Request) -> None:
        """Remove a request (done, cancelled or failed) and release its pages, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
            self.pages.release(seq.pages)
            seq.pages = []
            self._free_rows.append(seq.batch_row)
            seq.batch_row = 0
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)
