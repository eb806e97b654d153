"""`max generate`: one prompt through the same engine step the server runs, streamed to stdout."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from maxjax.config import CompileCacheConfig, KVCacheConfig, PipelineConfig, SchedulerConfig
from maxjax.devices import DeviceSpec
from maxjax.errors import UserError
from maxjax.hub import resolve_model
from maxjax.pipeline import open_checkpoint
from maxjax.registry import Registry
from maxjax.serve.protocol import GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from maxjax.graph.buckets import BucketGrid


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float


def generate(
    *, model: str | None, prompt: str, chat: bool, params: SamplingParams, devices: str | None = None,
    quantization_encoding: str | None = None, revision: str | None = None, stream: bool = True,
    registry: Registry | None = None,
) -> GenerateResult:
    spec = DeviceSpec.parse(devices)
    # The files are read and checked before JAX is imported: a broken model is an error at once.
    checkpoint = open_checkpoint(
        resolve_model(model, revision=revision, quantization_encoding=quantization_encoding), registry
    )
    from maxjax.serve.launch import build_engine
    from maxjax.serve.protocol import RequestRejected

    selected = spec.select()
    tok = checkpoint.tokenizer
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tok.encode(text)
    else:
        prompt_ids = tok.encode(prompt, add_special_tokens=True)
    if not prompt_ids:
        prompt_ids = [tok.bos_token_id if tok.bos_token_id is not None else 0]
    max_length = max(len(prompt_ids) + params.max_tokens, 16)
    config = PipelineConfig(
        scheduler=SchedulerConfig(max_batch_size=1, max_length=max_length),
        kv_cache=KVCacheConfig(num_pages=-(-max_length // 16) + 1),
        compile_cache=CompileCacheConfig(enabled=False),  # one-off shapes: keep them out of the server's cache
    )

    def used(grid: BucketGrid) -> list[tuple[int, int, int]]:
        """The buckets this request will use, compiled before the clock starts (the server compiles its grid)."""
        shapes = {(1, grid.chunk_bucket(min(len(prompt_ids), grid.prefill_chunk)), grid.max_pages),
                  (1, 1, grid.max_pages)}
        if len(prompt_ids) > grid.prefill_chunk:
            shapes.add((1, grid.prefill_chunk, grid.max_pages))
        return sorted(shapes)

    core, _ = build_engine(checkpoint, selected, config, shapes=used)
    try:
        core.add(GenerationRequest("generate", tuple(prompt_ids), params))
    except RequestRejected as e:
        raise UserError(str(e)) from None
    detok = tok.detokenizer()
    start = time.perf_counter()
    first = None
    ids: list[int] = []
    pieces: list[str] = []
    while core.has_work:
        for _, out in core.step():
            if first is None:
                first = time.perf_counter()
            for token in out.token_ids:
                ids.append(token)
                if out.stop_token is not None and token == out.token_ids[-1]:
                    continue  # the token that ended it (end-of-sequence, a stop id) is not text
                piece = detok.add(token)
                pieces.append(piece)
                if stream and piece:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
    tail = detok.flush()
    pieces.append(tail)
    if stream:
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()
    end = time.perf_counter()
    first = first or end
    decode_rate = (len(ids) - 1) / (end - first) if len(ids) > 1 and end > first else 0.0
    return GenerateResult("".join(pieces), ids, len(prompt_ids), first - start, decode_rate)
