"""The folder layout of ``data_dir``, the states every role names, and the JSON record models of
releases before the ledger (read by :mod:`pacsworker.ledger.importer` to upgrade such a data_dir).

Layout (all under ``storage.data_dir``)::

    ledger.sqlite3                                    the ledger (unless storage.database_url names PostgreSQL)
    incoming/                                         datasets still arriving (renamed into spool/)
    spool/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   instances as received
    series/<SeriesInstanceUID>.complete               a request to complete a series now
    jobs/<job_id>.app.log                             a MONAI Deploy application's log
    outbox/<job_id>/*.dcm                             results until every destination confirmed
    quarantine/<job_id>/*.dcm + reason.txt            results that failed the validation gate
    results/                                          default folder destination
    broker/, celery-results.sqlite                    embedded queue
    .pre-ledger/<timestamp>/                          JSON records of an earlier release, once imported
"""

from __future__ import annotations

import enum
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T", bound=BaseModel)

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object) -> bool:
    """True for a DICOM UID that may safely become part of a path (digits and dots, <= 64 chars)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(UID_RE.match(value))


class SeriesState(str, enum.Enum):
    """Where a received series stands; the last four say how it ended."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    SKIPPED = "skipped"
    DONE = "done"
    FAILED = "failed"
    NO_RESULT = "no-result"
    IMPLAUSIBLE = "implausible"


class JobState(str, enum.Enum):
    """Where a model job stands."""

    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"
    NO_RESULT = "no-result"
    IMPLAUSIBLE = "implausible"  # failed a plausibility check; its results were withheld


class DeliveryState(str, enum.Enum):
    """Where the delivery of a result (or one of its instances) to one destination stands."""

    PENDING = "pending"  # not yet sent, or waiting for its next attempt
    DELIVERED = "delivered"
    DEAD_LETTER = "dead-letter"  # given up: kept in the outbox until `pacsworker deliveries retry`


class SeriesRecord(BaseModel):
    series_uid: str
    study_uid: str
    modality: str = ""
    sop_class_uid: str = ""
    calling_aet: str = ""
    body_part: str = ""
    series_description: str = ""
    image_type: list[str] = Field(default_factory=list)
    mr_acquisition_type: str = ""
    scanning_sequence: list[str] = Field(default_factory=list)
    orientation: str = Field("", description="axial, coronal, sagittal, oblique; empty when unknown")
    instances: int = 0
    frames: int = Field(0, description="images: the instances' frames added up; 0: not counted (then instances)")
    first_seen: float = Field(default_factory=time.time)
    last_seen: float = Field(default_factory=time.time)
    state: SeriesState = SeriesState.RECEIVING
    reason: str = ""
    jobs: list[str] = Field(default_factory=list, description="the jobs of the latest routing")
    earlier_jobs: list[str] = Field(default_factory=list, description="jobs of earlier content of this series")
    content_digest: str = Field("", description="digest of the SOP Instance UIDs the series was routed with")
    completed_by: str = Field("", description="what made the series complete: quiet time, evidence, or forced")
    contiguous: bool | None = Field(None, description="no gap wider than the series' spacing; None: not checked")
    contiguity: str = Field("", description="what the contiguity check found")
    study_models: list[str] = Field(default_factory=list, description="models of scope study it was held for")
    sop_instance_uids: list[str] = Field(default_factory=list, exclude=True,
                                         description="in memory only: the instances it was completed with")


class JobRecord(BaseModel):
    job_id: str
    series_uid: str
    study_uid: str
    model: str
    spool_dir: str
    series_uids: list[str] = Field(default_factory=list, description="a study job: every series it was given")
    state: JobState = JobState.QUEUED
    attempts: int = 0
    worker: str = ""
    heartbeat: float = 0.0
    stage: str = Field("", description="while running: loading, model, encoding or validating")
    queued_at: float = Field(default_factory=time.time)
    sent_at: float = Field(0.0, description="when the broker took the job's message; 0: not yet")
    started_at: float = 0.0
    finished_at: float = 0.0
    timings: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    values: dict = Field(default_factory=dict, description="scores, classes and other non-DICOM outputs")
    implausible: list[str] = Field(default_factory=list, description="failed plausibility checks (withheld or flagged)")
    notes: list[str] = Field(default_factory=list, description="irregularities the input was processed with, as "
                             "configured (uneven slice gaps)")
    reason: str = ""
    traceback: str = Field("", description="what the model's code raised: its traceback from the model's own frames "
                           "(file and line), also logged")


class ReceiverRecord(BaseModel):
    """A running receiver's heartbeat (``receivers/<host>-<port>.json``), for ``status``."""

    host: str
    pid: int
    ae_title: str
    ports: dict[str, int] = Field(default_factory=dict, description="dimse, tls, stow, metrics")
    started_at: float
    heartbeat: float
    receiving: dict[str, int] = Field(default_factory=dict, description="series still receiving -> instances so far")
    short_of_space: bool = False


class StudyRecord(BaseModel):
    """A study that models of ``scope: study`` wait for: its complete series, until the study is quiet."""

    study_uid: str
    series: dict[str, str] = Field(default_factory=dict, description="Series Instance UID -> content digest")
    models: list[str] = Field(default_factory=list, description="study models its series matched")
    last_seen: float = Field(default_factory=time.time, description="the newest instance of any of its series")
    jobs: list[str] = Field(default_factory=list, description="the study jobs of its latest content")
    waiting: bool = True  # series changed since the last study jobs were made


class InstanceOutcome(BaseModel):
    """One result instance at one destination."""

    state: DeliveryState = DeliveryState.PENDING
    detail: str = Field("", description="what the destination said: a warning, 'already stored', a failure reason")
    delivered_at: float = 0.0


class DestinationOutcome(BaseModel):
    """A job's results at one destination: delivered once every instance is."""

    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    last_error: str = ""
    permanent: bool = Field(False, description="the last failure cannot heal by waiting (401, 403, 400, refused AE)")
    delivered_at: float = 0.0
    next_attempt_at: float = Field(0.0, description="when it is tried next; 0: as soon as possible")
    dead_lettered_at: float = 0.0
    instances: dict[str, InstanceOutcome] = Field(default_factory=dict, description="outbox file name -> outcome")


class DeliveryRecord(BaseModel):
    """``outbox/<job_id>/delivery.json``: the job's result files and their outcome at each destination."""

    job_id: str
    files: list[str]
    sop_instance_uids: dict[str, str] = Field(default_factory=dict, description="outbox file name -> SOP Instance UID")
    destinations: dict[str, DestinationOutcome] = Field(default_factory=dict)
    started_at: float = Field(
        default_factory=time.time, description="first attempt, or the latest `deliveries retry`: max age counts from here"
    )
    next_attempt_at: float = Field(0.0, description="the earliest next attempt of any pending destination")
    task_id: str = Field("", description="the deliver message (Celery task id) in charge; others are duplicates")

    @property
    def complete(self) -> bool:
        return all(d.state == DeliveryState.DELIVERED for d in self.destinations.values())

    @property
    def pending(self) -> bool:
        """Some destination still waits for an attempt."""
        return any(d.state == DeliveryState.PENDING for d in self.destinations.values())

    @property
    def dead_lettered(self) -> bool:
        """Settled (nothing pending) with some destination given up."""
        return not self.pending and any(d.state == DeliveryState.DEAD_LETTER for d in self.destinations.values())


def write_json_atomic(path: Path, record: BaseModel) -> None:
    """Write a record so that readers see the old or the new version, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(record.model_dump_json(indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, kind: type[T]) -> T | None:
    try:
        return kind.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


class DataLayout:
    """Paths under ``data_dir``; every role derives its folders from here."""

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir).resolve()
        self.spool = self.root / "spool"
        self.series = self.root / "series"
        self.jobs = self.root / "jobs"
        self.outbox = self.root / "outbox"
        self.broker = self.root / "broker"
        self.incoming = self.root / "incoming"
        self.quarantine = self.root / "quarantine"
        self.studies = self.root / "studies"
        self.receivers = self.root / "receivers"

    def create(self) -> DataLayout:
        # studies/ and receivers/ held JSON records before the ledger: only the importer reads them now
        for folder in (self.spool, self.incoming, self.series, self.jobs, self.outbox, self.broker):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def series_dir(self, series_uid: str) -> Path:
        if not is_valid_uid(series_uid):
            raise ValueError(f"invalid Series Instance UID {series_uid!r}")
        return self.spool / series_uid

    def completion_request(self, series_uid: str) -> Path:
        """A marker asking the receiver to complete a series now (``pacsworker series complete``)."""
        if not is_valid_uid(series_uid):
            raise ValueError(f"not a valid Series Instance UID: {series_uid!r}")
        return self.series / f"{series_uid}.complete"

    def series_record(self, series_uid: str) -> Path:
        return self.series / f"{series_uid}.json"

    def study_record(self, study_uid: str) -> Path:
        if not is_valid_uid(study_uid):
            raise ValueError(f"invalid Study Instance UID {study_uid!r}")
        return self.studies / f"{study_uid}.json"

    def job_record(self, job_id: str) -> Path:
        return self.jobs / f"{job_id}.json"

    def job_outbox(self, job_id: str) -> Path:
        return self.outbox / job_id

    def delivery_record(self, job_id: str) -> Path:
        return self.outbox / job_id / "delivery.json"

    def iter_records(self, folder: Path, kind: type[T]):
        return _read_all(sorted(folder.glob("*.json")), kind)

    def iter_deliveries(self):
        return _read_all(sorted(self.outbox.glob("*/delivery.json")), DeliveryRecord)


def _read_all(paths: list[Path], kind: type[T]):
    for path in paths:
        try:
            record = read_json(path, kind)
        except ValueError:
            continue  # a foreign or hand-edited file must not stop the daemon
        if record is not None:
            yield record


JOB_ENDINGS = {JobState.DONE, JobState.FAILED, JobState.NO_RESULT, JobState.IMPLAUSIBLE}
