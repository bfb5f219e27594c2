"""Quality benchmark: centralized vs each site alone vs the federation, on the LGG DICOM hospitals.

Same patient-level train/test split (one seed) and the same number of passes over each site's
data for every method. The federation runs through the real ServerApp/ClientApp on Flower's
simulation engine and its model is read back from the registry.

    python bench/quality.py [--rounds 10 --local-epochs 1 --image-size 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command_line, evaluate_sites, git_version, header, machine, now, update_section, write_json  # noqa: E402

from imaging.model import build_unet, load_state_dict, select_device  # noqa: E402
from imaging.site_data import load_site_dataset  # noqa: E402
from imaging.spec import ModelSpec  # noqa: E402
from imaging.training import train_epochs  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "lgg-flair128")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "quality")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", default="16,32,64")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-patients", type=int, default=None, help="per site, for a quick run")
    p.add_argument("--no-record", action="store_true", help="do not touch BENCHMARKS.md")
    return p.parse_args()


def _train(spec: ModelSpec, images: np.ndarray, masks: np.ndarray, a: argparse.Namespace,
           device: torch.device) -> torch.nn.Module:
    torch.manual_seed(a.seed)
    net = build_unet(spec)
    train_epochs(net, images, masks, epochs=a.rounds * a.local_epochs, batch_size=a.batch_size,
                 learning_rate=a.learning_rate, device=device, seed=a.seed)
    return net


def _federate(sites_dir: Path, spec: ModelSpec, a: argparse.Namespace) -> dict[str, torch.Tensor]:
    os.environ["FEDSEG_HOME"] = str(a.work / "home")
    from registry import default_store, list_versions, load_model
    from simulation.engine import run_simulated_federation
    from simulation.run_command import configure_logging

    configure_logging(verbose=False)
    name = "lgg-bench"
    run_simulated_federation(sites_dir, run_config=(
        f"num-server-rounds={a.rounds} local-epochs={a.local_epochs} batch-size={a.batch_size} "
        f"learning-rate={a.learning_rate} image-size={spec.image_size} unet-channels='{a.channels}' "
        f"seed={a.seed} test-fraction={a.test_fraction} model-name='{name}' min-sites=4"))
    store = default_store()
    latest = max(v["version"] for v in list_versions(store, name))
    return load_model(store, f"models:/{name}/{latest}").state_dict


def main() -> None:
    a = _args()
    from simulation.lgg import LGG_SITES, import_lgg

    sites_dir = a.work / "sites"
    marker = sites_dir / f".imported-{a.max_patients}"
    if not marker.exists():
        print(f"importing LGG as DICOM hospitals into {sites_dir} ...", flush=True)
        import_lgg(a.data, sites_dir, max_patients_per_site=a.max_patients, overwrite=True)
        marker.touch()
    spec = ModelSpec(channels=tuple(int(c) for c in a.channels.split(",")), image_size=a.image_size)
    device = select_device()
    t0 = time.monotonic()
    data = {
        p.name: load_site_dataset(p, spec, test_fraction=a.test_fraction, seed=a.seed)
        for p in sorted(sites_dir.iterdir()) if p.is_dir()
    }
    assert len(data) == len(LGG_SITES), sorted(data)
    print("sites: " + ", ".join(f"{s} train {d.num_train} / test {d.num_test} slices "
                                f"({d.train_patients}/{d.test_patients} patients)" for s, d in data.items()),
          flush=True)
    results: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}

    t = time.monotonic()
    pooled_x = np.concatenate([d.train_images for d in data.values()])
    pooled_y = np.concatenate([d.train_masks for d in data.values()])
    results["centralized"] = evaluate_sites(_train(spec, pooled_x, pooled_y, a, device), data, device)
    seconds["centralized"] = time.monotonic() - t
    print("centralized", results["centralized"], flush=True)

    for site, d in data.items():
        t = time.monotonic()
        results[f"alone: {site}"] = evaluate_sites(_train(spec, d.train_images, d.train_masks, a, device), data, device)
        seconds[f"alone: {site}"] = time.monotonic() - t
        print(f"alone {site}", results[f"alone: {site}"], flush=True)

    t = time.monotonic()
    state = _federate(sites_dir, spec, a)
    results["federated (FedAvg)"] = evaluate_sites(load_state_dict(spec, state), data, device)
    seconds["federated (FedAvg)"] = time.monotonic() - t
    print("federated", results["federated (FedAvg)"], flush=True)

    fed, central = results["federated (FedAvg)"], results["centralized"]
    better = {s: fed[s] > results[f"alone: {s}"][s] for s in data}
    payload = {
        "benchmark": "quality-lgg",
        "date": now(),
        "machine": machine(),
        "command": command_line(),
        "code_version": git_version(),
        "json": "bench/results/quality-lgg.json",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "sites": {s: {"train_slices": d.num_train, "test_slices": d.num_test,
                      "train_patients": d.train_patients, "test_patients": d.test_patients}
                  for s, d in data.items()},
        "dice": results,
        "seconds": seconds,
        "federated_over_centralized_pooled": fed["pooled"] / central["pooled"] if central["pooled"] else None,
        "sites_better_than_alone": better,
        "total_seconds": time.monotonic() - t0,
    }
    write_json("quality-lgg", payload)
    if a.no_record:
        return
    cols = [*data, "pooled", "mean", "worst"]
    lines = [
        "Dice (pooled over voxels) on each site's held-out patients; rows are training regimes with "
        f"the same {a.rounds * a.local_epochs} passes over each site's data "
        f"({a.rounds} rounds x {a.local_epochs} local epoch(s) for the federation). "
        "`alone: X` is trained on X only and scored on every site; the diagonal is what X gets "
        "by itself.\n",
        header(payload),
        "| training | " + " | ".join(cols) + " | seconds |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + f" | {seconds[name]:.0f} |")
    ratio = payload["federated_over_centralized_pooled"]
    lines.append("")
    lines.append(f"Federated / centralized (pooled test Dice): **{ratio:.3f}** (goal >= 0.99). "
                 f"Sites better off federated than alone: **{sum(better.values())}/{len(better)}**"
                 + (f" (not: {', '.join(s for s, b in better.items() if not b)})." if not all(better.values()) else "."))
    update_section("Segmentation quality on LGG: centralized vs alone vs federated", "\n".join(lines))
    print(f"wrote BENCHMARKS.md and bench/results/quality-lgg.json in {payload['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
