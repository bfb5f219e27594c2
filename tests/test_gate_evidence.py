"""Gates on complete, honest evidence (issue 15, item 7).

No pooled metric is invented when sites withhold their voxel counts; every site that trained must
have evaluated the published model itself (also with ``local-norm``), or the version is promoted
only by an operator's forced promotion with a recorded reason. The federations run the real
ClientApp handlers over an in-process grid (``local_grid``) against a real sqlite MLflow store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from evidence import evaluated
from flwr.app import Context, Error, Message
from local_grid import LocalGrid

from aggregation import SiteMetrics, summarize_evaluation
from client.app import create_client_app
from client.site import PartitionSites, Site
from imaging.model import load_state_dict
from imaging.training import evaluate
from registry import (
    CHAMPION,
    GateConfig,
    PromotionRefusedError,
    VersionFacts,
    default_store,
    evaluate_gates,
    load_model,
    promote,
    read_history,
)
from registry.cli import registry
from server.config import FederationConfig
from server.federation import run_federation
from simulation.engine import default_app_dir, fused_run_config

TINY = "image-size=32 unet-channels='8,16' batch-size=8"
COUNTS = ("dice-intersection", "dice-predicted", "dice-truth")


def _config(overrides: str) -> FederationConfig:
    return FederationConfig.from_run_config(fused_run_config(default_app_dir(), f"{TINY} {overrides}"))


def _sites_with_policy(synthetic_sites: list[Path], root: Path, policy: str | None) -> tuple[Path, ...]:
    """Copies of the shared synthetic hospitals (same names), each with ``policy`` as policy.toml."""
    copies = []
    for site in synthetic_sites:
        copy = root / site.name
        shutil.copytree(site, copy)
        if policy is not None:
            (copy / "policy.toml").write_text(policy)
        copies.append(copy)
    return tuple(copies)


def _tags(name: str, version: int) -> dict[str, str]:
    return dict(default_store().client().get_model_version(name, str(version)).tags)


def _champion(name: str) -> int | None:
    aliases = default_store().client().get_registered_model(name).aliases
    return int(aliases[CHAMPION]) if CHAMPION in aliases else None


def _site(name: str, metrics: dict[str, float]) -> SiteMetrics:
    return SiteMetrics(site=name, metrics={"num-examples": 4, **metrics})


# --- pooled Dice is computed from evidence, never invented ---------------------------------------


def test_pooled_dice_needs_every_sites_voxel_counts() -> None:
    counted = {"dice": 0.5, "dice-intersection": 10.0, "dice-predicted": 20.0, "dice-truth": 20.0}
    both = summarize_evaluation([_site("a", counted), _site("b", {**counted, "dice-intersection": 15.0})])
    assert both["dice_pooled"] == pytest.approx(2 * 25 / 80)
    partial = summarize_evaluation([_site("a", counted), _site("b", {"dice": 0.9})])
    assert "dice_pooled" not in partial  # not a 1.0, not a 0.0, not a pool of site a alone
    assert partial["dice_mean"] == pytest.approx(0.7) and partial["dice_min"] == 0.5
    assert "dice_pooled" not in summarize_evaluation([_site("a", {"dice": 0.4}), _site("b", {"dice": 0.6})])
    # counts that are there but empty (nothing to find, nothing found) are evidence: Dice's 1.0
    empty = {"dice": 1.0, "dice-intersection": 0.0, "dice-predicted": 0.0, "dice-truth": 0.0}
    assert summarize_evaluation([_site("a", empty)])["dice_pooled"] == 1.0


def test_a_champion_comparison_without_pooled_dice_names_what_is_missing() -> None:
    candidate = VersionFacts.from_tags(2, {"eval_sites_uncounted": json.dumps(["site-b"])})
    assert candidate.dice_pooled is None
    assert candidate.pooled_dice_gap() == (
        "v2 has no dice_pooled: site(s) site-b sent no voxel counts "
        "(dice-intersection, dice-predicted, dice-truth)")
    assert VersionFacts.from_tags(3, {"metric.dice_pooled": "0.4"}).pooled_dice_gap() == ""


@pytest.mark.adversarial
def test_sites_dropping_voxel_counts_get_no_pooled_dice_and_do_not_displace_the_champion(
    synthetic_sites: list[Path], tmp_path: Path
) -> None:
    """The README's own metrics policy drops the voxel counts: the run used to report pooled
    Dice 1.0 and auto-promotion ranked that above any champion."""
    store = default_store()
    honest = LocalGrid(create_client_app(PartitionSites(tuple(synthetic_sites))), len(synthetic_sites))
    first = run_federation(honest, _config("num-server-rounds=1"), store, progress=lambda _: None)
    assert first.published.promoted and "dice_pooled" in first.metrics

    policy = '[metrics]\nallowed = ["num-examples", "train-loss", "dice"]\n'
    sites = _sites_with_policy(synthetic_sites, tmp_path, policy)
    grid = LocalGrid(create_client_app(PartitionSites(sites)), len(sites))
    lines: list[str] = []
    second = run_federation(grid, _config("num-server-rounds=1"), store, progress=lines.append)

    evaluations = [r for r in grid.replies if r.metadata.message_type == "evaluate" and not r.has_error()]
    assert len(evaluations) == 2
    assert all(not set(COUNTS) & set(r.content["metrics"]) for r in evaluations)  # dropped at the site
    assert "dice_pooled" not in second.metrics and "dice_mean" in second.metrics
    assert any("Dice pooled n/a (no voxel counts from site-a, site-b)" in line for line in lines), lines
    tags = _tags("fedseg-unet", second.published.version)
    assert "metric.dice_pooled" not in tags
    assert json.loads(tags["eval_sites_uncounted"]) == ["site-a", "site-b"]
    history = store.client().get_metric_history(second.run_id, "eval/dice_pooled")
    assert history == []  # nothing invented in tracking either

    assert not second.published.promoted
    assert second.published.reason.startswith(f"cannot compare with champion v{first.published.version}: ")
    assert "site(s) site-a, site-b sent no voxel counts (dice-intersection" in second.published.reason
    assert _champion("fedseg-unet") == first.published.version
    assert [e["action"] for e in read_history(store, "fedseg-unet")] == ["auto"]  # nothing half-moved


# --- every training site evaluates the published model ------------------------------------------


def _refuse_final_evaluation(sites: PartitionSites, site_name: str, final_round: int):
    """A Flower mod: ``site_name`` answers the final round's evaluation with an error reply."""

    def mod(message: Message, context: Context, call_next):  # noqa: ANN202
        config = message.content["config"]
        if (sites(context.node_config).name == site_name
                and int(config.get("server-round", 0)) == final_round):
            return Message(Error(code=0, reason="site declines to evaluate"), reply_to=message)
        return call_next(message, context)

    return mod


@pytest.mark.adversarial
def test_a_site_that_trains_but_skips_the_final_evaluation_makes_the_version_unpromotable(
    synthetic_sites: list[Path], tmp_path: Path
) -> None:
    sites = PartitionSites(tuple(synthetic_sites))
    mod = _refuse_final_evaluation(sites, "site-b", final_round=2)
    grid = LocalGrid(create_client_app(sites, evaluate_mods=[mod]), len(synthetic_sites))
    store = default_store()
    outcome = run_federation(grid, _config("num-server-rounds=2"), store, progress=lambda _: None)

    version = outcome.published.version
    tags = _tags("fedseg-unet", version)
    assert set(json.loads(tags["sites"])) == {"site-a", "site-b"}  # site-b trained both rounds
    assert set(json.loads(tags["eval_sites"])) == {"site-a"}
    assert not outcome.published.promoted and _champion("fedseg-unet") is None
    assert "failed gate(s) evaluated_sites" in outcome.published.reason
    assert "site(s) site-b trained but sent no evaluation of the published model" in outcome.published.reason

    runner = CliRunner()
    refused = runner.invoke(registry, ["promote", "fedseg-unet", str(version)])
    assert refused.exit_code == 1 and "evaluated_sites  FAIL" in refused.output, refused.output
    assert "site(s) site-b trained but sent no evaluation" in refused.output
    assert _champion("fedseg-unet") is None and read_history(store, "fedseg-unet") == []

    reason = "site-b's evaluation server was down; board approved on site-a's figures (ticket 7)"
    forced = runner.invoke(registry, ["promote", "fedseg-unet", str(version), "--force",
                                      "--reason", reason, "--actor", "operator-1"])
    assert forced.exit_code == 0, forced.output
    assert "evaluated_sites  FAIL (forced)" in forced.output
    assert _champion("fedseg-unet") == version
    (entry,) = read_history(store, "fedseg-unet")
    assert entry["forced"] is True and entry["reason"] == reason and entry["actor"] == "operator-1"
    assert any(g["name"] == "evaluated_sites" and not g["passed"] for g in entry["gates"])
    assert _tags("fedseg-unet", version)["forced_reason"] == reason
    # the dossier (as the operator regenerates it; the one logged at publication stays signed)
    out = tmp_path / "dossier"
    made = runner.invoke(registry, ["dossier", "fedseg-unet", str(version), "--out", str(out), "--no-log"])
    assert made.exit_code == 0, made.output
    text = (out / "dossier.md").read_text()
    assert "promotion forced, reason" in text and reason in text
    assert "trained but did not evaluate the published model: site-b" in text


def test_a_version_without_training_sites_recorded_fails_the_evaluation_gate() -> None:
    (gate,) = [g for g in evaluate_gates(VersionFacts.from_tags(1, {}), None, GateConfig())
               if g.name == "evaluated_sites"]
    assert not gate.passed and "no training sites recorded" in gate.detail
    ok = VersionFacts.from_tags(2, evaluated("a", "b"))
    assert all(g.passed for g in evaluate_gates(ok, None, GateConfig()))


# --- local-norm: the published model itself is evaluated and gated -------------------------------


@pytest.mark.adversarial
def test_local_norm_sites_report_the_published_models_own_dice_and_the_gates_read_it(
    synthetic_sites: list[Path],
) -> None:
    """With FedBN-style local layers the sites used to report only their personalised variant's
    Dice: the model that is published was never evaluated anywhere."""
    grid = LocalGrid(create_client_app(PartitionSites(tuple(synthetic_sites))), len(synthetic_sites))
    config = _config("num-server-rounds=2 local-norm=true")
    store = default_store()
    outcome = run_federation(grid, config, store, progress=lambda _: None)
    tags = _tags("fedseg-unet", outcome.published.version)
    global_dice = json.loads(tags["eval_sites"])
    personal = json.loads(tags["eval_sites_local_norm"])
    assert set(global_dice) == set(personal) == {"site-a", "site-b"}

    # each site's reported Dice is the published weights' own, recomputed here independently
    published = load_model(store, f"models:/fedseg-unet/{outcome.published.version}")
    spec, instructions = published.spec, config.instructions
    for site_dir in synthetic_sites:
        data = Site(data_dir=site_dir, name=site_dir.name).load_dataset(
            spec, test_fraction=instructions.test_fraction, seed=instructions.seed)
        net = load_state_dict(spec, published.state_dict)
        result = evaluate(net, data.test_images, data.test_masks, device=torch.device("cpu"),
                          threshold=spec.threshold)
        assert global_dice[site_dir.name] == pytest.approx(result.dice, abs=1e-5), site_dir.name
    final = [r for r in grid.replies if r.metadata.message_type == "evaluate"][-2:]
    for reply in final:
        metrics = reply.content["metrics"]
        assert {"dice", "local-norm-dice", *COUNTS, *(f"local-norm-{k}" for k in COUNTS)} <= set(metrics)
    assert personal != global_dice  # the site's own layers do change its figures

    # the gates read the published model's Dice: a threshold between the two worst sites decides
    worst_global, worst_personal = min(global_dice.values()), min(personal.values())
    threshold = (worst_global + worst_personal) / 2
    facts = VersionFacts.from_tags(outcome.published.version, tags)
    (gate,) = [g for g in evaluate_gates(facts, None, GateConfig(min_worst_site_dice=threshold))
               if g.name == "worst_site_dice"]
    assert gate.passed is (worst_global >= threshold), gate.detail
    assert f"{worst_global:.4f}" in gate.detail
    if not gate.passed:
        with pytest.raises(PromotionRefusedError, match="worst_site_dice"):
            promote(store, "fedseg-unet", outcome.published.version,
                    gates=GateConfig(min_worst_site_dice=threshold))
