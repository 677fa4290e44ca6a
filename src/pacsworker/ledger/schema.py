"""The ledger's tables (SQLAlchemy Core). Identifiers and counts only: no patient data anywhere.

Times are seconds since the epoch by the database's clock (:class:`~.database.db_now`).
"""

from __future__ import annotations

import enum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
})

UID = 64  # a DICOM UID: at most 64 characters
AE = 16  # an AE title
STATE = 16


class EventKind(str, enum.Enum):
    """What an event in the history records."""

    RECEIVED = "received"  # a series opened (new, or received again after routing)
    COMPLETED = "completed"  # a series was judged complete
    ROUTED = "routed"  # a complete series was routed (to jobs, to its study, or skipped)
    QUEUED = "queued"  # a job was made (or made due again)
    SENT = "sent"  # a job's message was handed to the broker
    STARTED = "started"  # a worker claimed a job
    FINISHED = "finished"  # a job's attempt ended (its state says how)
    REQUEUED = "requeued"  # a running job's worker went silent; the job is queued again
    DELIVERED = "delivered"  # a job's results reached one destination
    DEAD_LETTERED = "dead-lettered"  # a destination was given up on
    RETRIED = "retried"  # an operator ran a job, or a delivery, again


series = Table(
    "series", metadata,
    Column("series_uid", String(UID), primary_key=True),
    Column("study_uid", String(UID), nullable=False),
    Column("state", String(STATE), nullable=False),
    Column("modality", String(16), nullable=False, server_default=""),
    Column("sop_class_uid", String(UID), nullable=False, server_default=""),
    Column("calling_aet", String(AE), nullable=False, server_default=""),
    Column("facts", JSON, nullable=False, default=dict),  # routing facts (body part, orientation, ...), see facts.py
    Column("instances", Integer, nullable=False, server_default="0"),
    Column("frames", Integer, nullable=False, server_default="0"),
    Column("first_seen", Double, nullable=False),
    Column("last_seen", Double, nullable=False),
    Column("completed_by", Text, nullable=False, server_default=""),
    Column("content_digest", String(64), nullable=False, server_default=""),
    Column("contiguous", Boolean, nullable=True),
    Column("contiguity", Text, nullable=False, server_default=""),
    Column("study_models", JSON, nullable=False, default=list),
    Column("reason", Text, nullable=False, server_default=""),
    Index(None, "state", "last_seen"),  # receiving series; series by state
    Index(None, "last_seen", "series_uid"),  # latest series, keyset paging
    Index(None, "study_uid"),
)

studies = Table(
    "studies", metadata,
    Column("study_uid", String(UID), primary_key=True),
    Column("members", JSON, nullable=False, default=dict),  # Series Instance UID -> content digest
    Column("models", JSON, nullable=False, default=list),  # study models its series matched
    Column("last_seen", Double, nullable=False),
    Column("waiting", Boolean, nullable=False),
    Index(None, "waiting", "last_seen"),  # studies that wait to be quiet
)

jobs = Table(
    "jobs", metadata,
    Column("job_id", String(255), primary_key=True),
    Column("series_uid", String(UID), nullable=False),  # a study job: its first series
    Column("study_uid", String(UID), nullable=False),
    Column("model", String(64), nullable=False),
    Column("scope", String(8), nullable=False, server_default="series"),  # series or study
    Column("spool_dir", Text, nullable=False, server_default=""),
    Column("state", String(STATE), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("worker", String(128), nullable=False, server_default=""),
    Column("stage", String(16), nullable=False, server_default=""),
    Column("queued_at", Double, nullable=False),
    Column("sent_at", Double, nullable=False, server_default="0"),  # 0: not (yet, or again) sent
    Column("heartbeat", Double, nullable=False, server_default="0"),
    Column("started_at", Double, nullable=False, server_default="0"),
    Column("finished_at", Double, nullable=False, server_default="0"),
    Column("outputs", JSON, nullable=False, default=dict),  # role -> SOP Instance UID, role_series -> Series
    Column("values", JSON, nullable=False, default=dict),  # scores, classes: what the model returned besides DICOM
    Column("timings", JSON, nullable=False, default=dict),
    Column("implausible", JSON, nullable=False, default=list),
    Column("notes", JSON, nullable=False, default=list),
    Column("reason", Text, nullable=False, server_default=""),
    Column("traceback", Text, nullable=False, server_default=""),
    Column("delivery_task", String(64), nullable=False, server_default=""),  # the deliver message in charge
    Column("delivery_started_at", Double, nullable=False, server_default="0"),
    Index(None, "state", "sent_at"),  # queued jobs not sent, or sent too long ago
    Index(None, "state", "heartbeat"),  # running jobs whose heartbeat stopped
    Index(None, "queued_at", "job_id"),  # latest jobs, keyset paging
    Index(None, "series_uid", "model"),  # the earlier result of a series and model
    Index(None, "study_uid", "model"),
)

job_series = Table(
    "job_series", metadata,
    Column("job_id", String(255), ForeignKey("jobs.job_id", ondelete="CASCADE"), primary_key=True),
    Column("series_uid", String(UID), primary_key=True),
    Column("current", Boolean, nullable=False),  # a job of the series' latest routing (else of earlier content)
    Index(None, "series_uid", "current"),
)

job_inputs = Table(
    "job_inputs", metadata,
    Column("job_id", String(255), ForeignKey("jobs.job_id", ondelete="CASCADE"), primary_key=True),
    Column("sop_instance_uid", String(UID), primary_key=True),
    Column("series_uid", String(UID), nullable=False),
)

deliveries = Table(
    "deliveries", metadata,
    Column("job_id", String(255), ForeignKey("jobs.job_id", ondelete="CASCADE"), primary_key=True),
    Column("destination", String(64), primary_key=True),
    Column("state", String(STATE), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=False, server_default=""),
    Column("permanent", Boolean, nullable=False, server_default="0"),
    Column("next_attempt_at", Double, nullable=False, server_default="0"),
    Column("delivered_at", Double, nullable=False, server_default="0"),
    Column("dead_lettered_at", Double, nullable=False, server_default="0"),
    Index(None, "state", "next_attempt_at"),  # pending deliveries, overdue ones
    Index(None, "state", "dead_lettered_at"),  # dead letters, newest first
)

delivery_instances = Table(
    "delivery_instances", metadata,
    Column("job_id", String(255), primary_key=True),
    Column("destination", String(64), primary_key=True),
    Column("file_name", String(128), primary_key=True),
    Column("sop_instance_uid", String(UID), nullable=False),
    Column("state", String(STATE), nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Column("delivered_at", Double, nullable=False, server_default="0"),
    ForeignKeyConstraint(["job_id", "destination"], ["deliveries.job_id", "deliveries.destination"],
                         ondelete="CASCADE", name="fk_delivery_instances_delivery"),
)

receivers = Table(
    "receivers", metadata,
    Column("receiver_id", String(160), primary_key=True),  # host:port
    Column("host", String(128), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("ae_title", String(AE), nullable=False),
    Column("ports", JSON, nullable=False, default=dict),
    Column("started_at", Double, nullable=False),
    Column("heartbeat", Double, nullable=False),
    Column("receiving", JSON, nullable=False, default=dict),  # series still receiving -> instances so far
    Column("short_of_space", Boolean, nullable=False, server_default="0"),
)

events = Table(
    "events", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("at", Double, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("actor", String(160), nullable=False, server_default=""),  # host/role/AE title of who did it
    Column("study_uid", String(UID), nullable=True),
    Column("series_uid", String(UID), nullable=True),
    Column("job_id", String(255), nullable=True),
    Column("destination", String(64), nullable=True),
    Column("state", String(STATE), nullable=True),  # the state it led to
    Column("count", Integer, nullable=True),  # instances, attempts: what the kind counts
    Column("reason", Text, nullable=False, server_default=""),
    Index(None, "at"),
    Index(None, "series_uid", "id"),
    Index(None, "study_uid", "id"),
    Index(None, "job_id", "id"),
)

counters = Table(
    "counters", metadata,  # how many series, jobs and deliveries are in each state: kept by every transition
    Column("entity", String(16), primary_key=True),  # series, job, delivery
    Column("label", String(64), primary_key=True),  # a job's model, a delivery's destination; '' for series
    Column("state", String(STATE), primary_key=True),
    Column("n", Integer, nullable=False),
)
