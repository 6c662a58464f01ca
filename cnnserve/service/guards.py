"""ASGI middleware that refuses requests before any route sees them.

:class:`EncodedSlashGuard`: a path with an encoded slash (``%2F``) or backslash (``%5C``) is
a 404. The server decodes the path before routing, so that ``/v1/models/digits%2Fpredict``
would otherwise reach the ``/v1/models/{name}/predict`` route; no name of the service holds
a slash, so no such path names anything.
"""

from __future__ import annotations

from typing import Any

from cnnserve.service.errors import error_response

__all__ = ["EncodedSlashGuard"]

_ENCODED_SEPARATORS = (b"%2f", b"%5c")


class EncodedSlashGuard:
    """Pure ASGI middleware: a JSON 404 for a raw path that encodes ``/`` or ``\\``.

    Parameters
    ----------
    app : ASGI app
        The app below this middleware.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = (scope.get("raw_path") or b"").lower()
            if any(separator in raw for separator in _ENCODED_SEPARATORS):
                shown = raw.decode("latin-1")
                response = error_response(
                    404,
                    "not_found",
                    f"no such endpoint: {scope.get('method', '')} {shown} (a path may not "
                    "encode a slash)",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
