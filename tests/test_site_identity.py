"""Site identities and weights the coordinator can check (issue 15, item 5).

Sites enrol with a manifest signed by their node key (`fedseg pki sign-manifest`, admitted by
`fedseg pki enrol` only with the key registered for the node); every reply is signed by that key
(client.reply_signing) and checked by the coordinator (aggregation.identity) inside the real
ValidatingStrategy. The attacks: a site claiming another site's name, a site claiming 10⁹
slices, a forged or edited manifest, a site above the weight-share cap.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp.strategy import FedAvg
from local_grid import LocalGrid

from aggregation import SiteIdentities, ValidatingStrategy
from client.app import create_client_app
from client.reply_signing import reply_signing_mod
from client.site import PartitionSites, Site
from imaging.replies import SiteFacts
from privacy.cli import pki
from privacy.enrolment import EnrolledSites, load_node_key, read_enrolment
from privacy.errors import EnrolmentError
from server.config import FederationConfig
from server.errors import FederationError, RunConfigError
from server.federation import run_federation
from simulation.engine import default_app_dir, fused_run_config
from simulation.enrolment import enrol_sites
from simulation.misbehave import misbehave_mod, parse_misbehavior

pytestmark = pytest.mark.adversarial

SHAPES = {"conv.weight": (2, 3), "conv.bias": (2,)}
SITES = ("site-a", "site-b", "site-c")
DECLARED = 100  # usable slices in every test manifest


def _manifest(site: str, slices: int = DECLARED) -> dict:
    return {"format": "fedseg-site-manifest/1", "site": site, "usable": True,
            "counts": {"slices": slices, "slices_usable": slices}, "series": []}


def _cli(*args: str) -> str:
    result = CliRunner().invoke(pki, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def enrolled(tmp_path: Path) -> tuple[EnrolledSites, dict[str, Path]]:
    """Three sites enrolled the way the runbooks do it: site-key, sign-manifest, enrol."""
    keys, enrolment_dir = {}, tmp_path / "enrolment"
    for site in SITES:
        _cli("site-key", "--site", site, "--out", str(tmp_path / "keys"))
        manifest = tmp_path / f"{site}.manifest.json"
        manifest.write_text(json.dumps(_manifest(site)))
        document = tmp_path / f"{site}.enrolment.json"
        _cli("sign-manifest", "--manifest", str(manifest), "--key", str(tmp_path / "keys" / f"{site}.key"),
             "--out", str(document))
        _cli("enrol", str(document), "--public-key", str(tmp_path / "keys" / f"{site}.key.pub"),
             "--dir", str(enrolment_dir))
        keys[site] = tmp_path / "keys" / f"{site}.key"
    return EnrolledSites.load(enrolment_dir), keys


def _arrays(scale: float, seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array((scale * rng.normal(size=s)).astype(np.float32)) for k, s in SHAPES.items()})


class KeyedGrid(LocalGrid):
    """A grid whose nodes the SuperLink authenticated: get_nodes reports their PEM public keys."""

    def __init__(self, node_keys: dict[int, bytes]) -> None:
        super().__init__(None, len(node_keys))  # type: ignore[arg-type]  # only sampling is used
        self.node_keys = node_keys

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.node_keys.get(n, b"")) for n in self.get_node_ids()]


def _pem(key_path: Path) -> bytes:
    return load_node_key(key_path).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class Round:
    """One train round of the real ValidatingStrategy; replies signed by the real client mod."""

    def __init__(self, strategy, grid: LocalGrid | None = None, server_round: int = 1) -> None:  # noqa: ANN001
        grid = grid or LocalGrid(None, len(SITES))  # type: ignore[arg-type]
        self.server_round = server_round
        config = ConfigRecord({"server-round": server_round})
        messages = strategy.configure_train(server_round, _arrays(0.0, 0), config, grid)
        self.sent = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        for m in self.sent:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the grid does on push

    def reply(self, k: int, *, claims: str, key: Path | None, examples: int = 10, seed: int | None = None) -> Message:
        """Node k's reply claiming to be site ``claims``, signed with ``key`` (None: unsigned)."""
        instruction = self.sent[k]

        def handler(message: Message, _context: Context) -> Message:
            content = RecordDict({"arrays": _arrays(0.1, seed if seed is not None else k),
                                  "metrics": MetricRecord({"num-examples": examples}),
                                  "site": ConfigRecord(SiteFacts(claims, "ab" * 32).to_record())})
            return Message(content, reply_to=message)

        site = Site(data_dir=Path("."), name=claims, node_key=key)
        context = Context(run_id=1, node_id=instruction.metadata.dst_node_id, node_config={},
                          state=RecordDict(), run_config={})
        return reply_signing_mod(lambda _cfg: site)(instruction, context, handler)


def _strategy(enrolled: EnrolledSites, **kwargs) -> tuple[ValidatingStrategy, list[tuple[str, str]], FedAvg]:
    inner, rejected = FedAvg(min_train_nodes=2, min_available_nodes=2), []
    strategy = ValidatingStrategy(inner, identities=SiteIdentities(enrolled),
                                  on_reject=lambda r, s, m: rejected.append((s, m)), **kwargs)
    return strategy, rejected, inner


def test_honest_signed_replies_pass(enrolled) -> None:  # noqa: ANN001
    sites, keys = enrolled
    strategy, rejected, _ = _strategy(sites)
    rnd = Round(strategy)
    replies = [rnd.reply(k, claims=s, key=keys[s]) for k, s in enumerate(SITES)]
    assert all(r.content["site"]["signature"] for r in replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and rejected == []


def test_a_site_claiming_another_sites_name_is_rejected(enrolled) -> None:  # noqa: ANN001
    sites, keys = enrolled
    strategy, rejected, _ = _strategy(sites)
    rnd = Round(strategy)
    replies = [rnd.reply(0, claims="site-a", key=keys["site-a"]),
               rnd.reply(1, claims="site-b", key=keys["site-b"]),
               rnd.reply(2, claims="site-a", key=keys["site-c"])]  # site-c signs as site-a
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    ((site, reason),) = rejected
    assert site == "site-a" and reason.startswith(
        "identity: the reply's signature does not verify with the key enrolled for 'site-a'")
    assert strategy.unverified("train") == [rnd.sent[2].metadata.dst_node_id]


@pytest.mark.parametrize(
    ("claims", "signer", "reason"),
    [
        ("site-z", "site-c", "identity: site 'site-z' is not enrolled (3 enrolled site(s))"),
        ("site-a", None, "identity: the reply claiming to be 'site-a' is not signed"),
    ],
    ids=["unenrolled-name", "unsigned"],
)
def test_an_unenrolled_or_unsigned_claim_is_rejected(enrolled, claims: str, signer: str | None, reason: str) -> None:  # noqa: ANN001
    sites, keys = enrolled
    strategy, rejected, _ = _strategy(sites)
    rnd = Round(strategy)
    replies = [rnd.reply(0, claims="site-a", key=keys["site-a"]), rnd.reply(1, claims="site-b", key=keys["site-b"]),
               rnd.reply(2, claims=claims, key=keys[signer] if signer else None)]
    strategy.aggregate_train(1, replies)
    assert [r for _, r in rejected if r.startswith(reason)], rejected


def test_a_reply_replayed_into_a_later_round_or_altered_is_rejected(enrolled) -> None:  # noqa: ANN001
    sites, keys = enrolled
    strategy, rejected, _ = _strategy(sites)
    first = Round(strategy, server_round=1)
    old = first.reply(2, claims="site-c", key=keys["site-c"])
    second = Round(strategy, server_round=2)
    replayed = Message(old.content, reply_to=second.sent[2])  # the same signed content, round 2
    altered = second.reply(1, claims="site-b", key=keys["site-b"])
    altered.content["arrays"] = _arrays(0.1, seed=99)  # weights swapped after signing
    strategy.aggregate_train(2, [second.reply(0, claims="site-a", key=keys["site-a"]), altered, replayed])
    assert [s for s, r in rejected if r.startswith("identity: the reply's signature does not verify")] == [
        "site-b", "site-c"]


def test_the_superlinks_node_key_must_be_the_one_enrolled_for_the_name(enrolled) -> None:  # noqa: ANN001
    """Where the SuperLink authenticated the node, its key decides which name it may use."""
    sites, keys = enrolled
    strategy, rejected, _ = _strategy(sites)
    grid = KeyedGrid({101: _pem(keys["site-a"]), 102: _pem(keys["site-b"]), 103: _pem(keys["site-c"])})
    rnd = Round(strategy, grid)
    # node 103 (site-c's key at the SuperLink) got hold of site-a's signing key
    replies = [rnd.reply(0, claims="site-a", key=keys["site-a"]), rnd.reply(1, claims="site-b", key=keys["site-b"]),
               rnd.reply(2, claims="site-a", key=keys["site-a"], seed=7)]
    strategy.aggregate_train(1, replies)
    assert rejected == [("site-a", "identity: node 103 authenticated with the key enrolled for 'site-c', "
                                   "but its reply claims to be 'site-a'")]


def test_a_site_claiming_a_billion_slices_is_rejected_and_does_not_dominate_fedavg(enrolled) -> None:  # noqa: ANN001
    sites, keys = enrolled
    strategy, rejected, _ = _strategy(sites)
    rnd = Round(strategy)
    honest = [rnd.reply(0, claims="site-a", key=keys["site-a"]), rnd.reply(1, claims="site-b", key=keys["site-b"])]
    inflated = rnd.reply(2, claims="site-c", key=keys["site-c"], examples=10**9)  # validly signed by site-c
    arrays, _ = strategy.aggregate_train(1, [*honest, inflated])
    assert rejected == [("site-c", f"weight: 'site-c' claims 1000000000 samples, more than the {DECLARED} "
                                   "usable slices of its signed manifest")]
    expected = np.mean([r.content["arrays"]["conv.weight"].numpy() for r in honest], axis=0)
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), expected, atol=1e-6)
    assert not np.allclose(arrays["conv.weight"].numpy(), inflated.content["arrays"]["conv.weight"].numpy())


def test_the_weight_share_cap_refuses_a_site_above_it(enrolled) -> None:  # noqa: ANN001
    sites, keys = enrolled
    strategy, rejected, _ = _strategy(sites, max_weight_share=0.5)
    rnd = Round(strategy)
    replies = [rnd.reply(0, claims="site-a", key=keys["site-a"], examples=10),
               rnd.reply(1, claims="site-b", key=keys["site-b"], examples=10),
               rnd.reply(2, claims="site-c", key=keys["site-c"], examples=80)]  # within its manifest
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert rejected == [("site-c", "weight: 80 samples are 80.0% of the round's 100, above max-weight-share 0.5")]
    overrides = "min-sites=2 max-weight-share={}"
    with pytest.raises(RunConfigError, match=r"max-weight-share must lie in \(1/min-sites, 1\]"):
        FederationConfig.from_run_config(fused_run_config(default_app_dir(), overrides.format(0.4)))
    assert FederationConfig.from_run_config(
        fused_run_config(default_app_dir(), overrides.format(0.6))).max_weight_share == 0.6


def test_an_edited_enrolment_is_refused_and_the_run_does_not_start(enrolled, tmp_path: Path,  # noqa: ANN001
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sites, _ = enrolled
    path = Path(sites.source) / "site-b.json"
    doc = json.loads(path.read_text())
    doc["manifest"]["counts"]["slices_usable"] = 10**9  # more weight, after signing
    path.write_text(json.dumps(doc))
    with pytest.raises(EnrolmentError, match="site-b.json: the signature does not verify with the enrolled key"):
        EnrolledSites.load(Path(sites.source))
    monkeypatch.setenv("FEDSEG_ENROLMENT_DIR", sites.source)
    config = FederationConfig.from_run_config(fused_run_config(default_app_dir(), "num-server-rounds=1"))
    grid = LocalGrid(None, 2)  # type: ignore[arg-type]  # never reached
    with pytest.raises(FederationError, match="refusing to start: enrolment .*site-b.json: the signature does not verify"):
        run_federation(grid, config, None)  # type: ignore[arg-type]  # refused before the store is used
    assert not (tmp_path / "fedseg-home" / "journal").exists()  # no run was begun


def test_a_forged_enrolment_is_refused_by_the_operators_enrol(enrolled, tmp_path: Path) -> None:  # noqa: ANN001
    """site-c signs a manifest naming site-a; the operator checks it against site-a's registered key."""
    sites, keys = enrolled
    manifest = tmp_path / "forged.manifest.json"
    manifest.write_text(json.dumps(_manifest("site-a", slices=10**9)))
    forged = tmp_path / "forged.json"
    _cli("sign-manifest", "--manifest", str(manifest), "--key", str(keys["site-c"]), "--out", str(forged))
    assert read_enrolment(forged).site == "site-a"  # self-consistent, but signed by site-c's key
    result = CliRunner().invoke(pki, ["enrol", str(forged), "--public-key", str(keys["site-a"]) + ".pub",
                                      "--dir", sites.source, "--force"])
    assert result.exit_code != 0 and "not with the key registered for the node" in result.output
    result = CliRunner().invoke(pki, ["enrol", str(forged), "--public-key", str(keys["site-c"]) + ".pub",
                                      "--dir", sites.source, "--force"])
    assert result.exit_code != 0 and "is already enrolled as site 'site-c'" in result.output
    assert EnrolledSites.load(Path(sites.source))["site-a"].max_samples == DECLARED  # nothing replaced
    listed = json.loads(_cli("sites", "--dir", sites.source, "--format", "json"))
    assert [r["site"] for r in listed] == list(SITES)


@pytest.mark.parametrize(
    ("behaviour", "rejection"),
    [
        ("impersonate", "rejected the update of site-a: identity: the reply's signature does not verify "
                        "with the key enrolled for 'site-a'"),
        ("inflate:1e9", "rejected the update of site-b: weight: 'site-b' claims 1000000000 samples, more "
                        "than the 32 usable slices of its signed manifest"),
    ],
)
def test_a_lying_site_is_rejected_through_the_whole_coordinator(
    synthetic_sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str, rejection: str
) -> None:
    """Real ClientApp (handlers, signing mod, the simulation's misbehaviour mod), the real
    coordinator chain and MLflow: site-b's train replies claim site-a's name, or 10⁹ slices."""
    from registry import default_store

    enrolled_sites, keys = enrol_sites(synthetic_sites, tmp_path / "sim")
    assert {s: e.max_samples for s, e in enrolled_sites.items()} == {"site-a": 32, "site-b": 32}
    monkeypatch.setenv("FEDSEG_ENROLMENT_DIR", enrolled_sites.source)
    plan = parse_misbehavior([f"site-b={behaviour}"], [p.name for p in synthetic_sites])
    app = create_client_app(PartitionSites(tuple(synthetic_sites), tuple(keys)),
                            train_mods=[misbehave_mod(plan, synthetic_sites)])
    config = FederationConfig.from_run_config(fused_run_config(
        default_app_dir(), "num-server-rounds=1 image-size=32 unet-channels='8,16' batch-size=8 min-sites=1"))
    lines: list[str] = []
    store = default_store()
    outcome = run_federation(LocalGrid(app, len(synthetic_sites)), config, store, progress=lines.append)
    assert any(line.startswith("site identities: enrolled: 2 site(s)") for line in lines)
    assert any(rejection in line for line in lines), lines
    # the lineage names only what verified: the honest site-a with its own count; no site-b training
    assert list(outcome.sites) == ["site-a"] and 0 < outcome.sites["site-a"] <= 32
    tags = store.client().get_model_version("fedseg-unet", outcome.published.version).tags
    assert tags["site_identity"] == "enrolled" and json.loads(tags["sites"]) == outcome.sites
    claimed = "site-a" if behaviour == "impersonate" else "site-b"
    rejected = store.client().get_metric_history(outcome.run_id, f"site/{claimed}/train/rejected")
    assert [m.value for m in rejected] == [1.0]


def test_a_node_authenticated_with_an_unenrolled_key_is_rejected(enrolled, tmp_path: Path) -> None:  # noqa: ANN001
    """A registered but never enrolled node that obtained site-a's signing key."""
    sites, keys = enrolled
    _cli("site-key", "--site", "stranger", "--out", str(tmp_path / "other"))
    strategy, rejected, _ = _strategy(sites)
    grid = KeyedGrid({101: _pem(keys["site-a"]), 102: _pem(keys["site-b"]),
                      103: _pem(tmp_path / "other" / "stranger.key")})
    rnd = Round(strategy, grid)
    strategy.aggregate_train(1, [rnd.reply(0, claims="site-a", key=keys["site-a"]),
                                 rnd.reply(1, claims="site-b", key=keys["site-b"]),
                                 rnd.reply(2, claims="site-a", key=keys["site-a"], seed=7)])
    assert rejected == [("site-a", "identity: node 103 authenticated with a key no site enrolled, "
                                   "but its reply claims to be 'site-a'")]


def test_without_enrolment_the_coordinator_says_so_or_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    from aggregation import trust_statement

    assert trust_statement(EnrolledSites({})).startswith("self-reported: no enrolled sites")
    monkeypatch.setenv("FEDSEG_REQUIRE_ENROLMENT", "1")
    config = FederationConfig.from_run_config(fused_run_config(default_app_dir(), "num-server-rounds=1"))
    with pytest.raises(FederationError, match="FEDSEG_REQUIRE_ENROLMENT is set but no site is enrolled"):
        run_federation(LocalGrid(None, 2), config, None)  # type: ignore[arg-type]  # refused first


def test_the_node_key_comes_from_site_toml_or_the_node_config(tmp_path: Path) -> None:
    from client.site import site_from_node_config

    config = tmp_path / "site.toml"
    config.write_text(f'[site]\nname = "h1"\nnode_key = "keys/h1.key"\n[source]\nkind = "folder"\npath = "{tmp_path}"\n')
    assert site_from_node_config({"site-config": str(config)}).node_key == tmp_path / "keys" / "h1.key"
    override = site_from_node_config({"site-config": str(config), "node-key": "/etc/k.key"})
    assert override.node_key == Path("/etc/k.key")
    folder = site_from_node_config({"data-dir": str(tmp_path), "site-name": "h2", "node-key": "/etc/k.key"})
    assert folder.node_key == Path("/etc/k.key") and site_from_node_config({"data-dir": str(tmp_path)}).node_key is None
