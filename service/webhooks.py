"""Webhooks: the final job, POSTed and signed the Standard Webhooks way.

``webhook-signature`` is ``v1,`` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")).
A secret written ``whsec_<base64>`` is used as those decoded bytes (the Standard
Webhooks form); any other secret as its UTF-8 bytes. The ``webhook-id`` is the same
on every attempt, so receivers can drop duplicates: delivery is at least once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import time
from typing import Any

import httpx

from .egress import EgressError, fetch


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


def retry_delay(attempts: int, base: float, cap: float = 600.0) -> float:
    """Exponential backoff with jitter after ``attempts`` failed deliveries."""
    ceiling = min(cap, base * 2 ** (attempts - 1))
    return random.uniform(ceiling / 2, ceiling)


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
