"""Promotion gates, governed promotion, rollback and `fedseg registry promote|rollback|show`.

Gate logic is tested pure (tags in, verdicts out); promotion against one real sqlite store per
module, each test under its own model name so that tests stay independent and fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry import (
    CHAMPION,
    GateConfig,
    GateError,
    ModelNotFoundError,
    PromotionRefusedError,
    TrackingRun,
    VersionFacts,
    default_gates,
    default_store,
    evaluate_gates,
    promote,
    publish_model,
    read_history,
    rollback,
)
from registry.cli_governance import promote_command, rollback_command, show_command

SPEC = ModelSpec(channels=(4, 8), image_size=32)
SHA = "ab" * 32


def _tags(**kw: object) -> dict[str, str]:
    """Version tags as the server writes them: JSON for mappings, metric.* strings for metrics."""
    tags: dict[str, str] = {}
    for key, value in kw.items():
        if key.startswith("m_"):
            tags[f"metric.{key[2:]}"] = f"{float(value):.6g}"  # type: ignore[arg-type]
        else:
            tags[key] = value if isinstance(value, str) else json.dumps(value)
    return tags


def _gate(results, name):
    return next(r for r in results if r.name == name)


# --- gates, pure -------------------------------------------------------------------------------


def test_worst_site_gate_names_the_worst_site() -> None:
    facts = VersionFacts.from_tags(2, _tags(m_dice_min=0.41, eval_sites={"a": 0.8, "b": 0.41}))
    failed = _gate(evaluate_gates(facts, None, GateConfig(min_worst_site_dice=0.5)), "worst_site_dice")
    assert not failed.passed and "0.4100 (b) < 0.5000" in failed.detail
    assert _gate(evaluate_gates(facts, None, GateConfig(min_worst_site_dice=0.4)), "worst_site_dice").passed
    bare = VersionFacts.from_tags(3, {})
    assert _gate(evaluate_gates(bare, None, GateConfig()), "worst_site_dice").passed  # 0.0 accepts any
    assert not _gate(evaluate_gates(bare, None, GateConfig(min_worst_site_dice=0.1)), "worst_site_dice").passed


def test_worst_site_first_a_better_mean_that_hurts_the_weakest_site_is_refused() -> None:
    champion = VersionFacts.from_tags(1, _tags(m_dice_mean=0.70, eval_sites={"a": 0.75, "b": 0.65}))
    candidate = VersionFacts.from_tags(2, _tags(m_dice_mean=0.78, eval_sites={"a": 0.96, "b": 0.60}))
    results = evaluate_gates(candidate, champion, GateConfig())
    assert [r.name for r in results][:3] == ["worst_site_dice", "worst_site_drop", "mean_dice_drop"]
    worst = _gate(results, "worst_site_drop")
    assert not worst.passed and "worst site 0.6000 (b) vs champion v1 0.6500 (b): drop 0.0500 > 0.0200" in worst.detail
    assert _gate(results, "mean_dice_drop").passed  # the mean alone would have promoted it
    assert _gate(evaluate_gates(candidate, champion, GateConfig(max_worst_site_dice_drop=0.05)),
                 "worst_site_drop").passed
    assert _gate(evaluate_gates(candidate, None, GateConfig()), "worst_site_drop").passed  # no champion
    bare = VersionFacts.from_tags(3, {})
    assert not _gate(evaluate_gates(bare, champion, GateConfig()), "worst_site_drop").passed


def test_mean_drop_gate_compares_with_the_champion() -> None:
    champion = VersionFacts.from_tags(1, _tags(m_dice_mean=0.80))
    ok = VersionFacts.from_tags(2, _tags(m_dice_mean=0.785))
    bad = VersionFacts.from_tags(3, _tags(m_dice_mean=0.70))
    gates = GateConfig()  # max_mean_dice_drop 0.02
    assert _gate(evaluate_gates(ok, champion, gates), "mean_dice_drop").passed
    result = _gate(evaluate_gates(bad, champion, gates), "mean_dice_drop")
    assert not result.passed and "drop 0.1000 > 0.0200" in result.detail and "v1" in result.detail
    assert _gate(evaluate_gates(bad, None, gates), "mean_dice_drop").passed  # no champion
    assert not _gate(evaluate_gates(VersionFacts.from_tags(4, {}), champion, gates), "mean_dice_drop").passed


def test_epsilon_gate_needs_dp_and_every_site_epsilon() -> None:
    gates = GateConfig(max_epsilon=5.0)
    sites = {"a": 10, "b": 12}

    def verdict(**tags: object):
        return _gate(evaluate_gates(VersionFacts.from_tags(1, _tags(sites=sites, **tags)), None, gates), "epsilon")

    assert "without differential privacy" in verdict().detail and not verdict().passed  # old version
    assert not verdict(dp={"enabled": False}).passed
    assert "no epsilon_sites" in verdict(dp={"enabled": True, "noise_multiplier": 1.1}).detail
    assert not verdict(dp={"enabled": True}, epsilon_sites={"a": 3.0}).passed  # b unbounded
    over = verdict(dp={"enabled": True}, epsilon_sites={"a": 3.0, "b": 6.5})
    assert not over.passed and "b=6.5" in over.detail
    assert verdict(dp={"enabled": True}, epsilon_sites={"a": 3.0, "b": 4.9}).passed
    no_gate = evaluate_gates(VersionFacts.from_tags(1, _tags(sites=sites)), None, GateConfig())
    assert _gate(no_gate, "epsilon").passed  # max_epsilon None: no epsilon gate


def test_manifest_gate_requires_every_site() -> None:
    gates = GateConfig(require_manifests=True)
    partial = VersionFacts.from_tags(1, _tags(sites={"a": 1, "b": 2}, site_manifests={"a": SHA}))
    result = _gate(evaluate_gates(partial, None, gates), "site_manifests")
    assert not result.passed and "site(s) b" in result.detail
    full = VersionFacts.from_tags(1, _tags(sites={"a": 1, "b": 2}, site_manifests={"a": SHA, "b": SHA}))
    assert _gate(evaluate_gates(full, None, gates), "site_manifests").passed
    assert _gate(evaluate_gates(partial, None, GateConfig()), "site_manifests").passed  # not required


def test_gates_toml_top_level_or_table_and_refusals(tmp_path: Path) -> None:
    table = tmp_path / "table.toml"
    table.write_text("[gates]\nmin_worst_site_dice = 0.6\nmax_epsilon = 8\nrequire_manifests = true\n")
    assert GateConfig.from_toml(table) == GateConfig(0.6, 0.02, 8, True)
    top = tmp_path / "top.toml"
    top.write_text("max_mean_dice_drop = 0.05\n")
    assert GateConfig.from_toml(top).max_mean_dice_drop == 0.05
    cases = {
        "min_worst_site_dice = 0.5\nmax_epsilom = 3\n": "max_epsilom",
        "[gates]\nrequire_manifests = 'yes'\n": "require_manifests",
        "min_worst_site_dice = 'high'\n": "min_worst_site_dice",
        "max_mean_dice_drop = -0.1\n": "max_mean_dice_drop",
        "min_worst_site_dice = = 1\n": "not valid TOML",
    }
    for text, named in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(GateError, match=named):
            GateConfig.from_toml(bad)
    with pytest.raises(GateError, match="cannot read gates file"):
        GateConfig.from_toml(tmp_path / "missing.toml")


def test_default_gates_follow_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSEG_GATES_FILE", raising=False)
    assert default_gates() == GateConfig()
    path = tmp_path / "g.toml"
    path.write_text("min_worst_site_dice = 0.3\n")
    monkeypatch.setenv("FEDSEG_GATES_FILE", str(path))
    assert default_gates().min_worst_site_dice == 0.3


# --- promotion against a real store ----------------------------------------------------------


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("governance-home")


@pytest.fixture
def store(shared_home: Path, monkeypatch: pytest.MonkeyPatch):
    """One sqlite registry for the module (each test uses its own model name)."""
    monkeypatch.setenv("FEDSEG_HOME", str(shared_home))
    monkeypatch.delenv("FEDSEG_GATES_FILE", raising=False)
    return default_store()


_NET = build_unet(SPEC)


def _publish(store, name: str, dice_pooled: float, dice_mean: float | None = None,
             dice_min: float | None = None, **lineage: object) -> int:
    metrics = {"dice_pooled": dice_pooled}
    if dice_mean is not None:
        metrics["dice_mean"] = dice_mean
    if dice_min is not None:
        metrics["dice_min"] = dice_min
    run = TrackingRun.start(store, "fedseg-governance", name, {})
    tags = {k: v if isinstance(v, str) else json.dumps(v) for k, v in lineage.items()}
    worst = dice_pooled if dice_min is None else dice_min  # both sites evaluated the published model
    published = publish_model(store, run, name, _NET.state_dict(), SPEC, metrics,
                              {"rounds": "2", "sites": json.dumps({"a": 8, "b": 6}),
                               "eval_sites": json.dumps({"a": max(worst, dice_pooled), "b": worst}), **tags})
    run.end(True)
    return published.version


def _champion(store, name: str) -> int:
    return int(store.client().get_registered_model(name).aliases[CHAMPION])


def test_publish_time_promotion_respects_gates(store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = _publish(store, "auto", 0.60, 0.60, 0.55)
    gates = tmp_path / "gates.toml"
    gates.write_text("min_worst_site_dice = 0.5\n")
    monkeypatch.setenv("FEDSEG_GATES_FILE", str(gates))
    run = TrackingRun.start(store, "fedseg-governance", "auto", {})
    better_but_unsafe = publish_model(store, run, "auto", _NET.state_dict(), SPEC,
                                      {"dice_pooled": 0.9, "dice_mean": 0.7, "dice_min": 0.2}, {})
    assert not better_but_unsafe.promoted
    assert "worst_site_dice" in better_but_unsafe.reason and f"champion stays v{v1}" in better_but_unsafe.reason
    assert _champion(store, "auto") == v1
    assert [e["action"] for e in read_history(store, "auto")] == ["auto"]


def test_promote_refuses_naming_the_failed_gate_and_keeps_the_alias(store) -> None:
    v1 = _publish(store, "refuse", 0.80, 0.80, 0.70)
    v2 = _publish(store, "refuse", 0.70, 0.70, 0.30)  # not better: stays a candidate
    assert _champion(store, "refuse") == v1
    with pytest.raises(PromotionRefusedError) as info:
        promote(store, "refuse", v2, gates=GateConfig(min_worst_site_dice=0.5))
    message = str(info.value)
    assert "worst_site_dice" in message and "mean_dice_drop" in message
    assert {r.name for r in info.value.failed} == {"worst_site_dice", "worst_site_drop", "mean_dice_drop"}
    assert _champion(store, "refuse") == v1
    with pytest.raises(PromotionRefusedError, match="without a reason"):
        promote(store, "refuse", v2, gates=GateConfig(), force=True)
    with pytest.raises(PromotionRefusedError, match="already the champion"):
        promote(store, "refuse", v1, gates=GateConfig())
    with pytest.raises(ModelNotFoundError, match="models:/refuse/99"):
        promote(store, "refuse", 99, gates=GateConfig())


def test_forced_promotion_records_who_and_why_and_rollback_walks_back(store) -> None:
    v1 = _publish(store, "force", 0.80, 0.80, 0.70)
    v2 = _publish(store, "force", 0.85, 0.79, 0.72)  # auto-promoted: better pooled Dice
    v3 = _publish(store, "force", 0.50, 0.50, 0.10)
    assert _champion(store, "force") == v2
    result = promote(store, "force", v3, gates=GateConfig(min_worst_site_dice=0.5), force=True,
                     reason="site b relabelled; emergency fix", actor="alice")
    assert (result.version, result.previous, result.forced) == (v3, v2, True)
    assert {g.name for g in result.failed_gates} == {"worst_site_dice", "worst_site_drop", "mean_dice_drop"}
    last = read_history(store, "force")[-1]
    assert last["actor"] == "alice" and last["forced"] is True
    assert last["reason"] == "site b relabelled; emergency fix" and last["previous"] == v2
    assert any(not g["passed"] for g in last["gates"])
    tags = store.client().get_model_version("force", str(v3)).tags
    assert tags["promoted_by"] == "alice" and tags["forced_reason"].startswith("site b")
    assert tags["promoted_at"].endswith("+00:00")

    back = rollback(store, "force", actor="bob", reason="v3 misbehaves")
    assert (back.version, back.previous, _champion(store, "force")) == (v2, v3, v2)
    assert rollback(store, "force").version == v1  # walks further back, not a toggle
    with pytest.raises(PromotionRefusedError, match="no earlier champion"):
        rollback(store, "force")
    actions = [(e["action"], e["version"]) for e in read_history(store, "force")]
    assert actions == [("auto", v1), ("auto", v2), ("promote", v3), ("rollback", v2), ("rollback", v1)]


def test_rollback_without_history_is_refused(store) -> None:
    client = store.client()
    client.create_registered_model("bare")
    with pytest.raises(PromotionRefusedError, match="no champion"):
        rollback(store, "bare")
    with pytest.raises(ModelNotFoundError, match="ghost"):
        rollback(store, "ghost")


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_promote_exit_codes_and_messages(store, tmp_path: Path) -> None:
    runner = CliRunner()
    v1 = _publish(store, "cli", 0.80, 0.80, 0.70)
    v2 = _publish(store, "cli", 0.75, 0.79, 0.40)
    gates = tmp_path / "gates.toml"
    gates.write_text("[gates]\nmin_worst_site_dice = 0.5\n")

    refused = runner.invoke(promote_command, ["cli", str(v2), "--gates", str(gates)])
    assert refused.exit_code == 1, refused.output
    assert "worst_site_dice  FAIL" in refused.output and "failed gate(s) worst_site_dice" in refused.output
    assert "Traceback" not in refused.output and _champion(store, "cli") == v1

    no_reason = runner.invoke(promote_command, ["cli", str(v2), "--force"])
    assert no_reason.exit_code == 1 and "without a reason" in no_reason.output

    forced = runner.invoke(promote_command, ["cli", str(v2), "--gates", str(gates), "--force",
                                             "--reason", "clinical sign-off", "--actor", "carol"])
    assert forced.exit_code == 0, forced.output
    assert "FAIL (forced)" in forced.output and f"champion is now v{v2} (was v{v1})" in forced.output

    back = runner.invoke(rollback_command, ["cli", "--reason", "undo"])
    assert back.exit_code == 0 and f"champion is now v{v1}" in back.output
    assert _champion(store, "cli") == v1

    worst_first = runner.invoke(promote_command, ["cli", str(v2)])  # default gates: worst site 0.7 -> 0.4
    assert worst_first.exit_code == 1 and "worst_site_drop  FAIL" in worst_first.output
    lenient = tmp_path / "lenient.toml"
    lenient.write_text("max_worst_site_dice_drop = 0.5\n")
    ok = runner.invoke(promote_command, ["cli", str(v2), "--gates", str(lenient)])  # mean drop 0.01
    assert ok.exit_code == 0 and "mean_dice_drop   PASS" in ok.output, ok.output

    unknown_key = tmp_path / "typo.toml"
    unknown_key.write_text("min_worst_site_dise = 0.5\n")
    typo = runner.invoke(promote_command, ["cli", str(v1), "--gates", str(unknown_key)])
    assert typo.exit_code == 1 and "min_worst_site_dise" in typo.output and "Traceback" not in typo.output

    missing = runner.invoke(promote_command, ["nobody", "1"])
    assert missing.exit_code == 1 and "no registered model 'nobody'" in missing.output
    no_history = runner.invoke(rollback_command, ["nobody"])
    assert no_history.exit_code == 1 and "nobody" in no_history.output


def test_cli_show_prints_decoded_lineage(store) -> None:
    runner = CliRunner()
    v1 = _publish(store, "show", 0.8, 0.78, 0.7, dp={"enabled": True, "noise_multiplier": 1.1, "delta": 1e-5},
                  epsilon_sites={"a": 2.5, "b": 3.0}, secure_aggregation="on")
    result = runner.invoke(show_command, ["show", str(v1), "--format", "json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["version"] == v1 and info["aliases"] == [CHAMPION]
    assert info["metrics"] == {"dice_pooled": 0.8, "dice_mean": 0.78, "dice_min": 0.7}
    assert info["lineage"]["sites"] == {"a": 8, "b": 6}
    assert info["lineage"]["dp"]["noise_multiplier"] == 1.1
    assert info["lineage"]["secure_aggregation"] == "on" and info["lineage"]["rounds"] == "2"
    assert [e["action"] for e in info["champion_history"]] == ["auto"]
    assert info["run_id"] and "metric.dice_pooled" not in info["lineage"]

    table = runner.invoke(show_command, ["show", str(v1)])
    assert table.exit_code == 0 and "aliases: champion" in table.output and "epsilon_sites" in table.output
    missing = runner.invoke(show_command, ["show", "42"])
    assert missing.exit_code == 1 and "models:/show/42 is not in the registry" in missing.output
