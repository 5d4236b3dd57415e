"""The tables (Alembic migrations create them). The lanes table *is* the queue: the
runner claims rows from it; an aggregating job's row is the reducer's.

Times are stored as epoch seconds (float) so both engines compare them the same way.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, Any: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    lanes_total: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    deadline_at: Mapped[float | None] = mapped_column(Float)
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[Any | None] = mapped_column(JSON)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Null without prices: a cost is never made up as 0.
    cost_usd: Mapped[float | None] = mapped_column(Float)
    # Sequence number of the job's last event; bumped in the transaction that appends.
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    # Held by the process that runs the reducer while the job is aggregating; the
    # reducer's attempts so far, and when its next attempt may start (after a backoff).
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    reduce_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reduce_available_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_tenant_status", "tenant", "status"),
    )


class Lane(Base):
    __tablename__ = "lanes"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    output: Mapped[Any | None] = mapped_column(JSON)
    # The vote, score or gate verdict read from the output; its JSON text is the
    # grouping key the policy counts with.
    answer_key: Mapped[str | None] = mapped_column(Text)
    # The weight of its vote (null: 1), and why it abstained or weighs 1, if it did.
    weight: Mapped[float | None] = mapped_column(Float)
    note: Mapped[str | None] = mapped_column(Text)
    # When its last outcome was recorded (the recording transaction's time): a vote's
    # window rule reads the votes in that order, whichever worker's clock ran ahead.
    recorded_at: Mapped[float | None] = mapped_column(Float)
    error_type: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    # What an llm answer says beside its text: finish_reason, tool_calls, refusal, and
    # a logprobs summary (each only when there is one).
    reply: Mapped[Any | None] = mapped_column(JSON)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cost_usd: Mapped[float | None] = mapped_column(Float)
    queued_at: Mapped[float] = mapped_column(Float)
    available_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    # The provider its task calls ("http" for http tasks), and the tokens its running
    # attempt reserved of that provider's tokens a minute (settled when it ends).
    provider: Mapped[str] = mapped_column(String(100), server_default="default")
    reserved_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        Index("ix_lanes_status_available", "status", "available_at", "job_id", "idx"),
        Index("ix_lanes_provider_status", "provider", "status"),
        Index("ix_lanes_status_job_available", "status", "job_id", "available_at", "idx"),
    )


class Event(Base):
    __tablename__ = "events"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


jobs = cast(Table, Job.__table__)
lanes = cast(Table, Lane.__table__)
events = cast(Table, Event.__table__)


class IdempotencyKey(Base):
    """``Idempotency-Key`` of a create request, per tenant: the same key and body give
    the same job; written in the transaction that creates the job."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    expires_at: Mapped[float] = mapped_column(Float)


class Webhook(Base):
    """The outbox of a job's webhook: queued in the transaction that ends the job, then
    delivered at least once by whichever runner claims it."""

    __tablename__ = "webhooks"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    # Each attempt: {"at", "status_code", "error", "duration_s"}.
    history: Mapped[Any] = mapped_column(JSON)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (Index("ix_webhooks_status_next", "status", "next_attempt_at"),)


class ProviderState(Base):
    """A provider's limits as every process shares them: its request and token buckets
    (levels at a time), and when a 429 lets calls go again. Locked by a claim that
    admits lanes to it, so two processes never both take its last slot."""

    __tablename__ = "providers"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    requests_level: Mapped[float | None] = mapped_column(Float)
    tokens_level: Mapped[float | None] = mapped_column(Float)
    levels_at: Mapped[float | None] = mapped_column(Float)
    paused_until: Mapped[float | None] = mapped_column(Float)


idempotency_keys = cast(Table, IdempotencyKey.__table__)
webhooks = cast(Table, Webhook.__table__)
providers = cast(Table, ProviderState.__table__)
