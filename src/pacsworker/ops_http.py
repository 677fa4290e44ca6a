"""The operator's port: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``, ``/status.json`` and a
status page at ``/`` listing the latest series and jobs with their state and reasons, a page at a
time (keyset: ``?series_before=`` / ``?jobs_before=``, the "older" links).

Server-rendered HTML, no scripts to build; it refreshes itself. It reads the ledger through the
query layer ``status`` and ``/metrics`` read (:mod:`pacsworker.ledger.views`): a view costs the
same on day 1 and day 365. It shows UIDs, AE titles, model names, states and reasons, never patient
data (the ledger holds none).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import Settings
from .http_auth import Decision, authenticator
from .ledger.views import RECENT, job_results, value_summary  # noqa: F401 - where they were
from .metrics import RecordsCollector, registry_for_serving

log = logging.getLogger("pacsworker.ops")


PROBES = ("/healthz", "/readyz")  # open whatever metrics.auth says: orchestrators probe without credentials


def operator_refusal(settings: Settings, path: str, authorization: str | None, peer: str) -> Decision | None:
    """The refusal of a request to the page or /metrics by ``metrics.auth``; None: serve it."""
    if path in PROBES:
        return None
    decision = authenticator(settings.metrics.auth).check(authorization, peer)
    return None if decision.ok else decision


def watch(parts: Callable[[], dict[str, str]]) -> Callable[[], None]:
    """Add a source of live parts to /healthz (the receiver's threads, serve's workers, a worker's pool):
    a function answering each part's state, "ok" or what is wrong. Returns the call that removes it."""
    with _WATCHED_LOCK:
        _WATCHED.append(parts)
    return lambda: _unwatch(parts)


def _unwatch(parts: Callable[[], dict[str, str]]) -> None:
    with _WATCHED_LOCK:
        if parts in _WATCHED:
            _WATCHED.remove(parts)


def health(settings: Settings, role: str) -> dict[str, str]:
    """Whether this process's parts are alive: every watched part, and the ledger answering a query."""
    checks: dict[str, str] = {}
    with _WATCHED_LOCK:
        watched = list(_WATCHED)
    for parts in watched:
        try:
            checks.update(parts())
        except Exception as exc:  # noqa: BLE001 - a check that fails says so instead of the whole answer
            checks[getattr(parts, "__qualname__", "part")] = f"its check failed: {type(exc).__name__}: {exc}"
    checks["ledger"] = _ledger(settings, role)
    return checks


def _ledger(settings: Settings, role: str) -> str:
    from .ledger import open_ledger

    try:
        open_ledger(settings, role).now()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the database's own error says why
        return f"not reachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def readiness(settings: Settings, role: str) -> dict[str, str]:
    """Each dependency's state: "ok", or what is wrong. Broker and spool always; destinations for
    roles that deliver (serve, worker), checked as delivery would use them and the answer reused
    for ``metrics.ready_cache_seconds``."""
    checks = {"broker": _broker(settings), "spool": _spool(settings)}
    if role in ("serve", "worker"):
        for destination in settings.destinations:
            checks[f"destination {destination.name}"] = _destination_cached(settings, destination)
    return checks


def _destination_cached(settings: Settings, destination) -> str:
    key = destination.model_dump_json()
    now = time.monotonic()
    with _READY_LOCK:
        cached = _READY.get(key)
    if cached is not None and now - cached[0] < settings.metrics.ready_cache_seconds:
        return cached[1]
    state = _destination(destination, settings.metrics.ready_timeout_seconds)
    with _READY_LOCK:
        _READY[key] = (now, state)
    return state


_WATCHED: list[Callable[[], dict[str, str]]] = []
_WATCHED_LOCK = threading.Lock()
_READY: dict[str, tuple[float, str]] = {}  # destination settings -> (when checked, state)
_READY_LOCK = threading.Lock()


def _broker(settings: Settings) -> str:
    url = settings.queue.broker_url
    if not url:
        from .records import DataLayout

        folder = DataLayout(settings.data_dir).broker
        return "ok" if folder.is_dir() and os.access(folder, os.W_OK) else f"embedded broker folder {folder} not writable"
    if url.startswith(("redis://", "rediss://")):
        import redis

        try:
            redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
            return "ok"
        except Exception as exc:  # noqa: BLE001
            return f"broker unreachable: {type(exc).__name__}"
    return "ok"  # another transport: Celery's own connection handling reports


def _spool(settings: Settings) -> str:
    from .records import DataLayout

    layout = DataLayout(settings.data_dir)
    try:
        with tempfile.NamedTemporaryFile(dir=layout.incoming if layout.incoming.is_dir() else layout.root):
            pass
    except OSError as exc:
        return f"data_dir not writable: {exc.strerror or exc}"
    import shutil

    free = shutil.disk_usage(layout.root).free
    if settings.storage.min_free_bytes and free < settings.storage.min_free_bytes:
        return f"{free >> 20} MiB free, below the reserve of {settings.storage.min_free_bytes >> 20} MiB"
    return "ok"


def _destination(destination, timeout: float) -> str:
    """A folder writable; a DICOMweb root answering an authenticated request; a PACS answering a C-ECHO
    with the destination's AE titles."""
    if destination.kind == "folder":
        path = destination.path
        return "ok" if os.path.isdir(path) and os.access(path, os.W_OK) else f"folder {path} missing or not writable"
    if destination.kind == "dicomweb":
        from .destinations.dicomweb import probe

        return probe(destination, timeout)
    from .destinations.dimse import echo

    return echo(destination, timeout)


def _when(timestamp: float) -> str:
    if not timestamp:
        return ""
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _position(text: str | None) -> tuple[float, str] | None:
    """A keyset position of the query string (``<time>_<id>``), or None for the latest."""
    if not text:
        return None
    when, _, key = text.partition("_")
    try:
        return float(when), key
    except ValueError:
        return None


def _older_link(what: str, before: tuple[float, str]) -> str:
    """The link to the page of ``what`` (series, jobs) older than the last one shown (a keyset)."""
    link = urlencode({f"{what}_before": f"{before[0]!r}_{before[1]}"})
    return f"<p><a id='older-{what}' href='?{html.escape(link)}'>older {what}</a></p>"


def page(settings: Settings, role: str, query: str = "", ledger=None) -> str:
    """The status page: readiness, queue depths, the latest series and jobs (a page of them, with a link
    to older ones), results not yet delivered. ``query``: the request's query string (``series_before``,
    ``jobs_before``: keyset positions)."""
    from .ledger.views import page_view
    from .metrics import queue_depths

    if ledger is None:
        from .ledger import open_ledger

        ledger = open_ledger(settings, role)
    asked = parse_qs(query)
    series_before = _position(asked.get("series_before", [""])[0])
    jobs_before = _position(asked.get("jobs_before", [""])[0])
    view = page_view(ledger, RECENT, series_before, jobs_before)
    e = html.escape
    ready = readiness(settings, role)
    rows = []
    rows.append("<h2>Readiness</h2><table id='readiness'><tr><th>check</th><th>state</th></tr>")
    rows += [f"<tr class='{'ok' if v == 'ok' else 'bad'}'><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in ready.items()]
    rows.append("</table><h2>Queues</h2><table id='queues'><tr><th>queue</th><th>waiting</th></tr>")
    rows += [f"<tr><td>{e(q)}</td><td>{n}</td></tr>" for q, n in sorted(queue_depths(settings).items())]
    which = "older" if series_before else "latest"
    rows.append(f"</table><h2>Series ({which} {len(view.series)} of {view.series_total})</h2><table id='series'>"
                "<tr><th>Series Instance UID</th><th>modality</th><th>from</th><th>instances</th><th>last instance"
                "</th><th>state</th><th>completed by</th><th>reason</th></tr>")
    for s in view.series:
        rows.append(f"<tr class='{e(s.state)}'><td>{e(s.series_uid)}</td><td>{e(s.modality)}</td>"
                    f"<td>{e(s.calling_aet)}</td><td>{s.instances}</td><td>{_when(s.last_seen)}</td>"
                    f"<td>{e(s.state)}</td><td>{e(s.completed_by)}</td><td>{e(s.reason)}</td></tr>")
    rows.append("</table>")
    if view.older_series:
        rows.append(_older_link("series", view.older_series))
    which = "older" if jobs_before else "latest"
    rows.append(f"<h2>Jobs ({which} {len(view.jobs)} of {view.jobs_total})</h2><table id='jobs'><tr><th>job</th>"
                "<th>model</th><th>state</th><th>stage</th><th>attempts</th><th>queued</th><th>finished</th>"
                "<th>values</th><th>results to</th><th>reason</th></tr>")
    for j in view.jobs:
        stage = j.stage if j.state == "running" else ""
        result = view.results.get(j.job_id, {})
        rows.append(f"<tr class='{e(j.state)}'><td>{e(j.job_id)}</td><td>{e(j.model)}</td>"
                    f"<td>{e(j.state)}</td><td>{e(stage)}</td><td>{j.attempts}</td><td>{_when(j.queued_at)}</td>"
                    f"<td>{_when(j.finished_at)}</td><td class='values'>{e(result.get('summary', ''))}</td>"
                    f"<td class='destinations'>{e(result.get('delivered_to', ''))}</td>"
                    f"<td>{e(j.reason or '; '.join(j.notes))}</td></tr>")
    rows.append("</table>")
    if view.older_jobs:
        rows.append(_older_link("jobs", view.older_jobs))
    rows.append("<h2>Results not yet delivered</h2><table id='deliveries'><tr><th>job</th>"
                "<th>destination</th><th>state</th><th>attempts</th><th>last error</th></tr>")
    for delivery in view.undelivered:
        rows.append(f"<tr class='{e(delivery.state)}'><td>{e(delivery.job_id)}</td><td>{e(delivery.destination)}</td>"
                    f"<td>{e(delivery.state)}</td><td>{delivery.attempts}</td><td>{e(delivery.last_error)}</td></tr>")
    rows.append("</table>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        + ("" if series_before or jobs_before else "<meta http-equiv='refresh' content='10'>")
        + "<link rel='icon' href='data:,'>"
        f"<title>pacsworker {e(role)}</title><style>body{{font-family:sans-serif;margin:1em}}"
        "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:left;font-size:13px}tr.failed,tr.bad,tr.dead-letter,tr.implausible{background:#fdd}"
        "tr.done,tr.ok{background:#efe}tr.running,tr.receiving{background:#ffd}</style></head><body>"
        f"<h1>pacsworker {e(role)}</h1><p>data_dir {e(str(settings.data_dir))}, as of {_when(time.time())}"
        "</p>" + "".join(rows) + "</body></html>"
    )


class OpsServer:
    """A threaded HTTP server on ``metrics.host:port`` for one process (``role``: scp, serve, worker)."""

    def __init__(self, settings: Settings, role: str, port: int):
        self.settings, self.role = settings, role
        registry = registry_for_serving()
        registry.register(RecordsCollector(settings, settings.metrics.records_cache_seconds))
        owner = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a client that connects and says nothing does not hold a thread for ever

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                parts = urlsplit(self.path)
                path = parts.path
                try:
                    refused = operator_refusal(owner.settings, path, self.headers.get("Authorization"),
                                               f"{self.client_address[0]}:{self.client_address[1]}")
                    if refused is not None:
                        self._send(refused.status, "text/plain; charset=utf-8", f"{refused.reason}\n".encode(),
                                   refused.challenge)
                    elif path == "/metrics":
                        self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                    elif path == "/healthz":
                        alive = health(owner.settings, owner.role)
                        failing = "".join(f"{name}: {state}\n" for name, state in alive.items() if state != "ok")
                        self._send(503 if failing else 200, "text/plain; charset=utf-8", (failing or "ok\n").encode())
                    elif path == "/readyz":
                        checks = readiness(owner.settings, owner.role)
                        ready = all(v == "ok" for v in checks.values())
                        body = json.dumps({"ready": ready, "checks": checks}, indent=1).encode()
                        self._send(200 if ready else 503, "application/json", body)
                    elif path in ("/", "/index.html"):
                        self._send(200, "text/html; charset=utf-8", page(owner.settings, owner.role, parts.query).encode())
                    else:
                        self._send(404, "text/plain; charset=utf-8", b"not found: /metrics /healthz /readyz /\n")
                except OSError:  # the client went away mid-answer
                    self.close_connection = True
                except Exception as exc:  # noqa: BLE001 - a page that fails must not take the process down
                    log.exception("ops page %s failed", path)
                    if not self._answered:
                        self._send(500, "text/plain; charset=utf-8", f"{type(exc).__name__}: {exc}\n".encode())

            _answered = False

            def _send(self, status: int, content_type: str, body: bytes, challenge: str | None = None) -> None:
                self._answered = True
                try:
                    self.send_response(status)
                    if challenge:
                        self.send_header("WWW-Authenticate", challenge)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Cache-Control", "no-store")
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client went away mid-answer
                    self.close_connection = True

            def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
                pass

        self._server = ThreadingHTTPServer((settings.metrics.host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True)

    def start(self) -> OpsServer:
        self._thread.start()
        log.info("metrics, health and status page on http://%s:%d/", self.settings.metrics.host, self.port)
        return self

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def close_inherited(self) -> None:
        """In a forked child (a worker's pool process): let go of the listening socket it inherited."""
        self._server.socket.close()


def start_ops_server(settings: Settings, role: str, port: int | None = None) -> OpsServer | None:
    """Start the port if enabled; a port in use is logged and the process goes on without it."""
    port = settings.metrics.port if port is None else port
    if not settings.metrics.enabled or not port:
        return None
    try:
        return OpsServer(settings, role, port).start()
    except OSError as exc:
        log.error("metrics port %s:%d not opened (%s); the %s runs without metrics and health endpoints",
                  settings.metrics.host, port, exc.strerror or exc, role)
        return None
