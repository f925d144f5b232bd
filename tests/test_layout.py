"""The layout rules of docs/architecture.md, checked on the source tree (no imports, no subprocesses).

- No module over ``MAX_LINES`` (400) lines in edge_agent/, cloud_batch/, tests/, bench/ or tools/.
- No test module imports another test module (``tests.test_*``): shared set-up lives in
  tests/conftest.py and tests/support/.
- A package of edge_agent/ or cloud_batch/ holds about 10 modules (the goal: a package that grows
  past it gets subpackages); ``MAX_MODULES`` (12, ``__init__`` and subpackages not counted) is the
  hard ceiling this test enforces.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("edge_agent", "cloud_batch", "tests", "bench", "tools")
PACKAGE_ROOTS = ("edge_agent", "cloud_batch")
MAX_LINES = 400
MAX_MODULES = 12


def _modules(top: str) -> list[Path]:
    return sorted(
        p
        for p in (ROOT / top).rglob("*.py")
        if not any(part.startswith(".") or part == "__pycache__" for part in p.parts)
    )


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def test_no_module_is_over_400_lines() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): _lines(p) for top in SOURCE_ROOTS for p in _modules(top)}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them): {over}"


def _imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def is_test_module(name: str) -> bool:
    """Whether a dotted import names a test module (``tests.test_x`` or something inside it)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[0] == "tests" and parts[1].startswith("test_")


def test_no_test_module_imports_another() -> None:
    sources = {p.relative_to(ROOT).as_posix(): p.read_bytes() for p in _modules("tests")}
    found = {  # parse only what could hold such an import (parsing every test module costs ~1 s)
        name: sorted(n for n in _imported(ast.parse(src)) if is_test_module(n))
        for name, src in sources.items()
        if any(hint in src for hint in (b"tests.test_", b"from tests import", b"import test_"))
    }
    offenders = {name: hits for name, hits in found.items() if hits}
    assert not offenders, f"test modules imported (move the shared code to tests/support/): {offenders}"


def test_is_test_module() -> None:
    assert is_test_module("tests.test_service") and is_test_module("tests.test_service.start_agent")
    assert not is_test_module("tests.support.agent") and not is_test_module("tests.conftest")


def test_no_package_is_over_12_modules() -> None:
    counts = {
        init.parent.relative_to(ROOT).as_posix(): sum(1 for m in init.parent.glob("*.py") if m.name != "__init__.py")
        for top in PACKAGE_ROOTS
        for init in _modules(top)
        if init.name == "__init__.py"
    }
    assert len(counts) > 20, counts  # the walk found the packages
    over = {pkg: n for pkg, n in counts.items() if n > MAX_MODULES}
    assert not over, f"packages over {MAX_MODULES} modules (about 10 is the goal: add subpackages): {over}"
