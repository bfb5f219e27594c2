"""The site's own policy (``policy.toml``): what the hospital allows a federation to do.

```toml
[apps]        # which apps may run (either rule suffices; neither: any app)
allowed_hashes = ["sha256:<64 hex>"]       # FAB hash or content hash (`fedseg site app-hash`)
trusted_publishers = ["keys/consortium.pub.pem"]  # Ed25519: PEM/OpenSSH file, ssh-ed25519 line, base64
[training]
max_local_epochs = 2
[privacy]                 # floors and caps the run config cannot lower
require_dp = true         # refuse training without DP-SGD
epsilon_budget = 8.0      # total ε on this site's data, composed across every run and model
budget_scope = "site"     # the site's name for the data set the budget covers (default "site")
min_noise_multiplier = 1.0
max_epsilon_per_run = 2.0
max_rounds = 10           # train messages per run that read data (retries included)
max_evaluations = 12      # evaluate messages per run that read data
[metrics]
allowed = ["num-examples", "train-loss", "dice",  # which metric keys may leave the site;
           "dice-intersection", "dice-predicted", "dice-truth"]  # without these: no pooled Dice
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
from privacy import DEFAULT_SCOPE

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
    "privacy": {"require_dp", "epsilon_budget", "budget_scope", "min_noise_multiplier",
                "max_epsilon_per_run", "max_rounds", "max_evaluations"},
    "training": {"max_local_epochs"},
    "apps": {"allowed_hashes", "trusted_publishers"},
    "metrics": {"allowed"},
}
_HASH = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")
_SCOPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class SitePolicy:
    require_dp: bool = False
    epsilon_budget: float | None = None  # total ε this site spends on its data (one budget scope)
    max_local_epochs: int | None = None
    source: str = "default (no policy file)"
    allowed_hashes: frozenset[str] = frozenset()  # lower-case hex, FAB or content hash
    trusted_publishers: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)  # by fingerprint
    allowed_metrics: frozenset[str] | None = None  # None: every metric may leave
    budget_scope: str = DEFAULT_SCOPE  # the ledger scope DP rounds spend, whatever the run's names
    min_noise_multiplier: float | None = None  # floor on DP-SGD's σ
    max_epsilon_per_run: float | None = None  # cap on the ε one run spends at this site
    max_rounds: int | None = None  # train messages per run that may read data
    max_evaluations: int | None = None  # evaluate messages per run that may read data

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
    if not isinstance(require_dp, bool):
        raise PolicyError(f"{path}: privacy.require_dp must be true or false")
    scope = privacy.get("budget_scope", DEFAULT_SCOPE)
    if not isinstance(scope, str) or not _SCOPE.match(scope):
        raise PolicyError(f"{path}: privacy.budget_scope must be 1-64 letters, digits, '.', '_' or '-'")
    hashes = _hashes(_strings(apps, "allowed_hashes", f"{path} [apps]") or [], path)
    keys = [load_public_key(spec, path.parent)
            for spec in _strings(apps, "trusted_publishers", f"{path} [apps]") or []]
    allowed = _strings(metrics, "allowed", f"{path} [metrics]")
    return SitePolicy(
        require_dp, _number(privacy, "epsilon_budget", path, "privacy"),
        _integer(training, "max_local_epochs", path, "training", minimum=1), str(path),
        allowed_hashes=hashes,
        trusted_publishers={public_key_fingerprint(k): k for k in keys},
        allowed_metrics=frozenset(allowed) if allowed is not None else None,
        budget_scope=scope,
        min_noise_multiplier=_number(privacy, "min_noise_multiplier", path, "privacy"),
        max_epsilon_per_run=_number(privacy, "max_epsilon_per_run", path, "privacy"),
        max_rounds=_integer(privacy, "max_rounds", path, "privacy", minimum=1),
        max_evaluations=_integer(privacy, "max_evaluations", path, "privacy", minimum=0),
    )


def _number(section: dict[str, Any], key: str, path: Path, name: str) -> float | None:
    """A positive finite number, or None when absent."""
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise PolicyError(f"{path}: {name}.{key} must be a positive number")
    return float(value)


def _integer(section: dict[str, Any], key: str, path: Path, name: str, *, minimum: int) -> int | None:
    """An integer >= ``minimum``, or None when absent."""
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise PolicyError(f"{path}: {name}.{key} must be {kind}")
    return value


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
