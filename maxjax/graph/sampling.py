"""Sampling inside the step graph: every setting is a per-row array, so no request's settings recompile anything.

Greedy rows take the argmax of the full vocabulary. Sampled rows draw from the `CANDIDATES` most likely tokens
(top-k, top-p and min-p are applied within them): a full-vocabulary sort costs 9 ms at batch 1 and 290 ms at
batch 32 on a 2-core CPU, and the mass beyond the 256th token is negligible for any top-p < 1 in practice.
The logprobs returned are those of the model's own distribution (before temperature and truncation), as
OpenAI and vLLM report them.

Randomness is per row and per position: the key is `fold_in(key(seed), position)`, so a request with a seed
draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from maxjax.graph.bitmask import unpack_bitmask
from maxjax.serve.protocol import LOGPROB_FLOOR

CANDIDATES = 256
"""Tokens considered when sampling with temperature > 0."""
TOP_LOGPROBS = 20
"""Alternatives returned with every sampled token (OpenAI allows up to 20)."""
ADJUST_SLOTS = 512
"""Tokens per row whose logits a request can adjust in one step: its logit_bias entries, the tokens it may not
yet end on (min_tokens), and the tokens penalties apply to (the most recent distinct ones, when there are more)."""
BANNED = -1e30


Arr = Any
"""A jax.Array, a NumPy array or a jax.ShapeDtypeStruct: the same tuples carry host batches, device arrays and
the abstract shapes warm-up lowers with."""


class SamplingArrays(NamedTuple):
    temperature: Arr
    """[B] float32; 0 = greedy."""
    top_p: Arr
    """[B] float32 in (0, 1]."""
    top_k: Arr
    """[B] int32; 0 = off."""
    min_p: Arr
    """[B] float32; 0 = off."""
    seed: Arr
    """[B] uint32."""
    position: Arr
    """[B] int32: position of the token being sampled (folded into the row's key)."""
    logprobs: Arr
    """[B] bool: the row's request asked for logprobs (a step computes them only when one of its rows did)."""


class LogitAdjustments(NamedTuple):
    """Sparse per-row edits of the logits: penalties, logit_bias and banned tokens, in `ADJUST_SLOTS` slots.

    Unused slots hold the vocabulary size as their id and change nothing.
    """

    ids: Arr
    """[B, ADJUST_SLOTS] int32 token ids."""
    count: Arr
    """[B, ADJUST_SLOTS] float32: times the token was generated (presence / frequency penalties)."""
    seen: Arr
    """[B, ADJUST_SLOTS] bool: the token is in the prompt or the output (repetition penalty)."""
    bias: Arr
    """[B, ADJUST_SLOTS] float32 added to the logit (logit_bias; BANNED for tokens not allowed yet)."""
    presence: Arr
    """[B] float32"""
    frequency: Arr
    """[B] float32"""
    repetition: Arr
    """[B] float32; 1 = off."""
    allowed: Arr
    """[B, ceil(V / 32)] int32: the tokens a row's grammar allows next, packed (bit t % 32 of word t // 32;
    `serve/grammar.py` fills it); all bits set for an unconstrained row."""


def adjust_logits(logits: jax.Array, adj: LogitAdjustments) -> jax.Array:
    """Apply penalties (vLLM's definitions: repetition divides positive and multiplies negative logits of seen
    tokens; presence and frequency subtract from generated ones), biases and grammar masks to logits [B, V]."""
    b, vocab = logits.shape
    ids = jnp.asarray(adj.ids)

    def edit(logits: jax.Array) -> jax.Array:
        vals = jnp.take_along_axis(logits, jnp.minimum(ids, vocab - 1), axis=1)
        rep = jnp.asarray(adj.repetition)[:, None]
        vals = jnp.where(adj.seen, jnp.where(vals > 0, vals / rep, vals * rep), vals)
        count = jnp.asarray(adj.count)
        vals = vals - jnp.asarray(adj.presence)[:, None] * (count > 0) - jnp.asarray(adj.frequency)[:, None] * count
        vals = vals + adj.bias
        return logits.at[jnp.arange(b)[:, None], ids].set(vals, mode="drop")

    # The edits, and the grammar's mask, only in steps where a row has some (`lax.cond` runs one branch): the
    # scatter needs its own copy of the logits (the raw ones stay for logprobs), 0.15 ms of a 7 ms step at batch 1.
    logits = jax.lax.cond(jnp.any(ids < vocab), edit, lambda x: x, logits)
    allowed = jnp.asarray(adj.allowed)
    return jax.lax.cond(jnp.any(allowed != -1),
                        lambda x: jnp.where(unpack_bitmask(allowed, vocab), x, BANNED), lambda x: x, logits)


class SampleOutput(NamedTuple):
    tokens: jax.Array
    """[B] int32"""
    logprobs: jax.Array
    """[B] float32: log p(token) under the model."""
    top_ids: jax.Array
    """[B, TOP_LOGPROBS] int32, best first."""
    top_logprobs: jax.Array
    """[B, TOP_LOGPROBS] float32"""


def sample(logits: jax.Array, params: SamplingArrays, raw: jax.Array) -> SampleOutput:
    """logits [B, V] float32 (after `adjust_logits`) -> one token per row; logprobs come from `raw`, the
    model's own logits.

    What no row of the step asks for is not computed: the candidates (a top-k over the vocabulary, as costly as
    the rest of sampling together) only when a row samples with a temperature, the logprobs and their top
    alternatives only when a row asked for them (zeros otherwise). `lax.cond` runs one branch, so one
    executable serves every mix."""
    tokens = jax.lax.cond(jnp.any(params.temperature > 0), _draw, _best, logits, params).astype(jnp.int32)

    def scored(raw: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        log_z = jax.nn.logsumexp(raw, axis=-1, keepdims=True)
        logprobs = jnp.take_along_axis(raw, tokens[:, None], axis=1)[:, 0] - log_z[:, 0]
        top_raw, top_ids = jax.lax.top_k(raw, TOP_LOGPROBS)
        return (jnp.maximum(logprobs, LOGPROB_FLOOR), top_ids.astype(jnp.int32),
                jnp.maximum(top_raw - log_z, LOGPROB_FLOOR))

    def unscored(raw: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b = raw.shape[0]
        return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, TOP_LOGPROBS), jnp.int32),
                jnp.zeros((b, TOP_LOGPROBS), jnp.float32))

    logprobs, top_ids, top_logprobs = jax.lax.cond(jnp.any(params.logprobs), scored, unscored, raw, tokens)
    return SampleOutput(tokens=tokens, logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)


def _best(logits: jax.Array, params: SamplingArrays) -> jax.Array:
    """Every row's token when every row is greedy."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _draw(logits: jax.Array, params: SamplingArrays) -> jax.Array:
    """Each row's token: drawn from its candidates with temperature, top-k, top-p and min-p; a greedy row's
    (temperature 0) the best."""
    n_cand = min(CANDIDATES, logits.shape[1])
    cand_logits, cand_ids = jax.lax.top_k(logits, n_cand)  # [B, C], best first
    # Without the barrier XLA fuses top_k into each consumer and recomputes it (311 ms vs 18 ms at batch 32). Its
    # operands go in the reverse of top_k's order: on a mesh of several devices XLA otherwise folds them back into
    # top_k's own tuple, and its top-k decomposition aborts on a top_k used by anything but tuple elements.
    cand_ids, cand_logits = jax.lax.optimization_barrier((cand_ids, cand_logits))

    temperature = jnp.maximum(params.temperature, 1e-5)[:, None]
    scaled = cand_logits / temperature
    probs = jax.nn.softmax(scaled, axis=-1)
    rank = jnp.arange(n_cand)[None, :]
    keep = (params.top_k[:, None] <= 0) | (rank < params.top_k[:, None])
    # top-p: keep the smallest prefix whose mass reaches top_p (the best token always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < params.top_p[:, None]
    keep &= probs >= params.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)

    def row_noise(seed: jax.Array, position: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), position)
        return jax.random.gumbel(key, (n_cand,), jnp.float32)

    noise = jax.vmap(row_noise)(params.seed, params.position)
    choice = jnp.argmax(jnp.where(keep, scaled + noise, -jnp.inf), axis=-1)
    sampled = jnp.take_along_axis(cand_ids, choice[:, None], axis=1)[:, 0]
    return jnp.where(params.temperature > 0, sampled, cand_ids[:, 0])
