"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` for every
4xx/5xx the gateway itself produces, with a message that says what was wrong."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class GatewayError(Exception):
    """Raised anywhere in request handling; rendered by the app's exception handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind or _TYPES.get(status, "server_error" if status >= 500 else
                                       "invalid_request_error")
        self.headers = headers or {}
        # Label of the rejection metric (auth, rate_requests, body_size, ...).
        self.reason = reason or code or str(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return GatewayError(status, message, **kwargs).response()
