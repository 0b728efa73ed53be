"""The FastAPI app behind ``vsekit serve``: JSON search endpoints, indexed images by id, and a search page.

Every input a client controls is checked before it reaches the model, and every refusal is a 4xx with a
JSON body ``{"error": message, "status": code}`` (the framework's own plain-text replies, such as a bad
``Range``, rewritten by :class:`JsonErrors`; the HTTP layer's by :mod:`vsekit.serve.server`). Uploads are
counted and timed while they arrive (:func:`_read_body`), checked from their header and decoded in memory, a
few at a time (:func:`_decode_image`, :class:`_DecodeSlots`): an upload is never written to a file. Images
are served by id only, as the index's own JPEG thumbnails (:mod:`vsekit.index.thumbnails`), never the file a
record's ``path`` names (why: docs/search.md, "Thumbnails").

The routes are module-level functions on :data:`router`, shared by every app; what one app serves -- its
index, its :class:`~vsekit.serve.limits.Limits`, its decode slots -- is in ``app.state``, read through
dependencies.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import json
import logging
import re
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from vsekit.data import images
from vsekit.index import SearchIndex, SearchIndexError, SearchResult
from vsekit.index.data import TARGETS
from vsekit.index.thumbnails import MEDIA_TYPE as THUMBNAIL_MEDIA_TYPE
from vsekit.index.thumbnails import ThumbnailError
from vsekit.serve.limits import DEFAULT_RELOAD_INTERVAL, Limits

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# Swagger UI (swagger-ui-bundle.js, swagger-ui.css, favicon.png) as the fastapi-offline package ships it
SWAGGER_UI = Path(str(resources.files("fastapi_offline") / "static"))
FORM_OVERHEAD = 64 * 1024  # multipart boundaries, part headers and the small fields beside the file
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
# /docs: Swagger UI's files are served from here (SWAGGER_UI); its icons are data: URIs in its own stylesheet
DOCS_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
}
# What a thumbnail is sent with: its bytes are a JPEG the index made (checked before sending), and even so
# nothing in it may run or be sniffed into something else; caches revalidate after a while (an id removed and
# added again is another image), cheaply through the ETag.
THUMBNAIL_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "public, max-age=300",
    "Accept-Ranges": "none",
}
# What every other reply is sent with (JSON, the page's scripts and styles, Swagger UI's files, the framework's
# errors): no reply is sniffed into another type, and one that a browser opens as a document -- such as
# /static/index.html, the page's file reached by its own name instead of through "/" -- may run nothing.
DEFAULT_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; sandbox",
    "X-Content-Type-Options": "nosniff",
}
_UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "the query image"},
        "k": {"type": "integer", "default": 10, "description": "results per target"},
        "target": {"type": "string", "enum": [*TARGETS, "both"], "description": "captions (image -> text, "
                   "default when the index has captions), images (image -> image) or both"}}}}}}


class ApiError(Exception):
    """A refusal with an HTTP status and a message for the client. ``close``: end the connection after the
    reply (the request body was not read to its end)."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status)


class JsonErrors:
    """ASGI middleware: an error reply (status >= 400) that is not JSON -- Starlette's own plain-text
    answers, such as a malformed or unsatisfiable ``Range`` on a file -- is rewritten to
    ``{"error": text, "status": code}``, keeping its status and headers (``Content-Range``, ``Allow``)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def send_json_errors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                ctype = dict(message.get("headers", [])).get(b"content-type", b"")
                if not ctype.startswith(b"application/json"):
                    held.update(start=message, body=[])
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"].append(message.get("body", b""))
                if message.get("more_body"):
                    return
                start = held.pop("start")
                await self._send_json(send, start, b"".join(held["body"]))
                return
            await send(message)

        await self.app(scope, receive, send_json_errors)

    @staticmethod
    async def _send_json(send, start: dict[str, Any], text: bytes) -> None:
        status = start["status"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        message = " ".join(text.decode("utf-8", "replace").split())[:300]
        if status == 416:
            size = dict(headers).get(b"content-range", b"").decode("latin-1").rpartition("/")[2]
            message = f"the Range header asks for bytes outside the file ({size} bytes)"
        body = json.dumps({"error": message or HTTPStatus(status).phrase, "status": status}).encode()
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class DefaultHeaders:
    """ASGI middleware: the headers of :data:`DEFAULT_HEADERS` on every reply that does not set its own, whatever
    made it (a route, a static files mount, a middleware's refusal). The routes that serve a document (the
    page, /docs) and the thumbnails set their own policies; nothing else is meant to be opened as a page."""

    def __init__(self, app, headers: dict[str, str] = DEFAULT_HEADERS) -> None:
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_defaults(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_defaults)


_K = re.compile("[0-9]+")  # [0-9], not \d: \d is any Unicode digit
# The most digits a request's k may have (it is then compared with max_k).
MAX_K_DIGITS = 6


def parse_k(value: Any, max_k: int) -> int:
    """A request's ``k`` (a query parameter or a form field) -> an int in 1..``max_k``, or a 422. One parser
    for every route: ASCII digits only, at most :data:`MAX_K_DIGITS` of them (or as many as ``max_k`` has),
    so that what Python's ``int()`` also takes (``1_0``, ``" 5"``, ``+5``, Arabic-Indic or full-width digits)
    is refused alike, and a thousand-digit number is not converted at all."""
    if isinstance(value, int) and not isinstance(value, bool):  # a default, not a client's text
        value = str(value)
    text = value if isinstance(value, str) else None
    digits = max(MAX_K_DIGITS, len(str(max_k)))
    if text is None or len(text) > digits or not _K.fullmatch(text):
        shown = _short(text, 40) if text is not None else f"a {type(value).__name__}"
        raise ApiError(422, f"k must be an integer written in ASCII digits 0-9, got {shown!r}")
    value = int(text)
    if not 1 <= value <= max_k:
        raise ApiError(422, f"k must be between 1 and {max_k}, got {value}")
    return value


def check_once(params: Any, names: Iterable[str]) -> None:
    """A 422 when a query parameter or form field of ``names`` is given more than once (``k=1&k=100``): the
    framework would read the last, a proxy or filter in front may have checked the first."""
    for name in names:
        if (n := len(params.getlist(name))) > 1:
            raise ApiError(422, f"{name} is given {n} times; give it once")


class HeadAsGet:
    """ASGI middleware: HEAD is answered wherever GET is (RFC 9110 9.3.2), by the GET route itself, with the
    same status and headers (``Content-Length`` and ``Content-Type`` included) and no body. FastAPI's routes
    answer only the methods they name, so without this a HEAD on the page or an image was a 405."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                await send(message)
            elif not message.get("more_body"):  # the body's last piece (or a pathsend): end it empty
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_HOST = re.compile(r"(?:\[(?P<ip6>[0-9a-fA-F:.]+)\]|(?P<name>[^\[\]:@/\\\s]+))(?::(?P<port>[0-9]{0,5}))?")


def host_name(value: str) -> str | None:
    """The host a ``Host`` header names, lowercased, without its port, brackets or one trailing dot
    (``[::1]:8000`` -> ``::1``, ``LocalHost.`` -> ``localhost``); None when it is not a plain host[:port]."""
    m = _HOST.fullmatch(value)
    if m is None:
        return None
    name = (m.group("ip6") or m.group("name")).lower()
    return name[:-1] if name.endswith(".") and len(name) > 1 else name


def name_of(host: str) -> str | None:
    """A host as the command line gives it (``photos.lan``, ``::1``, ``[::1]``, ``localhost:8000``) in the
    form :func:`host_name` gives a ``Host`` header's; None when it is not a host name or address."""
    text = host.strip()
    return host_name(f"[{text}]" if text.count(":") > 1 and not text.startswith("[") else text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback: ``localhost``, 127.0.0.0/8, ::1."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The ``Host`` names a server bound to ``bound`` answers (None: any). Bound to a loopback address, only
    the names of this machine (``localhost``, ``127.0.0.1``, ``[::1]``, ``bound`` itself) and ``extra``: a web
    page elsewhere whose name an attacker points at 127.0.0.1 (DNS rebinding) then gets a 400, not the API.
    Bound elsewhere (a LAN address, ``0.0.0.0``), any Host unless ``extra`` names some: then those, the
    loopback names and ``bound`` (when it is one address, not a wildcard)."""
    extra = [n for n in (name_of(e) for e in extra) if n]
    if not is_loopback(bound) and not extra:
        return None
    names = set(LOOPBACK_NAMES) | set(extra)
    own = name_of(bound)
    if own and own not in ("0.0.0.0", "::"):
        names.add(own)
    return frozenset(names)


class HostCheck:
    """ASGI middleware: a request whose ``Host`` header is not one of ``names`` (see :func:`allowed_hosts`),
    or that has none or several, gets a JSON 400 before any route sees it."""

    def __init__(self, app, names: Iterable[str]) -> None:
        self.app, self.names = app, frozenset(names)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            hosts = [v for k, v in scope["headers"] if k.lower() == b"host"]
            name = host_name(hosts[0].decode("latin-1")) if len(hosts) == 1 else None
            if name not in self.names:
                shown = _short(hosts[0].decode("latin-1"), 60) if len(hosts) == 1 else f"{len(hosts)} Host headers"
                logger.info("refused a request for Host %r (vsekit serve --allow-host NAME accepts a name)", shown)
                await _error(400, f"this server does not answer for the host in the request's Host header "
                                  f"({shown!r})")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ReloadIndex:
    """ASGI middleware: before a request, at most every ``interval`` seconds, the index looks whether a newer
    generation was committed (:meth:`SearchIndex.refresh`: one ``stat``), and switches to it. Opening it
    runs in the thread pool; requests meanwhile are answered from the generation they found."""

    def __init__(self, app, index: SearchIndex, interval: float) -> None:
        self.app, self.index, self.interval = app, index, interval

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.index.refresh_due():
            await run_in_threadpool(self.index.refresh, self.interval)
        await self.app(scope, receive, send)


def _short(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[:n] + "..."


def create_app(index: str | Path | SearchIndex, *, checkpoint: str | Path | None = None, device: str = "auto",
               rerank: int | None = None, allowed_hosts: Iterable[str] | None = None,
               reload_interval: float = DEFAULT_RELOAD_INTERVAL, limits: Limits | None = None,
               **limit: Any) -> FastAPI:
    """The app for one index, whose model is loaded once here (``index`` may also be an open
    :class:`SearchIndex`). ``limits``: :class:`Limits`; a keyword named as one of its fields sets that one
    (``create_app(ix, max_k=20)``). ``rerank``: the shortlist a similarity network's index reranks (default:
    the index's). ``allowed_hosts``: the only ``Host`` header names answered (:func:`allowed_hosts` makes the
    set ``vsekit serve`` uses); None, any. ``reload_interval``: seconds between looks for a new generation
    (:meth:`SearchIndex.refresh`; 0, before every request)."""
    limits = replace(limits or Limits(), **limit)
    if not reload_interval >= 0:
        raise ValueError("reload_interval must be >= 0 seconds")
    sx = index if isinstance(index, SearchIndex) else SearchIndex.open(
        index, checkpoint=checkpoint, device=device, rerank=rerank)
    app = FastAPI(title="vsekit search", version="1", docs_url=None, redoc_url=None,
                  description="Text -> image and image -> text search over one vsekit index. "
                              "Errors are JSON: {\"error\": message, \"status\": code}.",
                  exception_handlers=ERROR_HANDLERS)
    app.state.index, app.state.limits = sx, limits
    app.state.decode_slots = _DecodeSlots(limits.max_decodes, limits.decode_wait)
    # the last added runs first: the default headers of every reply, HEAD -> GET, then the Host check, a look
    # for a new index generation, and JSON for the framework's own plain-text errors
    app.add_middleware(JsonErrors)
    app.add_middleware(ReloadIndex, index=sx, interval=reload_interval)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, names=[n for n in (name_of(h) for h in allowed_hosts) if n])
    app.add_middleware(HeadAsGet)
    app.add_middleware(DefaultHeaders)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=SWAGGER_UI), name="docs-assets")
    app.openapi = functools.partial(_openapi, app)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI schema, with its own limits in the documentation of ``/search``'s ``q`` and ``k``
    (the routes are shared by every app; the limits are each app's). ``k`` is read as a string by
    :func:`parse_k`, as the upload's is, and documented as the integer it must be."""
    if app.openapi_schema is None:
        limits = app.state.limits
        said = {"q": f"the text query, at most {limits.max_query_chars} characters",
                "k": f"number of results, 1..{limits.max_k}"}
        for p in FastAPI.openapi(app)["paths"]["/search"]["get"]["parameters"]:
            if p["name"] in said:
                p["description"] = p["schema"]["description"] = said[p["name"]]
            if p["name"] == "k":
                p["schema"]["maximum"] = limits.max_k
    return app.openapi_schema


# -- errors ---------------------------------------------------------------------------------------------
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    resp = _error(exc.status, exc.message)
    if exc.close:
        resp.headers["Connection"] = "close"
    return resp


async def _index_error(request: Request, exc: SearchIndexError) -> JSONResponse:
    return _error(getattr(exc, "status", 400), str(exc))  # ImageSizeError: 413/422; NoKnownWordsError: 422


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    resp = _error(exc.status_code, str(exc.detail))
    resp.headers.update(exc.headers or {})
    return resp


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body")),
                 "message": str(e.get("msg", "invalid"))} for e in exc.errors()]
    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems) or "invalid request"
    return _error(422, text, problems=problems)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error serving %s %s", request.method, request.url.path)
    return _error(500, "internal server error")


ERROR_HANDLERS = {ApiError: _api_error, SearchIndexError: _index_error, StarletteHTTPException: _http_error,
                  RequestValidationError: _validation_error, Exception: _unexpected}


# -- routes: every app's; what each app serves, with its limits, is in app.state ---------------------------
async def _index(request: Request) -> SearchIndex:
    return request.app.state.index


async def _limits(request: Request) -> Limits:
    return request.app.state.limits


Index = Annotated[SearchIndex, Depends(_index)]
RequestLimits = Annotated[Limits, Depends(_limits)]
router = APIRouter()


def _check_target(sx: SearchIndex, target: Any, allowed: tuple[str, ...]) -> str:
    if target not in allowed:
        raise ApiError(422, f"target must be one of {', '.join(allowed)}, got {_short(str(target), 40)!r}")
    if target in ("captions", "both") and not sx.has_captions:
        raise ApiError(400, "this index holds no captions; search with target=images")
    return target


def _hit_json(sx: SearchIndex, h: SearchResult) -> dict[str, Any]:
    d = h.to_dict()
    d.pop("path")  # server file paths stay on the server; clients fetch image_url
    # only images the index holds a thumbnail of have a URL (not those of precomputed features or old indexes)
    d["image_url"] = f"/images/{quote(h.image_id, safe='')}" if sx.has_thumbnail(h.image_id) else None
    return d


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/docs", include_in_schema=False)
def docs() -> FileResponse:
    """The API page: Swagger UI from this server, under a policy that allows nothing from elsewhere."""
    return FileResponse(STATIC / "docs.html", media_type="text/html", headers=DOCS_HEADERS)


@router.get("/health", summary="Index facts and request limits")
def health(sx: Index, limits: RequestLimits) -> dict[str, Any]:
    m = sx.manifest
    return {"status": "ok", "images": sx.num_images, "captions": sx.num_captions, "kind": m["kind"],
            "similarity": sx.similarity, "dim": m["dim"], "fingerprint": m["fingerprint"],
            "has_captions": sx.has_captions, "can_embed_images": sx.can_embed_images,
            "recall_at_10": m.get("recall_at_10"), "rerank": sx.rerank, "limits": limits.to_json()}


@router.get("/search", summary="Text -> image search (or text -> caption with target=captions)")
def search(request: Request, sx: Index, limits: RequestLimits,
           q: str = Query(""),  # q and k are documented with each app's limits (_openapi)
           k: str = Query(10, json_schema_extra={"type": "integer", "minimum": 1}),  # read by parse_k
           target: Literal["images", "captions"] = Query("images", description="what to return")
           ) -> dict[str, Any]:
    check_once(request.query_params, ("q", "k", "target"))
    query = q.strip()
    if not query:
        raise ApiError(422, "q: the query is empty")
    if len(query) > limits.max_query_chars:
        raise ApiError(422, f"q: the query is {len(query)} characters long; the limit is "
                            f"{limits.max_query_chars}")
    kk, tgt = parse_k(k, limits.max_k), _check_target(sx, target, TARGETS)
    t0 = time.perf_counter()
    hits = sx.search_text(query, kk, tgt)
    return {"query": query, "k": kk, "target": tgt, "took_ms": round(1000 * (time.perf_counter() - t0), 2),
            "results": [_hit_json(sx, h) for h in hits]}


@router.post("/search/image", summary="Image -> text and/or image -> image search (multipart upload)",
             openapi_extra={"requestBody": _UPLOAD_BODY})
async def search_image(request: Request, sx: Index, limits: RequestLimits) -> dict[str, Any]:
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "send the image as multipart/form-data in a field named 'file'")
    if not sx.can_embed_images:
        raise ApiError(400, "this index's model reads precomputed features; it cannot embed uploaded images")
    body = await _read_body(request, limits)
    async with _parse_form(request.scope, body) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "no image: send it in a multipart field named 'file'")
        check_once(form, ("k", "target"))
        data = await upload.read(limits.max_upload_bytes + 1)
        kk = parse_k(form.get("k", 10), limits.max_k)
        default = "captions" if sx.has_captions else "images"
        tgt = _check_target(sx, form.get("target") or default, (*TARGETS, "both"))
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, f"the image is larger than the limit of {limits.max_upload_bytes} bytes")
    if not data:
        raise ApiError(400, "the uploaded file is empty")
    t0 = time.perf_counter()
    targets = list(TARGETS[::-1]) if tgt == "both" else [tgt]
    hits = await request.app.state.decode_slots.run(_image_query, sx, data, targets, kk, limits)
    return {"k": kk, "targets": targets, "took_ms": round(1000 * (time.perf_counter() - t0), 2),
            "results": {t: [_hit_json(sx, h) for h in hits[t]] for t in targets}}


@router.get("/images/{image_id:path}", summary="An indexed image's thumbnail (JPEG), by its id in the index",
            response_class=Response, responses={200: {"content": {THUMBNAIL_MEDIA_TYPE: {}}},
                                                304: {"description": "not modified (If-None-Match)"}})
def image(image_id: str, request: Request, sx: Index) -> Response:
    if sx.image_record(image_id) is None:
        raise ApiError(404, f"no image with id {_short(image_id)!r} in this index")
    try:
        data = sx.thumbnail(image_id)
    except ThumbnailError as e:  # a tampered or damaged index folder: said in the log, not to the client
        logger.warning("not sending the thumbnail of image %r: %s", _short(image_id), e)
        raise ApiError(404, f"the thumbnail of image {_short(image_id)!r} is unavailable on this server") from None
    if data is None:
        raise ApiError(404, f"image {_short(image_id)!r} has no thumbnail in this index (an index of precomputed "
                            "features, or one built without thumbnails)")
    etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
    headers = {**THUMBNAIL_HEADERS, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=THUMBNAIL_MEDIA_TYPE, headers=headers)


async def _read_body(request: Request, limits: Limits) -> bytes:
    """The request body, refused (413) as soon as it grows past an upload of ``max_upload_bytes`` and its
    form: nothing oversized is kept. A body whose next piece takes more than ``read_timeout`` seconds, or that
    is not complete after ``body_timeout`` seconds, is refused (408): a stalled client does not hold the
    request forever."""
    limit = limits.max_upload_bytes + FORM_OVERHEAD
    read_timeout, body_timeout = limits.read_timeout, limits.body_timeout
    too_big = f"the upload is larger than the limit of {limits.max_upload_bytes} bytes"
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad Content-Length header", close=True)
        if int(declared) > limit:
            raise ApiError(413, too_big, close=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + body_timeout
    chunks, size = [], 0
    stream = request.stream()
    try:
        while True:
            left = deadline - loop.time()
            wait = min(read_timeout, left)
            try:
                if wait <= 0:
                    raise TimeoutError
                chunk = await asyncio.wait_for(anext(stream), wait)
            except StopAsyncIteration:
                break
            except ClientDisconnect:  # nobody is left to answer; no 500 and no traceback in the log
                raise ApiError(400, "the client disconnected during the upload", close=True) from None
            except (TimeoutError, asyncio.TimeoutError):
                if left <= read_timeout:
                    raise ApiError(408, f"the upload did not arrive within {body_timeout:g} s", close=True) from None
                raise ApiError(408, f"the upload stalled: no data for {read_timeout:g} s", close=True) from None
            size += len(chunk)
            if size > limit:
                raise ApiError(413, too_big, close=True)
            chunks.append(chunk)
    finally:
        await stream.aclose()
    return b"".join(chunks)


@asynccontextmanager
async def _parse_form(scope: dict, body: bytes):
    """``async with _parse_form(scope, body) as form``: a multipart form parsed from bytes already read."""
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    try:
        form = await Request(scope, receive).form(max_files=1, max_fields=8)
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart form: {e.message}") from None
    except StarletteHTTPException as e:
        raise ApiError(400, f"malformed multipart form: {e.detail}") from None
    try:
        yield form
    finally:
        await form.close()


class _DecodeSlots:
    """At most ``n`` uploads decoded (and embedded) at once, each in the thread pool. A request waits up to
    ``wait`` seconds for a free slot, then is refused with 503 and ``Retry-After``. A slot is given back when
    its thread has finished, not when its request ends: a client that disconnects mid-decode does not free
    memory that is still in use."""

    def __init__(self, n: int, wait: float) -> None:
        self.n, self.wait = n, wait
        self._free = asyncio.Semaphore(n)
        self.busy = 0  # slots taken now (for tests and benchmarks)

    async def run(self, fn, *args):
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait)
        except (TimeoutError, asyncio.TimeoutError):
            raise StarletteHTTPException(503, f"the server is busy decoding {self.n} other images; retry in a "
                                              "moment", headers={"Retry-After": "1"}) from None
        self.busy += 1
        task = asyncio.ensure_future(run_in_threadpool(fn, *args))
        task.add_done_callback(self._release)
        return await asyncio.shield(task)

    def _release(self, task: asyncio.Future) -> None:
        self.busy -= 1
        self._free.release()
        if not task.cancelled():
            task.exception()  # retrieved: a request that went away leaves no "never retrieved" warning


def _image_query(sx: SearchIndex, data: bytes, targets: list[str], k: int, limits: Limits,
                 ) -> dict[str, list[SearchResult]]:
    """Upload bytes -> hits for each target; runs in the thread pool, and holds the model lock only for the
    forward pass (:meth:`SearchIndex.embed_image`)."""
    q = sx.embed_image(_decode_image(data, sx, limits))
    return {t: sx.search_vectors(q, "images", t, k)[0] for t in targets}


def _decode_image(data: bytes, sx: SearchIndex, limits: Limits):
    """Bytes -> RGB PIL image, in memory, through the decoder of every image (:func:`images.decode_rgb`, EXIF
    applied). The header is checked first: an accepted raster format (no other decoder, and no Ghostscript,
    ever sees an upload), pixels, aspect ratio, the size the model's resize would make of it, and the memory
    decoding it takes, so a small file cannot expand into gigabytes. Messages name "the upload", never a file
    or command of the server."""
    try:
        with images.open_image(data) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise ApiError(415, "the upload is not an image in a format this server reads "
                            f"({', '.join(images.ACCEPTED_FORMATS)})") from None
    except Image.DecompressionBombError:
        raise ApiError(413, f"the image has far more pixels than the limit of {limits.max_image_pixels} "
                            "(a decompression bomb?)") from None
    except Exception as e:  # noqa: BLE001 - a corrupt header: OSError, SyntaxError, struct.error, ... by format
        raise ApiError(415, f"the upload is not a readable image ({type(e).__name__})") from None
    bounds = {"max_pixels": limits.max_image_pixels, "max_aspect_ratio": limits.max_aspect_ratio}
    sx.check_image_size(w, h, **bounds)
    try:
        image = images.decode_rgb(data, name="the upload", max_bytes=limits.max_decode_bytes)
    except images.ImageTooLargeError as e:
        raise ApiError(413, str(e).removeprefix("the upload: ")) from None
    except images.ImageLoadError as e:
        raise ApiError(415, f"the upload is not a readable image: {str(e).removeprefix('the upload: ')}") from None
    sx.check_image_size(*image.size, **bounds)
    return image
