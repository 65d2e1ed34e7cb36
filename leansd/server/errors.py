"""Errors a request can cause, and the JSON bodies each API answers them with."""
from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request the server refuses: `message` says what is wrong and how to fix it, `field` names the
    request field at fault (None when no one field is), `status` is the HTTP status."""

    def __init__(self, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.field, self.status = message, field, status


def native_body(message: str, field: str | None) -> dict[str, Any]:
    """The job API's and the AUTOMATIC1111 API's error body (`detail` is what A1111 clients print)."""
    return {"error": message, "field": field, "detail": message}


OPENAI_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}


def openai_body(message: str, field: str | None, status: int) -> dict[str, Any]:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": field, "code": None}}
