"""Schemathesis over the service's OpenAPI schema, in-process: no generated input gets a 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.serving_fixtures import bearer, make_app, new_key


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, str]]:
    """A started app (lifespan run, model loaded) with API keys on, and an admin key."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSEG_HOME", str(tmp_path_factory.mktemp("schema-home")))
        app = make_app(auth="apikey", max_upload_mb=1, max_pixel_mb=4, max_instances=8)
        key = new_key("schemathesis", "admin")
        with TestClient(app):  # runs the lifespan: the model is loaded for every generated call
            yield app, key


OPERATIONS = ("positive", "negative")


@pytest.mark.parametrize("mode", OPERATIONS)
def test_no_input_gets_a_server_error(served: tuple[FastAPI, str], mode: str) -> None:
    """Every operation, with generated valid (positive) and invalid (negative) inputs."""
    app, key = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/predict", "/health/ready", "/metrics"} <= {op.path for op in operations}
    failures: list[str] = []
    exercised = 0
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=True)
        def call(case: schemathesis.Case) -> None:
            response = case.call(headers=bearer(key))
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                f"{response.text[:300]}")

        try:
            call()
            exercised += 1
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
            assert mode == "negative", operation.path
    assert exercised >= (len(operations) if mode == "positive" else 3)
    assert not failures, "\n".join(failures)


def test_schema_documents_auth_and_errors(served: tuple[FastAPI, str]) -> None:
    loaded = schemathesis.openapi.from_asgi("/openapi.json", served[0])
    paths = loaded.raw_schema["paths"]
    assert paths["/v1/predict"]["post"]["security"] == [{"bearer": ["predict"]}]
    assert {"401", "403", "413", "415", "422"} <= set(paths["/v1/predict"]["post"]["responses"])
    without_key = TestClient(served[0]).post("/v1/predict")
    assert without_key.status_code == 401

