"""The HTTP doors' server: an ASGI application on uvicorn's HTTP/1.1 protocol (h11), in a thread.

uvicorn brings a strict parser (h11 refuses a malformed head, one over 16 KiB), chunked bodies,
flow control that pauses reading while a body waits to be read (memory bounded by a chunk), the
idle keep-alive timeout, and a refused request's unread body drained rather than parsed as the next
request. What a door facing the hospital network also needs, and
uvicorn lacks, is added here (``HttpLimits``):

- a deadline for the request head: uvicorn has none before the first request, and any byte of a
  dribbled head cancels its keep-alive timer;
- a cap on connections (one more is answered 503 and closed) and on requests served at once;
- a request with both Content-Length and chunked answered 400 and its connection closed (h11 reads
  the chunks and keeps the connection, which a proxy that read the length would not agree with);
- a stall timeout on each read of a body;
- the connection closed, not drained, after an answer that leaves more than a little body unread;
- a TLS handshake timeout (the event loop's server takes it, uvicorn does not pass it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from .config import HttpLimits, TlsCertificates

log = logging.getLogger("pacsworker.http")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

DRAIN_LIMIT = 64 * 1024  # an unread body up to this size is read and dropped (keep-alive); a longer one closes
GRACEFUL_SECONDS = 5.0  # at shutdown, requests being served get this long to finish
CLOSE = (b"connection", b"close")
TOO_MANY_CONNECTIONS = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                        b"Content-Length: 29\r\n\r\ntoo many connections at once\n")


def peer_of(scope: Scope) -> str:
    """``host:port`` of the request's peer (the socket's: no proxy header is trusted)."""
    client = scope.get("client") or ("?", 0)
    return f"{client[0]}:{client[1]}"


async def answer(send: Send, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A whole response in two ASGI messages."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def authorized(section, scope: Scope, send: Send) -> bool:
    """Whether the login setting ``section`` (``scp.stow_auth``, ``metrics.auth``) lets this request through,
    decided before its body is read; a refusal is answered here (401 with its challenge, 403 without the
    scope, 503 when an issuer's keys cannot be had) and logged by the check with the peer and the reason."""
    from .http_auth import authenticator

    header = dict(scope["headers"]).get(b"authorization")
    decision = await asyncio.to_thread(authenticator(section).check, header.decode("latin-1") if header else None,
                                       peer_of(scope))
    if decision.ok:
        return True
    challenge = [(b"www-authenticate", decision.challenge.encode())] if decision.challenge else []
    await answer(send, decision.status, f"{decision.reason}\n".encode(), headers=challenge)
    return False


class BodyStalled(Exception):
    """The peer sent nothing of the request body for ``HttpLimits.body_timeout`` seconds."""


class _Body:
    """How much of a request's body the application has read; whether the rest may be drained."""

    def __init__(self, scope: Scope):
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        self.declared = int(length) if length.isdigit() else None  # h11 checked it
        self.chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        # both lengths: a proxy in front may have read the other one (RFC 9112 6.1: answer, then close)
        self.ambiguous = self.chunked and b"content-length" in headers
        self.read = 0
        self.done = not self.chunked and not self.declared

    def too_much_unread(self) -> bool:
        if self.done:
            return False
        return self.chunked or (self.declared or 0) - self.read > DRAIN_LIMIT


class Guard:
    """What every request passes before the door's application: the cap on requests served at once,
    the stall timeout of the body, and ``Connection: close`` on an answer leaving much body unread."""

    def __init__(self, app: App, limits: HttpLimits, door: str):
        self.app, self.limits, self.door = app, limits, door
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = _Body(scope)
        started = False

        async def timed_receive() -> Message:
            try:
                message = await asyncio.wait_for(receive(), self.limits.body_timeout)
            except TimeoutError:
                raise BodyStalled() from None
            if message["type"] == "http.request":
                body.read += len(message.get("body", b""))
                body.done = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if body.too_much_unread():
                    message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        if body.ambiguous:
            log.warning("%s: request from %s refused: not a valid HTTP/1.1 request head (Content-Length and "
                        "chunked at once)", self.door, peer_of(scope))
            await answer(send, 400, b"Content-Length and Transfer-Encoding: chunked at once\n", headers=[CLOSE])
            return
        if self.active >= self.limits.max_requests:
            log.warning("%s: request from %s refused: %d requests are being served", self.door, peer_of(scope),
                        self.active)
            await answer(guarded_send, 503, b"too many requests at once\n", headers=[(b"retry-after", b"5")])
            return
        self.active += 1
        try:
            await self.app(scope, timed_receive, guarded_send)
        except BodyStalled:
            log.warning("%s: request from %s cut: its body stalled for %.0f s after %d bytes", self.door,
                        peer_of(scope), self.limits.body_timeout, body.read)
            if not started:
                await answer(guarded_send, 408, b"the request body stalled\n", headers=[CLOSE])
        finally:
            self.active -= 1


class _GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a connection cap and a deadline for each request head."""

    def __init__(self, config: Config, server_state: ServerState, limits: HttpLimits, door: str,
                 loop: asyncio.AbstractEventLoop):
        super().__init__(config, server_state, app_state={}, _loop=loop)
        self.limits, self.door = limits, door
        # uvicorn types it as whole seconds; its timer takes any float
        self.timeout_keep_alive = limits.keep_alive_timeout  # type: ignore[assignment]
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            log.warning("%s: connection from %s refused: %d connections open", self.door,
                        _address(transport.get_extra_info("peername")), len(self.connections))
            return
        super().connection_made(transport)
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        log.warning("%s: request from %s refused: not a valid HTTP/1.1 request head", self.door, _address(self.client))
        super().send_400_response(msg)

    def _await_head(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(self.limits.header_timeout, self._head_late)

    def _head_late(self) -> None:
        """The deadline passed: unless a request (its head whole) is being served, cut the connection."""
        self._head_deadline = None
        if (self.cycle is not None and not self.cycle.response_complete) or self.transport.is_closing():
            return
        log.info("%s: connection from %s cut: no whole request head within %.0f s", self.door,
                 _address(self.client), self.limits.header_timeout)
        self.transport.close()


def _address(address) -> str:
    return f"{address[0]}:{address[1]}" if address else "?"


class HttpServer:
    """One door: ``app`` served on ``host:port`` (TLS when ``tls``) by an event loop in its own thread.

    The socket is bound in the constructor, so a port in use fails where the door is opened.
    """

    def __init__(self, app: App, host: str, port: int, limits: HttpLimits, tls: TlsCertificates | None, door: str):
        self.limits, self.door, self.tls = limits, door, tls
        self.ssl_context = None
        if tls is not None:
            from .scp.wire import tls_context  # the same TLS policy as DICOM TLS

            self.ssl_context = tls_context(tls)
        self.config = Config(Guard(app, limits, door), http="h11", lifespan="off", log_config=None,
                             access_log=False, proxy_headers=False, server_header=False, date_header=False)
        self.config.load()
        self.sock = socket.create_server((host, port), family=_family(host), backlog=min(limits.max_connections, 1024))
        self.sock.set_inheritable(False)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.scheme = "https" if tls is not None else "http"
        self.state = ServerState()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: OSError | None = None
        self._thread = threading.Thread(target=self._run, name=door, daemon=True)

    def start(self) -> HttpServer:
        """Serve from now on.

        Raises
        ------
        OSError
            If the event loop could not serve the socket (what it raised).
        """
        self._thread.start()
        self._ready.wait(10)
        if self._failure is not None:
            self.sock.close()
            raise self._failure
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except OSError as exc:  # before serving: start() raises it
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await loop.create_server(
            lambda: _GuardedH11(self.config, self.state, self.limits, self.door, loop), sock=self.sock,
            ssl=self.ssl_context, ssl_handshake_timeout=self.tls.handshake_timeout if self.tls else None,
            backlog=min(self.limits.max_connections, 1024),
        )
        self._ready.set()
        await self._stop.wait()
        server.close()
        for connection in list(self.state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their answer
        try:
            async with asyncio.timeout(GRACEFUL_SECONDS):
                while self.state.tasks:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            for task in list(self.state.tasks):
                task.cancel()
        for connection in list(self.state.connections):
            connection.transport.close()

    def shutdown(self) -> None:
        """Stop accepting, let requests being served finish (a few seconds), close every connection."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(GRACEFUL_SECONDS + 5)
        self.sock.close()

    def serving(self) -> bool:
        """Whether the door's event loop is serving (for /healthz)."""
        return self._ready.is_set() and self._failure is None and self._thread.is_alive()

    def close_inherited(self) -> None:
        """In a forked child: let go of the listening socket it inherited."""
        self.sock.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
