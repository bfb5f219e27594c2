"""Signed evidence over a real MLflow store (sqlite + file artifacts): a registry writer edits a
tag, the logged dossier or the weights, or registers a signed artifact again; promotion, serving's
loader and the dossier each refuse, naming what differs, and the champion stays where it was."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from click.testing import CliRunner

from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry import (
    CHAMPION,
    EVIDENCE_TAG,
    EvidenceError,
    GateConfig,
    RegistryStore,
    TrackingRun,
    attest_version,
    default_store,
    load_model,
    promote,
    publish_model,
    read_history,
    rollback,
)
from registry.cli_attest import attest_command
from registry.cli_dossier import dossier_command
from registry.cli_governance import promote_command
from registry.dossier import render_markdown
from registry.dossier_facts import collect_facts
from registry.evidence import Evidence, is_signed_tag
from registry.signing import LEGACY_SIGNATURE_FORMAT, load_signing_key, sign_model_dir
from serving.models import ModelManager

SPEC = ModelSpec(channels=(4, 8), image_size=32)
SITES = {"site-a": 120, "site-b": 90}


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evidence-home")


@pytest.fixture
def store(shared_home: Path, monkeypatch: pytest.MonkeyPatch) -> RegistryStore:
    """One sqlite registry and one consortium key for the module; each test its own model name."""
    monkeypatch.setenv("FEDSEG_HOME", str(shared_home))
    monkeypatch.delenv("FEDSEG_GATES_FILE", raising=False)
    return default_store()


def _publish(store: RegistryStore, name: str, seed: int, dice: float) -> int:
    torch.manual_seed(seed)
    run = TrackingRun.start(store, "fedseg-evidence", name, {})
    lineage = {
        "run_id": run.run_id, "rounds": "3", "sites": json.dumps(SITES), "num_sites": "2",
        "eval_sites": json.dumps({"site-a": dice, "site-b": dice - 0.05}),
        "dp": json.dumps({"enabled": False}), "secure_aggregation": "off",
        "input_reference": json.dumps({"intensity_p01": 0.0, "intensity_p50": 100.0, "intensity_p99": 400.0}),
    }
    metrics = {"dice_pooled": dice, "dice_mean": dice - 0.02, "dice_min": dice - 0.05}
    published = publish_model(store, run, name, build_unet(SPEC).state_dict(), SPEC, metrics, lineage)
    run.end(True)
    return published.version


def _path(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path))


def _version(store: RegistryStore, name: str, version: int):
    return store.client().get_model_version(name, str(version))


def _champion(store: RegistryStore, name: str) -> int | None:
    aliases = store.client().get_registered_model(name).aliases
    return int(aliases[CHAMPION]) if CHAMPION in aliases else None


@dataclass(frozen=True)
class Registered:
    """A model with champion v1 and a candidate v2 that passes the default gates untampered."""

    store: RegistryStore
    name: str
    champion: int
    candidate: int


def _registered(store: RegistryStore, name: str) -> Registered:
    v1 = _publish(store, name, seed=1, dice=0.80)
    v2 = _publish(store, name, seed=2, dice=0.79)  # not better: not auto-promoted, but passes the gates
    assert _champion(store, name) == v1
    return Registered(store, name, v1, v2)


# ----------------------------------------------------------------------------- the attacks
# Each returns (model name, version) of what the attacker wants promoted or served.


def _edit_lineage_tag(r: Registered) -> tuple[str, int]:
    r.store.client().set_model_version_tag(r.name, str(r.candidate), "eval_sites",
                                           json.dumps({"site-a": 0.99, "site-b": 0.99}))
    return r.name, r.candidate


def _edit_gate_metric(r: Registered) -> tuple[str, int]:
    r.store.client().set_model_version_tag(r.name, str(r.candidate), "metric.dice_min", "0.99")
    return r.name, r.candidate


def _add_unsigned_lineage(r: Registered) -> tuple[str, int]:
    r.store.client().set_model_version_tag(r.name, str(r.candidate), "site_manifests",
                                           json.dumps({"site-a": "0" * 64, "site-b": "1" * 64}))
    return r.name, r.candidate


def _edit_dossier(r: Registered) -> tuple[str, int]:
    run_root = _path(_version(r.store, r.name, r.candidate).source).parent
    md = run_root / "dossier" / f"v{r.candidate}" / "dossier.md"
    md.write_text(md.read_text().replace("0.79", "0.95"))
    return r.name, r.candidate


def _reregister_same_name(r: Registered) -> tuple[str, int]:
    old = _version(r.store, r.name, r.champion)
    new = r.store.client().create_model_version(r.name, source=old.source, run_id=old.run_id,
                                                tags=dict(old.tags))
    return r.name, int(new.version)


def _reregister_under_a_fresh_run(r: Registered) -> tuple[str, int]:
    old = _version(r.store, r.name, r.champion)
    fresh = TrackingRun.start(r.store, "fedseg-evidence", "fresh-looking", {})
    new = r.store.client().create_model_version(r.name, source=old.source, run_id=fresh.run_id,
                                                tags=dict(old.tags))
    return r.name, int(new.version)


def _reregister_under_another_name(r: Registered) -> tuple[str, int]:
    old = _version(r.store, r.name, r.champion)
    other = f"{r.name}-copy"
    r.store.client().create_registered_model(other)
    new = r.store.client().create_model_version(other, source=old.source, run_id=old.run_id,
                                                tags=dict(old.tags))
    return other, int(new.version)


def _swap_weights(r: Registered) -> tuple[str, int]:
    """The candidate's stored model directory replaced by the champion's: genuinely signed files."""
    target = _path(_version(r.store, r.name, r.candidate).source)
    shutil.rmtree(target)
    shutil.copytree(_path(_version(r.store, r.name, r.champion).source), target)
    return r.name, r.candidate


def _remove_evidence(r: Registered) -> tuple[str, int]:
    client = r.store.client()
    client.set_model_version_tag(r.name, str(r.candidate), "metric.dice_min", "0.99")
    client.delete_model_version_tag(r.name, str(r.candidate), EVIDENCE_TAG)
    return r.name, r.candidate


def _forge_evidence(r: Registered) -> tuple[str, int]:
    """Edit a tag and rewrite the evidence's digest of it: without the key it cannot be signed."""
    client = r.store.client()
    client.set_model_version_tag(r.name, str(r.candidate), "metric.dice_min", "0.99")
    raw = json.loads(_version(r.store, r.name, r.candidate).tags[EVIDENCE_TAG])
    raw["payload"]["tags"]["metric.dice_min"] = hashlib.sha256(b"0.99").hexdigest()
    client.set_model_version_tag(r.name, str(r.candidate), EVIDENCE_TAG, json.dumps(raw))
    return r.name, r.candidate


ATTACKS: dict[str, tuple[Callable[[Registered], tuple[str, int]], str]] = {
    "edited lineage tag": (_edit_lineage_tag, r"tag eval_sites differs from the signed evidence"),
    "edited gate metric": (_edit_gate_metric, r"tag metric\.dice_min differs from the signed evidence"),
    "added lineage tag": (_add_unsigned_lineage, r"tag site_manifests is not in the signed evidence"),
    "edited dossier": (_edit_dossier, r"dossier file dossier\.md differs from the signed evidence"),
    "re-registered, same name": (_reregister_same_name, r"signed for version 1, this is version 3"),
    "re-registered, fresh run": (_reregister_under_a_fresh_run, r"signed for run \w+, version's run is \w+"),
    "re-registered, other name": (_reregister_under_another_name, r"signed for model '[\w-]+', this is '[\w-]+-copy'"),
    "swapped weights": (_swap_weights, r"model files differ from the signed evidence \(changed [^)]*artifacts/state_dict\.pt"),
    "evidence removed": (_remove_evidence, r"has no signed evidence \(tag signature\.evidence removed\)"),
    "forged evidence": (_forge_evidence, r"the signed evidence of [\w-]+ v2: signature does not verify"),
}


@pytest.mark.adversarial
@pytest.mark.parametrize("attack", list(ATTACKS), ids=[a.replace(" ", "-").replace(",", "") for a in ATTACKS])
def test_tampered_evidence_is_refused_by_promote_serve_and_dossier(
    store: RegistryStore, attack: str, tmp_path: Path
) -> None:
    tamper, names = ATTACKS[attack]
    r = _registered(store, f"ev-{abs(hash(attack)) % 10**8}")
    history = read_history(store, r.name)
    name, version = tamper(r)

    # promote (the API and `fedseg registry promote`)
    with pytest.raises(EvidenceError, match=names) as refused:
        promote(store, name, version, gates=GateConfig(), force=True, reason="attacker")
    assert str(refused.value).startswith(f"refused to promote {name} v{version} to champion")
    cli = CliRunner().invoke(promote_command, [name, str(version)])
    assert cli.exit_code == 1 and "Traceback" not in cli.output
    assert "refused to promote" in cli.output and re.search(names, cli.output)

    # serving's loader
    with pytest.raises(EvidenceError, match=names) as not_served:
        load_model(store, f"models:/{name}/{version}")
    assert str(not_served.value).startswith(f"refusing models:/{name}/{version}")

    # the dossier: refused before anything is written or logged
    out = tmp_path / "dossier"
    doc = CliRunner().invoke(dossier_command, [name, str(version), "--out", str(out)])
    assert doc.exit_code == 1 and "Traceback" not in doc.output, doc.output
    assert re.search(names, doc.output) and not out.exists()

    # nothing lost: the champion, its history and its own evidence are as they were
    assert _champion(store, r.name) == r.champion
    assert read_history(store, r.name) == history
    assert load_model(store, f"models:/{r.name}@{CHAMPION}").version == r.champion
    if name != r.name:
        assert _champion(store, name) is None


@pytest.mark.adversarial
def test_an_untampered_candidate_passes_every_check(store: RegistryStore, tmp_path: Path) -> None:
    """The control: the same candidate, left alone, is promoted, served and documented."""
    r = _registered(store, "ev-control")
    loaded = load_model(store, f"models:/{r.name}/{r.candidate}")
    assert loaded.evidence is not None and loaded.evidence.version == r.candidate
    assert json.loads(loaded.tags["input_reference"])["intensity_p50"] == 100.0  # what drift reads
    doc = CliRunner().invoke(dossier_command, [r.name, str(r.candidate), "--out", str(tmp_path / "d")])
    assert doc.exit_code == 0 and "evidence signed again" in doc.output, doc.output
    assert "signed evidence fedseg-evidence/v2" in (tmp_path / "d" / "dossier.md").read_text()
    result = promote(store, r.name, r.candidate, gates=GateConfig(), actor="alice")
    assert result.version == r.candidate and _champion(store, r.name) == r.candidate
    # annotations written after publication (promotion, comments) are not evidence
    assert load_model(store, f"models:/{r.name}@{CHAMPION}").version == r.candidate
    assert rollback(store, r.name).version == r.champion


@pytest.mark.adversarial
def test_serving_keeps_the_champion_when_the_alias_is_moved_to_a_tampered_version(
    store: RegistryStore,
) -> None:
    """A registry writer skips promote and points the alias at an edited version directly."""
    r = _registered(store, "ev-serve")
    manager = ModelManager(
        champion_uri=f"models:/{r.name}@{CHAMPION}", challenger_uri=f"models:/{r.name}@challenger",
        canary_share=0.0, loader=lambda uri: load_model(store, uri),
        factory=lambda model: _Served(model.name, model.version),
        resolver=lambda uri: _champion(store, r.name) or 0,
    )
    assert [x.outcome for x in manager.load()] == ["ok"]
    _edit_gate_metric(r)
    store.client().set_registered_model_alias(r.name, CHAMPION, str(r.candidate))
    [reload] = manager.refresh()
    assert reload.outcome == "failed" and reload.version == r.champion
    assert "tag metric.dice_min differs from the signed evidence" in reload.detail
    assert manager.champion.predictor.version == r.champion  # still serving v1


@dataclass(frozen=True)
class _Served:
    name: str
    version: int
    forward_mode: str = "eager"


# ----------------------------------------------------------------------------- old-format versions


def _make_legacy(store: RegistryStore, name: str, version: int) -> None:
    """What fedseg published before evidence: a /1 model signature and no evidence tag."""
    model_dir = _path(_version(store, name, version).source)
    sign_model_dir(model_dir, load_signing_key(), format=LEGACY_SIGNATURE_FORMAT)
    store.client().delete_model_version_tag(name, str(version), EVIDENCE_TAG)


@pytest.mark.adversarial
def test_old_format_versions_are_named_refused_and_attested(store: RegistryStore, tmp_path: Path) -> None:
    r = _registered(store, "ev-legacy")
    _make_legacy(store, r.name, r.candidate)
    old = rf"{r.name} v{r.candidate} is signed in the old format {LEGACY_SIGNATURE_FORMAT}"
    with pytest.raises(EvidenceError, match=old):
        promote(store, r.name, r.candidate, gates=GateConfig())
    with pytest.raises(EvidenceError, match=old):
        load_model(store, f"models:/{r.name}/{r.candidate}")
    # the dossier is written, and says that its facts are not signed
    md = render_markdown(collect_facts(store, r.name, r.candidate))
    assert "NOT SIGNED: signed in the old format" in md and "fedseg registry attest" in md
    logged = CliRunner().invoke(dossier_command, [r.name, str(r.candidate), "--out", str(tmp_path / "d")])
    assert logged.exit_code == 1 and "refusing to log a dossier" in logged.output
    assert _champion(store, r.name) == r.champion

    # an operator reviews it and signs its evidence; then it verifies like any other
    no_reason = CliRunner().invoke(attest_command, [r.name, str(r.candidate), "--reason", " "])
    assert no_reason.exit_code == 1 and "without a reason" in no_reason.output
    attested = CliRunner().invoke(attest_command, [r.name, str(r.candidate), "--reason", "reviewed", "--actor", "carol"])
    assert attested.exit_code == 0, attested.output
    loaded = load_model(store, f"models:/{r.name}/{r.candidate}")
    assert loaded.evidence is not None and loaded.evidence.attestation == {"reason": "reviewed", "actor": "carol"}
    assert promote(store, r.name, r.candidate, gates=GateConfig()).version == r.candidate
    with pytest.raises(EvidenceError, match="already carries signed evidence"):
        attest_version(store, r.name, r.candidate, load_signing_key(), reason="again", actor="carol")


@pytest.mark.adversarial
def test_a_current_model_without_evidence_is_not_taken_for_an_old_one(store: RegistryStore) -> None:
    r = _registered(store, "ev-downgrade")
    store.client().delete_model_version_tag(r.name, str(r.candidate), EVIDENCE_TAG)
    with pytest.raises(EvidenceError, match="removed"):
        attest_version(store, r.name, r.candidate, load_signing_key(), reason="launder", actor="mallory")
    assert EVIDENCE_TAG not in _version(store, r.name, r.candidate).tags


# ----------------------------------------------------------------------------- the payload


def test_signed_tags_are_every_tag_but_the_later_annotations() -> None:
    for key in ("eval_sites", "metric.dice_min", "input_reference", "weights_sha256", "a_new_lineage_key"):
        assert is_signed_tag(key), key
    for key in ("promoted_at", "promoted_by", "forced_reason", "rolled_back_by",
                "challenger_set_at", "fedseg.comment.0001", EVIDENCE_TAG):
        assert not is_signed_tag(key), key


def test_evidence_tag_round_trips_and_refuses_unknown_fields(store: RegistryStore) -> None:
    r = _registered(store, "ev-format")
    raw = _version(store, r.name, r.candidate).tags[EVIDENCE_TAG]
    evidence = Evidence.from_tag(raw)
    assert (evidence.name, evidence.version, evidence.format) == (r.name, r.candidate, "fedseg-evidence/v2")
    assert {"dossier.md", "dossier.html"} <= set(evidence.dossier_files)
    assert "artifacts/state_dict.pt" in evidence.model_files and "eval_sites" in evidence.tags
    assert Evidence.from_tag(evidence.to_tag()) == evidence
    doc = json.loads(raw)
    doc["payload"]["gates_passed"] = True
    with pytest.raises(EvidenceError, match="unexpected fields"):
        Evidence.from_tag(json.dumps(doc))
    with pytest.raises(EvidenceError, match="malformed"):
        Evidence.from_tag("not json")


def test_two_publications_from_one_run_keep_their_own_files(store: RegistryStore) -> None:
    """The second model of a run no longer overwrites the first's files (which evidence would
    then rightly refuse as swapped)."""
    run = TrackingRun.start(store, "fedseg-evidence", "twice", {})
    versions = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        versions.append(publish_model(store, run, "ev-twice", build_unet(SPEC).state_dict(), SPEC,
                                      {"dice_pooled": 0.5 - seed / 10}, {}).version)
    run.end(True)
    sources = {_version(store, "ev-twice", v).source for v in versions}
    assert len(sources) == 2 and all(load_model(store, f"models:/ev-twice/{v}").version == v for v in versions)
