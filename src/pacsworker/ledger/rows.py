"""What the ledger's queries return: one frozen dataclass per table row (identifiers, states, counts)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from sqlalchemy import Row

from ..records import is_valid_uid

R = TypeVar("R")

# routing facts a series may carry (SeriesRecord's fields of the same names); nothing else is stored
FACT_KEYS = ("body_part", "series_description", "image_type", "mr_acquisition_type", "scanning_sequence",
             "orientation")


def from_row(kind: type[R], row: Row | None) -> R | None:
    if row is None:
        return None
    mapping = row._mapping
    return kind(**{f.name: mapping[f.name] for f in fields(kind) if f.name in mapping})  # type: ignore[arg-type]


@dataclass(frozen=True)
class SeriesFacts:
    """What the receiver knows of a series from its first instance: identifiers and routing facts only.

    Raises
    ------
    ValueError
        For an invalid UID, an AE title longer than 16 characters, or a fact not in :data:`FACT_KEYS`
        (patient data has no place here).
    """

    series_uid: str
    study_uid: str
    modality: str = ""
    sop_class_uid: str = ""
    calling_aet: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("series_uid", "study_uid"):
            if not is_valid_uid(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} is not a valid DICOM UID")
        if self.sop_class_uid and not is_valid_uid(self.sop_class_uid):
            raise ValueError(f"sop_class_uid {self.sop_class_uid!r} is not a valid DICOM UID")
        if len(self.calling_aet) > 16 or len(self.modality) > 16:
            raise ValueError("calling_aet and modality are at most 16 characters")
        unknown = sorted(set(self.facts) - set(FACT_KEYS))
        if unknown:
            raise ValueError(f"series facts {unknown} are not routing facts; the ledger keeps only {list(FACT_KEYS)}")


@dataclass(frozen=True)
class NewJob:
    """A job to make: its id names its content and model; ``inputs`` are the SOP Instance UIDs it is
    made for (``{series_uid: [sop_uid, ...]}``), fixed from then on."""

    job_id: str
    series_uid: str
    study_uid: str
    model: str
    inputs: dict[str, list[str]]
    spool_dir: str = ""
    scope: str = "series"

    def __post_init__(self) -> None:
        if not self.job_id or len(self.job_id) > 255:
            raise ValueError(f"job id {self.job_id!r}: 1 to 255 characters")
        for uid in (self.series_uid, self.study_uid, *self.inputs, *(s for v in self.inputs.values() for s in v)):
            if not is_valid_uid(uid):
                raise ValueError(f"job {self.job_id}: {uid!r} is not a valid DICOM UID")
        if self.scope not in ("series", "study"):
            raise ValueError(f"job {self.job_id}: scope {self.scope!r} is neither series nor study")


@dataclass(frozen=True)
class Series:
    series_uid: str
    study_uid: str
    state: str
    modality: str
    sop_class_uid: str
    calling_aet: str
    facts: dict
    instances: int
    frames: int
    first_seen: float
    last_seen: float
    completed_by: str
    content_digest: str
    contiguous: bool | None
    contiguity: str
    study_models: list
    reason: str


@dataclass(frozen=True)
class Job:
    job_id: str
    series_uid: str
    study_uid: str
    model: str
    scope: str
    spool_dir: str
    state: str
    attempts: int
    worker: str
    stage: str
    queued_at: float
    sent_at: float
    heartbeat: float
    started_at: float
    finished_at: float
    outputs: dict
    values: dict
    timings: dict
    implausible: list
    notes: list
    reason: str
    traceback: str
    delivery_task: str
    delivery_started_at: float


@dataclass(frozen=True)
class Delivery:
    job_id: str
    destination: str
    state: str
    attempts: int
    last_error: str
    permanent: bool
    next_attempt_at: float
    delivered_at: float
    dead_lettered_at: float


@dataclass(frozen=True)
class DeliveredInstance:
    job_id: str
    destination: str
    file_name: str
    sop_instance_uid: str
    state: str
    detail: str
    delivered_at: float


@dataclass(frozen=True)
class Receiver:
    receiver_id: str
    host: str
    pid: int
    ae_title: str
    ports: dict
    started_at: float
    heartbeat: float
    receiving: dict
    short_of_space: bool


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    kind: str
    actor: str
    study_uid: str | None
    series_uid: str | None
    job_id: str | None
    destination: str | None
    state: str | None
    count: int | None
    reason: str


@dataclass(frozen=True)
class Claim:
    """What :meth:`claim_job` found: ``won`` with the claimed job, or the job's state (why not)."""

    won: bool
    state: str
    job: Job | None = None


@dataclass(frozen=True)
class Study:
    study_uid: str
    members: dict
    models: list
    last_seen: float
    waiting: bool
