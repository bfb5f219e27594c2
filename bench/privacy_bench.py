"""Privacy benchmark on the LGG DICOM hospitals: does DP-SGD protect, and what does it cost?

1. Membership inference (loss threshold) on one site: the default U-Net trained on a subset of
   the site's training slices without DP (``imaging.training.train_epochs``) and with DP-SGD
   (``privacy.make_private_training``, σ for a target ε), attacked with score = -per-slice loss
   on members (the training slices) vs as many held-out slices (other patients of the site).
   AUC (rank statistic) and TPR at 1% FPR, the ε spent, and both models' held-out Dice.
2. Utility at ε ∈ {1, 3, 8, ∞}: the real federation (ServerApp/ClientApp on Flower's simulation
   engine, one subprocess and a fresh ``$FEDSEG_HOME`` per ε so ledgers never carry over), the
   published version read back from the registry and scored per site on the held-out slices;
   the per-site ε actually spent comes from the version's ``epsilon_sites`` lineage tag.
3. DP-SGD step time over the non-DP step time for the default U-Net at batch 16.

    python bench/privacy_bench.py [--rounds 8] [--quick]

Reuses the sites imported by ``bench/quality.py`` (``bench/.work/quality/sites``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))
from common import ROOT, command_line, evaluate_sites, git_version, header, machine, now, update_section, write_json  # noqa: E402

sys.path.insert(0, str(ROOT))

from imaging.model import build_unet, load_state_dict, select_device  # noqa: E402
from imaging.site_data import SiteDataset, load_site_dataset  # noqa: E402
from imaging.spec import ModelSpec  # noqa: E402
from imaging.training import evaluate, train_epochs  # noqa: E402
from privacy import DPConfig, make_private_training, noise_for_target_epsilon, per_sample_loss  # noqa: E402
from privacy import poisson_sample_rate, steps_per_epoch  # noqa: E402

MIA_SECTION = "Privacy: membership inference (loss threshold)"
UTILITY_SECTION = "Privacy: utility at ε ∈ {1, 3, 8, ∞}"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=Path, default=ROOT / "bench" / ".work" / "quality" / "sites",
                   help="LGG hospitals imported by bench/quality.py")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "privacy")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", default="16,32,64")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=42)
    # membership inference
    p.add_argument("--mia-site", default="lgg-DU")
    p.add_argument("--mia-slices", type=int, default=384, help="members (and as many non-members)")
    p.add_argument("--mia-epochs", type=int, default=30)
    p.add_argument("--mia-epsilon", type=float, default=8.0)
    # utility through the federation
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--epsilons", default="1,3,8,inf")
    # step timing
    p.add_argument("--timing-steps", type=int, default=20, help="timed steps per method (after warm-up)")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of every part")
    p.add_argument("--no-record", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--render", action="store_true",
                   help="only rewrite the BENCHMARKS.md sections from bench/results/privacy.json")
    p.add_argument("--skip", default="", help="comma list of parts to skip: mia,utility,timing")
    # internal: one federation in a subprocess ($FEDSEG_HOME set by the parent)
    p.add_argument("--worker-epsilon", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.mia_slices, a.mia_epochs, a.rounds, a.timing_steps = 48, 2, 1, 4
        a.work = a.work.parent / "privacy-quick"
    return a


def _spec(a: argparse.Namespace) -> ModelSpec:
    return ModelSpec(channels=tuple(int(c) for c in a.channels.split(",")), image_size=a.image_size)


def _eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _model_name(eps: float) -> str:
    return f"privacy-bench-eps{_eps_label(eps)}"


# ---------------------------------------------------------------- membership inference
def _auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(score(member) > score(non-member)), ties counted half: the Mann-Whitney U statistic."""
    scores = np.concatenate([members, non_members])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    n1, n0 = len(members), len(non_members)
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def _tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    """Largest TPR over thresholds ``score >= t`` whose FPR is at most ``fpr``."""
    best = 0.0
    for t in np.unique(np.concatenate([members, non_members])):
        if np.mean(non_members >= t) <= fpr:
            best = max(best, float(np.mean(members >= t)))
    return best


@torch.no_grad()
def _per_slice_loss(net: torch.nn.Module, images: np.ndarray, masks: np.ndarray,
                    device: torch.device, batch_size: int = 32) -> np.ndarray:
    """DiceCE per slice (``privacy.per_sample_loss``, one slice at a time on batched logits)."""
    net.to(device).eval()
    loss_fn = per_sample_loss()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    y = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)).unsqueeze(1)
    out = []
    for s in range(0, len(x), batch_size):
        logits = net(x[s:s + batch_size].to(device))
        yb = y[s:s + batch_size].to(device)
        out.extend(float(loss_fn(logits[i:i + 1], yb[i:i + 1])) for i in range(len(logits)))
    return np.asarray(out, dtype=np.float64)


def _attack(net: torch.nn.Module, members: tuple[np.ndarray, np.ndarray],
            non_members: tuple[np.ndarray, np.ndarray], device: torch.device) -> dict[str, float]:
    lm = _per_slice_loss(net, *members, device)
    ln = _per_slice_loss(net, *non_members, device)
    sm, sn = -lm, -ln
    return {
        "auc": _auc(sm, sn),
        "tpr_at_1pct_fpr": _tpr_at_fpr(sm, sn, 0.01),
        "tpr_at_10pct_fpr": _tpr_at_fpr(sm, sn, 0.10),
        "member_loss_mean": float(lm.mean()),
        "non_member_loss_mean": float(ln.mean()),
    }


def _membership_inference(a: argparse.Namespace, spec: ModelSpec, d: SiteDataset,
                          device: torch.device) -> dict:
    n = min(a.mia_slices, d.num_train, d.num_test)
    rng = np.random.default_rng(a.seed)
    mi = np.sort(rng.choice(d.num_train, n, replace=False))
    ni = np.sort(rng.choice(d.num_test, n, replace=False))
    members = (d.train_images[mi], d.train_masks[mi])
    non_members = (d.test_images[ni], d.test_masks[ni])
    out: dict = {"site": a.mia_site, "members": n, "non_members": n, "epochs": a.mia_epochs,
                 "member_patients": d.train_patients, "non_member_patients": d.test_patients,
                 "test_slices_for_dice": d.num_test, "models": {}}

    t = time.monotonic()
    torch.manual_seed(a.seed)
    net = build_unet(spec)
    tr = train_epochs(net, *members, epochs=a.mia_epochs, batch_size=a.batch_size,
                      learning_rate=a.learning_rate, device=device, seed=a.seed)
    row = _attack(net, members, non_members, device)
    row.update(dice_test=evaluate(net, d.test_images, d.test_masks, device=device).dice,
               dice_members=evaluate(net, *members, device=device).dice,
               epsilon=None, noise_multiplier=0.0, steps=tr.steps, train_loss=tr.loss,
               seconds=time.monotonic() - t)
    out["models"]["no DP"] = row
    print("MIA no DP", row, flush=True)

    t = time.monotonic()
    cfg0 = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=a.max_grad_norm)
    delta = cfg0.delta_for(n)
    rate = poisson_sample_rate(n, a.batch_size)
    sigma = noise_for_target_epsilon(target_epsilon=a.mia_epsilon, delta=delta, sample_rate=rate,
                                     steps=a.mia_epochs * steps_per_epoch(rate), accountant="rdp")
    torch.manual_seed(a.seed)
    net = build_unet(spec)
    # seed=None: sampling and noise from the OS random device, as at a real site.
    res = make_private_training(
        net, *members, config=DPConfig(enabled=True, noise_multiplier=sigma, max_grad_norm=a.max_grad_norm,
                                       delta=delta),
        batch_size=a.batch_size, epochs=a.mia_epochs, learning_rate=a.learning_rate, device=device, seed=None)
    row = _attack(net, members, non_members, device)
    row.update(dice_test=evaluate(net, d.test_images, d.test_masks, device=device).dice,
               dice_members=evaluate(net, *members, device=device).dice,
               epsilon=res.epsilon, delta=res.delta, noise_multiplier=res.noise_multiplier,
               sample_rate=res.sample_rate, steps=res.steps, train_loss=res.loss,
               seconds=time.monotonic() - t)
    out["models"][f"DP-SGD (target ε={a.mia_epsilon:g})"] = row
    print("MIA DP", row, flush=True)
    return out


# ---------------------------------------------------------------- utility through the federation
def _run_config(a: argparse.Namespace, eps: float) -> str:
    label = _eps_label(eps)
    cfg = (f"num-server-rounds={a.rounds} local-epochs=1 batch-size={a.batch_size} "
           f"learning-rate={a.learning_rate} image-size={a.image_size} unet-channels='{a.channels}' "
           f"seed={a.seed} test-fraction={a.test_fraction} min-sites=4 "
           f"model-name='{_model_name(eps)}' consortium='bench-{label}' ")
    if math.isinf(eps):
        return cfg + "dp=false"
    return cfg + f"dp=true target-epsilon={eps:g} max-grad-norm={a.max_grad_norm:g}"


def _worker(a: argparse.Namespace) -> None:
    """One federation; run in a subprocess whose environment names a fresh $FEDSEG_HOME."""
    from simulation.engine import run_simulated_federation
    from simulation.run_command import configure_logging

    configure_logging(verbose=False)
    eps = float(a.worker_epsilon)
    run_simulated_federation(a.sites, run_config=_run_config(a, eps))


def _federate(a: argparse.Namespace, eps: float, spec: ModelSpec, data: dict[str, SiteDataset],
              device: torch.device) -> dict:
    home = a.work / f"home-eps{_eps_label(eps)}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = dict(os.environ, FEDSEG_HOME=str(home))
    for k in ("FEDSEG_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI", "FEDSEG_GATES_FILE"):
        env.pop(k, None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-epsilon", _eps_label(eps),
           "--sites", str(a.sites), "--rounds", str(a.rounds), "--image-size", str(a.image_size),
           "--channels", a.channels, "--batch-size", str(a.batch_size),
           "--learning-rate", str(a.learning_rate), "--max-grad-norm", str(a.max_grad_norm),
           "--test-fraction", str(a.test_fraction), "--seed", str(a.seed)]
    log = home / "federation.log"
    t = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - t
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"federation at ε={_eps_label(eps)} failed (rc {proc.returncode}); log {log}:\n{tail}")

    from registry import default_store, describe_version, list_versions, load_model

    os.environ["FEDSEG_HOME"] = str(home)  # read by default_store() and the trusted-key lookup
    store = default_store()
    name = _model_name(eps)
    version = max(v["version"] for v in list_versions(store, name))
    state = load_model(store, f"models:/{name}/{version}").state_dict
    lineage = describe_version(store, name, version)["lineage"]
    eps_sites = lineage.get("epsilon_sites")
    if isinstance(eps_sites, str):
        eps_sites = json.loads(eps_sites)
    dice = evaluate_sites(load_state_dict(spec, state), data, device)
    row = {"target_epsilon": None if math.isinf(eps) else eps, "model": f"models:/{name}/{version}",
           "dice": dice, "epsilon_sites": eps_sites, "dp_lineage": lineage.get("dp"),
           "eval_sites_reported": lineage.get("eval_sites"), "seconds": seconds,
           "run_config": _run_config(a, eps)}
    print(f"federation ε={_eps_label(eps)}: {seconds:.0f} s, dice {dice}, ε spent {eps_sites}", flush=True)
    return row


# ---------------------------------------------------------------- step timing
def _step_times(fn, net: torch.nn.Module) -> list[float]:
    """Seconds between consecutive forward calls of ``net`` while ``fn`` trains it: one full step
    each (forward, backward, clipping and noise when private, optimizer step, next batch)."""
    stamps: list[float] = []
    handle = net.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        fn()
    finally:
        handle.remove()
    return list(np.diff(stamps))


def _timing(a: argparse.Namespace, spec: ModelSpec, d: SiteDataset, device: torch.device) -> dict:
    warm = 5
    n = a.batch_size * (a.timing_steps + warm + 1)
    x, y = d.train_images[:n], d.train_masks[:n]
    times: dict[str, list[float]] = {"no DP": [], "DP-SGD": []}
    for rep in range(2):  # interleaved, to share out the noise of a busy machine
        torch.manual_seed(a.seed + rep)
        net = build_unet(spec)
        times["no DP"] += _step_times(lambda: train_epochs(
            net, x, y, epochs=1, batch_size=a.batch_size, learning_rate=a.learning_rate,
            device=device, seed=a.seed), net)[warm:]
        torch.manual_seed(a.seed + rep)
        net = build_unet(spec)
        times["DP-SGD"] += _step_times(lambda: make_private_training(
            net, x, y, config=DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=a.max_grad_norm),
            batch_size=a.batch_size, epochs=1, learning_rate=a.learning_rate, device=device, seed=None), net)[warm:]
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {"batch_size": a.batch_size, "steps_per_method": {k: len(v) for k, v in times.items()},
           "median_step_seconds": med, "ratio_dp_over_non_dp": med["DP-SGD"] / med["no DP"],
           "torch_threads": torch.get_num_threads()}
    print("timing", out, flush=True)
    return out


# ---------------------------------------------------------------- report
def _mia_markdown(payload: dict) -> str:
    m = payload["membership_inference"]
    s = payload["settings"]
    quick = " **(quick smoke run: not representative)**" if s["quick"] else ""
    lines = [
        f"Loss-threshold membership inference on site {m['site']}{quick}: the default U-Net "
        f"(channels {s['channels']}, {s['image_size']}x{s['image_size']}) trained for {m['epochs']} epochs "
        f"(batch {s['batch_size']}, Adam lr {s['learning_rate']}) on {m['members']} random training "
        f"slices (members, from {m['member_patients']} patients), attacked with score = -per-slice DiceCE "
        f"(`privacy.per_sample_loss`) against {m['non_members']} random held-out slices (non-members, "
        f"from the site's {m['non_member_patients']} held-out patients). AUC 0.5 = the attacker "
        "guesses; TPR at 1% FPR is the share of members caught when at most 1% of non-members are "
        f"flagged. Dice is on all {m['test_slices_for_dice']} held-out slices of the site. DP-SGD: "
        f"Poisson sampling, clipping C={s['max_grad_norm']}, σ from `noise_for_target_epsilon` for "
        "the target ε over all epochs (RDP accountant), noise from the OS random device.\n",
        header(payload),
        "| model | ε (δ) | σ | steps | AUC | TPR @ 1% FPR | TPR @ 10% FPR | mean loss members / non-members | Dice members | Dice held-out | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in m["models"].items():
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f} ({r['delta']:.0e})"
        sigma = "-" if not r["noise_multiplier"] else f"{r['noise_multiplier']:.3f}"
        lines.append(
            f"| {name} | {eps} | {sigma} | {r['steps']} | {r['auc']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | "
            f"{r['tpr_at_10pct_fpr']:.3f} | {r['member_loss_mean']:.3f} / {r['non_member_loss_mean']:.3f} | "
            f"{r['dice_members']:.3f} | {r['dice_test']:.3f} | {r['seconds']:.0f} |")
    nodp, dp = _split_models(m)
    lines += ["", payload["mia_verdict"]]
    if dp["epsilon"] is not None:
        bound = min(1.0, math.exp(dp["epsilon"]) * 0.01 + dp["delta"])
        lines.append(f"For reference, (ε, δ)-DP caps any attack's TPR at FPR α by e^ε·α + δ: at ε={dp['epsilon']:.2f} "
                     f"and α=1% that cap is {bound:.2f}, so the guarantee itself is "
                     + ("vacuous there; the measured protection comes from the noise and clipping in practice, not from the bound."
                        if bound >= 1.0 else "a real bound at that operating point."))
    return "\n".join(lines)


def _split_models(m: dict) -> tuple[dict, dict]:
    """(no-DP row, DP row) by their ε, whatever order the JSON keeps them in."""
    rows = list(m["models"].values())
    nodp = next(r for r in rows if r["epsilon"] is None)
    dp = next(r for r in rows if r["epsilon"] is not None)
    return nodp, dp


def _mia_verdict(m: dict) -> str:
    nodp, dp = _split_models(m)
    signal = nodp["auc"] - 0.5
    if signal < 0.05:
        return (f"The non-DP model barely leaks to this attack (AUC {nodp['auc']:.3f}): with this much "
                "data and training the loss gap between members and non-members is small, so this run "
                "cannot show what DP adds.")
    return (f"Without DP the attack has signal (AUC {nodp['auc']:.3f}, TPR@1%FPR {nodp['tpr_at_1pct_fpr']:.3f}); "
            f"with DP-SGD at ε={dp['epsilon']:.2f} it drops to AUC {dp['auc']:.3f}, "
            f"TPR@1%FPR {dp['tpr_at_1pct_fpr']:.3f}. The price is held-out Dice "
            f"{nodp['dice_test']:.3f} → {dp['dice_test']:.3f}. Part of the non-DP AUC may come from "
            "patient differences between members and non-members (different patients), not from "
            "memorisation alone.")


def _utility_markdown(payload: dict) -> str:
    u = payload["utility"]
    s = payload["settings"]
    t = payload.get("timing")
    sites = payload["site_names"]
    quick = " **(quick smoke run: not representative)**" if s["quick"] else ""
    lines = [
        f"Dice (pooled over voxels) of the published federated model on each site's held-out patients{quick}, "
        f"through the real ServerApp/ClientApp on Flower's simulation engine: {s['rounds']} round(s) x 1 "
        f"local epoch, batch {s['batch_size']}, Adam lr {s['learning_rate']}, U-Net {s['channels']} at "
        f"{s['image_size']}x{s['image_size']}, seed {s['seed']}, test fraction {s['test_fraction']}, "
        f"FedAvg over the 4 LGG hospitals. DP rows: DP-SGD at every site (`dp=true target-epsilon=E "
        f"max-grad-norm={s['max_grad_norm']:g}`: σ per site for the whole run, δ = min(1e-5, 1/(10 N))); "
        "each ε ran with a fresh `$FEDSEG_HOME` (ledger, registry). **The same settings are used for "
        "every ε** so the rows compare fairly; DP usually wants a larger learning rate or more rounds, "
        "which is not tuned here. ε spent per site is the version's `epsilon_sites` lineage tag "
        "(RDP, the site's ledger).\n",
        header(payload),
        "| target ε | " + " | ".join(sites) + " | pooled | mean | worst | ε spent per site (" + ", ".join(
            x.replace("lgg-", "") for x in sites) + ") | seconds |",
        "|---" * (len(sites) + 6) + "|",
    ]
    for label, r in u.items():
        d = r["dice"]
        es = r["epsilon_sites"] or {}
        spent = ", ".join(f"{es[x]:.2f}" if x in es else "-" for x in sites) if es else "- (no DP)"
        lines.append(f"| {'∞ (no DP)' if label == 'inf' else label} | " + " | ".join(f"{d[x]:.3f}" for x in sites)
                     + f" | {d['pooled']:.3f} | {d['mean']:.3f} | {d['worst']:.3f} | {spent} | {r['seconds']:.0f} |")
    lines += ["", payload["utility_verdict"]]
    if t:
        med = t["median_step_seconds"]
        lines += ["", f"DP-SGD step time / non-DP step time, default U-Net (channels {s['channels']}, "
                      f"{s['image_size']}x{s['image_size']}), batch {t['batch_size']} (Poisson-expected for DP), "
                      f"median of {t['steps_per_method']['no DP']} steps each after warm-up, "
                      f"{t['torch_threads']} torch threads on this machine: **{t['ratio_dp_over_non_dp']:.2f}x** "
                      f"({med['DP-SGD'] * 1000:.0f} ms vs {med['no DP'] * 1000:.0f} ms; `make_private_training` "
                      "vs `train_epochs`, a step = forward, backward, per-sample clipping and noise for DP, optimizer step)."]
    return "\n".join(lines)


def _utility_verdict(u: dict) -> str:
    if "inf" not in u:
        return ""
    base = u["inf"]["dice"]["pooled"]
    parts = []
    for label, r in u.items():
        if label == "inf":
            continue
        p = r["dice"]["pooled"]
        parts.append(f"ε={label}: pooled Dice {p:.3f} ({p / base:.0%} of no-DP)" if base else f"ε={label}: {p:.3f}")
    worst = min(((lbl, r["dice"]["pooled"]) for lbl, r in u.items()), key=lambda x: x[1])
    text = f"No DP: pooled Dice {base:.3f}. " + "; ".join(parts) + "."
    if worst[0] != "inf" and worst[1] < 0.2 * base:
        text += (f" At ε={worst[0]} the model collapses with these settings (pooled Dice {worst[1]:.3f}): "
                 "the noise swamps the clipped gradients in this few-rounds budget.")
    elif worst[0] != "inf" and worst[1] < 0.6 * base:
        text += (f" At ε={worst[0]} Dice is roughly halved (pooled {worst[1]:.3f}): usable only as a "
                 "starting point with these settings.")
    dp = [(float(lbl), r["dice"]["pooled"]) for lbl, r in u.items() if lbl != "inf"]
    dp.sort()
    if any(b[1] < a[1] for a, b in zip(dp, dp[1:])):
        text += (" Dice is not monotone in ε here: each ε is a single run whose DP noise and Poisson "
                 "sampling come from the OS random device (not the seed), so the order of the DP rows may be "
                 "run-to-run variation (not measured: one run per ε); the gap to no DP is far larger.")
    return text


def main() -> None:
    a = _args()
    if a.worker_epsilon is not None:
        _worker(a)
        return
    if a.render:  # rewrite the BENCHMARKS.md sections from the last JSON, without rerunning
        from common import RESULTS

        payload = json.loads((RESULTS / "privacy.json").read_text())
        if "membership_inference" in payload:
            payload["mia_verdict"] = _mia_verdict(payload["membership_inference"])
            update_section(MIA_SECTION, _mia_markdown(payload))
        if "utility" in payload:
            payload["utility_verdict"] = _utility_verdict(payload["utility"])
            update_section(UTILITY_SECTION, _utility_markdown(payload))
        (RESULTS / "privacy.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        print("re-rendered BENCHMARKS.md from bench/results/privacy.json")
        return
    t0 = time.monotonic()
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    a.work.mkdir(parents=True, exist_ok=True)
    spec = _spec(a)
    device = select_device()
    if not a.sites.is_dir():
        raise SystemExit(f"no sites at {a.sites}: run bench/quality.py first (it imports LGG there)")
    data = {p.name: load_site_dataset(p, spec, test_fraction=a.test_fraction, seed=a.seed)
            for p in sorted(a.sites.iterdir()) if p.is_dir()}
    print("sites: " + ", ".join(f"{s} train {d.num_train} / test {d.num_test}" for s, d in data.items()),
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    payload: dict = {
        "benchmark": "privacy-lgg",
        "date": now(),
        "machine": machine(),
        "command": command_line(),
        "code_version": git_version(),
        "json": "bench/results/privacy.json",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "worker_epsilon"},
        "site_names": list(data),
        "sites": {s: {"train_slices": d.num_train, "test_slices": d.num_test,
                      "train_patients": d.train_patients, "test_patients": d.test_patients}
                  for s, d in data.items()},
        "seconds": {},
    }

    if "timing" not in skip:
        t = time.monotonic()
        payload["timing"] = _timing(a, spec, data[a.mia_site], device)
        payload["seconds"]["timing"] = time.monotonic() - t

    if "mia" not in skip:
        t = time.monotonic()
        payload["membership_inference"] = _membership_inference(a, spec, data[a.mia_site], device)
        payload["mia_verdict"] = _mia_verdict(payload["membership_inference"])
        payload["seconds"]["membership_inference"] = time.monotonic() - t

    if "utility" not in skip:
        t = time.monotonic()
        epsilons = [math.inf if e.strip().lower() in ("inf", "∞") else float(e) for e in a.epsilons.split(",")]
        payload["utility"] = {_eps_label(e): _federate(a, e, spec, data, device) for e in epsilons}
        payload["utility_verdict"] = _utility_verdict(payload["utility"])
        payload["seconds"]["utility"] = time.monotonic() - t

    payload["total_seconds"] = time.monotonic() - t0
    write_json("privacy", payload)
    if not a.no_record:
        if "membership_inference" in payload:
            update_section(MIA_SECTION, _mia_markdown(payload))
        if "utility" in payload:
            update_section(UTILITY_SECTION, _utility_markdown(payload))
    print(f"wrote bench/results/privacy.json{'' if a.no_record else ' and BENCHMARKS.md'} "
          f"in {payload['total_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
