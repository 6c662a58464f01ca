"""The API docs, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with no internet.

FastAPI's own pages load their JavaScript and CSS from a CDN, so that they are blank on a
machine without internet. These are the same pages (FastAPI's ``get_swagger_ui_html`` and
``get_redoc_html``) with their assets served by the app at ``/docs-assets``, from the
``fastapi-offline`` package (MIT; its Swagger UI files are Apache 2.0, its ReDoc files MIT),
the ``docs`` extra. Without that package the two pages say how to install it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

__all__ = ["ASSETS", "ASSETS_URL", "router"]

ASSETS_URL = "/docs-assets"


def _assets() -> Path | None:
    try:
        folder = Path(str(resources.files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


#: The directory of the docs' JavaScript and CSS, or None without ``fastapi-offline``.
ASSETS = _assets()

router = APIRouter(include_in_schema=False)

# Nothing from elsewhere: ReDoc shows a logo from cdn.redoc.ly, and hides it when it does
# not load, as here.
_SELF_ONLY = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; worker-src 'self' blob:"
}

_MISSING = (
    "<!doctype html><title>cnnserve API docs</title><p>The offline API docs need the "
    "<code>docs</code> extra: <code>pip install fastapi-offline</code> (from a clone: "
    "<code>.venv/bin/pip install -e '.[docs]'</code>). The schema is at "
    '<a href="/openapi.json">/openapi.json</a>.</p>'
)


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    """Swagger UI over ``/openapi.json``, its assets served here."""
    if ASSETS is None:
        return HTMLResponse(_MISSING, status_code=503)
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="cnnserve - API docs",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
    )
    page.headers.update(_SELF_ONLY)
    return page


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    """ReDoc over ``/openapi.json``, its script served here (no web fonts)."""
    if ASSETS is None:
        return HTMLResponse(_MISSING, status_code=503)
    page = get_redoc_html(
        openapi_url="/openapi.json",
        title="cnnserve - API docs",
        redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )
    page.headers.update(_SELF_ONLY)
    return page
