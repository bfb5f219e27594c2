"""The site's own policy (``policy.toml``): what the hospital allows a federation to do.

Today: the privacy rules (DP required, ε budget) and the maximum local epochs. A simulated site
keeps its policy in its own folder; a real node names it with ``policy-file`` in its node config.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PolicyError

__all__ = ["SitePolicy", "load_policy", "POLICY_FILE"]

POLICY_FILE = "policy.toml"
_KNOWN = {"privacy": {"require_dp", "epsilon_budget"}, "training": {"max_local_epochs"}}


@dataclass(frozen=True)
class SitePolicy:
    require_dp: bool = False
    epsilon_budget: float | None = None  # total ε this site spends per consortium and model
    max_local_epochs: int | None = None
    source: str = "default (no policy file)"


def _section(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise PolicyError(f"{path}: [{name}] must be a table")
    unknown = set(section) - _KNOWN[name]
    if unknown:
        raise PolicyError(f"{path}: unknown key(s) {sorted(unknown)} in [{name}]")
    return section


def load_policy(path: Path | None) -> SitePolicy:
    """Read ``path``; no file means the permissive default (and says so in ``source``)."""
    if path is None or not Path(path).is_file():
        return SitePolicy()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"cannot read site policy {path}: {exc}") from exc
    unknown = set(data) - set(_KNOWN)
    if unknown:
        raise PolicyError(f"{path}: unknown section(s) {sorted(unknown)}")
    privacy, training = _section(data, "privacy", path), _section(data, "training", path)
    require_dp = privacy.get("require_dp", False)
    budget = privacy.get("epsilon_budget")
    epochs = training.get("max_local_epochs")
    if not isinstance(require_dp, bool):
        raise PolicyError(f"{path}: privacy.require_dp must be true or false")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise PolicyError(f"{path}: privacy.epsilon_budget must be a positive number")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise PolicyError(f"{path}: training.max_local_epochs must be a positive integer")
    return SitePolicy(require_dp, float(budget) if budget is not None else None, epochs, str(path))
