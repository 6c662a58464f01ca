"""Test-wide settings and the fixtures several test modules share."""

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import settings

from cnnserve.data import load_dataset
from cnnserve.data.digits import load_digits
from tests.live_server import live_server

SHIPPED_DIGITS = Path(__file__).resolve().parent.parent / "models" / "digits.safetensors"

# Kernels are fast but the loop reference is not: no per-example deadline. Under CI the
# examples are derandomized so that a run is reproducible; locally each run explores anew.
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def digits():
    """The bundled digits data set, split and normalised as ``load_dataset("digits")`` does."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digit_images():
    """The bundled digits unsplit: ``(X, y)``, X uint8 (1797, 1, 8, 8) of raw values 0..16."""
    _, X, y = load_digits()
    return X, y


@pytest.fixture(scope="session")
def live_service(tmp_path_factory):
    """The real service app on a free port of 127.0.0.1 (uvicorn in a background thread),
    serving a copy of the shipped digits model; yields its base URL."""
    models = tmp_path_factory.mktemp("live-models")
    shutil.copy(SHIPPED_DIGITS, models / SHIPPED_DIGITS.name)
    with live_server(models) as base:
        yield base
