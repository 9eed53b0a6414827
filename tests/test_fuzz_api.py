"""Fuzzed requests (issue 16): schemathesis generates requests for every route of /openapi.json, valid
and invalid, against a real `edgeloader serve` on loopback. Never a 5xx, and the service answers
afterwards. Bounded and deterministic: a fixed number of examples per route, derandomized, no example
database.

The schema is the document the server serves (a test checks they are equal), loaded at collection:
schemathesis' lazy fixture loader sets ``node._nodeid``, which pytest 9 no longer has."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from test_overload import Server  # noqa: E402

from supervisor.http.openapi import openapi_document  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_API_EXAMPLES", "100"))
SEEN: Counter[str] = Counter()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("fuzz-api")
    server = Server(folder / "data", folder / "service.log")
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.proc.poll() is None, server.log.read_text()[-2000:]
            try:
                if requests.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        yield server
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
        print(f"\nschemathesis: {sum(SEEN.values())} requests over {len(SEEN)} operations: {dict(SEEN)}")
    finally:
        server.stop()


# A BMP body is bytes like any other image: schemathesis has no sample serializer for image/bmp.
schemathesis.serializer.alias("image/bmp", "application/octet-stream")
schema = schemathesis.openapi.from_dict(openapi_document())


def test_the_fuzzed_document_is_the_served_one(api: Server) -> None:
    assert requests.get(f"{api.url}/openapi.json", timeout=5).json() == openapi_document()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_route_answers_a_server_error(case: object, api: Server) -> None:
    response = case.call(base_url=api.url, timeout=30)  # type: ignore[attr-defined]
    SEEN[f"{case.method} {case.path}"] += 1  # type: ignore[attr-defined]
    if response.status_code == 503:
        # Declared: no model loaded, or busy. Neither should happen here (a model serves, one client).
        pytest.fail(f"503 from {case.method} {case.path}: {response.text}")  # type: ignore[attr-defined]
    case.validate_response(response, checks=[not_a_server_error])  # type: ignore[attr-defined]
