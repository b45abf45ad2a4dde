"""UDP sockets for the services: one socket per address family."""

from __future__ import annotations

import socket

from cyphonic.errors import CyphonicError
from cyphonic.wire.signaling import format_endpoint


def bind_udp(host: str, port: int, who: str) -> socket.socket:
    """A UDP socket bound to ``host:port``; IPv6 sockets are v6-only (the IPv4 socket
    carries IPv4), so each family has its own socket.  ``CyphonicError`` names ``who``
    and the address when the bind fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CyphonicError(
            f"{who} cannot listen on {format_endpoint((host, port))}: {exc.strerror}"
        ) from exc
    return sock


def family_of(host: str) -> int:
    """4 or 6."""
    return 6 if ":" in host else 4
