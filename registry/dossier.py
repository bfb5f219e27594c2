"""The governance dossier of a registered version: Markdown, self-contained HTML and plots.

Eight sections, in this order (:data:`SECTION_TITLES`): identification; training hypotheses and
configuration; federated evaluation per site; bias by site and scanner vendor; privacy
statement; compliance checklist; update recommendations; comments. Facts come from the registry
(:func:`collect_facts`), judgements from :mod:`registry.dossier_checks`, layout from
:mod:`registry.dossier_doc`. Text that looks like a DICOM UID or a PatientName is reported by
the PHI check and redacted in what is written.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mlflow.exceptions import MlflowException

from imaging.replies import EvaluateReply, TrainReply

from .artifacts import dossier_artifact_dir
from .comments import Comment, add_comment, list_comments
from .dossier_checks import (
    BIAS_GAP_THRESHOLD,
    WORST_SITE_DICE_THRESHOLD,
    Gap,
    convergence,
    gap,
    hosting_status,
    intensity_drift,
    manifest_status,
    redact_phi,
    scan_phi,
    vendor_dice,
)
from .dossier_doc import (
    Block,
    Bullets,
    Checklist,
    Figure,
    Note,
    Paragraph,
    Section,
    Subheading,
    Table,
    to_html,
    to_markdown,
    to_plain,
)
from .dossier_facts import DossierFacts, collect_facts
from .errors import DossierError, EvidenceError
from .evidence import check_signer, sign_evidence
from .plots import DICE_PLOT, EPSILON_PLOT, UPDATE_NORM_PLOT, available_plots, render_plots
from .run_history import last_value, site_metric_keys, site_series
from .signing import load_signing_key
from .store import RegistryStore

__all__ = [
    "SECTION_TITLES",
    "MARKDOWN_FILE",
    "HTML_FILE",
    "PLOTS_DIR",
    "DossierFacts",
    "Comment",
    "collect_facts",
    "build_sections",
    "render_markdown",
    "render_html",
    "write_dossier",
    "write_facts",
    "log_dossier",
    "log_facts",
    "log_signed_facts",
    "dossier_artifact_dir",
    "add_comment",
    "list_comments",
]

SECTION_TITLES = (
    "1 Identification",
    "2 Training hypotheses and configuration",
    "3 Federated evaluation per site",
    "4 Bias analysis by site and scanner vendor",
    "5 Privacy statement",
    "6 Compliance checklist",
    "7 Update recommendations",
    "8 Comments",
)
MARKDOWN_FILE = "dossier.md"
HTML_FILE = "dossier.html"
PLOTS_DIR = "plots"

# What a site's reply may carry besides weights (the reply contract), for data minimisation, and
# what the coordinator logs per site beside it (its update norm, its rejected replies).
_AGGREGATE_METRICS = TrainReply.keys() | EvaluateReply.keys() | {"update-norm", "rejected"}


def _title(facts: DossierFacts) -> str:
    return f"Governance dossier: {facts.name} v{facts.version}"


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _site_dice(facts: DossierFacts) -> dict[str, float]:
    """Held-out Dice per site: the ``eval_sites`` tag, else the last evaluated round."""
    recorded = _dict(facts.lineage.get("eval_sites"))
    if recorded:
        return {str(k): float(v) for k, v in sorted(recorded.items())}
    return {
        site: float(series[-1][1])
        for site, series in site_series(facts.history, "evaluate", "dice").items()
    }


def _sites(facts: DossierFacts) -> list[str]:
    names = set(_dict(facts.lineage.get("sites"))) | set(_site_dice(facts))
    names |= set(site_series(facts.history, "evaluate", "dice"))
    return sorted(names)


# ---------------------------------------------------------------- sections


def _identification(facts: DossierFacts) -> Section:
    t = facts.tags
    rows = [
        ("registered model", facts.name),
        ("version", str(facts.version)),
        ("aliases", ", ".join(facts.aliases) or "none"),
        ("training run", facts.run_id or "none recorded"),
        ("code version", t.get("code_version", "not recorded")),
        ("weights SHA-256", t.get("weights_sha256", "not recorded")),
    ]
    if "signature.key_fingerprint" in t:
        rows.append(("signing key fingerprint", t["signature.key_fingerprint"]))
    if facts.verified is not None:
        rows.append(("evidence", facts.verified.describe()))
    rows.append(("registered at (UTC)", facts.created_at or "unknown"))
    if "promoted_at" in t or "promoted_by" in t:
        rows.append(("promoted", f"{t.get('promoted_at', 'time unknown')} by {t.get('promoted_by', 'unknown')}"))
    else:
        rows.append(("promoted", "no promotion recorded"))
    if "forced_reason" in t:
        rows.append(("promotion forced, reason", t["forced_reason"]))
    rows.append(("registry", facts.tracking_uri or "unknown"))
    if facts.generated_at:
        rows.append(("dossier generated at (UTC)", facts.generated_at))
    blocks: list[Block] = [Table(("field", "value"), tuple(rows))]
    if facts.problems:
        blocks += [Paragraph("Problems found while reading the registry:"), Bullets(facts.problems)]
    return Section(SECTION_TITLES[0], tuple(blocks))


def _training(facts: DossierFacts) -> Section:
    spec = _dict(facts.lineage.get("preprocessing"))
    labels = ", ".join(spec.get("label_names") or ["lesion"])
    blocks: list[Block] = [
        Subheading("Intended use"),
        Paragraph(
            f"Lesion segmentation (labels: {labels}) on 2-D slices of DICOM series, and triage of a "
            "series as "
            f"suspect or normal from its most suspicious slice (triage threshold "
            f"{spec.get('triage_threshold', 'n/a')}). Decision support only: a clinician reviews "
            "every result; the model is not validated beyond the scanners, protocols and "
            "populations of the contributing sites."
        ),
        Subheading("Data assumptions"),
        Bullets((
            "Each site holds DICOM series with DICOM SEG ground truth referencing them; series "
            "without a SEG are not used.",
            "Patients, not slices, are split into training and held-out sets with a seeded hash "
            f"(held-out share {facts.params.get('test-fraction', 'not recorded')}), so no patient "
            "is in both.",
            "Training samples are 2-D slices; FedAvg weights each site by its number of training slices.",
            f"Sites: {len(_sites(facts))} ({', '.join(_sites(facts)) or 'none recorded'}).",
        )),
        Subheading("Run configuration"),
    ]
    if facts.params:
        blocks.append(Table(("parameter", "value"), tuple(sorted(facts.params.items()))))
    else:
        blocks.append(Paragraph("The training run's parameters are not available."))
    strategy_params = _dict(facts.lineage.get("strategy_params"))
    blocks += [
        Subheading("Aggregation strategy"),
        Paragraph(
            f"Strategy {facts.tags.get('strategy', 'not recorded')}; rounds requested "
            f"{facts.tags.get('rounds', 'n/a')}, completed {facts.tags.get('rounds_completed', 'n/a')}."
        ),
    ]
    if strategy_params:
        blocks.append(Table(("strategy parameter", "value"),
                            tuple((k, _json(v)) for k, v in sorted(strategy_params.items()))))
    blocks.append(Subheading("Preprocessing and model specification"))
    if spec:
        blocks.append(Table(("field", "value"), tuple((k, _json(v)) for k, v in sorted(spec.items()))))
    else:
        blocks.append(Paragraph("No preprocessing specification recorded."))
    return Section(SECTION_TITLES[1], tuple(blocks))


def _evaluation(facts: DossierFacts, plots: list[str]) -> Section:
    train = _dict(facts.lineage.get("sites"))
    dice = _site_dice(facts)
    personal = {str(k): float(v) for k, v in _dict(facts.lineage.get("eval_sites_local_norm")).items()}
    test = site_series(facts.history, "evaluate", "num-examples")
    rows = tuple(
        (
            site,
            str(train[site]) if site in train else "n/a",
            _f(dice[site]) if site in dice else "not evaluated",
            *((_f(personal.get(site)),) if personal else ()),
            _f(last_value(test.get(site)), 0) if site in test else "n/a",
        )
        for site in _sites(facts)
    )
    m = facts.metrics
    worst = min(dice, key=lambda s: dice[s]) if dice else None
    uncounted = facts.lineage.get("eval_sites_uncounted") or []
    pooled_line = f"pooled Dice (over all sites' held-out voxels): {_f(m.get('dice_pooled'))}"
    if m.get("dice_pooled") is None and uncounted:
        pooled_line += f" (site(s) {', '.join(map(str, uncounted))} sent no voxel counts)"
    notes = [
        pooled_line,
        f"mean of the sites' Dice: {_f(m.get('dice_mean'))}",
        f"worst site: {_f(m.get('dice_min'))}" + (f" ({worst})" if worst else ""),
        f"spread (best minus worst): {_f(m.get('dice_spread'))}",
    ]
    unevaluated = sorted(s for s in train if s not in dice)
    if unevaluated:
        notes.append(f"trained but did not evaluate the published model: {', '.join(unevaluated)} "
                     "(promotion gate evaluated_sites fails)")
    if personal:
        notes.append("held-out Dice is the published model's own at each site; personalised Dice is "
                     "each site's variant with its own normalisation layers (local-norm)")
    heading = ("site", "training samples", "held-out Dice", *(("personalised Dice",) if personal else ()),
               "test slices")
    blocks: list[Block] = [Table(heading, rows), Bullets(tuple(notes))]
    per_site = site_series(facts.history, "evaluate", "dice")
    pooled = dict(facts.history.get("eval/dice_pooled", ()))
    rounds = sorted({r for s in per_site.values() for r, _ in s} | set(pooled))
    if rounds:
        values = {site: dict(series) for site, series in per_site.items()}
        blocks += [
            Subheading("Held-out Dice per round"),
            Table(
                ("round", *per_site, "pooled"),
                tuple(
                    (str(r), *(_f(values[s].get(r)) for s in per_site), _f(pooled.get(r)))
                    for r in rounds
                ),
            ),
        ]
    if DICE_PLOT in plots:
        blocks.append(Figure(DICE_PLOT, "Held-out Dice per round: each site, pooled, worst site"))
    if UPDATE_NORM_PLOT in plots:
        blocks.append(Figure(UPDATE_NORM_PLOT, "Norm of each site's weight update per round"))
    return Section(SECTION_TITLES[2], tuple(blocks))


def _gap_line(what: str, g: Gap | None) -> str:
    if g is None:
        return f"No {what} to compare."
    verdict = (
        f"FLAG: above the {BIAS_GAP_THRESHOLD:g} threshold"
        if g.flagged
        else f"within the {BIAS_GAP_THRESHOLD:g} threshold"
    )
    return (
        f"Gap between best and worst {what}: {g.value:.4f} ({g.best} {g.best_dice:.4f} vs "
        f"{g.worst} {g.worst_dice:.4f}): {verdict}."
    )


def _bias(facts: DossierFacts) -> Section:
    dice = _site_dice(facts)
    ranked = sorted(dice.items(), key=lambda kv: (-kv[1], kv[0]))
    blocks: list[Block] = [
        Subheading("Dice by site"),
        Table(("site", "held-out Dice"), tuple((s, _f(d)) for s, d in ranked)),
        Paragraph(_gap_line("site", gap(dice))),
        Subheading("Dice by scanner vendor"),
    ]
    inputs = _dict(facts.lineage.get("site_inputs"))
    vendors = vendor_dice(dice, inputs) if inputs else []
    if vendors:
        blocks += [
            Paragraph(
                "Sites report Dice, not Dice per vendor: a vendor's Dice is the mean of the Dice "
                "of the sites holding its series, weighted by the number of its series at each "
                "site; a site with several vendors contributes to each."
            ),
            Table(
                ("vendor", "Dice", "series", "sites"),
                tuple((v.vendor, _f(v.dice), str(v.series), ", ".join(v.sites)) for v in vendors),
            ),
            Paragraph(_gap_line("vendor", gap({v.vendor: v.dice for v in vendors}))),
        ]
    else:
        blocks.append(Paragraph("No scanner vendor information recorded for this version (site_inputs)."))
    return Section(SECTION_TITLES[3], tuple(blocks))


def _privacy(facts: DossierFacts) -> Section:
    dp = _dict(facts.lineage.get("dp"))
    blocks: list[Block] = [Subheading("Mechanism")]
    if dp.get("enabled"):
        blocks.append(Paragraph(
            "Differentially private training: DP-SGD at every site, with noise multiplier "
            f"{dp.get('noise_multiplier', 'not recorded')}, per-sample gradient clipping at "
            f"max grad norm {dp.get('max_grad_norm', 'not recorded')}, and "
            f"δ = {dp.get('delta', 'not recorded')}. Each site's (ε, δ) guarantee covers the "
            "examples it trained on, over all the rounds it took part in."
        ))
        recorded = _dict(facts.lineage.get("epsilon_sites"))
        logged = site_series(facts.history, "train", "epsilon")
        sites = sorted(set(recorded) | set(logged) | set(_dict(facts.lineage.get("sites"))))
        rows = []
        for site in sites:
            eps = recorded.get(site, last_value(logged.get(site)))
            rows.append((site, _f(float(eps), 3) if eps is not None else "not recorded",
                         str(dp.get("delta", "n/a"))))
        blocks.append(Table(("site", "ε spent", "δ"), tuple(rows)))
        if logged:
            blocks.append(Figure(EPSILON_PLOT, "Privacy spent per site (ε) per round"))
    else:
        state = "disabled" if dp else "not recorded"
        blocks.append(Paragraph(
            f"No formal differential privacy guarantee applies to this version: it was trained "
            f"without DP-SGD (differential privacy {state}). The updates it was built from are "
            "protected only by federation (data stays at the sites) and by what the sites send."
        ))
    secagg = facts.tags.get("secure_aggregation")
    if secagg == "on":
        sa = "Secure aggregation: on. The coordinator sees only the sum of the sites' updates."
    elif secagg == "off":
        sa = "Secure aggregation: off. The coordinator sees each site's individual weight update."
    else:
        sa = ("Secure aggregation: not recorded; treat it as off: the coordinator sees each "
              "site's individual weight update.")
    kinds = sorted(site_metric_keys(facts.history))
    blocks += [
        Subheading("Secure aggregation"),
        Paragraph(sa),
        Subheading("What leaves a site"),
        Bullets((
            "the model weights after local training (one update per round)",
            "the number of training and held-out slices (sample counts)",
            "aggregate metrics: " + (", ".join(kinds) if kinds else "none logged"),
            "nothing else: no pixel, no DICOM header, no UID, no patient identifier",
        )),
    ]
    return Section(SECTION_TITLES[4], tuple(blocks))


def _phi_item(facts: DossierFacts, other_sections: list[Section]) -> tuple[str, str, str]:
    sources = [(f"version tag {k}", f"{k} {v}") for k, v in sorted(facts.tags.items())]
    sources += [(f"run param {k}", f"{k} {v}") for k, v in sorted(facts.params.items())]
    sources += [(f"dossier section {s.title}", to_plain([s])) for s in other_sections]
    found = scan_phi(sources)
    item = "No PHI in artifacts"
    scanned = (f"scanned {len(facts.tags)} version tags, {len(facts.params)} run params and the "
               "dossier text for DICOM UID-like and PatientName-like strings")
    if not found:
        return item, "PASS", f"{scanned}: none found"
    listed = "; ".join(f"{f.kind} in {f.where}: {f.excerpt}" for f in found[:10])
    more = f" (and {len(found) - 10} more)" if len(found) > 10 else ""
    return item, "FAIL", f"{scanned}: {len(found)} found: {listed}{more} (redacted in this dossier)"


def _compliance(facts: DossierFacts, other_sections: list[Section]) -> Section:
    kinds = site_metric_keys(facts.history)
    unexpected = sorted(kinds - _AGGREGATE_METRICS)
    if unexpected:
        gdpr = ("TO CONFIRM", "sites reported metrics not on the list of known aggregates: "
                f"{', '.join(unexpected)}; confirm they are aggregates")
    else:
        gdpr = ("PASS", "sites send only model weights, sample counts and aggregate metrics "
                f"({len(kinds)} kinds logged); no images or headers leave a site")
    items = (
        ("GDPR data minimisation", *gdpr),
        ("HDS hosting of the registry", *hosting_status(facts.tracking_uri)),
        _phi_item(facts, other_sections),
        ("Site data manifests", *manifest_status(_sites(facts), _manifests(facts))),
    )
    return Section(SECTION_TITLES[5], (Checklist(items),))


def _manifests(facts: DossierFacts) -> Mapping[str, Any] | None:
    value = facts.lineage.get("site_manifests")
    return value if isinstance(value, Mapping) else None


def _recommendations(facts: DossierFacts) -> Section:
    dice = _site_dice(facts)
    blocks: list[Block] = [Subheading("Worst site")]
    g = gap(dice)
    if g is None:
        blocks.append(Paragraph("No per-site evaluation recorded: evaluate the version at every site first."))
    elif g.worst_dice < WORST_SITE_DICE_THRESHOLD:
        blocks.append(Paragraph(
            f"{g.worst} has the lowest held-out Dice, {g.worst_dice:.4f}, below the "
            f"{WORST_SITE_DICE_THRESHOLD:g} threshold. Recommendation: review {g.worst}'s "
            "annotations and acquisition (vendor, intensity, spacing), add annotated series from "
            f"{g.worst}, and re-evaluate before relying on the model there."
        ))
    else:
        blocks.append(Paragraph(
            f"{g.worst} has the lowest held-out Dice, {g.worst_dice:.4f}, at or above the "
            f"{WORST_SITE_DICE_THRESHOLD:g} threshold: no site-specific action needed."
        ))
    blocks.append(Subheading("Input drift"))
    inputs = _dict(facts.lineage.get("site_inputs"))
    rows, source = intensity_drift(inputs, _dict(facts.lineage.get("input_reference")) or None)
    if rows:
        blocks += [
            Paragraph(
                f"Median intensity (p50) of each site's inputs against the reference: {source}. "
                "Raw intensities differ between scanners and the preprocessing normalises each "
                "series to its own percentile window, so a flag calls for a check of that site's "
                "inputs rather than an automatic retrain."
            ),
            Table(
                ("site", "p50", "reference p50", "deviation", "share of reference p01-p99 range", "flag"),
                tuple(
                    (r.site, _f(r.p50, 3), _f(r.reference_p50, 3), f"{r.delta:+.3f}",
                     _f(r.fraction_of_range, 3), "FLAG" if r.flagged else "")
                    for r in rows
                ),
            ),
        ]
    else:
        blocks.append(Paragraph("No drift statistics yet: the sites' input statistics were not recorded."))
    blocks.append(Subheading("Convergence"))
    c = convergence(facts.history.get("eval/dice_pooled", ()))
    if c.converged is None:
        blocks.append(Paragraph(f"Cannot judge convergence from {c.rounds} evaluated round(s)."))
    elif c.converged:
        blocks.append(Paragraph(
            f"Pooled Dice changed by {c.last_rise:+.4f} in the last round: it has levelled off."
        ))
    else:
        blocks.append(Paragraph(
            f"Not converged: pooled Dice still rose by {c.last_rise:+.4f} in the last round "
            f"(round {c.rounds}). Recommendation: retrain with more rounds than "
            f"{facts.params.get('num-server-rounds', facts.tags.get('rounds', c.rounds))}."
        ))
    return Section(SECTION_TITLES[6], tuple(blocks))


def _comments(facts: DossierFacts) -> Section:
    if not facts.comments:
        return Section(SECTION_TITLES[7], (Paragraph(
            f"No comments yet (fedseg registry comment {facts.name} {facts.version} "
            "--author NAME --text TEXT)."
        ),))
    return Section(SECTION_TITLES[7], tuple(Note(c.author, c.time, c.text) for c in facts.comments))


def build_sections(facts: DossierFacts) -> list[Section]:
    """The eight sections of :data:`SECTION_TITLES`, unrendered and unredacted."""
    plots = available_plots(facts.history)
    sections = [
        _identification(facts),
        _training(facts),
        _evaluation(facts, plots),
        _bias(facts),
        _privacy(facts),
        _recommendations(facts),
        _comments(facts),
    ]
    sections.insert(5, _compliance(facts, sections))
    return sections


def render_markdown(facts: DossierFacts) -> str:
    """The dossier as Markdown; figures link ``plots/<name>.png`` next to it."""
    return to_markdown(_title(facts), build_sections(facts), PLOTS_DIR, clean=redact_phi)


def render_html(facts: DossierFacts, plots: Mapping[str, bytes]) -> str:
    """The dossier as one self-contained HTML page with ``plots`` embedded."""
    return to_html(_title(facts), build_sections(facts), plots, clean=redact_phi)


def write_facts(facts: DossierFacts, out_dir: Path) -> list[Path]:
    """Write the dossier of already collected ``facts`` into ``out_dir`` (see write_dossier)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = render_plots(facts.history)
    sections = build_sections(facts)
    md = out_dir / MARKDOWN_FILE
    md.write_text(to_markdown(_title(facts), sections, PLOTS_DIR, clean=redact_phi), encoding="utf-8")
    page = out_dir / HTML_FILE
    page.write_text(to_html(_title(facts), sections, plots, clean=redact_phi), encoding="utf-8")
    written = [md, page]
    if plots:
        (out_dir / PLOTS_DIR).mkdir(exist_ok=True)
    for name, png in plots.items():
        path = out_dir / PLOTS_DIR / name
        path.write_bytes(png)
        written.append(path)
    return written


def write_dossier(store: RegistryStore, name: str, version: int | str, out_dir: Path) -> list[Path]:
    """Write ``dossier.md``, ``dossier.html`` and ``plots/*.png`` into ``out_dir``.

    Raises
    ------
    ModelNotFoundError
        Unknown model, version or alias.
    """
    return write_facts(collect_facts(store, name, version), Path(out_dir))


def log_dossier(
    store: RegistryStore, name: str, version: int | str, *, key: Ed25519PrivateKey | None = None
) -> str:
    """Log a fresh dossier as artifacts of the version's training run and sign it into the
    version's evidence; return the artifact path.

    The run gets ``dossier/v<N>/dossier.md``, ``dossier/v<N>/dossier.html`` and
    ``dossier/v<N>/plots/*.png``, replacing the dossier the evidence covered; so the version's
    evidence is verified first and signed again over the new files, with the key that signed it
    (``key``, default :func:`registry.signing.load_signing_key`).

    Raises
    ------
    ModelNotFoundError
        Unknown model, version or alias.
    EvidenceError
        The version does not match its evidence, predates evidence (attest it first), or
        ``key`` is not the key that signed it. Nothing is logged.
    DossierError
        The version has no training run, or the artifacts cannot be stored.
    """
    return log_signed_facts(store, collect_facts(store, name, version),
                            key if key is not None else load_signing_key())


def log_signed_facts(store: RegistryStore, facts: DossierFacts, key: Ed25519PrivateKey) -> str:
    """Log the dossier of verified ``facts`` and sign it into the evidence (see log_dossier)."""
    verified = facts.verified
    if verified is None or verified.evidence is None:
        what = verified.describe() if verified is not None else "facts that were not verified"
        raise EvidenceError(f"refusing to log a dossier for {facts.name} v{facts.version}: {what}")
    check_signer(verified, key)
    path = log_facts(store, facts)
    sign_evidence(store, facts.name, facts.version, key, model_signature=verified.model_signature,
                  tags=verified.tags, attestation=verified.evidence.attestation)
    return path


def log_facts(store: RegistryStore, facts: DossierFacts) -> str:
    """Log the dossier of already collected ``facts`` (see log_dossier)."""
    if not facts.run_id:
        raise DossierError(f"{facts.name} v{facts.version} names no training run to attach a dossier to")
    path = dossier_artifact_dir(facts.version)
    with tempfile.TemporaryDirectory() as tmp:
        write_facts(facts, Path(tmp))
        try:
            store.client().log_artifacts(facts.run_id, tmp, path)
        except (MlflowException, OSError) as exc:
            raise DossierError(f"cannot log the dossier of {facts.name} v{facts.version}: {exc}") from exc
    return path


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
