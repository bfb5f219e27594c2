"""What a site sends back each round: the typed form of its train and evaluate replies.

The counterpart of :class:`imaging.instructions.RoundInstructions`. A reply travels as Flower
records: the weights (train only), one MetricRecord of flat numbers (:class:`TrainReply` or
:class:`EvaluateReply`) and one ConfigRecord of the site's facts (:class:`SiteFacts`). The keys
are defined here once: a field ``num_examples`` travels as ``"num-examples"``. The ClientApp
builds replies with ``to_record``; the coordinator parses them with ``from_record``, which
refuses a missing required key, an unknown key or a value out of range with a
:class:`~imaging.errors.ReplyError` naming the key and the value.

Every metric but ``num-examples`` is optional: a site's policy (``[metrics] allowed``) may keep
any of them at the site.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Protocol, TypeVar

from .errors import ReplyError
from .metrics import DiceCounts

__all__ = [
    "ARRAYS_RECORD",
    "DICE_COUNT_KEYS",
    "METRICS_RECORD",
    "SITE_RECORD",
    "NUM_EXAMPLES",
    "SITE_NAME_PATTERN",
    "EvaluateReply",
    "ReplyStatement",
    "SiteFacts",
    "TrainReply",
    "arrays_digest",
    "check_site_name",
    "record_key",
]

#: The names of the records in a reply's RecordDict (what the ClientApp writes).
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
SITE_RECORD = "site"

#: A site name: it becomes part of MLflow metric keys (``site/<name>/train/...``) and lineage.
SITE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def record_key(name: str) -> str:
    """The key a field travels under: ``num_examples`` -> ``"num-examples"``."""
    return name.replace("_", "-")


#: FedAvg's weight: the number of samples (slices) a site trained or evaluated on.
NUM_EXAMPLES = record_key("num_examples")
#: The voxel counts a site sends beside its Dice; pooled Dice needs all three from every site.
DICE_COUNT_KEYS = tuple(record_key(n) for n in ("dice_intersection", "dice_predicted", "dice_truth"))


def check_site_name(name: object) -> str:
    """``name`` if it is a valid site name, else a :class:`ReplyError` saying what is allowed."""
    if not isinstance(name, str) or not SITE_NAME_PATTERN.match(name):
        raise ReplyError(
            f"site name {_shown(name)} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _shown(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut short: a reply's values come from a site and can be anything."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bound(*, whole: bool = False, low: float = 0.0, high: float = math.inf, above: bool = False) -> Any:
    """Field metadata: how ``from_record`` checks the value (all optional fields default to None)."""
    return field(default=None, metadata={"whole": whole, "low": low, "high": high, "above": above})


def _number(key: str, value: object, meta: Mapping[str, Any]) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyError(f"{key!r} missing or not a number: {_shown(value)}")
    low, high = meta["low"], meta["high"]
    if not math.isfinite(value) or value < low or value > high or (meta["above"] and value <= low):
        shown = f"> {low:g}" if meta["above"] else f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ReplyError(f"{key!r} must be finite and {shown}, got {value}")
    if meta["whole"]:
        if value != int(value):
            raise ReplyError(f"{key!r} must be a whole number, got {value}")
        return int(value)
    return float(value)


_M = TypeVar("_M", bound="_MetricReply")


@dataclass(frozen=True)
class _MetricReply:
    """Flat numeric metrics, one field per key; ``num_examples`` required, the rest optional."""

    kind: ClassVar[str] = "reply"
    num_examples: int = field(metadata={"whole": True, "low": 0.0, "high": math.inf, "above": True})

    @classmethod
    def keys(cls) -> frozenset[str]:
        return frozenset(record_key(f.name) for f in fields(cls))

    def to_record(self) -> dict[str, int | float]:
        """The MetricRecord's content; absent (``None``) metrics are left out."""
        return {record_key(f.name): getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_record(cls: type[_M], record: Mapping[str, Any]) -> _M:
        unknown = sorted(set(record) - cls.keys())
        if unknown:
            raise ReplyError(f"{cls.kind} metrics carry unknown key(s) {_shown(unknown)}; "
                             f"known: {sorted(cls.keys())}")
        values: dict[str, int | float] = {}
        for f in fields(cls):
            key = record_key(f.name)
            if key in record:
                values[f.name] = _number(key, record[key], f.metadata)
            elif f.name == "num_examples":
                raise ReplyError(f"{key!r} missing or not a number: None")
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrainReply(_MetricReply):
    """A train reply's metrics: samples trained on (FedAvg's weight), loss, and DP accounting."""

    kind: ClassVar[str] = "train"
    train_loss: float | None = _bound()
    train_steps: int | None = _bound(whole=True)
    epsilon: float | None = _bound()  # cumulative ε the site has spent in its budget scope (its data)
    dp_delta: float | None = _bound(high=1.0)
    dp_noise_multiplier: float | None = _bound()


@dataclass(frozen=True)
class EvaluateReply(_MetricReply):
    """An evaluate reply's metrics: held-out loss, Dice, and the voxel counts behind pooled Dice.

    The unprefixed fields are always the received model's (after the last round: the published
    model's). With ``local-norm`` the site adds its personalised variant's (its own normalisation
    layers) under ``local_norm_`` (keys ``local-norm-...``), beside them.
    """

    kind: ClassVar[str] = "evaluate"
    eval_loss: float | None = _bound()
    dice: float | None = _bound(high=1.0)
    dice_intersection: float | None = _bound()
    dice_predicted: float | None = _bound()
    dice_truth: float | None = _bound()
    local_norm_eval_loss: float | None = _bound()
    local_norm_dice: float | None = _bound(high=1.0)
    local_norm_dice_intersection: float | None = _bound()
    local_norm_dice_predicted: float | None = _bound()
    local_norm_dice_truth: float | None = _bound()

    def __post_init__(self) -> None:
        for prefix in ("", "local_norm_"):
            i, p, t = (getattr(self, f"{prefix}dice_{n}") for n in ("intersection", "predicted", "truth"))
            if i is not None and ((p is not None and i > p) or (t is not None and i > t)):
                key = record_key(prefix + "dice_")
                raise ReplyError(f"'{key}intersection' {i} exceeds '{key}predicted' {p} or '{key}truth' {t}")

    @classmethod
    def from_counts(cls, num_examples: int, loss: float, counts: DiceCounts) -> EvaluateReply:
        return cls(num_examples=num_examples, eval_loss=loss, dice=counts.dice,
                   dice_intersection=counts.intersection, dice_predicted=counts.predicted,
                   dice_truth=counts.truth)

    def with_local_norm(self, loss: float, counts: DiceCounts) -> EvaluateReply:
        """This reply plus the site's personalised variant's loss, Dice and counts."""
        return replace(self, local_norm_eval_loss=loss, local_norm_dice=counts.dice,
                       local_norm_dice_intersection=counts.intersection,
                       local_norm_dice_predicted=counts.predicted, local_norm_dice_truth=counts.truth)

    @property
    def counts(self) -> DiceCounts | None:
        """The voxel counts, when the site's policy let all three leave."""
        parts = (self.dice_intersection, self.dice_predicted, self.dice_truth)
        if any(v is None for v in parts):
            return None
        return DiceCounts(*parts)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SiteFacts:
    """Who sent a reply and what data it came from: aggregate facts, nothing identifying."""

    site_name: str
    manifest_sha256: str = ""  # SHA-256 over the site's hashed series list (imaging.site_stats)
    input_stats: Mapping[str, Any] = field(default_factory=dict)  # counts, percentiles, vendors
    signature: str = ""  # base64 ECDSA over the ReplyStatement, by the site's node key

    def __post_init__(self) -> None:
        check_site_name(self.site_name)

    @classmethod
    def keys(cls) -> frozenset[str]:
        return frozenset(record_key(f.name) for f in fields(cls))

    def to_record(self) -> dict[str, str]:
        record = {
            record_key("site_name"): self.site_name,
            record_key("manifest_sha256"): self.manifest_sha256,
            record_key("input_stats"): json.dumps(dict(self.input_stats), sort_keys=True),
        }
        if self.signature:
            record[record_key("signature")] = self.signature
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteFacts:
        unknown = sorted(set(record) - cls.keys())
        if unknown:
            raise ReplyError(f"site facts carry unknown key(s) {_shown(unknown)}; known: {sorted(cls.keys())}")
        name = record.get(record_key("site_name"))
        manifest = record.get(record_key("manifest_sha256"), "")
        if not isinstance(manifest, str) or (manifest and not _SHA256.match(manifest)):
            raise ReplyError(f"'manifest-sha256' must be 64 lower-case hex digits, got {_shown(manifest)}")
        stats_text = record.get(record_key("input_stats"), "{}") or "{}"
        try:
            stats = json.loads(stats_text) if isinstance(stats_text, str) else None
        except json.JSONDecodeError:
            stats = None
        if not isinstance(stats, dict):
            raise ReplyError("'input-stats' must be a JSON object")
        signature = record.get(record_key("signature"), "")
        if not isinstance(signature, str) or len(signature) > 512:
            raise ReplyError(f"'signature' must be a base64 string, got {_shown(signature)}")
        return cls(site_name=name, manifest_sha256=manifest, input_stats=stats, signature=signature)


class _Array(Protocol):
    dtype: str
    shape: Any
    data: bytes


def arrays_digest(record: Mapping[str, _Array]) -> str:
    """SHA-256 over every key, dtype, shape and serialized byte of a reply's ArrayRecord."""
    h = hashlib.sha256()
    for key in sorted(record.keys()):
        array = record[key]
        h.update(f"{key}\0{array.dtype}\0{tuple(array.shape)}\0".encode())
        h.update(array.data)
    return h.hexdigest()


@dataclass(frozen=True)
class ReplyStatement:
    """What a site signs with its node key in every reply, and the coordinator rebuilds to verify.

    It binds the claimed site name to this run, round, node and instruction, and to the sample
    count and the weights the reply carries: a reply cannot be re-sent under another name,
    replayed in another round, or altered after signing.
    """

    site: str
    run_id: int
    server_round: int
    phase: str  # "train" | "evaluate"
    node_id: int
    reply_to: str  # the instruction's message id
    num_examples: int
    arrays_sha256: str  # arrays_digest of the weights; "" for an evaluate reply
    manifest_sha256: str

    FORMAT: ClassVar[str] = "fedseg-reply/1"

    def to_bytes(self) -> bytes:
        return json.dumps({"format": self.FORMAT, **asdict(self)}, sort_keys=True,
                          separators=(",", ":")).encode()
