"""The site's own policy (``policy.toml``): what the hospital allows a federation to do.

```toml
[apps]        # which apps may run (either rule suffices; neither: any app)
allowed_hashes = ["sha256:<64 hex>"]       # FAB hash or content hash (`fedseg site app-hash`)
trusted_publishers = ["keys/consortium.pub.pem"]  # Ed25519: PEM/OpenSSH file, ssh-ed25519 line, base64
[training]
max_local_epochs = 2
[privacy]
require_dp = true
epsilon_budget = 8.0      # per consortium and model, composed across runs
[metrics]
allowed = ["num-examples", "train-loss", "dice"]  # which metric keys may leave the site
```

A simulated site keeps its policy in its own folder; a real node names it with ``policy-file``
in its node config (default: ``policy.toml`` beside the site's config or in its data folder).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from imaging.replies import NUM_EXAMPLES

from .app_trust import AppIdentity, load_public_key, public_key_fingerprint, verify_app_signature
from .errors import PolicyError, PolicyViolation

__all__ = [
    "POLICY_FILE",
    "REQUIRED_METRICS",
    "SitePolicy",
    "check_app",
    "check_required_metrics",
    "filter_metrics",
    "load_policy",
]

POLICY_FILE = "policy.toml"
#: Metrics a reply cannot go without (FedAvg's weight): disallowing one refuses every round.
REQUIRED_METRICS = frozenset({NUM_EXAMPLES})
_KNOWN = {
    "privacy": {"require_dp", "epsilon_budget"},
    "training": {"max_local_epochs"},
    "apps": {"allowed_hashes", "trusted_publishers"},
    "metrics": {"allowed"},
}
_HASH = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")


@dataclass(frozen=True)
class SitePolicy:
    require_dp: bool = False
    epsilon_budget: float | None = None  # total ε this site spends per consortium and model
    max_local_epochs: int | None = None
    source: str = "default (no policy file)"
    allowed_hashes: frozenset[str] = frozenset()  # lower-case hex, FAB or content hash
    trusted_publishers: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)  # by fingerprint
    allowed_metrics: frozenset[str] | None = None  # None: every metric may leave

    @property
    def restricts_apps(self) -> bool:
        return bool(self.allowed_hashes or self.trusted_publishers)


def _section(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise PolicyError(f"{path}: [{name}] must be a table")
    unknown = set(section) - _KNOWN[name]
    if unknown:
        raise PolicyError(f"{path}: unknown key(s) {sorted(unknown)} in [{name}]")
    return section


def _strings(section: dict[str, Any], key: str, where: str) -> list[str] | None:
    if key not in section:
        return None
    value = section[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PolicyError(f"{where}: {key} must be a list of non-empty strings")
    return [v.strip() for v in value]


def _hashes(values: list[str], path: Path) -> frozenset[str]:
    out = set()
    for value in values:
        match = _HASH.match(value)
        if not match:
            raise PolicyError(f"{path}: apps.allowed_hashes entry {value!r} is not a SHA-256 "
                              "(64 hex digits, optionally prefixed 'sha256:')")
        out.add(match.group(1).lower())
    return frozenset(out)


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
    apps, metrics = _section(data, "apps", path), _section(data, "metrics", path)
    require_dp = privacy.get("require_dp", False)
    budget = privacy.get("epsilon_budget")
    epochs = training.get("max_local_epochs")
    if not isinstance(require_dp, bool):
        raise PolicyError(f"{path}: privacy.require_dp must be true or false")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise PolicyError(f"{path}: privacy.epsilon_budget must be a positive number")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise PolicyError(f"{path}: training.max_local_epochs must be a positive integer")
    hashes = _hashes(_strings(apps, "allowed_hashes", f"{path} [apps]") or [], path)
    keys = [load_public_key(spec, path.parent)
            for spec in _strings(apps, "trusted_publishers", f"{path} [apps]") or []]
    allowed = _strings(metrics, "allowed", f"{path} [metrics]")
    return SitePolicy(
        require_dp, float(budget) if budget is not None else None, epochs, str(path),
        allowed_hashes=hashes,
        trusted_publishers={public_key_fingerprint(k): k for k in keys},
        allowed_metrics=frozenset(allowed) if allowed is not None else None,
    )


def check_app(app: AppIdentity, policy: SitePolicy) -> str:
    """Refuse an app the policy does not allow; return how it was allowed (for the audit log).

    Allowed when ``[apps]`` sets no rule, when its FAB or content hash is in ``allowed_hashes``,
    or when it carries a valid signature by one of ``trusted_publishers``.
    """
    if not policy.restricts_apps:
        return "no [apps] rule"
    if app.error:
        raise PolicyViolation(f"site policy {policy.source} restricts which apps may run ([apps]) "
                              f"but the app cannot be identified: {app.error}", rule="apps")
    for kind, value in (("FAB hash", app.fab_sha256), ("content hash", app.content_sha256)):
        if value and value in policy.allowed_hashes:
            return f"apps.allowed_hashes ({kind} {value[:16]}...)"
    signer = verify_app_signature(app, dict(policy.trusted_publishers))
    if signer:
        return f"apps.trusted_publishers (key {signer[:16]}...)"
    rules = [r for r, on in (("allowed_hashes", policy.allowed_hashes),
                             ("trusted_publishers", policy.trusted_publishers)) if on]
    signed = (f"signed by key {str(app.signature.get('fingerprint', '?'))[:16]}..." if app.signature
              else "not signed")
    raise PolicyViolation(
        f"site policy {policy.source} does not allow this app ([apps] {' / '.join(rules)}): "
        f"{app.fab_id} {app.fab_version}, FAB hash {app.fab_sha256}, content hash "
        f"{app.content_sha256}, {signed}",
        rule="apps." + rules[0] if len(rules) == 1 else "apps",
    )


def check_required_metrics(policy: SitePolicy) -> None:
    """Refuse every round when the policy forbids a metric no reply can go without."""
    if policy.allowed_metrics is None:
        return
    missing = sorted(REQUIRED_METRICS - policy.allowed_metrics)
    if missing:
        raise PolicyViolation(
            f"site policy {policy.source} does not let {missing} leave the site ([metrics] allowed), "
            "but every reply needs it (FedAvg's weight): the site takes part in no round",
            rule="metrics.allowed",
        )


def filter_metrics(metrics: Mapping[str, Any], policy: SitePolicy) -> tuple[dict[str, Any], list[str]]:
    """The metrics the policy lets leave, and the keys it dropped."""
    if policy.allowed_metrics is None:
        return dict(metrics), []
    check_required_metrics(policy)
    kept = {k: v for k, v in metrics.items() if k in policy.allowed_metrics}
    return kept, sorted(set(metrics) - set(kept))
