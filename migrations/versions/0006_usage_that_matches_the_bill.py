"""what an llm answer says beside its text; reasoning and cached tokens, and cost

Lanes keep an answer's finish reason, tool calls, refusal and logprobs summary
(``reply``); lanes and jobs count reasoning and cached tokens, and cost when prices are
configured (null, not 0, without them).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("lanes") as batch:
        batch.add_column(sa.Column("reply", sa.JSON(), nullable=True))
        for name in ("reasoning_tokens", "cached_tokens"):
            batch.add_column(
                sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
            )
        batch.add_column(sa.Column("cost_usd", sa.Float(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        for name in ("reasoning_tokens", "cached_tokens"):
            batch.add_column(
                sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
            )
        batch.add_column(sa.Column("cost_usd", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in ("cost_usd", "cached_tokens", "reasoning_tokens"):
            batch.drop_column(name)
    with op.batch_alter_table("lanes") as batch:
        for name in ("cost_usd", "cached_tokens", "reasoning_tokens", "reply"):
            batch.drop_column(name)
