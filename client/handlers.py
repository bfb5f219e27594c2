"""The ClientApp's train and evaluate handlers, as plain functions of a Message.

Only weights and aggregate metrics leave: no pixel, no DICOM header, no identifier. Every message
is checked against the site's policy (``policy.toml``) before any data is read: the app, DP and
its floors and caps, a DP round's ledger (its hash chain against the anchors in the audit log)
and, last, the per-run count of messages that read data (``admitted``). Everything is recorded
in the site's audit log (run, round start, admission, data access, result, refusal or failure).
A failure raises; the ClientApp's edge (:func:`client.failures.failure_edge`) answers it with a
coded error reply, never with an exception's text.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from imaging.instructions import RoundInstructions
from imaging.replies import ARRAYS_RECORD, METRICS_RECORD, SITE_RECORD, EvaluateReply, SiteFacts, TrainReply
from imaging.model import load_state_dict, select_device
from imaging.site_data import SiteDataset
from imaging.training import EvalResult, autocast_dtype, evaluate, train_epochs

from .app_trust import AppIdentity, identify_app
from .audit import AuditLog
from .errors import NoPatientsError, PolicyError, PolicyViolation
from .ledger_anchor import site_ledger
from .local_norm import apply_local_norm, keep_local_norm
from .node_settings import NodeSettings
from .policy import SitePolicy, check_app, check_required_metrics, filter_metrics, load_policy
from .private_training import check_policy, check_spend, train_private_round
from .site import Site, SiteResolver

__all__ = ["handle", "open_site", "round_of"]

log = logging.getLogger("fedseg.client")

#: What a handler body returns: the reply and the metrics it carries (before the policy filter).
_Body = Callable[[Message, Site, NodeSettings, SitePolicy, AuditLog], tuple[Message, dict[str, Any]]]


def _admit(message: Message, audit: AuditLog, policy: SitePolicy, kind: str) -> None:
    """Count this message among the run's ``kind`` messages that read data; refuse it beyond the
    policy's cap (``max_rounds`` for train, ``max_evaluations`` for evaluate).

    The count lives in the audit log, so it holds across the fresh ClientApp process each
    message runs in, and counting and recording happen under one lock.
    """
    limit, key = ((policy.max_rounds, "max_rounds") if kind == "train"
                  else (policy.max_evaluations, "max_evaluations"))
    admitted = audit.append_if_fewer("admitted", {"run_id": str(message.metadata.run_id), "kind": kind},
                                     limit, round=_round(message))
    if admitted is None:
        raise PolicyViolation(
            f"site policy allows at most {limit} {kind} messages per run ([privacy] {key}); "
            "this run has had them all",
            rule=f"privacy.{key}",
        )


def _load(
    message: Message, site: Site, audit: AuditLog, policy: SitePolicy, kind: str,
    instructions: RoundInstructions | None = None,
) -> tuple[RoundInstructions, torch.nn.Module, SiteDataset]:
    """Admit the message (the last check before data), load the site's data, record the access.

    With ``local-norm``, a model received for training gets the site's own normalisation layers;
    one received for evaluation stays as it is (see :func:`_evaluate`).
    """
    if instructions is None:
        instructions = RoundInstructions.from_config(message.content["config"])
    _admit(message, audit, policy, kind)
    state = message.content["arrays"].to_torch_state_dict()
    net = load_state_dict(instructions.spec, state)
    if instructions.local_norm and kind == "train":  # FedBN: the site's own normalisation layers
        apply_local_norm(net, site.name, str(message.metadata.run_id))
    data = site.load_dataset(  # syncs the site's source (folder or PACS), then the cache
        instructions.spec, test_fraction=instructions.test_fraction, seed=instructions.seed
    )
    if data.problems:
        log.warning("site %s: %d file(s) or series not used, e.g. %s", site.name, len(data.problems),
                    data.problems[0].reason)
    _record_access(audit, message, kind, data)
    return instructions, net, data


def _reply(
    message: Message, site: Site, data: SiteDataset, metrics: dict[str, Any], net=None
) -> Message:
    """Weights (train only), aggregate metrics, and the site's aggregate input facts."""
    facts = SiteFacts(site.name, data.manifest_sha256, data.input_stats)
    content = RecordDict({METRICS_RECORD: MetricRecord(metrics), SITE_RECORD: ConfigRecord(facts.to_record())})
    if net is not None:
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        content[ARRAYS_RECORD] = ArrayRecord(state)
    return Message(content=content, reply_to=message)


def _record_access(audit: AuditLog, message: Message, kind: str, data: SiteDataset) -> None:
    """What was read: hashes and counts only (the manifest hashes every series UID)."""
    stats = data.input_stats
    audit.append("data-access", run_id=str(message.metadata.run_id), round=_round(message), kind=kind,
                 manifest_sha256=data.manifest_sha256, series=int(stats.get("series", 0)),
                 slices=int(stats.get("slices", 0)), train_slices=int(data.num_train),
                 test_slices=int(data.num_test), train_patients=int(data.train_patients),
                 test_patients=int(data.test_patients), unusable=len(data.problems))


def _round(message: Message) -> int:
    try:
        return int(message.content["config"].get("server-round", 0))
    except (KeyError, TypeError, ValueError):
        return 0


def _file_sha256(path) -> str:  # noqa: ANN001
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _open_run(message: Message, site: Site, audit: AuditLog, hashes: bool) -> AppIdentity:
    """The app identity of this run, recorded at the run's first message.

    The FAB is rebuilt for its hashes only when the policy restricts apps (``hashes``).
    """
    match = {"run_id": str(message.metadata.run_id)}
    record = audit.find("run", match)
    if record is None:
        app = identify_app(hashes=hashes)
        record = audit.append_once("run", match, site=site.name, app=app.to_record(),
                                   policy_file=str(site.policy_path),
                                   policy_sha256=_file_sha256(site.policy_path))
        record = record or audit.find("run", match) or {}
    app = AppIdentity.from_record(record.get("app", {}))
    if hashes and not (app.fab_sha256 or app.error):  # the policy changed during the run
        app = identify_app()
        audit.append("app-identified", run_id=match["run_id"], app=app.to_record())
    return app


def _guarded(message: Message, site: Site, node: NodeSettings, audit: AuditLog, where: dict[str, Any],
             body: _Body) -> Message:
    """Policy, then ``body``; the policy's metric filter on the way out. Raises on failure."""
    try:
        policy, policy_error = load_policy(site.policy_path), None
    except PolicyError as exc:  # raised below, after the run and round records
        policy, policy_error = SitePolicy(), exc
    app = _open_run(message, site, audit, hashes=policy.restricts_apps)
    audit.append("round-start", **where)
    if policy_error is not None:
        raise policy_error
    allowed_by = check_app(app, policy)
    check_required_metrics(policy)
    reply, metrics = body(message, site, node, policy, audit)
    kept, dropped = filter_metrics(metrics, policy)
    if dropped:
        reply.content[METRICS_RECORD] = MetricRecord(kept)
    audit.append("round-result", **where, app_allowed_by=allowed_by, metrics=kept, dropped_metrics=dropped)
    return reply


def _train(message: Message, site: Site, node: NodeSettings, policy: SitePolicy,
           audit: AuditLog) -> tuple[Message, dict[str, Any]]:
    instructions = RoundInstructions.from_config(message.content["config"])
    run_id = str(message.metadata.run_id)
    check_policy(instructions, policy)  # before touching any data
    ledger = None
    if instructions.dp:  # a deleted or rolled-back ledger is refused here, before any data
        ledger = site_ledger(site, audit)
        check_spend(ledger, policy, run_id)
    instructions, net, data = _load(message, site, audit, policy, "train", instructions)
    if data.num_train == 0:
        raise NoPatientsError(f"site {site.name} has no training patients after the split",
                              role="training", patients=data.train_patients + data.test_patients)
    device = select_device(node.device)
    if ledger is not None:  # float32 only: see imaging.training.autocast_dtype
        dp = train_private_round(
            net, data.train_images, data.train_masks, instructions=instructions, site=site,
            policy=policy, ledger=ledger, run_id=run_id, device=device,
        )
        metrics = TrainReply(num_examples=dp.num_examples, train_loss=dp.loss, train_steps=dp.steps,
                             epsilon=dp.epsilon, dp_delta=dp.delta,
                             dp_noise_multiplier=dp.noise_multiplier).to_record()
        if instructions.local_norm:
            keep_local_norm(net, site.name, str(message.metadata.run_id))
        return _reply(message, site, data, metrics, net=net), metrics
    seed = instructions.seed * 1009 + instructions.server_round
    torch.manual_seed(seed)
    result = train_epochs(
        net,
        data.train_images,
        data.train_masks,
        epochs=instructions.local_epochs,
        batch_size=instructions.batch_size,
        learning_rate=instructions.learning_rate,
        device=device,
        seed=seed,
        proximal_mu=instructions.proximal_mu,
        autocast=autocast_dtype(device, node.mixed_precision),
    )
    log.info("site %s round %d: loss %.4f on %d slices", site.name,
             instructions.server_round, result.loss, result.num_examples)
    metrics = TrainReply(num_examples=result.num_examples, train_loss=result.loss,
                         train_steps=result.steps).to_record()
    if instructions.local_norm:
        keep_local_norm(net, site.name, str(message.metadata.run_id))
    return _reply(message, site, data, metrics, net=net), metrics


def _evaluate(message: Message, site: Site, node: NodeSettings, policy: SitePolicy,
              audit: AuditLog) -> tuple[Message, dict[str, Any]]:
    """The received model's Dice; with ``local-norm``, the site's personalised variant's beside it.

    The received model is the one the coordinator publishes after the last round, so the
    unprefixed metrics are always its own, whatever ``local-norm`` says; the variant with the
    site's normalisation layers reports under ``local-norm-``.
    """
    instructions, net, data = _load(message, site, audit, policy, "evaluate")
    if data.num_test == 0:
        raise NoPatientsError(f"site {site.name} has no held-out patients (needs at least 2 patients)",
                              role="held-out", patients=data.train_patients + data.test_patients)
    device = select_device(node.device)

    def score() -> EvalResult:
        return evaluate(net, data.test_images, data.test_masks, device=device,
                        threshold=instructions.spec.threshold,
                        autocast=autocast_dtype(device, node.mixed_precision))

    result = score()
    reply = EvaluateReply.from_counts(result.num_examples, result.loss, result.counts)
    if instructions.local_norm and apply_local_norm(net, site.name, str(message.metadata.run_id)):
        personal = score()
        reply = reply.with_local_norm(personal.loss, personal.counts)
    metrics = reply.to_record()
    return _reply(message, site, data, metrics), metrics


_BODIES: dict[str, _Body] = {"train": _train, "evaluate": _evaluate}


def open_site(node_config: Mapping[str, Any], resolve_site: SiteResolver) -> tuple[Site, NodeSettings, AuditLog]:
    """The node's site, its execution settings and its audit log."""
    site = resolve_site(node_config)
    node = NodeSettings.from_node_config(node_config)
    return site, node, AuditLog(node.audit_file or site.audit_path)


def round_of(message: Message) -> int:
    """The message's ``server-round`` (0 when it has none)."""
    return _round(message)


def handle(kind: str, message: Message, node_config: Mapping[str, Any], resolve_site: SiteResolver) -> Message:
    """Run a ``train`` or ``evaluate`` message at the site whose ``resolve_site(node_config)`` it is.

    Raises on any failure: the ClientApp's edge (:func:`client.failures.failure_edge`, its
    outermost mod) answers it with a coded error reply, the full text in the site's log and audit log.
    """
    site, node, audit = open_site(node_config, resolve_site)
    where = {"run_id": str(message.metadata.run_id), "round": _round(message), "kind": kind}
    return _guarded(message, site, node, audit, where, _BODIES[kind])
