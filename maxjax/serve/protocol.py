"""What the HTTP layer and the engine say to each other.

The HTTP layer turns an OpenAI request into a `GenerationRequest` (token ids + `SamplingParams`), submits it
with `Engine.generate`, and iterates the `GenerationOutput`s that come back, one per engine step in which the
request produced something. Text (detokenization, stop strings) is the HTTP layer's business; the engine deals
only in token ids. Closing the iterator early (a stop string matched, the client went away) cancels the
request: the engine frees its batch row and KV pages at the next step boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from maxjax.serve.grammar import GrammarSpec

INT32_MAX = 2**31 - 1
"""The largest value a per-row int32 step array holds: the schemas and admission bound counts by it."""

LOGPROB_FLOOR = -9999.0
"""The lowest logprob that crosses this boundary: the graphs clamp to it and so does the HTTP side (for engines
that do not); -inf and NaN are not JSON, and OpenAI itself reports -9999 for 'never'."""

FinishReason = Literal["stop", "length", "tool_calls", "abort"]
"""Why a request ended: a stop or end-of-sequence token (or a stop string, on the HTTP side), its length limit,
a tool call (to come), or cancelled (`abort`, never sent to a client)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; every field becomes a per-row array in the decode graph."""

    max_tokens: int = 16
    """Most tokens to generate (the engine also stops at the context length)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""
    min_p: float = 0.0
    seed: int | None = None
    """Same seed and parameters, same tokens (for a request run alone)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    """End-of-sequence and stop tokens are suppressed until this many tokens are generated."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (besides the model's end-of-sequence ids)."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no logprobs. k >= 0: the sampled token's logprob plus the k most likely alternatives."""
    prompt_logprobs: int | None = None
    """None: none. k >= 0: logprobs of every prompt token after the first (for `echo` with `logprobs`)."""
    grammar: GrammarSpec | None = None
    """What the answer must match (`serve/grammar.py`): a JSON object or schema, a regex, a Lark grammar."""
    embed: Pooling | None = None
    """An embedding request: the prompt is prefilled (no token is generated) and its one output carries the
    pooled hidden state."""


@dataclass(frozen=True)
class Pooling:
    """How an embedding request's hidden states (the final-normed ones) become one vector."""

    kind: Literal["last", "mean", "cls"] = "last"
    """The last token's (decoder embedders: Qwen3 Embedding, e5-mistral), the mean over the tokens, or the
    first token's."""
    normalize: bool = True
    """Scaled to unit length."""


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One image of a request, decoded and preprocessed on the HTTP side (`serve/images.py`)."""

    pixels: Any
    """np.ndarray [C, H, W] float32: resized, rescaled and normalized as the model's processor says."""
    digest: bytes
    """A hash of `pixels` (16 bytes): the same picture is the same image to the encoder cache and the prefix
    cache, however it was sent."""


@dataclass(frozen=True)
class VisionInfo:
    """What the HTTP side needs to send images to a model that takes them (`Engine.vision`)."""

    image_token_id: int
    """The placeholder each of an image's soft tokens takes in the prompt."""
    boi_token_id: int
    """Opens an image's block (Gemma 3's `<start_of_image>`)."""
    eoi_token_id: int
    tokens_per_image: int
    processing: Any
    """`gemma3_vision.ImageProcessing`: the tower's input size and the normalization."""
    max_images: int
    """The most images one request may carry (`--max-images-per-request`)."""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    images: tuple[ImageInput, ...] = ()
    """Images in prompt order. `prompt_ids` holds, for each, `VisionInfo.tokens_per_image` consecutive
    `image_token_id`s (inside its boi ... eoi block) where its soft tokens go."""


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, logprob) of the most likely tokens at this position, best first."""


@dataclass(frozen=True)
class GenerationOutput:
    """What one request got from one engine step."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One entry per token in `token_ids` when the request asked for logprobs."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """Only on the first output, when asked: one entry per prompt token, None for the first."""
    finish_reason: FinishReason | None = None
    """Set on the last output of a request: 'stop' (an end-of-sequence or stop token id) or 'length'."""
    stop_token: int | None = None
    """With 'stop': the stop or end-of-sequence token that ended it (its text is not part of the answer unless
    `include_stop_str_in_output`)."""
    embedding: tuple[float, ...] | None = None
    """An embedding request's vector (its only output, with no tokens)."""


class Engine(Protocol):
    """The device side as the HTTP layer sees it."""

    model_name: str
    max_model_len: int
    pooling: Pooling
    """How this model's embeddings are pooled (its checkpoint's declaration, else the last token, normalized)."""
    vision: VisionInfo | None
    """How this model takes images; None for a text-only model."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Submit a request; iterate its outputs. Raises `QueueFullError` when the queue is full and
        `RequestRejected` when the request itself cannot run, before anything is queued."""
        ...

    def open_requests(self) -> int:
        """Requests submitted and not yet finished or cancelled."""
        ...

    def abort_all(self) -> None:
        """End every open request with `Aborted`, and refuse new ones with it (the server is shutting down)."""
        ...

    def stop(self) -> None:
        """Finish what the device is doing and stop; called once the HTTP server has shut down."""
        ...


class RequestRejected(ValueError):
    """The engine refused one request when it was submitted: a value outside the range of the step array it
    goes into, or a request that can never fit. The HTTP layer answers 400; nothing else is affected."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Aborted(Exception):
    """The engine ended the request before it finished: the server is shutting down."""


class QueueFullError(Exception):
    """The engine's queue is full: the HTTP layer answers 429 with Retry-After."""
