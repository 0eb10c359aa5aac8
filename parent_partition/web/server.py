"""The parent's HTTP server (aiohttp), in the daemon's own event loop: the JSON API, ``/metrics``, and the web
console's pages, which plug into ``build_app``.

Binds to loopback unless told otherwise (``--http`` / ``[http] listen``): the API can type into any partition
and hot-remove its devices. With ``[http] token_file`` every request must carry that token (RFC 6750: an
``Authorization: Bearer`` header; a browser opens any page once with ``?token=`` and gets an HttpOnly,
SameSite=Strict cookie instead); on an address other hosts can reach, the server does not start without it.
With ``[http] tls_cert_file`` and ``tls_key_file`` it serves HTTPS; with ``tls_client_ca_file`` too, a client
certificate that CA signed is accepted in place of the token (nginx's ``ssl_verify_client optional``).
Shutdown follows aiohttp's ``web_runner`` (stop accepting, let handlers finish within the shutdown timeout).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vmbus_proto.aio.cli import os_reason

from ..config import Config
from ..counters import LatencyHistogram
from ..daemon import ParentDaemon, StartupError
from . import api
from .api import DAEMON, ApiError, error_response
from .metrics import LoopLag, VmbusCollector, registry
from .settings import HttpSettings, is_loopback, split_address

LAG = web.AppKey("lag", LoopLag)
MAX_BODY = 256 * 1024  # an API request body (typed text, a mouse report) is small
COOKIE = "vmbus_token"  # the browser's proof of the token (a digest of it, not the token itself)

#: Called with the app after the API and /metrics are registered: the web console adds its pages and
#: websockets here (``parent_partition.web.console.setup``, say), each seeing the daemon as ``app[DAEMON]``.
Plugin = Callable[[web.Application], None]


def build_app(daemon: ParentDaemon, settings: HttpSettings, plugins: list[Plugin] | None = None) -> web.Application:
    http_latency: dict[str, LatencyHistogram] = {}
    lag = LoopLag()
    local = settings.enabled and is_loopback(split_address(settings.listen)[0])
    app = web.Application(middlewares=[_errors(daemon.log, http_latency, local, settings.token, settings.client_certs)],
                          client_max_size=MAX_BODY)
    app[DAEMON] = daemon
    app[LAG] = lag
    reg = registry(VmbusCollector(daemon, settings.partition_labels, lag, http_latency))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(reg), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def root(request: web.Request) -> web.Response:
        raise web.HTTPFound("/api/")

    api.add_routes(app)
    app.router.add_get("/metrics", metrics)
    for plugin in plugins or []:
        plugin(app)
    if not any(getattr(r.resource, "canonical", None) == "/" for r in app.router.routes()):
        app.router.add_get("/", root)  # until the web console's pages own "/"
    app.on_startup.append(_start_lag)
    app.on_cleanup.append(_stop_lag)
    return app


async def _start_lag(app: web.Application) -> None:
    app[LAG].start()


async def _stop_lag(app: web.Application) -> None:
    await app[LAG].stop()


def _errors(log: Any, latency: dict[str, LatencyHistogram], local: bool, token: str | None,
            certs: bool = False) -> Any:
    """Every error as JSON with its status; an exception in a handler is logged and costs only its request.
    With ``token`` (or ``certs``: client certificates), a request without it gets 401 before anything else is
    looked at."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        try:
            signed_in = _authorize(request, token, certs)
            if signed_in is not None:
                return signed_in
            _guard(request, local)
            response: web.StreamResponse = await handler(request)
        except ApiError as exc:
            response = error_response(exc.status, str(exc))
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="vmbus-emu"'

        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(exc.status, _http_message(exc, request))
        except Exception:
            log.exception("HTTP handler failed", method=request.method, path=request.path)
            response = error_response(500, "internal error in the parent (logged)")
        if isinstance(response, web.WebSocketResponse):
            return response  # a console's session, not a request: its minutes are no request latency
        hist = latency.get(name)
        if hist is None:
            hist = latency[name] = LatencyHistogram()
        hist.observe(time.perf_counter() - started)
        return response

    return middleware


def cookie_value(token: str) -> str:
    return hashlib.sha256(b"vmbus-emu web console\0" + token.encode()).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _authorize(request: web.Request, token: str | None, certs: bool = False) -> web.StreamResponse | None:
    """None when the request may go on: no token (and no client CA) is configured, or it came with a verified
    client certificate (``certs``), or it carries the token (a Bearer header) or the cookie. A GET with the right
    ``?token=`` is answered with the cookie and a redirect to the same URL without it (so it leaves the address
    bar and the history); anything else is a 401."""
    if certs and request.transport is not None and request.transport.get_extra_info("peercert"):
        return None  # the TLS handshake verified it against tls_client_ca_file
    if token is None:
        if certs:
            raise ApiError(401, "this parent's API needs a client certificate signed by its [http] "
                                "tls_client_ca_file (curl --cert FILE --key FILE)")
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _same(given.strip(), token):
        return None
    cookie = request.cookies.get(COOKIE)
    if cookie is not None and _same(cookie, cookie_value(token)):
        return None
    query = request.query.get("token")
    if query is not None and request.method == "GET" and _same(query, token):
        rest = request.url.without_query_params("token")
        response = web.Response(status=302, headers={"Location": rest.path_qs})
        response.set_cookie(COOKIE, cookie_value(token), httponly=True, samesite="Strict", path="/")
        return response
    raise ApiError(401, "this parent's API needs its token ([http] token_file): send 'Authorization: Bearer "
                        "TOKEN', or open any page once with ?token=TOKEN")


def _guard(request: web.Request, local: bool) -> None:
    """What a browser could be tricked into: on a loopback server, a Host that names no loopback address is
    refused (DNS rebinding: a site whose name resolves to 127.0.0.1); anywhere, a state-changing request
    whose Origin is not this server (CSRF). Jupyter and Docker refuse both too."""
    if local and not is_loopback(urlsplit(f"//{request.host}").hostname or ""):
        raise ApiError(403, f"Host {request.host!r} is not a loopback address; use http://127.0.0.1 or localhost")
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        check_origin(request)


def check_origin(request: web.Request) -> None:
    """403 when the request carries another site's ``Origin`` (a browser sends it with every state-changing
    request and every websocket handshake; tools send none)."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise ApiError(403, f"cross-origin request from {origin} refused")


def _http_message(exc: web.HTTPException, request: web.Request) -> str:
    if exc.status == 404:
        return f"no such resource: {request.path} (see GET /api/ for the routes)"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    if exc.status == 413:
        return f"request body too large (at most {MAX_BODY} bytes)"
    return exc.text or exc.reason


class WebHost(Protocol):
    """What the HTTP listener needs of the process it serves: its log and its configuration."""

    log: Any

    @property
    def config(self) -> Config: ...


class WebServer:
    """The HTTP listener: ``start`` binds it (a StartupError if an address chosen explicitly cannot be bound),
    ``stop`` closes it."""

    def __init__(self, daemon: WebHost, settings: HttpSettings, plugins: list[Plugin] | None = None,
                 app: web.Application | None = None) -> None:
        """``app``: serve this application instead of ``build_app``'s for ``daemon`` (the supervisor of worker
        processes serves one that asks them; ``aggregate.py``)."""
        self.daemon = daemon
        self.settings = settings
        if app is None:
            assert isinstance(daemon, ParentDaemon)
            app = build_app(daemon, settings, plugins)
        self.app = app
        self.runner: web.AppRunner | None = None
        self.url: str | None = None
        self.log = daemon.log.bind(component="http")

    async def start(self) -> str | None:
        host, port = split_address(self.settings.listen)
        if not is_loopback(host) and self.settings.token is None and not self.settings.client_certs:
            raise StartupError(f"the web console and API on {self.settings.listen} would be reachable from other "
                               f"hosts with no authentication: set [http] token_file (or --http-token-file; "
                               f"'parent-partition secret new http' makes one) or tls_client_ca_file, or listen "
                               f"on a loopback address")
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=self.daemon.config.shutdown_timeout)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=self.settings.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            why = f"cannot listen for HTTP on {self.settings.listen}: {os_reason(exc)}"
            if self.settings.explicit:
                raise StartupError(f"{why}; choose another --http, or --http none") from None
            # The embedded default is busy (another parent?): run without the web side rather than not at all.
            self.log.warning("web console and API not started", reason=why,
                             hint="choose an address with --http HOST:PORT")
            return None
        self.runner = runner
        bound = runner.addresses[0][1] if runner.addresses else port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if self.settings.ssl_context else 'http'}://{shown}:{bound}"
        self.log.info("web console and API listening", url=self.url, token=self.settings.token is not None,
                      client_certs=self.settings.client_certs)
        return self.url

    async def stop(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()
