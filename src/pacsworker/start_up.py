"""What a process says when it starts: where it listens and who may call, where data and records
are, the broker, the validation gate, the models and where results go. Only what is true of the
settings in hand; nothing here starts or loads anything.
"""

from __future__ import annotations

from pathlib import Path

from .config import Settings
from .http_auth import who_may_pass

LOOPBACK = ("127.0.0.1", "localhost", "::1")
REMOTE_KINDS = ("triton", "arterys")


def reach(host: str) -> str:
    """Who can reach an address the process listens on, in words."""
    if host in ("0.0.0.0", "::", ""):
        return "every interface"
    if host in LOOPBACK or host.startswith("127."):
        return "this host only"
    return f"the interface of {host} only"


def callers(settings: Settings) -> str:
    """Which calling and called AE titles the receiver accepts."""
    cfg = settings.scp
    calling = (f"calling AE titles {', '.join(cfg.allowed_calling_aets)} only" if cfg.allowed_calling_aets
               else "any calling AE title (scp.allowed_calling_aets is empty)")
    called = f"called AE title {cfg.ae_title}" if cfg.require_called_aet else "any called AE title"
    return f"{calling}, {called}"


def broker(settings: Settings) -> str:
    """The broker, without any password in its URL."""
    url = settings.queue.broker_url
    if not url:
        return f"embedded (filesystem, {settings.data_dir / 'broker'})"
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def destination_where(destination) -> str:
    """Where a destination sends to: its URL, AE title at host:port, or folder."""
    if destination.kind == "dicomweb":
        return f"dicomweb {destination.url}"
    if destination.kind == "dimse":
        return f"dimse {destination.ae_title}@{destination.host}:{destination.port}"
    return f"folder {destination.path}"


def receiver_lines(settings: Settings) -> list[str]:
    """Where the receiver listens and who may send to it; the operator port and whether it asks a login."""
    cfg = settings.scp
    lines = []
    if cfg.plain:
        lines.append(f"DICOM      {cfg.ae_title} on {cfg.host}:{cfg.port} ({reach(cfg.host)}); accepts {callers(settings)}")
    if cfg.tls is not None:
        certificate = "a client certificate its CAs signed" if cfg.tls.require_client_certificate else \
            "no client certificate"
        lines.append(f"DICOM TLS  {cfg.ae_title} on {cfg.host}:{cfg.tls.port} ({reach(cfg.host)}); needs {certificate}; "
                     f"accepts {callers(settings)}")
    if cfg.stow_port is not None:
        scheme = "https" if cfg.stow_tls else "http"
        tls = ("no TLS" if cfg.stow_tls is None else "TLS, with a client certificate its CAs signed"
               if cfg.stow_tls.require_client_certificate else "TLS")
        login = who_may_pass(cfg.stow_auth)
        open_door = ": whoever reaches the port may store" if login == "no login" and cfg.stow_tls is None else ""
        lines.append(f"STOW-RS    {scheme}://{cfg.host}:{cfg.stow_port}/studies and /pull ({reach(cfg.host)}); "
                     f"{login}; {tls}{open_door}")
    return lines


def status_line(settings: Settings, port: int | None = None) -> str:
    """The status page (with /metrics, /healthz, /readyz): where, and the login it asks."""
    m = settings.metrics
    port = m.port if port is None else port
    if not m.enabled or not port:
        return "status     none (metrics.enabled: false)"
    login = who_may_pass(m.auth)
    return (f"status     {'https' if m.tls else 'http'}://{m.host}:{port}/ (status page, /metrics, /healthz, /readyz) "
            f"on {reach(m.host)}; "
            + ("no login: whoever reaches the port can read it" if login == "no login"
               else f"{login} for the page and /metrics; /healthz and /readyz open for probes"))


def storage_lines(settings: Settings) -> list[str]:
    """data_dir, the ledger, and the broker."""
    return [
        f"data_dir   {settings.data_dir} (spool, outbox)",
        f"ledger     {ledger_where(settings)} (series, jobs, deliveries, history)",
        f"broker     {broker(settings)}",
    ]


def ledger_where(settings: Settings) -> str:
    """The ledger's database, its password hidden: a SQLite file under data_dir, or PostgreSQL."""
    from .ledger.database import SQLITE_FILE

    url = settings.storage.database_url
    if not url:
        return f"SQLite {Path(settings.data_dir) / SQLITE_FILE}"
    from sqlalchemy.engine import make_url

    return f"PostgreSQL {make_url(url).render_as_string(hide_password=True)}"


def model_lines(settings: Settings) -> list[str]:
    """Each model and where it is checked: a local one is loaded by the model worker as it starts."""
    lines = []
    for model in settings.models:
        scope = " for whole studies" if getattr(model, "scope", "") == "study" else ""
        if model.kind in REMOTE_KINDS:
            lines.append(f"model      {model.name} ({model.kind}){scope} at {getattr(model, 'url', '')}: remote, "
                         "looked for by the model worker, checked by each job")
        else:
            lines.append(f"model      {model.name} ({model.kind}){scope}: the model worker loads it now and says "
                         "below whether it is usable")
    return lines


def destination_lines(settings: Settings) -> list[str]:
    """Where results go (the default folder when none is configured); last, as the banner's end."""
    if not settings.destinations:
        [folder] = settings.effective_destinations()
        return [f"results to {folder.name} ({destination_where(folder)}/<study>/<series>/): the default, "
                "no destinations configured"]
    return [f"results to {d.name} ({destination_where(d)})" for d in settings.destinations]


def serve_banner(settings: Settings) -> list[str]:
    """``pacsworker serve``: everything, results last."""
    from .encoders.validation import validator_in_use

    return (receiver_lines(settings) + [status_line(settings)] + storage_lines(settings)
            + [f"validator  {validator_in_use()}"] + model_lines(settings) + destination_lines(settings))


def scp_banner(settings: Settings) -> list[str]:
    """``pacsworker scp``: the receiver, its records and broker, the models it routes to (the workers say the rest)."""
    defaults = "" if "models" in settings.model_fields_set else " (the defaults: no models configured)"
    names = ", ".join(m.name for m in settings.models) or "none: every series is recorded as skipped"
    return receiver_lines(settings) + [status_line(settings)] + storage_lines(settings) + [f"routes to  {names}{defaults}"]


def worker_banner(settings: Settings, queues: list[str], pool: str, concurrency: int, port: int | None) -> list[str]:
    """``pacsworker worker``: what it consumes, its broker, data_dir and validation gate."""
    from .encoders.validation import validator_in_use

    return ([f"queues     {', '.join(queues)} ({pool} pool, {concurrency} process{'es' if concurrency > 1 else ''})",
             status_line(settings, port)] + storage_lines(settings) + [f"validator  {validator_in_use()}"]
            + [line for line in destination_lines(settings) if "delivery" in queues])
