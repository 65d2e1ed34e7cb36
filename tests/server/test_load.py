"""A small run of perf/serve_load.py against a real server: concurrent clients on all three APIs, no request
lost, failed or answered with another request's image."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from leansd.server.config import Limits

SCRIPT = Path(__file__).resolve().parents[2] / "perf" / "serve_load.py"


def load_module():
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_24_requests_from_4_clients(start_server, tmp_path):
    serve_load = load_module()
    server = start_server(Limits(history=100))
    result = serve_load.run_load(server.url, requests=24, clients=4, steps=4)
    assert not result.failed, [f"{o.api} {o.seed}: {o.problem}" for o in result.failed]
    assert sorted(o.seed for o in result.outcomes) == list(range(1000, 1024))
    assert {o.api for o in result.outcomes} == {"a1111", "openai", "jobs"}
    assert serve_load.jobs_on_server(server.url) == {"done": 24}
    text = serve_load.report(result, 0.1, {"done": 24})
    assert "| failed or lost | 0 |" in text and "latency p95" in text
