"""The reply contract (imaging.replies) and its one reader on the coordinator (aggregation.replies).

A reply that breaks the contract is refused with a reason naming the key and the value, counted
for its site, and never reaches the strategy or crashes the round; metrics a site's policy keeps
at home are simply absent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from local_grid import LocalGrid

from aggregation import SiteReportingStrategy, ValidatingStrategy, summarize_evaluation
from aggregation.replies import claimed_site, read_reply
from imaging.errors import ReplyError
from imaging.replies import NUM_EXAMPLES, EvaluateReply, SiteFacts, TrainReply

SHAPES = {"conv.weight": (2, 3), "conv.bias": (2,)}
MANIFEST = "ab" * 32


def _arrays(scale: float, seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array((scale * rng.normal(size=s)).astype(np.float32)) for k, s in SHAPES.items()})


class Recording(FedAvg):
    def __init__(self) -> None:
        super().__init__(min_train_nodes=2, min_available_nodes=2, min_evaluate_nodes=2)
        self.train_seen: list[list[Message]] = []
        self.evaluate_seen: list[list[Message]] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        self.train_seen.append(list(replies))
        return super().aggregate_train(server_round, self.train_seen[-1])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        self.evaluate_seen.append(list(replies))
        return super().aggregate_evaluate(server_round, self.evaluate_seen[-1])


def _round(strategy, phase: str, nodes: int = 4) -> list[Message]:  # noqa: ANN001
    grid = LocalGrid(None, nodes)  # type: ignore[arg-type]  # only sampling is used
    configure = strategy.configure_train if phase == "train" else strategy.configure_evaluate
    messages = sorted(configure(1, _arrays(0.0, 0), ConfigRecord(), grid), key=lambda m: m.metadata.dst_node_id)
    for m in messages:
        m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the grid does on push
    return messages


def _reply(instruction: Message, k: int, metrics: dict, facts: dict | None = None, train: bool = True) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics),
                          "site": ConfigRecord(facts if facts is not None else SiteFacts(f"site-{k}", MANIFEST).to_record())})
    if train:
        content["arrays"] = _arrays(0.1, seed=k)
    return Message(content, reply_to=instruction)


def test_records_round_trip_with_their_keys_defined_once() -> None:
    train = TrainReply(num_examples=12, train_loss=0.4, train_steps=2, epsilon=1.5, dp_delta=1e-5,
                       dp_noise_multiplier=1.1)
    assert train.to_record() == {"num-examples": 12, "train-loss": 0.4, "train-steps": 2, "epsilon": 1.5,
                                 "dp-delta": 1e-5, "dp-noise-multiplier": 1.1}
    assert TrainReply.from_record(train.to_record()) == train
    evaluation = EvaluateReply(num_examples=5, eval_loss=0.3, dice=0.8, dice_intersection=4.0,
                               dice_predicted=5.0, dice_truth=5.0)
    assert EvaluateReply.from_record(evaluation.to_record()) == evaluation
    assert evaluation.counts is not None and evaluation.counts.dice == pytest.approx(0.8)
    facts = SiteFacts("hospital-a", MANIFEST, {"slices": 40, "vendors": {"GE": 2}})
    assert set(facts.to_record()) == {"site-name", "manifest-sha256", "input-stats"}
    assert SiteFacts.from_record(facts.to_record()) == facts
    assert NUM_EXAMPLES == "num-examples"


def test_metrics_a_policy_keeps_at_the_site_are_optional() -> None:
    """[metrics] allowed = ["num-examples", "dice"]: no loss, no voxel counts."""
    only = EvaluateReply.from_record({"num-examples": 7, "dice": 0.6})
    assert only.counts is None and only.eval_loss is None
    assert TrainReply.from_record({"num-examples": 7}).train_loss is None


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({}, "'num-examples' missing or not a number: None"),
        ({"num-examples": "many"}, "'num-examples' missing or not a number: 'many'"),
        ({"num-examples": 0}, "'num-examples' must be finite and > 0, got 0"),
        ({"num-examples": 2.5}, "'num-examples' must be a whole number, got 2.5"),
        ({"num-examples": 3, "epsilon": float("nan")}, "'epsilon' must be finite and >= 0, got nan"),
        ({"num-examples": 3, "train-loss": -1.0}, "'train-loss' must be finite and >= 0, got -1.0"),
        ({"num-examples": 3, "dp-delta": 2.0}, "'dp-delta' must be finite and in [0, 1], got 2.0"),
        ({"num-examples": 3, "pixels": 1.0}, "train metrics carry unknown key(s) ['pixels']"),
    ],
    ids=["missing", "text", "zero", "fraction", "nan", "negative", "delta", "unknown"],
)
def test_a_train_record_that_breaks_the_contract_names_the_key(record: dict, message: str) -> None:
    with pytest.raises(ReplyError) as info:
        TrainReply.from_record(record)
    assert str(info.value).startswith(message), info.value


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"num-examples": 3, "dice": 1.5}, "'dice' must be finite and in [0, 1], got 1.5"),
        ({"num-examples": 3, "dice-intersection": 9.0, "dice-predicted": 4.0, "dice-truth": 9.0},
         "'dice-intersection' 9.0 exceeds"),
    ],
)
def test_an_evaluate_record_that_breaks_the_contract_names_the_key(record: dict, message: str) -> None:
    with pytest.raises(ReplyError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        EvaluateReply.from_record(record)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"site-name": "St Mary's"}, "site name \"St Mary's\" is not valid"),
        ({"site-name": 7}, "site name 7 is not valid"),
        ({"site-name": "h", "manifest-sha256": "xyz"}, "'manifest-sha256' must be 64 lower-case hex digits"),
        ({"site-name": "h", "input-stats": "[1, 2]"}, "'input-stats' must be a JSON object"),
        ({"site-name": "h", "patient": "x"}, "site facts carry unknown key(s) ['patient']"),
    ],
)
def test_site_facts_that_break_the_contract_name_the_key(record: dict, message: str) -> None:
    with pytest.raises(ReplyError) as info:
        SiteFacts.from_record(record)
    assert str(info.value).startswith(message), info.value


@pytest.mark.adversarial
def test_the_validating_strategy_refuses_contract_breaches_per_site_and_aggregates_the_rest() -> None:
    inner, rejected = Recording(), []
    strategy = ValidatingStrategy(inner, on_reject=lambda r, s, m: rejected.append((s, m)))
    sent = _round(strategy, "train")
    replies = [
        _reply(sent[0], 0, {"num-examples": 10}),
        _reply(sent[1], 1, {"num-examples": 10, "dice-of-patient-7": 0.9}),
        _reply(sent[2], 2, {"num-examples": 10}, facts={"site-name": "../etc", "manifest-sha256": ""}),
        _reply(sent[3], 3, {"num-examples": 10, "epsilon": float("inf")}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and inner.train_seen == [[replies[0]]]
    assert rejected == [
        ("site-1", "malformed: train metrics carry unknown key(s) ['dice-of-patient-7']; known: "
                   "['dp-delta', 'dp-noise-multiplier', 'epsilon', 'num-examples', 'train-loss', 'train-steps']"),
        (f"node-{sent[2].metadata.dst_node_id}", "malformed: site name '../etc' is not valid: use 1-64 "
                                                  "letters, digits, '.', '_' or '-', starting with a letter or digit"),
        ("site-3", "malformed: 'epsilon' must be finite and >= 0, got inf"),
    ]


@pytest.mark.adversarial
def test_a_bad_evaluate_reply_is_refused_and_counted_not_summarised() -> None:
    inner, rejected, reported = Recording(), [], []
    chain = SiteReportingStrategy(
        ValidatingStrategy(inner, on_reject_evaluate=lambda r, s, m: rejected.append((s, m))),
        lambda phase, rnd, sites, errors: reported.extend(sites),
    )
    sent = _round(chain, "evaluate", nodes=3)
    good = {"num-examples": 4, "dice": 0.5, "dice-intersection": 2.0, "dice-predicted": 4.0, "dice-truth": 4.0}
    replies = [
        _reply(sent[0], 0, good, train=False),
        _reply(sent[1], 1, {"num-examples": 4, "dice": 0.7}, train=False),  # the policy kept the counts
        _reply(sent[2], 2, {**good, "dice": 99.0}, train=False),
    ]
    chain.aggregate_evaluate(1, replies)
    assert rejected == [("site-2", "malformed: 'dice' must be finite and in [0, 1], got 99.0")]
    assert inner.evaluate_seen == [replies[:2]]
    assert [s.site for s in reported] == ["site-0", "site-1"]
    summary = summarize_evaluation(reported)
    assert summary["dice_min"] == pytest.approx(0.5)
    assert "dice_pooled" not in summary  # site-1 kept its voxel counts: no pool of site-0 alone


def test_the_one_reader_checks_the_records_of_a_reply() -> None:
    sent = _round(ValidatingStrategy(Recording()), "train", nodes=2)
    reply = _reply(sent[0], 0, {"num-examples": 3, "train-loss": 0.2})
    parsed = read_reply(reply, "train")
    assert parsed.site == "site-0" and parsed.metrics == TrainReply(num_examples=3, train_loss=0.2)
    assert parsed.facts is not None and parsed.facts.manifest_sha256 == MANIFEST and parsed.arrays is not None
    with pytest.raises(ReplyError, match="an evaluate reply carries no weights"):
        read_reply(reply, "evaluate")
    reply.content["extra"] = ConfigRecord({"note": "x"})
    with pytest.raises(ReplyError, match=r"unexpected ConfigRecord\(s\) \['extra'\]"):
        read_reply(reply, "train")
    anonymous = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3}), "arrays": _arrays(0.1, 1)}),
                        reply_to=sent[1])
    assert read_reply(anonymous, "train").site == claimed_site(anonymous) == f"node-{sent[1].metadata.dst_node_id}"


def test_sites_whose_policies_keep_different_metrics_still_aggregate() -> None:
    """Flower refuses MetricRecords with different keys; the wrapper cuts them to the common ones."""
    inner, rejected, reported = Recording(), [], []
    chain = SiteReportingStrategy(ValidatingStrategy(inner, on_reject=lambda r, s, m: rejected.append(m)),
                                  lambda phase, rnd, sites, errors: reported.extend(sites))
    sent = _round(chain, "train", nodes=2)
    replies = [_reply(sent[0], 0, {"num-examples": 10, "train-loss": 0.3}), _reply(sent[1], 1, {"num-examples": 30})]
    arrays, metrics = chain.aggregate_train(1, replies)
    assert arrays is not None and rejected == [] and "train-loss" not in metrics
    assert reported[0].train().train_loss == pytest.approx(0.3)  # the reports read the full record
