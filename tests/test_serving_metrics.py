"""Prometheus metrics of the service: per-app registries, request/stage/model series, the seam."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import prometheus_client
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from imaging.dicom_write import write_series
from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry.load import LoadedModel
from serving import ServingSettings, create_app, metrics
from serving.metrics import UNMATCHED_ROUTE, ServingMetrics

SPEC = ModelSpec(channels=(4, 8), image_size=32, min_lesion_pixels=4)


def _model(version: int = 3) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(name="m", version=version, spec=SPEC, state_dict=build_unet(SPEC).state_dict())


def _app(version: int = 3):
    model = _model(version)
    return create_app(ServingSettings(model_uri="models:/m@champion", device="cpu", auth="off"),
                      loader=lambda uri: model)


def _samples(client: TestClient) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict, metric: str, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, tuple[str, bytes, str]]]:
    rng = np.random.default_rng(0)
    paths = write_series(tmp_path_factory.mktemp("series"), rng.integers(0, 1000, size=(2, 32, 32)),
                         patient_id="P", patient_name="Test^Patient", uid_seed="metrics",
                         modality="MR", spacing=(2.0, 0.8, 0.8))
    return [("files", (p.name, Path(p).read_bytes(), "application/dicom")) for p in paths]


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(_app()) as c:
        yield c


def test_requests_stages_and_model_info_are_exported(client: TestClient, series: list) -> None:
    before = _samples(client)
    ok = client.post("/v1/predict", files=series)
    assert ok.status_code == 200, ok.text
    bad = client.post("/v1/predict", files=[("files", ("x.dcm", b"not dicom", "application/dicom"))])
    assert bad.status_code == 415
    assert client.get("/no/such/page/42").status_code == 404
    after = _samples(client)

    def delta(metric: str, **labels: str) -> float:
        return (_value(after, metric, **labels) or 0.0) - (_value(before, metric, **labels) or 0.0)

    route = {"route": "/v1/predict", "method": "POST"}
    assert delta("fedseg_requests_total", **route, status="200", version="3") == 1
    assert delta("fedseg_requests_total", **route, status="415", version="") == 1
    # the raw path never becomes a label: every unmatched path shares one series
    assert delta("fedseg_requests_total", route=UNMATCHED_ROUTE, method="GET", status="404", version="") == 1
    assert not any("/no/such" in str(labels) for _, labels in after)
    assert delta("fedseg_request_duration_seconds_count", **route) == 2
    assert delta("fedseg_request_duration_seconds_sum", **route) > 0
    assert delta("fedseg_stage_duration_seconds_count", stage="read", version="3") == 1
    assert _value(after, "fedseg_model_info", name="m", version="3", role="champion") == 1


def test_each_app_has_its_own_registry(client: TestClient, series: list) -> None:
    with TestClient(_app(version=7)) as other:
        assert other.post("/v1/predict", files=series).status_code == 200
        mine = _samples(client)
        theirs = _samples(other)
    assert _value(theirs, "fedseg_requests_total", route="/v1/predict", method="POST",
                  status="200", version="7") == 1
    assert _value(mine, "fedseg_requests_total", route="/v1/predict", method="POST",
                  status="200", version="7") is None
    assert _value(theirs, "fedseg_model_info", name="m", version="3", role="champion") is None
    # nothing of ours lands in prometheus-client's process-wide registry
    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("fedseg") for n in names)


def test_module_functions_reach_the_running_app() -> None:
    app = _app()
    with TestClient(app) as c:
        # a bare thread, no context: the one running app gets it
        def work() -> None:
            metrics.count_reload("from-thread")
            metrics.set_model_info("t", 9, "thread-role")

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        samples = _samples(c)
        assert _value(samples, "fedseg_model_reloads_total", outcome="from-thread") == 1
        assert _value(samples, "fedseg_model_info", name="t", version="9", role="thread-role") == 1
        with TestClient(_app()) as second:  # two running apps: an unbound call cannot choose
            metrics.count_reload("ambiguous")
            with metrics.bound(second.app.state.metrics):
                metrics.count_reload("bound")
            assert _value(_samples(second), "fedseg_model_reloads_total", outcome="bound") == 1
            assert _value(_samples(second), "fedseg_model_reloads_total", outcome="ambiguous") is None
        assert _value(_samples(c), "fedseg_model_reloads_total", outcome="ambiguous") is None
    metrics.count_reload("after shutdown")  # no app running: recorded nowhere, no error
    assert metrics.current() is None


def test_model_info_follows_roles() -> None:
    m = ServingMetrics()
    m.set_model_info("m", 1, "champion")
    m.set_model_info("m", 2, "challenger")
    m.set_model_info("m", 2, "champion")  # promoted: version 1 no longer serves
    m.set_model_info("m", None, "challenger")  # challenger dropped
    m.set_queue_depth(4)
    text = m.render().decode()
    assert "fedseg_queue_depth 4.0" in text
    infos = [s.labels for f in text_string_to_metric_families(text) if f.name == "fedseg_model_info"
             for s in f.samples]
    assert infos == [{"name": "m", "version": "2", "role": "champion"}]


def test_requests_refused_before_routing_keep_their_route(series: list) -> None:
    model = _model()
    app = create_app(ServingSettings(model_uri="models:/m@champion", device="cpu", auth="apikey"),
                     loader=lambda uri: model)
    with TestClient(app) as c:
        assert c.post("/v1/predict", files=series).status_code == 401  # no key: the auth middleware
        text = app.state.metrics.render().decode()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert _value(samples, "fedseg_requests_total", route="/v1/predict", method="POST",
                  status="401", version="") == 1
