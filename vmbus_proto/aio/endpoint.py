"""Where a parent listens and a child connects: ``tcp://HOST:PORT`` or ``unix:PATH`` (docs/protocol.md §1)."""

from __future__ import annotations

from urllib.parse import urlparse


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """'tcp://HOST:PORT' -> ('tcp', host, port); 'unix:PATH' (or 'unix://PATH') -> ('unix', path, 0)."""
    if url.startswith("unix:"):
        path = url[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"{url}: unix: needs a path")
        return "unix", path, 0
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "tcp" or not parsed.hostname or port is None:
        raise ValueError(f"{url}: expected tcp://HOST:PORT or unix:PATH")
    return "tcp", parsed.hostname, port
