"""The scheduler with plain Python sequences: no JAX, no model."""

from __future__ import annotations

import pytest

from maxjax.graph.buckets import BucketGrid
from maxjax.serve.protocol import SamplingParams
from maxjax.serve.request import Request
from maxjax.serve.scheduler import PageAllocator, Plan, Scheduler


def make(num_pages: int = 17, batch: int = 4, max_length: int = 64, chunk: int = 16) -> Scheduler:
    return Scheduler(num_pages=num_pages, page_size=16, max_batch_size=batch, max_length=max_length,
                     chunk_size=chunk, max_queue=3)


def seq(name: str, prompt_len: int, new: int) -> Request:
    return Request(name, list(range(prompt_len)), SamplingParams(max_tokens=new))


def run_prefill(s: Scheduler) -> list[tuple[str, int]]:
    """Pretend the device ran the planned prefill chunks; returns them as (request id, tokens)."""
    plan = s.plan()
    assert plan.prefill
    for q, n in plan.prefill:
        q.cached += n
    return [(q.request_id, n) for q, n in plan.prefill]


def test_allocator_hands_out_each_page_once() -> None:
    a = PageAllocator(9)
    first, second = a.allocate(3), a.allocate(5)
    assert sorted(first + second) == list(range(1, 9)) and a.free == 0
    a.release(first)
    assert a.free == 3 and a.in_use == 5
    assert sorted(a.allocate(3)) == sorted(first)


def test_pages_reserved_for_whole_length_and_freed_on_finish() -> None:
    s = make()
    a = seq("a", 20, 30)  # 50 tokens -> 4 pages
    s.add(a)
    s.plan()
    assert len(a.pages) == 4 and s.pages.in_use == 4
    s.finish(a)
    assert s.pages.in_use == 0 and not s.has_work


def test_long_prompt_is_chunked_while_others_decode() -> None:
    s = make(chunk=16)
    short, long = seq("short", 10, 5), seq("long", 40, 5)
    s.add(short)
    s.add(long)
    run_prefill(s)  # short's whole prompt
    short.tokens.append(1)
    plans = []
    for _ in range(3):
        plan = s.plan()
        plans.append(([(q.request_id, n) for q, n in plan.prefill], [q.request_id for q in plan.decode]))
        for q, n in plan.prefill:
            q.cached += n
        for q in plan.decode:
            q.cached += 1
            q.tokens.append(1)
    assert plans == [([("long", 16)], ["short"]), ([("long", 16)], ["short"]), ([("long", 8)], ["short"])]


def grid_scheduler(max_length: int = 128) -> Scheduler:
    """Batch 8 and the server's prefill rule with a 64-token prefill step: rows x chunk (both rounded up) <= 64."""
    grid = BucketGrid(max_batch_size=8, prefill_chunk=64, max_pages=max_length // 16)
    return Scheduler(num_pages=64, page_size=16, max_batch_size=8, max_length=max_length, chunk_size=64,
                     prefill_width=grid.prefill_width)


def test_prompts_that_arrive_together_are_prefilled_together() -> None:
    s = grid_scheduler()
    for name, n in [("a", 10), ("b", 14), ("c", 5), ("d", 12), ("e", 3)]:
        s.add(seq(name, n, 4))
    # 4 rows x 16 tokens fill the 64-token step; "e" waits for the next one.
    assert run_prefill(s) == [("a", 10), ("b", 14), ("c", 5), ("d", 12)]
    plan = s.plan()
    assert [(q.request_id, n) for q, n in plan.prefill] == [("e", 3)]
    assert [q.request_id for q in plan.decode] == ["a", "b", "c", "d"]


def test_prompts_that_do_not_fit_whole_are_cut_to_the_chunk_the_rows_allow() -> None:
    s = grid_scheduler()
    for name in "abcd":
        s.add(seq(name, 20, 4))
    steps = [run_prefill(s), run_prefill(s)]
    # 4 rows x 16 tokens (64) cover more than 2 x 20 (40) or 1 x 20: the last 4 tokens of each come next.
    assert steps == [[(n, 16) for n in "abcd"], [(n, 4) for n in "abcd"]]


def test_a_long_chunk_and_a_prompt_logprobs_request_prefill_alone() -> None:
    s = grid_scheduler(max_length=256)
    s.add(seq("long", 80, 4))
    s.add(seq("short", 10, 4))
    logprobs = seq("logprobs", 10, 4)
    logprobs.reuse_prefix, logprobs.prefilled_alone = False, True  # as prompt_logprobs sets them
    s.add(logprobs)
    s.add(seq("last", 10, 4))
    steps = []
    while any(q.in_prefill for q in s.running + list(s.waiting)):
        steps.append(run_prefill(s))
    assert steps == [[("long", 64)], [("long", 16), ("short", 10)], [("logprobs", 10)], [("last", 10)]]


def test_batch_size_bounds_running_rows() -> None:
    s = make(num_pages=64, batch=2)
    for name in "abc":
        s.add(seq(name, 8, 8))
    s.plan()
    assert [q.request_id for q in s.running] == ["a", "b"] and [q.request_id for q in s.waiting] == ["c"]
    s.finish(s.running[0])
    s.plan()
    assert [q.request_id for q in s.running] == ["b", "c"]


def test_requests_wait_for_pages_first_come_first_served() -> None:
    s = make(num_pages=5)  # 4 usable pages
    big, small = seq("big", 40, 20), seq("small", 4, 4)  # 4 pages, 1 page
    s.add(seq("x", 20, 10))  # 2 pages
    s.plan()
    s.add(big)
    s.add(small)
    s.plan()
    assert [q.request_id for q in s.running] == ["x"], "small must not overtake big"
    s.finish(s.running[0])
    s.plan()
    assert [q.request_id for q in s.running] == ["big"]


def test_queue_limit_and_impossible_requests() -> None:
    s = make(batch=1)
    assert all(s.add(seq(f"q{i}", 4, 4)) for i in range(3))
    assert not s.add(seq("overflow", 4, 4))
    with pytest.raises(ValueError, match="max_length"):
        s.add(seq("too-long", 64, 1))


def test_cancel_waiting_and_running() -> None:
    s = make(batch=1)
    a, b = seq("a", 4, 4), seq("b", 4, 4)
    s.add(a)
    s.add(b)
    s.plan()
    s.finish(b)  # still waiting
    s.finish(a)  # running
    assert not s.has_work and s.pages.in_use == 0


def test_prefix_pages_are_shared_after_the_first_prompt_is_cached() -> None:
    s = make(num_pages=17, batch=4, max_length=64)
    first = Request("first", list(range(40)), SamplingParams(max_tokens=8))  # 48 tokens -> 3 pages
    s.add(first)
    while first.in_prefill:
        run_prefill(s)
        s.prefilled(first)
    second = Request("second", list(range(36)) + [99, 98], SamplingParams(max_tokens=8))  # same first 36 tokens
    s.add(second)
    s.plan()
    assert second.prefix_hit == 32 and second.cached == 32, "two full pages shared"
    assert second.pages[:2] == first.pages[:2] and second.pages[2:] != first.pages[2:]
    assert s.pages.in_use == 3 + 1  # first's 3 pages, and second's one page of its own
    s.finish(first)
    s.finish(second)
    assert s.pages.in_use == 0


def test_the_page_with_the_last_prompt_token_is_never_shared() -> None:
    s = make(num_pages=17)
    a = Request("a", list(range(32)), SamplingParams(max_tokens=4))
    s.add(a)
    while a.in_prefill:
        run_prefill(s)
        s.prefilled(a)
    b = Request("b", list(range(32)), SamplingParams(max_tokens=4))
    s.add(b)
    s.plan()
    assert b.prefix_hit == 16 and b.in_prefill, "the second page holds the last prompt token: recomputed"


def test_cached_pages_survive_their_sequence_and_are_evicted_last_used_first() -> None:
    s = make(num_pages=6, batch=1, max_length=80)  # 5 usable pages
    a = Request("a", list(range(40)), SamplingParams(max_tokens=8))  # 3 pages, 2 shareable
    s.add(a)
    while a.in_prefill:
        run_prefill(s)
        s.prefilled(a)
    s.finish(a)
    assert s.pages.in_use == 0 and s.pages.free == 5
    again = Request("again", list(range(40)), SamplingParams(max_tokens=8))
    s.add(again)
    s.plan()
    assert again.prefix_hit == 39, "pages of a finished request are reused, its tail too"
    s.finish(again)
    big = Request("big", [7] * 70, SamplingParams(max_tokens=10))  # 5 pages: must evict the cached ones
    s.add(big)
    s.plan()
    assert len(big.pages) == 5 and s.pages.lookup(again.hashes or []) == []


def test_a_sequence_can_opt_out_of_prefix_reuse() -> None:
    s = make(num_pages=17)
    a = Request("a", list(range(40)), SamplingParams(max_tokens=4))
    s.add(a)
    while a.in_prefill:
        run_prefill(s)
        s.prefilled(a)
    b = Request("b", list(range(40)), SamplingParams(max_tokens=4, prompt_logprobs=0))
    s.add(b)
    s.plan()
    assert b.prefix_hit == 0 and b.cached == 0


def test_a_finished_answer_serves_the_next_turn_and_a_page_is_adopted_only_when_nobody_reads_it() -> None:
    """A request's answer pages are registered when it ends: a prompt that repeats the answer shares them. A
    prompt that ends inside a cached full page (or leaves it part-way) adopts that page, but only when nobody
    reads it: it writes on into it, and the page leaves the cache."""
    s = make(num_pages=17)
    a = Request("a", list(range(20)), SamplingParams(max_tokens=30))
    s.add(a)
    while a.in_prefill:
        run_prefill(s)
    for t in range(13):  # 13 tokens generated, 12 of them fed back: 32 cached, two full pages
        a.tokens.append(100 + t)
        if t < 12:
            s.advance(Plan(prefill=[], decode=[a]))
    assert a.cached == 32
    first, second = a.pages[:2]
    s.finish(a)
    turn = a.tokens + [7, 8, 9]  # the answer repeated, then the next question
    b = Request("b", turn, SamplingParams(max_tokens=4))
    c = Request("c", turn, SamplingParams(max_tokens=4))
    d = Request("d", a.tokens[:30] + [5], SamplingParams(max_tokens=4))
    for r in (b, c, d):
        s.add(r)
    s.plan()
    assert b.prefix_hit == c.prefix_hit == 32 and b.pages[:2] == c.pages[:2] == [first, second]
    assert d.prefix_hit == 16 and d.pages[1] != second, "the second page is read by b and c: not adopted"
    for r in (b, c, d):
        s.finish(r)
    e = Request("e", a.tokens[:30] + [5], SamplingParams(max_tokens=4))
    s.add(e)
    s.plan()
    assert e.prefix_hit == 30 and e.pages[:2] == [first, second], "14 tokens of the second page: adopted"
    assert s.pages.lookup(b.hashes or []) == [first], "an adopted page leaves the cache"


def test_a_tail_matches_by_its_tokens_and_is_evicted_like_any_cached_page() -> None:
    s = make(num_pages=6, batch=2, max_length=80)  # 5 usable pages
    a = Request("a", list(range(20)), SamplingParams(max_tokens=8))  # 2 pages
    s.add(a)
    while a.in_prefill:
        run_prefill(s)
    tail = a.pages[1]
    s.finish(a)  # a tail: tokens 16..19 after the first page
    other = Request("other", list(range(16)) + [1, 2, 3, 4, 5], SamplingParams(max_tokens=4))
    s.add(other)
    s.plan()
    assert other.prefix_hit == 16 and tail not in other.pages, "a tail whose first token differs is not used"
    same = Request("same", list(range(19)) + [9, 9], SamplingParams(max_tokens=4))
    s.add(same)
    s.plan()
    assert same.prefix_hit == 19 and same.pages[1] == tail, "three tokens of the tail match"
    s.finish(same)
    s.finish(other)
    big = Request("big", [7] * 70, SamplingParams(max_tokens=10))  # 5 pages: every cached page evicted
    s.add(big)
    s.plan()
    assert len(big.pages) == 5 and s.pages.lookup_partial(b"", list(range(16))) == (0, 0)


def test_a_full_page_is_not_taken_for_part_of_a_longer_prompt() -> None:
    """Adopting a full page takes it out of the cache: worth it where the page completes the prompt, not for
    the first few tokens of a prompt that goes on past it (as many prompts share a chat template's first tokens
    of a page): the page stays for the prompt that repeats it whole."""
    s = make(num_pages=17)
    a = Request("a", list(range(40)), SamplingParams(max_tokens=4))
    s.add(a)
    while a.in_prefill:
        run_prefill(s)
    s.finish(a)  # pages 0 and 1 full, page 2 a tail (tokens 32..39)
    b = Request("b", list(range(20)) + [99] * 20, SamplingParams(max_tokens=4))
    s.add(b)
    s.plan()
    assert b.prefix_hit == 16, "four tokens of the second page are not worth taking it from the cache"
    again = Request("again", list(range(40)), SamplingParams(max_tokens=4))
    s.add(again)
    s.plan()
    assert again.prefix_hit == 39
