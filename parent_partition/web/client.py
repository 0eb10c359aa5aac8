"""``parent-partition send-keys``: type into a partition through the parent's JSON API, as Hyper-V's
``Type Clipboard Text`` and ``Ctrl+Alt+Delete`` buttons do from VMConnect.

It posts ``/api/partitions/NAME/input/text`` and then ``/input/keys``; a refusal (unknown partition, keyboard
not ready, a bad key name) or an unreachable parent is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any
from urllib.parse import quote

import aiohttp

from .settings import DEFAULT_HTTP

DEFAULT_API = f"http://{DEFAULT_HTTP}"
TIMEOUT = 30.0  # seconds for each request (a guest that does not read its ring holds input back 10 s)


class SendError(Exception):
    """The parent refused or could not be reached; the message says which and why."""


async def _post(session: aiohttp.ClientSession, api: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` as JSON; the answer's JSON, or a SendError with the parent's words."""
    url = api.rstrip("/") + path
    try:
        async with session.post(url, json=body) as resp:
            try:
                answer = await resp.json(content_type=None)
            except ValueError:
                answer = None
            if resp.status >= 400 or not isinstance(answer, dict):
                message = answer.get("error") if isinstance(answer, dict) else None
                raise SendError(message or f"{url}: HTTP {resp.status} {resp.reason}")
            return answer
    except aiohttp.ClientConnectorError as exc:
        why = os.strerror(exc.os_error.errno).lower() if exc.os_error.errno else str(exc)
        raise SendError(f"cannot reach the parent's API at {api}: {why}; is "
                        f"parent-partition serve running (its --http address)?") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SendError(f"{url}: {type(exc).__name__}: {exc or 'timed out'}") from None


async def send(api: str, partition: str, text: str | None, keys: str | None, token: str | None = None) -> int:
    """Type ``text``, then press ``keys``; returns the number of key events sent. ``token``: the API's
    (``[http] token_file``), sent as a Bearer token."""
    base = f"/api/partitions/{quote(partition, safe='')}/input"
    sent = 0
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT), headers=headers) as session:
        if text:
            sent += int((await _post(session, api, base + "/text", {"text": text}))["events"])
        if keys:
            sent += int((await _post(session, api, base + "/keys", {"keys": keys}))["events"])
    return sent


def run(api: str, partition: str, text: str | None, keys: str | None, token: str | None = None) -> int:
    try:
        sent = asyncio.run(send(api, partition, text, keys, token))
    except SendError as exc:
        print(f"parent-partition send-keys: error: {exc}", file=sys.stderr)
        return 1
    print(f"{partition}: {sent} key events sent")
    return 0
