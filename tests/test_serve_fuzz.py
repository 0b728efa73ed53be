"""API fuzzing from the server's own OpenAPI schema (schemathesis): for every operation, generated valid and
invalid requests never get a 5xx, every reply that is not a success is JSON ``{"error", "status"}``, and
each GET case sent as HEAD gets the same status and headers with no body. Hypothesis drives the limits the
schema cannot express: ``k`` (ASCII digits only, on both search routes) and the ``Host`` header.

The cases are derandomised (the same ones every run) and bounded per operation, so this stays a few
seconds; the app is called in process.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from test_index import build_demo_index

from vsekit.serve.app import allowed_hosts, create_app, host_name

MAX_EXAMPLES = 30
OPERATIONS = [("GET", "/health"), ("GET", "/search"), ("POST", "/search/image"), ("GET", "/images/{image_id}")]


@pytest.fixture(scope="module")
def app(ckpt, tmp_path_factory):
    ix = build_demo_index(ckpt, tmp_path_factory.mktemp("fuzz") / "demo")
    return create_app(ix, max_upload_bytes=64 * 1024, max_query_chars=50, max_k=20, max_image_pixels=512 * 512)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


FUZZ = settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


def assert_json_error(response) -> None:
    ctype = response.headers.get("content-type") or ""
    assert ctype.startswith("application/json"), f"{response.status_code} {ctype}"
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    assert body.get("status") == response.status_code, body


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
    @FUZZ
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


@pytest.mark.parametrize("path", [p for m, p in OPERATIONS if m == "GET"])
def test_fuzzed_get_requests_sent_as_head_match_get(schema, client, path):
    """HEAD is answered wherever GET is: same status and headers, no body (the search's took_ms may change
    the length of its JSON between two calls, so /search compares the rest)."""
    seen: list[int] = []

    @given(case=schema[path]["GET"].as_strategy(generation_mode=GenerationMode.POSITIVE))
    @FUZZ
    def check(case) -> None:
        sent = case.as_transport_kwargs()
        get = client.request("GET", sent["url"], params=sent.get("params"), headers=sent.get("headers"))
        head = client.request("HEAD", sent["url"], params=sent.get("params"), headers=sent.get("headers"))
        seen.append(head.status_code)
        assert head.status_code == get.status_code and head.content == b"", (sent, head.status_code)
        names = ["content-type"] + ([] if path == "/search" and get.status_code == 200 else ["content-length"])
        assert all(head.headers.get(n) == get.headers.get(n) for n in names), (sent, head.headers, get.headers)

    check()
    assert seen


K_TEXT = st.one_of(st.text(max_size=12), st.integers(-10, 10**8).map(str),
                   st.from_regex(r"[0-9\u0660-\u0669\uff10-\uff19_+ ]{1,8}", fullmatch=True))


def k_ok(k: str) -> bool:
    return re.fullmatch(r"[0-9]{1,6}", k) is not None and 1 <= int(k) <= 20


@given(k=K_TEXT)
@FUZZ
def test_k_is_one_parser_on_both_routes(client, app, k):
    """Both search routes accept exactly ASCII digits in 1..max_k, and refuse anything else alike (422)."""
    text = client.get("/search", params={"q": "red", "k": k})
    assert text.status_code == (200 if k_ok(k) else 422), (k, text.text)
    if text.status_code == 422:
        assert_json_error(text)
        image = Path(app.state.index.data.images[0]["path"]).read_bytes()
        upload = client.post("/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": k})
        assert upload.status_code == 422, (k, upload.text)
        assert_json_error(upload)
    else:
        assert len(text.json()["results"]) == min(int(k), 8)


ALLOWED = {"localhost", "127.0.0.1", "[::1]", "photos.lan"}
HOST_PARTS = st.tuples(st.sampled_from(sorted(ALLOWED | {"evil.example", "127.0.0.1.evil.example", "localhost.evil",
                                                         "photos.lan.evil", "::1", "127.0.0.2", "0"})),
                       st.sampled_from(["", ":80", ":8000", ":65535"]),
                       st.sampled_from(["", "", "@evil.example", ":1:2", "/x", " x", "[", "\\"]),
                       st.booleans())


@given(parts=HOST_PARTS, noise=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20))
@FUZZ
def test_host_header_is_checked_on_every_request(app, parts, noise):
    """Bound to loopback with --allow-host photos.lan: exactly this machine's names and photos.lan (any case,
    with or without a port) are answered; any other Host, or one with junk around a good name, is a JSON 400."""
    name, port, junk, upper = parts
    guarded = create_app(app.state.index, allowed_hosts=allowed_hosts("127.0.0.1", ["photos.lan"]))
    with TestClient(guarded) as c:
        host = (name.upper() if upper else name) + port + junk
        r = c.get("/health", headers={"host": host})
        assert r.status_code == (200 if name in ALLOWED and not junk else 400), (host, r.text)
        if r.status_code == 400:
            assert_json_error(r)
        r = c.get("/health", headers={"host": noise})
        assert r.status_code in (200, 400) and (r.status_code == 400 or host_name(noise) in {"::1", *ALLOWED})
        h = c.head("/", headers={"host": host})
        assert h.content == b"" and h.status_code == (200 if name in ALLOWED and not junk else 400)
