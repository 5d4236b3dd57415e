"""Settings, read from the environment (prefix ``FANOUT_``). Imports nothing of ours."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class Price:
    """A model's prices in USD per million tokens; cached prompt tokens at
    ``cached_input`` (the input price when not given)."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, prompt: int, cached: int, completion: int) -> float:
        cached_price = self.input if self.cached_input is None else self.cached_input
        return (
            (prompt - cached) * self.input + cached * cached_price + completion * self.output
        ) / 1e6


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
    # Prices by model name; a model without one has no cost (absent, never 0).
    prices: Mapping[str, Price] = field(default_factory=dict)


class ProvidersFileError(ValueError):
    """A providers file that cannot be used, said in one line: the file, the provider,
    the key, what is wrong."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FANOUT_", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./fanout.db"
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str = ""
    providers_file: Path | None = None
    # Origins whose web pages may call the API (CORS), comma-separated; "*" for any.
    # Empty: none (browsers then keep other origins out).
    cors_origins: str = ""
    # A key that /metrics then needs (Authorization: Bearer); empty leaves it open.
    metrics_key: str = ""
    # Serve /docs and /openapi.json (false: 404).
    docs: bool = True
    # How long a job's stream token (for an EventSource, which cannot send headers) lasts.
    stream_token_ttl_s: float = Field(default=3600.0, gt=0)
    # Serve the simulator (fanout fake-llm) at /simulator/v1, every model name answered:
    # what `make run` sets when no provider is configured, with it as the default provider.
    simulator: bool = False

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _PriceTable(_Strict):
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)


class _ProviderTable(_Strict):
    base_url: str = Field(min_length=1)
    api_key_env: str | None = Field(default=None, min_length=1)
    api_key: str | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    reserve_tokens: int | None = Field(default=None, ge=1)
    prices: dict[str, _PriceTable] = Field(default_factory=dict)


class _ProvidersFile(_Strict):
    providers: dict[str, _ProviderTable] = Field(default_factory=dict)


def load_providers(path: Path) -> dict[str, Provider]:
    """Read ``[providers.NAME]`` tables: ``base_url``, ``api_key_env`` (or ``api_key``),
    ``max_concurrency``, ``rpm``, ``tpm``, ``reserve_tokens``, and
    ``[providers.NAME.prices."MODEL"]`` (``input``, ``cached_input``, ``output``, USD per
    million tokens). Anything wrong is a :class:`ProvidersFileError` saying where."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ProvidersFileError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProvidersFileError(f"{path}: not TOML: {exc}") from None
    try:
        tables = _ProvidersFile.model_validate(data).providers
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        what = error["msg"]
        if error["type"] == "extra_forbidden":
            what = "not a key a provider has"
        elif error["type"] == "missing":
            what = "required"
        raise ProvidersFileError(f"{path}: {where}: {what}") from None
    providers = {}
    for name, table in tables.items():
        api_key = table.api_key
        if table.api_key_env is not None:
            api_key = os.environ.get(table.api_key_env)
            if not api_key:
                raise ProvidersFileError(
                    f"{path}: providers.{name}.api_key_env: the variable "
                    f"{table.api_key_env} is not set"
                )
        prices = {
            model: Price(p.input, p.output, p.cached_input) for model, p in table.prices.items()
        }
        providers[name] = Provider(
            name=name,
            base_url=table.base_url,
            api_key=api_key,
            max_concurrency=table.max_concurrency,
            rpm=table.rpm,
            tpm=table.tpm,
            reserve_tokens=table.reserve_tokens,
            prices=prices,
        )
    return providers
