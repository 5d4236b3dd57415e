"""The executor the runner uses: an llm task through its provider's client (its cost
from the provider's prices, when it has some for the model), an http task through the
egress guard."""

from __future__ import annotations

from dataclasses import replace

import httpx

from ..spec import HttpTask, LlmTask, Message
from .base import Attempt, OnDelta
from .http import run_http
from .llm import Providers, run_llm


class TaskExecutor:
    """:class:`~service.attempts.base.Executor` for real tasks. ``http`` is a client from
    :meth:`service.egress.EgressGuard.client` (http tasks never reach past the guard)."""

    def __init__(self, providers: Providers, http: httpx.AsyncClient, *, max_response_bytes: int):
        self.providers = providers
        self.http = http
        self.max_response_bytes = max_response_bytes

    async def __call__(
        self,
        task: LlmTask | HttpTask,
        *,
        timeout: float,
        messages: list[Message] | None = None,
        on_delta: OnDelta | None = None,
    ) -> Attempt:
        if isinstance(task, HttpTask):
            return await run_http(
                self.http, task, timeout=timeout, max_bytes=self.max_response_bytes
            )
        client = self.providers.client(task.provider)
        attempt = await run_llm(client, task, timeout=timeout, messages=messages, on_delta=on_delta)
        price = self.providers.providers[task.provider].prices.get(task.model)
        if price is None:
            return attempt
        usage = attempt.usage
        cost = price.cost(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
        return replace(attempt, usage=usage.model_copy(update={"cost_usd": cost}))
