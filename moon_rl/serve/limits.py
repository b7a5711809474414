"""A cap on request bodies, enforced while they stream in (a client can lie in Content-Length, or send none)."""

from __future__ import annotations

import json
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: answer 413 with a JSON error once a request body exceeds `max_bytes`.

    A declared Content-Length over the limit is refused before anything is read; otherwise the bytes are counted as
    they arrive, so a chunked upload cannot get past it either.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:  # nothing sent yet: the client gets the reason, not a cut connection
                await self._refuse(send, None)

    async def _refuse(self, send: Any, size: int | None) -> None:
        what = (f"request body is {size:,} bytes; the limit is {self.max_bytes:,} bytes" if size is not None else
                f"request body is over the limit of {self.max_bytes:,} bytes")
        body = json.dumps({"detail": f"{what} (send smaller images, or fewer per request)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
