"""The operator's port: ``/metrics`` (Prometheus), ``/healthz``, ``/readyz``, ``/status.json`` and a
status page at ``/`` listing recent series and jobs with their state and reasons.

Server-rendered HTML, no scripts to build; it refreshes itself. It shows UIDs, AE titles, model
names, states and reasons, never patient data (records hold none).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import Settings
from .metrics import RecordsCollector, registry_for_serving

log = logging.getLogger("pacsworker.ops")
RECENT = 50  # series and jobs the page lists


def readiness(settings: Settings, role: str) -> dict[str, str]:
    """Each dependency's state: "ok", or what is wrong. Broker and spool always; destinations for
    roles that deliver (serve, worker)."""
    checks = {"broker": _broker(settings), "spool": _spool(settings)}
    if role in ("serve", "worker"):
        for destination in settings.destinations:
            checks[f"destination {destination.name}"] = _destination(destination)
    return checks


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


def _destination(destination) -> str:
    kind = destination.kind
    if kind == "folder":
        path = destination.path
        return "ok" if os.path.isdir(path) and os.access(path, os.W_OK) else f"folder {path} missing or not writable"
    if kind == "dicomweb":
        parts = urlsplit(destination.url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    else:
        host, port = getattr(destination, "host", None), getattr(destination, "port", None)
    if not host or not port:
        return "ok"
    try:
        with socket.create_connection((host, port), timeout=2):
            return "ok"
    except OSError as exc:
        return f"{host}:{port} unreachable: {exc.strerror or type(exc).__name__}"


def _when(timestamp: float) -> str:
    if not timestamp:
        return ""
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _meaning(term) -> str:
    """A coded term of the values (scheme, value, meaning) as its meaning; a plain value as it is."""
    if isinstance(term, (list, tuple)) and len(term) == 3:
        return str(term[2])
    return "" if term is None else str(term)


def _number(value) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) else str(value)


def value_summary(values: dict) -> str:
    """A job's values in one line: each segment's volume (and mean), scores, classes, box counts."""
    parts = []
    for key, value in values.items():
        if key in ("segments", "measured_segments") and isinstance(value, dict) and all(
                isinstance(v, dict) and "volume_ml" in v for v in value.values()):
            for name, stat in value.items():
                unit = f" {stat['unit']}" if stat.get("unit") else ""
                mean = f", mean {_number(stat['mean'])}{unit}" if "mean" in stat else ""
                parts.append(f"{name} {_number(stat['volume_ml'])} mL{mean}")
            continue
        kind = value.get("kind") if isinstance(value, dict) else None
        if kind == "score":
            parts.append(f"{_meaning(value.get('name')) or key} {_number(value.get('value'))}")
        elif kind == "classification":
            score = f" (score {_number(value['score'])})" if value.get("score") is not None else ""
            meaning = _meaning(value.get("meaning")) or value.get("value")
            parts.append(f"{_meaning(value.get('name')) or key}: {meaning}{score}")
        elif kind == "boxes":
            parts.append(f"{key}: {len(value.get('boxes', []))} box(es)")
        elif kind == "probabilities":
            peaks = ", ".join(f"{name} {p:.2f}" for name, p in value.get("segments", {}).items())
            parts.append(f"{key}: maximum probability {peaks}")
    return "; ".join(parts)


def job_results(layout, jobs, limit: int) -> dict[str, dict]:
    """The latest ``limit`` jobs that made results or values: their values and where the results went."""
    made = [j for j in jobs if j.values or j.state.value in ("delivering", "done")]
    made.sort(key=lambda j: j.finished_at, reverse=True)
    from .records import DeliveryRecord, read_json

    shown = {}
    for job in made[:limit]:
        try:
            delivery = read_json(layout.delivery_record(job.job_id), DeliveryRecord)
        except ValueError:  # an unreadable record: shown as unknown, the page still renders
            delivery = None
        destinations = {
            name: {"state": o.state.value, "attempts": o.attempts, "last_error": o.last_error}
            for name, o in (delivery.destinations.items() if delivery is not None else [])
        }
        where = [f"{name} ({o.state.value}{': ' + o.last_error if o.state.value != 'delivered' and o.last_error else ''})"
                 for name, o in (delivery.destinations.items() if delivery is not None else [])]
        shown[job.job_id] = {
            "model": job.model, "state": job.state.value, "finished_at": job.finished_at, "values": job.values,
            "summary": value_summary(job.values), "destinations": destinations, "delivered_to": ", ".join(where),
        }
    return shown


def page(settings: Settings, role: str) -> str:
    """The status page: readiness, queue depths, recent series and jobs, results not yet delivered."""
    from .metrics import queue_depths
    from .records import DataLayout, JobRecord, SeriesRecord

    layout = DataLayout(settings.data_dir)
    series = sorted(layout.iter_records(layout.series, SeriesRecord), key=lambda s: s.last_seen, reverse=True)
    jobs = sorted(layout.iter_records(layout.jobs, JobRecord), key=lambda j: j.queued_at, reverse=True)
    e = html.escape
    ready = readiness(settings, role)
    rows = []
    rows.append("<h2>Readiness</h2><table id='readiness'><tr><th>check</th><th>state</th></tr>")
    rows += [f"<tr class='{'ok' if v == 'ok' else 'bad'}'><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in ready.items()]
    rows.append("</table><h2>Queues</h2><table id='queues'><tr><th>queue</th><th>waiting</th></tr>")
    rows += [f"<tr><td>{e(q)}</td><td>{n}</td></tr>" for q, n in sorted(queue_depths(settings).items())]
    rows.append(f"</table><h2>Series (latest {RECENT} of {len(series)})</h2><table id='series'><tr><th>Series "
                "Instance UID</th><th>modality</th><th>from</th><th>instances</th><th>last instance</th><th>state"
                "</th><th>completed by</th><th>reason</th></tr>")
    for s in series[:RECENT]:
        rows.append(f"<tr class='{e(s.state.value)}'><td>{e(s.series_uid)}</td><td>{e(s.modality)}</td>"
                    f"<td>{e(s.calling_aet)}</td><td>{s.instances}</td><td>{_when(s.last_seen)}</td>"
                    f"<td>{e(s.state.value)}</td><td>{e(s.completed_by)}</td><td>{e(s.reason)}</td></tr>")
    rows.append(f"</table><h2>Jobs (latest {RECENT} of {len(jobs)})</h2><table id='jobs'><tr><th>job</th>"
                "<th>model</th><th>state</th><th>stage</th><th>attempts</th><th>queued</th><th>finished</th>"
                "<th>values</th><th>results to</th><th>reason</th></tr>")
    results = job_results(layout, jobs[:RECENT], RECENT)
    for j in jobs[:RECENT]:
        stage = getattr(j, "stage", "") if j.state.value == "running" else ""
        result = results.get(j.job_id, {})
        rows.append(f"<tr class='{e(j.state.value)}'><td>{e(j.job_id)}</td><td>{e(j.model)}</td>"
                    f"<td>{e(j.state.value)}</td><td>{e(stage)}</td><td>{j.attempts}</td><td>{_when(j.queued_at)}</td>"
                    f"<td>{_when(j.finished_at)}</td><td class='values'>{e(result.get('summary', ''))}</td>"
                    f"<td class='destinations'>{e(result.get('delivered_to', ''))}</td>"
                    f"<td>{e(j.reason or '; '.join(j.notes))}</td></tr>")
    rows.append("</table><h2>Results not yet delivered</h2><table id='deliveries'><tr><th>job</th>"
                "<th>destination</th><th>state</th><th>attempts</th><th>last error</th></tr>")
    for delivery in layout.iter_deliveries():
        for name, outcome in delivery.destinations.items():
            if outcome.state.value != "delivered":
                rows.append(f"<tr class='{e(outcome.state.value)}'><td>{e(delivery.job_id)}</td><td>{e(name)}</td>"
                            f"<td>{e(outcome.state.value)}</td><td>{outcome.attempts}</td>"
                            f"<td>{e(outcome.last_error)}</td></tr>")
    rows.append("</table>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='10'>"
        "<link rel='icon' href='data:,'>"
        f"<title>pacsworker {e(role)}</title><style>body{{font-family:sans-serif;margin:1em}}"
        "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 6px;"
        "text-align:left;font-size:13px}tr.failed,tr.bad,tr.dead-letter,tr.implausible{background:#fdd}"
        "tr.done,tr.ok{background:#efe}tr.running,tr.receiving{background:#ffd}</style></head><body>"
        f"<h1>pacsworker {e(role)}</h1><p>data_dir {e(str(layout.root))}, as of {_when(time.time())}"
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
                path = urlsplit(self.path).path
                try:
                    if path == "/metrics":
                        self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                    elif path == "/healthz":
                        self._send(200, "text/plain; charset=utf-8", b"ok\n")
                    elif path == "/readyz":
                        checks = readiness(owner.settings, owner.role)
                        ready = all(v == "ok" for v in checks.values())
                        body = json.dumps({"ready": ready, "checks": checks}, indent=1).encode()
                        self._send(200 if ready else 503, "application/json", body)
                    elif path in ("/", "/index.html"):
                        self._send(200, "text/html; charset=utf-8", page(owner.settings, owner.role).encode())
                    else:
                        self._send(404, "text/plain; charset=utf-8", b"not found: /metrics /healthz /readyz /\n")
                except OSError:  # the client went away mid-answer
                    self.close_connection = True
                except Exception as exc:  # noqa: BLE001 - a page that fails must not take the process down
                    log.exception("ops page %s failed", path)
                    if not self._answered:
                        self._send(500, "text/plain; charset=utf-8", f"{type(exc).__name__}: {exc}\n".encode())

            _answered = False

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self._answered = True
                try:
                    self.send_response(status)
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
