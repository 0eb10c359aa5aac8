"""The web console: the parent's pages for people (the index of partitions with live thumbnails, a partition's
screen live with its keyboard and mouse), plain HTML, CSS and JavaScript from ``static/`` (no build step, nothing
from another site), and the websockets of ``live``. ``setup`` is the plugin ``build_app`` takes."""

from __future__ import annotations

import weakref
from pathlib import Path

from aiohttp import web

from ..api import DAEMON, ApiError
from .live import SOCKETS, close_sockets, overview_socket, screen_socket

STATIC = Path(__file__).parent / "static"


def _page(name: str) -> web.FileResponse:
    return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


async def index(request: web.Request) -> web.FileResponse:
    return _page("index.html")


async def partition_page(request: web.Request) -> web.FileResponse:
    """The page of one partition; it need not be connected yet (the page waits for it and says so)."""
    name = request.match_info["name"]
    if not name or len(name) > 128:
        raise ApiError(404, "no such partition page")
    return _page("partition.html")


def setup(app: web.Application) -> None:
    assert DAEMON in app, "the web console plugs into build_app's application"
    app[SOCKETS] = weakref.WeakSet()
    app.router.add_get("/", index)
    app.router.add_get("/partitions/{name}", partition_page)
    app.router.add_get("/ws/partitions", overview_socket)
    app.router.add_get("/ws/partitions/{name}", screen_socket)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.on_shutdown.append(close_sockets)
