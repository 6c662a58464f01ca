"""The service's routes, one :class:`fastapi.APIRouter` per API.

:mod:`~cnnserve.service.routes.health` (the web page, liveness, readiness, metrics),
:mod:`~cnnserve.service.routes.docs` (``/docs`` and ``/redoc``, offline),
:mod:`~cnnserve.service.routes.models` (the models served, and their reload),
:mod:`~cnnserve.service.routes.inference` (class scores and score maps of an image),
:mod:`~cnnserve.service.routes.activations` (inside the network) and
:mod:`~cnnserve.service.routes.v2` (the Open Inference Protocol);
:func:`cnnserve.service.app.create_app` includes their routers in that order.
"""
