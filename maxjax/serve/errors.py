"""Every error the HTTP side answers, as OpenAI error objects: `{"error": {message, type, param, code}}` with an
HTTP status (and headers such as Retry-After). Bad input is always a 4xx: the `openai` client retries 5xx,
which would hide the mistake. app.py turns any `ApiError` raised by a route into its response; while streaming,
`choices.stream_error` sends it as a final event.
"""

from __future__ import annotations

from typing import TypedDict

from pydantic import ValidationError

RETRY_AFTER_S = "1"
"""Retry-After of a full queue or a draining server."""
LOADING_RETRY_AFTER_S = "5"
"""Retry-After while the model loads."""


class ApiError(Exception):
    """An error the client gets back as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(TypedDict):
    error: ErrorDetail


def _param_name(loc: tuple[int | str, ...]) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def validation_error(exc: ValidationError) -> ApiError:
    """The first pydantic error as an OpenAI-style 400 (clients show one message; the first is the useful one)."""
    err = exc.errors(include_url=False)[0]
    param = _param_name(tuple(err["loc"]))
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif kind == "value_error":
        message = msg.removeprefix("Value error, ")
    else:
        message = f"Invalid value for '{param}': {msg}."
    return ApiError(message, param=param)


def internal_error(exc: BaseException) -> ApiError:
    return ApiError(f"The server failed to finish this request: {type(exc).__name__}: {exc}", status=500, type="server_error")


def shutting_down(reason: str = "the server is shutting down") -> ApiError:
    """503 with Retry-After: the server is draining (new requests) or ended this one at the shutdown timeout."""
    return ApiError(f"The server is shutting down: {reason}. Retry against another instance or later.",
                    status=503, type="server_error", code="server_shutting_down", headers={"Retry-After": RETRY_AFTER_S})


def model_error(model: str) -> ApiError:
    return ApiError(
        f"The model '{model}' does not exist.", status=404, param="model", code="model_not_found"
    )


def loading() -> ApiError:
    return ApiError(
        "The model is still loading; retry shortly.",
        status=503,
        type="server_error",
        code="model_loading",
        headers={"Retry-After": LOADING_RETRY_AFTER_S},
    )




def queue_full() -> ApiError:
    return ApiError(
        "The server is busy: too many requests are waiting. Retry shortly.",
        status=429,
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": RETRY_AFTER_S},
    )
