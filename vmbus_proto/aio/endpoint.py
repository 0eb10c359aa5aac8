"""Where a parent listens and a child connects: ``tcp://HOST:PORT`` or ``unix:PATH`` (docs/protocol.md §1)."""

from __future__ import annotations

from urllib.parse import urlsplit

FORMS = "expected tcp://HOST:PORT or unix:PATH"


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """'tcp://HOST:PORT' -> ('tcp', host, port); 'unix:PATH' (or 'unix://PATH') -> ('unix', path, 0).

    A bad URL is a ValueError whose message names the URL and what is wrong with it."""
    if not isinstance(url, str):
        raise ValueError(f"{url!r} is not a URL; {FORMS}")
    if url.startswith("unix:"):
        path = url[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"{url!r}: unix: needs a socket path, as in unix:./run/vmbus.sock")
        return "unix", path, 0
    if "://" not in url:
        raise ValueError(f"{url!r} is not an endpoint URL; {FORMS}")
    parts = urlsplit(url)
    if parts.scheme != "tcp":
        raise ValueError(f"{url!r}: unknown scheme {parts.scheme!r}; {FORMS}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a tcp URL has no path; {FORMS}")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host; {FORMS}")
    port_text = parts.netloc.rpartition(":")[2] if ":" in parts.netloc.rpartition("]")[2] else ""
    if not port_text:
        raise ValueError(f"{url!r}: no port; {FORMS}")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{url!r}: port {port_text!r} is not a number in 0-65535")
    return "tcp", parts.hostname, int(port_text)
