"""Which browser origins may open a WebSocket session (protocol.md §1).

A browser names the origin of the page behind every WebSocket handshake in the ``Origin``
header (RFC 6455 §4.1 item 8, §10.2); other clients (wscat, Python) send none. Allowed:

- no ``Origin`` header: not a browser, so no one else's page is driving a victim's browser;
- the gateway's own origin: ``Origin`` names the host and port of the request's ``Host`` header
  (RFC 9110 §7.2), as the page served at ``/`` does;
- the origins listed in ``FARMESH_ALLOWED_ORIGINS``.

Everything else is refused, including ``null`` (RFC 6454 §6.2: the opaque origin of sandboxed
frames, ``file:`` pages and ``data:`` URLs names no one), a list of origins and more than one
``Origin`` header (RFC 6454 §7.1, §7.3: a user agent sends one origin).

Origins compare as (scheme, host, port) triples (RFC 6454 §3.2, §5): scheme and host
case-insensitively (RFC 3986 §3.1, §3.2.2), IPv6 addresses in canonical form, and an omitted
port is the scheme's default (RFC 6454 §4 step 6: 80 for http, 443 for https). ``Host`` has no
scheme, so for the same-origin rule its omitted port is the default of the ``Origin``'s scheme,
and the scheme itself is not compared: behind a TLS-terminating proxy the page is ``https``
while the gateway sees plain HTTP. This does not stop DNS rebinding (a hostile name resolving
to the gateway makes its page same-origin); only a list of accepted ``Host`` values would.
"""

import ipaddress
import re
from collections.abc import Collection, Sequence
from typing import Final, NamedTuple

DEFAULT_PORTS: Final = {"http": 80, "https": 443}

# RFC 3986 §3.1 scheme; §3.2.2 host as an IP-literal (IPv6 only) or a reg-name of unreserved
# characters (browsers send IDNs as punycode); §3.2.3 port. Matched on lower-cased text.
_SCHEME = r"[a-z][a-z0-9+.-]*"
_AUTHORITY: Final = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9._~-]+)(?::(?P<port>[0-9]{1,5}))?")
_ORIGIN: Final = re.compile(rf"(?P<scheme>{_SCHEME})://(?P<authority>[^/?#@\s]*)")


class Origin(NamedTuple):
    """An origin triple (RFC 6454 §3.2); ``port`` is None for a scheme with no default."""

    scheme: str
    host: str
    port: int | None


def parse_authority(text: str) -> tuple[str, int | None]:
    """``host[:port]`` (a ``Host`` header, or an origin's authority) as (host, port or None).

    Raises ValueError if it is not one.
    """
    match = _AUTHORITY.fullmatch(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not host[:port]")
    host, port = match["host"], match["port"]
    if host.startswith("["):
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"{text!r} has an invalid IPv6 address") from None
    if port is None:
        return host, None
    if int(port) > 65535:
        raise ValueError(f"{text!r} has a port above 65535")
    return host, int(port)


def parse_origin(text: str) -> Origin:
    """A serialized origin ``scheme://host[:port]`` (RFC 6454 §6.2); raises ValueError for
    anything else, ``null`` included."""
    match = _ORIGIN.fullmatch(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not an origin (scheme://host[:port])")
    scheme = match["scheme"]
    host, port = parse_authority(match["authority"])
    return Origin(scheme, host, DEFAULT_PORTS.get(scheme) if port is None else port)


def origin_allowed(
    origin_headers: Sequence[str], host_headers: Sequence[str], allowed: Collection[Origin]
) -> bool:
    """May a handshake with these ``Origin`` and ``Host`` header values (every value of each,
    in order) open a session, given the extra ``allowed`` origins? See the module docstring."""
    if not origin_headers:
        return True
    if len(origin_headers) > 1:
        return False
    try:
        origin = parse_origin(origin_headers[0])
    except ValueError:
        return False
    return origin in allowed or (len(host_headers) == 1 and _is_own(origin, host_headers[0]))


def _is_own(origin: Origin, host_header: str) -> bool:
    """Does the origin name the host and port the request was sent to?"""
    default_port = DEFAULT_PORTS.get(origin.scheme)
    if default_port is None:
        return False
    try:
        host, port = parse_authority(host_header)
    except ValueError:
        return False
    return (host, default_port if port is None else port) == (origin.host, origin.port)
