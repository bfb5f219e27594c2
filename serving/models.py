"""Which model versions the service serves, and how it follows the registry.

:class:`ModelManager` (``app.state.models``) holds two roles, each a
:class:`~serving.state.ModelState`:

- ``champion``: follows ``FEDSEG_SERVE_MODEL_URI`` (``models:/NAME@champion`` by default);
- ``challenger``: follows ``FEDSEG_SERVE_CHALLENGER_URI`` (``models:/NAME@challenger``), loaded
  only while ``canary_share > 0``.

Every ``reload_seconds`` a background thread asks the registry which version each alias names
(:data:`VersionResolver`, one cheap query). When it moved (``fedseg registry promote``,
``fedseg registry rollback``), the new version is loaded, its signature verified by the loader,
the network rebuilt and warmed up by one dummy forward, all in that thread; then the role's
predictor is swapped in one assignment. Requests that already hold the old predictor finish on it;
no request waits for a load or fails because of one. A version that fails to load (a signature
that does not verify, weights that do not fit the spec) is not swapped in: the old version keeps
serving, the failure is counted (``fedseg_model_reloads_total{outcome="failed"}``) and shown by
``GET /v2/models/{name}``, and that version is not tried again until the alias moves.

The challenger comes and goes with its alias (``fedseg registry challenger NAME VERSION`` and
``fedseg registry challenger NAME --clear``). When the registry answers that the alias names no
version, the challenger role is unloaded at that check (outcome ``"unloaded"``, then ``"absent"``
while it stays so): every study goes to the champion, ``GET /v2/models/{name}`` lists no challenger
version and ``fedseg_model_info`` has no ``role="challenger"`` series. That is not a failed reload:
nothing is counted as failed and the service stays ready. When the alias is set again (or moved),
the version is loaded and warmed like any other before the first study is routed to it. A registry
that cannot be asked (unreachable) is not an absent alias: the challenger then keeps serving.

``DELETE /v1/admin/canary`` (:meth:`ModelManager.drop_challenger`) is the immediate drop: the
share becomes 0 at once, no registry check is awaited, and the alias is not looked at again until
``PUT /v1/admin/canary`` turns the canary back on (or the service restarts with its settings).

Canary routing is sticky per study: a study goes to the challenger when
:func:`canary_bucket` of its StudyInstanceUID is below the share, so every series of a study meets
the same version, and raising the share only moves studies from champion to challenger.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from imaging.errors import ImagingError
from imaging.volume import Volume
from registry.challenger import resolve_alias_version
from registry.errors import ModelNotFoundError, RegistryError
from registry.load import LoadedModel
from registry.store import default_store
from registry.uri import parse_model_uri

from .errors import ModelLoadError
from .metrics import count_reload, set_model_info
from .predictor import Prediction, Predictor
from .state import ModelState

__all__ = [
    "CHAMPION",
    "CHALLENGER",
    "ModelLoader",
    "ModelManager",
    "PredictorFactory",
    "Reload",
    "VersionResolver",
    "canary_bucket",
    "registry_resolver",
]

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"

#: ``uri -> LoadedModel`` (verifies the signature): the seam that tests and the CLI replace.
ModelLoader = Callable[[str], LoadedModel]
#: ``models:/NAME@ALIAS -> version`` the alias names now.
VersionResolver = Callable[[str], int]
#: Rebuilds and warms up the network of a loaded version.
PredictorFactory = Callable[[LoadedModel], Predictor]


def registry_resolver(uri: str) -> int:
    """The version ``uri`` names in the default registry store.

    Raises :class:`~registry.errors.ModelNotFoundError` only when the registry answers that the
    model, version or alias is not there; :class:`~registry.errors.RegistryError` when it cannot
    be asked.
    """
    return resolve_alias_version(default_store(), uri)


def canary_bucket(key: str) -> float:
    """A stable number in [0, 1) for ``key`` (a StudyInstanceUID), uniform over keys."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Reload:
    """What one registry check did for one role.

    Attributes
    ----------
    role : str
        ``champion`` or ``challenger``.
    previous, version : int or None
        The version served before and after.
    outcome : str
        ``"ok"`` (a version was swapped in), ``"unchanged"``, ``"failed"`` (loading failed; the
        previous version still serves), ``"unresolved"`` (the registry could not say),
        ``"unloaded"`` (the challenger's alias names no version any more: it was unloaded) or
        ``"absent"`` (the challenger's alias names no version; nothing to serve).
    detail : str
        The error, for ``failed`` and ``unresolved``; why, for ``unloaded`` and ``absent``.
    """

    role: str
    previous: int | None
    version: int | None
    outcome: str
    detail: str = ""


def _describe(exc: Exception) -> str:
    if isinstance(exc, (RegistryError, ImagingError, ModelLoadError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class ModelManager:
    """The champion, the optional challenger, canary routing and registry following.

    Parameters
    ----------
    champion_uri : str
        What the champion role follows.
    challenger_uri : str
        What the challenger role follows while ``canary_share > 0``.
    canary_share : float
        Share of studies routed to the challenger (0..1).
    loader : ModelLoader
        Loads (and verifies) a version.
    factory : PredictorFactory
        Builds and warms up a :class:`Predictor`.
    resolver : VersionResolver, optional
        Without one the service loads each role once and does not follow the registry.
    reload_seconds : float
        Interval of the background registry check; 0 disables it.
    """

    def __init__(
        self,
        *,
        champion_uri: str,
        challenger_uri: str,
        canary_share: float,
        loader: ModelLoader,
        factory: PredictorFactory,
        resolver: VersionResolver | None = None,
        reload_seconds: float = 0.0,
    ) -> None:
        _check_share(canary_share)
        self.champion = ModelState(model_uri=champion_uri, role=CHAMPION)
        self.challenger = ModelState(model_uri=challenger_uri, role=CHALLENGER)
        if canary_share == 0:
            self.challenger.reason = "no canary: the canary share is 0"
        self._share = float(canary_share)
        self._loader = loader
        self._factory = factory
        self._resolver = resolver
        self.reload_seconds = float(reload_seconds)
        self._lock = threading.Lock()  # one load sequence at a time (poller, admin calls)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ routing

    @property
    def canary_share(self) -> float:
        return self._share

    @property
    def following(self) -> bool:
        """Whether a background thread follows the registry."""
        return self._thread is not None and self._thread.is_alive()

    def select(self, study_uid: str) -> Predictor:
        """The predictor for a study: the challenger for the canary share of studies, else the
        champion.

        Raises
        ------
        serving.errors.ModelNotReadyError
            No champion is loaded (the service is not ready).
        """
        champion = self.champion.require()
        challenger = self.challenger.predictor
        share = self._share
        if challenger is not None and share > 0 and canary_bucket(study_uid) < share:
            return challenger
        return champion

    def predict(self, volume: Volume) -> tuple[Prediction, Predictor]:
        """Segment and triage ``volume`` with the version its study is routed to.

        Returns
        -------
        tuple[Prediction, Predictor]
            The result and the predictor (``.name``, ``.version``) that produced it.
        """
        predictor = self.select(volume.study_uid or volume.series_uid)
        return predictor.predict(volume), predictor

    def served(self, name: str, version: int | None = None) -> Predictor | None:
        """The predictor serving ``name`` (``version``, or the champion's), or None."""
        for slot in self.roles():
            predictor = slot.predictor
            if predictor is not None and predictor.name == name and (
                    version is None and slot is self.champion or predictor.version == version):
                return predictor
        return None

    def roles(self) -> tuple[ModelState, ...]:
        """The champion, and the challenger while the canary is on."""
        return (self.champion, self.challenger) if self._share > 0 else (self.champion,)

    # ------------------------------------------------------------------ loading

    def load(self) -> list[Reload]:
        """Load every role (blocking; the app calls it off the event loop at start-up)."""
        return self.refresh()

    def refresh(self) -> list[Reload]:
        """Check the registry once and swap in every role whose alias moved (blocking)."""
        with self._lock:
            return [self._refresh(slot) for slot in self.roles()]

    def _refresh(self, slot: ModelState) -> Reload:
        current = slot.predictor
        previous = None if current is None else current.version
        ref = parse_model_uri(slot.model_uri)
        target, version = slot.model_uri, None
        if ref.alias is not None and self._resolver is not None:
            try:
                version = int(self._resolver(slot.model_uri))
            except ModelNotFoundError as exc:
                if slot.role == CHALLENGER:  # the alias was cleared (or never set): no challenger
                    return self._absent(slot, previous, exc)
                return self._unresolved(slot, previous, exc)
            except Exception as exc:
                return self._unresolved(slot, previous, exc)
            if version == previous or version == slot.refused_version:
                return Reload(slot.role, previous, previous, "unchanged")
            target = f"models:/{ref.name}/{version}"  # exactly the version that was resolved
        elif current is not None:  # pinned version, or nothing to ask: loaded once
            return Reload(slot.role, previous, previous, "unchanged")
        try:
            predictor = self._factory(self._loader(target))
        except Exception as exc:
            return self._failed(slot, previous, version, exc)
        slot.predictor = predictor  # the swap: one assignment; in-flight requests keep the old one
        slot.reason, slot.last_error, slot.refused_version = "", "", None
        set_model_info(predictor.name, predictor.version, slot.role)
        count_reload("ok")
        log.info("%s now serves %s version %d (was %s), forward %s", slot.role, predictor.name,
                 predictor.version, previous, predictor.forward_mode)
        return Reload(slot.role, previous, predictor.version, "ok")

    def _failed(self, slot: ModelState, previous: int | None, version: int | None,
                exc: Exception) -> Reload:
        detail = _describe(exc)
        label = f"version {version}" if version is not None else slot.model_uri
        slot.last_error = f"cannot load {label}: {detail}"
        slot.refused_version = version
        if slot.predictor is None:
            slot.reason = detail
        count_reload("failed")
        if isinstance(exc, (RegistryError, ImagingError)):
            log.error("%s: %s; still serving %s", slot.role, slot.last_error, previous)
        else:
            log.exception("%s: %s; still serving %s", slot.role, slot.last_error, previous)
        return Reload(slot.role, previous, previous, "failed", detail)

    def _unresolved(self, slot: ModelState, previous: int | None, exc: Exception) -> Reload:
        detail = _describe(exc)
        if detail != slot.last_error:  # log a lasting outage once, not every interval
            log.warning("%s: cannot resolve %s: %s", slot.role, slot.model_uri, detail)
        slot.last_error = detail
        if slot.predictor is None:
            slot.reason = detail
            count_reload("failed")
        return Reload(slot.role, previous, previous, "unresolved", detail)

    def _absent(self, slot: ModelState, previous: int | None, exc: Exception) -> Reload:
        """The challenger's alias names no version: unload it (if loaded); not a failure."""
        reason = f"no challenger: {_describe(exc)}; every study goes to the champion"
        slot.last_error, slot.refused_version = "", None  # set again later = moved: try it again
        if slot.predictor is not None:
            self._unload(slot, reason)
            log.info("challenger v%s unloaded: %s no longer names a version; every study goes "
                     "to the champion", previous, slot.model_uri)
            return Reload(slot.role, previous, None, "unloaded", reason)
        if slot.reason != reason:
            log.info("%s", reason)
        slot.reason = reason
        return Reload(slot.role, previous, None, "absent", reason)

    def _unload(self, slot: ModelState, reason: str) -> None:
        current = slot.predictor
        slot.predictor, slot.reason = None, reason
        if current is not None:
            set_model_info(current.name, None, slot.role)

    # ------------------------------------------------------------------ canary administration

    def set_canary(self, share: float, challenger_uri: str | None = None) -> list[Reload]:
        """Route ``share`` of the studies to the challenger (loading it first if needed).

        ``share=0`` drops the challenger (:meth:`drop_challenger`).

        Raises
        ------
        ValueError
            ``share`` outside [0, 1] or a malformed URI.
        ModelLoadError
            The challenger cannot be loaded; the canary stays as it was.
        """
        _check_share(share)
        if share == 0:
            self.drop_challenger()
            return []
        uri = str(parse_model_uri(challenger_uri)) if challenger_uri else self.challenger.model_uri
        with self._lock:
            slot = self.challenger
            if uri != slot.model_uri or slot.predictor is None:
                slot = ModelState(model_uri=uri, role=CHALLENGER)
                result = self._refresh(slot)
                if slot.predictor is None:
                    raise ModelLoadError(f"cannot load the challenger {uri}: {result.detail}")
                self.challenger = slot  # _refresh set the challenger's model info
            else:
                result = Reload(CHALLENGER, slot.predictor.version, slot.predictor.version,
                                "unchanged")
            self._share = float(share)
        log.info("canary: %.0f%% of studies to %s", share * 100, uri)
        return [result]

    def drop_challenger(self) -> None:
        """Send every study to the champion and unload the challenger, at once (until the canary
        is set again with :meth:`set_canary`).

        This is ``DELETE /v1/admin/canary``: the immediate drop, which does not wait for a
        registry check and leaves the registry's ``challenger`` alias as it is. Requests already
        running on the challenger finish on it.
        """
        with self._lock:
            self._share = 0.0
            self._unload(self.challenger, "dropped: the canary share is 0")
        log.info("canary: challenger dropped")

    # ------------------------------------------------------------------ following the registry

    def start(self) -> None:
        """Start the background registry check (when a resolver and an interval are set)."""
        if self._resolver is None or self.reload_seconds <= 0 or self.following:
            return
        self._stop.clear()
        context = contextvars.copy_context()  # the app's metrics binding travels with it
        self._thread = threading.Thread(
            target=context.run, args=(self._follow,), name="fedseg-model-reload", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background check (waits for a load in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _follow(self) -> None:
        while not self._stop.wait(self.reload_seconds):
            try:
                self.refresh()
            except Exception:  # never let the follower die; the next interval tries again
                log.exception("registry check failed")


def _check_share(share: float) -> None:
    if not 0.0 <= float(share) <= 1.0:
        raise ValueError(f"canary share must be between 0 and 1, got {share}")
