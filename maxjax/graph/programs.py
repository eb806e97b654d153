"""The programs the runner compiles, as pure functions of the model's flat parameters: one step (`step`), the
vision encoder writing the image table (`encode`), prompt logprobs from a prefill's hidden states (`score`).

Each takes the NNX graph definition and the state's tree definition as static arguments and the parameters as a
flat list (`graph/runner.py` says why), merges the model, and runs it; `ModelRunner` jits, compiles and calls
them, one executable per graph kind and shape.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from maxjax.graph.batch import StepInputs
from maxjax.graph.sampling import LOGPROB_FLOOR, TOP_LOGPROBS, SampleOutput, adjust_logits, sample
from maxjax.models.layers import KVCache, write_kv


def step(
    graphdef: nnx.GraphDef, treedef: Any, params: list[jax.Array], cache: KVCache, last_tokens: jax.Array,
    inputs: StepInputs, images: jax.Array | None = None,
) -> tuple[KVCache, jax.Array, SampleOutput, jax.Array]:
    model: Any = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    # A fed row's token is the one the device sampled for its batch row in an earlier step: the host dispatches
    # a decode step without waiting for the previous step's tokens.
    tokens = jnp.where(inputs.feed[:, None], last_tokens[inputs.batch_row][:, None], inputs.tokens)
    if images is not None and tokens.shape[1] > 1:  # a prefill step of a model that takes images
        hidden, new_k, new_v = forward_with_images(model, tokens, images, cache, inputs)
    else:
        hidden, new_k, new_v = model.forward(tokens, cache, inputs.page_table, inputs.past_len)
    raw = model.logits(jnp.take_along_axis(hidden, inputs.logit_index[:, :, None], axis=1)[:, -1])
    # The last layer's reads of the pool feed only the logits. Unless the write visibly depends on them, XLA
    # cannot prove that every read comes before it and copies the whole donated pool (twice) every step.
    # An optimization barrier does not count as a dependency there; arithmetic does (nothing exceeds +inf,
    # so this adds exactly 0).
    after_reads = (raw[0, 0] > jnp.inf).astype(new_k.dtype)
    cache = write_kv(cache, new_k + after_reads, new_v + after_reads, inputs.slots)
    out = sample(adjust_logits(raw, inputs.adjust), inputs.sampling, raw)
    return cache, last_tokens.at[inputs.batch_row].set(out.tokens), out, hidden


def forward_with_images(model: Any, tokens: jax.Array, images: jax.Array, cache: KVCache,
                         inputs: StepInputs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward pass of a prefill step whose tokens may name image soft tokens: id V + s * M + j (V the
    vocabulary) is soft token j of the image in slot s of the image table [S, M, D] (`ModelRunner.encode_images`
    wrote it). Those positions take the soft token as their embedding, and the tokens of one image attend to
    each other both ways (`image_block`); every other position is the text model's own."""
    vocab = model.embed.vocab_size
    slots, m, d = images.shape
    is_image = tokens >= vocab
    index = jnp.clip(tokens - vocab, 0, slots * m - 1)
    text = model.embed_input(jnp.where(is_image, 0, tokens))
    embeds = jnp.where(is_image[..., None], images.reshape(-1, d)[index].astype(text.dtype), text)
    block = jnp.where(is_image, index // m + 1, 0)
    return model.forward(None, cache, inputs.page_table, inputs.past_len, embeds=embeds, image_block=block)


def encode(graphdef: nnx.GraphDef, treedef: Any, params: list[jax.Array], images: jax.Array, pixels: jax.Array,
            slots: jax.Array) -> jax.Array:
    """The image table with the soft tokens of `pixels` [N, C, H, W] written at `slots` [N]."""
    model: Any = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    return images.at[slots].set(model.vision(pixels).astype(images.dtype))


def score(graphdef: nnx.GraphDef, treedef: Any, params: list[jax.Array], hidden: jax.Array,
           targets: jax.Array) -> PromptScores:
    """Logprobs of `targets` [1, T] (each position's next prompt token) from a prefill's hidden states."""
    model: Any = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))
    logits = model.logits(hidden)  # [1, T, V]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
    top, top_ids = jax.lax.top_k(logits, TOP_LOGPROBS)
    return PromptScores(
        logprobs=jnp.maximum(chosen, LOGPROB_FLOOR),
        top_ids=top_ids.astype(jnp.int32),
        top_logprobs=jnp.maximum(top - log_z[..., None], LOGPROB_FLOOR),
    )


class PromptScores(NamedTuple):
    logprobs: jax.Array
    """[1, T]"""
    top_ids: jax.Array
    """[1, T, TOP_LOGPROBS]"""
    top_logprobs: jax.Array
