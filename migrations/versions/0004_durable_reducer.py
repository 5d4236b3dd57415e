"""the reducer retries through the database

An aggregating job's row says how many attempts its reducer made and when the next may
start, so a reducer waiting out a backoff survives a restart (any runner resumes it).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("reduce_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("reduce_available_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("reduce_available_at")
        batch.drop_column("reduce_attempts")
