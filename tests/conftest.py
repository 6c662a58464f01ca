"""Test-wide settings."""

import os

from hypothesis import settings

# Kernels are fast but the loop reference is not: no per-example deadline. Under CI the
# examples are derandomized so that a run is reproducible; locally each run explores anew.
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
