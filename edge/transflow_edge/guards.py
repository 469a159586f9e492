"""ASGI middleware that bounds how long a client may take to send its request body.

A body sent at 1 byte/s would otherwise hold a connection, a buffer and a slot of `max_connections` for as
long as the client likes. The deadline starts when the request head has arrived; once the body is complete,
later `receive` calls (waiting for a disconnect) pass through untouched. Uvicorn's own settings bound the rest:
`limit_concurrency` (connections + running requests), `timeout_keep_alive` (idle connections) and
`h11_max_incomplete_event_size` (the request head).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transflow_edge.parsing import ApiError


class BodyDeadline:
    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.seconds
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, f"request body not received within {self.seconds:g} s") from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)
