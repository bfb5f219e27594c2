"""Simulated misbehaving sites: the Flower mod that corrupts a site's training reply."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from flower_messages import instruction
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from client.app import create_client_app
from client.site import PartitionSites
from imaging.instructions import RoundInstructions
from imaging.model import build_unet
from imaging.spec import ModelSpec
from simulation.errors import SimulationError
from simulation.misbehave import misbehave_mod, parse_misbehavior

pytestmark = pytest.mark.robustness
SPEC = ModelSpec(channels=(4, 8), image_size=32)


def _round(sites: list[Path], spec: str, partition: int = 1):
    plan = parse_misbehavior([spec], [p.name for p in sites])
    honest = create_client_app(PartitionSites(tuple(sites)))
    bad = create_client_app(PartitionSites(tuple(sites)), train_mods=[misbehave_mod(plan, sites)])
    config = RoundInstructions(spec=SPEC, batch_size=8).to_config()
    initial = build_unet(SPEC).state_dict()
    context = Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(), run_config={})

    def message():
        return instruction(RecordDict({"arrays": ArrayRecord(initial), "config": ConfigRecord(config)}), MessageType.TRAIN)

    return initial, honest(message(), context), bad(message(), context)


def test_nan_and_signflip_and_scale_corrupt_only_the_named_site(synthetic_sites: list[Path]) -> None:
    _, _, nan_reply = _round(synthetic_sites, "site-b=nan")
    assert all(np.isnan(a.numpy()).all() for a in nan_reply.content["arrays"].values())

    initial, honest, flipped = _round(synthetic_sites, "site-b=signflip:5")
    key = "model.0.conv.unit0.conv.weight"
    g = initial[key].numpy()
    w_honest = honest.content["arrays"][key].numpy()
    np.testing.assert_allclose(flipped.content["arrays"][key].numpy(), g - 5 * (w_honest - g), rtol=1e-4, atol=1e-6)
    assert flipped.content["metrics"]["num-examples"] == honest.content["metrics"]["num-examples"]

    _, honest_a, untouched = _round(synthetic_sites, "site-b=scale:3", partition=0)  # site-a is honest
    np.testing.assert_array_equal(untouched.content["arrays"][key].numpy(), honest_a.content["arrays"][key].numpy())


def test_dropout_fails_the_round_and_straggle_delays(synthetic_sites: list[Path]) -> None:
    # the dropout raises inside the ClientApp: its edge answers an error reply with a code only
    _, _, dropped = _round(synthetic_sites, "site-b=dropout")
    assert dropped.has_error() and dropped.error.reason.startswith("FEDSEG-INTERNAL: "), dropped.error.reason
    assert "dropped out" not in dropped.error.reason
    start = time.monotonic()
    _round(synthetic_sites, "site-a=straggle:0.5", partition=0)
    assert time.monotonic() - start >= 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("site-z=nan", "unknown site 'site-z'"),
        ("site-a=explode", "kind 'explode' is not one of"),
        ("site-a", "is not SITE=KIND"),
        ("site-a=scale:x", "is not a number"),
        ("site-a=scale:-1", "must be a positive number"),
    ],
)
def test_bad_misbehave_specs_are_named(spec: str, message: str) -> None:
    with pytest.raises(SimulationError, match=message):
        parse_misbehavior([spec], ["site-a", "site-b"])
