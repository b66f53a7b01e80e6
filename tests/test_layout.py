"""The layout of tests/: unit tests in a folder named after the package they cover, tests that
start Label Studio, service processes, a browser or multi-process training in tests/system,
shared helpers in tests/support. ``make test-fast`` runs everything but tests/system (and the
``slow`` and ``e2e`` marks), so no test outside tests/system may reach the harnesses that start
those, directly or through another test module it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests import test_layers
from tests.support.tier import require_system_test
from tests.test_layers import PACKAGES, REPO, imported_modules

TESTS = REPO / "tests"
FOLDERS = PACKAGES | {"bench", "system", "support"}
#: Modules only tests/system may import: they start Label Studio, its PostgreSQL or a browser.
SYSTEM_ONLY_MODULES = {"tests.support.lstudio", "tests.support.postgres", "tests.support.browser"}
#: What of tests.support.services starts service processes.
STACK_STARTERS = {"workers", "worker_process", "backend_process", "connected_stack"}


def modules_of_tests(root: Path = TESTS) -> list[Path]:
    return sorted(p for p in root.rglob("test_*.py") if "support" not in p.parts)


def reached_harnesses(path: Path, root: Path = TESTS, seen: set[Path] | None = None) -> list[str]:
    """What of SYSTEM_ONLY_MODULES, tests/system and STACK_STARTERS ``path`` imports, also
    through the test modules it imports (at any level, inside functions too)."""
    seen = set() if seen is None else seen
    if path in seen:
        return []
    seen.add(path)
    found: list[str] = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "tests.support.services":
            found += [
                f"tests.support.services.{a.name}" for a in node.names if a.name in STACK_STARTERS
            ]
    for _, name in imported_modules(path):
        if name in SYSTEM_ONLY_MODULES or name.startswith("tests.system"):
            found.append(name)
        elif name.startswith("tests.") and not name.startswith("tests.support"):
            module = root.parent.joinpath(*name.split(".")).with_suffix(".py")
            if module.is_file():
                found += [f"{hit} (via {name})" for hit in reached_harnesses(module, root, seen)]
    return found


def fast_tier_violations(root: Path = TESTS) -> list[str]:
    return [
        f"{p.relative_to(root.parent)}: {hit}"
        for p in modules_of_tests(root)
        if "system" not in p.relative_to(root).parts
        for hit in reached_harnesses(p, root)
    ]


def test_no_fast_tier_test_reaches_label_studio_a_browser_or_service_processes() -> None:
    assert fast_tier_violations() == []


def test_every_test_module_lives_in_a_package_folder() -> None:
    """Only test_layers and this module at the top; every folder a package (``__init__.py``),
    so modules of the same name in two folders do not collide."""
    top = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert top == ["test_layers.py", "test_layout.py"]
    folders = {p.parent for p in modules_of_tests()} - {TESTS}
    assert {f.name for f in folders} <= FOLDERS, {f.name for f in folders} - FOLDERS
    for folder in {TESTS, *folders, TESTS / "support"}:
        assert (folder / "__init__.py").is_file(), folder


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "def f():\n    from tests.support.lstudio import running_label_studio\n",
            "tests.support.lstudio",
        ),
        ("from tests.support import browser\n", "tests.support.browser"),
        (
            "from tests.support.services import png_bytes, workers\n",
            "tests.support.services.workers",
        ),
        ("import tests.system.test_serving\n", "tests.system.test_serving"),
        (
            "from tests.worker.test_helper import x\n",
            "tests.support.lstudio (via tests.worker.test_helper)",
        ),
    ],
)
def test_the_check_catches_every_way_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: str
) -> None:
    """The check itself, on a copy of the layout: a lazy import of the Label Studio harness, the
    browser module, a stack starter, a system test module and a helper module that imports the
    harness are each reported; an import of the plain helpers is not."""
    monkeypatch.setattr(test_layers, "REPO", tmp_path)
    root = tmp_path / "tests"
    for folder in ("worker", "support", "system"):
        (root / folder).mkdir(parents=True)
    for module in ("lstudio", "browser", "services"):
        (root / "support" / f"{module}.py").write_text("")
    (root / "system" / "test_serving.py").write_text("")
    (root / "worker" / "test_helper.py").write_text(
        "from tests.support.lstudio import LabelStudio\n"
    )
    (root / "worker" / "test_new.py").write_text(source)
    (root / "worker" / "test_plain.py").write_text("from tests.support.services import png_bytes\n")
    found = [v for v in fast_tier_violations(root) if v.startswith("tests/worker/test_new.py")]
    assert found == [f"tests/worker/test_new.py: {expected}"]
    assert not [v for v in fast_tier_violations(root) if "test_plain" in v]


def test_starting_a_harness_outside_tests_system_is_refused(monkeypatch) -> None:
    """The run-time side: Label Studio, a backend and a worker process refuse to start for a
    test outside tests/system, before anything runs; tests/system and the benchmarks (no
    pytest test running) may start them."""
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/worker/test_x.py::test_y (setup)")
    with pytest.raises(RuntimeError, match=r"tests/worker/test_x.py::test_y starts Label Studio"):
        require_system_test("Label Studio")
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/system/test_x.py::test_y (call)")
    require_system_test("Label Studio")
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    require_system_test("Label Studio")
    starters = {
        "lstudio": {"running_label_studio"},
        "services": {"backend_process", "worker_process"},
    }
    for module, functions in starters.items():
        tree = ast.parse((TESTS / "support" / f"{module}.py").read_text())
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in functions):
            first = next(
                s
                for s in fn.body
                if not isinstance(s, ast.Expr) or not isinstance(s.value, ast.Constant)
            )
            assert ast.unparse(first).startswith("require_system_test("), (module, fn.name)
            functions = functions - {fn.name}
        assert not functions, (module, functions)
