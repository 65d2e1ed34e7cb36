"""ASGI middleware in front of every route: the API key and the request body limit.

The key (`sd-serve --api-key`) is checked on the API routes (/api, /sdapi, /v1) as `Authorization: Bearer KEY`,
or as the password of HTTP Basic auth (what AUTOMATIC1111 clients such as webuiapi send). The page and its files
are served without it, and so are a job's finished images and previews: their URLs hold the job's random
128-bit id, so a browser <img> or an OpenAI `url` response can be fetched without the key.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from typing import Any

from leansd.server.errors import native_body, openai_body

API_PREFIXES = ("/api/", "/sdapi/", "/v1/")
CAPABILITY_URL = re.compile(r"^/api/jobs/[0-9a-f]{32}/(images/\d+\.png|preview\.png)$")
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def error_body(path: str, message: str, field: str | None, status: int) -> dict[str, Any]:
    """The error body in the shape the path's API uses."""
    return openai_body(message, field, status) if path.startswith("/v1/") else native_body(message, field)


class Guard:
    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and path.startswith(API_PREFIXES) and not CAPABILITY_URL.match(path) and not self._authorized(headers):
            message = "missing or wrong API key; send the header Authorization: Bearer KEY (the key sd-serve was started with)"
            return await _reply(send, path, 401, message, "Authorization", {"www-authenticate": 'Bearer realm="leansd"'})
        if scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _reply(send, path, 413, self._too_large(), None)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await _reply(send, path, 413, self._too_large(), None)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_body_bytes} bytes; send smaller images (sd-serve --max-body-mb sets the limit)"

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "basic":
            try:
                credentials = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.encode("utf-8"), self.api_key.encode("utf-8"))


async def _reply(send: Any, path: str, status: int, message: str, field: str | None, extra: dict | None = None) -> None:
    body = json.dumps(error_body(path, message, field, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
