"""Service settings: defaults, overridden by ``CNNSERVE_*`` environment variables.

``cnnserve serve`` turns its flags into these variables, so that every uvicorn worker process
reads the same settings.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cnnserve.modelfile import MAX_MODEL_PARAMS, MAX_MODEL_PIXELS

__all__ = ["Settings"]


class Settings(BaseSettings):
    """What the service loads and the limits it enforces.

    Every field can be set by an environment variable named ``CNNSERVE_<FIELD>``, e.g.
    ``CNNSERVE_MODELS=/srv/models`` or ``CNNSERVE_MAX_BODY_BYTES=1048576``.
    """

    model_config = SettingsConfigDict(env_prefix="CNNSERVE_", frozen=True, extra="forbid")

    models: Path = Field(
        Path("models"),
        description="Directory of model files (*.safetensors, trained or converted; *.onnx, "
        "imported at start); each file's stem is the model's name.",
    )
    max_body_bytes: int = Field(
        20 * 2**20, ge=1, description="Largest request body, in bytes (413 above it)."
    )
    max_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Largest image, in pixels (413 above it, checked before decoding).",
    )
    max_concurrency: int = Field(
        default_factory=lambda: len(os.sched_getaffinity(0)),
        ge=1,
        description="Inferences running at once per endpoint (/predict and /scoremap each; "
        "default: the cores this process may use); further requests wait for a slot.",
    )
    max_waiting: int = Field(
        16,
        ge=0,
        description="Requests waiting for a slot per endpoint, their bodies read; one more "
        "gets a 503 at once.",
    )
    queue_timeout: float = Field(
        10.0,
        ge=0,
        description="Seconds a request waits for an inference slot before a 503.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a connection has to send a request's headers, from its opening "
        "or from the first byte of its next request; then a 408 and the connection is closed.",
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a request has to send its whole body, from the end of its "
        "headers; then a 408 and the connection is closed (a 20 MiB body in 30 s needs "
        "0.7 MB/s).",
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="Open connections per worker; one more gets a 503 and is closed at once. "
        "Bodies being read take no inference slot, so this and max_body_bytes bound the "
        "memory they hold.",
    )
    max_model_pixels: int = Field(
        MAX_MODEL_PIXELS,
        ge=1,
        description="Largest input (H*W, training size) of a model file: a larger one is "
        "refused from its header, before anything is allocated.",
    )
    max_model_params: int = Field(
        MAX_MODEL_PARAMS,
        ge=1,
        description="Most parameters of a model file: a larger one is refused from its "
        "header, before any tensor is read.",
    )
    max_map_cells: int = Field(
        2**22,
        ge=1,
        description="Largest score map, in cells (422 above it): bounds the work and memory "
        "of one request; 4096x4096 at stride 2 is 4.2 M cells.",
    )
    max_json_cells: int = Field(
        2**18,
        ge=1,
        description="Largest score map whose per-cell arrays a JSON answer carries (about "
        "180 bytes a cell for 10 classes); above it, ask for arrays=false or format=png.",
    )
    tile_memory: int = Field(
        256 * 2**20,
        ge=2**20,
        description="Working memory of one score map's batch of tiles, in bytes.",
    )
    warmup: bool = Field(True, description="Run each model once on startup, before /readyz.")
