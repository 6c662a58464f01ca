"""Test-wide settings and the fixtures several test modules share."""

import os

import pytest
from hypothesis import settings

from cnnserve.data import load_dataset
from cnnserve.data.digits import load_digits

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
