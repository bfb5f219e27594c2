"""The MLflow adapter against a real sqlite store: publish, promote, load, pyfunc face."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evidence import evaluated
from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry import (
    ModelNotFoundError,
    ModelUriError,
    TrackingRun,
    default_store,
    list_versions,
    load_model,
    parse_model_uri,
    publish_model,
    resolve_version,
)

SPEC = ModelSpec(channels=(4, 8), image_size=32)


def _publish(dice: float, seed: int = 0):
    store = default_store()
    torch.manual_seed(seed)
    net = build_unet(SPEC)
    run = TrackingRun.start(store, "fedseg-test", "unit", {})
    published = publish_model(store, run, "unit-unet", net.state_dict(), SPEC, {"dice_pooled": dice},
                              {"rounds": "1", **evaluated()})
    run.end(True)
    return net, published


def test_champion_moves_only_to_a_better_model(fedseg_home: Path) -> None:
    _, v1 = _publish(0.50)
    _, v2 = _publish(0.40)
    _, v3 = _publish(0.60)
    assert (v1.promoted, v2.promoted, v3.promoted) == (True, False, True)
    assert "does not beat champion v1" in v2.reason
    aliases = {r["version"]: r["aliases"] for r in list_versions(default_store(), "unit-unet")}
    assert aliases == {1: [], 2: [], 3: ["champion"]}
    assert load_model(default_store(), "models:/unit-unet@champion").version == 3
    assert load_model(default_store(), "models:/unit-unet/2").metrics == {"dice_pooled": 0.4}


def test_registered_weights_are_exactly_the_published_ones(fedseg_home: Path) -> None:
    net, _ = _publish(0.5, seed=3)
    loaded = load_model(default_store(), "models:/unit-unet@champion")
    assert loaded.spec == SPEC
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict[key], value)
    assert len(loaded.tags["weights_sha256"]) == 64


def test_pyfunc_face_predicts_like_the_network(fedseg_home: Path) -> None:
    import mlflow.pyfunc

    net, _ = _publish(0.5, seed=4)
    version = resolve_version(default_store(), "models:/unit-unet@champion")
    mlflow.set_tracking_uri(default_store().tracking_uri)
    model = mlflow.pyfunc.load_model(version.source)
    x = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    expected = torch.sigmoid(net.eval()(torch.from_numpy(x))).detach().numpy()
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-5)


@pytest.mark.parametrize("uri", ["nope", "models:/", "models:/a@", "runs:/abc/model", "models:/a/b"])
def test_malformed_uris_are_named(uri: str) -> None:
    with pytest.raises(ModelUriError, match="is not of the form"):
        parse_model_uri(uri)


def test_missing_model_is_a_clear_error(fedseg_home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="models:/ghost@champion is not in the registry"):
        load_model(default_store(), "models:/ghost@champion")
