"""Running the search app under uvicorn, with every wait bounded and JSON errors at the HTTP layer too.

uvicorn answers a request it cannot parse itself, in plain text, and waits without limit for a client that
opened a connection, or began a request, and then went quiet: a few hundred such connections hold the
server's sockets forever. :class:`JsonH11Protocol` (uvicorn's h11 protocol, subclassed) answers malformed
requests with the app's JSON error shape, and bounds each phase of a request:

* headers: a connection's first request, or a request begun on a kept-alive connection, must have all its
  headers within ``read_timeout`` seconds (else 408 and the connection is closed);
* body: a request body must be complete within ``body_timeout`` (+1) seconds of its headers (the app refuses
  an upload that stalls or trickles sooner, with a 408 of its own; this catches bodies nobody reads);
* idle: a kept-alive connection with no request is closed after ``keep_alive_timeout`` (uvicorn's own).

A request with both ``Content-Length`` and ``Transfer-Encoding`` is refused (:class:`_StrictConnection`).

uvicorn offers no public hook for any of this, so :class:`JsonH11Protocol` relies on its ``H11Protocol``'s
internals (``conn``, ``cycle``, ``send_400_response``, ``on_response_complete``); pyproject.toml bounds
uvicorn to the versions whose tests passed.
"""

from __future__ import annotations

import asyncio
import json
import socket
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vsekit.errors import VsekitError
from vsekit.serve.limits import Limits

_DEFAULT_MAX_HEADER_BYTES = 16 * 1024  # h11's default bound on a request's head, which uvicorn keeps
_DEFAULT = Limits()


class BindError(VsekitError):
    """The server cannot listen on the address asked for (in use, not this machine's, a privileged port)."""


class _StrictConnection(h11.Connection):
    """h11's server side, refusing (as a protocol error, which uvicorn answers with ``send_400_response`` and
    a closed connection) what h11 accepts but RFC 9112 6.3 calls a smuggling risk; ``refused`` says why: a
    request with both ``Content-Length`` and ``Transfer-Encoding``, whose body a proxy in front that reads
    the other length would take for a second, smuggled request (h11 alone reads the chunks and keeps the
    connection open)."""

    refused: str | None = None

    def next_event(self):  # type: ignore[override]
        event = super().next_event()
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}  # lowercased by h11
            if b"content-length" in names and b"transfer-encoding" in names:
                self.refused = "the request has both Content-Length and Transfer-Encoding; send one of them"
                raise h11.RemoteProtocolError(self.refused, error_status_hint=400)
        return event


def json_error_bytes(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response with the app's JSON error body, that closes the connection."""
    body = json.dumps({"error": message, "status": status}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class JsonH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with JSON 4xx replies of its own and bounded header and body phases. The
    timeouts are class attributes; :func:`make_server` makes a subclass with the ones asked for."""

    read_timeout: float = _DEFAULT.read_timeout
    body_timeout: float = _DEFAULT.body_timeout

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _StrictConnection(h11.SERVER, max_incomplete_event_size=self._max_head_bytes())

    def _max_head_bytes(self) -> int:
        return self.config.h11_max_incomplete_event_size or _DEFAULT_MAX_HEADER_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._phase: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    # -- the phase a request is in, and its deadline ------------------------------------------------------
    def _watch(self) -> None:
        if self.transport is None or self.transport.is_closing():
            self._arm(None)
            return
        state = self.conn.their_state
        # headers: a fresh connection, or bytes of a next request on a kept-alive one; an idle kept-alive
        # connection with nothing sent is uvicorn's keep-alive timer's
        headers = state is h11.IDLE and (self.cycle is None or bool(self.conn.trailing_data[0]))
        phase = "headers" if headers else "body" if state is h11.SEND_BODY else None
        if phase != self._phase:
            self._arm(phase)

    def _arm(self, phase: str | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase
        if phase is not None:
            # a body gets a second more than the app's own limit, so that the app's 408 comes first
            delay = self.read_timeout if phase == "headers" else self.body_timeout + 1.0
            self._timer = self.loop.call_later(delay, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._timer = None
        if self.transport.is_closing() or phase != self._phase:
            return
        self.logger.info("closing a connection whose request %s did not arrive in time", phase)
        if phase == "headers":
            self._reply_and_close(408, f"the request headers did not arrive within {self.read_timeout:g} s")
        elif self.cycle is not None and not self.cycle.response_started:
            self._reply_and_close(408, f"the request body did not arrive within {self.body_timeout:g} s")
        else:  # the reply was sent already (the body was not needed); the client is still sending it
            self.transport.close()

    def _reply_and_close(self, status: int, message: str) -> None:
        if self.conn.their_state is h11.IDLE and self.cycle is None and not self.conn.trailing_data[0]:
            self.transport.close()  # not one byte sent: nobody to answer
            return
        self.transport.write(json_error_bytes(status, message))
        self.transport.close()

    # -- malformed requests -------------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """Called by uvicorn when h11 cannot parse the request: the same JSON shape as the app's errors
        (431 when the request's head outgrew h11's buffer)."""
        self._arm(None)
        limit = self._max_head_bytes()
        if getattr(self.conn, "refused", None):
            status, message = 400, self.conn.refused
        elif len(self.conn.trailing_data[0]) > limit:
            status, message = 431, f"the request's headers are larger than {limit} bytes"
        else:
            status, message = 400, "malformed HTTP request"
        self.transport.write(json_error_bytes(status, message))
        self.transport.close()


def make_server(app: Any, host: str = "127.0.0.1", port: int = 8000, *,
                read_timeout: float = _DEFAULT.read_timeout, body_timeout: float = _DEFAULT.body_timeout,
                keep_alive_timeout: float = _DEFAULT.keep_alive_timeout, log_level: str = "info",
                access_log: bool = True) -> uvicorn.Server:
    """A uvicorn server for ``app`` with :class:`JsonH11Protocol` and the given timeouts (seconds, those of
    :class:`Limits`); ``server.run()`` serves until stopped (``server.should_exit = True``)."""
    Limits(read_timeout=read_timeout, body_timeout=body_timeout, keep_alive_timeout=keep_alive_timeout)  # > 0
    protocol = type("VsekitH11Protocol", (JsonH11Protocol,),
                    {"read_timeout": float(read_timeout), "body_timeout": float(body_timeout)})
    config = uvicorn.Config(app, host=host, port=port, http=protocol, ws="none", lifespan="off",
                            timeout_keep_alive=keep_alive_timeout, log_level=log_level, access_log=access_log)
    return uvicorn.Server(config)


def bound_socket(host: str = "127.0.0.1", port: int = 0, *, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one; ``[::1]`` or ``::1`` for IPv6) and
    listening, for ``server.run(sockets=[s])``: connections made from here on wait in its backlog until
    the server runs. A failure (address in use, not an address of this machine, a privileged port) is a
    :class:`BindError` naming ``host:port`` and the reason."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    shown = f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
    if not 0 <= port <= 65535:
        raise BindError(f"cannot listen on {shown}: a port is 0..65535")
    family = socket.AF_INET6 if ":" in name else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((name, port))
        sock.listen(backlog)
    except (OSError, OverflowError, UnicodeError) as e:
        sock.close()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BindError(f"cannot listen on {shown}: {reason}") from None
    return sock
