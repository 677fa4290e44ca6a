"""The Celery app, configured from the settings: embedded filesystem broker or Redis."""

from __future__ import annotations

import logging
import os
import time

from celery import Celery
from celery.signals import heartbeat_sent, worker_ready

from ..config import Settings, load_settings
from ..records import DataLayout
from .queues import DELIVERY_QUEUE

app = Celery("pacsworker", include=["pacsworker.tasks.jobs"])
_settings: Settings | None = None


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
        "event_queue_expires": q.event_queue_expires_seconds,
        # a pool process loads its models before it takes a job (worker_process_init): give it the time a job has
        "worker_proc_alive_timeout": float(q.job_time_limit),
    }
    if q.broker_url:
        conf["broker_url"] = q.broker_url
        conf["broker_transport"] = None  # the URL's
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
        conf["broker_transport"] = "pacsworker.tasks.broker:Transport"  # kombu's, with whole-file writes
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
    reconfigured = _settings is not None and (
        _settings.queue != settings.queue or _settings.data_dir != settings.data_dir  # the embedded broker's folder
    )
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


def expire_event_queues(connection, older_than: float) -> list[str]:
    """Unbind and empty the embedded broker's event queues whose oldest message waited over ``older_than`` s.

    A monitor (Flower, ``celery events``) binds its own event queue; kombu's filesystem transport
    ignores the queue's expiry (Celery's ``event_queue_expires``), so once the monitor is gone every
    worker's heartbeat would land in ``data_dir/broker`` as a file, for ever. Returns the queues removed.
    """
    channel = connection.default_channel
    exchange, prefix = app.conf.event_exchange, f"{app.conf.event_queue_prefix}."
    bindings = {binding.queue: binding for binding in channel.get_table(exchange)}
    now = time.time()
    oldest: dict[str, float] = {}
    with os.scandir(channel.data_folder_in) as entries:
        for entry in entries:
            queue = entry.name.partition(".")[2].removesuffix(".msg")  # kombu's "<ms>_<uuid>.<queue>.msg"
            if queue in bindings or queue.startswith(prefix):
                try:
                    oldest[queue] = min(oldest.get(queue, now), entry.stat().st_mtime)
                except FileNotFoundError:  # consumed meanwhile
                    pass
    expired = [queue for queue, mtime in oldest.items() if now - mtime > older_than]
    for queue in expired:
        if queue in bindings:  # the filesystem transport's _delete purges the queue and unbinds it
            channel._delete(queue, exchange, bindings[queue].routing_key, bindings[queue].pattern)
        else:  # an event sent while its queue was being unbound
            channel.queue_purge(queue)
    return expired


@heartbeat_sent.connect
def _expire_event_queues(sender, **kwargs) -> None:  # in every worker, at each heartbeat (2 s)
    if app.conf.broker_url == "filesystem://":
        with app.connection_for_write() as connection:
            expire_event_queues(connection, app.conf.event_queue_expires)


def quiet_celery_start_up(settings: Settings) -> None:
    """In a worker: our own lines instead of Celery's that mislead or repeat.

    ``Connected to filesystem://:**@localhost//`` reads like a masked password (the start-up says
    ``broker: embedded``); ``model@host ready.`` becomes a line naming the queues; ``Task ...
    succeeded`` follows every job, failed ones too (the job's own line says how it ended).
    """
    if not settings.queue.broker_url:
        logging.getLogger("celery.worker.consumer.connection").setLevel(logging.WARNING)
    logging.getLogger("celery.apps.worker").setLevel(logging.WARNING)
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    worker_ready.connect(_say_ready, weak=False)


def _say_ready(sender=None, **kwargs) -> None:
    queues = sorted(queue.name for queue in sender.task_consumer.queues) if sender and sender.task_consumer else []
    logging.getLogger("pacsworker.worker").info("worker %s ready: consuming %s", getattr(sender, "hostname", "?"),
                                                ", ".join(queues) or "no queue")


def quiet_celery_shutdown() -> None:
    """Celery's own shutdown words (``worker: Warm shutdown (MainProcess)``), for a worker that
    ``serve`` started: serve says once that it stops, for all its processes."""
    import celery.apps.worker

    say = celery.apps.worker.safe_say

    def say_all_but_shutdown(message, *args, **kwargs):
        if not str(message).startswith(("worker: ", "Waiting gracefully")):
            say(message, *args, **kwargs)

    celery.apps.worker.safe_say = say_all_but_shutdown
