"""Prometheus metrics of every pacsworker process, and the counts read from the ledger.

Counters and histograms are counted where things happen (the receiver, a worker's task). A process
that serves the metrics port adds, at each scrape, what the ledger's counters say (the query layer
status and the status page read, :mod:`pacsworker.ledger.views`): series and jobs by state,
deliveries pending and dead-lettered; and the queues' depth. Processes of one ``serve`` (and
the pool children of one worker) write to a shared multiprocess folder
(``PROMETHEUS_MULTIPROC_DIR``), which the serving process sums, so one port shows them all.

Labels carry AE titles, model and destination names, states and reason kinds, never UIDs or
patient data, so their number stays bounded.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter as Tally
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

INSTANCES = Counter("pacsworker_instances_received", "Instances stored (before the success answer)",
                    ["calling_ae", "via"])
BYTES = Counter("pacsworker_received_bytes", "Bytes of instances stored", ["calling_ae", "via"])
ASSOCIATIONS = Counter("pacsworker_associations", "Associations by calling AE and outcome",
                       ["calling_ae", "outcome"])
REFUSED = Counter("pacsworker_instances_refused", "Instances refused, by status kind", ["calling_ae", "reason"])
SERIES_COMPLETED = Counter("pacsworker_series_completed", "Series complete, by what completed them", ["by"])
SERIES_ROUTED = Counter("pacsworker_series_routed", "Complete series routed: queued, held for a study, or "
                        "skipped (with the rule that failed)", ["outcome", "reason"])
JOBS_FINISHED = Counter("pacsworker_jobs_finished", "Jobs that ended, by model and state", ["model", "state"])
DELIVERIES = Counter("pacsworker_deliveries", "Delivery attempts to a destination, by outcome",
                     ["destination", "outcome"])
STAGE_SECONDS = Histogram(
    "pacsworker_stage_seconds",
    "Seconds per stage: receive (first to last instance), complete (last instance to complete), queued (job "
    "queued to started), load, model, encode (SEG/SR built and validated), deliver (results written to all "
    "destinations confirmed)",
    ["stage"], buckets=STAGE_BUCKETS,
)

MAX_AE_LABELS = 100  # distinct calling AE titles counted by name; any more are counted as "(other)"
_ae_labels: set[str] = set()
_ae_lock = threading.Lock()


def ae_label(calling_ae: str) -> str:
    """The calling AE title as a label, bounded: a peer cycling through titles cannot grow the metrics."""
    with _ae_lock:
        if calling_ae in _ae_labels:
            return calling_ae
        if len(_ae_labels) < MAX_AE_LABELS:
            _ae_labels.add(calling_ae)
            return calling_ae
    return "(other)"


_COMPLETED_BY = (("quiet", "quiet"), ("request", "request"), ("released", "release"))


def completed_by_kind(why: str) -> str:
    """A bounded label from a completion reason: quiet, evidence, release or request."""
    return next((kind for word, kind in _COMPLETED_BY if word in why), "evidence")


def skip_reason_kind(reason: str) -> str:
    """A bounded label from a routing reason: the first rule that failed ("modality", "SOP class", ...)."""
    if not reason:
        return ""
    first = reason.split("; ")[0]
    first = first.split(": ", 1)[-1]
    match = re.match(r"(modality|SOP class|body part|MR acquisition type|image type|series description|"
                     r"orientation|sender|no models configured)", first)
    if match:
        return match.group(1).lower().replace(" ", "_")
    if "instance(s), fewer" in first:
        return "too_few_instances"
    if "instance(s), more" in first:
        return "too_many_instances"
    return "other"


def observe_stage(stage: str, seconds: float) -> None:
    if seconds >= 0:
        STAGE_SECONDS.labels(stage).observe(seconds)


def registry_for_serving() -> CollectorRegistry:
    """The registry a metrics port serves: this process's metrics, or every process's of a multiprocess folder."""
    from prometheus_client import REGISTRY

    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    return registry


class RecordsCollector:
    """Gauges from the ledger (its counters: O(1) however long the history) and the broker, read at most
    every ``cache_seconds``."""

    def __init__(self, settings, cache_seconds: float = 5.0, ledger=None):
        self.settings = settings
        self.ledger = ledger  # None: the process's ledger (open_ledger), opened at the first scrape
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._at = 0.0
        self._families: list = []

    def collect(self):
        with self._lock:
            if time.monotonic() - self._at >= self.cache_seconds or not self._families:
                self._families = self._read()
                self._at = time.monotonic()
            return list(self._families)

    def _read(self) -> list:
        from .ledger import open_ledger
        from .ledger.views import gauges

        counted = gauges(self.ledger if self.ledger is not None else open_ledger(self.settings, "metrics"))
        families = []
        by_state = GaugeMetricFamily("pacsworker_series", "Series by state (the ledger's counters)", labels=["state"])
        for state, count in sorted(counted.series.items()):
            by_state.add_metric([state], count)
        families.append(by_state)
        receiving = GaugeMetricFamily("pacsworker_receiving_instances", "Instances of series still receiving "
                                      "(as last recorded)")
        receiving.add_metric([], counted.receiving_instances)
        families.append(receiving)
        job_states = GaugeMetricFamily("pacsworker_jobs", "Jobs by model and state (the ledger's counters)",
                                       labels=["model", "state"])
        for (model, state), count in sorted(counted.jobs.items()):
            job_states.add_metric([model, state], count)
        families.append(job_states)
        deliveries = GaugeMetricFamily("pacsworker_outbox_destinations", "Result sets in the outbox per "
                                       "destination: pending (incl. retrying) or dead-lettered", labels=["state"])
        for state in ("pending", "dead-letter"):
            deliveries.add_metric([state], counted.deliveries.get(state, 0))
        families.append(deliveries)
        depth = GaugeMetricFamily("pacsworker_queue_depth", "Messages waiting in each queue", labels=["queue"])
        for queue, count in sorted(queue_depths(self.settings).items()):
            depth.add_metric([queue], count)
        families.append(depth)
        return families


def queue_names(settings) -> list[str]:
    from .tasks.queues import DELIVERY_QUEUE, model_queue

    return [model_queue(m.name) for m in settings.models] + [DELIVERY_QUEUE]


def queue_depths(settings) -> dict[str, int]:
    """Messages waiting per queue: files of the embedded broker, or the lengths of Redis' lists."""
    names = queue_names(settings)
    url = settings.queue.broker_url
    if not url:
        from .records import DataLayout

        folder = DataLayout(settings.data_dir).broker
        counts: Tally[str] = Tally()
        try:
            for entry in os.scandir(folder):
                if entry.name.endswith(".msg"):
                    counts[entry.name[:-4].split(".", 1)[-1]] += 1
        except FileNotFoundError:
            pass
        return {name: counts.get(name, 0) for name in names}
    if url.startswith(("redis://", "rediss://")):
        import redis

        try:
            client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            pipe = client.pipeline()
            keys = [(name, key) for name in names for key in [name] + [f"{name}\x06\x16{p}" for p in range(1, 10)]]
            for _, key in keys:
                pipe.llen(key)
            depths: Tally[str] = Tally()
            for (name, _), length in zip(keys, pipe.execute(), strict=True):
                depths[name] += int(length)
            return {name: depths.get(name, 0) for name in names}
        except Exception:  # noqa: BLE001 - the broker is down: readiness says so; no depth to give
            return {}
    return {}


def prepare_multiprocess_folder(folder: Path) -> None:
    """An empty folder for the multiprocess metrics of one serve or worker (stale files would count)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
