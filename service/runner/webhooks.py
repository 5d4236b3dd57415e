"""The webhook sender: a finished job, POSTed and signed the Standard Webhooks way, at
least once, from the outbox (:mod:`service.store.outbox`).

``webhook-signature`` is ``v1,`` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")).
A secret written ``whsec_<base64>`` is used as those decoded bytes (the Standard
Webhooks form); any other secret as its UTF-8 bytes. The ``webhook-id`` is the same
on every attempt, so receivers can drop duplicates: delivery is at least once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from typing import Any

import httpx

from ..egress import EgressError, fetch
from ..events import Event, EventHub
from ..policy import backoff
from ..states import FINAL_EVENTS
from ..store import Store
from .lifecycle import Writes, sleep_until_woken

log = logging.getLogger("fanout.runner")
# The longest wait between two deliveries of one webhook.
MAX_DELAY_S = 600.0


def secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def message_id(job_id: str) -> str:
    return f"msg_{job_id}"


async def deliver(
    client: httpx.AsyncClient, url: str, body: bytes, *, job_id: str, secret: str, timeout: float
) -> dict[str, Any]:
    """One delivery attempt, as the record stored on the job: at, status_code, error,
    duration_s, ``delivered`` (a 2xx answer) and ``retry`` (worth another attempt)."""
    timestamp = int(time.time())
    msg_id = message_id(job_id)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }
    started = time.time()
    record: dict[str, Any] = {"at": started, "status_code": None, "error": None}
    refused = False
    try:
        response = await fetch(
            client,
            "POST",
            url,
            content=body,
            headers=headers,
            timeout=timeout,
            follow_redirects=False,
        )
        record["status_code"] = response.status
        if not 200 <= response.status < 300:
            record["error"] = f"HTTP {response.status}"
    except EgressError as exc:
        record["error"] = f"refused: {exc}"
        refused = True
    except (httpx.HTTPError, TimeoutError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    record["duration_s"] = round(time.time() - started, 4)
    record["delivered"] = record["error"] is None
    # A destination the egress guard refuses stays refused: no point retrying.
    record["retry"] = not record["delivered"] and not refused
    return record


# A finished job is delivered with its lanes up to this many; a bigger one (a 10,000-item
# map's lanes are megabytes) without them: the receiver pages them if it wants them.
WEBHOOK_MAX_LANES = 1000


class WebhookSender:
    """Delivers due webhooks; woken when a job ends (its webhook was queued in the
    same transaction) and when a retry is due."""

    def __init__(
        self,
        store: Store,
        hub: EventHub,
        http: httpx.AsyncClient,
        writes: Writes,
        *,
        owner: str,
        secret: str | None,
        timeout_s: float,
        max_attempts: int,
        retry_base_s: float,
        poll_interval_s: float,
    ) -> None:
        self.store = store
        self.http = http  # through the egress guard
        self.writes = writes
        self.owner = owner
        self.secret = secret
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.poll_interval_s = poll_interval_s
        self.claiming = True
        self._due = asyncio.Event()
        hub.add_listener(self._on_events)

    def stop_claiming(self) -> None:
        self.claiming = False

    def in_flight(self) -> list[asyncio.Task[None]]:
        return []

    async def run(self) -> None:
        while True:
            await sleep_until_woken(self._due, self.poll_interval_s)
            if self.secret is None or not self.claiming:
                continue
            due = await self.writes(self.store.outbox.claim(self.owner))
            await asyncio.gather(
                *(self._deliver(job_id, url, sent, self.secret) for job_id, url, sent in due)
            )

    async def _deliver(self, job_id: str, url: str, sent: int, secret: str) -> None:
        view = await self.store.jobs.get(job_id, None, max_lanes=WEBHOOK_MAX_LANES)
        view.webhook = None  # the delivery history is not part of what is delivered
        body = view.model_dump_json().encode()
        delivery = await deliver(
            self.http, url, body, job_id=job_id, secret=secret, timeout=self.timeout_s
        )
        retry_at = None
        if delivery.pop("retry") and sent + 1 < self.max_attempts:
            retry_at = time.time() + backoff(sent + 1, self.retry_base_s, MAX_DELAY_S)
        delivered = delivery.pop("delivered")
        if not delivered:
            log.warning("webhook for job %s failed: %s", job_id, delivery["error"])
        await self.writes(
            self.store.outbox.record(
                job_id, self.owner, delivery=delivery, delivered=delivered, retry_at=retry_at
            )
        )
        if retry_at is not None:
            asyncio.get_running_loop().call_later(retry_at - time.time(), self._due.set)

    def _on_events(self, events: list[Event]) -> None:
        if any(event["type"] in FINAL_EVENTS for event in events):
            self._due.set()
