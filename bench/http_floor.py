"""The HTTP floor of the serving benchmark: a bare ASGI app under uvicorn, no framework.

It reads the whole request body and answers ``FEDSEG_BENCH_FLOOR_BYTES`` bytes, as the Open
Inference Protocol route does with a tensor in and probabilities out, and computes nothing: its
latency is what moving those bytes over loopback HTTP costs on the machine, the least any server
could add to a forward. ``uvicorn --app-dir bench http_floor:app``.
"""

from __future__ import annotations

import os
from typing import Any

ANSWER = b"x" * int(os.environ.get("FEDSEG_BENCH_FLOOR_BYTES", "2"))


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:  # the whole body, as a server must before it can answer
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": ANSWER})
