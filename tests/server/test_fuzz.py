"""Every endpoint fuzzed from the server's own OpenAPI schema with schemathesis, over real HTTP: no 5xx.

The fuzzed server has tight limits (tiny sizes, few steps) so that the requests it accepts finish quickly;
every operation gets a bounded number of examples.
"""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="needs schemathesis (requirements/dev.txt)")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from leansd.server.config import Limits  # noqa: E402
from tests.server.conftest import create_app, serving  # noqa: E402


@pytest.fixture(scope="module")
def fuzzed_server(registry):
    limits = Limits(max_width=64, max_height=64, max_steps=50, max_images=2, max_queue=4, max_body_bytes=256 * 1024)
    with serving(create_app(registry, limits)) as server:
        yield server
    registry.switch(registry.default_name)  # the fuzzed options call may have switched AUTOMATIC1111's model


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")


def test_no_server_errors(api_schema, fuzzed_server):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 30  # the job API, AUTOMATIC1111's and OpenAI's
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    for operation, mode in ((operation, mode) for operation in operations for mode in modes):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                  database=None)
        def fuzz(case) -> None:
            response = case.call(base_url=fuzzed_server.url, timeout=30)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
            if response.status_code >= 400 and "application/json" in str(response.headers.get("content-type")):
                assert "error" in response.json(), response.text  # every refusal says what is wrong

        try:
            fuzz()
        except Unsatisfiable:  # nothing to make invalid: an operation without parameters or body
            assert mode == schemathesis.GenerationMode.NEGATIVE
