"""FedBN-style local normalisation: each site keeps its own normalisation layers.

With ``local-norm = true`` in the run config, a site overwrites the normalisation parameters of
every global model it receives with its own, trains, and keeps the trained ones for the next
round. The update it sends still carries every array (the coordinator's checks expect the full
model). The published model carries the averaged layers, a starting point for a hospital that
joins later, so a site evaluates the model it received as it is (the published model's own
Dice, which the promotion gates read) and, beside it, its personalised variant with its own
layers (``local-norm-dice`` and its voxel counts).

The site's layers live in ``$FEDSEG_HOME/local-norm/<site>/<run>.pt``, one file per Flower run.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from imaging.home import fedseg_home
from imaging.norm_layers import norm_parameter_names

__all__ = ["apply_local_norm", "keep_local_norm", "local_norm_path"]


def local_norm_path(site: str, run_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", site)
    return fedseg_home() / "local-norm" / safe / f"run-{re.sub(r'[^0-9A-Za-z_-]', '_', run_id)}.pt"


def apply_local_norm(net: torch.nn.Module, site: str, run_id: str) -> int:
    """Overwrite ``net``'s normalisation parameters with the site's own; how many were put back.

    0 before the site's first round in this run (it starts from the global ones).
    """
    path = local_norm_path(site, run_id)
    if not path.is_file():
        return 0
    saved = torch.load(path, map_location="cpu", weights_only=True)
    names = norm_parameter_names(net.state_dict().keys(), net)
    if set(saved) != set(names):
        raise ValueError(f"local normalisation layers in {path} do not match this model "
                         f"({len(saved)} saved, {len(names)} expected); delete the file to start afresh")
    net.load_state_dict(saved, strict=False)
    return len(saved)


def keep_local_norm(net: torch.nn.Module, site: str, run_id: str) -> Path:
    """Save ``net``'s normalisation parameters as the site's own (atomically)."""
    module = getattr(net, "_module", net)  # Opacus' GradSampleModule wraps the network
    state = module.state_dict()
    names = norm_parameter_names(state.keys(), module)
    path = local_norm_path(site, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        torch.save({k: state[k].detach().cpu().clone() for k in names}, handle)
    os.replace(tmp, path)
    return path
