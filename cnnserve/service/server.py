"""What ``cnnserve serve`` hands to uvicorn beyond the app: the HTTP protocol class.

uvicorn's own choice of protocol (httptools when installed, else h11), with ``TCP_NODELAY``
set on every connection. asyncio sets it only on sockets that report the TCP protocol, and
with several workers uvicorn binds the listening socket without saying so; h11 then writes a
response's head and body separately, and the body waits for the client's delayed ACK: about
40 ms on every keep-alive request after the first.
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.auto import AutoHTTPProtocol

__all__ = ["NoDelayHTTPProtocol", "set_nodelay"]


def set_nodelay(transport: asyncio.BaseTransport) -> bool:
    """Switch Nagle's algorithm off on a TCP transport's socket; False if it is not TCP."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a stream socket after all
        return False
    return True


class NoDelayHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, with ``TCP_NODELAY`` on each connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        set_nodelay(transport)
        super().connection_made(transport)
