"""What the service sends out: DICOM SEG (Accept: application/dicom), STOW-RS to a PACS, triage."""

from __future__ import annotations

import io
import socket
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.uid import SegmentationStorage

from imaging.dicom_read import read_series
from imaging.dicom_seg import read_seg_mask
from imaging.dicom_write import write_series
from imaging.model import build_unet, select_device
from imaging.preprocess import preprocess_image, restore_probabilities
from imaging.spec import ModelSpec
from imaging.training import predict_probabilities
from orthanc import OrthancServer, require_orthanc, start_orthanc
from registry.load import LoadedModel
from serving import ServingSettings, create_app, rle_decode
from serving.outputs import SegObject, StowError, StowTarget, stow
from serving.routes.predict import wants_dicom

SPEC = ModelSpec(channels=(4, 8), image_size=32, min_lesion_pixels=4)
SHAPE = (3, 40, 48)
Part = tuple[str, tuple[str, bytes, str]]


def _series(out: Path, seed: str) -> list[Path]:
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    pixels = rng.integers(0, 1000, size=SHAPE)
    pixels[:, 10:20, 12:24] += 2000  # a bright blob
    return write_series(out / seed, pixels, patient_id="P-OUT", patient_name="Out^Patient",
                        uid_seed=seed, modality="MR", spacing=(2.0, 0.8, 0.8))


def _parts(paths: list[Path]) -> list[Part]:
    return [("files", (p.name, p.read_bytes(), "application/dicom")) for p in paths]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _series(tmp_path_factory.mktemp("outputs"), "seg-source")


@pytest.fixture(scope="module")
def model(paths: list[Path]) -> LoadedModel:
    """A random tiny U-Net whose mask threshold is the median probability on the test series.

    About half the voxels are then in the mask: a SEG/JSON mismatch cannot hide in an all-empty
    or all-full mask.
    """
    torch.manual_seed(0)
    net = build_unet(SPEC).eval()
    volume = read_series(paths)
    with torch.inference_mode():
        probs = predict_probabilities(net, preprocess_image(volume.pixels, SPEC),
                                      device=select_device("cpu"))
    probs = restore_probabilities(probs, *volume.shape[1:])
    spec = replace(SPEC, threshold=float(np.median(probs)))
    return LoadedModel(name="seg-model", version=4, spec=spec, state_dict=net.state_dict())


def _app(model: LoadedModel, **settings: object) -> FastAPI:
    return create_app(
        ServingSettings(model_uri="models:/seg-model@champion", device="cpu", auth="off",
                        jobs_workers=0, **settings),
        loader=lambda uri: model,
    )


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One real Orthanc (DICOMweb, basic auth) for this module's STOW-RS tests."""
    require_orthanc()
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(model: LoadedModel) -> Iterator[TestClient]:
    with TestClient(_app(model)) as c:
        yield c


# ----------------------------------------------------------------------------- DICOM SEG


def test_accept_header_negotiation() -> None:
    assert wants_dicom("application/dicom")
    assert wants_dicom("application/json;q=0.5, application/dicom")
    assert wants_dicom("*/*;q=0.1, application/dicom")
    assert not wants_dicom(None)
    assert not wants_dicom("application/json")
    assert not wants_dicom("*/*")
    assert not wants_dicom("application/dicom;q=0.4, application/json")
    assert not wants_dicom("application/dicom;q=0")
    assert not wants_dicom("application/dicom;q=oops")


def test_seg_references_the_inputs_and_equals_the_json_mask(
    client: TestClient, paths: list[Path]
) -> None:
    as_json = client.post("/v1/predict", files=_parts(paths))
    assert as_json.status_code == 200, as_json.text
    body = as_json.json()
    json_mask = rle_decode(body["mask"]["rle"], body["mask"]["shape"])
    assert 0 < json_mask.mean() < 1  # a mixed mask (median threshold)
    assert "stored" not in body  # only with ?store=true

    # uploaded in reverse order: the SEG must still be aligned with the series
    as_seg = client.post("/v1/predict", files=_parts(paths[::-1]),
                         headers={"Accept": "application/dicom"})
    assert as_seg.status_code == 200, as_seg.text
    assert as_seg.headers["content-type"] == "application/dicom"
    assert as_seg.headers["x-model-version"] == "4"

    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    seg_ds = pydicom.dcmread(io.BytesIO(as_seg.content))
    assert seg_ds.SOPClassUID == SegmentationStorage
    assert seg_ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg_ds.PatientID == sources[0].PatientID
    assert seg_ds.SeriesInstanceUID != sources[0].SeriesInstanceUID  # a new series in the study
    (ref_series,) = seg_ds.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence} == {
        str(s.SOPInstanceUID) for s in sources
    }
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    (description,) = seg.SegmentSequence
    assert description.SegmentAlgorithmType == "AUTOMATIC"
    assert description.SegmentAlgorithmName == "seg-model"

    np.testing.assert_array_equal(read_seg_mask(seg, read_series(paths)), json_mask)


def test_bad_input_with_accept_dicom_is_still_a_json_error(client: TestClient) -> None:
    response = client.post("/v1/predict", headers={"Accept": "application/dicom"},
                           files=[("files", ("x.dcm", b"not dicom at all", "application/dicom"))])
    assert response.status_code == 415
    assert "x.dcm" in response.json()["detail"]


# ----------------------------------------------------------------------------- triage


def test_triage_uses_the_models_threshold(model: LoadedModel, paths: list[Path]) -> None:
    with TestClient(_app(model)) as c:
        predicted = c.post("/v1/predict", files=_parts(paths)).json()
        triage = c.post("/v1/triage", files=_parts(paths))
    assert triage.status_code == 200, triage.text
    body = triage.json()
    assert body["id"] == predicted["series_instance_uid"]
    assert body["score"] == pytest.approx(predicted["score"])
    assert body["model_version"] == 4 and triage.headers["x-model-version"] == "4"
    score = body["score"]

    for threshold, status in ((score * 0.9, "suspect"), (min(score * 1.1 + 1e-3, 0.999), "normal")):
        spec = replace(model.spec, triage_threshold=threshold)
        with TestClient(_app(replace(model, spec=spec))) as c:
            answer = c.post("/v1/triage", files=_parts(paths)).json()
        assert answer["status"] == status, (threshold, answer)
        assert answer["threshold"] == pytest.approx(threshold)


def test_triage_refuses_non_dicom(client: TestClient) -> None:
    response = client.post("/v1/triage", files=[("files", ("a.txt", b"hello", "text/plain"))])
    assert response.status_code == 415 and "a.txt" in response.json()["detail"]


# ----------------------------------------------------------------------------- STOW-RS


def test_store_without_a_pacs_names_the_setting(client: TestClient, paths: list[Path]) -> None:
    response = client.post("/v1/predict?store=true", files=_parts(paths))
    assert response.status_code == 422
    assert "FEDSEG_SERVE_STOW_URL" in response.json()["detail"]


def test_stow_reports_an_unreachable_pacs() -> None:
    obj = SegObject(b"DICM", "1.2", "1.2.3", "1.2.3.4", SegmentationStorage)
    with socket.socket() as sock:  # a loopback port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with pytest.raises(StowError, match=f"STOW-RS to http://127.0.0.1:{port}/dicom-web/studies"):
        stow(StowTarget(f"http://127.0.0.1:{port}/dicom-web", timeout_s=5), [obj])


@pytest.mark.deployment
def test_store_true_puts_the_seg_into_orthanc(pacs: OrthancServer, model: LoadedModel,
                                               paths: list[Path]) -> None:
    pacs.upload(paths)  # the PACS holds the source series, as in a hospital
    app = _app(model, stow_url=pacs.dicomweb_url, stow_username=pacs.username,
               stow_password=pacs.password)
    with TestClient(app) as c:
        stored = c.post("/v1/predict?store=true", files=_parts(paths))
        assert stored.status_code == 200, stored.text
        info = stored.json()["stored"]
        as_seg = c.post("/v1/predict?store=true", files=_parts(paths),
                        headers={"Accept": "application/dicom"})
        assert as_seg.status_code == 200, as_seg.text
        stored_seg = pydicom.dcmread(io.BytesIO(as_seg.content), stop_before_pixels=True)

    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    assert info["study_instance_uid"] == study
    with pacs.client() as rest:
        found = rest.get(f"/dicom-web/studies/{study}/series/{info['series_instance_uid']}/instances")
        assert found.status_code == 200, found.text
        uids = [item["00080018"]["Value"][0] for item in found.json()]
        assert uids == [info["sop_instance_uid"]]
        modalities = rest.get(f"/dicom-web/studies/{study}/series").json()
        assert sorted(s["00080060"]["Value"][0] for s in modalities) == ["MR", "SEG", "SEG"]
        # a SEG answer says where the PACS keeps it (a WADO-RS URL)
        location = as_seg.headers["content-location"]
        assert location.endswith(f"/instances/{stored_seg.SOPInstanceUID}")
        wado = rest.get(location.removeprefix(pacs.url) + "/metadata")
        assert wado.status_code == 200, wado.text
        assert wado.json()[0]["00080018"]["Value"] == [str(stored_seg.SOPInstanceUID)]
        # what the PACS holds is the SEG the service computed (same mask as the answer)
        retrieved = rest.get(f"/instances/{_orthanc_id(rest, info['sop_instance_uid'])}/file")
        assert retrieved.status_code == 200
    mask = read_seg_mask(io.BytesIO(retrieved.content), read_series(paths))
    body = stored.json()
    np.testing.assert_array_equal(mask, rle_decode(body["mask"]["rle"], body["mask"]["shape"]))


def _orthanc_id(rest: httpx.Client, sop_instance_uid: str) -> str:
    found = rest.post("/tools/lookup", content=sop_instance_uid)
    found.raise_for_status()
    (item,) = [i for i in found.json() if i["Type"] == "Instance"]
    return str(item["ID"])


@pytest.mark.deployment
def test_store_with_wrong_credentials_is_a_bad_gateway(pacs: OrthancServer, model: LoadedModel,
                                                       paths: list[Path]) -> None:
    app = _app(model, stow_url=pacs.dicomweb_url, stow_username=pacs.username,
               stow_password="wrong")
    with TestClient(app) as c:
        response = c.post("/v1/predict?store=true", files=_parts(paths))
    assert response.status_code == 502
    assert "401" in response.json()["detail"] and "STOW-RS" in response.json()["detail"]


def test_stow_settings_are_checked_and_the_password_stays_secret() -> None:
    with pytest.raises(ValueError, match="stow_url must be an http"):
        ServingSettings(stow_url="ftp://pacs/dicom-web")
    settings = ServingSettings(stow_url="https://pacs:8042/dicom-web/", stow_username="u",
                               stow_password="s3cret-pw")
    assert settings.stow_url == "https://pacs:8042/dicom-web"
    assert "s3cret-pw" not in repr(settings)
