"""Device per node and mixed precision: the selection logic, and a CPU path that is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from client.errors import SiteConfigError
from client.node_settings import NodeSettings
from imaging.errors import ConfigError
from imaging.model import build_unet, select_device
from imaging.spec import ModelSpec
from imaging.training import autocast_dtype, evaluate, train_epochs

SPEC = ModelSpec(channels=(4, 8), image_size=32)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_device_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 0)
    assert select_device() == select_device("auto") == select_device(" CPU ") == CPU
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        select_device("cuda")
    _fake_gpus(monkeypatch, 2)
    assert select_device("auto") == CUDA
    assert select_device("cpu") == CPU
    assert select_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="has 2 CUDA GPU"):
        select_device("cuda:2")
    for bad in ("gpu", "cuda:x", "mps"):
        with pytest.raises(ConfigError, match="unknown device"):
            select_device(bad)


def test_mixed_precision_only_on_cuda_and_never_under_dp(monkeypatch: pytest.MonkeyPatch) -> None:
    for setting in ("auto", "true", "fp16", "bf16", "false"):
        assert autocast_dtype(CPU, setting) is None
    assert autocast_dtype(CUDA) is torch.float16 and autocast_dtype(CUDA, "true") is torch.float16
    assert autocast_dtype(CUDA, "false") is None
    assert autocast_dtype(CUDA, "auto", dp=True) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert autocast_dtype(CUDA, "bf16") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="does not support bfloat16"):
        autocast_dtype(CUDA, "bf16")
    with pytest.raises(ConfigError, match="mixed-precision='half'"):
        autocast_dtype(CUDA, "half")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        train_epochs(build_unet(SPEC), *_data(), epochs=1, batch_size=4, learning_rate=1e-3, device=CPU,
                     autocast=torch.float16)


def test_node_settings_from_node_config() -> None:
    node = NodeSettings.from_node_config({"device": "CUDA:0", "mixed-precision": False, "audit-file": "~/a.jsonl"})
    assert node.device == "cuda:0" and node.mixed_precision == "false" and node.audit_file.name == "a.jsonl"
    assert NodeSettings.from_node_config({}) == NodeSettings("auto", "auto", None)
    with pytest.raises(SiteConfigError, match="device='tpu'"):
        NodeSettings.from_node_config({"device": "tpu"})
    with pytest.raises(SiteConfigError, match="mixed-precision='maybe'"):
        NodeSettings.from_node_config({"mixed-precision": "maybe"})


def _data(n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 32, 32)).astype(np.float32)
    masks = (images > 1.0).astype(np.uint8)
    return images, masks


def _reference_train(net: torch.nn.Module, images: np.ndarray, masks: np.ndarray, *, epochs: int,
                     batch_size: int, learning_rate: float, seed: int) -> float:
    """The float32 loop as it was before mixed precision existed."""
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(masks.astype(np.float32)).unsqueeze(1)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total, batches = 0.0, 0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    return total / batches


def test_cpu_training_and_evaluation_are_unchanged() -> None:
    images, masks = _data()
    torch.manual_seed(3)
    start = build_unet(SPEC).state_dict()
    ours, reference = build_unet(SPEC), build_unet(SPEC)
    ours.load_state_dict(start)
    reference.load_state_dict(start)
    torch.manual_seed(11)
    result = train_epochs(ours, images, masks, epochs=2, batch_size=4, learning_rate=1e-2, device=CPU, seed=4,
                          autocast=autocast_dtype(CPU, "auto"))
    torch.manual_seed(11)
    expected_loss = _reference_train(reference, images, masks, epochs=2, batch_size=4, learning_rate=1e-2, seed=4)
    assert result.loss == expected_loss and result.steps == 4 and result.num_examples == 8
    for name, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    assert not torch.equal(ours.state_dict()["model.0.conv.unit0.conv.weight"],
                           start["model.0.conv.unit0.conv.weight"])  # it did train

    scored = evaluate(ours, images, masks, device=CPU, batch_size=5)
    reference.eval()
    with torch.no_grad():
        logits = reference(torch.from_numpy(images).unsqueeze(1))
    truth = torch.from_numpy(masks).unsqueeze(1) > 0
    predicted = torch.sigmoid(logits) >= 0.5
    assert scored.counts.intersection == int((predicted & truth).sum())
    assert scored.counts.predicted == int(predicted.sum()) and scored.counts.truth == int(truth.sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("setting", ["fp16", "bf16"])
def test_mixed_precision_trains_on_the_gpu(setting: str) -> None:
    device = select_device("cuda")
    if setting == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bfloat16 on this GPU")
    images, masks = _data(32)
    net = build_unet(SPEC)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dtype = autocast_dtype(device, setting)
    result = train_epochs(net, images, masks, epochs=3, batch_size=8, learning_rate=1e-2, device=device,
                          autocast=dtype)
    assert np.isfinite(result.loss) and result.steps == 12
    state = net.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in state.items())  # the weights stay float32
    assert any(not torch.equal(v.cpu(), before[k]) for k, v in state.items())
    scored = evaluate(net, images, masks, device=device, autocast=dtype)
    assert np.isfinite(scored.loss) and 0.0 <= scored.dice <= 1.0
