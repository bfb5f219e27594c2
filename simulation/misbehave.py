"""Misbehaving virtual sites, so users (and tests) can try a strategy before trusting it.

``--misbehave SITE=KIND[:FACTOR]``: the named simulated site runs the real ClientApp, then a
Flower mod corrupts its training reply:

- ``nan``: every weight becomes NaN;
- ``signflip[:F]``: the update is reversed and scaled, ``w = g - F (w_site - g)`` (F = 1);
- ``scale:F``: the update is scaled, ``w = g + F (w_site - g)``;
- ``dropout``: the site fails mid-round (an error reply, no update);
- ``straggle[:S]``: the reply is held back S seconds (default 30) before it is sent;
- ``impersonate``: the reply claims the name of the next site (in name order);
- ``inflate[:N]``: the reply claims N samples (default 10⁹), FedAvg's weight.

The site still signs what it sends with its own node key (it holds it): the coordinator's
identity checks, not the mod, decide whether the claim passes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable, Mod

from imaging.replies import ARRAYS_RECORD, METRICS_RECORD, NUM_EXAMPLES, SITE_RECORD, SiteFacts

from .errors import SimulationError

__all__ = ["KINDS", "Misbehavior", "parse_misbehavior", "misbehave_mod"]

KINDS = ("nan", "signflip", "scale", "dropout", "straggle", "impersonate", "inflate")
_DEFAULT_FACTOR = {"nan": 0.0, "signflip": 1.0, "scale": 1.0, "dropout": 0.0, "straggle": 30.0,
                   "impersonate": 0.0, "inflate": 1e9}


class SimulatedDropout(RuntimeError):
    """Raised by a site told to drop out mid-round."""


@dataclass(frozen=True)
class Misbehavior:
    site: str
    kind: str
    factor: float


def parse_misbehavior(specs: Sequence[str], known_sites: Sequence[str]) -> dict[str, Misbehavior]:
    """``["site-b=signflip:5", ...]`` -> plan by site name; refuses unknown sites and kinds."""
    plan: dict[str, Misbehavior] = {}
    for spec in specs:
        site, sep, rest = spec.partition("=")
        kind, _, raw_factor = rest.partition(":")
        if not sep or not site or not kind:
            raise SimulationError(f"--misbehave {spec!r} is not SITE=KIND[:FACTOR]")
        if site not in known_sites:
            raise SimulationError(f"--misbehave names unknown site {site!r}; sites: {', '.join(known_sites)}")
        if kind not in KINDS:
            raise SimulationError(f"--misbehave kind {kind!r} is not one of {', '.join(KINDS)}")
        try:
            factor = float(raw_factor) if raw_factor else _DEFAULT_FACTOR[kind]
        except ValueError as exc:
            raise SimulationError(f"--misbehave factor {raw_factor!r} is not a number") from exc
        if not math.isfinite(factor) or (kind in ("scale", "signflip", "straggle", "inflate") and factor <= 0):
            raise SimulationError(f"--misbehave {spec!r}: the factor must be a positive number")
        if site in plan:
            raise SimulationError(f"--misbehave names site {site!r} twice")
        plan[site] = Misbehavior(site, kind, factor)
    return plan


def _corrupt(sent: ArrayRecord, received: ArrayRecord, behavior: Misbehavior) -> ArrayRecord:
    out = {}
    for key, array in received.items():
        w = array.numpy()
        g = sent[key].numpy() if key in sent else w
        if behavior.kind == "nan":
            new = np.full_like(w, np.nan)
        elif behavior.kind == "signflip":
            new = g - behavior.factor * (w - g)
        else:  # scale
            new = g + behavior.factor * (w - g)
        out[key] = Array(np.ascontiguousarray(new.astype(w.dtype, copy=False)))
    return ArrayRecord(out)


def misbehave_mod(plan: Mapping[str, Misbehavior], site_dirs: Sequence[Path]) -> Mod:
    """A Flower mod for the train handler: virtual node k misbehaves as ``plan`` says for site k."""
    names = [Path(p).name for p in site_dirs]

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        index = context.node_config.get("partition-id")
        behavior = plan.get(names[int(index)]) if index is not None else None
        if behavior is None:
            return call_next(message, context)
        if behavior.kind == "dropout":
            raise SimulatedDropout(f"site {behavior.site} dropped out mid-round (--misbehave)")
        reply = call_next(message, context)
        if behavior.kind == "straggle":
            time.sleep(behavior.factor)
            return reply
        if reply.has_error() or ARRAYS_RECORD not in reply.content:
            return reply
        if behavior.kind == "impersonate":
            facts = SiteFacts.from_record(reply.content[SITE_RECORD])
            other = names[(names.index(behavior.site) + 1) % len(names)]
            reply.content[SITE_RECORD] = ConfigRecord(replace(facts, site_name=other).to_record())
        elif behavior.kind == "inflate":
            metrics = dict(reply.content[METRICS_RECORD])
            reply.content[METRICS_RECORD] = MetricRecord({**metrics, NUM_EXAMPLES: int(behavior.factor)})
        else:
            reply.content[ARRAYS_RECORD] = _corrupt(message.content[ARRAYS_RECORD],
                                                    reply.content[ARRAYS_RECORD], behavior)
        return reply

    return mod
