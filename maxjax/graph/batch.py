"""The step's batch: every per-row input the graphs take, declared once.

Each `Field` is one per-row array: its name (a `StepInputs` field, or `sampling.` / `adjust.` and a field of
`SamplingArrays` / `LogitAdjustments`), its shape after the row axis (`TOKENS`, the step's new tokens per row;
`PAGES`, the page table's width; `WORDS`, a packed mask over the vocabulary; or a number), its dtype and the value a padding row holds. From this one table
come the abstract shapes warm-up lowers with (`abstract`) and the host buffers a step is written into, padding
included (`padding`: the engine fills in its live rows; a first run sends it as it is).

Adding an input to the graphs is one `Field` here, its field in the named tuple the graph reads it from, and its
use in the graph; `tests/test_batch.py` checks that the table and the named tuples agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np

from maxjax.graph.sampling import ADJUST_SLOTS, Arr, LogitAdjustments, SamplingArrays

TOKENS = "tokens"
PAGES = "pages"
VOCAB = "vocab"
"""As a fill value: the vocabulary size (an adjustment slot that changes nothing)."""
WORDS = "words"
"""As a size: the int32 words of a packed mask over the vocabulary, ceil(vocab / 32)."""


class StepInputs(NamedTuple):
    """One step's batch, padded to a bucket. Rows past the live ones are padding (n_new = 0)."""

    tokens: Arr
    """[B, T] int32"""
    past_len: Arr
    """[B] int32: tokens already cached for the row."""
    slots: Arr
    """[B, T] int32: where each new token's K/V goes (page * page_size + offset); padding -> page 0."""
    page_table: Arr
    """[B, P] int32: the row's pages covering its past (page 0 beyond them)."""
    logit_index: Arr
    """[B, 1] int32: which new token's logits to sample from (the row's last)."""
    batch_row: Arr
    """[B] int32: the request's row in the persistent batch (1..max_batch_size; padding -> 0, the scratch row):
    where the step leaves the token it samples for the row, in the device's `last_tokens`."""
    feed: Arr
    """[B] bool: the row's one new token is the one the device sampled for its batch row last (a decode row):
    the host need not know it, so the step can be dispatched before the previous one's tokens are fetched."""
    sampling: SamplingArrays
    """Per-row sampling arrays."""
    adjust: LogitAdjustments
    """Per-row penalties, biases and banned tokens."""


@dataclass(frozen=True)
class Field:
    name: str
    shape: tuple[int | str, ...]
    """The per-row shape: numbers, `TOKENS` or `PAGES`."""
    dtype: Any
    fill: Any
    """What a padding row holds (`VOCAB`: the vocabulary size)."""


FIELDS: tuple[Field, ...] = (
    Field("tokens", (TOKENS,), np.int32, 0),
    Field("past_len", (), np.int32, 0),
    Field("slots", (TOKENS,), np.int32, 0),  # padding writes go to page 0, the scratch page
    Field("page_table", (PAGES,), np.int32, 0),
    Field("logit_index", (1,), np.int32, 0),
    Field("batch_row", (), np.int32, 0),  # padding rows leave their token in row 0, the scratch row
    Field("feed", (), np.bool_, False),
    Field("sampling.temperature", (), np.float32, 0.0),
    Field("sampling.top_p", (), np.float32, 1.0),
    Field("sampling.top_k", (), np.int32, 0),
    Field("sampling.min_p", (), np.float32, 0.0),
    Field("sampling.seed", (), np.uint32, 0),
    Field("sampling.position", (), np.int32, 0),
    Field("sampling.logprobs", (), np.bool_, False),
    Field("adjust.ids", (ADJUST_SLOTS,), np.int32, VOCAB),
    Field("adjust.count", (ADJUST_SLOTS,), np.float32, 0.0),
    Field("adjust.seen", (ADJUST_SLOTS,), np.bool_, False),
    Field("adjust.bias", (ADJUST_SLOTS,), np.float32, 0.0),
    Field("adjust.presence", (), np.float32, 0.0),
    Field("adjust.frequency", (), np.float32, 0.0),
    Field("adjust.repetition", (), np.float32, 1.0),
    Field("adjust.allowed", (WORDS,), np.int32, -1),  # every bit set: every token allowed
)


def _build(make: Callable[[Field, tuple[int, ...]], Any], rows: int, tokens: int, pages: int,
           vocab_size: int) -> StepInputs:
    sizes = {TOKENS: tokens, PAGES: pages, WORDS: -(-vocab_size // 32)}
    groups: dict[str, dict[str, Any]] = {"": {}, "sampling": {}, "adjust": {}}
    for field in FIELDS:
        group, _, name = field.name.rpartition(".")
        shape = (rows, *(sizes[d] if isinstance(d, str) else d for d in field.shape))
        groups[group][name] = make(field, shape)
    return StepInputs(**groups[""], sampling=SamplingArrays(**groups["sampling"]),
                      adjust=LogitAdjustments(**groups["adjust"]))


def abstract(rows: int, tokens: int, pages: int, vocab_size: int) -> StepInputs:
    """Shape-only inputs of one bucket, for ahead-of-time lowering (no memory is touched)."""
    return _build(lambda field, shape: jax.ShapeDtypeStruct(shape, field.dtype), rows, tokens, pages, vocab_size)


def padding(rows: int, tokens: int, pages: int, vocab_size: int) -> StepInputs:
    """Host arrays of one bucket, every row padding: the engine writes its live rows into them."""
    def make(field: Field, shape: tuple[int, ...]) -> np.ndarray:
        return np.full(shape, vocab_size if field.fill == VOCAB else field.fill, field.dtype)

    return _build(make, rows, tokens, pages, vocab_size)
