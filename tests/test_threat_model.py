"""The README's threat model matches the tests: every test it names exists and is adversarial."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_REF = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`")


def threat_model_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Threat model\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def referenced_tests() -> list[tuple[str, str | None]]:
    """(file, test or None for the whole file); ``::name`` continues the previous file."""
    refs: list[tuple[str, str | None]] = []
    current = ""
    for match in _REF.finditer(threat_model_section()):
        path, name = match.groups()
        if path is None and name is None:
            continue
        current = path or current
        assert current, f"`::{name}` before any test file in the threat model"
        refs.append((current, name))
    return refs


def _marks(node: ast.AST) -> set[str]:
    """Names of ``pytest.mark.<name>`` in decorators or a ``pytestmark`` value."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"}


def _adversarial(tree: ast.Module, name: str | None) -> tuple[bool, bool]:
    """(the test exists, it is marked adversarial) in a parsed test file."""
    module_marks: set[str] = set()
    tests: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
            module_marks |= _marks(node.value)
        elif isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            tests[node.name] = set().union(*(_marks(d) for d in node.decorator_list))
    if name is None:
        return bool(tests), "adversarial" in module_marks or all("adversarial" in m for m in tests.values())
    if name not in tests:
        return False, False
    return True, "adversarial" in module_marks | tests[name]


def test_every_test_the_threat_model_names_exists_and_is_adversarial() -> None:
    refs = referenced_tests()
    assert len(refs) >= 30, f"only {len(refs)} test references found in the threat model"
    problems = []
    for path, name in refs:
        file = ROOT / path
        if not file.exists():
            problems.append(f"{path}: no such file")
            continue
        exists, marked = _adversarial(ast.parse(file.read_text()), name)
        where = f"{path}::{name}" if name else path
        if not exists:
            problems.append(f"{where}: no such test")
        elif not marked:
            problems.append(f"{where}: not marked adversarial")
    assert not problems, "README threat model vs tests:\n" + "\n".join(problems)


def test_the_check_catches_a_missing_or_unmarked_test() -> None:
    """The checker itself can fail: a renamed test and an unmarked one are both reported."""
    tree = ast.parse("import pytest\n\n@pytest.mark.adversarial\ndef test_a(): ...\n\ndef test_b(): ...\n")
    assert _adversarial(tree, "test_a") == (True, True)
    assert _adversarial(tree, "test_b") == (True, False)
    assert _adversarial(tree, "test_c") == (False, False)
    assert _adversarial(tree, None) == (True, False)
