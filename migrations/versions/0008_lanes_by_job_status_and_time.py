"""lanes in the order a claim reads them

The (job, status) index gains ``available_at`` and ``idx``: a claim counts a job's
lanes ready to start (queued, their time come) up to what it may give, and reads the
first of them in order, on this index alone, where it counted and numbered every open
lane of its jobs. The (status, available_at) index gains ``job_id`` and ``idx``, the
rest of the order in which a claim reads the first ready lanes of all jobs: lanes
that became ready at the same time (a map's thousands) are no longer sorted at each
claim. A big map's claims read a few lanes each, not ten thousand.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 22:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_lanes_job_status_available", "lanes", ["job_id", "status", "available_at", "idx"]
    )
    op.drop_index("ix_lanes_job_status", table_name="lanes")
    op.drop_index("ix_lanes_status_available", table_name="lanes")
    op.create_index(
        "ix_lanes_status_available", "lanes", ["status", "available_at", "job_id", "idx"]
    )


def downgrade() -> None:
    op.drop_index("ix_lanes_status_available", table_name="lanes")
    op.create_index("ix_lanes_status_available", "lanes", ["status", "available_at"])
    op.create_index("ix_lanes_job_status", "lanes", ["job_id", "status"])
    op.drop_index("ix_lanes_job_status_available", table_name="lanes")
