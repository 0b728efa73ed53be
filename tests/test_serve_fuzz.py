"""API fuzzing from the server's own OpenAPI schema (schemathesis): for every operation, generated valid and
invalid requests never get a 5xx, and every reply that is not a success is JSON ``{"error", "status"}``.

The cases are derandomised (the same ones every run) and bounded per operation, so this stays a few
seconds; the app is called in process.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from test_index import build_demo_index

from vsekit.serve.app import create_app

MAX_EXAMPLES = 30
OPERATIONS = [("GET", "/health"), ("GET", "/search"), ("POST", "/search/image"), ("GET", "/images/{image_id}")]


@pytest.fixture(scope="module")
def app(ckpt, tmp_path_factory):
    ix = build_demo_index(ckpt, tmp_path_factory.mktemp("fuzz") / "demo")
    return create_app(ix, max_upload_bytes=64 * 1024, max_query_chars=50, max_k=20, max_image_pixels=512 * 512)


@pytest.fixture(scope="module")
def schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_schema_lists_every_operation(schema):
    ops = {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()}
    assert ops == set(OPERATIONS)  # a new endpoint must be added to OPERATIONS, and so fuzzed


# invalid requests (wrong types, out-of-range values, missing fields) for the operations that have parameters
# a schema can constrain; /health has none, and a path string is any string
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    ("GET", "/search", GenerationMode.NEGATIVE), ("POST", "/search/image", GenerationMode.NEGATIVE)]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_fuzzed_requests_get_no_5xx_and_json_errors(schema, method, path, mode):
    seen: list[int] = []

    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        response = case.call()
        seen.append(response.status_code)
        where = f"{case.method} {case.formatted_path} query={case.query!r}"
        assert response.status_code < 500, f"{where} -> {response.status_code}: {response.text[:300]}"
        if not 200 <= response.status_code < 300:
            ctype = (response.headers.get("content-type") or [""])[0]
            assert ctype.startswith("application/json"), f"{where} -> {response.status_code} {ctype}"
            body = response.json()
            assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
            assert body.get("status") == response.status_code, body

    check()
    assert seen  # the strategy produced cases
