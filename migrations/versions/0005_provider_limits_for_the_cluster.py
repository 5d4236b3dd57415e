"""provider limits shared by every process; lanes know their provider

Each lane names the provider its task calls and the tokens its running attempt reserved;
``providers`` holds each limited provider's request and token buckets and the end of a
429's pause, locked by the claims that admit lanes to it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("lanes") as batch:
        batch.add_column(
            sa.Column("provider", sa.String(length=100), nullable=False, server_default="default")
        )
        batch.add_column(
            sa.Column("reserved_tokens", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_index("ix_lanes_provider_status", "lanes", ["provider", "status"])
    op.create_table(
        "providers",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("requests_level", sa.Float(), nullable=True),
        sa.Column("tokens_level", sa.Float(), nullable=True),
        sa.Column("levels_at", sa.Float(), nullable=True),
        sa.Column("paused_until", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("providers")
    op.drop_index("ix_lanes_provider_status", table_name="lanes")
    with op.batch_alter_table("lanes") as batch:
        batch.drop_column("reserved_tokens")
        batch.drop_column("provider")
