"""Safety over real HTTP: the API key, the request body limit, the bounded queue, the limits, a failing job."""
from __future__ import annotations

import base64

import pytest

from leansd.server.cli import is_local, parse_args
from leansd.server.config import Limits
from tests.server.conftest import call, wait_until

PROMPT = "a blue circle"
KEY = "s3cret-key"


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/models"), ("GET", "/api/jobs"), ("POST", "/api/jobs"), ("GET", "/sdapi/v1/sd-models"),
    ("POST", "/sdapi/v1/txt2img"), ("GET", "/sdapi/v1/progress"), ("GET", "/v1/models"), ("POST", "/v1/images/generations"),
])
def test_api_key_is_required_on_every_api_route(start_server, method, path):
    server = start_server(api_key=KEY)
    body = {"prompt": PROMPT, "steps": 1} if method == "POST" else None
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic !!"}):
        reply = call(method, server.url + path, body, headers)
        assert reply.status == 401 and reply.headers["www-authenticate"].startswith("Bearer"), (headers, reply.body)
        if path.startswith("/v1/"):
            assert reply.json()["error"]["type"] == "authentication_error"
        else:
            assert reply.json()["field"] == "Authorization"
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()  # what webuiapi's set_auth sends
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Basic {basic}"}):
        assert call(method, server.url + path, body, headers).status in (200, 202)


def test_page_and_job_images_need_no_key(start_server):
    server = start_server(api_key=KEY)
    assert call("GET", server.url + "/").status == 200
    auth = {"Authorization": f"Bearer {KEY}"}
    job = call("POST", f"{server.url}/api/jobs", {"prompt": PROMPT, "steps": 1}, auth).json()
    wait_until(lambda: call("GET", f"{server.url}/api/jobs/{job['id']}", headers=auth).json()["status"] == "done", what="the job")
    assert call("GET", f"{server.url}/api/jobs/{job['id']}/images/0.png").status == 200  # the id is the capability
    assert call("GET", f"{server.url}/api/jobs/{job['id']}").status == 401


def test_openai_client_with_the_key(start_server):
    openai = pytest.importorskip("openai")
    server = start_server(api_key=KEY)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0).models.list()][0] == "shapes"


def test_body_limit(start_server):
    server = start_server(Limits(max_body_bytes=10_000))
    big = {"prompt": "x" * 20_000}
    for path in ("/api/jobs", "/sdapi/v1/txt2img"):
        reply = call("POST", server.url + path, big)
        assert reply.status == 413 and "10000 bytes" in reply.json()["error"]
    assert call("POST", server.url + "/v1/images/generations", big).json()["error"]["message"].startswith("the request body")
    assert call("POST", server.url + "/api/jobs", {"prompt": PROMPT, "steps": 1}).status == 202


def test_full_queue_is_429_and_drains(start_server):
    server = start_server(Limits(max_queue=2), step_delay=0.05)
    ids = [call("POST", f"{server.url}/api/jobs", {"prompt": PROMPT, "steps": 20}).json()["id"]]
    wait_until(lambda: call("GET", f"{server.url}/api/jobs/{ids[0]}").json()["status"] == "running", what="the first job")
    ids += [call("POST", f"{server.url}/api/jobs", {"prompt": PROMPT, "steps": 1}).json()["id"] for _ in range(2)]
    reply = call("POST", f"{server.url}/api/jobs", {"prompt": PROMPT, "steps": 1})
    assert reply.status == 429 and "queue is full" in reply.json()["error"] and reply.headers["retry-after"] == "1"
    assert call("POST", f"{server.url}/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 1}).status == 429
    assert call("POST", f"{server.url}/v1/images/generations", {"prompt": PROMPT}).json()["error"]["type"] == "rate_limit_error"
    call("POST", f"{server.url}/api/jobs/{ids[0]}/cancel")
    wait_until(lambda: all(call("GET", f"{server.url}/api/jobs/{i}").json()["status"] in ("done", "cancelled") for i in ids), what="the queue")
    assert call("POST", f"{server.url}/api/jobs", {"prompt": PROMPT, "steps": 1}).status == 202


def test_configured_limits_are_enforced(start_server):
    server = start_server(Limits(max_width=32, max_height=32, max_steps=5, max_images=2))
    cases = [({"steps": 6}, "steps"), ({"batch_size": 3}, "batch_size"), ({"width": 40, "height": 32}, "width"),
             ({}, "width")]  # the model's default size, 64x64, is over the limit too
    for fields, field in cases:
        reply = call("POST", f"{server.url}/api/jobs", {"prompt": PROMPT, **fields})
        assert reply.status == 400 and reply.json()["field"] == field, reply.body
    assert call("POST", f"{server.url}/api/jobs", {"prompt": PROMPT, "width": 32, "height": 32, "steps": 5, "batch_size": 2}).status == 202


def test_memory_estimate_refusal_is_503_naming_the_size(start_server, monkeypatch):
    from leansd.runtime import budget

    server = start_server()
    monkeypatch.setattr(budget, "available_bytes", lambda: 1024)
    reply = call("POST", f"{server.url}/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 1})
    assert reply.status == 503 and reply.json()["field"] == "width" and "memory" in reply.json()["error"]


def test_a_failing_job_does_not_stop_the_server(start_server, monkeypatch):
    server = start_server()
    model = server.manager.registry.get(None)

    def broken(**settings):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(type(model.pipe), "__call__", lambda self, **kw: broken(**kw))
    reply = call("POST", f"{server.url}/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 1})
    assert reply.status == 500 and "backend exploded" in reply.json()["error"]
    job = call("GET", f"{server.url}/api/jobs").json()["jobs"][0]
    assert job["status"] == "failed" and "RuntimeError" in job["error"]
    monkeypatch.undo()
    assert call("POST", f"{server.url}/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 1}).status == 200


def test_cli_defaults_and_localhost_check(monkeypatch):
    monkeypatch.delenv("SD_SERVE_API_KEY", raising=False)
    args = parse_args([])
    assert (args.host, args.port, args.api_key, args.models) == ("127.0.0.1", 7860, None, None)
    assert is_local("127.0.0.1") and is_local("::1") and is_local("localhost")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.5")
    with pytest.raises(SystemExit):
        parse_args(["--max-steps", "0"])
    monkeypatch.setenv("SD_SERVE_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env" and parse_args(["--api-key", "given"]).api_key == "given"


@pytest.mark.parametrize("host, key, warned", [("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False)])
def test_warning_when_listening_beyond_localhost_without_a_key(monkeypatch, caplog, host, key, warned):
    import uvicorn

    from leansd.server import cli

    monkeypatch.delenv("SD_SERVE_API_KEY", raising=False)
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: started.append(self.config.host))  # never listens
    argv = ["--host", host, "--port", "0", *(["--api-key", key] if key else [])]
    with caplog.at_level("WARNING", logger="leansd.server"):
        assert cli.main(argv) == 0
    assert started == [host]
    assert any("without --api-key" in r.message for r in caplog.records) is warned
