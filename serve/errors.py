"""The refusals the HTTP layer adds to `serve.requests.ServeError`'s, and OpenAI's error body.

Every refusal is a `ServeError` (its `status` is the HTTP status) and answers with OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, which the `openai` package turns into its
BadRequestError, AuthenticationError, NotFoundError, ... classes.
"""

from __future__ import annotations

from typing import Any

from serve.requests import ServeError

RETRY_AFTER_S = 1  # what a 503 asks the client to wait: a slot frees within a few decode steps


class ModelNotFound(ServeError):
    status = 404
    code = "model_not_found"


class RouteNotFound(ServeError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ServeError):
    status = 405
    code = "method_not_allowed"


class Unauthorized(ServeError):
    status = 401
    code = "invalid_api_key"


class BodyTooLarge(ServeError):
    status = 413
    code = "request_too_large"


class NotReady(ServeError):
    """The model is still loading or compiling: come back in a moment."""

    status = 503
    code = "starting"


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_headers(status: int) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}


def body_of(error: ServeError) -> dict[str, Any]:
    return error_body(error.status, str(error), error.param, error.code)
