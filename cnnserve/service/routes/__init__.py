"""The service's routes, one :class:`fastapi.APIRouter` per API.

:mod:`~cnnserve.service.routes.health` (the web page, liveness, readiness, metrics),
:mod:`~cnnserve.service.routes.models` (the models served) and
:mod:`~cnnserve.service.routes.inference` (class scores and score maps of an image);
:func:`cnnserve.service.app.create_app` includes their routers in that order.
"""
