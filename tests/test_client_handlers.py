"""The ClientApp's handlers called directly with real Flower Messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_messages import coded_failure, instruction
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from aggregation.replies import read_reply
from client.app import create_client_app
from client.errors import SiteConfigError
from client.site import PartitionSites, site_from_node_config
from imaging.instructions import RoundInstructions
from imaging.model import build_unet
from imaging.site_data import load_site_dataset
from imaging.spec import ModelSpec

SPEC = ModelSpec(channels=(8, 16), image_size=32)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _message(kind: str, state: dict, **overrides) -> object:
    config = RoundInstructions(spec=SPEC, batch_size=8, **overrides).to_config()
    config["server-round"] = 1
    return instruction(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)}), kind)


def test_train_replies_update_samples_and_metrics_only(synthetic_sites: list[Path]) -> None:
    app = create_client_app()
    torch.manual_seed(0)
    initial = build_unet(SPEC).state_dict()
    site = synthetic_sites[0]
    reply = app(_message(MessageType.TRAIN, initial), _context({"data-dir": str(site), "site-name": "h1"}))

    assert not reply.has_error()
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    metrics = content["metrics"]
    data = load_site_dataset(site, SPEC, test_fraction=0.25, seed=42)
    # FedAvg's weight counts training slices (samples), not batches
    assert metrics["num-examples"] == data.num_train > 0
    assert metrics["train-steps"] == -(-data.num_train // 8)
    assert np.isfinite(metrics["train-loss"])
    facts = dict(content["site"])
    assert set(facts) == {"site-name", "manifest-sha256", "input-stats"} and facts["site-name"] == "h1"
    assert len(facts["manifest-sha256"]) == 64
    stats = json.loads(facts["input-stats"])
    assert stats["series"] == data.train_patients + data.test_patients
    assert set(stats["vendors"]) == set(data.vendors)
    # aggregate facts only: no series UID, study UID or patient id of the site's data
    from imaging.site_folder import load_case, scan_site

    volume, _ = load_case(scan_site(site).cases[0])
    for identifier in (volume.series_uid, volume.study_uid, volume.patient_id, volume.sop_instance_uids[0]):
        assert identifier not in facts["input-stats"] and identifier not in facts["manifest-sha256"]
    parsed = read_reply(reply, "train")  # the coordinator's reader accepts what the handler sends
    assert parsed.site == "h1" and parsed.metrics.num_examples == data.num_train
    updated = content["arrays"].to_torch_state_dict()
    assert updated.keys() == initial.keys()
    assert any(not torch.equal(updated[k], initial[k]) for k in initial)


def test_evaluate_reports_dice_on_held_out_patients(synthetic_sites: list[Path]) -> None:
    app = create_client_app(PartitionSites(tuple(synthetic_sites)))
    reply = app(_message(MessageType.EVALUATE, build_unet(SPEC).state_dict()), _context({"partition-id": 1}))
    metrics = reply.content["metrics"]
    data = load_site_dataset(synthetic_sites[1], SPEC, test_fraction=0.25, seed=42)
    assert metrics["num-examples"] == data.num_test > 0
    assert 0.0 <= metrics["dice"] <= 1.0
    assert metrics["dice-truth"] == float(data.test_masks.sum())
    assert reply.content["site"]["site-name"] == synthetic_sites[1].name
    assert "arrays" not in reply.content
    assert read_reply(reply, "evaluate").metrics.counts.truth == float(data.test_masks.sum())


def test_train_and_test_patients_never_overlap(synthetic_sites: list[Path]) -> None:
    from imaging.site_data import split_patients

    train, test = split_patients(["p1", "p2", "p3", "p4"], 0.25, seed=42)
    assert train.isdisjoint(test) and len(test) == 1 and len(train | test) == 4
    assert split_patients(["p1", "p2", "p3", "p4"], 0.25, seed=42) == (train, test)


def test_node_config_without_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="node config lacks 'data-dir'"):
        site_from_node_config({})
    with pytest.raises(SiteConfigError, match="is not a directory"):
        site_from_node_config({"data-dir": str(tmp_path / "missing")})


def test_bad_round_config_is_refused_before_training(synthetic_sites: list[Path], fedseg_home: Path) -> None:
    app = create_client_app(PartitionSites(tuple(synthetic_sites)))
    message = instruction(
        RecordDict({"arrays": ArrayRecord(build_unet(SPEC).state_dict()), "config": ConfigRecord({"local-epochs": 1})}),
        MessageType.TRAIN,
    )
    reply = app(message, _context({"partition-id": 0}))
    # the coordinator learns the code; the site's audit log keeps what was wrong
    failure = coded_failure(reply, "FEDSEG-ROUND-001", fedseg_home / "audit" / f"{synthetic_sites[0].name}.jsonl")
    assert "round config lacks 'model-spec'" in failure["audit"]["reason"]
    assert failure["audit"]["event"] == "failure" and failure["audit"]["error"] == "ConfigError"


def test_site_cache_serves_later_rounds_and_notices_a_changed_series(tmp_path: Path) -> None:
    import shutil

    from imaging.site_cache import load_site_dataset_cached
    from simulation.synthetic import write_synthetic_sites

    (site,) = write_synthetic_sites(tmp_path / "sites", sites=1, patients_per_site=3, slices=4, size=32, seed=3)
    cache = tmp_path / "cache"
    first = load_site_dataset_cached(site, SPEC, test_fraction=0.34, seed=1, cache_dir=cache)
    (entry,) = cache.glob("*.npz")
    again = load_site_dataset_cached(site, SPEC, test_fraction=0.34, seed=1, cache_dir=cache)
    np.testing.assert_array_equal(first.train_images, again.train_images)
    assert again.train_patients == first.train_patients and again.vendors == first.vendors

    # removing one patient's folder changes the key: the cache is rebuilt, the stale entry dropped
    patient = sorted((site / "patients").iterdir())[0]
    shutil.rmtree(patient)
    changed = load_site_dataset_cached(site, SPEC, test_fraction=0.34, seed=1, cache_dir=cache)
    assert changed.num_train + changed.num_test < first.num_train + first.num_test
    assert [p.name for p in cache.glob("*.npz")] != [entry.name] and len(list(cache.glob("*.npz"))) == 1

    # a corrupt entry is ignored and rewritten, never trusted
    (entry2,) = cache.glob("*.npz")
    entry2.write_bytes(b"garbage")
    healed = load_site_dataset_cached(site, SPEC, test_fraction=0.34, seed=1, cache_dir=cache)
    np.testing.assert_array_equal(healed.train_masks, changed.train_masks)


def test_a_broken_series_is_recorded_and_the_rest_still_trains(tmp_path: Path) -> None:
    import shutil

    from simulation.synthetic import write_synthetic_sites

    (site,) = write_synthetic_sites(tmp_path / "s", sites=1, patients_per_site=3, slices=4, size=32, seed=5)
    broken = sorted((site / "patients").iterdir())[0]
    first_slice = sorted((broken / "series").iterdir())[0]
    shutil.copy(sorted((broken / "series").iterdir())[1], first_slice)  # two identical instances
    # corrupt one instance's pixel data length so the series cannot be decoded
    raw = bytearray(first_slice.read_bytes())
    first_slice.write_bytes(bytes(raw[: len(raw) - 100]))
    data = load_site_dataset(site, SPEC, test_fraction=0.34, seed=1)
    assert any("series unusable" in p.reason or "cannot be read" in p.reason for p in data.problems)
    assert data.num_train + data.num_test == 2 * 4
