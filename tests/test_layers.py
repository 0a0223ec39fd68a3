"""The layering rule, read from the source with ``ast`` (no module is imported).

- ``core`` (shared by both sides) imports nothing from the project but itself;
- ``app`` (the HTTP service) and ``worker`` (the rounds) import ``core`` and themselves, never
  each other;
- ``migrations`` imports only ``core``;
- ``selflm`` (the command line) may import every runtime package;
- ``bench``, ``studies`` and ``tests`` may import anything, and no runtime package imports them
  (they are not in the wheel).

Every import counts: top-level, inside functions (lazy imports), under ``TYPE_CHECKING``, and
``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNTIME = ("core", "app", "worker", "migrations", "selflm")
FIRST_PARTY = (*RUNTIME, "bench", "studies", "tests")
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset({"core"}),
    "app": frozenset({"core", "app"}),
    "worker": frozenset({"core", "worker"}),
    "migrations": frozenset({"core", "migrations"}),
    "selflm": frozenset(RUNTIME),
}


@dataclass(frozen=True)
class Import:
    path: Path  # relative to the root
    line: int
    target: str  # the imported module, absolute


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> list[Import]:
    """Every module ``path`` imports (relative imports resolved against its package)."""
    rel = path.relative_to(root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
    package = module_name(rel).split(".")
    if rel.name != "__init__.py":
        package = package[:-1]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                found.append(Import(rel, node.lineno, node.module or ""))
                continue
            base = package[: len(package) - (node.level - 1)]
            if node.module:  # from .x import y → <package>.x
                found.append(Import(rel, node.lineno, ".".join([*base, node.module])))
            else:  # from . import x, y → <package>.x, <package>.y
                found += [
                    Import(rel, node.lineno, ".".join([*base, alias.name])) for alias in node.names
                ]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(rel, node.lineno, node.args[0].value))
    return found


def scan(root: Path) -> dict[str, list[Import]]:
    """Imports of every Python file in each runtime package, keyed by the package."""
    return {
        layer: [
            imp for path in sorted((root / layer).rglob("*.py")) for imp in imports_of(root, path)
        ]
        for layer in RUNTIME
        if (root / layer).is_dir()
    }


def violations(root: Path) -> list[str]:
    out: list[str] = []
    for layer, found in scan(root).items():
        for imp in found:
            top = imp.target.split(".", 1)[0]
            if top in FIRST_PARTY and top not in ALLOWED[layer]:
                out.append(f"{imp.path}:{imp.line}: {layer} imports {imp.target}")
    return out


def test_no_module_imports_from_a_layer_above_it() -> None:
    assert violations(ROOT) == []


def test_the_scan_sees_the_real_imports() -> None:
    """Guards against a scan that finds nothing (a moved package, a wrong root)."""
    found = scan(ROOT)
    assert set(found) == set(RUNTIME)
    targets = {
        layer: {imp.target.split(".", 1)[0] for imp in imps} for layer, imps in found.items()
    }
    assert {"core"} <= targets["app"] and {"core"} <= targets["worker"]
    assert "core" in targets["migrations"] and "core" in targets["core"]
    assert {"app", "worker"} <= targets["selflm"]


@pytest.mark.parametrize(
    ("layer", "line", "allowed"),
    [
        ("core", "from app.state import AppState", False),
        ("core", "import worker.tasks", False),
        ("core", "from bench.report import md_table", False),
        ("app", "from worker.rounds.pipeline import run_round", False),
        ("worker", "from app.swap import SwapWatcher", False),
        ("migrations", "from app.schemas import X", False),
        ("core", "from migrations import env", False),
        ("app", "from tests.conftest import make_tiny_settings", False),
        ("core", "from . import something", True),  # core.sub.something
        ("worker", "from ..app import x", True),  # worker.app: its own package, not app/
        ("app", "from core.settings import Settings", True),
        ("worker", "from core.db import rounds", True),
        ("selflm", "from app.main import create_app", True),
        ("migrations", "from core.db.models import Base", True),
    ],
)
def test_a_violating_import_is_caught(tmp_path: Path, layer: str, line: str, allowed: bool) -> None:
    """The checker on a scratch tree: one module with one import, lazy (inside a function)."""
    for pkg in RUNTIME:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / layer / "sub").mkdir()
    (tmp_path / layer / "sub" / "__init__.py").write_text("")
    (tmp_path / layer / "sub" / "mod.py").write_text(f"def f() -> None:\n    {line}\n")
    found = violations(tmp_path)
    if allowed:
        assert found == []
    else:
        assert found and found[0].startswith(f"{layer}/sub/mod.py:2: {layer} imports ")


def test_relative_and_dynamic_imports_resolve(tmp_path: Path) -> None:
    (tmp_path / "core" / "db").mkdir(parents=True)
    (tmp_path / "core" / "db" / "models.py").write_text(
        "import importlib\n"
        "from . import session\n"
        "from ..registry import publish\n"
        "from ... import app\n"
        "importlib.import_module('worker.tasks')\n"
    )
    got = {i.target for i in imports_of(tmp_path, tmp_path / "core" / "db" / "models.py")}
    assert got == {"importlib", "core.db.session", "core.registry", "app", "worker.tasks"}
    assert len(violations(tmp_path)) == 2  # ... import app, and worker.tasks by name
