"""The parent's HTTP side (aiohttp): the JSON API under ``/api/``, ``/metrics`` for Prometheus, and the place
the web console's pages plug in. It runs in the daemon's event loop and reads the daemon's live state.

- ``settings``: the ``[http]`` section (no aiohttp import, so the config loader stays light);
- ``server``: ``WebServer`` (bind, serve, stop) and ``build_app``, where routes are registered;
- ``api``: the JSON API; ``metrics``: the Prometheus collector; ``client``: ``parent-partition send-keys``.
"""
