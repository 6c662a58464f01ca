"""The inference service: a FastAPI app serving class scores and dense score maps.

Start it with ``cnnserve serve`` (or ``make serve``); build it in code with
:func:`create_app`.
"""

from cnnserve.service.app import create_app
from cnnserve.service.settings import Settings

__all__ = ["Settings", "create_app"]
