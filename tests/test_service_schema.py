"""The OpenAPI schema against the running service: schemathesis, bounded.

For every operation of ``/openapi.json``, schemathesis generates requests from the schema
(valid ones, then ones that break it) and sends them to a real server; every answer must be
below 500 and match the schema of its status code and media type.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live_server import live_server

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits.safetensors"
EXAMPLES = 25  # per operation and generation mode: the whole run takes seconds
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(MODEL, folder / "digits.safetensors")
    with live_server(folder, max_pixels=256 * 256, max_map_cells=2**14) as url:
        yield url


def exercise(operation, mode: str, base: str) -> collections.Counter:
    """Send up to EXAMPLES generated requests of one operation; the statuses they got."""
    seen: collections.Counter = collections.Counter()

    @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        if "name" in (case.path_parameters or {}):
            case.path_parameters["name"] = "digits"  # the served model: past its 404
        response = case.call_and_validate(base_url=base, checks=CHECKS, timeout=30)
        seen[response.status_code] += 1

    try:
        check()
    except Unsatisfiable:  # nothing to break: no query and no body (a path name is any text)
        assert mode == "negative" and not operation.query and not list(operation.body)
    return seen


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_operation_answers_as_its_schema_says(base, mode):
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7  # health, ready, metrics, list, detail, predict, scoremap
    statuses = {operation.label: exercise(operation, mode, base) for operation in operations}
    print(f"\n{mode}: {sum(sum(c.values()) for c in statuses.values())} requests")
    for label, seen in statuses.items():
        print(f"  {label}: {dict(seen)}")
        assert max(seen, default=0) < 500  # call_and_validate checked each one already
    for label in ("POST /v1/models/{name}/predict", "POST /v1/models/{name}/scoremap"):
        assert sum(statuses[label].values()) >= EXAMPLES // 2, label
