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
import json
import subprocess
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

#: Modules of tests/ that a package may import: the scale benchmark runs a real Label Studio (on
#: SQLite or a PostgreSQL cluster) and real workers started by the suite's own harnesses, so both
#: measure the same services.
ALLOWED_TEST_MODULES: dict[str, set[str]] = {
    "bench": {"tests.support.lstudio", "tests.support.services", "tests.support.postgres"}
}


def repo_module_file(name: str) -> Path | None:
    """The file of module ``name`` when it is one of the repository's, else None."""
    if not name:
        return None
    path = REPO.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(
    path: Path, *, runtime: bool = False, module_level: bool = False
) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``: ``import a.b``, ``from a
    import b`` (``a.b`` when that is a module of the repository, else ``a``) and relative
    imports, resolved. ``runtime``: leave out those under ``if TYPE_CHECKING:``;
    ``module_level``: only those that run when the module is imported (none inside a
    function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    out: list[tuple[int, str]] = []

    def names(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:
            base = ".".join(package[: len(package) - node.level + 1])
            module = ".".join(p for p in (base, node.module or "") if p)
        else:
            module = node.module or ""
        subs = [f"{module}.{a.name}" for a in node.names]
        return [m for m in subs if repo_module_file(m)] or [module]

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if not (runtime and type_only) and not (module_level and in_function):
                    out.extend((child.lineno, n) for n in names(child) if n)
                continue
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for part in child.body:
                    visit(ast.Module(body=[part], type_ignores=[]), in_function, True)
                for part in child.orelse:
                    visit(ast.Module(body=[part], type_ignores=[]), in_function, type_only)
                continue
            func = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, in_function or func, type_only)

    visit(tree, False, False)
    return sorted(set(out))


def reached(start: str, own_package: str) -> dict[str, list[str]]:
    """What importing module ``start`` and calling its functions can import: the repository's
    modules (with their parent packages) and the top-level names of others, each with the
    chain of imports that reaches it. Modules of ``own_package`` count with every import they
    hold (lazy ones inside functions too); any other module reached counts with those that run
    when it is imported. Imports under ``if TYPE_CHECKING:`` never run and do not count."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        mod = todo.pop()
        path = repo_module_file(mod)
        if path is None:
            continue
        own = mod.split(".")[0] == own_package
        for _, name in imported_modules(path, runtime=True, module_level=not own):
            parts = name.split(".")
            if repo_module_file(name) or repo_module_file(parts[0]):
                targets = [".".join(parts[: i + 1]) for i in range(len(parts))]
            else:
                targets = [parts[0]]
            for target in targets:
                if target not in chains:
                    chains[target] = [*chains[mod], target]
                    todo.append(target)
    return chains


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
    """The check itself: a worker module importing the backend, lazily inside a function, by a
    plain ``import a.b``, by a relative import, and a module importing ``common`` are all
    reported."""
    fake = tmp_path / "worker"
    fake.mkdir()
    (fake / "bad.py").write_text(
        "def f():\n    from backend.metrics import RedisCollector\n    import common.jobs\n"
        "import trainer.service as service\n"
        "from ..backend import app\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = violations("worker", ALLOWED["worker"])
    assert found == [
        "worker/bad.py:2 imports backend.metrics",
        "worker/bad.py:3 imports common.jobs (no package named common exists)",
        "worker/bad.py:4 imports trainer.service",
        "worker/bad.py:5 imports backend",
    ]


def test_checker_follows_imports_of_every_form(tmp_path: Path, monkeypatch) -> None:
    """The transitive check itself: a relative import, ``from package import module``, a plain
    ``import a.b`` and a lazy import of the own package are followed; a lazy import elsewhere
    and imports under ``if TYPE_CHECKING:`` are not (they never run on import)."""
    files = {
        "contracts/__init__.py": "",
        "contracts/a.py": "from .b import thing\n",
        "contracts/b.py": "thing = 1\ndef f():\n    from sam2unet import m\n",
        "sam2unet/__init__.py": "",
        "sam2unet/m.py": "import sam2unet.n\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import gdown\n",
        "sam2unet/n.py": "import torch\ndef g():\n    import sam2\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    chains = reached("contracts.a", "contracts")
    assert chains["torch"] == ["contracts.a", "contracts.b", "sam2unet.m", "sam2unet.n", "torch"]
    assert "gdown" not in chains and "sam2" not in chains


#: What importing any module of ``contracts`` (and calling its functions) must never import.
NOT_IN_CONTRACTS = ("torch", "torchvision", "sam2", "gdown")


def test_contracts_import_no_torch() -> None:
    """``contracts`` is what every service agrees on, the backend included: no module of it
    imports torch (or sam2, or the downloader), directly or through what it imports."""
    bad = []
    for path in product_files("contracts"):
        chains = reached(module_of(path), "contracts")
        bad += [" -> ".join(chains[name]) for name in NOT_IN_CONTRACTS if name in chains]
    assert bad == []


def test_importing_every_contracts_module_loads_no_torch() -> None:
    code = (
        "import importlib, pkgutil, sys, contracts\n"
        "for m in pkgutil.iter_modules(contracts.__path__):\n"
        "    importlib.import_module('contracts.' + m.name)\n"
        f"print(sorted(set({NOT_IN_CONTRACTS!r}) & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_event_stream_name_is_defined_once() -> None:
    """One definition of the trainer's event stream (contracts.events): no other module assigns
    ``EVENTS_STREAM`` or spells its name."""
    from contracts.events import EVENTS_STREAM

    hits = []
    for folder in (*sorted(PACKAGES), "bench", "tests", "docker"):
        for path in sorted((REPO / folder).rglob("*.py")):
            where = path.relative_to(REPO)
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Constant) and node.value == EVENTS_STREAM:
                    hits.append(f"{where} spells {EVENTS_STREAM!r}")
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, (ast.AnnAssign, ast.AugAssign))
                    else []
                )
                for t in targets:
                    name = t.id if isinstance(t, ast.Name) else getattr(t, "attr", None)
                    if name == "EVENTS_STREAM":
                        hits.append(f"{where} assigns EVENTS_STREAM")
    assert sorted(hits) == [
        "contracts/events.py assigns EVENTS_STREAM",
        f"contracts/events.py spells {EVENTS_STREAM!r}",
    ]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_modules_form_no_import_circle(package: str) -> None:
    """The imports among a package's modules (lazy ones too; ``import a.b``, ``from a import
    b`` and relative ones alike) form a DAG: e.g. sam2unet's config <- build <- checkpoints,
    trainer's schedule and service (the schedule once imported the service lazily)."""
    graph: dict[str, set[str]] = {}
    for path in product_files(package):
        mod = module_of(path)
        deps = {n for _, n in imported_modules(path, runtime=True) if n.split(".")[0] == package}
        graph[mod] = deps - {mod, package}
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


# ------------------------------------------------------------------ function-level imports
# An ``import`` inside a function body is kept only where it avoids a heavy import at module load
# (torch, sam2, label_studio_sdk...), a circular import, or where it is platform-specific or
# optional; it then says why in a ``#`` comment on its line, or on the line directly above it or
# above the contiguous block of imports it belongs to. Any other import belongs at the top.

#: Folders of product code (``docker`` holds the image's build check).
PRODUCT = sorted(PACKAGES | {"docker"})

_IMPORT = (ast.Import, ast.ImportFrom)
_FUNCTION = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def unexplained_imports(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: statement`` of each import inside a function of ``path`` that has no ``#``
    comment on its own line(s) and none directly above it or above the first import of its
    block (the imports that precede it in the same body, blank lines between them allowed)."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines), filename=str(path))

    def explained(stmt: ast.stmt) -> bool:
        own = any("#" in lines[i - 1] for i in range(stmt.lineno, stmt.end_lineno + 1))
        return own or (stmt.lineno > 1 and lines[stmt.lineno - 2].lstrip().startswith("#"))

    bad: list[str] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for _, value in ast.iter_fields(node):
            if not (in_function and isinstance(value, list)):
                continue
            for i, stmt in enumerate(value):
                if not isinstance(stmt, _IMPORT):
                    continue
                j = i
                while j >= 0 and isinstance(value[j], _IMPORT) and not explained(value[j]):
                    j -= 1
                if j < 0 or not isinstance(value[j], _IMPORT):
                    where = path.relative_to(root)
                    bad.append(f"{where}:{stmt.lineno}: {lines[stmt.lineno - 1].strip()}")
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(child, _FUNCTION))

    visit(tree, False)
    return bad


def test_every_function_level_import_says_why() -> None:
    bad = [
        hit
        for folder in PRODUCT
        for path in sorted((REPO / folder).rglob("*.py"))
        for hit in unexplained_imports(path)
    ]
    assert bad == [], "import these at the top, or say why not:\n" + "\n".join(bad)


def test_the_check_finds_unexplained_imports(tmp_path: Path) -> None:
    """The check itself: an import in a function, a method, a nested block or a lambda's
    function without a comment is reported; one with a comment on its line, above it or above
    its block (across a blank line) is not, nor is a module-level import."""
    source = (
        "import os\n"  # 1: module level
        "def a():\n"
        "    import json\n"  # 3: bad
        "def b():\n"
        "    # torch: heavy\n"
        "    import torch\n"
        "\n"
        "    from sam2 import x\n"  # 8: in the commented block
        "    y = 1\n"
        "    import numpy\n"  # 10: bad, a new block
        "class C:\n"
        "    def m(self):\n"
        "        if True:\n"
        "            import redis  # rq: only here\n"
        "            import rq\n"  # 15: in the block of a commented import
        "        else:\n"
        "            import PIL\n"  # 17: bad
        "def c():\n"
        "    def inner():\n"
        "        from tqdm import tqdm\n"  # 20: bad
        "    return inner\n"
        "def d(): import gdown\n"  # 22: bad, on the line of its def
    )
    (tmp_path / "m.py").write_text(source)
    found = [hit.split(":")[1] for hit in unexplained_imports(tmp_path / "m.py", tmp_path)]
    assert found == ["3", "10", "17", "20", "22"]


def test_the_command_line_imports_no_command_s_dependencies() -> None:
    """What the cli's lazy imports are for: building the parser (``--help``) loads no service,
    no model and none of their libraries."""
    heavy = ("torch", "sam2", "numpy", "redis", "rq", "requests", "tqdm", "flask")
    ours = ("backend", "worker", "trainer", "modelstore", "launcher", "contracts", "labelstudio")
    names = heavy + ours
    probe = (
        "import json, sys, cli; cli.build_parser(); "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({names!r}))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
