"""The operator's port: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``, ``/status.json`` and a
status page at ``/`` listing the latest series and jobs with their state and reasons, a page at a
time (keyset: ``?series_before=`` / ``?jobs_before=``, the "older" links).

Server-rendered HTML, no scripts to build; it refreshes itself. It reads the ledger through the
query layer ``status`` and ``/metrics`` read (:mod:`pacsworker.ledger.views`): a view costs the
same on day 1 and day 365. It shows UIDs, AE titles, model names, states and reasons, never patient
data (the ledger holds none).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlencode

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import Settings
from .http_server import HttpServer, Receive, Scope, Send, answer, authorized
from .ledger.views import RECENT, job_results, value_summary  # noqa: F401 - where they were
from .metrics import RecordsCollector, registry_for_serving

log = logging.getLogger("pacsworker.ops")
TEXT = "text/plain; charset=utf-8"


PROBES = ("/healthz", "/readyz")  # open whatever metrics.auth says: orchestrators probe without credentials


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
    """The operator's port of one process (``role``: scp, serve, worker) on ``metrics.host:port``: an
    ASGI application on the HTTP server layer; each page is made in a worker thread."""

    def __init__(self, settings: Settings, role: str, port: int):
        self.settings, self.role = settings, role
        self.registry = registry_for_serving()
        self.records = RecordsCollector(settings, settings.metrics.records_cache_seconds)
        self.registry.register(self.records)
        m = settings.metrics
        self.http = HttpServer(self, m.host, port, m.limits, m.tls, "ops-http")
        self.port = self.http.port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            return await answer(send, 405, b"GET only\n", headers=[(b"allow", b"GET, HEAD")])
        if scope["path"] not in PROBES and not await authorized(self.settings.metrics.auth, scope, send):
            return None
        try:
            status, content_type, body = await asyncio.to_thread(
                self.view, scope["path"], scope["query_string"].decode("latin-1"))
        except Exception as exc:  # noqa: BLE001 - a page that fails must not take the process down
            log.exception("ops page %r failed", scope["path"])
            status, content_type, body = 500, TEXT, f"{type(exc).__name__}: {exc}\n".encode()
        await answer(send, status, body, content_type, headers=[(b"cache-control", b"no-store")])

    def view(self, path: str, query: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET of ``path``."""
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            alive = health(self.settings, self.role)
            failing = "".join(f"{name}: {state}\n" for name, state in alive.items() if state != "ok")
            return (503, TEXT, failing.encode()) if failing else (200, TEXT, b"ok\n")
        if path == "/readyz":
            checks = readiness(self.settings, self.role)
            ready = all(v == "ok" for v in checks.values())
            return 200 if ready else 503, "application/json", json.dumps({"ready": ready, "checks": checks},
                                                                         indent=1).encode()
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", page(self.settings, self.role, query).encode()
        return 404, TEXT, b"not found: /metrics /healthz /readyz /\n"

    def start(self) -> OpsServer:
        self.http.start()
        log.info("metrics, health and status page on %s://%s:%d/", self.http.scheme, self.settings.metrics.host,
                 self.port)
        return self

    def shutdown(self) -> None:
        self.http.shutdown()
        self.registry.unregister(self.records)  # the process may open the port again

    def close_inherited(self) -> None:
        """In a forked child (a worker's pool process): let go of the listening socket it inherited."""
        self.http.close_inherited()


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
