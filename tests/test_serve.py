"""The HTTP API: every endpoint, and every bad input answered with a 4xx JSON error, never a 500."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zlib
from pathlib import Path
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_index import INDEX_IMAGES, build_demo_index, cli

from vsekit.index import SearchIndex
from vsekit.inference import Embedder
from vsekit.serve.app import create_app

MAX_UPLOAD = 64 * 1024
MAX_QUERY = 50
MAX_K = 20


@pytest.fixture(scope="module")
def index_dir(ckpt, tmp_path_factory) -> Path:
    return build_demo_index(ckpt, tmp_path_factory.mktemp("serve") / "demo")


@pytest.fixture(scope="module")
def app(index_dir):
    return create_app(index_dir, max_upload_bytes=MAX_UPLOAD, max_query_chars=MAX_QUERY, max_k=MAX_K,
                      max_image_pixels=512 * 512)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:  # raise_server_exceptions: a 500 from an exception fails the test loudly
        yield c


@pytest.fixture(scope="module")
def records(app):
    return app.state.index.data.images


def png_bytes(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def assert_json_error(resp, status: int, *words: str) -> dict:
    """The reply is the server's JSON error with this status, and its message holds ``words``."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    for w in words:
        assert w in body["error"], body["error"]
    return body


# -- endpoints ------------------------------------------------------------------------------------------------
def test_health(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["images"] == INDEX_IMAGES and h["captions"] == 5 * INDEX_IMAGES
    assert h["has_captions"] and h["can_embed_images"] and h["kind"] == "exact" and h["similarity"] == "cosine"
    assert h["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_query_chars": MAX_QUERY, "max_k": MAX_K,
                           "max_image_pixels": 512 * 512, "max_aspect_ratio": 20.0, "read_timeout_s": 10.0,
                           "body_timeout_s": 60.0, "max_decode_bytes": 512 << 20, "max_decodes": 4,
                           "decode_wait_s": 10.0}


def test_text_search(client, app):
    caption = app.state.index.data.captions[0]
    r = client.get("/search", params={"q": caption["text"][:MAX_QUERY], "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["k"] == 3 and body["target"] == "images" and len(body["results"]) == 3
    hit = body["results"][0]
    assert set(hit) == {"rank", "score", "target", "id", "image_id", "text", "image_url"}  # no server paths
    assert hit["rank"] == 1 and hit["image_url"] == f"/images/{hit['id']}"
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    caps = client.get("/search", params={"q": "a red star", "k": 4, "target": "captions"}).json()["results"]
    assert len(caps) == 4 and all(c["target"] == "captions" and "#" in c["id"] for c in caps)
    assert len(client.get("/search", params={"q": "red", "k": MAX_K}).json()["results"]) == INDEX_IMAGES


def test_image_served_by_id(client, app, records):
    rec = records[2]
    r = client.get(f"/images/{rec['id']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"  # the index's thumbnail, not the file
    assert r.content == app.state.index.thumbnail(rec["id"]) and r.content != png_bytes(rec["path"])
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-security-policy"] == "default-src 'none'; sandbox"


def test_image_upload_search(client, records):
    rec = records[4]
    files = {"file": ("query.png", png_bytes(rec["path"]), "image/png")}
    r = client.post("/search/image", files=files, data={"k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["targets"] == ["captions"] and len(body["results"]["captions"]) == 3
    assert all(h["image_url"].startswith("/images/") and h["text"] for h in body["results"]["captions"])
    same = client.post("/search/image", files=files, data={"k": "2", "target": "images"}).json()
    assert same["results"]["images"][0]["id"] == rec["id"]
    both = client.post("/search/image", files=files, data={"target": "both"}).json()
    assert set(both["results"]) == {"captions", "images"} and len(both["results"]["images"]) == INDEX_IMAGES


def test_page_static_files_and_docs(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="q"' in r.text and 'type="file"' in r.text and "default-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/search", "/search/image", "/images/{image_id}", "/health"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/search/image"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("path", ["/static/index.html", "/static/docs.html", "/static/app.js", "/static/style.css",
                                  "/docs-assets/swagger-ui-bundle.js", "/docs-assets/redoc.standalone.js",
                                  "/health", "/openapi.json", "/nothing-here", "/images/no-such-id",
                                  "/static/..%2fapp.py"])
def test_every_reply_is_nosniff_and_no_file_is_a_page_that_runs(client, path):
    """The page's own HTML reached under /static (not through "/" and its policy), Swagger UI's files, JSON
    and the framework's errors: none is sniffed into another type, none opened as a document may run."""
    for r in (client.get(path), client.head(path)):
        assert r.headers["x-content-type-options"] == "nosniff", (path, r.status_code)
        assert "sandbox" in r.headers["content-security-policy"] and "default-src 'none'" in r.headers[
            "content-security-policy"], (path, r.headers.get("content-security-policy"))


def test_pages_keep_their_own_policies(client):
    assert "default-src 'self'" in client.get("/").headers["content-security-policy"]
    assert "default-src 'self'" in client.get("/docs").headers["content-security-policy"]


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, words", [
    ({}, ["empty"]),
    ({"q": ""}, ["empty"]),
    ({"q": "   \t "}, ["empty"]),
    ({"q": "x" * (MAX_QUERY + 1)}, ["limit is 50"]),
    ({"q": "red", "k": "0"}, ["k"]),
    ({"q": "red", "k": "-3"}, ["k"]),
    ({"q": "red", "k": str(MAX_K + 1)}, ["k", "20"]),
    ({"q": "red", "k": "ten"}, ["k", "integer"]),
    ({"q": "red", "k": "1.5"}, ["k", "integer"]),
    ({"q": "red", "k": ""}, ["k"]),
    ({"q": "red", "target": "videos"}, ["target"]),
])
def test_bad_text_queries_are_422(client, params, words):
    assert_json_error(client.get("/search", params=params), 422, *words)


def raw_get(app, raw_path: bytes) -> tuple[int, dict]:
    """GET ``raw_path`` exactly as uvicorn would pass it (percent-decoded, dot segments kept); an HTTP client
    would normalise ``..`` away before sending."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path,
             "query_string": b"", "root_path": "", "headers": [(b"host", b"testserver")],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


@pytest.mark.parametrize("path", [
    b"/images/no-such-id",
    b"/images/..",
    b"/images/../../etc/passwd",
    b"/images/..%2F..%2F..%2Fetc%2Fpasswd",
    b"/images/%2E%2E/%2E%2E/etc/passwd",
    b"/images/%2Fetc%2Fpasswd",
    b"/images//etc/passwd",
    b"/images/0%00",
    b"/images/0/../../manifest.json",
    b"/images/..%5C..%5Cwindows%5Cwin.ini",
])
def test_images_unknown_ids_and_traversal_are_404(app, client, path):
    status, body = raw_get(app, path)
    assert status == 404 and body["status"] == 404 and "no image with id" in body["error"]
    if path != b"/images/..":  # through a real client too (it sends /images/.. as /)
        assert client.get(path.decode()).status_code == 404


def test_images_never_served_by_path(client, records):
    assert_json_error(client.get("/images/" + records[0]["path"]), 404, "no image with id")
    assert_json_error(client.get("/images/" + records[0]["path"].replace("/", "%2F")), 404, "no image with id")


def post_image(client, content: bytes, name: str = "q.png", ctype: str = "image/png", **data):
    return client.post("/search/image", files={"file": (name, content, ctype)}, data=data)


def test_bad_uploads_are_4xx(client, records):
    good = png_bytes(records[0]["path"])
    assert_json_error(post_image(client, b"this is not an image", "q.txt", "text/plain"), 415, "not an image")
    assert_json_error(post_image(client, good[: len(good) // 2]), 415, "not a readable image")
    assert_json_error(post_image(client, b""), 400, "empty")
    assert_json_error(post_image(client, good, k="0"), 422, "k")
    assert_json_error(post_image(client, good, k="many"), 422, "k must be an integer")
    assert_json_error(post_image(client, good, k=str(MAX_K + 1)), 422, "between 1 and 20")
    assert_json_error(post_image(client, good, target="sounds"), 422, "target")
    assert_json_error(client.post("/search/image", data={"k": "3"}, files={"other": ("a", b"x")}), 400, "'file'")
    assert_json_error(client.post("/search/image", json={"file": "x"}), 415, "multipart/form-data")
    assert_json_error(client.post("/search/image", content=b"--zz\r\ngarbage",
                                  headers={"content-type": "multipart/form-data; boundary=zz"}), 400)
    two = [("file", ("a.png", good, "image/png")), ("file", ("b.png", good, "image/png"))]
    assert_json_error(client.post("/search/image", files=two), 400, "multipart")
    assert_json_error(client.get("/search/image"), 405)
    assert_json_error(client.post("/search"), 405)
    assert_json_error(client.get("/nowhere"), 404)


def test_oversized_uploads_are_413_even_without_content_length(client):
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * MAX_UPLOAD)
    assert_json_error(post_image(client, big), 413, "limit")

    def chunks():  # a streamed body: no Content-Length, so the server must count as it reads
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 8192
        yield b"\r\n--b--\r\n"

    r = client.post("/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_json_error(r, 413, "limit")
    # within the body limit (form overhead allowed) but over the file limit
    assert_json_error(post_image(client, b"\0" * (MAX_UPLOAD + 10)), 413, "limit")
    assert_json_error(client.post("/search/image", content=b"x", headers={
        "content-type": "multipart/form-data; boundary=b", "content-length": "abc"}), 400)


def test_too_many_pixels_is_413(client):
    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024), (200, 30, 30)).save(buf, "PNG")  # compresses to a few KB
    assert len(buf.getvalue()) < MAX_UPLOAD
    assert_json_error(post_image(client, buf.getvalue()), 413, "1024x1024")


def test_decompression_bomb_header_is_refused_before_decoding(client):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # claims 10^10 pixels
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    r = post_image(client, bomb)
    assert r.status_code in (413, 415), r.text
    assert r.json()["status"] == r.status_code


def test_image_is_served_from_the_index_whatever_its_path(index_dir, ckpt, tmp_path):
    sx = SearchIndex.open(index_dir, Embedder.from_checkpoint(ckpt))
    rec = dict(sx.data.images[0])
    sx.data.images[0] = {**rec, "path": str(tmp_path / "gone.png")}  # the source file is not needed any more
    with TestClient(create_app(sx)) as c:
        r = c.get(f"/images/{rec['id']}")
        assert r.status_code == 200 and r.content == sx.thumbnail(rec["id"])


def test_index_without_captions_and_feature_models(ckpt, tmp_path, records):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a b.png").write_bytes(png_bytes(records[0]["path"]))
    assert cli("index", "build", ckpt, "--images", tmp_path / "imgs", "--out", tmp_path / "ix", "-q") == 0
    emb = Embedder.from_checkpoint(ckpt)
    with TestClient(create_app(SearchIndex.open(tmp_path / "ix", emb))) as c:
        assert c.get("/health").json()["has_captions"] is False
        hit = c.get("/search", params={"q": "red"}).json()["results"][0]
        assert hit["id"] == "a b.png" and hit["image_url"] == "/images/a%20b.png"
        assert c.get(hit["image_url"]).status_code == 200
        assert_json_error(c.get("/search", params={"q": "red", "target": "captions"}), 400, "no captions")
        good = png_bytes(records[0]["path"])
        assert_json_error(post_image(c, good, target="captions"), 400, "no captions")
        assert post_image(c, good).json()["targets"] == ["images"]  # default without captions
    emb.feature_shape = [36, 2048]  # a precomputed-feature model cannot embed uploads
    with TestClient(create_app(SearchIndex.open(tmp_path / "ix", emb))) as c:
        assert c.get("/health").json()["can_embed_images"] is False
        assert_json_error(post_image(c, png_bytes(records[0]["path"])), 400, "precomputed features")


def test_unexpected_errors_become_a_json_500(index_dir, ckpt, monkeypatch):
    sx = SearchIndex.open(index_dir, Embedder.from_checkpoint(ckpt))

    def broken(*a, **k):
        raise RuntimeError("model exploded")

    monkeypatch.setattr(sx, "search_text", broken)
    with TestClient(create_app(sx), raise_server_exceptions=False) as c:
        r = c.get("/search", params={"q": "red"})
        assert r.status_code == 500 and r.json() == {"error": "internal server error", "status": 500}
        assert c.get("/health").status_code == 200  # and the server keeps serving


def test_create_app_refuses_bad_limits(index_dir):
    with pytest.raises(ValueError, match="limits"):
        create_app(index_dir, max_k=0)


def test_query_is_stripped_before_its_length_is_checked(client):
    padded = " " * 40 + "a red star" + "\t " * 20  # 90 characters, 10 of them the query
    r = client.get("/search", params={"q": padded, "k": 2})
    assert r.status_code == 200, r.text
    assert r.json()["query"] == "a red star"
    assert_json_error(client.get("/search", params={"q": "  " + "x" * (MAX_QUERY + 1) + "  "}), 422,
                      f"{MAX_QUERY + 1} characters")


@pytest.mark.parametrize("range_header, status, words", [
    ("bytes=99999999-", 416, ["outside the file"]),
    ("bytes=abc", 400, ["Range"]),
    ("bytes=5-2", 400, ["start must be less than end"]),
    ("items=0-1", 400, ["bytes range"]),
    ("bytes", 400, ["alformed"]),
])
def test_range_errors_on_files_are_json(client, range_header, status, words):
    # thumbnails are sent whole (tests/test_thumbnails.py); the page's static files take ranges
    r = client.get("/static/style.css", headers={"Range": range_header})
    assert_json_error(r, status, *words)
    if status == 416:
        size = len(png_bytes(Path(__file__).parents[1] / "vsekit" / "serve" / "static" / "style.css"))
        assert r.headers["content-range"] == f"bytes */{size}"


def test_valid_ranges_still_work(client):
    data = png_bytes(Path(__file__).parents[1] / "vsekit" / "serve" / "static" / "style.css")
    r = client.get("/static/style.css", headers={"Range": "bytes=0-9"})
    assert r.status_code == 206 and r.content == data[:10]
    assert r.headers["content-range"] == f"bytes 0-9/{len(data)}"
    r = client.get("/static/style.css", headers={"Range": "bytes=-5"})
    assert r.status_code == 206 and r.content == data[-5:]


# -- k: one parser for every route ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", ["\u0665", "1_0", " 5", "5 ", "+5", "\uff15", "5\n", "0x5", "1e1", "5.0", "0005000",
                               "9" * 40, "", "-1"], ids=repr)
def test_k_is_ascii_digits_on_every_route(client, records, k):
    """Python's int() takes '١_٠', ' 5', '+5' and full-width digits; the upload route took them through it."""
    assert_json_error(client.get("/search", params={"q": "red", "k": k}), 422, "k")
    assert_json_error(post_image(client, png_bytes(records[0]["path"]), k=k), 422, "k")


@pytest.mark.parametrize("query", ["q=red&k=1&k=100", "q=red&q=blue", "q=red&target=images&target=captions"])
def test_a_parameter_given_twice_is_refused_on_every_route(client, records, query):
    """The framework reads the last of repeated parameters; a proxy or filter in front may have checked the
    first (``k=1&k=100``): neither is guessed."""
    name = query.rsplit("&", 1)[1].split("=")[0]
    assert_json_error(client.get(f"/search?{query}"), 422, f"{name} is given 2 times")
    if name != "q":
        values = [v.split("=")[1] for v in query.split("&") if v.startswith(f"{name}=")]
        r = client.post("/search/image", files=[("file", ("q.png", png_bytes(records[0]["path"]), "image/png")),
                                                *[(name, (None, v)) for v in values]])
        assert_json_error(r, 422, f"{name} is given 2 times")


def test_k_accepts_plain_digits_on_every_route(client, records):
    assert len(client.get("/search", params={"q": "red", "k": "03"}).json()["results"]) == 3
    r = post_image(client, png_bytes(records[0]["path"]), k="03")
    assert r.status_code == 200 and len(r.json()["results"]["captions"]) == 3
    assert_json_error(client.get("/search", params={"q": "red", "k": "1_0"}), 422, "ASCII digits")
    spec = client.get("/openapi.json").json()["paths"]["/search"]["get"]["parameters"]
    k = next(p for p in spec if p["name"] == "k")["schema"]  # still documented as an integer
    assert k == {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10, "title": "K",
                 "description": f"number of results, 1..{MAX_K}"}


# -- HEAD wherever GET ------------------------------------------------------------------------------------------
def test_head_is_answered_wherever_get_is(client, records):
    paths = ["/", f"/images/{records[0]['id']}", "/health", "/static/app.js", "/docs", "/openapi.json",
             "/images/no-such-id", "/nowhere"]
    for path in paths:
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code, (path, head.status_code, head.text)
        assert head.content == b"", path
        for name in ("content-type", "content-length", "content-security-policy", "etag"):
            assert head.headers.get(name) == get.headers.get(name), (path, name)
    head = client.head("/search", params={"q": "red", "k": 2})
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"] == "application/json"
    assert client.head("/search", params={"q": "red", "k": "x"}).status_code == 422
    r = client.head("/search/image")  # POST only: no GET, so no HEAD either
    assert r.status_code == 405 and "POST" in r.headers["allow"]


# -- the API page works offline ---------------------------------------------------------------------------------
def test_docs_page_loads_nothing_from_elsewhere(client):
    import re

    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "http" not in csp and "unsafe" not in csp
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", r.text)  # no inline script: the policy forbids one
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert any(u.endswith("swagger-ui-bundle.js") for u in refs) and any(u.endswith(".css") for u in refs)
    for url in refs:
        assert url.startswith("/"), url
        got = client.get(url)
        assert got.status_code == 200 and len(got.content) > 100, url
    assert "SwaggerUIBundle" in client.get("/static/docs.js").text
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc page loaded its script from a CDN


# -- new index generations are served without a restart ----------------------------------------------------------
@pytest.fixture
def fresh_index(ckpt, tmp_path) -> Path:
    return build_demo_index(ckpt, tmp_path / "live")


def _ids(c, k: int = MAX_K) -> set[str]:
    r = c.get("/search", params={"q": "red", "k": k})
    assert r.status_code == 200, r.text
    return {h["id"] for h in r.json()["results"]}


def test_removed_ids_are_not_served_after_index_remove(fresh_index, ckpt):
    from vsekit.index.build import remove_from_index

    with TestClient(create_app(fresh_index, reload_interval=0)) as c:
        before = _ids(c)
        gone = sorted(before)[0]
        assert len(before) == INDEX_IMAGES and c.get(f"/images/{gone}").status_code == 200
        remove_from_index(fresh_index, ids=[gone])
        after = _ids(c)
        assert after == before - {gone}  # the very next query
        assert c.get(f"/images/{gone}").status_code == 404
        assert c.get("/health").json()["images"] == INDEX_IMAGES - 1
        caps = c.get("/search", params={"q": "red", "k": MAX_K, "target": "captions"}).json()["results"]
        assert caps and all(h["image_id"] != gone for h in caps)


def test_reload_is_checked_at_most_every_interval(fresh_index, ckpt):
    from vsekit.index.build import remove_from_index

    with TestClient(create_app(fresh_index, reload_interval=3600)) as c:
        before = _ids(c)  # the first request looked; the next look is an hour away
        remove_from_index(fresh_index, ids=[sorted(before)[0]])
        assert _ids(c) == before
        sx = c.app.state.index
        sx._next_check = 0.0  # the hour is over
        assert len(_ids(c)) == INDEX_IMAGES - 1


def test_a_broken_new_generation_keeps_the_old_one_serving(fresh_index, ckpt, caplog):
    from vsekit.index.build import remove_from_index

    manifest = fresh_index / "manifest.json"
    good = manifest.read_text()
    with TestClient(create_app(fresh_index, reload_interval=0)) as c:
        before = _ids(c)
        broken = {**json.loads(good), "generation": "g999999"}  # names a folder that is not there
        manifest.write_text(json.dumps(broken))
        with caplog.at_level("WARNING", logger="vsekit.index.search"):
            assert _ids(c) == before and c.get("/health").json()["images"] == INDEX_IMAGES
        assert "cannot be opened" in caplog.text and "g999999" in caplog.text
        manifest.write_text(good)
        assert _ids(c) == before
        remove_from_index(fresh_index, ids=[sorted(before)[-1]])  # a good commit after the bad one is served
        assert _ids(c) == before - {sorted(before)[-1]}


def test_a_query_in_flight_keeps_its_generation(fresh_index, ckpt):
    """A switch while a query runs: the query's rows and records come from the generation it started with."""
    from vsekit.index.build import remove_from_index

    sx = SearchIndex.open(fresh_index, Embedder.from_checkpoint(ckpt))
    q = sx.embedder.encode_texts(["red"])
    with sx._pinned():
        old_images = sx.data.images
        remove_from_index(fresh_index, ids=[old_images[0]["id"]])
        assert sx.refresh() is True
        hits = sx.search_vectors(q, "captions", "images", MAX_K)[0]
        assert len(hits) == INDEX_IMAGES and sx.data.images is old_images
    assert sx.num_images == INDEX_IMAGES - 1 and sx.image_record(old_images[0]["id"]) is None
    assert sx.refresh() is False  # nothing new


# -- the Host header (DNS rebinding) ----------------------------------------------------------------------------
def test_allowed_hosts_policy():
    from vsekit.serve.app import allowed_hosts, host_name

    local = {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("127.0.0.1") == local
    assert allowed_hosts("localhost") == local and allowed_hosts("::1") == local
    assert allowed_hosts("127.0.0.2", ["Search.Example."]) == local | {"127.0.0.2", "search.example"}
    assert allowed_hosts("0.0.0.0") is None and allowed_hosts("192.0.2.7") is None  # any, unless named
    assert allowed_hosts("0.0.0.0", ["photos.lan"]) == local | {"photos.lan"}
    assert allowed_hosts("192.0.2.7", ["photos.lan"]) == local | {"photos.lan", "192.0.2.7"}
    assert host_name("[::1]:8000") == "::1" and host_name("LOCALHOST:80") == "localhost"
    for bad in ("", "a b", "evil.com:8000:1", "user@localhost", "[::1", "localhost:99999x", "local/host"):
        assert host_name(bad) is None, bad


@pytest.mark.parametrize("host, ok", [
    ("localhost", True), ("localhost:8000", True), ("127.0.0.1:8000", True), ("[::1]:8000", True),
    ("[::1]", True), ("LocalHost", True), ("photos.lan", True), ("photos.lan:443", True),
    ("evil.example", False), ("evil.example:8000", False), ("127.0.0.1.evil.example", False),
    ("localhost@evil.example", False), ("", False), ("localhost:8000:9", False), ("::1", False),
])
def test_host_header_must_name_this_server(app, index_dir, host, ok):
    from vsekit.serve.app import allowed_hosts

    guarded = create_app(app.state.index, allowed_hosts=allowed_hosts("127.0.0.1", ["photos.lan"]))
    with TestClient(guarded, base_url="http://localhost") as c:
        for method, path in (("GET", "/health"), ("GET", "/"), ("GET", "/search?q=red"), ("HEAD", "/")):
            r = c.request(method, path, headers={"host": host})
            if ok:
                assert r.status_code == 200, (host, path, r.text)
            else:
                assert r.status_code == 400, (host, path)
                if method == "GET":
                    assert_json_error(r, 400, "Host")
                    assert "allow-host" not in r.text  # no server command lines to clients


def test_k_digit_bound_follows_a_large_max_k(app):
    from vsekit.serve.app import ApiError, parse_k

    assert parse_k("1234567", 10**7) == 1234567  # 7 digits: max_k has 8
    with pytest.raises(ApiError, match="ASCII digits"):
        parse_k("9" * 5000, MAX_K)  # refused by its length, before any conversion
    with pytest.raises(ApiError, match="between 1 and 20"):
        parse_k("000021", MAX_K)


def test_a_qdrant_index_is_reopened_after_index_remove(ckpt, tmp_path):
    """The new generation's backend is opened beside the old one (a local-mode folder's one client is shared)
    and the old one released: removed ids are gone and the folder is not left locked."""
    pytest.importorskip("qdrant_client")
    from vsekit.index.backends.qdrant import _LOCAL_CLIENTS
    from vsekit.index.build import remove_from_index

    ix = build_demo_index(ckpt, tmp_path / "ix", "--backend", "qdrant", "--qdrant-path", str(tmp_path / "q"),
                          max_images=3)
    sx = SearchIndex.open(ix, Embedder.from_checkpoint(ckpt))
    try:
        with TestClient(create_app(sx, reload_interval=0)) as c:
            before = _ids(c)
            remove_from_index(ix, ids=[sorted(before)[0]])
            assert _ids(c) == before - {sorted(before)[0]}
            # the replaced backend let go of its share (other tests' folders may still hold clients of their own)
            assert [n for path, (_, n) in _LOCAL_CLIENTS.items() if path.startswith(str(tmp_path))] == [1]
    finally:
        sx.close()
    assert not [path for path in _LOCAL_CLIENTS if path.startswith(str(tmp_path))]
