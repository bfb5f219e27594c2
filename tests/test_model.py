"""The U-Net factory, the spec contract, preprocessing and Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imaging.errors import ConfigError, DataError
from imaging.metrics import DiceCounts, dice_score
from imaging.model import build_unet, load_state_dict, select_device
from imaging.preprocess import preprocess_image, preprocess_mask, restore_probabilities
from imaging.spec import ModelSpec


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_unet_has_no_batch_norm_and_keeps_shape(norm: str) -> None:
    spec = ModelSpec(channels=(8, 16, 32), image_size=64, norm=norm)
    net = build_unet(spec)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    out = net(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64)


def test_spec_round_trips_and_rebuilds_the_same_network() -> None:
    spec = ModelSpec(channels=(4, 8), image_size=32)
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    net = build_unet(spec)
    clone = load_state_dict(again, net.state_dict())
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(net.eval()(x), clone.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norm": "batch"}, "DP-SGD forbids batch norm"),
        ({"image_size": 30, "channels": (4, 8, 16)}, "multiple of 4"),
        ({"channels": (8,)}, "at least 2 levels"),
        ({"threshold": 1.5}, "threshold must lie in"),
    ],
)
def test_spec_refuses_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelSpec(**kwargs)


def test_weights_of_another_architecture_are_refused() -> None:
    small = build_unet(ModelSpec(channels=(4, 8), image_size=32)).state_dict()
    with pytest.raises(ConfigError, match="do not match"):
        load_state_dict(ModelSpec(channels=(8, 16), image_size=32), small)
    assert ModelSpec.from_dict(ModelSpec().to_dict()) == ModelSpec()
    with pytest.raises(ConfigError, match="unknown model spec keys"):
        ModelSpec.from_dict({"colour": 1})


def test_select_device_is_cpu_without_gpu() -> None:
    if torch.cuda.is_available():
        assert select_device().type == "cuda"
    else:
        assert select_device().type == "cpu"
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            select_device("cuda")


def test_preprocessing_is_robust_to_scanner_offset_and_scale() -> None:
    spec = ModelSpec(channels=(4, 8), image_size=32)
    rng = np.random.default_rng(0)
    pixels = rng.normal(100, 20, size=(3, 40, 48)).astype(np.float32)
    a = preprocess_image(pixels, spec)
    b = preprocess_image(pixels * 3.0 + 500.0, spec)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(DataError, match="NaN"):
        preprocess_image(np.full((1, 8, 8), np.nan), spec)


def test_mask_resize_and_inverse_keep_the_geometry() -> None:
    spec = ModelSpec(channels=(4, 8), image_size=32)
    mask = np.zeros((2, 40, 48), dtype=np.uint8)
    mask[0, 10:30, 12:36] = 1
    small = preprocess_mask(mask, spec)
    assert small.shape == (2, 32, 32) and set(np.unique(small)) == {0, 1}
    back = restore_probabilities(small.astype(np.float32), 40, 48) >= 0.5
    assert back.shape == (2, 40, 48)
    assert dice_score(back, mask) > 0.9
    assert not back[1].any()


def test_pooled_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice_score(a, b) == 1.0  # nothing to find, nothing found
    a[0, :2] = True
    b[0, 1:3] = True
    assert dice_score(a, b) == pytest.approx(0.5)
    counts = DiceCounts()
    counts.update(a, b)
    assert counts.merge(counts).dice == pytest.approx(0.5)


def test_fedprox_term_keeps_the_update_close_to_the_global_model() -> None:
    from imaging.training import train_epochs

    spec = ModelSpec(channels=(4, 8), image_size=16)
    rng = np.random.default_rng(0)
    x = rng.random((16, 16, 16), dtype=np.float32)
    y = (x > 0.7).astype(np.uint8)
    moved = {}
    for mu in (0.0, 100.0):
        torch.manual_seed(0)
        net = build_unet(spec)
        start = [p.detach().clone() for p in net.parameters()]
        train_epochs(net, x, y, epochs=3, batch_size=4, learning_rate=0.01,
                     device=torch.device("cpu"), seed=0, proximal_mu=mu)
        moved[mu] = float(sum((p.detach() - s).pow(2).sum() for p, s in zip(net.parameters(), start)) ** 0.5)
    assert moved[100.0] < 0.7 * moved[0.0]


def test_fedprox_with_dp_is_refused() -> None:
    from imaging.instructions import RoundInstructions

    with pytest.raises(ConfigError, match="cannot be used with dp=true"):
        RoundInstructions(spec=ModelSpec(), dp=True, noise_multiplier=1.0, proximal_mu=0.1)
