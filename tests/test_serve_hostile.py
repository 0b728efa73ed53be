"""Hostile clients: huge-aspect images, transforms that must not hold the model lock, stalled and trickled
uploads, and malformed HTTP -- in process (ASGI) and through a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_index import build_demo_index, cli, png_of_size
from test_serve import assert_json_error  # tests/ is on sys.path (no package)

from vsekit.index import SearchIndex
from vsekit.inference import Embedder
from vsekit.serve.app import create_app

HUGE = [(100_000, 1), (40_000_000, 1), (1, 300_000)]  # the probes: a freeze, a 500, a MemoryError


@pytest.fixture(scope="module")
def sx(ckpt, tmp_path_factory) -> SearchIndex:
    ix = build_demo_index(ckpt, tmp_path_factory.mktemp("hostile") / "demo")
    return SearchIndex.open(ix, Embedder.from_checkpoint(ckpt, device="cpu"))


@pytest.fixture(scope="module")
def client(sx):
    with TestClient(create_app(sx)) as c:  # the default limits: 40M pixels pass 40000000 x 1
        yield c


@pytest.fixture(scope="module")
def good_png(sx) -> bytes:
    return Path(sx.data.images[0]["path"]).read_bytes()


def post_image(client, content: bytes, **data):
    return client.post("/search/image", files={"file": ("q.png", content, "image/png")}, data=data)




class CountingLock:
    """Stands in for the model lock and counts how often it is taken."""

    def __init__(self) -> None:
        self.lock, self.taken = threading.Lock(), 0

    def __enter__(self):
        self.lock.acquire()
        self.taken += 1
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


# -- huge-aspect images ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", HUGE, ids=lambda s: f"{s[0]}x{s[1]}")
def test_huge_aspect_images_are_refused_from_their_header(client, sx, monkeypatch, size):
    import vsekit.data.images as images

    data = png_of_size(*size)
    assert len(data) < 120_000  # a few hundred bytes to 40 KB
    decoded, transformed, lock = [], [], CountingLock()
    real_load = images.decode_rgb  # the decoder of every image (load_rgb calls it)
    monkeypatch.setattr(images, "decode_rgb", lambda *a, **k: decoded.append(a) or real_load(*a, **k))
    real_tf = sx.embedder.eval_transform
    monkeypatch.setattr(sx.embedder, "eval_transform", lambda: transformed.append(1) or real_tf())
    monkeypatch.setattr(sx, "_model_lock", lock)
    t0 = time.perf_counter()
    body = assert_json_error(post_image(client, data), 422, f"{size[0]}x{size[1]}", "aspect ratio", "20:1")
    assert time.perf_counter() - t0 < 2.0, body
    assert decoded == [] and transformed == [] and lock.taken == 0  # refused before any of them
    assert client.get("/search", params={"q": "a red star"}).status_code == 200  # and the server is fine


def test_resize_bound_refuses_what_the_model_would_blow_up(sx):
    """Within the aspect limit, the size the model's resize would make is bounded too."""
    app = create_app(sx, max_image_pixels=5000)
    with TestClient(app) as c:
        # 200 x 20 = 4000 pixels, 10:1, but the test model's resize (short side 32) makes 320 x 32 = 10240
        assert_json_error(post_image(c, png_of_size(200, 20)), 413, "320x32", "5000")
        assert post_image(c, png_of_size(60, 20)).status_code == 200  # 96 x 32 fits


def test_aspect_limit_is_configurable(sx):
    with TestClient(create_app(sx, max_aspect_ratio=2)) as c:
        assert_json_error(post_image(c, png_of_size(90, 30)), 422, "3:1", "2:1")
        assert post_image(c, png_of_size(60, 30)).status_code == 200
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        create_app(sx, max_aspect_ratio=0.5)


def test_image_transform_runs_outside_the_model_lock(client, sx, good_png, monkeypatch):
    """While an upload is in its transform (stalled here until released), a text search -- which needs the
    model lock -- completes. The transform used to run under the lock, so the search waited for it."""
    real = sx.embedder.eval_transform
    entered, release = threading.Event(), threading.Event()

    def slow_eval_transform():
        tf = real()

        def run(image):
            entered.set()
            release.wait(20)
            return tf(image)

        return run

    monkeypatch.setattr(sx.embedder, "eval_transform", slow_eval_transform)
    upload: dict = {}
    t = threading.Thread(target=lambda: upload.update(r=post_image(client, good_png, k="2")))
    t.start()
    try:
        assert entered.wait(20), "the upload never reached its transform"
        text: dict = {}
        s = threading.Thread(target=lambda: text.update(r=client.get("/search", params={"q": "a red star"})))
        s.start()
        s.join(10)
        finished_while_stalled = not s.is_alive()
    finally:
        release.set()
        t.join(20)
    assert finished_while_stalled, "the text search waited for the upload's transform: the lock was held"
    assert text["r"].status_code == 200 and upload["r"].status_code == 200, upload["r"].text
    assert len(upload["r"].json()["results"]["captions"]) == 2


def test_embed_image_equals_the_embedders_own(sx, good_png):
    """The split (transform outside the lock, forward pass inside) embeds exactly as Embedder does."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    image = Image.open(io.BytesIO(good_png)).convert("RGB")
    emb = sx.embedder
    with torch.no_grad():
        own = emb.model.encode_images(emb.eval_transform()(image)[None].to(emb.device)).float().cpu().numpy()
    np.testing.assert_allclose(sx.embed_image(image), own, atol=1e-6)


# -- stalled uploads, in process --------------------------------------------------------------------------
def _asgi_upload(app, chunks, timeout: float = 10.0) -> tuple[int, dict, float]:
    """POST /search/image straight into the ASGI app; ``chunks(i)`` is awaited for the i-th body piece."""
    sent: list[dict] = []

    async def main() -> None:
        i = 0

        async def receive() -> dict:
            nonlocal i
            i += 1
            return {"type": "http.request", "body": await chunks(i), "more_body": True}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/search/image", "raw_path": b"/search/image", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
                 "headers": [(b"host", b"testserver"), (b"content-length", b"60000"),
                             (b"content-type", b"multipart/form-data; boundary=b")]}
        await asyncio.wait_for(app(scope, receive, send), timeout)

    t0 = time.perf_counter()
    asyncio.run(main())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert dict(start["headers"]).get(b"connection") == b"close"
    return start["status"], body, time.perf_counter() - t0


def test_stalled_upload_is_408_after_the_read_timeout(sx):
    app = create_app(sx, read_timeout=0.3, body_timeout=5)

    async def stall(i: int) -> bytes:
        if i > 1:
            await asyncio.Event().wait()  # the client sends nothing more, ever
        return b"--b\r\n"

    status, body, took = _asgi_upload(app, stall)
    assert status == 408 and body["status"] == 408 and "stalled" in body["error"], body
    assert took < 3


def test_trickled_upload_is_408_after_the_body_timeout(sx):
    app = create_app(sx, read_timeout=0.5, body_timeout=1.0)

    async def trickle(i: int) -> bytes:
        await asyncio.sleep(0.05)  # always something, never enough
        return b"x"

    status, body, took = _asgi_upload(app, trickle)
    assert status == 408 and "within 1 s" in body["error"], body
    assert 0.9 < took < 4


# -- a real server on loopback ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def port(sx):
    from vsekit.serve.server import bound_socket, make_server

    app = create_app(sx, read_timeout=0.5, body_timeout=1.0)
    server = make_server(app, read_timeout=0.5, body_timeout=1.0, keep_alive_timeout=1.0, log_level="error",
                         access_log=False)
    sock = bound_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def exchange(port: int, data: bytes, *, more: tuple[bytes, ...] = (), gap: float = 0.0,
             timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` (then each of ``more`` after ``gap`` seconds) and read until the server closes."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        for piece in more:
            time.sleep(gap)
            try:
                s.sendall(piece)
            except OSError:  # closed by the server meanwhile
                break
        out = b""
        while True:
            try:
                got = s.recv(65536)
            except ConnectionResetError:
                break
            if not got:
                break
            out += got
    return out, time.perf_counter() - t0


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_raw_json_error(raw: bytes, status: int, *words: str) -> None:
    code, headers, body = parse(raw)
    assert code == status, raw[:300]
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)
    assert err["status"] == status and all(w in err["error"] for w in words), err


def test_real_server_answers(port):
    raw, _ = exchange(port, b"GET /search?q=red&k=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    code, _, body = parse(raw)
    assert code == 200 and len(json.loads(body)["results"]) == 2


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nthis is no header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
], ids=["garbage", "bad-header", "bad-length", "no-host"])
def test_malformed_http_is_a_json_400(port, request_bytes):
    raw, _ = exchange(port, request_bytes)
    assert_raw_json_error(raw, 400, "malformed")


def test_oversized_request_head_is_a_json_431(port):
    raw, _ = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000)
    assert_raw_json_error(raw, 431, "headers are larger")


def test_stalled_headers_are_408_and_silent_connections_closed(port):
    raw, took = exchange(port, b"GET /health HTTP/1.1\r\nHo")
    assert_raw_json_error(raw, 408, "headers did not arrive")
    assert took < 5
    raw, took = exchange(port, b"")
    assert raw == b"" and took < 5  # closed without a word: nobody asked anything


def test_stalled_upload_through_the_server_is_408(port):
    head = (b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 50000\r\n\r\n--b\r\n")
    raw, took = exchange(port, head)
    assert_raw_json_error(raw, 408, "stalled")
    assert took < 5


def test_unread_body_trickled_after_the_reply_is_cut_off(port):
    """/health does not read a body; a client that keeps trickling one is disconnected at the body limit."""
    raw, took = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
                         more=(b"x",) * 40, gap=0.1)
    assert parse(raw)[0] == 200 and took < 3.9  # 40 pieces would take 4 s


def test_many_stalled_connections_are_all_released(port):
    """The issue's probe held 800 connections open forever; now each is closed at the read timeout."""
    head = (b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 50000\r\n\r\n")
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(60)]
    try:
        for i, s in enumerate(socks):
            s.sendall(head if i % 2 else head[:30])  # half stall in the body, half in the headers
        t0 = time.perf_counter()
        closed = 0
        for s in socks:
            while s.recv(65536):
                pass
            closed += 1
        assert closed == len(socks) and time.perf_counter() - t0 < 8
    finally:
        for s in socks:
            s.close()
    raw, _ = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert parse(raw)[0] == 200


# -- the command line -------------------------------------------------------------------------------------
def test_serve_options_reach_the_app_and_the_server(sx, monkeypatch, capsys):
    import vsekit.serve.app as app_module
    import vsekit.serve.server as server_module

    seen: dict = {}

    def fake_create_app(index, **kw):
        seen["app"] = kw
        return object()

    class FakeServer:
        def run(self, sockets=None) -> None:
            seen["ran"] = [s.getsockname() for s in sockets]

    def fake_make_server(app, host, port, **kw):
        seen["server"] = {"host": host, "port": port, **kw}
        return FakeServer()

    monkeypatch.setattr(app_module, "create_app", fake_create_app)
    monkeypatch.setattr(server_module, "make_server", fake_make_server)
    assert cli("serve", sx.index_dir, "--read-timeout", "2.5", "--body-timeout", "30", "--keep-alive-timeout", "3",
               "--max-aspect-ratio", "8", "--port", "0", "--allow-host", "photos.lan",
               "--allow-host", "[::1]", "--reload-interval", "0.25", "--max-decode-bytes", "64M", "--max-decodes", "2",
               "--decode-wait", "1.5") == 0
    port = seen["ran"][0][1]
    assert port > 0 and seen["ran"] == [("127.0.0.1", port)]  # --port 0: a free port, bound before the run
    assert seen["server"] == {"host": "127.0.0.1", "port": port, "read_timeout": 2.5, "body_timeout": 30.0,
                              "keep_alive_timeout": 3.0}
    assert f"serving {sx.index_dir} on http://127.0.0.1:{port}/" in capsys.readouterr().out  # the real port
    assert seen["app"]["read_timeout"] == 2.5 and seen["app"]["body_timeout"] == 30.0
    assert seen["app"]["max_aspect_ratio"] == 8.0
    assert seen["app"]["allowed_hosts"] == {"localhost", "127.0.0.1", "::1", "photos.lan"}
    assert seen["app"]["reload_interval"] == 0.25
    assert (seen["app"]["max_decode_bytes"], seen["app"]["max_decodes"], seen["app"]["decode_wait"]) == (64 << 20, 2, 1.5)
    with pytest.raises(SystemExit):
        cli("serve", sx.index_dir, "--read-timeout", "0")


# -- uploads reach only raster decoders, in memory, a bounded number at once (issue 21) -----------------------
def _no_server_internals(text: str) -> None:
    import tempfile

    for internal in (tempfile.gettempdir(), "/tmp", ".upload", "Ghostscript", "gs ", "-dBATCH", "-sDEVICE"):
        assert internal not in text, f"{internal!r} in {text}"


@pytest.mark.parametrize("name", ["eps_as.jpg", "psd.png"])
def test_foreign_formats_are_refused_with_no_decoder_run_and_no_path_echoed(client, monkeypatch, name):
    from test_images import EPS, _psd, record_foreign_plugins

    calls = record_foreign_plugins(monkeypatch)
    data = EPS if name.startswith("eps") else _psd()
    r = client.post("/search/image", files={"file": (name, data, "image/jpeg")})
    assert_json_error(r, 415, "not an image in a format this server reads", "JPEG, PNG")
    _no_server_internals(r.text)
    assert calls == []  # neither the EPS/PSD plugin nor Ghostscript ever ran


def test_a_jpeg_scan_bomb_upload_is_refused_before_decoding(client):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG", progressive=True)
    good = buf.getvalue()
    sos = good.rfind(b"\xff\xda")
    scan = good[good.rfind(b"\xff\xda", 0, sos): sos].split(b"\xff\xc4")[0]
    r = client.post("/search/image", files={"file": ("q.jpg", good[:sos] + scan * 150 + good[sos:], "image/jpeg")})
    assert_json_error(r, 415, "more than 100 scans")
    _no_server_internals(r.text)


def test_uploads_are_decoded_in_memory_never_written_to_a_file(client, good_png, monkeypatch):
    import tempfile

    def no_files(*a, **k):
        raise AssertionError("an upload was written to a temporary file")

    for fn in ("NamedTemporaryFile", "mkstemp", "TemporaryFile", "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, fn, no_files)
    assert post_image(client, good_png, k="1").status_code == 200
    r = post_image(client, good_png[: len(good_png) // 2])  # corrupt: the reason names "the upload" only
    assert_json_error(r, 415, "not a readable image")
    _no_server_internals(r.text)


def test_decode_memory_budget_refuses_from_the_header(sx, monkeypatch):
    """An upload whose header says decoding it would take more than max_decode_bytes gets 413 before any
    pixel is decoded (a 16-bit grey PNG of 2000 x 2000 takes 2 + 5 bytes a pixel: 28 MB)."""
    import io

    import numpy as np
    from PIL import Image, PngImagePlugin

    buf = io.BytesIO()
    Image.fromarray(np.zeros((2000, 2000), dtype=np.uint16)).save(buf, format="PNG")
    loads: list[int] = []
    real_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1) or real_load(self))
    with TestClient(create_app(sx, max_decode_bytes=20 << 20)) as c:
        r = post_image(c, buf.getvalue())
        assert_json_error(r, 413, "2000x2000", "mode I;16", "27 MiB", "20 MiB")
        _no_server_internals(r.text)
        assert loads == []
    with TestClient(create_app(sx, max_decode_bytes=30 << 20)) as c:
        assert post_image(c, buf.getvalue()).status_code == 200
    with pytest.raises(ValueError, match="limits"):
        create_app(sx, max_decodes=0)


def _concurrent_uploads(app, data: bytes, n: int, on_reply=lambda r: None) -> list:
    """Send ``n`` uploads at once through ``app``; the replies in the order they finished (``on_reply`` is
    called with each as it arrives)."""
    import httpx

    async def scenario() -> list:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as c:
            tasks = [asyncio.ensure_future(c.post("/search/image", files={"file": ("q.png", data, "image/png")},
                                                  data={"k": "1"})) for _ in range(n)]
            done: list = []
            for t in asyncio.as_completed(tasks):
                done.append(await t)
                on_reply(done[-1])
            return done

    return asyncio.run(scenario())


def test_concurrent_decodes_are_bounded_and_the_excess_refused_after_the_wait(sx, good_png, monkeypatch):
    """max_decodes=2: two uploads decode at once; a third waits decode_wait seconds for a slot, then gets 503
    with Retry-After -- never a third decode at the same time."""
    import vsekit.serve.app as app_module

    running, most, release = [0], [0], threading.Event()
    lock = threading.Lock()

    def blocking_query(sx, data, targets, k, *limits):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            release.wait(20)
            return {t: [] for t in targets}
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(app_module, "_image_query", blocking_query)
    app = create_app(sx, max_decodes=2, decode_wait=0.3)
    # the two decoding are held until the third has its answer
    replies = _concurrent_uploads(app, good_png, 3, on_reply=lambda r: release.set())
    assert [r.status_code for r in replies] == [503, 200, 200], [r.text for r in replies]
    assert_json_error(replies[0], 503, "busy decoding 2 other images")
    assert replies[0].headers["retry-after"] == "1"
    assert most[0] == 2 and app.state.decode_slots.busy == 0

    # with a longer wait the third is queued, not refused, and still never runs beside the other two
    release.clear()
    most[0] = 0

    def release_once_two_run() -> None:
        deadline = time.monotonic() + 20
        while most[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the third is waiting for a slot now
        release.set()

    app = create_app(sx, max_decodes=2, decode_wait=10)
    threading.Thread(target=release_once_two_run, daemon=True).start()
    replies = _concurrent_uploads(app, good_png, 3)
    assert [r.status_code for r in replies] == [200, 200, 200] and most[0] == 2


@pytest.mark.parametrize("option, value", [
    ("--port", "99999"), ("--port", "-1"), ("--port", "80a"), ("--port", "\u0665"), ("--max-upload-bytes", "0"),
    ("--max-upload-bytes", "0K"), ("--max-decode-bytes", "0"), ("--max-decodes", "0"), ("--decode-wait", "0"),
    ("--reload-interval", "-1"), ("--reload-interval", "inf"),
])
def test_serve_refuses_bad_options_in_one_line(tmp_path, capsys, option, value):
    """argparse's usage error (exit 2), not a traceback from deep in the server or the app."""
    with pytest.raises(SystemExit) as e:
        cli("serve", tmp_path, option, value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err


def test_serve_on_a_port_in_use_is_one_error_line(sx, capsys):
    """It used to print "serving on ..." and then exit with 3, the training-collapse code."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = cli("serve", sx.index_dir, "--port", port)
    out, err = capsys.readouterr()
    assert rc not in (0, 3) and "serving" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], err


# -- HTTP framing and methods through the real server ----------------------------------------------------------
@pytest.mark.parametrize("head", [
    b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"POST /search/image HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nContent-Length: 0\r\n",
    b"POST /search/image HTTP/1.0\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
], ids=["cl-te", "te-cl", "te-case", "http10"])
def test_content_length_with_transfer_encoding_is_400_and_closed(port, head):
    """RFC 9112 6.3: both framings in one request is a smuggling attempt; h11 read it as chunked and kept the
    connection open, so the bytes after the chunks were read as a second request."""
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    raw, took = exchange(port, head + b"\r\n0\r\n\r\n" + smuggled)
    assert_raw_json_error(raw, 400, "Content-Length and Transfer-Encoding")
    assert raw.count(b"HTTP/1.1 ") == 1 and took < 3  # one reply, then closed: the smuggled one is never read


def test_head_through_the_real_server_keeps_the_connection(port):
    req = b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raw, _ = exchange(port, req)
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200") and b"content-length:" in first.lower()
    assert rest.startswith(b"HTTP/1.1 200")  # no body after the HEAD reply: the next reply follows at once


# -- the whole command, as a user runs it ------------------------------------------------------------------------
@pytest.mark.slow  # a process of its own: about 7 s
def test_vsekit_serve_end_to_end(ckpt, tmp_path):
    """``vsekit serve --port 0`` in its own process: the printed port answers; a foreign Host is refused; an id
    removed by ``vsekit index remove`` meanwhile is gone from the next search (no restart)."""
    import os
    import subprocess
    import sys

    index = build_demo_index(ckpt, tmp_path / "served")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    log = (tmp_path / "serve.log").open("w")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen([sys.executable, "-m", "vsekit", "serve", str(index), "--port", "0", "--device", "cpu",
                             "--reload-interval", "0"], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the socket is bound and listening
        assert line.startswith("serving ") and "http://127.0.0.1:" in line, (line, proc.poll())
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        ask = b"GET /search?q=red&k=20 HTTP/1.1\r\nHost: localhost:%d\r\nConnection: close\r\n\r\n" % port
        code, _, body = parse(exchange(port, ask, timeout=60)[0])
        ids = {h["id"] for h in json.loads(body)["results"]}
        assert code == 200 and len(ids) == 8
        raw, _ = exchange(port, b"GET /health HTTP/1.1\r\nHost: rebound.example:%d\r\nConnection: close\r\n\r\n" % port)
        assert_raw_json_error(raw, 400, "Host")
        gone = sorted(ids)[0]
        assert cli("index", "remove", index, "--ids", gone) == 0
        code, _, body = parse(exchange(port, ask, timeout=60)[0])
        assert code == 200 and {h["id"] for h in json.loads(body)["results"]} == ids - {gone}
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()
        log.close()
