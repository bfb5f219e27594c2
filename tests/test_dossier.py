"""The governance dossier against a real sqlite MLflow store: sections, plots, bias by vendor,
privacy statement, PHI check, comments, artifacts and the CLI."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry import RegistryStore, TrackingRun, publish_model
from registry.cli_dossier import comment_command, dossier_command
from registry.comments import MAX_COMMENT_CHARS, add_comment, list_comments
from registry.dossier import (
    SECTION_TITLES,
    collect_facts,
    log_dossier,
    render_html,
    render_markdown,
    write_dossier,
)
from registry.dossier_checks import intensity_drift, scan_phi, vendor_dice
from registry.errors import CommentError, ModelNotFoundError
from registry.plots import EPSILON_PLOT, render_plots

SPEC = ModelSpec(channels=(4, 8), image_size=32)
NAME = "dossier-unet"
SITES = ("site-a", "site-b", "site-c")
DICE = {  # per round 1..3
    "site-a": (0.50, 0.70, 0.90),
    "site-b": (0.40, 0.60, 0.70),
    "site-c": (0.30, 0.50, 0.60),
}
POOLED = (0.41, 0.61, 0.75)  # still rising at round 3: not converged
TRAIN = {"site-a": 120, "site-b": 90, "site-c": 60}
TEST_SLICES = {"site-a": 40, "site-b": 30, "site-c": 20}
SITE_INPUTS = {
    "site-a": {"vendors": {"GE": 3}, "modalities": {"MR": 3}, "series": 3, "slices": 48,
               "intensity_p01": 0.0, "intensity_p50": 100.0, "intensity_p99": 400.0, "spacing_mm": [3, 1, 1]},
    "site-b": {"vendors": {"GE": 1, "Siemens": 1}, "modalities": {"MR": 2}, "series": 2, "slices": 32,
               "intensity_p01": 0.0, "intensity_p50": 140.0, "intensity_p99": 420.0, "spacing_mm": [3, 1, 1]},
    "site-c": {"vendors": {"Philips": 2}, "modalities": {"MR": 2}, "series": 2, "slices": 32,
               "intensity_p01": 0.0, "intensity_p50": 90.0, "intensity_p99": 380.0, "spacing_mm": [3, 1, 1]},
}
REFERENCE = {"intensity_p01": 0.0, "intensity_p50": 110.0, "intensity_p99": 400.0}
EPSILON = {"site-a": (1.0, 1.6, 2.1), "site-b": (1.1, 1.7, 2.2), "site-c": (1.2, 1.8, 2.3)}
UID = "1.2.840.113619.2.55.3.604688119.868"


def _publish(store: RegistryStore, *, dp: bool = False, extra_tags: dict[str, str] | None = None) -> int:
    run = TrackingRun.start(store, "fedseg-dossier-test", "dossier", {})
    run.log_params({"num-server-rounds": 3, "local-epochs": 1, "learning-rate": 0.01,
                    "strategy": "fedavg", "test-fraction": 0.25})
    for r in (1, 2, 3):
        metrics: dict[str, float] = {"eval/dice_pooled": POOLED[r - 1],
                                     "eval/dice_min": min(d[r - 1] for d in DICE.values()),
                                     "train/failed_sites": 0.0, "evaluate/failed_sites": 0.0}
        for site in SITES:
            metrics[f"site/{site}/evaluate/dice"] = DICE[site][r - 1]
            metrics[f"site/{site}/evaluate/num-examples"] = TEST_SLICES[site]
            metrics[f"site/{site}/train/num-examples"] = TRAIN[site]
            metrics[f"site/{site}/train/train-loss"] = 1.0 / r
            metrics[f"site/{site}/train/update-norm"] = 3.0 / r
            if dp:
                metrics[f"site/{site}/train/epsilon"] = EPSILON[site][r - 1]
        run.log_metrics(metrics, step=r)
    final = {s: d[-1] for s, d in DICE.items()}
    lineage = {
        "run_id": run.run_id, "rounds": "3", "rounds_completed": "3",
        "sites": json.dumps(TRAIN), "num_sites": "3", "strategy": "fedavg",
        "strategy_params": json.dumps({"fraction_train": 1.0, "min_sites": 2}),
        "code_version": "0.1.0+gabc123", "preprocessing": SPEC.to_json(),
        "eval_sites": json.dumps(final),
        "secure_aggregation": "off",
        "site_manifests": json.dumps({s: hashlib.sha256(s.encode()).hexdigest() for s in SITES}),
        "site_inputs": json.dumps(SITE_INPUTS), "input_reference": json.dumps(REFERENCE),
        "dp": json.dumps({"enabled": True, "noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5}
                         if dp else {"enabled": False}),
        **({"epsilon_sites": json.dumps({s: e[-1] for s, e in EPSILON.items()})} if dp else {}),
        **(extra_tags or {}),
    }
    metrics = {"dice_pooled": POOLED[-1], "dice_mean": sum(final.values()) / 3,
               "dice_min": 0.6, "dice_spread": 0.3}
    torch.manual_seed(0)
    published = publish_model(store, run, NAME, build_unet(SPEC).state_dict(), SPEC, metrics, lineage)
    run.end(True)
    return published.version


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RegistryStore, dict[str, int]]:
    home = tmp_path_factory.mktemp("dossier-home")
    store = RegistryStore.embedded(home)
    with pytest.MonkeyPatch.context() as mp:  # signed with, and verified by, this home's keys
        mp.setenv("FEDSEG_HOME", str(home))
        versions = {
            "plain": _publish(store),
            "dp": _publish(store, dp=True),
            "phi": _publish(store, extra_tags={"reviewed_series": f"series {UID} checked"}),
        }
    return home, store, versions


@pytest.fixture
def store(registry_home, monkeypatch: pytest.MonkeyPatch) -> RegistryStore:
    monkeypatch.setenv("FEDSEG_HOME", str(registry_home[0]))  # its trusted keys verify the evidence
    return registry_home[1]


@pytest.fixture
def versions(registry_home) -> dict[str, int]:
    return registry_home[2]


def test_markdown_has_every_section_in_order_and_site_dice(store, versions) -> None:
    md = render_markdown(collect_facts(store, NAME, versions["plain"]))
    headings = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert headings == list(SECTION_TITLES)
    evaluation = md.split("## 3 ")[1].split("## 4 ")[0]
    for site in SITES:
        row = next(line for line in evaluation.splitlines() if line.startswith(f"| {site} |"))
        assert row == f"| {site} | {TRAIN[site]} | {DICE[site][-1]:.4f} | {TEST_SLICES[site]} |"
    assert "pooled Dice (over all sites' held-out voxels): 0.7500" in evaluation
    assert "![" in evaluation and "(plots/dice_per_round.png)" in evaluation
    recommendations = md.split("## 7 ")[1]
    assert "site-c has the lowest held-out Dice, 0.6000, below the 0.7 threshold" in recommendations
    assert "Not converged: pooled Dice still rose by +0.1400" in recommendations
    assert "| aliases | champion |" in md.split("## 2 ")[0]  # v1 took the alias


class _StrictParser(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def test_html_is_well_formed_and_self_contained(store, versions) -> None:
    facts = collect_facts(store, NAME, versions["plain"])
    page = render_html(facts, render_plots(facts.history))
    parser = _StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    assert len(parser.images) == 2 and all(s.startswith("data:image/png;base64,iVBORw0KGgo") for s in parser.images)
    assert "<style>" in page and "http" not in page.split("<main>")[0]
    for title in SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page


def test_html_escapes_comment_text(store, versions) -> None:
    facts = collect_facts(store, NAME, versions["plain"])
    from dataclasses import replace
    from registry.comments import Comment

    hostile = replace(facts, comments=(Comment(1, "eve", "2026-01-01T00:00:00+00:00", "<script>x</script> [l](javascript:1)"),))
    page = render_html(hostile, {})
    assert "<script>x" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    md = render_markdown(hostile)
    assert "<script>" not in md and r"\<script\>" in md and r"\[l\]" in md


def test_plots_are_small_deterministic_pngs_and_epsilon_only_with_dp(store, versions) -> None:
    plain = render_plots(collect_facts(store, NAME, versions["plain"]).history)
    assert set(plain) == {"dice_per_round.png", "update_norms.png"}
    dp_history = collect_facts(store, NAME, versions["dp"]).history
    with_dp = render_plots(dp_history)
    assert set(with_dp) == {"dice_per_round.png", "update_norms.png", EPSILON_PLOT}
    for png in (*plain.values(), *with_dp.values()):
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 200_000
    assert render_plots(dp_history) == with_dp


def test_bias_aggregates_dice_by_vendor(store, versions) -> None:
    # GE: site-a 3 series at 0.9 + site-b 1 series at 0.7 -> 3.4 / 4 = 0.85; Siemens 0.7; Philips 0.6
    rows = vendor_dice({s: d[-1] for s, d in DICE.items()}, SITE_INPUTS)
    assert [(r.vendor, round(r.dice, 6), r.series, r.sites) for r in rows] == [
        ("GE", 0.85, 4, ("site-a", "site-b")),
        ("Siemens", 0.7, 1, ("site-b",)),
        ("Philips", 0.6, 2, ("site-c",)),
    ]
    bias = render_markdown(collect_facts(store, NAME, versions["plain"])).split("## 4 ")[1].split("## 5 ")[0]
    assert "| GE | 0.8500 | 4 | site-a, site-b |" in bias
    assert "Gap between best and worst vendor: 0.2500 (GE 0.8500 vs Philips 0.6000): FLAG" in bias
    assert "Gap between best and worst site: 0.3000 (site-a 0.9000 vs site-c 0.6000): FLAG" in bias


def test_privacy_statement_with_and_without_dp(store, versions) -> None:
    plain = render_markdown(collect_facts(store, NAME, versions["plain"])).split("## 5 ")[1].split("## 6 ")[0]
    assert "No formal differential privacy guarantee applies to this version" in plain
    assert "Secure aggregation: off" in plain
    assert "update-norm" in plain and "dice" in plain
    dp = render_markdown(collect_facts(store, NAME, versions["dp"])).split("## 5 ")[1].split("## 6 ")[0]
    assert "No formal differential privacy" not in dp
    assert "noise multiplier 1.1" in dp and "δ = 1e-05" in dp
    for site, eps in EPSILON.items():
        assert f"| {site} | {eps[-1]:.3f} | 1e-05 |" in dp
    assert "(plots/epsilon_per_round.png)" in dp


def test_phi_check_fails_on_a_uid_like_tag_and_passes_otherwise(store, versions) -> None:
    ok = render_markdown(collect_facts(store, NAME, versions["plain"]))
    assert re.search(r"\| No PHI in artifacts \| PASS \|", ok)
    bad = render_markdown(collect_facts(store, NAME, versions["phi"]))
    line = next(l for l in bad.splitlines() if l.startswith("| No PHI in artifacts"))
    assert "| FAIL |" in line and "version tag reviewed_series" in line and "1.2.… (9 components)" in line
    assert UID not in bad  # reported, never repeated
    assert [f.kind for f in scan_phi([("t", "DOE^JOHN and 1.2.3.4.5.6")])] == ["DICOM UID-like", "PatientName-like"]
    assert scan_phi([("t", "version 0.1.0, Dice 0.8123, spacing 1.5.2")]) == []


def test_compliance_manifests_and_hosting(store, versions) -> None:
    md = render_markdown(collect_facts(store, NAME, versions["plain"]))
    assert re.search(r"\| Site data manifests \| PASS \| SHA-256 manifest digest recorded for all 3 sites \|", md)
    assert re.search(r"\| HDS hosting of the registry \| TO CONFIRM \| embedded sqlite .*to be confirmed by the operator", md)
    assert re.search(r"\| GDPR data minimisation \| PASS \|", md)


def test_drift_against_the_recorded_reference() -> None:
    rows, source = intensity_drift(SITE_INPUTS, REFERENCE)
    assert "input_reference" in source
    assert [(r.site, r.delta, round(r.fraction_of_range, 3), r.flagged) for r in rows] == [
        ("site-a", -10.0, 0.025, False), ("site-b", 30.0, 0.075, False), ("site-c", -20.0, 0.05, False),
    ]
    assert intensity_drift({}, None) == ([], "no intensity statistics")


def test_comments_persist_and_appear_in_the_dossier(store, versions) -> None:
    v = versions["dp"]
    when = datetime(2026, 11, 23, 9, 30, tzinfo=timezone.utc)
    first = add_comment(store, NAME, v, "Dr A. Martin", "Checked site-c's\nfailures: annotation issue.", now=when)
    second = add_comment(store, NAME, v, "b.lee", "OK for the pilot.")
    assert (first.number, second.number) == (1, 2) and first.time == "2026-11-23T09:30:00+00:00"
    assert [c.text for c in list_comments(store, NAME, v)] == [first.text, second.text]
    tags = store.client().get_model_version(NAME, str(v)).tags
    assert json.loads(tags["fedseg.comment.0001"])["author"] == "Dr A. Martin"
    md = render_markdown(collect_facts(store, NAME, v)).split("## 8 Comments")[1]
    assert "> **Dr A. Martin**, 2026-11-23T09:30:00+00:00:" in md and "> failures: annotation issue." in md
    assert "OK for the pilot." in md
    with pytest.raises(CommentError, match="needs some text"):
        add_comment(store, NAME, v, "x", "   ")
    with pytest.raises(CommentError, match="at most 5000"):
        add_comment(store, NAME, v, "x", "y" * (MAX_COMMENT_CHARS + 1))
    with pytest.raises(ModelNotFoundError):
        add_comment(store, NAME, 99, "x", "text")


def test_write_and_log_dossier(store, versions, tmp_path: Path) -> None:
    v = versions["plain"]
    written = write_dossier(store, NAME, v, tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == [
        "dossier.md", "dossier.html", "plots/dice_per_round.png", "plots/update_norms.png"]
    assert log_dossier(store, NAME, v) == f"dossier/v{v}"
    client = store.client()
    run_id = client.get_model_version(NAME, str(v)).run_id
    listed = {a.path for a in client.list_artifacts(run_id, f"dossier/v{v}")}
    assert {f"dossier/v{v}/dossier.md", f"dossier/v{v}/dossier.html", f"dossier/v{v}/plots"} <= listed
    plots = {a.path for a in client.list_artifacts(run_id, f"dossier/v{v}/plots")}
    assert f"dossier/v{v}/plots/dice_per_round.png" in plots


def test_cli_dossier_and_comment(registry_home, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home, store, versions = registry_home
    monkeypatch.setenv("FEDSEG_HOME", str(home))
    runner = CliRunner()
    v = str(versions["phi"])
    result = runner.invoke(comment_command, [NAME, v, "--author", "carol", "--text", "needs a PHI review"])
    assert result.exit_code == 0, result.output
    assert f"comment 1 on {NAME} v{v} by carol" in result.output
    out = tmp_path / "cli-out"
    result = runner.invoke(dossier_command, [NAME, v, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out / "dossier.md") in result.output and f"dossier/v{v}/" in result.output
    assert "needs a PHI review" in (out / "dossier.md").read_text()
    result = runner.invoke(dossier_command, [NAME, "champion", "--out", str(tmp_path / "c"), "--no-log"])
    assert result.exit_code == 0, result.output and "logged" not in result.output
    result = runner.invoke(dossier_command, [NAME, "42", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and f"registered model '{NAME}' has no version '42'" in result.output
    result = runner.invoke(dossier_command, ["ghost", "1", "--out", str(tmp_path / "x"), "--no-log"])
    assert result.exit_code != 0 and "no registered model 'ghost'" in result.output
    result = runner.invoke(comment_command, [NAME, v, "--author", "carol", "--text", ""])
    assert result.exit_code != 0 and "needs some text" in result.output
