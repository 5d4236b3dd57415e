"""an index for a tenant's unfinished jobs

Every create counts the tenant's jobs in flight (``FANOUT_MAX_JOBS_IN_FLIGHT``); without
this index that count read every job the tenant ever ran.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 18:10:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_status", table_name="jobs")
