"""Moving the ``champion`` alias: gated promotion, forced promotion, rollback, publish-time promotion.

Every move is recorded in the champion history (:mod:`registry.history`) and on the promoted
version's tags (``promoted_at``, ``promoted_by``, and ``forced_reason`` when forced).

Every version the alias moves to, and the champion the gates compare with, is first checked
against its signed evidence (:func:`registry.evidence.verify_version`): the gates read the tags
that were signed, never an edited one, and a re-registered artifact is refused. ``force`` lets an
operator past failed gates, never past a candidate's evidence (only past a champion's, since the
comparison it spoils is then moot).
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mlflow.exceptions import MlflowException

from .errors import ModelNotFoundError, ModelSignatureError, PromotionRefusedError
from .evidence import verify_version
from .gates import GateConfig, GateResult, VersionFacts, default_gates, evaluate_gates
from .history import append_history, champion_chain, read_history
from .publish import CHAMPION, DECISION_METRIC
from .store import RegistryStore

__all__ = ["PromotionResult", "promote", "rollback", "auto_promote", "default_gates"]


@dataclass(frozen=True)
class PromotionResult:
    """What a promotion or rollback did.

    Attributes
    ----------
    name : str
        Registered model.
    version : int
        The champion now.
    previous : int or None
        The champion before (None when there was none).
    action : str
        ``"promote"``, ``"auto"`` or ``"rollback"``.
    forced : bool
        Whether ``force`` was given.
    gates : tuple[GateResult, ...]
        The gate verdicts (empty for a rollback).
    entry : dict
        The history entry that was appended.
    """

    name: str
    version: int
    previous: int | None
    action: str
    forced: bool
    gates: tuple[GateResult, ...] = ()
    entry: dict[str, Any] = field(default_factory=dict)

    @property
    def failed_gates(self) -> tuple[GateResult, ...]:
        return tuple(g for g in self.gates if not g.passed)


def promote(
    store: RegistryStore,
    name: str,
    version: int,
    *,
    gates: GateConfig,
    force: bool = False,
    reason: str | None = None,
    actor: str | None = None,
) -> PromotionResult:
    """Make ``version`` the champion of ``name`` if it passes ``gates`` (or ``force`` is given).

    Parameters
    ----------
    store : RegistryStore
        Where the registry lives.
    name : str
        Registered model.
    version : int
        Candidate version.
    gates : GateConfig
        Thresholds, evaluated against the current champion.
    force : bool
        Promote even when gates fail; requires ``reason``.
    reason : str, optional
        Why; required with ``force``, recorded in the history either way.
    actor : str, optional
        Who; defaults to the login name (:func:`getpass.getuser`).

    Returns
    -------
    PromotionResult

    Raises
    ------
    PromotionRefusedError
        A gate failed (the message names every failed gate and its detail; the error's
        ``failed`` attribute holds the failed :class:`GateResult` objects), ``force`` without a
        reason, or ``version`` is already the champion.
    EvidenceError
        The candidate does not match its signed evidence (even with ``force``), or the champion
        it is compared with does not (without ``force``); the message names each difference.
    ModelNotFoundError
        No such model or version.
    """
    if force and not (reason and reason.strip()):
        raise PromotionRefusedError(
            f"refusing to force {name} v{version} to {CHAMPION} without a reason: give --reason"
        )
    client = store.client()
    champion = _champion_version(store, name)  # first: an unknown model is named as such
    if champion is not None and champion == int(version):
        raise PromotionRefusedError(f"{name} v{version} is already the {CHAMPION}")
    refused = f"refused to promote {name} v{version} to {CHAMPION}"
    candidate = _facts(store, name, version, refused=refused)
    current = None
    if champion is not None:
        try:
            current = _facts(store, name, champion)
        except ModelSignatureError as exc:
            if not force:
                raise type(exc)(
                    f"{refused}: the gates compare with the champion v{champion}, whose evidence "
                    f"does not hold ({exc}); promote with --force and a reason to replace it"
                ) from None
            current = _facts(store, name, champion, verify=False)
    results = evaluate_gates(candidate, current, gates)
    failed = [r for r in results if not r.passed]
    if failed and not force:
        listed = "; ".join(f"{r.name}: {r.detail}" for r in failed)
        refusal = PromotionRefusedError(
            f"refused to promote {name} v{version} to {CHAMPION}: "
            f"failed gate(s) {', '.join(r.name for r in failed)} ({listed})"
        )
        refusal.failed = tuple(failed)  # type: ignore[attr-defined]
        raise refusal
    entry = _move_alias(
        store, name, candidate.version, champion, "promote", actor, reason, force, results, gates
    )
    if force:
        client.set_model_version_tag(name, str(candidate.version), "forced_reason", reason.strip())  # type: ignore[union-attr]
    return PromotionResult(
        name, candidate.version, entry["previous"], "promote", force, tuple(results), entry
    )


def rollback(
    store: RegistryStore, name: str, *, actor: str | None = None, reason: str | None = None
) -> PromotionResult:
    """Return ``champion`` to the champion before the current one, as the history records it.

    Repeated rollbacks walk further back. No gates are evaluated: a rollback restores a model
    that was champion before.

    Raises
    ------
    PromotionRefusedError
        No champion, no history, no earlier champion, the alias was moved outside fedseg (the
        history does not end at the current champion), or the earlier version no longer exists.
    EvidenceError
        The earlier version does not match its signed evidence.
    ModelNotFoundError
        No such model.
    """
    entries = read_history(store, name)
    current = _champion_version(store, name)  # not verified: it is what is left
    if current is None:
        raise PromotionRefusedError(f"{name} has no {CHAMPION}; nothing to roll back")
    if not entries:
        raise PromotionRefusedError(
            f"{name} has no champion history; nothing to roll back to (champion is v{current})"
        )
    chain = champion_chain(entries)
    if chain[-1] != current:
        raise PromotionRefusedError(
            f"{name}'s {CHAMPION} is v{current} but its history ends at v{chain[-1]} "
            "(the alias was moved outside fedseg); promote explicitly instead"
        )
    if len(chain) < 2:
        raise PromotionRefusedError(
            f"{name} has no earlier champion to roll back to (champion is v{current})"
        )
    target = chain[-2]
    # refuse clearly when the earlier version was deleted, edited or is not what was signed
    _facts(store, name, target, refused=f"refused to roll {name} back to v{target}")
    entry = _move_alias(store, name, target, current, "rollback", actor, reason, False, [], None)
    who, when = entry["actor"], entry["time"]
    client = store.client()
    client.set_model_version_tag(name, str(current), "rolled_back_at", when)
    client.set_model_version_tag(name, str(current), "rolled_back_by", who)
    return PromotionResult(name, target, current, "rollback", False, (), entry)


def auto_promote(
    store: RegistryStore, name: str, version: int, gates: GateConfig
) -> tuple[bool, str]:
    """Publish-time promotion: gates pass and (no champion, or ``dice_pooled`` beats it).

    Never raises for a failed gate or evidence that does not hold (the candidate's or the
    champion's); the champion then stays and the reason says why. When either version lacks
    ``dice_pooled`` (a site sent no voxel counts), nothing is compared and the champion stays:
    the reason names the sites.

    Returns
    -------
    tuple[bool, str]
        Whether ``version`` became the champion, and why (or why not).
    """
    champion = _champion_version(store, name)
    stays = f"champion stays v{champion}" if champion is not None else "no champion set"
    try:
        candidate = _facts(store, name, version)
        current = None if champion is None else _facts(store, name, champion)
    except ModelSignatureError as exc:
        return False, f"{exc}; {stays}"
    results = evaluate_gates(candidate, current, gates)
    failed = [r for r in results if not r.passed]
    if failed:
        listed = "; ".join(f"{r.name}: {r.detail}" for r in failed)
        return False, f"failed gate(s) {', '.join(r.name for r in failed)} ({listed}); {stays}"
    new = candidate.dice_pooled
    if current is None:
        why = "no champion yet"
    elif new is None or current.dice_pooled is None:  # no comparison without both: none invented
        gap = candidate.pooled_dice_gap() or current.pooled_dice_gap().replace(
            f"v{current.version}", f"champion v{current.version}", 1)
        return False, (f"cannot compare with champion v{current.version}: {gap}; {stays} "
                       "(an operator may promote it with `fedseg registry promote`)")
    elif new > current.dice_pooled:
        why = f"{DECISION_METRIC} {new:.4f} beats champion v{current.version} ({current.dice_pooled:.4f})"
    else:
        return False, (
            f"{DECISION_METRIC} {new:.4f} does not beat champion "
            f"v{current.version} ({current.dice_pooled:.4f})"
        )
    _move_alias(store, name, candidate.version, champion, "auto", None, why, False, results, gates)
    return True, why


def _move_alias(
    store: RegistryStore,
    name: str,
    version: int,
    previous: int | None,
    action: str,
    actor: str | None,
    reason: str | None,
    forced: bool,
    results: list[GateResult],
    gates: GateConfig | None,
) -> dict[str, Any]:
    client = store.client()
    who = actor or _login()
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    client.set_registered_model_alias(name, CHAMPION, str(version))
    entry: dict[str, Any] = {
        "action": action,
        "version": version,
        "previous": previous,
        "time": when,
        "actor": who,
        "reason": reason,
        "forced": forced,
        "gates": [r.to_dict() for r in results],
    }
    if gates is not None:
        entry["gate_config"] = gates.to_dict()
    append_history(store, name, entry)
    if action != "rollback":
        client.set_model_version_tag(name, str(version), "promoted_at", when)
        client.set_model_version_tag(name, str(version), "promoted_by", who)
    return entry


def _facts(
    store: RegistryStore, name: str, version: int, *, refused: str = "", verify: bool = True
) -> VersionFacts:
    """The gates' facts from the tags the evidence signed (``refused`` prefixes a refusal)."""
    try:
        mv = store.client().get_model_version(name, str(int(version)))
    except MlflowException as exc:
        raise ModelNotFoundError(f"models:/{name}/{version} is not in the registry at {store.tracking_uri}") from exc
    if not verify:
        return VersionFacts.from_tags(int(mv.version), dict(mv.tags))
    try:
        verified = verify_version(store, name, int(mv.version), model_version=mv)
    except ModelSignatureError as exc:
        if not refused:
            raise
        raise type(exc)(f"{refused}: {exc}") from None
    return VersionFacts.from_tags(verified.version, verified.tags)


def _champion_version(store: RegistryStore, name: str) -> int | None:
    try:
        model = store.client().get_registered_model(name)
    except MlflowException as exc:
        raise ModelNotFoundError(f"no registered model {name!r} at {store.tracking_uri}") from exc
    version = (model.aliases or {}).get(CHAMPION)
    return None if version is None else int(version)


def _login() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (e.g. a container without a passwd entry)
        return "unknown"
