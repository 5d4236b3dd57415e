"""The event stream's response: ``text/event-stream`` written by one task, with one more
that waits for the client to leave; nothing is cancelled when a stream ends.

sse-starlette's ``EventSourceResponse`` ran four tasks a stream in a task group (the
body, a ping loop, a shutdown watcher, a disconnect listener) and cancelled three of
them at its end: each cancelled task left its frames and its ``CancelledError`` in a
reference cycle, and under a burst of short streams the garbage collector's walks of
them were a tenth of the service's CPU. Here the keep-alives come from the frames'
own wait (:func:`service.events.batches` yields an empty batch when nothing came for a
while), the server's stop closes the hub (:meth:`service.events.EventHub.close`), and the
client's leaving ends the batches through a :class:`service.events.Hangup`. The task
that waits for the client ends by itself once the response is complete: an ASGI
server answers ``receive()`` with ``http.disconnect`` then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..events import Frame

log = logging.getLogger(__name__)

RETRY_HINT = b"retry: 2000\n\n"  # how long a browser waits to reconnect, in ms
KEEPALIVE = b": ping\r\n\r\n"  # a comment line: EventSource ignores it
SEND_TIMEOUT_S = 30.0  # a client that reads nothing for this long is dropped

# Tasks waiting for their client to leave: held here so that none is collected early.
_waiting: set[asyncio.Task[None]] = set()


class EventStream(Response):
    """The frames of ``batches`` (:func:`service.events.batches`), each batch in one
    write (an empty one: a keep-alive). ``hangup`` is called when the client leaves
    (it must end ``batches``)."""

    def __init__(
        self,
        batches: AsyncGenerator[list[Frame], None],
        *,
        hangup: Callable[[], None],
        headers: Mapping[str, str] | None = None,
        send_timeout: float = SEND_TIMEOUT_S,
    ) -> None:
        self.batches = batches
        self.hangup = hangup
        self.send_timeout = send_timeout
        self.status_code = 200
        self.background = None
        # Set here, not on the class: OpenAPI would then add a string schema beside the
        # route's own description of the stream.
        self.media_type = "text/event-stream"
        self.init_headers({**(headers or {}), "Connection": "keep-alive"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if scope["method"] == "HEAD":  # the headers of a GET, and no stream
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        waiting = asyncio.create_task(self._wait_for_disconnect(receive))
        _waiting.add(waiting)
        waiting.add_done_callback(_waiting.discard)
        try:
            await self._send(send, RETRY_HINT)
            async for batch in self.batches:
                await self._send(send, b"".join(frame.body for frame in batch) or KEEPALIVE)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            # Not reading: its socket's buffers are full. The server closes the
            # connection of a response that ends unfinished.
            log.warning("dropped an event stream's client: nothing read for %ss", self.send_timeout)
        finally:
            await self.batches.aclose()

    async def _send(self, send: Send, body: bytes) -> None:
        async with asyncio.timeout(self.send_timeout):
            await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _wait_for_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.hangup()
