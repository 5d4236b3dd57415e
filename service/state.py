"""What the running service holds: built once per process in :func:`service.app.running`."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text

from .config import Settings
from .db import Database, head_revision
from .events import EventHub
from .lanes import Providers
from .metrics import Metrics
from .runner import Runner
from .store import Store
from .tenants import RateLimiter, Tenants


@dataclass
class AppState:
    settings: Settings
    db: Database
    store: Store
    hub: EventHub
    providers: Providers
    runner: Runner | None
    tenants: Tenants
    limiter: RateLimiter
    metrics: Metrics

    async def readiness(self) -> str | None:
        """None when ready; otherwise why not (database unreachable, migrations missing)."""
        try:
            async with self.db.read() as conn:
                current = (
                    await conn.execute(text("SELECT version_num FROM alembic_version"))
                ).scalar()
        except Exception as exc:
            return f"database not reachable or not migrated: {type(exc).__name__}"
        head = head_revision()
        if current != head:
            return f"migrations not applied: database at {current}, code at {head}"
        return None
