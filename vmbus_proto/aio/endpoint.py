"""Where a parent listens and a child connects: ``tcp://HOST:PORT``, ``tls://HOST:PORT`` or ``unix:PATH``
(docs/protocol.md §1).

A ``tls://`` URL a child connects to may carry its TLS options as query parameters, as libpq and MongoDB
connection URIs do (``tls://10.0.0.5:6465?ca=ca.pem&cert=vm1.pem&key=vm1.key``): ``vmbus_proto.aio.tls``
reads them. A listening URL has none (the parent's certificate is in its ``[tls]`` section).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

FORMS = "expected tcp://HOST:PORT, tls://HOST:PORT or unix:PATH"
#: The query parameters a ``tls://`` URL may carry (``vmbus_proto.aio.tls.ClientTls``): the CA file that
#: verifies the parent, this child's certificate and key files, the name the parent's certificate must have
#: (default: HOST), and ``insecure=1`` (no verification of the parent).
TLS_PARAMS = ("ca", "cert", "key", "server_name", "insecure")


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """'tcp://HOST:PORT' -> ('tcp', host, port); 'tls://HOST:PORT[?...]' -> ('tls', host, port);
    'unix:PATH' (or 'unix://PATH') -> ('unix', path, 0).

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
    if parts.scheme not in ("tcp", "tls"):
        raise ValueError(f"{url!r}: unknown scheme {parts.scheme!r}; {FORMS}")
    if parts.path not in ("", "/") or parts.fragment or (parts.query and parts.scheme != "tls"):
        raise ValueError(f"{url!r}: a {parts.scheme} URL has no path; {FORMS}")
    tls_query(url)
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host; {FORMS}")
    port_text = parts.netloc.rpartition(":")[2] if ":" in parts.netloc.rpartition("]")[2] else ""
    if not port_text:
        raise ValueError(f"{url!r}: no port; {FORMS}")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{url!r}: port {port_text!r} is not a number in 0-65535")
    return parts.scheme, parts.hostname, int(port_text)


def tls_query(url: str) -> dict[str, str]:
    """The TLS options in a ``tls://`` URL's query (``TLS_PARAMS``); an unknown or repeated one is a ValueError."""
    query = urlsplit(url).query
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"{url!r}: the query is not KEY=VALUE&...; known keys: {', '.join(TLS_PARAMS)}") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in TLS_PARAMS:
            raise ValueError(f"{url!r}: unknown TLS option {key!r}; known: {', '.join(TLS_PARAMS)}")
        if key in out:
            raise ValueError(f"{url!r}: TLS option {key!r} given twice")
        out[key] = value
    return out


def without_query(url: str) -> str:
    """The URL without its query (what logs and messages show: the address, not the file names)."""
    return url.partition("?")[0]
