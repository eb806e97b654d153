"""The engine step: schedule -> dispatch -> postprocess, the way nano-vllm reads, with the host one step ahead.

`EngineCore.step()` asks the scheduler for a plan, gathers it from the persistent batch into bucketed NumPy
batches (one prefill chunk, one decode batch), dispatches them on the device through the `ModelRunner`, and then
appends the previous step's sampled tokens to their requests, reporting what each request got and whether it
finished. `max generate` drives it directly; the server's engine thread (`serve/async_engine.py`) drives it in a
loop. A request's values become step inputs in `serve/admission.py`. Embedding requests ride the prefill steps
and are pooled in `_collect`. (Past 400 lines: plan, launch and collect share the batch they build, images' slots included.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np

from maxjax.config import KVCacheConfig, SchedulerConfig
from maxjax.graph import batch
from maxjax.graph.batch import StepInputs
from maxjax.graph.buckets import BucketGrid
from maxjax.graph.memory import plan_pool
from maxjax.graph.mesh import make_mesh
from maxjax.graph.programs import PromptScores
from maxjax.graph.runner import CacheSpec, ModelRunner
from maxjax.graph.sampling import (
    ADJUST_SLOTS,
    BANNED,
    LogitAdjustments,
    SampleOutput,
)
from maxjax.pipeline import LoadedModel
from maxjax.serve.admission import admit
from maxjax.serve.image_table import ImageTable
from maxjax.serve.protocol import (
    GenerationOutput,
    GenerationRequest,
    Pooling,
    RequestRejected,
    TokenLogprob,
    VisionInfo,
)
from maxjax.serve.request import Request, check_stop
from maxjax.serve.scheduler import Plan, Scheduler

if TYPE_CHECKING:
    from maxjax.serve.grammar import GrammarCompiler
    from maxjax.tokenizer import Tokenizer

log = logging.getLogger(__name__)



class StepTime(NamedTuple):
    host: float
    """Seconds on the host: planning, writing the batch, dispatching, postprocessing."""
    device_wait: float
    """Seconds waiting for the device's results (what the host's work did not cover)."""


class _RowTable:
    """The persistent batch: each running request's per-row values at its batch row, written once when it is
    admitted (`seat`); a step gathers its rows from here instead of writing every row's values again."""

    def __init__(self, rows: int, max_pages: int):
        self.temperature = np.zeros(rows, np.float32)
        self.top_p = np.ones(rows, np.float32)
        self.top_k = np.zeros(rows, np.int32)
        self.min_p = np.zeros(rows, np.float32)
        self.seed = np.zeros(rows, np.uint32)
        self.logprobs = np.zeros(rows, np.bool_)
        self.pages = np.zeros((rows, max_pages), np.int32)
        """Every page the request holds, in order (0 beyond)."""

    def seat(self, req: Request) -> None:
        at, row = req.batch_row, req.row
        self.temperature[at], self.top_p[at], self.top_k[at] = row.temperature, row.top_p, row.top_k
        self.min_p[at], self.seed[at] = row.min_p, row.seed
        self.logprobs[at] = req.params.logprobs is not None
        self.pages[at] = 0
        self.pages[at, : len(req.pages)] = req.pages


@dataclass
class _Launched:
    """A step dispatched to the device whose results are not fetched yet."""

    plan: Plan
    chunks: list[tuple[Request, int]]
    """The prompt chunks the prefill step ran (its rows in order)."""
    joined: list[Request]
    """Requests whose last prompt token ran in the decode step, after its decode rows (`_launch`)."""
    starts: list[int]
    """Each prefill row's cached length before the step."""
    prefill: SampleOutput | None
    scores: PromptScores | None
    decode: SampleOutput | None
    hidden: jax.Array | None = None
    """The prefill step's hidden states, when a row embeds."""


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, eos_token_ids: frozenset[int], *,
                 overlap: bool = True, tokenizer: Tokenizer | None = None, vision: VisionInfo | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        """What constrained requests' grammars are compiled against (`grammars`)."""
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self.overlap = overlap
        """Dispatch each step before fetching the tokens of the one before (`step`)."""
        self.scheduler = scheduler
        self.eos_token_ids = eos_token_ids
        self.grid = runner.grid
        self.page_size = scheduler.page_size
        self.last_step: StepTime | None = None
        """Where the last step's time went (the server's metrics add these up)."""
        self.pooling = Pooling()
        """How embedding requests of this model are pooled by default (the checkpoint's declaration)."""
        self.declares_pooling = False
        """The checkpoint declared `pooling` (it is an embedding model)."""
        self.vision = vision if runner.image_slots else None
        """How the model takes images (None: text only)."""
        self.images = ImageTable(runner.image_slots)
        """Which image is in which slot of the runner's image table (the encoder cache)."""
        self._rows = _RowTable(scheduler.max_batch_size + 1, self.grid.max_pages)
        self._in_flight: _Launched | None = None

    @classmethod
    def create(
        cls, loaded: LoadedModel, device: jax.Device | Sequence[jax.Device], scheduler: SchedulerConfig,
        kv: KVCacheConfig, *, max_queue: int = 1 << 30,
    ) -> EngineCore:
        """Place the weights (on several devices: tensor parallel over them), size the KV pool from what is left
        (planned for the first device as if it held everything), and set up the bucket grid."""
        devices = [device] if isinstance(device, jax.Device) else list(device)
        device = devices[0]
        cfg = loaded.config
        max_length = min(scheduler.max_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        spec = CacheSpec(cfg.num_layers, 2, kv.page_size, cfg.num_kv_heads, cfg.head_dim, loaded.dtype)
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(loaded.model))
        pool = plan_pool(
            device=device, bytes_per_page=spec.bytes_per_page, page_size=kv.page_size,
            max_batch_size=scheduler.max_batch_size, max_length=max_length, weight_bytes=weight_bytes,
            num_pages=kv.num_pages, utilization=kv.device_memory_utilization,
        )
        num_pages = pool.num_pages
        spec = CacheSpec(cfg.num_layers, num_pages, kv.page_size, cfg.num_kv_heads, cfg.head_dim, loaded.dtype)
        grid = BucketGrid.for_limits(max_batch_size=scheduler.max_batch_size, max_length=max_length,
                                     prefill_chunk_size=scheduler.prefill_chunk_size, page_size=kv.page_size)
        vision = None
        images_per_step = 0
        if loaded.vision is not None:
            vc = loaded.vision.config
            # A prefill step holds as many images as fill its chunk, and the table twice that (at least 16):
            # the rest of the slots keep recent images for the next turns.
            images_per_step = max(2, min(8, grid.prefill_chunk // vc.mm_tokens_per_image))
            vision = VisionInfo(image_token_id=vc.image_token_id, boi_token_id=vc.boi_token_id,
                                eoi_token_id=vc.eoi_token_id, tokens_per_image=vc.mm_tokens_per_image,
                                processing=loaded.vision.processing,
                                max_images=scheduler.max_images_per_request)
        runner = ModelRunner(loaded.model, spec, grid, mesh=make_mesh(devices),
                             image_slots=max(16, 2 * images_per_step) if vision else 0, images_per_step=images_per_step)
        log.info(
            "KV cache: %d pages of %d tokens = %d tokens (%.2f GiB%s; %s); weights %.0f MiB",
            num_pages - 1, kv.page_size, (num_pages - 1) * kv.page_size, num_pages * spec.bytes_per_page / 2**30,
            ", reserved and filled as used" if runner.lazy_pool else "", pool.why, weight_bytes / 2**20,
        )
        sched = Scheduler(
            num_pages=num_pages, page_size=kv.page_size, max_batch_size=scheduler.max_batch_size,
            max_length=max_length, chunk_size=grid.prefill_chunk, max_queue=max_queue,
            prefill_width=grid.prefill_width, images_per_step=images_per_step,
        )
        return cls(runner, sched, loaded.tokenizer.eos_token_ids | frozenset(cfg.eos_token_ids),
                   overlap=scheduler.overlap, tokenizer=loaded.tokenizer, vision=vision)

    def admit(self, request: GenerationRequest) -> Request:
        """Check and convert a request (`admit`) into one the scheduler can take, its grammar compiled into its
        matcher. Touches no engine state, so the HTTP side may call it from its own thread; raises
        `RequestRejected`."""
        seq = admit(request, self.runner.vocab_size, self.vision)
        for image in request.images:
            if image.pixels.shape != self.runner.pixel_shape:
                raise RequestRejected(f"an image's pixels are {image.pixels.shape}, not the {self.runner.pixel_shape} "
                                      "the vision tower takes", param="messages")
        if request.params.grammar is not None:
            from maxjax.serve.grammar import GrammarError

            try:
                seq.logit_state = self.grammars().compile(request.params.grammar)
            except GrammarError as e:
                raise RequestRejected(str(e), param=e.param or "response_format") from None
        try:
            self.scheduler.check_fits(seq)
        except ValueError as e:
            raise RequestRejected(str(e), param="max_tokens") from None
        return seq

    def grammars(self) -> GrammarCompiler:
        """The grammar compiler for this model's tokenizer, built at the first constrained request (0.2 s)."""
        with self._grammar_lock:
            if self._grammars is None:
                from maxjax.serve.grammar import GrammarCompiler

                if self.tokenizer is None:
                    raise RequestRejected("this engine has no tokenizer to constrain answers with",
                                          param="response_format")
                self._grammars = GrammarCompiler(self.tokenizer, vocab_size=self.runner.vocab_size)
            return self._grammars

    def queue(self, seq: Request) -> bool:
        """Queue an admitted sequence; False when the queue is full."""
        return self.scheduler.add(seq)

    def add(self, request: GenerationRequest) -> Request | None:
        """`admit` and `queue` in one (max generate, tests); None when the queue is full."""
        seq = self.admit(request)
        return seq if self.queue(seq) else None

    def first_runs(self, *, decode_only: bool = False) -> None:
        """Give every executable of the grid (with `decode_only`, every decode step) its first run now."""
        for shape in self.grid.all_shapes():
            if not self.runner.has_run(shape) and (shape[1] == 1 or not decode_only):
                self.runner.first_run(shape)

    def first_run_next(self) -> bool:
        """Give one executable of the grid that has never run its first run (see `ModelRunner.first_run`), smallest
        first; False when every one has run. The engine calls this when it has nothing else to do."""
        shapes = sorted(self.grid.all_shapes(), key=lambda s: (s[0] * s[1], s))
        shape = next((s for s in shapes if not self.runner.has_run(s)), None)
        if shape is None:
            return False
        self.runner.first_run(shape)
        return True

    def cancel(self, seq: Request) -> None:
        """End a request now (its pages and batch row are free for the next plan: a step still running that
        holds it runs before any step that reuses them, and its token is dropped)."""
        seq.abort()
        self.scheduler.finish(seq)

    @property
    def has_work(self) -> bool:
        """Requests waiting or running, or a step whose results are not fetched yet."""
        return self.scheduler.has_work or self._in_flight is not None

    def step(self) -> list[tuple[Request, GenerationOutput]]:
        """Run one iteration: schedule -> dispatch -> postprocess the step before. Returns the outputs produced;
        requests that finished have left the scheduler.

        The host overlaps the device: the next step is planned and dispatched while the one before still runs
        (decode rows read their token from the device, `StepInputs.feed`), and only then are the earlier step's
        tokens fetched and postprocessed. A request that ends with a stop token therefore runs one step more
        than it needs, whose token is dropped. When a running request needs the tokens before its next step is
        built (penalties, biases and bans read them; a grammar's next mask depends on them), the step waits for
        them first.
        """
        started = time.perf_counter()
        results: list[tuple[Request, GenerationOutput]] = []
        waited = 0.0
        if self._in_flight is not None and any(r.row.adjusts or r.logit_state is not None
                                               for r in self.scheduler.running):
            waited += self._collect(results)
        plan = self.scheduler.plan()
        launched = self._launch(plan) if not plan.empty else None
        if self._in_flight is not None:
            waited += self._collect(results)
        self._in_flight = launched
        if not self.overlap and self._in_flight is not None:
            waited += self._collect(results)
        if launched is not None or results:
            self.last_step = StepTime(time.perf_counter() - started - waited, waited)
        return results

    def _launch(self, plan: Plan) -> _Launched:
        """Dispatch the plan's steps (a prefill step, a decode step); the scheduler counts what they cache."""
        for req in plan.admitted:
            self._rows.seat(req)
        # A prompt with one token left (the rest found in the prefix cache) is a decode row that reads its token
        # from the host: it joins the decode step instead of padding a prefill step's chunk to 16.
        joined = [req for req, n in plan.prefill
                  if n == 1 and not req.prefilled_alone and req.params.embed is None and not req.images_in(1)]
        chunks = [(req, n) for req, n in plan.prefill if req not in joined]
        if any(req.images for req, _ in chunks):
            self._place_images(chunks)
        starts = [req.cached for req, _ in chunks]
        prefill, scores, hidden = self._run_prefill(chunks) if chunks else (None, None, None)
        decode = self._run_decode(plan.decode + joined) if plan.decode or joined else None
        self.scheduler.advance(plan)
        return _Launched(plan, chunks, joined, starts, prefill, scores, decode, hidden)

    def _place_images(self, chunks: list[tuple[Request, int]]) -> None:
        """Give every image among the prefill chunks a slot of the image table (`Request.image_slots`), and
        dispatch the vision encoder for those not there already."""
        wanted = [(req, i) for req, n in chunks for i in req.images_in(n)]
        slots, encode = self.images.place([req.images[i].digest for req, i in wanted])
        for (req, i), slot in zip(wanted, slots, strict=True):
            req.image_slots[i] = slot
        if encode:
            self.runner.encode_images([wanted[k][0].images[wanted[k][1]].pixels for k in encode],
                                      [slots[k] for k in encode])

    def _collect(self, results: list[tuple[Request, GenerationOutput]]) -> float:
        """Fetch the step in flight (one transfer for both of its parts), append each row's token to its request
        and its output to `results`; requests that finished leave. Returns the seconds spent waiting."""
        launched, self._in_flight = self._in_flight, None
        assert launched is not None
        waited = time.perf_counter()
        prefill, scores, decode, hidden = self.runner.fetch(
            (launched.prefill, launched.scores, launched.decode, launched.hidden))
        waited = time.perf_counter() - waited
        plan = launched.plan
        for row, ((seq, n), start) in enumerate(zip(launched.chunks, launched.starts, strict=True)):
            if seq.finished:
                continue  # cancelled while the step ran
            if scores is not None:  # a request that wants prompt logprobs is prefilled alone
                self._add_prompt_logprobs(seq, scores, start, n)
            if seq.params.embed is not None:
                seq.pool_chunk(hidden[row, :n], start)
                if start + n == len(seq.prompt):  # pooled: the token the step sampled is not wanted
                    seq.finish("stop")
                    results.append((seq, GenerationOutput(token_ids=(), embedding=seq.embedding(),
                                                          finish_reason="stop")))
            elif start + n == len(seq.prompt):  # its last prompt chunk: the step sampled its first token
                results.append((seq, self._append(seq, prefill, row)))
        for row, seq in enumerate(plan.decode):
            if not seq.finished:  # (ended by the step before, or cancelled: this token is dropped)
                results.append((seq, self._append(seq, decode, row)))
        for row, seq in enumerate(launched.joined, start=len(plan.decode)):
            if not seq.finished:  # its prompt's last token: the step sampled its first
                results.append((seq, self._append(seq, decode, row)))
        self.scheduler.retire([*(s for s, _ in plan.prefill), *plan.decode])
        return waited

    # ------------------------------------------------------------------------------------- batches

    def _batch(self, chunks: list[tuple[Request, int]], rows: int, width: int) -> StepInputs:
        """The step's inputs: `batch.padding` of the bucket, each live row gathered from the persistent batch
        (row r holds the next `n` tokens of chunk r's request, from its cached length on). A decode row's
        token is the one the device sampled for it last (`feed`); a prefill row's come from its prompt."""
        inputs = batch.padding(rows, width, self.grid.max_pages, self.runner.vocab_size)
        n, ps, table = len(chunks), self.page_size, self._rows
        at = np.fromiter((req.batch_row for req, _ in chunks), np.int32, n)
        start = np.fromiter((req.cached for req, _ in chunks), np.int32, n)
        count = np.fromiter((c for _, c in chunks), np.int32, n)
        pages = table.pages[at]  # [n, max_pages]
        inputs.batch_row[:n] = at
        inputs.past_len[:n] = start
        inputs.logit_index[:n, 0] = count - 1
        cached_pages = -(-start // ps)
        inputs.page_table[:n] = np.where(np.arange(pages.shape[1]) < cached_pages[:, None], pages, 0)
        positions = start[:, None] + np.arange(width)  # [n, width]
        page = np.take_along_axis(pages, np.minimum(positions // ps, pages.shape[1] - 1), axis=1)
        inputs.slots[:n] = np.where(np.arange(width) < count[:, None], page * ps + positions % ps, 0)
        sampling = inputs.sampling
        sampling.temperature[:n], sampling.top_p[:n], sampling.top_k[:n] = (
            table.temperature[at], table.top_p[at], table.top_k[at])
        sampling.min_p[:n], sampling.seed[:n] = table.min_p[at], table.seed[at]
        sampling.logprobs[:n] = table.logprobs[at]
        sampling.position[:n] = start + count
        for r, (req, c) in enumerate(chunks):
            if width > 1 or req.in_prefill:
                inputs.tokens[r, :c] = req.tokens[req.cached : req.cached + c]
                for i in req.images_in(c) if req.images else ():  # soft token j of the image in slot s: V + s M + j
                    first, stop = req.image_spans[i]
                    a, b = max(first, req.cached), min(stop, req.cached + c)
                    base = self.runner.vocab_size + req.image_slots[i] * self.runner.tokens_per_image - first
                    inputs.tokens[r, a - req.cached : b - req.cached] = np.arange(a, b) + base
            else:
                inputs.feed[r] = True
            if req.row.adjusts:
                self._write_adjustments(req, r, inputs.adjust)
            if req.logit_state is not None and req.cached + c >= len(req.prompt):  # the row samples a token
                req.logit_state.fill_bitmask(inputs.adjust.allowed, r)
        return inputs

    def _write_adjustments(self, req: Request, r: int, adjust: LogitAdjustments) -> None:
        """Row r's logit edits: its biases, its bans (min_tokens), and the tokens its penalties apply to, the most
        recently generated distinct ones first, then the prompt's, as `ADJUST_SLOTS` allows. Reads the
        request's running counts; nothing is rebuilt from its whole context."""
        p, row = req.params, req.row
        adjust.presence[r], adjust.frequency[r], adjust.repetition[r] = row.presence, row.frequency, row.repetition
        edits: dict[int, float] = dict(row.logit_bias)
        if req.generated < p.min_tokens:
            ended_by = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
            edits.update(dict.fromkeys(ended_by, BANNED))
        slots = list(edits)
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            recent = [t for t in reversed(req.counts) if t not in edits]  # counts keep the order of last use
            slots += recent[: ADJUST_SLOTS - len(slots)]
            if p.repetition_penalty != 1.0:
                slots += [t for t in req.prompt_tokens if t not in edits and t not in req.counts]
        slots = slots[:ADJUST_SLOTS]
        n = len(slots)
        adjust.ids[r, :n] = slots
        adjust.bias[r, :n] = [edits.get(t, 0.0) for t in slots]
        adjust.count[r, :n] = [req.counts.get(t, 0) for t in slots]
        if p.repetition_penalty != 1.0:
            adjust.seen[r, :n] = [t in req.counts or t in req.prompt_set for t in slots]

    def _run_prefill(
        self, chunks: list[tuple[Request, int]]
    ) -> tuple[SampleOutput, PromptScores | None, jax.Array | None]:
        """The prefill step; with it the prompt scores of its one row that wants them, and its hidden states
        when a row embeds (all fetched with the step's tokens)."""
        shape = self.grid.prefill_bucket(len(chunks), max(n for _, n in chunks))
        assert shape is not None, "the scheduler plans only prefill steps the grid holds"
        rows, width = shape
        out, hidden = self.runner.step(self._batch(chunks, rows, width))
        embeds = hidden if any(req.params.embed is not None for req, _ in chunks) else None
        seq, n = chunks[0]
        if seq.params.prompt_logprobs is None:
            return out, None, embeds  # (a request that wants them is the step's only row)
        # Position p's logits score prompt token p + 1; the chunk's last position scores the first output
        # token instead, which is not part of the prompt.
        targets = np.zeros((1, width), np.int32)
        nxt = seq.prompt[seq.cached + 1 : seq.cached + n + 1]
        targets[0, : len(nxt)] = nxt
        return out, self.runner.score(hidden, targets), embeds

    def _add_prompt_logprobs(self, req: Request, scores: PromptScores, start: int, n: int) -> None:
        """The logprobs of prompt tokens start + 1 .. start + n (the chunk's positions score the next token)."""
        k = req.params.prompt_logprobs or 0
        count = min(n, len(req.prompt) - 1 - start)
        for i in range(count):
            top = tuple(zip(scores.top_ids[0, i, :k].tolist(), scores.top_logprobs[0, i, :k].tolist(), strict=True))
            req.prompt_logprobs.append(
                TokenLogprob(token_id=req.prompt[start + i + 1], logprob=float(scores.logprobs[0, i]), top=top)
            )

    def _run_decode(self, seqs: list[Request]) -> SampleOutput:
        return self.runner.step(self._batch([(s, 1) for s in seqs], self.grid.batch_bucket(len(seqs)), 1))[0]

    # --------------------------------------------------------------------------------- postprocess

    def _append(self, seq: Request, out: SampleOutput, row: int) -> GenerationOutput:
        params = seq.params
        token = int(out.tokens[row])
        seq.tokens.append(token)
        if seq.logit_state is not None and token not in self.eos_token_ids:
            seq.logit_state.advance(token)  # the mask allowed only what the grammar allows
        if seq.row.adjusts:
            seq.counts[token] = seq.counts.pop(token, 0) + 1  # re-inserted: the dict's order is the order of last use
        logprobs = None
        if params.logprobs is not None:
            k = params.logprobs
            top = tuple(zip(out.top_ids[row, :k].tolist(), out.top_logprobs[row, :k].tolist(), strict=True))
            logprobs = (TokenLogprob(token_id=token, logprob=float(out.logprobs[row]), top=top),)
        prompt_logprobs = None
        if params.prompt_logprobs is not None and seq.generated == 1:
            prompt_logprobs = (None, *seq.prompt_logprobs)
        reason = check_stop(seq, eos_token_ids=self.eos_token_ids, max_length=self.scheduler.max_length)
        return GenerationOutput(token_ids=(token,), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                finish_reason=reason, stop_token=seq.stop_token)
