"""A real sd-serve on 127.0.0.1 for the server tests: uvicorn in a thread on a free port, the bundled model
(plus a second folder, the bundled model with an Euler scheduler, for model listing and switching).

`live_server` is shared by the session (no step delay); `start_server(...)` starts another with its own
options (an API key, small limits, a step delay to watch or cancel a running job) and stops it at the end.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="needs the server extra: pip install -e .[server]")
pytest.importorskip("uvicorn", reason="needs the server extra: pip install -e .[server]")

import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from leansd.runtime.loader import bundled_model_path  # noqa: E402
from leansd.server.app import create_app  # noqa: E402
from leansd.server.config import Limits  # noqa: E402
from leansd.server.registry import ModelRegistry  # noqa: E402

pytestmark = pytest.mark.skipif(not (bundled_model_path() / "leansd.json").is_file(), reason="no bundled model")


@dataclass
class Server:
    url: str
    app: Any

    @property
    def manager(self):
        return self.app.state.manager


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None,
         timeout: float = 60) -> Reply:
    """One HTTP request with the standard library (the runtime-only environment has no HTTP client package)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, response.read(), {k.lower(): v for k, v in response.headers.items()})
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()})


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def decode_png(data: bytes | str) -> Image.Image:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(app: Any) -> Iterator[Server]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the server to start")
    try:
        yield Server(f"http://127.0.0.1:{port}", app)
    finally:
        app.state.manager.stop(timeout=10)
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="session")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model under another folder name, with an Euler scheduler: its images differ from the first's."""
    root = tmp_path_factory.mktemp("models") / "second"

    def link(src: str, dst: str) -> None:
        if src.endswith(".onnx"):
            Path(dst).symlink_to(src)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(bundled_model_path(), root, copy_function=link)
    config = root / "scheduler" / "scheduler_config.json"
    data = json.loads(config.read_text())
    data["_class_name"] = "EulerDiscreteScheduler"
    config.write_text(json.dumps(data))
    return root


@pytest.fixture(scope="session")
def registry(second_model: Path) -> ModelRegistry:
    """Both models, loaded once for every server of the session."""
    return ModelRegistry.load([None, second_model])


@pytest.fixture(scope="session")
def live_server(registry: ModelRegistry) -> Iterator[Server]:
    with serving(create_app(registry)) as server:
        yield server


@pytest.fixture
def start_server(registry: ModelRegistry):
    """start_server(limits=..., api_key=..., step_delay=...) -> a new Server, stopped after the test."""
    with contextlib.ExitStack() as stack:
        def start(limits: Limits = Limits(), api_key: str | None = None, step_delay: float = 0.0) -> Server:
            return stack.enter_context(serving(create_app(registry, limits, api_key=api_key, step_delay=step_delay)))

        yield start


@pytest.fixture(scope="session")
def reference():
    """A separately loaded pipeline of the bundled model: what a server image must equal pixel for pixel."""
    import leansd

    return leansd.load()


def pixels(image: Image.Image):
    import numpy as np

    return np.asarray(image.convert("RGB"))
