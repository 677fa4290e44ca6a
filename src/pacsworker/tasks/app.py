"""The Celery app, configured from the settings: embedded filesystem broker or Redis."""

from __future__ import annotations

from celery import Celery

from ..config import Settings, load_settings
from ..records import DataLayout

DELIVERY_QUEUE = "delivery"

app = Celery("pacsworker", include=["pacsworker.tasks.jobs"])
_settings: Settings | None = None


def model_queue(model_name: str) -> str:
    """One queue per model, so a slow model cannot starve a fast one."""
    return f"model.{model_name}"


def celery_conf(settings: Settings) -> dict:
    layout = DataLayout(settings.data_dir).create()
    q = settings.queue
    conf = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": q.job_soft_time_limit,
        "task_time_limit": q.job_time_limit,
        "task_default_queue": DELIVERY_QUEUE,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 7 * 24 * 3600,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": q.publish_timeout_seconds,
        "task_track_started": True,
        # the job ledger in data_dir holds every outcome; with results on, each send subscribes to the
        # result backend first and waits out its retries when Redis is down
        "task_ignore_result": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }
    if q.broker_url:
        conf["broker_url"] = q.broker_url
        conf["broker_transport_options"] = {
            "visibility_timeout": q.visibility_timeout,
            "socket_connect_timeout": q.publish_timeout_seconds,
        }
        conf["result_backend"] = q.result_backend or q.broker_url
        conf["result_backend_transport_options"] = {"visibility_timeout": q.visibility_timeout}
    else:
        folder = layout.broker
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        conf["broker_url"] = "filesystem://"
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # kombu's default is ./control in the cwd
            "store_processed": False,
            "polling_interval": 0.2,
        }
        conf["result_backend"] = q.result_backend or f"db+sqlite:///{layout.root / 'celery-results.sqlite'}"
    return conf


def configure(settings: Settings) -> Celery:
    """Point the app at the broker and backend the settings name; returns the app."""
    global _settings
    reconfigured = _settings is not None and _settings.queue != settings.queue
    _settings = settings
    app.conf.update(celery_conf(settings))
    if reconfigured:  # connections to the previous broker must not carry the next messages
        if app._pool is not None:
            app._pool.force_close_all()
        app._pool = None
        app.amqp._producer_pool = None
    return app


def current_settings() -> Settings:
    """The settings this process was configured with (from ``$PACSWORKER_CONFIG`` if not yet set)."""
    if _settings is None:
        configure(load_settings())
    assert _settings is not None
    return _settings


@app.on_after_configure.connect
def _load_default(sender, **kwargs) -> None:  # `celery -A pacsworker.tasks.app flower` path
    if _settings is None:
        configure(load_settings())
