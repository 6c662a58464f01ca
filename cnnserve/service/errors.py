"""Errors as JSON: ``{"error": {"code": ..., "message": ...}}`` with the right status code.

Every failure a request can cause is a :class:`ServiceError` raised by the routes, a FastAPI
validation error (422), or a Starlette HTTP error (404 for an unknown path, 405 for a wrong
method); all three answer in the same JSON form (and the HTTP parser's own 400s too, see
:mod:`cnnserve.service.server`). A client that leaves before its answer is not an error of
the service: it is logged in one line and counted as status 499 (or 408 / 400 when the
server closed the connection of a body that came too slowly, or malformed). Anything else
is a bug: it is logged with its traceback and answered with a JSON 500 that gives nothing
away.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cnnserve.service.server import CUT_OFF

__all__ = ["CLIENT_CLOSED_REQUEST", "ServiceError", "error_response", "install_error_handlers"]

CLIENT_CLOSED_REQUEST = 499  # the status recorded for a request whose client left

log = logging.getLogger("cnnserve.service")

_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    503: "unavailable",
}


class ServiceError(Exception):
    """A request the service refuses, with its HTTP status, error code and message."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _location(loc: tuple) -> str:
    """``("query", "top_k")`` -> ``"top_k"``; body and path parts keep their prefix."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "request"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in the JSON error form."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            value = err.get("input")
            shown = f" (got {value!r})" if value is not None and len(repr(value)) <= 60 else ""
            problems.append(f"{_location(tuple(err.get('loc', ())))}: {err.get('msg')}{shown}")
        return error_response(422, "invalid_parameter", "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody is left to answer: counted as 499 (nginx's "client closed request"), or as
        # the status the server answered with when it closed the connection itself (a body
        # that did not come in time, or a malformed one).
        if request.scope.get(CUT_OFF):
            return Response(status_code=request.scope[CUT_OFF])
        log.info("client left during %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "an unexpected error; see the server log")
