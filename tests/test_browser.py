"""End to end in a real browser: ``vsekit serve``'s page in headless Chromium, driven by Playwright.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright`` Python package; Playwright's own
browser downloads are not used. Skipped, with the reason, when either is missing.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from test_index import INDEX_IMAGES, build_demo_index

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="the playwright package is not installed "
                                                       "(pip install playwright; no browser download needed)"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
]


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """``vsekit serve``'s app under uvicorn in a background thread, on a free port of 127.0.0.1."""
    import uvicorn

    from vsekit.serve.app import create_app

    index_dir = build_demo_index(ckpt, tmp_path_factory.mktemp("browser") / "demo")
    app = create_app(index_dir)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{sock.getsockname()[1]}", "app": app}
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        yield page, errors
        ctx.close()


def images_loaded(page) -> bool:
    return page.evaluate("() => [...document.querySelectorAll('#results .card img')]"
                         ".every(i => i.complete && i.naturalWidth > 0)")


def test_text_search_shows_result_images(server, browser_page, tmp_path):
    page, errors = browser_page
    page.goto(server["url"] + "/")
    page.wait_for_function("() => document.querySelector('#facts').textContent.includes('images')")
    assert f"{INDEX_IMAGES} images" in page.inner_text("#facts")
    page.select_option("#k", "5")
    page.fill("#q", "a purple disc above a large purple disc")
    page.press("#q", "Enter")
    page.wait_for_selector("#results .card img")
    page.wait_for_function("() => [...document.querySelectorAll('#results .card img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=15000)
    cards = page.locator("#results .card")
    assert cards.count() == 5
    assert images_loaded(page)
    first = cards.nth(0)
    assert first.locator(".rank").inner_text() == "#1"
    assert first.locator(".score").inner_text().startswith("score ")
    assert first.locator(".text").inner_text()  # the image's caption
    assert "5 images for" in page.inner_text("#status")
    assert "q=a+purple+disc" in page.url  # the search is linkable
    shot = tmp_path / "search_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not errors, errors


def test_image_upload_shows_captions(server, browser_page, tmp_path):
    page, errors = browser_page
    rec = server["app"].state.index.data.images[1]
    page.goto(server["url"] + "/")
    page.wait_for_function("() => document.querySelector('#facts').textContent.includes('images')")
    page.set_input_files("#file", rec["path"])
    page.select_option("#target", "captions")
    page.click("#upload-btn")
    page.wait_for_selector("#results .card.caption")
    page.wait_for_function("() => [...document.querySelectorAll('#results .card img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=15000)
    assert page.locator("#results .card.caption").count() == 10
    assert page.locator("#results .card.caption .text").first.inner_text().startswith("\u201c")
    assert "captions for" in page.inner_text("#status")
    assert page.is_visible("#preview")
    page.screenshot(path=str(tmp_path / "image_to_text.png"), full_page=True)
    page.select_option("#target", "images")
    page.click("#upload-btn")
    page.wait_for_selector("#results .card.image")
    assert page.locator("#results .card.image .id").first.inner_text() == f"image {rec['id']}"  # itself, first
    assert not errors, errors


def test_errors_are_shown_on_the_page(server, browser_page):
    page, errors = browser_page
    page.goto(server["url"] + "/?q=" + "x" * 600)  # longer than the server's limit
    page.wait_for_selector("#error:not([hidden])")
    assert "limit is 500" in page.inner_text("#error")
    assert page.locator("#results .card").count() == 0
    errors.clear()  # the browser logs the 422 itself


def test_api_docs_render_offline_under_their_policy(server, browser_page, tmp_path):
    """/docs draws the API from this server's own files: no request leaves it (the page loaded Swagger UI
    from a CDN, without integrity checks), and nothing breaks the page's Content-Security-Policy."""
    page, errors = browser_page
    errors.clear()
    elsewhere: list[str] = []

    def only_here(route) -> None:  # as offline: anything not from this server fails
        if route.request.url.startswith(server["url"]):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    try:
        page.goto(server["url"] + "/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=20000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert {"/search", "/search/image", "/health"} <= {p.replace("\u200b", "") for p in paths}
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
    finally:
        page.unroute("**/*")
    assert not elsewhere, elsewhere
    assert not errors, errors  # a policy violation is a console error ("Refused to ...")
