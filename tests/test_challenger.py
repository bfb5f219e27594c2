"""The ``challenger`` alias: `fedseg registry challenger NAME VERSION | --clear` against a real
sqlite registry (refusals, the challenger history, the version tags, `show`), and how the
service's :class:`~serving.models.ModelManager` follows the alias coming and going.

The service end to end (canary studies on the challenger, the alias cleared, set again, under
load) is in tests/test_serving_models.py.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner, Result

from evidence import evaluated
from imaging.model import build_unet
from imaging.spec import ModelSpec
from registry import ModelNotFoundError, RegistryError, TrackingRun, default_store, publish_model
from registry.challenger import (
    CHALLENGER,
    CHALLENGER_HISTORY_TAG,
    ChallengerRefusedError,
    clear_challenger,
    read_challenger_history,
    resolve_alias_version,
    set_challenger,
)
from registry.cli import registry
from registry.history import read_history
from serving.models import ModelManager

MODEL = "challenger-unet"
SPEC = ModelSpec(channels=(4, 8), image_size=32)


def _publish(seed: int, dice: float) -> int:
    torch.manual_seed(seed)
    store = default_store()
    run = TrackingRun.start(store, "challenger-tests", f"publish-{seed}", {})
    published = publish_model(store, run, MODEL, build_unet(SPEC).state_dict(), SPEC,
                              {"dice_pooled": dice}, evaluated())
    run.end(ok=True)
    return published.version


def _run(*args: str) -> Result:
    return CliRunner().invoke(registry, list(args))


def _aliases() -> dict[str, int]:
    return {k: int(v) for k, v in (default_store().client().get_registered_model(MODEL).aliases or {}).items()}


def _tags(version: int) -> dict[str, str]:
    return dict(default_store().client().get_model_version(MODEL, str(version)).tags)


@pytest.fixture
def three_versions() -> None:
    """v1 (the champion, promoted at publish), v2 and v3 (worse: not promoted)."""
    assert _publish(1, 0.5) == 1
    assert _publish(2, 0.4) == 2
    assert _publish(3, 0.3) == 3
    assert _aliases() == {"champion": 1}


# ----------------------------------------------------------------------------- the CLI


def test_set_move_and_clear_are_recorded_with_who_when_and_why(three_versions: None) -> None:
    out = _run("challenger", MODEL, "2", "--reason", "canary of the new augmentation",
               "--actor", "alice")
    assert out.exit_code == 0, out.output
    assert f"{MODEL} challenger is now v2 (was none; champion v1), by alice" in out.output
    assert _aliases() == {"champion": 1, CHALLENGER: 2}
    assert _tags(2)["challenger_set_by"] == "alice" and _tags(2)["challenger_set_at"]

    moved = _run("challenger", MODEL, "3", "--actor", "bob")
    assert moved.exit_code == 0, moved.output
    assert "challenger is now v3 (was v2; champion v1), by bob" in moved.output
    assert _aliases()[CHALLENGER] == 3

    cleared = _run("challenger", MODEL, "--clear", "--reason", "v3 under-segments", "--actor", "carol")
    assert cleared.exit_code == 0, cleared.output
    assert f"challenger cleared: {MODEL} has no challenger (was v3; champion v1), by carol" in cleared.output
    assert _aliases() == {"champion": 1}
    assert _tags(3)["challenger_cleared_by"] == "carol" and _tags(3)["challenger_cleared_at"]

    history = read_challenger_history(default_store(), MODEL)
    assert [(e["action"], e["version"], e["previous"], e["champion"], e["actor"], e["reason"])
            for e in history] == [
        ("set", 2, None, 1, "alice", "canary of the new augmentation"),
        ("set", 3, 2, 1, "bob", None),
        ("clear", None, 3, 1, "carol", "v3 under-segments"),
    ]
    assert all(e["time"].endswith("+00:00") for e in history)
    # the champion history is untouched: a rollback never walks into a challenger
    assert [e for e in read_history(default_store(), MODEL) if e.get("action") in ("set", "clear")] == []

    shown = _run("show", MODEL, "3")
    assert shown.exit_code == 0, shown.output
    section = shown.output.split("challenger history:")[1]
    assert "set v2 (was none) by alice: canary of the new augmentation" in section
    assert "clear none (was v3) by carol: v3 under-segments" in section
    assert "challenger_cleared_by" in shown.output  # the version's tags, in its lineage
    as_json = _run("show", MODEL, "3", "--format", "json")
    assert '"challenger_history"' in as_json.output and CHALLENGER_HISTORY_TAG not in as_json.output


def test_refusals_name_the_problem_and_change_nothing(three_versions: None) -> None:
    missing = _run("challenger", MODEL, "9", "--actor", "alice")
    assert missing.exit_code == 1
    assert f"models:/{MODEL}/9 is not in the registry" in missing.output

    champion = _run("challenger", MODEL, "1")
    assert champion.exit_code == 1
    assert f"refusing to make {MODEL} v1 the challenger: it is the champion" in champion.output

    unknown = _run("challenger", "no-such-model", "2")
    assert unknown.exit_code == 1 and "no registered model 'no-such-model'" in unknown.output

    nothing = _run("challenger", MODEL, "--clear")
    assert nothing.exit_code == 1
    assert f"{MODEL} has no challenger alias; nothing to clear" in nothing.output

    both = _run("challenger", MODEL, "2", "--clear")
    neither = _run("challenger", MODEL)
    assert both.exit_code == neither.exit_code == 2
    assert "give either VERSION" in both.output and "give either VERSION" in neither.output

    assert _aliases() == {"champion": 1}  # none of it moved anything or wrote a history
    assert CHALLENGER_HISTORY_TAG not in (default_store().client().get_registered_model(MODEL).tags or {})

    assert _run("challenger", MODEL, "2").exit_code == 0
    again = _run("challenger", MODEL, "2")
    assert again.exit_code == 1 and f"{MODEL} v2 is already the challenger" in again.output
    assert len(read_challenger_history(default_store(), MODEL)) == 1


def test_api_and_rollback_alongside_a_challenger(three_versions: None) -> None:
    store = default_store()
    with pytest.raises(ChallengerRefusedError, match="it is the champion"):
        set_challenger(store, MODEL, 1)
    with pytest.raises(ModelNotFoundError):
        set_challenger(store, MODEL, 42)
    result = set_challenger(store, MODEL, 3, actor="alice")
    assert (result.action, result.version, result.previous, result.champion) == ("set", 3, None, 1)
    # promote v2 and roll back: the challenger's entries do not disturb the champion's chain
    assert _run("promote", MODEL, "2", "--force", "--reason", "t", "--actor", "t").exit_code == 0
    assert _run("rollback", MODEL, "--actor", "t").exit_code == 0
    assert _aliases() == {"champion": 1, CHALLENGER: 3}
    # and the challenger cannot be made the champion's twin after a promotion moved onto it
    assert _run("promote", MODEL, "3", "--force", "--reason", "t", "--actor", "t").exit_code == 0
    with pytest.raises(ChallengerRefusedError, match="it is the champion"):
        set_challenger(store, MODEL, 3)
    cleared = clear_challenger(store, MODEL, actor="bob")
    assert (cleared.version, cleared.previous, cleared.champion) == (None, 3, 3)


def test_resolve_alias_version_tells_a_missing_alias(three_versions: None) -> None:
    store = default_store()
    assert resolve_alias_version(store, f"models:/{MODEL}@champion") == 1
    assert resolve_alias_version(store, f"models:/{MODEL}/2") == 2
    with pytest.raises(ModelNotFoundError, match="has no alias 'challenger'"):
        resolve_alias_version(store, f"models:/{MODEL}@challenger")
    with pytest.raises(ModelNotFoundError, match="not in the registry"):
        resolve_alias_version(store, f"models:/{MODEL}/7")
    with pytest.raises(ModelNotFoundError, match="no registered model"):
        resolve_alias_version(store, "models:/nope@challenger")


def test_the_fedseg_command_has_it() -> None:
    done = subprocess.run([sys.executable, "-m", "fedseg", "registry", "challenger", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--clear" in done.stdout and "--reason" in done.stdout and "--actor" in done.stdout


# ----------------------------------------------------------------------------- the service's side


class _Registry:
    """An in-memory alias table and loader that fails for chosen versions (no torch needed)."""

    def __init__(self) -> None:
        self.aliases: dict[str, int] = {"champion": 1}
        self.broken: set[int] = set()
        self.down = False
        self.loads: list[int] = []

    def resolve(self, uri: str) -> int:
        if self.down:
            raise RegistryError("cannot ask the registry: connection refused")
        alias = uri.split("@")[1]
        if alias not in self.aliases:
            raise ModelNotFoundError(f"{uri} names no version: m has no alias {alias!r}")
        return self.aliases[alias]

    def load(self, uri: str) -> SimpleNamespace:
        version = int(uri.rsplit("/", 1)[1])
        self.loads.append(version)
        if version in self.broken:
            raise ModelNotFoundError(f"refusing version {version}: unsigned")
        return SimpleNamespace(name="m", version=version, forward_mode="eager")  # a predictor


def _manager(reg: _Registry) -> ModelManager:
    return ModelManager(champion_uri="models:/m@champion", challenger_uri="models:/m@challenger",
                        canary_share=1.0, loader=reg.load, factory=lambda loaded: loaded,
                        resolver=reg.resolve)


def _outcomes(manager: ModelManager) -> list[tuple[str, int | None, str]]:
    return [(r.role, r.version, r.outcome) for r in manager.refresh()]


def test_manager_follows_the_challenger_alias_coming_and_going() -> None:
    reg = _Registry()
    manager = _manager(reg)
    # no alias yet: served by the champion alone, and that is no failure
    assert _outcomes(manager) == [("champion", 1, "ok"), ("challenger", None, "absent")]
    assert manager.select("any").version == 1 and manager.challenger.last_error == ""
    assert "no challenger" in manager.challenger.reason
    assert _outcomes(manager)[1] == ("challenger", None, "absent")

    reg.aliases["challenger"] = 2
    assert _outcomes(manager)[1] == ("challenger", 2, "ok")
    assert manager.select("any").version == 2  # share 1.0: every study

    del reg.aliases["challenger"]
    [_, dropped] = manager.refresh()
    assert (dropped.previous, dropped.version, dropped.outcome) == (2, None, "unloaded")
    assert manager.challenger.predictor is None and manager.select("any").version == 1
    assert _outcomes(manager)[1] == ("challenger", None, "absent")

    # a registry that cannot be asked is not a cleared alias: the challenger keeps serving
    reg.aliases["challenger"] = 3
    assert _outcomes(manager)[1] == ("challenger", 3, "ok")
    reg.down = True
    assert _outcomes(manager) == [("champion", 1, "unresolved"), ("challenger", 3, "unresolved")]
    assert manager.select("any").version == 3
    reg.down = False


def test_a_refused_challenger_is_tried_again_once_the_alias_is_cleared_and_set_again() -> None:
    reg = _Registry()
    manager = _manager(reg)
    reg.aliases["challenger"] = 2
    reg.broken.add(2)
    assert _outcomes(manager)[1] == ("challenger", None, "failed")
    assert _outcomes(manager)[1] == ("challenger", None, "unchanged")  # not retried meanwhile
    assert reg.loads.count(2) == 1
    reg.broken.clear()  # e.g. the signing key became trusted
    del reg.aliases["challenger"]
    assert _outcomes(manager)[1] == ("challenger", None, "absent")
    reg.aliases["challenger"] = 2  # set again: a move, so loaded again
    assert _outcomes(manager)[1] == ("challenger", 2, "ok")
    assert manager.select("any").version == 2
