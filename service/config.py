"""Settings, read from the environment (prefix ``FANOUT_``). Imports nothing of ours."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class Provider:
    """An OpenAI-compatible endpoint that llm tasks may name."""

    name: str
    base_url: str | None
    api_key: str | None
    max_concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    # Tokens a call reserves of ``tpm`` for its answer when the task sets no max_tokens.
    reserve_tokens: int | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FANOUT_", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./fanout.db"
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str = ""
    providers_file: Path | None = None

    max_lanes_per_job: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_message_bytes: int = Field(default=262_144, ge=1)
    max_concurrency: int = Field(default=512, ge=1)
    # Claim weights of tenants, "tenant=weight,...": a tenant of weight 2 gets twice the
    # lanes in flight of one of weight 1 when both have work waiting (default 1).
    tenant_weights: str = ""
    lease_seconds: float = Field(default=30.0, gt=0)
    drain_seconds: float = Field(default=10.0, ge=0)
    egress_allow: str = ""
    webhook_secret: str | None = None
    # How lanes call providers: ``lean`` (aiohttp, plain dicts) or ``sdk`` (the openai
    # client, the reference; same requests, errors and results, more CPU per call).
    llm_client: Literal["lean", "sdk"] = "lean"

    # Per-tenant limits.
    rate_limit_per_minute: int = Field(default=600, ge=0)
    max_jobs_in_flight: int = Field(default=100, ge=1)
    idempotency_ttl_s: float = Field(default=86_400.0, gt=0)

    # Outbound calls: http tasks and webhooks.
    max_response_bytes: int = Field(default=1_048_576, ge=1024)
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_timeout_s: float = Field(default=10.0, gt=0)

    # Server-side maxima and defaults of a job's policy.
    max_lane_timeout_s: float = Field(default=600.0, gt=0)
    default_lane_timeout_s: float = Field(default=120.0, gt=0)
    max_deadline_s: float = Field(default=3600.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    retry_base_s: float = Field(default=0.5, ge=0)
    retry_max_s: float = Field(default=30.0, ge=0)

    # Runner tuning.
    claim_batch: int = Field(default=1000, ge=1)
    poll_interval_s: float = Field(default=1.0, gt=0)
    db_pool_size: int = Field(default=10, ge=1)
    run_migrations: bool = True
    keepalive_s: float = Field(default=15.0, gt=0)
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def heartbeat_s(self) -> float:
        """Leases are renewed three times per lease period."""
        return self.lease_seconds / 3

    @field_validator("tenant_weights")
    @classmethod
    def _weights_parse(cls, value: str) -> str:
        parse_weights(value)
        return value

    @cached_property
    def weights(self) -> dict[str, float]:
        """``tenant_weights`` parsed: ``{"acme": 2.0, ...}``."""
        return parse_weights(self.tenant_weights)

    @cached_property
    def providers(self) -> dict[str, Provider]:
        """The default provider from ``OPENAI_*`` plus any from the providers file."""
        providers = {
            "default": Provider(
                name="default",
                base_url=os.environ.get("OPENAI_BASE_URL") or None,
                api_key=os.environ.get("OPENAI_API_KEY") or None,
            )
        }
        if self.providers_file is not None:
            providers.update(load_providers(self.providers_file))
        return providers


def parse_weights(setting: str) -> dict[str, float]:
    """``"acme=2,globex=0.5"`` -> ``{"acme": 2.0, "globex": 0.5}``; ValueError otherwise."""
    weights = {}
    for pair in filter(None, (p.strip() for p in setting.split(","))):
        tenant, sep, weight = pair.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = 0.0
        if not sep or not tenant.strip() or not 0 < value < float("inf"):
            raise ValueError(f"entry {pair!r} is not tenant=weight with a weight above 0")
        weights[tenant.strip()] = value
    return weights


def load_providers(path: Path) -> dict[str, Provider]:
    """Read ``[providers.NAME]`` tables: base_url, api_key_env, max_concurrency, rpm, tpm."""
    data = tomllib.loads(path.read_text())
    providers = {}
    for name, table in data.get("providers", {}).items():
        key_env = table.get("api_key_env")
        providers[name] = Provider(
            name=name,
            base_url=table.get("base_url"),
            api_key=os.environ.get(key_env) if key_env else table.get("api_key"),
            max_concurrency=table.get("max_concurrency"),
            rpm=table.get("rpm"),
            tpm=table.get("tpm"),
            reserve_tokens=table.get("reserve_tokens"),
        )
    return providers
