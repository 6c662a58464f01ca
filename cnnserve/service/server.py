"""What ``cnnserve serve`` hands to uvicorn beyond the app: the HTTP protocol class.

:class:`ServiceHTTPProtocol` is uvicorn's own choice of protocol (httptools when installed,
else h11) with what a server facing slow, faulty or hostile clients needs:

- ``TCP_NODELAY`` on every connection. asyncio sets it only on sockets that report the TCP
  protocol, and with several workers uvicorn binds the listening socket without saying so;
  h11 then writes a response's head and body separately, and the body waits for the client's
  delayed ACK: about 40 ms on every keep-alive request after the first.
- A header timeout: a connection has ``header_timeout`` seconds, from its opening or from the
  first byte of its next request, to send that request's headers (one that sent nothing at
  all is closed without an answer, as an idle keep-alive connection is).
- A body timeout: a request has ``body_timeout`` seconds, from the end of its headers, to
  send its whole body. A connection that runs out of either gets a JSON 408 (when no answer
  has started yet) and is closed, so that stalled clients hold neither memory nor a place.
- At most ``max_connections`` open connections per worker: one more gets a JSON 503 and is
  closed at once.
- JSON for the HTTP parser's own 400s (a garbage request line, a bad or duplicate
  Content-Length, a bad chunk size, a NUL in the path), which uvicorn writes as plain text.

The limits are the served app's :class:`~cnnserve.service.settings.Settings` (found through
the app uvicorn loaded), so that ``CNNSERVE_*`` variables and ``cnnserve serve`` flags set them
like every other setting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any, NamedTuple

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from cnnserve.service.settings import Settings

__all__ = ["CUT_OFF", "ConnectionLimits", "ServiceHTTPProtocol", "limits_of", "set_nodelay"]

log = logging.getLogger("cnnserve.service")

# The scope key that tells the app a request's connection was closed by the server, not the
# client, and with which status (408 for a timeout, 400 for a malformed body): the app counts
# that status rather than 499.
CUT_OFF = "cnnserve.cut_off"


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


class ConnectionLimits(NamedTuple):
    """What one connection may take: seconds for headers and for a body, and connections."""

    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.header_timeout, settings.body_timeout, settings.max_connections)


def limits_of(app: Any) -> ConnectionLimits:
    """The limits of the service app inside ``app`` (uvicorn wraps it in middleware).

    An app that is not the service's (or not built yet) gets the settings' defaults.
    """
    for _ in range(16):
        service = getattr(getattr(app, "state", None), "service", None)
        settings = getattr(service, "settings", None)
        if isinstance(settings, Settings):
            return ConnectionLimits.of(settings)
        app = getattr(app, "app", None)
        if app is None:
            break
    fields = Settings.model_fields
    return ConnectionLimits(
        fields["header_timeout"].default,
        fields["body_timeout"].default,
        fields["max_connections"].default,
    )


def _raw_response(status: int, reason: str, code: str, message: str, extra: str = "") -> bytes:
    """A whole HTTP/1.1 response with the service's JSON error body, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":"))
    body = body.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + body


class ServiceHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol with TCP_NODELAY, timeouts, a connection limit, JSON 400s.

    Works on the request-response cycles of uvicorn's protocol from outside: after every
    chunk of data and every finished response it looks at the current cycle (``more_body``,
    ``response_started``, ``response_complete``) and sets the one timer the connection
    needs, if any.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits_of(self.app)
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "header" or "body" while the timer runs
        self._seen: Any = None  # the last request cycle whose headers were in
        self._partial = False  # bytes of a request whose headers are not all in yet

    # -- connections --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        set_nodelay(transport)
        super().connection_made(transport)
        limit = self.limits.max_connections
        if len(self.connections) > limit:  # this one is counted already
            log.warning("refusing a connection: %d open already, the limit", limit)
            self._close_with(
                _raw_response(
                    503,
                    "Service Unavailable",
                    "too_many_connections",
                    f"this server holds {limit} open connections already; retry later",
                    "retry-after: 1\r\n",
                )
            )
            return
        self._arm("header")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._partial = True  # until _follow sees the headers complete
        self._follow(new_data=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow(new_data=False)

    def send_400_response(self, msg: str) -> None:
        """The HTTP parser refused the request: a JSON 400 (uvicorn's is plain text)."""
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self._close_with(b"")  # an answer is under way: nothing more can be said
            return
        if cycle is not None and not cycle.response_complete:  # a malformed body
            cycle.scope[CUT_OFF] = 400  # type: ignore[literal-required]
        self._close_with(
            _raw_response(
                400,
                "Bad Request",
                "bad_request",
                "the request is not valid HTTP/1.1 (its request line, a header such as "
                "Content-Length, or its chunked body is malformed)",
            )
        )

    # -- timers -------------------------------------------------------------------------------

    def _follow(self, new_data: bool) -> None:
        """Set the timer the connection's state needs, after data came or an answer went."""
        if self.transport is None or self.transport.is_closing():
            self._disarm()
            return
        if self.transport.get_protocol() is not self:  # upgraded (WebSocket): not ours now
            self._disarm()
            return
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen:  # a new request's headers are in
            self._seen = cycle
            self._partial = False
            self._disarm()
            if cycle.more_body:
                self._arm("body")
        elif self._phase == "body" and cycle is not None and not cycle.more_body:
            self._disarm()  # the body is in
        idle = cycle is None or (cycle.response_complete and not cycle.more_body)
        if idle and new_data and self._phase is None:
            self._arm("header")  # the first bytes of the next request, its headers to come

    def _arm(self, phase: str) -> None:
        self._disarm()
        seconds = self.limits.header_timeout if phase == "header" else self.limits.body_timeout
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._phase = None

    def _expired(self, phase: str) -> None:
        self._timer = None
        self._phase = None
        if self.transport is None or self.transport.is_closing():
            return
        seconds = self.limits.header_timeout if phase == "header" else self.limits.body_timeout
        what = "its headers" if phase == "header" else "its body"
        log.info("closing a connection that did not send %s within %g s", what, seconds)
        cycle = self.cycle
        if phase == "body" and cycle is not None:
            cycle.scope[CUT_OFF] = 408  # type: ignore[literal-required]
            if cycle.response_started:  # answered already (a 413, say), or answering
                self._close_with(b"")
                return
        if phase == "header" and not self._partial:
            self._close_with(b"")  # an idle connection that sent nothing: no request to answer
            return
        self._close_with(
            _raw_response(
                408,
                "Request Timeout",
                "request_timeout",
                f"the request did not send {what} within {seconds:g} s",
            )
        )

    def _close_with(self, response: bytes) -> None:
        self._disarm()
        if response:
            self.transport.write(response)
        self.transport.close()
