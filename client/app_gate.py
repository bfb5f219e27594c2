"""The site's decision on an app package (FAB), made by site-installed code before any of it runs.

The site runner (:mod:`client.site_runner`) calls :meth:`AppGate.decide` with the FAB bytes the
SuperNode received for a task, before Flower installs or imports anything from them. The gate

1. checks that the bytes are the FAB the run names (their SHA-256 is the run's FAB hash),
2. reads the site's ``policy.toml`` afresh (an edit applies to the next message),
3. hashes the archive and verifies a publisher's signature (:mod:`client.app_trust`) and
   decides with the same rules as the ClientApp's own check (:func:`client.policy.check_app`),
4. writes the decision to the site's audit log: ``app-verified`` or ``refusal``.

The runner requires an ``[apps]`` rule: a policy without one allows every package, which is no
code trust at all, so the gate refuses rather than let anything run.

What leaves the site on a refusal is :attr:`AppDecision.public_reason`: the rule and the
package's hashes, never the policy's path or anything else of the site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imaging.failure_codes import new_failure_ref, render_failure

from .app_trust import AppIdentity, fab_bytes_identity
from .audit import AuditLog
from .errors import AuditError, PolicyError, PolicyViolation
from .policy import SitePolicy, check_app, load_policy

__all__ = ["REFUSAL_CODE", "AppDecision", "AppGate", "require_app_rules"]

#: The failure code (:mod:`imaging.failure_codes`) of every refusal the coordinator sees from the runner.
REFUSAL_CODE = "FEDSEG-APP-001"


@dataclass(frozen=True)
class AppDecision:
    """The gate's verdict on one package.

    ``rule`` is the policy rule that allowed or refused it (``apps.allowed_hashes``,
    ``apps.trusted_publishers``, ``apps`` (no rule, or a package that is not the run's FAB),
    ``policy-file`` or ``audit``); ``detail`` is the local explanation, which may name the
    policy file and stays at the site.
    """

    allowed: bool
    rule: str
    identity: AppIdentity
    detail: str
    ref: str = field(default_factory=new_failure_ref)  # names the refusal in the audit log

    @property
    def public_reason(self) -> str:
        """What the coordinator is told: ``FEDSEG-APP-001`` with the rule and the package's hashes."""
        if self.allowed:
            return f"app allowed by the site policy (rule {self.rule})"
        app = self.identity
        return render_failure(REFUSAL_CODE, ref=self.ref, rule=self.rule,
                              fab_sha256=(app.fab_sha256 or "unknown").lower(),
                              content_sha256=(app.content_sha256 or "unknown").lower(),
                              signed="signed" if app.signature else "not signed")


def require_app_rules(policy: SitePolicy) -> None:
    """Refuse a policy that sets no ``[apps]`` rule: under it every package would run."""
    if not policy.restricts_apps:
        raise PolicyViolation(
            f"site policy {policy.source} sets no [apps] rule (allowed_hashes or "
            "trusted_publishers): the site runner allows no app package without one",
            rule="apps",
        )


@dataclass(frozen=True)
class AppGate:
    """Decides on FABs against ``policy_file`` and records each decision in ``audit_file``."""

    policy_file: Path
    audit_file: Path

    def decide(self, fab: bytes, *, fab_hash: str, run_id: int, server_round: int, kind: str) -> AppDecision:
        """Allow or refuse the FAB ``fab`` that the run names by ``fab_hash``; never raises.

        Nothing in ``fab`` is imported, installed or executed: the archive is only read.
        """
        identity = fab_bytes_identity(fab)
        decision = self._judge(identity, fab_hash)
        where = {"run_id": str(run_id), "round": server_round, "kind": kind}
        audit = AuditLog(self.audit_file)
        try:
            if decision.allowed:
                audit.append("app-verified", **where, allowed_by=decision.detail, by="site-runner",
                             app=identity.to_record())
            else:
                audit.append("refusal", **where, rule=decision.rule, reason=decision.detail,
                             by="site-runner", app=identity.to_record(), code=REFUSAL_CODE,
                             ref=decision.ref, sent=decision.public_reason)
        except AuditError as exc:  # an unrecorded decision is no decision: refuse
            return AppDecision(False, "audit", identity, f"the decision cannot be recorded: {exc}")
        return decision

    def _judge(self, identity: AppIdentity, fab_hash: str) -> AppDecision:
        if identity.fab_sha256 != fab_hash.lower():
            return AppDecision(False, "apps", identity,
                               f"the package's SHA-256 {identity.fab_sha256} is not the run's FAB hash "
                               f"{fab_hash}")
        try:
            if not Path(self.policy_file).is_file():  # load_policy would allow everything
                raise PolicyError(f"the site policy {self.policy_file} does not exist")
            policy = load_policy(self.policy_file)
        except PolicyError as exc:
            return AppDecision(False, "policy-file", identity, str(exc))
        try:
            require_app_rules(policy)
            allowed_by = check_app(identity, policy)
        except PolicyViolation as exc:
            return AppDecision(False, exc.rule or "apps", identity, str(exc))
        return AppDecision(True, allowed_by.split(" ", 1)[0], identity, allowed_by)

