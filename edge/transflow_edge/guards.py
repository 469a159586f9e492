"""ASGI middleware that bounds how long a client may take to send its request body.

A body sent at 1 byte/s would otherwise hold a connection, a buffer and a slot of `max_connections` for as
long as the client likes. The deadline starts when the request head has arrived; once the body is complete,
later `receive` calls (waiting for a disconnect) pass through untouched. The request head has its own deadline
(`head_deadline_protocol`); uvicorn's settings bound the rest: `limit_concurrency` (connections + running
requests), `timeout_keep_alive` (idle connections) and `h11_max_incomplete_event_size` (the head's size).
"""

from __future__ import annotations

import asyncio
import contextlib

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


def head_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol with a deadline on the request head: a connection that has not sent a complete
    request line and headers within `seconds` (after it opened, or after its previous response) is closed.
    Uvicorn has no such timeout of its own, so a client trickling its head would hold a connection slot."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the head is in; the body has its own deadline (BodyDeadline)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expired(self) -> None:
            self._head_timer = None
            in_flight = self.cycle is not None and not self.cycle.response_complete
            if not in_flight and not self.transport.is_closing():
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
                self.transport.close()

    return HeadDeadlineProtocol
