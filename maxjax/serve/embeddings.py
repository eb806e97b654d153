"""`POST /v1/embeddings`: one vector per input, pooled from the model's final hidden states.

The path: validate the body (`EmbeddingRequest`) → tokenize each input (a string with the tokenizer's own
special tokens, as sentence-transformers and transformers do; token ids as given) → one engine request per
input, prefill only (`SamplingParams.embed`: the engine pools each prefill chunk's hidden states on the host and
ends the request without generating; embedding requests batch with each other and with chat in the same prefill
steps) → `dimensions` (Matryoshka: the first N components, then normalized again) → floats, or base64 of
little-endian float32 (`encoding_format`).

Pooling is the model's (`Engine.pooling`: its sentence-transformers declaration, else the last token,
normalized). Errors as on OpenAI: an empty input or an empty string is a 400; an input longer than the context
is a 400 `context_length_exceeded`; at most `MAX_INPUTS` inputs a request.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from maxjax.serve.choices import Choice, ChoiceRunner, check_model, json_response, new_id
from maxjax.serve.errors import ApiError, validation_error
from maxjax.serve.metrics import Metrics
from maxjax.serve.protocol import Engine, GenerationRequest, SamplingParams
from maxjax.serve.text import ChoiceText, TextTokenizer

MAX_INPUTS = 2048
"""Inputs one request may carry (OpenAI's limit)."""


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: Any
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> Any:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        forms = isinstance(value, str) or ids(value) or (
            isinstance(value, list) and (all(isinstance(x, str) for x in value) or all(ids(x) for x in value)))
        if not forms:
            raise ValueError("input must be a string, a list of strings, a list of token ids or a list of them")
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("input must not be empty")
        if len(items) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs in one request")
        if any(len(item) == 0 for item in items if isinstance(item, str | list)):
            raise ValueError("input must not contain empty strings or empty token lists")
        return value

    def token_inputs(self, tokenizer: TextTokenizer) -> list[list[int]]:
        """Each input as token ids; ids outside the vocabulary are a 400."""
        value = self.input
        if isinstance(value, str):
            items: list[Any] = [value]
        elif value and isinstance(value[0], int):
            items = [value]  # one input given as token ids
        else:
            items = list(value)
        out = []
        for i, item in enumerate(items):
            ids = tokenizer.encode(item, add_special_tokens=True) if isinstance(item, str) else list(item)
            bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
            if bad is not None:
                raise ApiError(f"input[{i}] has token id {bad}, outside the vocabulary (size {tokenizer.vocab_size}).",
                               param="input")  # fmt: skip
            out.append(ids)
        return out


def _vector(values: tuple[float, ...], dimensions: int | None, encoding: str) -> list[float] | str:
    vector = np.asarray(values, np.float32)
    if dimensions is not None:
        vector = vector[:dimensions]
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


async def create_embeddings(
    body: dict[str, Any], *, engine: Engine, tokenizer: TextTokenizer, model: str, metrics: Metrics, arrived: float
) -> Any:
    try:
        request = EmbeddingRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    check_model(request.model, model)
    inputs = await asyncio.to_thread(request.token_inputs, tokenizer)
    for i, ids in enumerate(inputs):
        if len(ids) >= engine.max_model_len:
            raise ApiError(
                f"This model's maximum context length is {engine.max_model_len} tokens, but input[{i}] has "
                f"{len(ids)} tokens. Shorten the input.", param="input", code="context_length_exceeded")
    request_id = new_id("embd")
    params = SamplingParams(max_tokens=1, temperature=0.0, embed=engine.pooling)
    choices = [Choice(i, GenerationRequest(f"{request_id}-{i}", tuple(ids), params), ChoiceText(tokenizer))
               for i, ids in enumerate(inputs)]  # fmt: skip
    runner = ChoiceRunner(engine, choices, metrics, arrived=arrived)
    await runner.start()
    vectors: list[tuple[float, ...] | None] = [None] * len(choices)
    async for update in runner.updates():
        if update.embedding is not None:
            vectors[update.index] = update.embedding
    if any(v is None for v in vectors):
        raise RuntimeError("the engine ended an embedding request without its vector")
    width = len(vectors[0] or ())
    if request.dimensions is not None and request.dimensions > width:
        raise ApiError(f"dimensions {request.dimensions} is more than this model's {width}.", param="dimensions")
    prompt_tokens = sum(len(ids) for ids in inputs)
    data = [{"object": "embedding", "index": i, "embedding": _vector(v, request.dimensions, request.encoding_format)}
            for i, v in enumerate(vectors) if v is not None]  # fmt: skip
    return json_response({"object": "list", "data": data, "model": model,
                          "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})

