"""One federated run: initial model, Flower's round loop, tracking, publishing."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from aggregation import (
    AggregationError,
    QuorumStrategy,
    ResumingStrategy,
    RoundRetryStrategy,
    SiteIdentities,
    ScreeningStrategy,
    SiteMetrics,
    SiteReportingStrategy,
    UpdateScore,
    ValidatingStrategy,
    build_strategy,
    norm_parameter_names,
    restore_strategy_state,
    strategy_state,
    summarize_evaluation,
    trust_statement,
    uncounted_sites,
)
from imaging.model import build_unet
from privacy.enrolment import EnrolledSites, default_enrolment_dir
from privacy.errors import EnrolmentError
from registry import PublishedVersion, RegistryStore, TrackingRun, default_gates, publish_model

from .config import FederationConfig
from .errors import FederationError
from .journal import RoundCheckpoint, RunJournal, capture_rng, restore_rng
from .lineage import code_version, compact_json
from .screened_grid import ScreenedGrid

__all__ = ["FederationOutcome", "evaluation_lineage", "run_federation"]

log = logging.getLogger("fedseg.server")

#: Coordinator setting: refuse to run without enrolled sites instead of trusting self-reported names.
REQUIRE_ENROLMENT_ENV = "FEDSEG_REQUIRE_ENROLMENT"

Progress = Callable[[str], None]


@dataclass
class _RoundLog:
    """What each round reported, kept for lineage and for the final decision."""

    train_examples: dict[str, int] = field(default_factory=dict)
    manifests: dict[str, str] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)  # cumulative ε each site reported
    delta: dict[str, float] = field(default_factory=dict)  # the δ each site accounts at
    inputs: dict[str, dict] = field(default_factory=dict)
    last_evaluation: dict[str, float] = field(default_factory=dict)
    last_sites: list[SiteMetrics] = field(default_factory=list)
    failures: int = 0
    updated_rounds: list[int] = field(default_factory=list)  # rounds whose aggregation gave weights

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> _RoundLog:
        sites = [SiteMetrics(**s) for s in data.get("last_sites", [])]
        return cls(**{**data, "last_sites": sites})


@dataclass(frozen=True)
class FederationOutcome:
    run_id: str
    published: PublishedVersion
    metrics: dict[str, float]
    sites: dict[str, int]
    rounds_completed: tuple[int, ...] = ()
    resumed_after: int = 0  # the round a resumed run continued after; 0 for a fresh run


def _reporter(run: TrackingRun, state: _RoundLog, progress: Progress):
    def report(phase: str, server_round: int, sites: list[SiteMetrics], errors: list[str]) -> None:
        for reason in errors:
            progress(f"round {server_round} {phase}: site failed: {reason}")
        state.failures += len(errors)
        metrics: dict[str, float] = {f"{phase}/failed_sites": float(len(errors))}
        for s in sites:
            for key, value in s.metrics.items():
                metrics[f"site/{s.site}/{phase}/{key}"] = value
        if phase == "train":
            replies = [(s.site, s.train(), s.site_facts()) for s in sites]
            for site, reply, facts in replies:
                state.train_examples[site] = reply.num_examples
                if reply.epsilon is not None:
                    state.epsilon[site] = reply.epsilon
                if reply.dp_delta is not None:
                    state.delta[site] = reply.dp_delta
                if facts and facts.manifest_sha256:
                    state.manifests[site] = facts.manifest_sha256
                if facts:
                    state.inputs[site] = dict(facts.input_stats)
            losses = [r.train_loss for _, r, _ in replies if r.train_loss is not None]
        else:
            summary = summarize_evaluation(sites)
            metrics.update({f"eval/{k}": v for k, v in summary.items()})
            state.last_evaluation, state.last_sites = summary, sites
            per_site = "  ".join(f"{s.site}={_dice(s, float('nan')):.3f}" for s in sites)
            if summary:
                progress(
                    f"round {server_round}: Dice pooled {_pooled_text(summary, sites)}  "
                    f"mean {summary.get('dice_mean', float('nan')):.3f}  "
                    f"worst {summary.get('dice_min', float('nan')):.3f}  |  {per_site}"
                )
        run.log_metrics(metrics, step=server_round)

    return report


def _dp_lineage(config: FederationConfig, deltas: dict[str, float]) -> dict[str, object]:
    i, st = config.instructions, config.strategy
    dp: dict[str, object] = {"enabled": i.dp}
    if i.dp:
        # the largest δ any site accounts at is the guarantee's δ; each site's is kept too
        delta = max(deltas.values()) if deltas else (i.delta or "auto (< 1/N per site)")
        dp.update({"mechanism": "DP-SGD (Opacus, Poisson sampling)", "accountant": "rdp",
                   "max_grad_norm": i.max_grad_norm, "delta": delta, "delta_sites": deltas,
                   **({"target_epsilon": i.target_epsilon} if i.target_epsilon > 0
                      else {"noise_multiplier": i.noise_multiplier})})
    if st.client_dp:
        dp["client_level"] = {"mechanism": "Flower server-side fixed clipping",
                              "noise_multiplier": st.client_dp_noise, "clipping_norm": st.client_dp_clip}
    return dp


def _enrolled_sites() -> EnrolledSites:
    """The enrolled sites (:mod:`privacy.enrolment`); a file that does not verify stops the run,
    and so does an empty enrolment when ``FEDSEG_REQUIRE_ENROLMENT=1`` (fail closed)."""
    where = default_enrolment_dir()
    try:
        enrolled = EnrolledSites.load(where)
    except EnrolmentError as exc:
        raise FederationError(f"refusing to start: {exc}") from exc
    if not enrolled and os.environ.get(REQUIRE_ENROLMENT_ENV, "").strip().lower() in ("1", "true", "yes"):
        raise FederationError(f"refusing to start: {REQUIRE_ENROLMENT_ENV} is set but no site is enrolled "
                              f"in {where} (`fedseg pki enrol`)")
    return enrolled


def _dice(site: SiteMetrics, missing: float) -> float:
    dice = site.evaluation().dice
    return missing if dice is None else dice


def _pooled_text(summary: dict[str, float], sites: list[SiteMetrics]) -> str:
    if "dice_pooled" in summary:
        return f"{summary['dice_pooled']:.3f}"
    return f"n/a (no voxel counts from {', '.join(uncounted_sites(sites))})"


def evaluation_lineage(sites: list[SiteMetrics]) -> dict[str, str]:
    """What the last evaluation (that of the published weights) shows, as lineage tags.

    ``eval_sites``: each site's Dice of the published model (only the sites that sent one);
    ``eval_sites_uncounted``: the sites that sent no voxel counts, hence no pooled Dice;
    ``eval_sites_local_norm``: with ``local-norm``, each site's personalised variant's Dice.
    """
    replies = {s.site: s.evaluation() for s in sites}
    lineage = {
        "eval_sites": compact_json({site: round(r.dice, 6) for site, r in replies.items() if r.dice is not None}),
        "eval_sites_uncounted": compact_json(uncounted_sites(sites)),
    }
    personal = {site: round(r.local_norm_dice, 6) for site, r in replies.items() if r.local_norm_dice is not None}
    if personal:
        lineage["eval_sites_local_norm"] = compact_json(personal)
    return lineage


def input_reference(inputs: dict[str, dict]) -> dict[str, object]:
    """The training reference for drift: slice-weighted intensity percentiles, vendor totals."""
    weights = {site: float(v.get("slices", 0)) for site, v in inputs.items()}
    total = sum(weights.values())
    reference: dict[str, object] = {"sites": len(inputs), "slices": int(total)}
    if total > 0:
        for key in ("intensity_p01", "intensity_p50", "intensity_p99"):
            values = [(inputs[s][key], w) for s, w in weights.items() if key in inputs[s]]
            if values:
                reference[key] = round(sum(v * w for v, w in values) / sum(w for _, w in values), 3)
    vendors: dict[str, int] = {}
    for v in inputs.values():
        for name, count in (v.get("vendors") or {}).items():
            vendors[name] = vendors.get(name, 0) + int(count)
    reference["vendors"] = dict(sorted(vendors.items()))
    return reference


def _start(store: RegistryStore, config: FederationConfig, experiment: str,
           progress: Progress) -> tuple[TrackingRun, RunJournal, RoundCheckpoint | None]:
    """A fresh MLflow run and journal, or the journaled run named by ``resume-run``."""
    if not config.resume_run:
        run = TrackingRun.start(
            store, experiment, run_name=f"{config.model_name}-federated",
            tags={"fedseg.role": "coordinator", "fedseg.code_version": code_version()},
        )
        run.log_params(config.as_params())
        journal = RunJournal.create(run.run_id, run_config=config.run_config, num_rounds=config.num_rounds,
                                    model_name=config.model_name, strategy=config.strategy.name)
        return run, journal, None
    journal = RunJournal.open(config.resume_run)
    journal.check_resumable(config.run_config)
    checkpoint = journal.latest()
    after = checkpoint.server_round if checkpoint else 0
    journal.mark_resumed(after)
    run = TrackingRun.resume(store, journal.run_id)
    run.set_tags({"fedseg.resumed_after_round": str(after)})
    progress(f"resuming run {journal.run_id} after round {after} of {config.num_rounds}")
    return run, journal, checkpoint


def run_federation(
    grid: Grid,
    config: FederationConfig,
    store: RegistryStore,
    *,
    experiment: str = "fedseg",
    progress: Progress = log.info,
) -> FederationOutcome:
    """Run ``config.num_rounds`` rounds, log them to MLflow, publish the final global model.

    Every completed round is journaled (:mod:`server.journal`); with ``resume-run`` set, the
    run continues after the journal's last completed round instead of starting afresh.
    """
    grid = ScreenedGrid(grid)  # no site's free text past this point: fedseg failure codes only
    spec = config.instructions.spec
    default_gates()  # a malformed $FEDSEG_GATES_FILE stops the run before any round, not after
    enrolled = _enrolled_sites()  # so does an enrolment file that does not verify
    progress(f"site identities: {trust_statement(enrolled)}")
    torch.manual_seed(config.instructions.seed)
    initial = ArrayRecord(build_unet(spec).state_dict())
    dtypes = {k: v.dtype for k, v in initial.to_torch_state_dict().items()}
    run, journal, checkpoint = _start(store, config, experiment, progress)
    state = _RoundLog.from_json(checkpoint.round_log) if checkpoint else _RoundLog()
    done: list[int] = list(checkpoint.rounds_completed) if checkpoint else []
    after = checkpoint.server_round if checkpoint else 0
    final: dict[str, torch.Tensor] = dict(checkpoint.arrays) if checkpoint else {}

    def on_reject(server_round: int, site: str, reason: str) -> None:
        state.failures += 1
        progress(f"round {server_round}: rejected the update of {site}: {reason}")
        run.log_metrics({f"site/{site}/train/rejected": 1.0, "train/rejected_updates": 1.0}, step=server_round)

    def on_reject_evaluate(server_round: int, site: str, reason: str) -> None:
        state.failures += 1
        progress(f"round {server_round}: rejected the evaluation of {site}: {reason}")
        run.log_metrics({f"site/{site}/evaluate/rejected": 1.0, "evaluate/rejected_replies": 1.0},
                        step=server_round)

    def on_scores(server_round: int, scores: list[UpdateScore]) -> None:
        run.log_metrics({m: v for s in scores for m, v in (
            (f"site/{s.site}/train/screen_cosine", s.cosine),
            (f"site/{s.site}/train/screen_norm_ratio", s.norm_ratio))}, step=server_round)

    base = build_strategy(config.strategy)
    quorum = QuorumStrategy(base, config.strategy.min_sites, config.join_timeout)
    # with local-norm the sites' normalisation layers are their own: not part of a step
    local = (norm_parameter_names(initial.keys(), build_unet(spec))
             if config.instructions.local_norm else frozenset())
    screened = ScreeningStrategy(quorum, config.screen, on_reject, on_scores,
                                 all_or_nothing=config.strategy.client_dp, ignore_keys=local)
    validated = ValidatingStrategy(screened, expected=initial,
                                   norm_factor=config.update_norm_factor, on_reject=on_reject,
                                   on_reject_evaluate=on_reject_evaluate,
                                   identities=SiteIdentities(enrolled) if enrolled else None,
                                   max_weight_share=config.max_weight_share,
                                   all_or_nothing=config.strategy.client_dp)
    reporting = SiteReportingStrategy(validated, _reporter(run, state, progress), validated.unverified)
    retrying = RoundRetryStrategy(reporting, config.strategy.min_sites, config.round_retries,
                                  config.round_timeout)

    def on_round_end(server_round: int, arrays: ArrayRecord, updated: bool) -> None:
        nonlocal final
        final = arrays.to_torch_state_dict()  # as the strategy holds them (FedOpt: float64)
        done.append(server_round)
        if updated:
            state.updated_rounds.append(server_round)
        ledgers = {site: {"consortium": config.instructions.consortium, "model": config.model_name,
                          "epsilon": eps} for site, eps in state.epsilon.items()}
        journal.record_round(
            RoundCheckpoint(server_round, final, strategy_state(base), capture_rng(), state.to_json(),
                            sorted(done)),
            metrics=state.last_evaluation, site_ledgers=ledgers,
        )

    strategy = ResumingStrategy(retrying, on_round_end, completed_rounds=after)
    if checkpoint:
        initial = ArrayRecord(checkpoint.arrays)
        restore_strategy_state(base, checkpoint.strategy_state)
        restore_rng(checkpoint.rng)
    round_config = ConfigRecord(config.instructions.to_config())
    progress(f"federated run {run.run_id}: {config.num_rounds} rounds, strategy {config.strategy.name}")
    ok = False
    try:
        try:
            strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=config.num_rounds - after,
                timeout=config.round_timeout,
                train_config=round_config,
                evaluate_config=ConfigRecord(config.instructions.to_config()),
            )
        except AggregationError as exc:  # quorum not reached, a round below min-sites
            raise FederationError(str(exc)) from exc
        if not state.updated_rounds:
            raise FederationError(
                f"no round produced an update ({state.failures} site failures); nothing to publish"
            )
        if not state.last_evaluation:
            raise FederationError("no site returned an evaluation; refusing to publish an unevaluated model")
        # FedOpt strategies compute in float64: publish in the model's own dtypes
        final_state = {k: v.to(dtypes[k]) for k, v in final.items()}
        lineage = {
            "run_id": run.run_id,
            "rounds": str(config.num_rounds),
            "rounds_completed": str(len(state.updated_rounds)),
            "sites": compact_json(state.train_examples),
            "num_sites": str(len(state.train_examples)),
            "strategy": config.strategy.name,
            "strategy_params": compact_json({**config.strategy.params(),
                                             "update_norm_factor": config.update_norm_factor,
                                             **config.screen.params()}),
            "code_version": code_version(),
            "preprocessing": spec.to_json(),
            **evaluation_lineage(state.last_sites),
            "dp": compact_json(_dp_lineage(config, state.delta)),
            "secure_aggregation": "off",
            "site_identity": "enrolled" if enrolled else "self-reported",
            "site_manifests": compact_json(state.manifests),
            "site_inputs": compact_json(state.inputs),
            "input_reference": compact_json(input_reference(state.inputs)),
        }
        if after:
            lineage["resumed_after_round"] = str(after)
        if state.epsilon:
            lineage["epsilon_sites"] = compact_json({k: round(v, 4) for k, v in state.epsilon.items()})
        published = publish_model(
            store, run, config.model_name, final_state, spec, state.last_evaluation, lineage
        )
        run.set_tags({"fedseg.model_version": str(published.version)})
        progress(
            f"published {published.name} v{published.version}"
            f" ({'champion: ' if published.promoted else 'not promoted: '}{published.reason})"
        )
        journal.finish("completed", published_version=int(published.version))
        ok = True
        return FederationOutcome(run.run_id, published, dict(state.last_evaluation),
                                 dict(state.train_examples), tuple(sorted(done)), after)
    except BaseException as exc:
        if not ok and not isinstance(exc, KeyboardInterrupt):
            journal.finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        run.end(ok)
