"""ValidatingStrategy: malformed, poisoned, duplicated and stale updates never reach the strategy."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from local_grid import LocalGrid

from aggregation import ValidatingStrategy
from aggregation.validation import arrays_digest, non_finite_keys, schema_of, schema_problems

SHAPES = {"conv.weight": (2, 3), "conv.bias": (2,)}


def _arrays(scale: float = 0.0, seed: int = 0, **override: np.ndarray) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    values = {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
    values.update(override)
    return ArrayRecord({k: Array(v) for k, v in values.items() if v is not None})


class Recording(FedAvg):
    """Flower's FedAvg, remembering what it was asked to aggregate."""

    def __init__(self) -> None:
        super().__init__(min_train_nodes=2, min_available_nodes=2)
        self.seen: list[list[Message]] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        replies = list(replies)
        self.seen.append(replies)
        return super().aggregate_train(server_round, replies)


class Round:
    """One round: instructions from the wrapper, replies as sites would send them."""

    def __init__(self, strategy: ValidatingStrategy, server_round: int = 1, nodes: int = 5) -> None:
        grid = LocalGrid(None, nodes)  # type: ignore[arg-type]  # only sampling is used
        self.global_arrays = _arrays(0.0)
        messages = strategy.configure_train(server_round, self.global_arrays, ConfigRecord(), grid)
        self.instructions = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        for m in self.instructions:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the grid does on push

    def reply(self, k: int, arrays: ArrayRecord | None = None, examples: float = 10, site: str | None = None) -> Message:
        content = RecordDict({
            "arrays": arrays if arrays is not None else _arrays(0.1, seed=k),
            "metrics": MetricRecord({"num-examples": examples}),
            "site": ConfigRecord({"site-name": site or f"site-{k}"}),
        })
        return Message(content, reply_to=self.instructions[k])

    def clean(self) -> list[Message]:
        return [self.reply(k) for k in range(len(self.instructions))]


@pytest.fixture
def setup() -> tuple[ValidatingStrategy, Recording, list[tuple[int, str, str]]]:
    inner = Recording()
    rejected: list[tuple[int, str, str]] = []
    return ValidatingStrategy(inner, on_reject=lambda r, s, m: rejected.append((r, s, m))), inner, rejected


def test_clean_replies_pass_unchanged(setup) -> None:  # noqa: ANN001
    strategy, inner, rejected = setup
    rnd = Round(strategy)
    assert {m.metadata.group_id for m in rnd.instructions} == {"1"}
    replies = rnd.clean()
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert rejected == [] and strategy.rejections == []
    (seen,) = inner.seen
    assert len(seen) == 5 and all(a is b for a, b in zip(seen, replies, strict=True))
    expected = np.mean([r.content["arrays"]["conv.weight"].numpy() for r in replies], axis=0)
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), expected, atol=1e-6)
    assert metrics is not None


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda: _arrays(0.1, seed=9, **{"conv.bias": np.array([np.nan, 0.0], dtype=np.float32)}),
         "non-finite: 1 NaN/inf value(s) in 'conv.bias'"),
        (lambda: _arrays(0.1, seed=9, **{"conv.weight": np.zeros((3, 2), dtype=np.float32)}),
         "schema: 'conv.weight' has shape (3, 2), expected (2, 3)"),
        (lambda: _arrays(0.1, seed=9, **{"conv.bias": np.zeros(2, dtype=np.float64)}),
         "schema: 'conv.bias' has dtype float64, expected float32"),
        (lambda: _arrays(0.1, seed=9, **{"conv.bias": None}), "schema: missing key(s) 'conv.bias'"),
        (lambda: _arrays(0.1, seed=9, extra=np.zeros(1, dtype=np.float32)), "schema: unexpected key(s) 'extra'"),
        (lambda: _arrays(10.0, seed=2), "norm: update norm"),
    ],
    ids=["nan", "shape", "dtype", "missing-key", "extra-key", "norm-x100"],
)
def test_a_bad_reply_is_rejected_with_its_reason(setup, bad, reason: str) -> None:  # noqa: ANN001
    strategy, inner, rejected = setup
    rnd = Round(strategy)
    replies = rnd.clean()
    replies[2] = rnd.reply(2, bad())
    strategy.aggregate_train(1, replies)
    assert len(rejected) == 1
    server_round, site, message = rejected[0]
    assert (server_round, site) == (1, "site-2")
    assert message.startswith(reason), message
    assert strategy.rejections[0].node_id == rnd.instructions[2].metadata.dst_node_id
    (seen,) = inner.seen
    assert replies[2] not in seen and len(seen) == 4


def test_norm_outlier_reason_names_the_bound(setup) -> None:  # noqa: ANN001
    strategy, _, rejected = setup
    rnd = Round(strategy)
    replies = rnd.clean()
    replies[4] = rnd.reply(4, _arrays(0.1 * 100, seed=4))  # the same direction, x100
    strategy.aggregate_train(1, replies)
    ((_, _, message),) = rejected
    assert "exceeds 10 x the round's median" in message


def test_norm_bound_needs_three_replies(setup) -> None:  # noqa: ANN001
    strategy, inner, rejected = setup
    rnd = Round(strategy, nodes=2)
    replies = [rnd.reply(0), rnd.reply(1, _arrays(100.0, seed=1))]
    strategy.aggregate_train(1, replies)
    assert rejected == [] and len(inner.seen[0]) == 2


def test_a_node_replying_twice_is_rejected_both_times(setup) -> None:  # noqa: ANN001
    strategy, inner, rejected = setup
    rnd = Round(strategy)
    replies = rnd.clean() + [rnd.reply(1, _arrays(0.1, seed=77))]
    strategy.aggregate_train(1, replies)
    node = rnd.instructions[1].metadata.dst_node_id
    assert [m for _, _, m in rejected] == [f"duplicate: node {node} replied 2 times in round 1"] * 2
    assert len(inner.seen[0]) == 4


def test_byte_identical_updates_from_two_nodes_are_rejected(setup) -> None:  # noqa: ANN001
    strategy, inner, rejected = setup
    rnd = Round(strategy)
    replies = rnd.clean()
    replies[3] = rnd.reply(3, _arrays(0.1, seed=0))  # a copy of site-0's update
    strategy.aggregate_train(1, replies)
    assert sorted(s for _, s, _ in rejected) == ["site-0", "site-3"]
    assert all(m.startswith("duplicate: arrays byte-identical") for _, _, m in rejected)
    assert len(inner.seen[0]) == 3


def test_a_stale_reply_from_an_earlier_round_is_rejected(setup) -> None:  # noqa: ANN001
    strategy, inner, rejected = setup
    old = Round(strategy, server_round=1)
    late = old.reply(0)
    new = Round(strategy, server_round=2)
    replies = [new.reply(k) for k in range(1, 5)] + [late]
    strategy.aggregate_train(2, replies)
    ((server_round, site, message),) = rejected
    assert (server_round, site) == (2, "site-0")
    assert message == "stale: reply carries group_id '1', this is round 2"
    assert late not in inner.seen[0]


def test_a_reply_to_an_unknown_message_is_stale(setup) -> None:  # noqa: ANN001
    strategy, _, rejected = setup
    rnd = Round(strategy)
    replies = rnd.clean()
    replies[0].metadata.__dict__["_reply_to_message_id"] = "not-sent"
    strategy.aggregate_train(1, replies)
    ((_, _, message),) = rejected
    assert message.startswith("stale: reply answers message 'not-sent'")


def test_a_bad_weight_is_rejected(setup) -> None:  # noqa: ANN001
    strategy, _, rejected = setup
    rnd = Round(strategy)
    replies = rnd.clean()
    replies[1] = rnd.reply(1, examples=0)
    strategy.aggregate_train(1, replies)
    ((_, _, message),) = rejected
    assert message == "malformed: 'num-examples' must be finite and > 0, got 0"


def test_when_every_reply_is_rejected_nothing_is_aggregated(setup) -> None:  # noqa: ANN001
    strategy, inner, rejected = setup
    rnd = Round(strategy, nodes=2)
    nan = _arrays(0.1, **{"conv.bias": np.array([np.inf, 0.0], dtype=np.float32)})
    assert strategy.aggregate_train(1, [rnd.reply(0, nan), rnd.reply(1, nan)]) == (None, None)
    assert inner.seen == [] and len(rejected) == 2


def test_an_explicit_schema_wins_over_the_sent_arrays() -> None:
    expected = {"conv.weight": ((2, 3), "float32"), "conv.bias": ((2,), "float32"), "extra": ((1,), "float32")}
    rejected: list[str] = []
    strategy = ValidatingStrategy(Recording(), expected, on_reject=lambda r, s, m: rejected.append(m))
    rnd = Round(strategy, nodes=2)
    strategy.aggregate_train(1, rnd.clean())
    assert rejected == ["schema: missing key(s) 'extra'"] * 2


def test_pure_helpers() -> None:
    record = _arrays(1.0, **{"conv.bias": np.array([np.nan, np.inf], dtype=np.float32)})
    assert non_finite_keys(record) == {"conv.bias": 2}
    assert schema_of(record) == {"conv.weight": ((2, 3), "float32"), "conv.bias": ((2,), "float32")}
    assert schema_problems(record, schema_of(record)) == []
    assert arrays_digest(_arrays(1.0, seed=3)) == arrays_digest(_arrays(1.0, seed=3))
    assert arrays_digest(_arrays(1.0, seed=3)) != arrays_digest(_arrays(1.0, seed=4))
    with pytest.raises(ValueError, match="norm_factor must be > 1"):
        ValidatingStrategy(FedAvg(), norm_factor=1.0)


def test_fedadam_float64_rounds_keep_the_initial_schema() -> None:
    """Flower's FedAdam promotes float32 replies to float64; sites still answer float32."""
    from aggregation import StrategySettings, build_strategy

    rejected: list[str] = []
    strategy = ValidatingStrategy(build_strategy(StrategySettings(name="fedadam", min_sites=3)),
                                  on_reject=lambda r, s, m: rejected.append(m))
    first = Round(strategy, server_round=1, nodes=3)
    arrays, _ = strategy.aggregate_train(1, first.clean())
    assert arrays["conv.weight"].dtype == "float64"
    grid = LocalGrid(None, 3)  # type: ignore[arg-type]
    second = sorted(strategy.configure_train(2, arrays, ConfigRecord(), grid), key=lambda m: m.metadata.dst_node_id)
    replies = [
        Message(RecordDict({"arrays": _arrays(0.1, seed=k), "metrics": MetricRecord({"num-examples": 10})}),
                reply_to=m)
        for k, m in enumerate(second)
    ]
    assert strategy.aggregate_train(2, replies)[0] is not None
    assert rejected == []



def test_client_level_dp_voids_a_round_with_any_rejection() -> None:
    """With Flower's DP wrapper inside, dropping one site would weaken the reported guarantee."""
    inner = Recording()
    strict = ValidatingStrategy(inner, all_or_nothing=True)
    rnd = Round(strict)
    replies = rnd.clean()
    replies[2] = rnd.reply(2, _arrays(0.1, seed=9, **{"conv.bias": np.array([np.nan, 0.0], dtype=np.float32)}))
    assert strict.aggregate_train(1, replies) == (None, None)
    assert inner.seen == [] and len(strict.rejections) == 1
    rnd2 = Round(strict, server_round=2)
    arrays, _ = strict.aggregate_train(2, rnd2.clean())  # a clean round still aggregates
    assert arrays is not None and len(inner.seen) == 1


def test_aggregation_does_not_depend_on_the_order_replies_arrive_in() -> None:
    """Sites finish in any order; the aggregate (and so a whole run) must be reproducible."""
    strategy = ValidatingStrategy(Recording())
    rnd = Round(strategy)
    replies = [rnd.reply(k, _arrays(0.1, seed=k)) for k in range(5)]
    forward, _ = strategy.aggregate_train(1, list(replies))
    backward, _ = strategy.aggregate_train(1, list(reversed(replies)))
    for key in forward:
        assert forward[key].numpy().tobytes() == backward[key].numpy().tobytes()


def test_an_array_whose_bytes_hold_another_shape_than_declared_is_rejected(setup) -> None:  # noqa: ANN001
    """The schema check reads each Array's declaration, FedAvg its bytes: both must agree, or a
    single value would broadcast into a whole layer past every other check."""
    from flwr.app import Array

    strategy, inner, rejected = setup
    rnd = Round(strategy)
    replies = rnd.clean()
    scalar = Array(np.array([5.0], dtype=np.float32))
    forged = Array(dtype="float32", shape=(2,), stype=scalar.stype, data=scalar.data)
    replies[1] = rnd.reply(1, _arrays(0.1, seed=1, **{"conv.bias": None}))
    replies[1].content["arrays"]["conv.bias"] = forged
    strategy.aggregate_train(1, replies)
    ((_, site, message),) = rejected
    assert site == "site-1"
    assert message == "schema: 'conv.bias' holds shape (1,) float32 but declares (2,) float32"
    assert len(inner.seen[0]) == 4


@pytest.mark.parametrize(
    "values",
    [np.arange(6, dtype=np.float32).reshape(2, 3), np.float64(2.5), np.arange(4, dtype=np.int64),
     np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.arange(3, dtype=">f4"),
     np.zeros((0, 3), dtype=np.float32), np.array([True, False])],
    ids=["float32", "scalar", "int64", "fortran", "big-endian", "empty", "bool"],
)
def test_the_fast_decoder_gives_what_array_numpy_gives(values: np.ndarray) -> None:
    from flwr.app import Array

    from aggregation.arrays import decode_array

    array = Array(np.asarray(values))
    fast, slow = decode_array(array), array.numpy()
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)


def test_an_array_whose_bytes_do_not_decode_is_rejected_not_a_crash(setup) -> None:  # noqa: ANN001
    from flwr.app import Array

    strategy, inner, rejected = setup
    rnd = Round(strategy)
    replies = rnd.clean()
    good = replies[3].content["arrays"]["conv.bias"]
    replies[3].content["arrays"]["conv.bias"] = Array(dtype=good.dtype, shape=tuple(good.shape),
                                                      stype=good.stype, data=b"\x93NUMPY garbage")
    strategy.aggregate_train(1, replies)
    ((_, site, message),) = rejected
    assert site == "site-3" and message.startswith("malformed: array 'conv.bias' cannot be decoded")
    assert len(inner.seen[0]) == 4


def test_the_servers_full_chain_rejects_misshapen_replies_instead_of_crashing() -> None:
    """Site reporting computes update norms before validation runs: a reply of the wrong shape
    or with undecodable bytes must reach validation (and be refused), not break the round."""
    from flwr.app import Array

    from aggregation import SiteReportingStrategy

    inner, rejected, reported = Recording(), [], []
    chain = SiteReportingStrategy(
        ValidatingStrategy(inner, on_reject=lambda r, s, m: rejected.append((s, m))),
        lambda phase, rnd, sites, errors: reported.extend(sites),
    )
    rnd = Round(chain)
    replies = rnd.clean()
    replies[0] = rnd.reply(0, _arrays(0.1, seed=9, **{"conv.weight": np.zeros((3, 2), dtype=np.float32)}))
    good = replies[1].content["arrays"]["conv.bias"]
    replies[1].content["arrays"]["conv.bias"] = Array(dtype=good.dtype, shape=tuple(good.shape),
                                                      stype=good.stype, data=b"\x93NUMPY garbage")
    arrays, _ = chain.aggregate_train(1, replies)
    assert arrays is not None and len(inner.seen[0]) == 3
    assert [s for s, _ in rejected] == ["site-0", "site-1"]
    norms = {s.site: s.metrics.get("update-norm") for s in reported}
    assert norms["site-0"] is None and norms["site-1"] is None and norms["site-2"] > 0
