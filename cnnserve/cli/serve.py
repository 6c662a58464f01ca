"""``cnnserve serve``: the HTTP service, its flags checked before uvicorn starts."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Any

from cnnserve.cli._common import (
    CommandError,
    add_model_limits,
    positive_int,
)

__all__ = ["add_serve"]

_SERVE_SETTINGS = (
    "models",
    "max_body_bytes",
    "max_pixels",
    "max_concurrency",
    "max_waiting",
    "queue_timeout",
    "max_map_cells",
    "max_json_cells",
    "header_timeout",
    "body_timeout",
    "max_connections",
    "max_model_pixels",
    "max_model_params",
    "warmup",
)


def _log_config(base: dict, level: str) -> dict:
    """uvicorn's logging set-up, plus the service's own logger (models loaded, errors)."""
    config = json.loads(json.dumps(base))
    config["loggers"]["cnnserve"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


def _cmd_serve(args: argparse.Namespace) -> int:
    import tempfile

    import uvicorn
    from pydantic import ValidationError
    from uvicorn.config import LOGGING_CONFIG

    from cnnserve import __version__
    from cnnserve.service.registry import ModelDirectoryError, ModelRegistry
    from cnnserve.service.settings import Settings

    for field in _SERVE_SETTINGS:
        value = getattr(args, field)
        if value is not None:
            os.environ[f"CNNSERVE_{field.upper()}"] = str(value)
    try:
        settings = Settings()  # flags and environment together, checked before uvicorn starts
    except ValidationError as exc:
        problems = "; ".join(
            f"CNNSERVE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise CommandError(f"bad settings: {problems}") from None
    try:
        files = ModelRegistry(settings.models).discover()
    except ModelDirectoryError as exc:
        raise CommandError(str(exc)) from None
    names = ", ".join(p.stem for p in files)
    print(
        f"cnnserve {__version__}: serving {names} from "
        f"{settings.models.resolve()} on http://{args.host}:{args.port} ({args.workers} "
        f"worker(s), {settings.max_concurrency} inference(s) at once each)",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            # Each worker writes its metrics there, and /metrics reports their sum.
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="cnnserve-metrics-"))
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        uvicorn.run(
            "cnnserve.service.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            log_config=_log_config(LOGGING_CONFIG, args.log_level),
            http="cnnserve.service.server:ServiceHTTPProtocol",
            ws="none",  # no WebSocket route: an Upgrade request is answered as plain HTTP
            timeout_graceful_shutdown=10,
        )
    return 0


def add_serve(commands: Any) -> None:
    """The ``serve`` command."""
    serve = commands.add_parser(
        "serve",
        help="start the HTTP service (class scores, score maps, a web page)",
        description="Serve every model file of a directory over HTTP (uvicorn). Options not "
        "given come from CNNSERVE_* environment variables, then the defaults.",
    )
    serve.add_argument(
        "--models",
        metavar="DIR",
        help="directory of .safetensors (and .onnx) model files (default models)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument(
        "--workers", type=positive_int, default=1, help="uvicorn worker processes (default 1)"
    )
    serve.add_argument(
        "--max-body-bytes", type=positive_int, help="largest request body (default 20 MiB)"
    )
    serve.add_argument(
        "--max-pixels", type=positive_int, help="largest image in pixels (default 4096*4096)"
    )
    serve.add_argument(
        "--max-concurrency",
        type=positive_int,
        help="inferences at once per endpoint and worker (default: the cores this process may use)",
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        help="requests waiting for a slot per endpoint; one more gets a 503 at once (default 16)",
    )
    serve.add_argument(
        "--max-map-cells",
        type=positive_int,
        help="largest score map, in cells (default 2**22)",
    )
    serve.add_argument(
        "--max-json-cells",
        type=positive_int,
        help="largest score map whose arrays a JSON answer carries (default 2**18)",
    )
    serve.add_argument(
        "--queue-timeout",
        type=float,
        help="seconds a request waits for an inference slot before a 503 (default 10)",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        help="seconds a connection has to send a request's headers, then a 408 (default 10)",
    )
    serve.add_argument(
        "--body-timeout",
        type=float,
        help="seconds a request has to send its whole body, then a 408 (default 30)",
    )
    serve.add_argument(
        "--max-connections",
        type=positive_int,
        help="open connections per worker; one more gets a 503 (default 256)",
    )
    add_model_limits(serve)
    serve.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_const",
        const=False,
        help="skip running each model once before /readyz",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="default info",
    )
    serve.set_defaults(handler=_cmd_serve)
