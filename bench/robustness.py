"""Robustness benchmark: one of five hospitals sends NaN or sign-flipped x5 updates.

Runs the scenarios of ``tests/robustness_scenarios.py`` (the same runs
``tests/test_robustness_figures.py`` asserts on): five 64 px synthetic hospitals, the demo's
run config, the real ServerApp logic and ClientApp with the rounds delivered in-process,
``site-e`` misbehaving through the ``--misbehave`` mod. Records the final Dice of each run,
its per-round pooled Dice, and the rejections, in ``bench/results/robustness.json`` and in
BENCHMARKS.md.

    python bench/robustness.py [--scenarios clean/fedavg,nan/fedavg,...]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))
from common import ROOT, command_line, git_version, header, machine, now, update_section, write_json  # noqa: E402

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from robustness_scenarios import ATTACKER, RUN_CONFIG, SCENARIOS, SITES, run_scenario, write_sites  # noqa: E402

SECTION = "Robustness: one of five sites sends NaN or sign-flipped x5 updates"
_POOLED = re.compile(r"^round (\d+): Dice pooled ([0-9.]+)")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "robustness")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated names")
    p.add_argument("--no-record", action="store_true", help="do not touch BENCHMARKS.md")
    return p.parse_args()


def _row(name: str, result) -> dict:  # noqa: ANN001 - ScenarioResult
    return {
        "strategy": result.scenario.strategy,
        "misbehave": list(result.scenario.misbehave),
        "run_config": result.scenario.run_config(),
        "dice_pooled": result.metrics["dice_pooled"],
        "dice_mean": result.metrics.get("dice_mean"),
        "dice_min": result.metrics.get("dice_min"),
        "pooled_by_round": [float(m[2]) for line in result.rounds if (m := _POOLED.match(line))],
        "rejections": len(result.rejections),
        "rejection_example": result.rejections[0] if result.rejections else None,
        "seconds": result.seconds,
    }


def markdown(payload: dict) -> str:
    rows = payload["scenarios"]
    clean = rows.get("clean/fedavg", {}).get("dice_pooled")
    lines = [
        "Five 64 px synthetic hospitals (8 patients x 16 slices each, seed 1), the demo's run "
        f"config (`{RUN_CONFIG}`), every round through the real ServerApp logic "
        "(`server.federation.run_federation`: validation, Flower's strategy, MLflow, registry) and "
        "ClientApp, delivered in-process (`tests/local_grid.py`), with "
        f"`{ATTACKER}` misbehaving through the `--misbehave` mod. Dice is the final model's on "
        "every site's held-out patients (pooled over voxels; worst = lowest site). `absent` is the "
        f"reference for the NaN site: {ATTACKER} fails every training round (no update) but "
        "still evaluates. Seeded: the same figures on every run on one machine; "
        "`tests/test_robustness_figures.py` asserts on the same runs.\n",
        header(payload),
        "| scenario | strategy | pooled Dice | Δ vs clean FedAvg | mean | worst | rejected updates "
        "| pooled Dice by round | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        delta = f"{r['dice_pooled'] - clean:+.3f}" if clean is not None else "-"
        by_round = " ".join(f"{d:.2f}" for d in r["pooled_by_round"])
        misbehave = ", ".join(r["misbehave"]) or "none"
        lines.append(
            f"| {name.split('/')[0]} ({misbehave}) | {r['strategy']} | {r['dice_pooled']:.3f} | {delta} "
            f"| {r['dice_mean']:.3f} | {r['dice_min']:.3f} | {r['rejections']} | {by_round} "
            f"| {r['seconds']:.0f} |")
    notes = payload.get("findings", [])
    if notes:
        lines.append("")
        lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines)


def findings(rows: dict, identical: bool | None) -> list[str]:
    out = []
    get = lambda name: rows.get(name, {}).get("dice_pooled")  # noqa: E731
    clean, nan, absent = get("clean/fedavg"), get("nan/fedavg"), get("absent/fedavg")
    if nan is not None and absent is not None:
        same = " (published weights identical to the bit)" if identical else ""
        out.append(f"NaN site: its update is rejected every round (`non-finite`, logged per site as "
                   f"`site/{ATTACKER}/train/rejected`); final pooled Dice {nan:.3f} vs {absent:.3f} "
                   f"without its update{same}. The clean five-site run ({clean:.3f}) differs by "
                   f"{nan - clean:+.3f} because it also has that site's honest data.")
    flip_avg = get("signflip5/fedavg")
    if clean is not None and flip_avg is not None:
        out.append(f"Sign-flip x5 (5x an honest update, inside the 10x norm bound, so not rejected): "
                   f"FedAvg falls from {clean:.3f} to {flip_avg:.3f} ({flip_avg - clean:+.3f}).")
    robust = [(n.split("/")[1], get(n)) for n in rows if n.startswith("signflip5/") and n != "signflip5/fedavg"]
    if clean is not None and robust:
        out.append("Under the same attack: " + ", ".join(
            f"{s} {d:.3f} ({d - clean:+.3f})" for s, d in robust) + " vs clean FedAvg; the tests "
            "assert FedTrimmedAvg (beta 0.2) stays within 0.03 of clean FedAvg and FedAvg loses at least 0.30.")
    if "signflip5/fedmedian" in rows:
        out.append("FedMedian does not collapse under the attack, but the coordinate-wise median of five "
                   "updates uses less of the honest sites' information per round than a trimmed mean, "
                   "so it ends lower after the same rounds.")
    if "signflip5/krum" in rows:
        out.append("Krum keeps a single site's update each round (the one closest to the others) and "
                   "averages nothing, so it learns less per round than the coordinate-wise rules. A "
                   "pooled Dice of 0.00 in one round is a model whose mask did not overlap any lesion that "
                   "round; the later rounds recover.")
    out.append("Seconds are wall-clock on a machine shared with other jobs: compare Dice, not times.")
    return out


def main() -> None:
    a = _args()
    names = [n.strip() for n in a.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    shutil.rmtree(a.work, ignore_errors=True)
    t0 = time.monotonic()
    sites = write_sites(a.work / "sites")
    results = {}
    for name in names:
        results[name] = run_scenario(sites, SCENARIOS[name], a.work / "home")
        print(f"{name:<26} pooled Dice {results[name].metrics['dice_pooled']:.3f}  "
              f"({results[name].seconds:.0f} s, {len(results[name].rejections)} rejected)", flush=True)
    identical = None
    if "nan/fedavg" in results and "absent/fedavg" in results:
        import torch

        x, y = results["nan/fedavg"].state_dict(), results["absent/fedavg"].state_dict()
        identical = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    rows = {name: _row(name, r) for name, r in results.items()}
    payload = {
        "benchmark": "robustness",
        "date": now(),
        "machine": machine(),
        "command": command_line(),
        "code_version": git_version(),
        "json": "bench/results/robustness.json",
        "sites": SITES,
        "attacker": ATTACKER,
        "scenarios": rows,
        "nan_weights_identical_to_absent": identical,
        "total_seconds": time.monotonic() - t0,
    }
    payload["findings"] = findings(rows, identical)
    write_json("robustness", payload)
    if not a.no_record:
        update_section(SECTION, markdown(payload))
    print("\n".join(payload["findings"]))
    print(f"wrote bench/results/robustness.json{'' if a.no_record else ' and BENCHMARKS.md'} "
          f"in {payload['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
