"""The scheduler: which sequences run in the next step, and where their keys and values live. Pure Python.

The invariant, kept by `_admit` and `finish`: every running sequence holds, from admission to its end, the pages
for its whole possible length (prompt + max new tokens, capped at max_length). Pages 1..N-1 (page 0 is the
scratch page padding writes go to) are each either in use (referenced by one or more running sequences), free,
or cached (unreferenced but still holding a known prompt prefix, reclaimed least recently used first when the
free list runs dry). So a step never runs out of pages mid-sequence, and a request that does not fit waits in
the queue, first come first served, until enough pages are freed.

Prefix caching: a full page of tokens is known by a hash of its tokens chained with the hash of the page
before it, so equal hashes mean equal prefixes. Once a sequence's prompt is in the cache its full pages are
registered; a later request whose prompt starts with the same pages shares them (read-only: nothing writes
into a page that is shared or registered) and prefills only the rest. When a sequence ends, the full pages of
its answer are registered too, and its last, partly filled page is kept as a *tail*. Every cached page is also
known by the prefix hash before it and the tokens it holds: a request whose prompt goes on from the shared
pages into one of them, or away from it part-way, adopts it when nobody references it (it leaves the cache,
becomes that request's own page and is written on from where the match ends). So a repeated prompt, or the
next turn of a chat that repeats the last answer, prefills only what is new, not what is left of a page. At
least one prompt token is always left to prefill, so every prompt gets its own logits.

Requests are `serve/request.Request`s; the scheduler alone changes their bookkeeping fields (`cached`, `pages`,
`batch_row`, the prefix-cache ones): `plan()` before a step, `advance(plan)` once it is dispatched (the next
plan may come before its tokens do), `retire(requests)` after its tokens are appended.

Each engine iteration asks for one `Plan`: one prefill step and one decode step for every sequence that has
its prompt cached. The prefill step holds the next prompt chunk of the oldest sequences still reading their
prompts, as many rows as make it cover the most tokens (requests that arrive together are prefilled together);
a sequence that needs prompt logprobs is prefilled alone. Chunking the prompt keeps a long prompt from
stalling the running decodes. A chunk never ends inside an image's soft tokens (`Request.chunk`), and a step holds
at most `images_per_step` images; the prefix cache knows an image's positions by its content (`Request.key_prompt`).

(A few lines past 400: admission, chunking and the prefix cache share the page bookkeeping, kept together.)
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from maxjax.serve.request import PageHash, Request, Status


@dataclass(frozen=True)
class Tail:
    """A page partly filled at a sequence's end: the tokens it holds, after the prefix `before`."""

    page: int
    before: PageHash
    tokens: tuple[int, ...]


NO_PREFIX: PageHash = b""
"""The prefix hash before the first page."""


class PageAllocator:
    """Pages 1..num_pages-1 with reference counts, and the table of cached prefixes.

    A cached page is known two ways: a full one by its chained hash (`lookup`: shared read-only), and every one,
    full or a tail, by the prefix hash before it and the tokens it holds (`lookup_partial`: a request whose
    prompt ends inside the page, or differs from it part-way, may adopt it when nobody references it)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))
        self._refs = [0] * num_pages
        self._by_hash: dict[PageHash, int] = {}
        self._hash_of: dict[int, PageHash] = {}
        self._after: dict[tuple[PageHash, int], dict[int, tuple[int, ...]]] = {}
        """Cached pages by the prefix hash before them and their first token: page -> the tokens it holds."""
        self._key_of: dict[int, tuple[PageHash, int]] = {}
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
                self._forget(page)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def _forget(self, page: int) -> None:
        if page in self._hash_of:
            del self._by_hash[self._hash_of.pop(page)]
        if page in self._key_of:
            key = self._key_of.pop(page)
            del self._after[key][page]
            if not self._after[key]:
                del self._after[key]

    def _know(self, page: int, before: PageHash, tokens: tuple[int, ...]) -> None:
        self._key_of[page] = (before, tokens[0])
        self._after.setdefault((before, tokens[0]), {})[page] = tokens

    def release(self, pages: list[int], tail: Tail | None = None) -> None:
        """Drop one reference to each page; keep `tail`'s page (one of them, referenced only here, not a full
        page already known) cached as a tail."""
        if tail is not None and self._refs[tail.page] == 1 and tail.page not in self._key_of:
            self._know(tail.page, tail.before, tail.tokens)
        for page in pages:
            self._refs[page] -= 1
            assert self._refs[page] >= 0, page
            if self._refs[page] == 0:
                if page in self._key_of:
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

    def lookup_partial(self, before: PageHash, tokens: list[int]) -> tuple[int, int]:
        """The cached page nobody references, after the prefix `before`, whose tokens start the same as `tokens`
        for longest: (page, tokens matched); (0, 0) when none matches one. A full page (one that `lookup` can
        share) counts only where it holds all of `tokens`: adopting it takes it out of the cache, which is worth
        it when it completes a prompt, not for a few tokens of a prompt that goes on past it (many prompts share
        a chat template's first tokens of a page, and would take from each other the pages they repeat)."""
        best, best_n = 0, 0
        for page, held in self._after.get((before, tokens[0]), {}).items() if tokens else ():
            if self._refs[page]:
                continue  # read by a running request: it may not be written
            n = 0
            for a, b in zip(held, tokens, strict=False):
                if a != b:
                    break
                n += 1
            if page in self._hash_of and n < len(tokens):
                continue
            if n > best_n:
                best, best_n = page, n
        return best, best_n

    def adopt(self, page: int) -> None:
        """Take a cached page nobody references as a page of one's own, to write on into: out of the cache."""
        assert self._refs[page] == 0 and page in self._key_of, page
        del self._evictable[page]
        self._forget(page)
        self._refs[page] = 1

    def unreferenced(self, pages: list[int]) -> int:
        """How many of `pages` nobody references (sharing them takes them off the evictable list)."""
        return sum(1 for page in pages if self._refs[page] == 0)

    def share(self, pages: list[int]) -> None:
        for page in pages:
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1

    def register(self, page: int, h: PageHash, before: PageHash, tokens: tuple[int, ...]) -> None:
        """Record that full `page` holds the prefix `h`: the prefix `before`, then `tokens` (first writer wins;
        the page must be in use)."""
        assert self._refs[page] > 0
        if h not in self._by_hash and page not in self._key_of:
            self._by_hash[h] = page
            self._hash_of[page] = h
            self._know(page, before, tokens)


def prefix_hashes(tokens: list[int], page_size: int, pages: int, start: int = 0,
                  before: PageHash = NO_PREFIX) -> list[PageHash]:
    """Chained hashes of full pages `start` .. `pages` - 1 of `tokens` (`before`: the hash of the pages before)."""
    out = []
    digest = before
    for i in range(start, pages):
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
                 prefill_width: Callable[[int], int] | None = None, images_per_step: int = 0):
        """`prefill_width(rows)`: the longest chunk each row of a prefill step of `rows` rows may have (0: no such
        step; the bucket grid decides); by default a prefill step holds one chunk of up to `chunk_size`.
        `images_per_step`: the most images whose soft tokens one prefill step may hold (the image table's
        slots); a chunk never ends inside an image."""
        self.pages = PageAllocator(num_pages)
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        self.chunk_size = chunk_size
        self.max_queue = max_queue
        self.images_per_step = images_per_step
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
        if seq.image_spans and max(stop - start for start, stop in seq.image_spans) > self.chunk_size:
            raise ValueError(f"an image's soft tokens must be prefilled in one chunk: raise --prefill-chunk-size "
                             f"above {self.chunk_size}")
        if seq.images and self.images_per_step <= 0:
            raise ValueError("this engine takes no images")
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
            seq.hashes = prefix_hashes(seq.key_prompt, self.page_size, self._shareable_pages(seq))
        return seq.hashes

    def _admit(self) -> list[Request]:
        admitted = []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            hits = self.pages.lookup(self._hashes(seq)) if seq.reuse_prefix else []
            tail, matched = 0, 0
            if seq.reuse_prefix and self.prefix_caching:
                start = len(hits) * self.page_size  # the tokens after the shared pages, but the last
                tail, matched = self.pages.lookup_partial(self._hashes(seq)[len(hits) - 1] if hits else NO_PREFIX,
                                                       seq.key_prompt[start : len(seq.prompt) - 1])
            own = [tail] if tail else []
            need = self.pages_for(seq) - len(hits) - len(own)
            if need > self.pages.free - self.pages.unreferenced(hits) - len(own):
                break  # first come, first served: later requests do not overtake a large one
            self.waiting.popleft()
            self.pages.share(hits)
            for page in own:
                self.pages.adopt(page)
            seq.pages = hits + own + self.pages.allocate(need)
            seq.cached = seq.prefix_hit = len(hits) * self.page_size + matched
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
        self._register(seq, self._hashes(seq), seq.key_prompt, complete)

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
            chunks = [(s, s.chunk(min(width, len(s.prompt) - s.cached))) for s in waiting[:rows]]
            if not all(n for _, n in chunks):
                break  # a row's next image does not fit in a chunk this short
            if sum(len(s.images_in(n)) for s, n in chunks) > self.images_per_step:
                chunks = self._fewer_images(chunks)
                if not chunks:
                    break
            tokens = sum(n for _, n in chunks)
            if tokens > best_tokens:
                best, best_tokens = chunks, tokens
        return best

    def _fewer_images(self, chunks: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """`chunks` cut so that they hold at most `images_per_step` images: each row's chunk ends before the
        image that would pass the limit (rows left with nothing are dropped, as are the rows after them)."""
        out, left = [], self.images_per_step
        for seq, n in chunks:
            spans = seq.images_in(n)
            if len(spans) > left:
                start = seq.image_spans[spans[left]][0]
                n = max(start - seq.cached, 0)
                left = 0
            else:
                left -= len(spans)
            if n == 0:
                break
            out.append((seq, n))
        return out

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
            self.pages.release(seq.pages, self._keep(seq))
            seq.pages = []
            self._free_rows.append(seq.batch_row)
            seq.batch_row = 0
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _register(self, seq: Request, hashes: list[PageHash], tokens: list[int], complete: int) -> None:
        """Register the sequence's full pages `seq.registered` .. `complete` - 1 (`hashes` and `tokens` cover them)."""
        ps = self.page_size
        for i in range(seq.registered, complete):
            self.pages.register(seq.pages[i], hashes[i], hashes[i - 1] if i else NO_PREFIX,
                                tuple(tokens[i * ps : (i + 1) * ps]))
        seq.registered = max(seq.registered, complete)

    def _keep(self, seq: Request) -> Tail | None:
        """At a sequence's end: register the full pages of what it cached, prompt and answer (tokens whose keys
        and values a dispatched step wrote and whose ids the host knows), and return its partly filled page
        after them as a tail to keep (None: nothing to keep)."""
        if not self.prefix_caching or not seq.reuse_prefix:
            return None
        known = min(seq.cached, len(seq.tokens))
        full = min(known // self.page_size, len(seq.pages))
        keys = seq.key_tokens
        hashes = self._hashes(seq)[:full]  # the prompt's, computed at admission; then the answer's
        hashes += prefix_hashes(keys, self.page_size, full, len(hashes), hashes[-1] if hashes else NO_PREFIX)
        self._register(seq, hashes, keys, full)
        held = tuple(keys[full * self.page_size : known])
        if not held or full >= len(seq.pages):
            return None
        return Tail(seq.pages[full], hashes[full - 1] if full else NO_PREFIX, held)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)
