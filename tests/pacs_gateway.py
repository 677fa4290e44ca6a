"""A small HTTP(S) gateway in front of a real Orthanc, as hospitals put one in front of their PACS.

It forwards every request to Orthanc (adding Orthanc's own basic credentials), and can

- issue OAuth2 client-credentials tokens (``POST /token``) with a short lifetime and let through
  only requests that carry a live one (Orthanc itself does not check bearer tokens);
- speak TLS with a certificate of a test CA (trustme), optionally requiring a client certificate;
- be overloaded: answer the next requests with a status (503, 429) and a Retry-After.

It counts what it saw, so that a test can tell how many tokens were issued and refused.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authenticate",
              "proxy-authorization", "content-length", "content-encoding"}


class PacsGateway:
    """A gateway on a free loopback port, in a thread; ``stop()`` closes it."""

    def __init__(self, upstream: str, upstream_auth: tuple[str, str] | None = None, *,
                 client_id: str | None = None, client_secret: str | None = None, token_lifetime: float = 60.0,
                 tls: ssl.SSLContext | None = None):
        self.upstream, self.upstream_auth = upstream.rstrip("/"), upstream_auth
        self.client_id, self.client_secret, self.token_lifetime = client_id, client_secret, token_lifetime
        self.tokens: dict[str, float] = {}  # token -> expiry (time.time())
        self.refused_tokens = 0  # requests answered 401 for a missing, expired or revoked token
        self.forwarded: list[tuple[str, str, int]] = []  # (method, path, status) of what went to Orthanc
        self.overloaded: list[tuple[int, str]] = []  # (status, Retry-After) for the next requests, in order
        self._lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/token":
                    gateway._token(self, body)
                else:
                    gateway._forward(self, "POST", body)

            def do_GET(self) -> None:
                gateway._forward(self, "GET", b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, name="pacs-gateway", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def revoke_all(self) -> None:
        """Every token issued so far stops working (as after a key rotation on the server)."""
        with self._lock:
            self.tokens = {token: 0.0 for token in self.tokens}

    def expired(self, token: str) -> bool:
        with self._lock:
            return time.time() >= self.tokens.get(token, 0.0)

    def _send(self, handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _token(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        form = dict(urllib.parse.parse_qsl(body.decode()))
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if form.get("grant_type") != "client_credentials":
            self._send(handler, 400, b'{"error": "unsupported_grant_type"}', {"Content-Type": "application/json"})
            return
        if handler.headers.get("Authorization") != f"Basic {expected}":
            self._send(handler, 401, b'{"error": "invalid_client", "error_description": "unknown client"}',
                       {"Content-Type": "application/json"})
            return
        token = secrets.token_urlsafe(16)
        with self._lock:
            self.tokens[token] = time.time() + self.token_lifetime
        answer = {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime}
        self._send(handler, 200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

    def overload(self, status: int, retry_after: str, requests_: int = 1) -> None:
        """Answer the next requests with this status and Retry-After instead of forwarding them."""
        with self._lock:
            self.overloaded += [(status, retry_after)] * requests_

    def _forward(self, handler: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        with self._lock:
            busy = self.overloaded.pop(0) if self.overloaded else None
        if busy is not None:
            self._send(handler, busy[0], b"busy", {"Retry-After": busy[1], "Content-Type": "text/plain"})
            return
        if self.client_id is not None:
            token = handler.headers.get("Authorization", "").removeprefix("Bearer ")
            if self.expired(token):
                with self._lock:
                    self.refused_tokens += 1
                self._send(handler, 401, b"", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
                return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP | {"host", "authorization"}}
        answer = requests.request(method, self.upstream + handler.path, data=body or None, headers=headers,
                                  auth=self.upstream_auth, timeout=60)
        with self._lock:
            self.forwarded.append((method, handler.path, answer.status_code))
        out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        self._send(handler, answer.status_code, answer.content, out)
