"""The Quart app: OpenAI-compatible routes over an `Engine`, plus health, version, metrics and the chat page
(`/`, serve/web; open like /health: only `/v1/...`, `/tokenize` and `/detokenize` take the API key).

The path of a request:

1. `before_request`: on `/v1/...`, `/tokenize` and `/detokenize`, the API key (401 without `Authorization: Bearer
   <key>`, compared in constant time), then readiness (503 with Retry-After while the model loads in the
   background).
2. The route reads the body as JSON (`_read_json`: 400 for malformed JSON, NaN/Infinity, a non-object body or a
   Content-Type other than JSON) and hands it to `chat.create_chat_completion` / `completions.create_completion`
   (or `responses.create_response`, `tokenize.tokenize` / `detokenize`),
   which validate it, tokenize, run the choices on the engine and answer JSON or an SSE stream.
3. Errors are OpenAI error objects (`{"error": {message, type, param, code}}`) whatever raised them: `ApiError`
   with its status, werkzeug's HTTP errors (unknown route 404, wrong method 405, body too large 413) with
   theirs, and anything else a 500 `server_error` (logged). Bad input is always a 4xx: the `openai` client
   retries 5xx, which would hide the mistake.
4. `after_request`: requests counted by route and status.

Policy for request fields (see schemas.py for every field and range):

- Unknown fields are a 400 `Unrecognized request argument supplied: <name>`, with `param` naming it (also inside
  `messages[i]` and `stream_options`), as on OpenAI's own API and MAX: a typo (`max_token`, `temprature`) must
  not be silently ignored. Fields that
  OpenAI defines and that change nothing about the tokens (`user`, `metadata`, `store`, `service_tier`,
  `prompt_cache_key`, `safety_identifier`, `reasoning_effort`,
  `stream_options.include_obfuscation`) are accepted and ignored. The extensions `top_k`, `min_p`,
  `repetition_penalty`, `min_tokens`, `stop_token_ids`, `ignore_eos`, `include_stop_str_in_output` (and, for
  chat, `chat_template_kwargs`) are honoured; the `openai` client sends them with `extra_body`.
- `response_format`, `structured_outputs`, `tools` and `tool_choice` constrain or parse the answer (grammar.py,
  tool_use.py). Known fields we cannot honour are a 400 saying so: the deprecated `functions`, audio/file
  content parts (and image parts, for a model that takes no images), completions `suffix`, `best_of` other than
  `n`.
- Images (`image_url` parts; `input_image` on /v1/responses) come inline as base64 data URLs, or as local files
  under `--allowed-image-roots`; remote URLs are never fetched. Their limits (`config.ImageLimits`: bytes,
  pixels, the body size; images per request from the engine) are 400s naming the image (serve/images.py).
- `n` is capped at `schemas.MAX_N` (16): each choice takes a batch row. Stop strings: at most 4; empty ones are
  dropped. `max_completion_tokens` wins over `max_tokens`; without either, chat may use the rest of the context
  and completions get 16 tokens (both cut to what fits); asking for more than fits is a 400
  `context_length_exceeded`, as on OpenAI.
- `model` may be left out (the served model is used); any other id than the served one is a 404
  `model_not_found`.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from quart import Quart, Response, g, request
from werkzeug.exceptions import HTTPException

import maxjax
from maxjax.config import ServerConfig
from maxjax.serve.chat import create_chat_completion
from maxjax.serve.choices import json_response
from maxjax.serve.completions import create_completion
from maxjax.serve.embeddings import create_embeddings
from maxjax.serve.errors import (
    LOADING_RETRY_AFTER_S,
    ApiError,
    internal_error,
    loading,
    model_error,
    shutting_down,
)
from maxjax.serve.metrics import Metrics
from maxjax.serve.protocol import Engine
from maxjax.serve.responses import ResponseStore, create_response
from maxjax.serve.schemas import ModelCard
from maxjax.serve.text import TextTokenizer
from maxjax.serve.tokenize import detokenize, tokenize
from maxjax.serve.tool_use import ChatFeatures
from maxjax.serve.web import add_routes as add_web_routes

logger = logging.getLogger(__name__)

GATED_PATHS = ("/tokenize", "/detokenize")
"""Routes outside `/v1/` that are behind the API key and readiness too."""



@dataclass
class ServingState:
    """What the routes serve from. The model loads in a background thread after the server is up: the loader
    fills in `engine` and `tokenizer`, then calls `set_ready()`; until then `/health` and `/v1` answer 503."""

    model_name: str
    """The id clients send as `model`."""
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    tokenizer: TextTokenizer | None = None
    model_root: str | None = None
    """`--model` as the user gave it (an HF id, or the path as typed), shown as `root` in /v1/models; None
    (the default model) shows the model's name. Never a path the server resolved on its own disk."""
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    draining: bool = False
    """Set on SIGTERM / Ctrl-C (`server.py`): /v1 and /health answer 503 while open requests finish."""
    serves_embeddings: bool = False
    """`/v1/embeddings` is served (`--task embed`, or a checkpoint that declares its pooling)."""
    on_fatal: Callable[[str], None] | None = None
    """Set by `server.serve`: stops the server, which then exits non-zero."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set_ready(self, engine: Engine | None = None, tokenizer: TextTokenizer | None = None) -> None:
        """Start serving; call from the loader once the engine can take requests."""
        with self._lock:
            self.engine = engine or self.engine
            self.tokenizer = tokenizer or self.tokenizer
            if self.engine is None or self.tokenizer is None:
                raise ValueError("set_ready needs an engine and a tokenizer")
            self.ready = True

    def fatal(self, message: str) -> None:
        """The engine cannot go on (its loop died): log one line and take the process down rather than hang."""
        logger.error("fatal: %s", message)
        self.ready = False
        if self.on_fatal is not None:
            self.on_fatal(message)


def create_app(config: ServerConfig, state: ServingState) -> Quart:
    app = Quart("maxjax.serve")
    app.config["RESPONSE_TIMEOUT"] = None  # a long generation is not a stuck response
    app.config["MAX_CONTENT_LENGTH"] = config.images.max_body_bytes  # images come inline, as base64 data URLs
    expected_auth = f"Bearer {config.api_key}".encode() if config.api_key else None

    def serving() -> tuple[Engine, TextTokenizer]:
        engine, tokenizer = state.engine, state.tokenizer
        if not state.ready or engine is None or tokenizer is None:
            raise loading()
        return engine, tokenizer

    features: dict[int, ChatFeatures] = {}
    responses = ResponseStore()

    def chat_features(tokenizer: TextTokenizer) -> ChatFeatures:
        """The parsers for the served tokenizer (made at its first chat request; the flags were checked at start)."""
        if id(tokenizer) not in features:
            features.clear()
            features[id(tokenizer)] = ChatFeatures.for_tokenizer(
                tokenizer, tool_call_parser=config.tool_call_parser, reasoning_parser=config.reasoning_parser
            )
        return features[id(tokenizer)]

    @app.before_request
    async def _gate() -> None:
        g.arrived = time.perf_counter()  # time to first token counts from here
        if not (request.path.startswith("/v1/") or request.path in GATED_PATHS):
            return
        if state.draining:
            raise shutting_down()
        if expected_auth is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected_auth):
                raise ApiError(
                    "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                    status=401,
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        serving()

    @app.after_request
    async def _count(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        state.metrics.observe_request(rule, response.status_code)
        return response

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        return json_response(exc.body(), exc.status, exc.headers)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        kind = "invalid_request_error" if status < 500 else "server_error"
        message = exc.description or exc.name
        if status == 404:
            message = f"Unknown route {request.method} {request.path}."
        elif status == 413:
            message = (f"The request body is larger than the {config.images.max_body_bytes:,} bytes this server "
                       "takes (images inline count at their base64 size).")
        return json_response(ApiError(message, status=status, type=kind).body(), status)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        error = internal_error(exc)
        return json_response(error.body(), error.status)

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        engine, tokenizer = serving()
        body = await _read_json()
        return await create_chat_completion(
            body, engine=engine, tokenizer=tokenizer, model=state.model_name, metrics=state.metrics, arrived=_arrived(),
            features=chat_features(tokenizer), image_limits=config.images,
        )

    @app.post("/v1/completions")
    async def completions() -> Response:
        engine, tokenizer = serving()
        body = await _read_json()
        return await create_completion(
            body, engine=engine, tokenizer=tokenizer, model=state.model_name, metrics=state.metrics, arrived=_arrived()
        )

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        engine, tokenizer = serving()
        if not state.serves_embeddings:
            raise ApiError(f"This server runs {state.model_name} for text generation; start it with --task embed "
                           "to serve embeddings from it too.", param="model")
        body = await _read_json()
        return await create_embeddings(
            body, engine=engine, tokenizer=tokenizer, model=state.model_name, metrics=state.metrics, arrived=_arrived()
        )

    @app.post("/v1/responses")
    async def create_responses() -> Response:
        engine, tokenizer = serving()
        body = await _read_json()
        return await create_response(
            body, engine=engine, tokenizer=tokenizer, model=state.model_name, metrics=state.metrics,
            arrived=_arrived(), features=chat_features(tokenizer), store=responses, image_limits=config.images,
        )

    @app.get("/v1/responses/<response_id>")
    async def get_response(response_id: str) -> Response:
        if request.args.get("stream", "false").lower() == "true":
            raise ApiError("Streaming a stored response again is not supported: retrieve it whole.", param="stream")
        return json_response(responses.get(response_id).response)

    @app.delete("/v1/responses/<response_id>")
    async def delete_response(response_id: str) -> Response:
        responses.delete(response_id)
        return json_response({"id": response_id, "object": "response", "deleted": True})

    @app.post("/tokenize")
    async def tokenize_route() -> Response:
        engine, tokenizer = serving()
        body = await _read_json()
        return json_response(await tokenize(body, engine=engine, tokenizer=tokenizer, model=state.model_name,
                                            features=chat_features(tokenizer)))

    @app.post("/detokenize")
    async def detokenize_route() -> Response:
        _, tokenizer = serving()
        body = await _read_json()
        return json_response(await detokenize(body, tokenizer=tokenizer, model=state.model_name))

    def model_card() -> ModelCard:
        engine, _ = serving()
        return {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "maxjax",
            "root": state.model_root or state.model_name,
            "parent": None,
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str) -> Response:
        if model_id != state.model_name:
            raise model_error(model_id)
        return json_response(model_card())

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return json_response({"status": "shutting_down"}, 503, {"Retry-After": LOADING_RETRY_AFTER_S})
        if not state.ready:
            return json_response({"status": "loading"}, 503, {"Retry-After": LOADING_RETRY_AFTER_S})
        return json_response({"status": "ok"})

    @app.get("/version")
    async def version() -> Response:
        return json_response({"version": maxjax.__version__})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, content_type=content_type)

    if config.web_ui:
        add_web_routes(app)  # `/` and `/static/...`, outside the API key (serve/web)
    return app


def _arrived() -> float:
    return float(g.get("arrived", time.perf_counter()))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json() -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    mimetype = request.mimetype
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(f"Send the body as JSON with 'Content-Type: application/json' (got '{mimetype}').")
    raw = await request.get_data()
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(f"We could not parse the JSON body of your request: {exc}.") from None
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    return body
