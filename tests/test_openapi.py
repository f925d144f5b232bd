"""The OpenAPI description (#15): served at /v2/openapi.json, kept in sync with docs/openapi.yaml, and fuzzed.

schemathesis generates requests from the description and sends them to a real ``edge-agent run``
process; no answer may be a 5xx. Bounded for CI (``FUZZ_EXAMPLES`` per operation, default 25);
``make fuzz`` runs it longer.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
from pathlib import Path

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings

from edge_agent.http.openapi import SPEC, to_yaml
from tests.support.agent import start_agent, stop, wait_ready
from tests.support.env import free_port

DOC = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))


def test_docs_openapi_yaml_is_the_served_document() -> None:
    assert DOC.read_text() == to_yaml(), (
        "docs/openapi.yaml is stale: python -m edge_agent.http.openapi > docs/openapi.yaml"
    )
    assert yaml.safe_load(DOC.read_text()) == SPEC


@pytest.fixture(scope="module")
def agent_url(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    proc = start_agent(tmp_path_factory.mktemp("fuzz") / "data", f"127.0.0.1:{port}")
    wait_ready(functools.partial(http.client.HTTPConnection, "127.0.0.1", port, timeout=10), proc)
    yield f"http://127.0.0.1:{port}"
    assert stop(proc) == 0, "the agent did not exit cleanly after the fuzzing"


@pytest.fixture(scope="module")
def served_schema(agent_url: str):
    conn = http.client.HTTPConnection(agent_url.removeprefix("http://"), timeout=10)
    conn.request("GET", "/v2/openapi.json")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == json.loads(json.dumps(SPEC))
    return schemathesis.openapi.from_url(f"{agent_url}/v2/openapi.json")


def test_no_request_gets_a_5xx(served_schema) -> None:
    """Every operation of the description, ``EXAMPLES`` generated requests each (positive and negative)."""
    operations = [result.ok() for result in served_schema.get_all_operations()]
    assert len(operations) >= 11
    seen: list[int] = []
    for op in operations:

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy())
        def call(case) -> None:
            response = case.call(timeout=30)
            seen.append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
            )
            if response.status_code >= 400 and case.path != "/metrics":
                assert "error" in response.json(), response.text[:300]

        call()
    assert any(code == 200 for code in seen) and any(400 <= code < 500 for code in seen)
