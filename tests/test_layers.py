"""The package layering: imports run one way.

    cli, launcher                  (top: start and wire the services)
    backend | worker | trainer     (services: never import each other)
    modelstore                     (model versions on disk and in Redis; may load torch)
    labelstudio                    (shared layer: speaking Label Studio)
    contracts                      (shared layer: what the services agree on; no torch)
    sam2unet                       (the model: imports nothing of ours outside itself)

Every ``import`` statement of the product is read with ``ast`` (top-level and function-level
ones alike), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICES = {"backend", "worker", "trainer"}
SHARED = {"contracts", "labelstudio"}
TOP = {"cli", "launcher"}
STORE = {"modelstore"}
PACKAGES = SERVICES | SHARED | STORE | TOP | {"sam2unet"}

#: What each package may import of ours, besides itself.
ALLOWED: dict[str, set[str]] = {
    "sam2unet": set(),
    "contracts": {"sam2unet"},
    "labelstudio": {"sam2unet", "contracts"},
    "modelstore": {"sam2unet", "contracts"},
    **{s: SHARED | STORE | {"sam2unet"} for s in SERVICES},
    "launcher": PACKAGES - {"launcher"},
    "cli": PACKAGES - {"cli"},
    "bench": PACKAGES,
}

#: Modules of tests/ that a package may import: the scale benchmark runs a real Label Studio and
#: real workers started by the suite's own harnesses, so both measure the same services.
ALLOWED_TEST_MODULES: dict[str, set[str]] = {"bench": {"tests.lstudio", "tests.services"}}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def product_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def violations(package: str, allowed: set[str]) -> list[str]:
    bad = []
    for path in product_files(package):
        for line, name in imported_modules(path):
            top = name.split(".")[0]
            where = f"{path.relative_to(REPO)}:{line} imports {name}"
            if top == "common":
                bad.append(where + " (no package named common exists)")
            elif name in ALLOWED_TEST_MODULES.get(package, set()):
                continue
            elif top in PACKAGES | {"bench", "tests"} and top != package and top not in allowed:
                bad.append(where)
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package: str) -> None:
    assert product_files(package), f"{package}/ holds no Python file"
    assert violations(package, ALLOWED[package]) == []


def test_nothing_imports_common() -> None:
    hits = [
        f"{p.relative_to(REPO)}:{line}"
        for folder in (*sorted(PACKAGES), "bench", "tests", "docker")
        for p in (REPO / folder).rglob("*.py")
        for line, name in imported_modules(p)
        if name.split(".")[0] == "common"
    ]
    assert hits == []
    assert not (REPO / "common").exists()


def test_checker_catches_a_service_importing_another(tmp_path: Path, monkeypatch) -> None:
    """The check itself: a worker module importing the backend, lazily inside a function, and
    a module importing ``common`` are both reported."""
    fake = tmp_path / "worker"
    fake.mkdir()
    (fake / "bad.py").write_text(
        "def f():\n    from backend.metrics import RedisCollector\n    import common.jobs\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = violations("worker", ALLOWED["worker"])
    assert found == [
        "worker/bad.py:2 imports backend.metrics",
        "worker/bad.py:3 imports common.jobs (no package named common exists)",
    ]


def test_sam2unet_modules_form_no_import_circle() -> None:
    """Module-level imports inside ``sam2unet`` form a DAG (config <- build <- checkpoints ...)."""
    graph: dict[str, set[str]] = {}
    for path in product_files("sam2unet"):
        mod = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("sam2unet")
            ):
                deps.add(node.module)
        graph[mod] = deps - {mod}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, " -> ".join([*trail, m])
        state[m] = 1
        for d in graph.get(m, ()):
            visit(d, [*trail, m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def job_targets() -> dict[str, str]:
    """Every rq job target the contracts name by string (``*_FUNC``): ``{constant: target}``."""
    import importlib
    import pkgutil

    import contracts

    out = {}
    for m in pkgutil.iter_modules(contracts.__path__):
        module = importlib.import_module(f"contracts.{m.name}")
        for name, value in vars(module).items():
            if name.endswith("_FUNC") and isinstance(value, str):
                out[f"contracts.{m.name}.{name}"] = value
    return out


def test_every_job_target_names_a_worker_callable() -> None:
    """rq resolves a job's target by name in the worker process: each names a function of
    ``worker`` that exists (a rename there would otherwise fail only when a job runs)."""
    import importlib

    targets = job_targets()
    assert len(targets) >= 4, targets
    for constant, target in targets.items():
        module, _, name = target.rpartition(".")
        assert module.split(".")[0] == "worker", f"{constant} = {target!r}"
        assert callable(getattr(importlib.import_module(module), name, None)), constant
