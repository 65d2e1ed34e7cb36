"""create_app(): the HTTP application over a model registry: routes, error bodies, the page, start and stop."""
from __future__ import annotations

import contextlib
import logging
import mimetypes
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from leansd.runtime.version import __version__
from leansd.server import a1111, native, openai_api
from leansd.server.config import Limits
from leansd.server.errors import RequestError
from leansd.server.guard import Guard, error_body
from leansd.server.jobs import JobManager
from leansd.server.registry import ModelRegistry

log = logging.getLogger("leansd.server")
STATIC = Path(__file__).resolve().parent / "static"


def create_app(registry: ModelRegistry, limits: Limits = Limits(), api_key: str | None = None,
               step_delay: float = 0.0) -> FastAPI:
    """The application. Its job manager (`app.state.manager`) starts with the app and, on shutdown, cancels
    the queued jobs, stops the running ones after their current step, and waits for them.
    step_delay: seconds to sleep after every denoising step (for tests that watch or cancel a running job)."""
    mimetypes.add_type("text/javascript", ".js")  # ES modules; older Pythons guess application/javascript
    manager = JobManager(registry, limits, step_delay)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            await run_in_threadpool(manager.stop)

    app = FastAPI(title="leansd", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion without PyTorch: the job API, AUTOMATIC1111's API and OpenAI's Images API.")
    app.state.manager = manager
    app.include_router(native.router(manager))
    app.include_router(a1111.router(manager))
    app.include_router(openai_api.router(manager))
    _error_handlers(app)
    _page(app)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    return app


def _error_handlers(app: FastAPI) -> None:
    def reply(request: Request, status: int, message: str, field: str | None) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, message, field, status), status_code=status)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        response = reply(request, exc.status, exc.message, exc.field)
        if exc.status == 429:  # clients that honour it (openai's) wait and retry
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0] if exc.errors() else {}
        where = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "form")]
        field = ".".join(where) or None
        message = f"{field or 'the request body'}: {error.get('msg', 'invalid')}"
        if error.get("type") in ("missing",):
            message = f"{field} is required"
        elif error.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif field is None:
            message = "the request body must be a JSON object (send it with Content-Type: application/json)"
        return reply(request, 422, message, field)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such route: {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return reply(request, exc.status_code, message.get(exc.status_code, str(exc.detail)), None)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error in %s %s", request.method, request.url.path)
        return reply(request, 500, f"internal error ({type(exc).__name__}); see the server's log", None)


def _page(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    @app.get("/", include_in_schema=False, response_model=None)
    def index() -> FileResponse | HTMLResponse:
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page)
        return HTMLResponse("<!doctype html><title>leansd</title><p>leansd is running; the API is at /docs.</p>")
