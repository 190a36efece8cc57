"""Layout rules the code must keep: no import cycles inside lmscan, and the attack and
defence packages independent of each other.

Read statically with ast (nothing is imported), counting function-level imports too:
a lazy import only hides a cycle until the function runs.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lmscan"


def _module_name(path: Path) -> str:
    parts = ("lmscan", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=1)
def _sources() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package __init__)."""
    return {_module_name(p): (p, p.name == "__init__.py") for p in sorted(PACKAGE.rglob("*.py"))}


def _known(name: str) -> str:
    """The longest prefix of a dotted name that is a module file (``lmscan.x.attr`` -> ``lmscan.x``)."""
    modules = _sources()
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _in_lmscan(name: str) -> bool:
    return name == "lmscan" or name.startswith("lmscan.")


def _imports(module: str) -> set[str]:
    """The lmscan modules ``module`` imports anywhere in its file."""
    path, is_package = _sources()[module]
    package = module if is_package else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name) for alias in node.names if _in_lmscan(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not _in_lmscan(base):
                continue
            for alias in node.names:
                # `from pkg import name` imports the module pkg.name when that is a file, else pkg.
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in _sources() else _known(base))
    found.discard(module)
    return found


@functools.lru_cache(maxsize=1)
def _graph() -> dict[str, frozenset[str]]:
    return {module: frozenset(_imports(module)) for module in _sources()}


def _circles(graph: dict[str, frozenset[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # the graph is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components, key=min)


def _shortest_cycle(graph: dict[str, frozenset[str]], component: set[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth-first inside the component
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    return paths[node] + [start]
                if succ not in paths:
                    paths[succ] = paths[node] + [succ]
                    nxt.append(succ)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not a strongly connected component")


def _cycles(graph: dict[str, frozenset[str]]) -> list[str]:
    """One line per circle: a shortest cycle, and the other modules caught in the same circle."""
    lines = []
    for component in _circles(graph):
        cycle = _shortest_cycle(graph, component)
        line = " -> ".join(cycle)
        others = sorted(component - set(cycle))
        lines.append(line + (f"  (same circle: {', '.join(others)})" if others else ""))
    return lines


def test_the_import_graph_sees_lazy_and_from_imports():
    graph = _graph()
    assert "lmscan.cli.check" in graph["lmscan.cli"]  # from lmscan.cli import check (a module)
    assert "lmscan.errors" in graph["lmscan.cli"]  # from lmscan.errors import LmscanError (a name)
    assert "lmscan.api" in graph["lmscan.cli.check"]  # imported inside the command function
    toy = {"a": frozenset({"b"}), "b": frozenset({"c", "e"}), "c": frozenset({"a"}), "d": frozenset({"a"}),
           "e": frozenset({"b"})}
    assert _cycles(toy) == ["a -> b -> c -> a  (same circle: e)"]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycle(s) inside lmscan:\n" + "\n".join(cycles)


def test_attacks_and_defenses_do_not_import_each_other():
    graph = _graph()
    crossings = [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        for own, other in (("lmscan.attacks", "lmscan.defenses"), ("lmscan.defenses", "lmscan.attacks"))
        if (module == own or module.startswith(own + ".")) and (target == other or target.startswith(other + "."))
    ]
    assert not crossings, "shared code belongs in lmscan/models/training.py or lmscan/models/probes.py:\n" + "\n".join(crossings)


def test_pyproject_lists_every_package():
    """The package list is explicit (rules/ is mapped to lmscan.rules); a new subpackage
    missing from it would be left out of the wheel."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = {_module_name(p) for p in PACKAGE.rglob("__init__.py")} | {"lmscan.rules"}
    assert sorted(setuptools["packages"]) == sorted(on_disk)
    assert setuptools["package-dir"] == {"lmscan.rules": "rules"} and (REPO / "rules" / "__init__.py").is_file()
    assert not (PACKAGE / "rules").exists(), "the rules live in the top-level rules/ folder only"


def test_code_runs_on_the_declared_python_minimum():
    """vermin reads the code for the lowest Python it needs; requires-python must cover it
    (a 3.11-only module such as tomllib has to sit behind a version check)."""
    requires = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    assert requires.startswith(">="), requires
    minimum = requires[2:].strip()
    # vermin has no __main__; call its entry point in a child so its exit code is the verdict.
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())", "--no-config-file",
         "--no-tips", "--violations", f"-t={minimum}-", "--backport", "typing", "--eval-annotations",
         "--processes=1", str(PACKAGE)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"code needs a newer Python than {requires}:\n{proc.stdout}{proc.stderr}"
