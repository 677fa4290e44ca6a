"""The ledger's tables: series, studies, jobs and their inputs, deliveries, receivers, events, counters.

Revision ID: 0001
Revises: (none)
Create Date: the first release of the ledger
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "counters",
        sa.Column("entity", sa.String(length=16), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("entity", "label", "state", name=op.f("pk_counters")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=160), server_default="", nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("series_uid", sa.String(length=64), nullable=True),
        sa.Column("job_id", sa.String(length=255), nullable=True),
        sa.Column("destination", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=True),
        sa.Column("count", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_events_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_events_job_id_id"), ["job_id", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_events_series_uid_id"), ["series_uid", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_events_study_uid_id"), ["study_uid", "id"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(length=255), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=8), server_default="series", nullable=False),
        sa.Column("spool_dir", sa.Text(), server_default="", nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("worker", sa.String(length=128), server_default="", nullable=False),
        sa.Column("stage", sa.String(length=16), server_default="", nullable=False),
        sa.Column("queued_at", sa.Double(), nullable=False),
        sa.Column("sent_at", sa.Double(), server_default="0", nullable=False),
        sa.Column("heartbeat", sa.Double(), server_default="0", nullable=False),
        sa.Column("started_at", sa.Double(), server_default="0", nullable=False),
        sa.Column("finished_at", sa.Double(), server_default="0", nullable=False),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("implausible", sa.JSON(), nullable=False),
        sa.Column("notes", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("traceback", sa.Text(), server_default="", nullable=False),
        sa.Column("delivery_task", sa.String(length=64), server_default="", nullable=False),
        sa.Column("delivery_started_at", sa.Double(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_queued_at_job_id"), ["queued_at", "job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_series_uid_model"), ["series_uid", "model"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_state_heartbeat"), ["state", "heartbeat"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_state_sent_at"), ["state", "sent_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_study_uid_model"), ["study_uid", "model"], unique=False)

    op.create_table(
        "receivers",
        sa.Column("receiver_id", sa.String(length=160), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("ports", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("heartbeat", sa.Double(), nullable=False),
        sa.Column("receiving", sa.JSON(), nullable=False),
        sa.Column("short_of_space", sa.Boolean(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("receiver_id", name=op.f("pk_receivers")),
    )
    op.create_table(
        "series",
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("modality", sa.String(length=16), server_default="", nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), server_default="", nullable=False),
        sa.Column("calling_aet", sa.String(length=16), server_default="", nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("instances", sa.Integer(), server_default="0", nullable=False),
        sa.Column("frames", sa.Integer(), server_default="0", nullable=False),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("completed_by", sa.Text(), server_default="", nullable=False),
        sa.Column("content_digest", sa.String(length=64), server_default="", nullable=False),
        sa.Column("contiguous", sa.Boolean(), nullable=True),
        sa.Column("contiguity", sa.Text(), server_default="", nullable=False),
        sa.Column("study_models", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("series_uid", name=op.f("pk_series")),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_series_last_seen_series_uid"), ["last_seen", "series_uid"], unique=False)
        batch_op.create_index(batch_op.f("ix_series_state_last_seen"), ["state", "last_seen"], unique=False)
        batch_op.create_index(batch_op.f("ix_series_study_uid"), ["study_uid"], unique=False)

    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("members", sa.JSON(), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("waiting", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("study_uid", name=op.f("pk_studies")),
    )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_studies_waiting_last_seen"), ["waiting", "last_seen"], unique=False)

    op.create_table(
        "deliveries",
        sa.Column("job_id", sa.String(length=255), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), server_default="", nullable=False),
        sa.Column("permanent", sa.Boolean(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.Double(), server_default="0", nullable=False),
        sa.Column("delivered_at", sa.Double(), server_default="0", nullable=False),
        sa.Column("dead_lettered_at", sa.Double(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.job_id"], name=op.f("fk_deliveries_job_id"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "destination", name=op.f("pk_deliveries")),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deliveries_state_dead_lettered_at"), ["state", "dead_lettered_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_deliveries_state_next_attempt_at"), ["state", "next_attempt_at"], unique=False
        )

    op.create_table(
        "job_inputs",
        sa.Column("job_id", sa.String(length=255), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.job_id"], name=op.f("fk_job_inputs_job_id"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "sop_instance_uid", name=op.f("pk_job_inputs")),
    )
    op.create_table(
        "job_series",
        sa.Column("job_id", sa.String(length=255), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("current", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.job_id"], name=op.f("fk_job_series_job_id"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "series_uid", name=op.f("pk_job_series")),
    )
    with op.batch_alter_table("job_series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_series_series_uid_current"), ["series_uid", "current"], unique=False)

    op.create_table(
        "delivery_instances",
        sa.Column("job_id", sa.String(length=255), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("file_name", sa.String(length=128), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.Column("delivered_at", sa.Double(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id", "destination"],
            ["deliveries.job_id", "deliveries.destination"],
            name="fk_delivery_instances_delivery",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "destination", "file_name", name=op.f("pk_delivery_instances")),
    )


def downgrade() -> None:
    op.drop_table("delivery_instances")
    with op.batch_alter_table("job_series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_series_series_uid_current"))

    op.drop_table("job_series")
    op.drop_table("job_inputs")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_state_next_attempt_at"))
        batch_op.drop_index(batch_op.f("ix_deliveries_state_dead_lettered_at"))

    op.drop_table("deliveries")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_waiting_last_seen"))

    op.drop_table("studies")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_study_uid"))
        batch_op.drop_index(batch_op.f("ix_series_state_last_seen"))
        batch_op.drop_index(batch_op.f("ix_series_last_seen_series_uid"))

    op.drop_table("series")
    op.drop_table("receivers")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_study_uid_model"))
        batch_op.drop_index(batch_op.f("ix_jobs_state_sent_at"))
        batch_op.drop_index(batch_op.f("ix_jobs_state_heartbeat"))
        batch_op.drop_index(batch_op.f("ix_jobs_series_uid_model"))
        batch_op.drop_index(batch_op.f("ix_jobs_queued_at_job_id"))

    op.drop_table("jobs")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_study_uid_id"))
        batch_op.drop_index(batch_op.f("ix_events_series_uid_id"))
        batch_op.drop_index(batch_op.f("ix_events_job_id_id"))
        batch_op.drop_index(batch_op.f("ix_events_at"))

    op.drop_table("events")
    op.drop_table("counters")
