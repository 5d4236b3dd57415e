"""weighted votes and red flags

A lane keeps the weight of its vote (its confidence, when votes are weighted), a note
when it abstained for a red flag or voted with weight 1 for want of logprobs, and when
its outcome was recorded (the order a vote's window rule reads).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("lanes") as batch:
        batch.add_column(sa.Column("weight", sa.Float(), nullable=True))
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))
        batch.add_column(sa.Column("recorded_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lanes") as batch:
        batch.drop_column("recorded_at")
        batch.drop_column("note")
        batch.drop_column("weight")
