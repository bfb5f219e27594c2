"""Robustness benchmark: one hospital of five sends NaN or sign-flipped x5 updates; one of a
small consortium (two to four) poisons, against the update screen (``--suite screen``).

Runs the scenarios of ``tests/robustness_scenarios.py`` (the same runs
``tests/test_robustness_figures.py`` asserts on): five 64 px synthetic hospitals, the demo's
run config, the real ServerApp logic and ClientApp with the rounds delivered in-process,
``site-e`` misbehaving through the ``--misbehave`` mod. Records the final Dice of each run,
its per-round pooled Dice, and the rejections, in ``bench/results/robustness.json`` and in
BENCHMARKS.md. ``--suite screen`` runs ``SCREEN_SCENARIOS`` instead (the demo's 6 rounds, the
first 2-4 hospitals, the last one attacking) and also records every site's screen scores
(cosine to the round's median update, norm over the median norm), in
``bench/results/robustness-screen.json``. ``--no-record`` writes neither file: a smoke run.

    python bench/robustness.py [--suite screen] [--scenarios clean/fedavg,nan/fedavg,...]
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

from robustness_scenarios import (  # noqa: E402
    ATTACKER,
    RUN_CONFIG,
    SCENARIOS,
    LGG_SCREEN_SCENARIOS,
    SCREEN_SCENARIOS,
    SITES,
    SMALL_RUN_CONFIG,
    run_scenario,
    write_sites,
)

SECTION = "Robustness: one of five sites sends NaN or sign-flipped x5 updates"
SCREEN_SECTION = "Robustness: the update screen, one poisoning site among two to four"
SUITES = {"five": SCENARIOS, "screen": SCREEN_SCENARIOS, "screen-lgg": LGG_SCREEN_SCENARIOS}
LGG_SECTION = "Robustness: the update screen on the four LGG hospitals (false positives)"
_POOLED = re.compile(r"^round (\d+): Dice pooled ([0-9.]+)")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "robustness")
    p.add_argument("--suite", choices=tuple(SUITES), default="five")
    p.add_argument("--scenarios", default="", help="comma-separated names (default: the whole suite)")
    p.add_argument("--lgg", type=Path, default=ROOT.parent / "shared" / "data" / "lgg-flair128",
                   help="--suite screen-lgg: the LGG FLAIR 128 set (one .npz per institution)")
    p.add_argument("--jobs", type=int, default=1,
                   help="screen suites: scenarios run at once, each in its own process and $FEDSEG_HOME "
                        "(1 torch thread each)")
    p.add_argument("--no-record", action="store_true",
                   help="a smoke run: write neither the JSON under bench/results nor BENCHMARKS.md")
    return p.parse_args()


def _row(name: str, result) -> dict:  # noqa: ANN001 - ScenarioResult
    return {
        "strategy": result.scenario.strategy,
        "misbehave": list(result.scenario.misbehave),
        "run_config": result.scenario.run_config(),
        "dice_pooled": result.metrics.get("dice_pooled"),
        "dice_mean": result.metrics.get("dice_mean"),
        "dice_min": result.metrics.get("dice_min"),
        "pooled_by_round": [float(m[2]) for line in result.rounds if (m := _POOLED.match(line))],
        "rejections": len(result.rejections),
        "rejection_example": result.rejections[0] if result.rejections else None,
        "seconds": result.seconds,
    }


def _screen_row(name: str, result) -> dict:  # noqa: ANN001 - ScenarioResult
    """:func:`_row` plus the screen's per-site scores by round and who was refused when."""
    n, sites = result.scenario.sites, list(result.sites)
    attacker = result.scenario.misbehave[0].split("=")[0] if result.scenario.misbehave else None
    scores = {site: {"cosine": [v for _, v in result.history(f"site/{site}/train/screen_cosine")],
                     "norm_ratio": [v for _, v in result.history(f"site/{site}/train/screen_norm_ratio")]}
              for site in sites}
    rejected = {site: [step for step, _ in result.history(f"site/{site}/train/rejected")] for site in sites}
    honest = [s for s in sites if s != attacker]
    cos = [c for s in honest for c in scores[s]["cosine"]]
    ratio = [r for s in honest for r in scores[s]["norm_ratio"]]
    return {
        **_row(name, result),
        "sites": n,
        "attacker": attacker,
        "error": result.error,
        "screen_scores": scores,
        "rejected_rounds": rejected,
        "honest_min_cosine": min(cos) if cos else None,
        "honest_max_norm_ratio": max(ratio) if ratio else None,
    }


def screen_markdown(payload: dict) -> str:
    rows = payload["scenarios"]
    clean = {n: rows.get(f"{n}sites/clean/fedavg", {}).get("dice_pooled") for n in (2, 3, 4)}
    absent = {n: rows.get(f"{n}sites/absent/fedavg", {}).get("dice_pooled") for n in (2, 3, 4)}
    lines = [
        "The first two, three or four of the five 64 px synthetic hospitals above (seed 1), the "
        f"demo's run config (`{SMALL_RUN_CONFIG}`, min-sites one below the count, at least 2), the "
        "same in-process path, the last site (site-b, site-c or site-d) misbehaving through the "
        "`--misbehave` mod. `unscreened` runs set `screen-updates=false`; every other run uses the "
        "defaults (`screen-min-cosine=0`, `screen-max-norm-ratio=3`). Honest scores are the "
        "extremes over every honest site and round of the screen's cosine to the round's median "
        "update and norm over the median norm (with two sites: to the other site's update): the "
        "margin the defaults leave. Δ clean is against the clean screened run of the same size; Δ absent "
        "against the run in which the last site sends no update (`dropout`: it still evaluates), the "
        "fair reference for a refused attacker.\n",
        header(payload),
        "| sites | scenario | strategy | pooled Dice | Δ clean | Δ absent | worst | rejected updates "
        "(attacker / honest) | honest min cosine | honest max norm ratio | pooled Dice by round | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        n, scen = r["sites"], name.split("/", 1)[1]
        misbehave = ", ".join(r["misbehave"]) or "none"
        by_round = " ".join(f"{d:.2f}" for d in r["pooled_by_round"])
        att = len(r["rejected_rounds"].get(r["attacker"], [])) if r["attacker"] else 0
        hon = sum(len(v) for s, v in r["rejected_rounds"].items() if s != r["attacker"])
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        d = r["dice_pooled"]
        delta = lambda ref: "-" if d is None or ref is None else f"{d - ref:+.3f}"  # noqa: E731
        dice = f"none published ({r['error']})" if d is None else f"{d:.3f}"
        worst = fmt(r["dice_min"])
        lines.append(f"| {n} | {scen} ({misbehave}) | {r['strategy']} | {dice} | {delta(clean.get(n))} "
                     f"| {delta(absent.get(n))} | {worst} "
                     f"| {att} / {hon} | {fmt(r['honest_min_cosine'])} | {fmt(r['honest_max_norm_ratio'])} "
                     f"| {by_round} | {r['seconds']:.0f} |")
    lines.append("")
    lines.extend(f"- {n}" for n in payload.get("findings", []))
    return "\n".join(lines)


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
    suite = SUITES[a.suite]
    names = [n.strip() for n in a.scenarios.split(",") if n.strip()] or list(suite)
    unknown = [n for n in names if n not in suite]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(suite)}")
    work = a.work if a.suite == "five" else a.work.with_name(f"{a.work.name}-{a.suite}")
    shutil.rmtree(work, ignore_errors=True)
    t0, version = time.monotonic(), git_version()  # the code that runs, not what HEAD is at the end
    if a.suite == "screen-lgg":
        from simulation.lgg import import_lgg

        sites = import_lgg(a.lgg, work / "lgg")
    else:
        sites = write_sites(work / "sites")
    if a.suite != "five":
        _record_screen(a, _screen_rows(a, names, sites, work), t0, version)
        return
    results = {}
    for name in names:
        results[name] = run_scenario(sites, suite[name], work / "home")
        dice = results[name].metrics.get("dice_pooled")
        print(f"{name:<34} pooled Dice {'-' if dice is None else f'{dice:.3f}'}  "
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
    print("\n".join(payload["findings"]))
    if a.no_record:
        return
    write_json("robustness", payload)
    update_section(SECTION, markdown(payload))
    print(f"wrote bench/results/robustness.json and BENCHMARKS.md in {payload['total_seconds']:.0f} s")


def screen_findings(rows: dict) -> list[str]:
    out = []
    get = lambda name: rows.get(name, {}).get("dice_pooled")  # noqa: E731
    for n in (4, 3):
        clean, raw, screened, absent = (get(f"{n}sites/clean/fedavg"), get(f"{n}sites/signflip5/fedavg-unscreened"),
                                        get(f"{n}sites/signflip5/fedavg"), get(f"{n}sites/absent/fedavg"))
        if None not in (clean, raw, screened):
            vs_absent = f", {screened - absent:+.3f} vs its update absent" if absent is not None else ""
            out.append(f"{n} sites, sign-flip x5: FedAvg {clean:.3f} clean, {raw:.3f} unscreened, "
                       f"{screened:.3f} screened ({screened - clean:+.3f} vs clean{vs_absent}).")
    for n in (4, 3):
        x, y = (rows.get(f"{n}sites/signflip5/fedavg", {}).get("weights_sha256"),
                rows.get(f"{n}sites/absent/fedavg", {}).get("weights_sha256"))
        if x and y:
            out.append(f"{n} sites: the screened run's published weights are "
                       f"{'identical to the bit to' if x == y else 'NOT identical to'} those of the run "
                       "in which the attacker sends no update: a refused update has no influence.")
    median = get("4sites/signflip5/fedmedian-unscreened")
    if median is not None:
        out.append(f"FedMedian under the same attack at four sites: {median:.3f}.")
    honest = [(name, r["rejected_rounds"]) for name, r in rows.items()]
    false = [name for name, rej in honest
             if any(v for s, v in rej.items() if s != rows[name]["attacker"]) and rows[name]["sites"] > 2]
    out.append("Honest sites refused in runs of three or more sites: " + (", ".join(false) or "none") + ".")
    if "2sites/signflip5/fedavg" in rows:
        r = rows["2sites/signflip5/fedavg"]
        out.append("Two sites, one sign-flipping: no robust centre exists, the two updates conflict, both "
                   "are refused every round and the run publishes nothing"
                   + (f" ({r['error']})." if r["error"] else "."))
    out.append("Seconds are wall-clock on a machine shared with other jobs: compare Dice, not times.")
    return out


def _screen_job(job: tuple[str, str, list[Path], Path, int]) -> tuple[str, dict]:
    """One screen scenario in its own ``$FEDSEG_HOME``: its row, with the published weights' hash."""
    import hashlib

    import torch

    suite, name, sites, home, threads = job
    torch.set_num_threads(threads)
    result = run_scenario(sites, SUITES[suite][name], home)
    row = _screen_row(name, result)
    if result.version is not None:
        h = hashlib.sha256()
        for key, value in sorted(result.state_dict().items()):
            h.update(key.encode() + value.cpu().numpy().tobytes())
        row["weights_sha256"] = h.hexdigest()
    dice = row["dice_pooled"]
    print(f"{name:<34} pooled Dice {'-' if dice is None else f'{dice:.3f}'}  "
          f"({row['seconds']:.0f} s, {row['rejections']} rejected)", flush=True)
    return name, row


def _screen_rows(a: argparse.Namespace, names: list[str], sites: list[Path], work: Path) -> dict[str, dict]:
    jobs = [(a.suite, n, sites, work / ("home-" + n.replace("/", "-")), 1 if a.jobs > 1 else 2) for n in names]
    if a.jobs <= 1:
        return dict(_screen_job(j) for j in jobs)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = dict(pool.map(_screen_job, jobs))
    return {n: done[n] for n in names}


def _record_screen(a: argparse.Namespace, rows: dict, t0: float, version: str) -> None:
    name = f"robustness-{a.suite}"
    payload = {
        "benchmark": name,
        "date": now(),
        "machine": machine(),
        "command": command_line(),
        "code_version": version,
        "json": f"bench/results/{name}.json",
        "sites": SITES if a.suite == "screen" else "LGG FLAIR 128: lgg-CS, lgg-DU, lgg-FG, lgg-HT",
        "scenarios": rows,
        "jobs": a.jobs,
        "total_seconds": time.monotonic() - t0,
    }
    payload["findings"] = screen_findings(rows)
    print("\n".join(payload["findings"]))
    if a.no_record:
        import json

        print(json.dumps({n: {k: r[k] for k in ("dice_pooled", "honest_min_cosine", "honest_max_norm_ratio",
                                                "rejected_rounds")} for n, r in rows.items()}, indent=1))
        return
    write_json(name, payload)
    if a.suite == "screen":
        update_section(SCREEN_SECTION, screen_markdown(payload))
    else:
        update_section(LGG_SECTION, lgg_markdown(payload))
    print(f"wrote bench/results/{name}.json and BENCHMARKS.md in {payload['total_seconds']:.0f} s")


def lgg_markdown(payload: dict) -> str:
    lines = [
        "The four LGG hospitals of the quality benchmark (TCGA institutions CS, DU, FG, HT: "
        "276 to 1390 training slices, different scanners and patients), the demo's run config "
        f"(`{SMALL_RUN_CONFIG}`, min-sites 3), nobody misbehaving, the update screen at its "
        "defaults: does it refuse an honest non-IID site? Scores per site are the extremes over "
        "the rounds of the cosine to the round's median update and the norm over the median norm.\n",
        header(payload),
        "| scenario | pooled Dice | rejected updates | site | min cosine | max norm ratio | min norm ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in payload["scenarios"].items():
        for site, sc in r["screen_scores"].items():
            dice = "-" if r["dice_pooled"] is None else f"{r['dice_pooled']:.3f}"
            lines.append(f"| {name} | {dice} | {len(r['rejected_rounds'][site])} | {site} "
                         f"| {min(sc['cosine']):.3f} | {max(sc['norm_ratio']):.3f} | {min(sc['norm_ratio']):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
