"""Imports only point down (shared/ARCHITECTURE.md, "Layers"): the first-party import graph, read from source.

The graph is built with `ast` from the source of the packages `jclip` and `configs`, never by importing them.
Nodes are modules; a package's `__init__.py` is the package module. Every `import x`, `from x import y` and
relative import counts, wherever it stands: at module level, inside functions and methods, under `if`. Two
dynamic forms are read too: `importlib.import_module("a.literal.name")`, and a package `__init__` that
imports every submodule it finds with `pkgutil.iter_modules(__path__)` (jclip.losses registers its loss
families that way), which counts as importing each of its submodules whose name does not start with `_`.
Imports with computed names (e.g. `import_module(TABLE[key])`) are not seen.

How an import becomes edges. `from a.b import c` names the module `a.b.c` when `c` is a submodule of `a.b`,
else the module `a.b` (the name is read from the package `__init__`); `import a.b.c` names `a.b.c`. That
named module is an edge. Python also runs the `__init__` of every package above the named module (for
`from a.b import c` that includes `a.b` itself), so those packages are edges too, except the packages that
enclose the importing module: by the time a module runs, its own enclosing packages are already in
`sys.modules` (being initialised), and reaching them through the package path starts nothing new.

The rule for a package `__init__` that imports its own submodules while a submodule imports a sibling
through the package path, which follows from the above:
  - `from pkg import sibling` where `sibling` is a submodule is an edge to `pkg.sibling` only. It is safe
    whatever order `pkg/__init__.py` imports things in (Python imports the submodule when the partially
    initialised package lacks the attribute), so it is not a cycle.
  - `from pkg import name` where `name` is defined or re-exported by `pkg/__init__.py` is an edge to `pkg`.
    With `pkg/__init__.py` importing that submodule, it is a cycle, and a real hazard: whether `name`
    exists yet depends on the order of the lines in `__init__.py` (ImportError on a reorder, or when the
    submodule is the first thing imported). Such a submodule should import the defining module instead.
  - A module outside `pkg` that imports `pkg.sub` depends on `pkg/__init__.py` too, since Python runs it
    first; so an `__init__` that imports its own submodules makes every outside user of any one of them
    depend on all of them.
The synthetic tests below check the first two against a real Python import.

The rules enforced:
  1. No import cycle among first-party modules (printed as `a -> b -> c -> a`, with the import lines).
  2. The lower floors -- `jclip.models.*`, `jclip.losses.*`, `jclip.data.*`, `jclip.evals.*`,
     `jclip.convert.*` (its entry point `jclip.convert.__main__` excepted: entry points are the top floor),
     `jclip.parallel`, `jclip.checkpoint`, `jclip.errors` -- import neither the loop `jclip.train`, nor the
     step `jclip.step`, nor anything in `jclip.tools`: not directly, and not through other first-party
     modules either (a lower floor reaching the step through, say, `jclip.build` imports it all the same;
     the chain is printed).
  3. `jclip.errors` imports nothing first-party.
  4. No library module imports the top floor: `jclip.tools.*`, or an entry point (`jclip.main`,
     `jclip.evaluate`, `jclip.write_guidance`, `jclip.convert.__main__`). Only the entry points and the tools
     themselves may import the tools.
Not enforced: the whole floor order of the Layers paragraph (e.g. a lower floor importing `jclip.restore`
or `jclip.build` that never reaches the step passes; `jclip.convert.params_io` does import `jclip.restore`,
which imports `jclip.build`, as the Layout's restore.py line intends).
The builder is tested on small synthetic packages, so the checks are shown able to fail.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("jclip", "configs")

LOWER_FLOOR_PACKAGES = ("jclip.models", "jclip.losses", "jclip.data", "jclip.evals", "jclip.convert")
LOWER_FLOOR_MODULES = ("jclip.parallel", "jclip.checkpoint", "jclip.errors")
ENTRY_POINTS = ("jclip.main", "jclip.evaluate", "jclip.write_guidance", "jclip.join_captions", "jclip.convert.__main__")
UPPER_FLOOR = ("jclip.train", "jclip.step", "jclip.tools")  # `jclip.tools` with everything in it

LOWER_FLOOR_RULE = "a lower floor imports the loop, the step or a tool"
ERRORS_RULE = "jclip.errors imports something first-party"
TOOLS_RULE = "a library module imports a tool or an entry point"


@dataclasses.dataclass(frozen=True)
class Edge:
    """`source` imports `target` at `line` of its file; `via_package` when only a package __init__ runs."""

    source: str
    target: str
    line: int
    statement: str
    via_package: bool = False

    def describe(self, root: Path, paths: dict[str, Path]) -> str:
        how = f" (runs {self.target}'s __init__)" if self.via_package else ""
        where = paths[self.source].relative_to(root) if root in paths[self.source].parents else paths[self.source]
        return f"{where}:{self.line}: {self.statement}{how}"


def in_package(module: str, package: str) -> bool:
    """Whether `module` is `package` or inside it."""
    return module == package or module.startswith(package + ".")


def discover_modules(root: Path, packages: tuple[str, ...]) -> tuple[dict[str, Path], set[str]]:
    """Module name -> source file for every .py under the given top-level packages; and the package names."""
    modules: dict[str, Path] = {}
    package_names: set[str] = set()
    for top in packages:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if not all(part.isidentifier() for part in parts):
                continue
            if parts[-1] == "__init__":
                parts.pop()
                package_names.add(".".join(parts))
            modules[".".join(parts)] = path
    return modules, package_names


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module of a relative `from ...name import` in `module`."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _longest_known(dotted: str, modules: dict[str, Path]) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def module_edges(module: str, path: Path, modules: dict[str, Path], package_names: set[str]) -> list[Edge]:
    """The first-party imports of one module, as edges (see the module docstring for the rules)."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    lines = source.splitlines()
    is_package = module in package_names
    enclosing = set(_ancestors(module)) | ({module} if is_package else set())
    edges: list[Edge] = []

    def add(named: str | None, node: ast.AST) -> None:
        if named is None:
            return
        statement = lines[node.lineno - 1].strip()
        if named != module:
            edges.append(Edge(module, named, node.lineno, statement))
        for package in _ancestors(named):
            if package in modules and package not in enclosing and package != module:
                edges.append(Edge(module, package, node.lineno, statement, via_package=True))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_longest_known(alias.name, modules), node)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            if base not in modules:
                add(_longest_known(base, modules), node)
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base, node)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                add(_longest_known(node.args[0].value, modules), node)
            if called == "iter_modules" and is_package and node.args and isinstance(node.args[0], ast.Name) \
                    and node.args[0].id == "__path__":
                for child in sorted(modules):
                    if child.rpartition(".")[0] == module and not child.rpartition(".")[2].startswith("_"):
                        add(child, node)
    return edges


def build_graph(root: Path, packages: tuple[str, ...]) -> tuple[dict[str, list[Edge]], dict[str, Path]]:
    """The first-party import graph: module -> its edges (deduplicated by target, first line kept)."""
    modules, package_names = discover_modules(root, packages)
    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        by_target: dict[str, Edge] = {}
        for edge in sorted(module_edges(module, path, modules, package_names),
                           key=lambda e: (e.via_package, e.line)):
            by_target.setdefault(edge.target, edge)
        graph[module] = sorted(by_target.values(), key=lambda e: (e.target, e.line))
    return graph, modules


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter([e.target for e in graph[start]]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter([e.target for e in graph.get(child, [])])))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """For every module on a cycle, one shortest cycle through it, as [a, b, ..., a]; deduplicated."""
    cycles: set[tuple[str, ...]] = set()
    for component in strongly_connected(graph):
        members = set(component)
        if len(component) == 1 and not any(e.target == component[0] for e in graph[component[0]]):
            continue
        for start in component:
            parents: dict[str, str] = {}
            queue = collections.deque([start])
            found = False
            while queue and not found:
                node = queue.popleft()
                for edge in graph[node]:
                    if edge.target not in members:
                        continue
                    if edge.target == start:
                        path = [node]
                        while path[-1] != start:
                            path.append(parents[path[-1]])
                        path.reverse()
                        turn = path.index(min(path))
                        cycles.add(tuple(path[turn:] + path[:turn]))
                        found = True
                        break
                    if edge.target not in parents:
                        parents[edge.target] = node
                        queue.append(edge.target)
    return [list(cycle) + [cycle[0]] for cycle in sorted(cycles)]


def format_cycle(cycle: list[str], graph: dict[str, list[Edge]], root: Path, paths: dict[str, Path]) -> str:
    steps = []
    for source, target in zip(cycle, cycle[1:]):
        edge = next(e for e in graph[source] if e.target == target)
        steps.append(f"    {edge.describe(root, paths)}")
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def is_lower_floor(module: str) -> bool:
    if module in ENTRY_POINTS:
        return False
    return module in LOWER_FLOOR_MODULES or any(in_package(module, p) for p in LOWER_FLOOR_PACKAGES)


def is_upper_floor(module: str) -> bool:
    return any(in_package(module, p) for p in UPPER_FLOOR)


def is_library(module: str) -> bool:
    return module not in ENTRY_POINTS and not in_package(module, "jclip.tools")


def _shortest_chain(graph: dict[str, list[Edge]], start: str, goal) -> list[Edge] | None:
    """The shortest chain of edges from `start` to a module for which `goal(module)`; None if none."""
    came_by: dict[str, Edge] = {}
    queue = collections.deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for edge in graph.get(node, []):
            if edge.target in seen:
                continue
            seen.add(edge.target)
            came_by[edge.target] = edge
            if goal(edge.target):
                chain = [edge]
                while chain[0].source != start:
                    chain.insert(0, came_by[chain[0].source])
                return chain
            queue.append(edge.target)
    return None


def layer_violations(graph: dict[str, list[Edge]]) -> list[tuple[str, list[Edge]]]:
    """(rule, chain of edges) for every import that points up; a direct import is a chain of one edge."""
    found = []
    for module in sorted(graph):
        if is_lower_floor(module):
            for edge in graph[module]:
                if is_upper_floor(edge.target):
                    found.append((LOWER_FLOOR_RULE, [edge]))
                elif not is_lower_floor(edge.target):
                    # An edge out of the lower floors that leads on to the top: the edge that climbs is
                    # reported once, here, not again for every lower module that reaches this one.
                    chain = _shortest_chain(graph, edge.target, is_upper_floor)
                    if chain is not None:
                        found.append((LOWER_FLOOR_RULE, [edge] + chain))
        for edge in graph[module]:
            if module == "jclip.errors":
                found.append((ERRORS_RULE, [edge]))
            if is_library(module) and not is_library(edge.target) \
                    and not (is_lower_floor(module) and is_upper_floor(edge.target)):
                found.append((TOOLS_RULE, [edge]))
    return found


def format_chain(chain: list[Edge], root: Path, paths: dict[str, Path]) -> str:
    lines = [" -> ".join([chain[0].source] + [edge.target for edge in chain])]
    lines += [f"    {edge.describe(root, paths)}" for edge in chain]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The repository.


@pytest.fixture(scope="module")
def repo_graph():
    graph, paths = build_graph(REPO_ROOT, FIRST_PARTY)
    return graph, paths


def test_the_graph_covers_the_packages(repo_graph):
    graph, _ = repo_graph
    for module in ("jclip", "jclip.train", "jclip.step", "jclip.errors", "jclip.models", "jclip.tools.compare",
                   "jclip.convert.__main__", "configs", "configs.common"):
        assert module in graph
    # Function-level imports are read: main imports the loop only inside its function.
    assert "jclip.train" in {e.target for e in graph["jclip.main"]}


def test_no_import_cycles(repo_graph):
    graph, paths = repo_graph
    cycles = find_cycles(graph)
    report = "\n".join(format_cycle(cycle, graph, REPO_ROOT, paths) for cycle in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) among first-party modules:\n{report}"


def test_imports_only_point_down(repo_graph):
    graph, paths = repo_graph
    violations = layer_violations(graph)
    report = "\n".join(f"  {rule}: {format_chain(chain, REPO_ROOT, paths)}" for rule, chain in violations)
    assert not violations, f"{len(violations)} import(s) pointing up:\n{report}"


# ---------------------------------------------------------------------------------------------------------
# The builder itself, on synthetic packages: it can fail.


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def imports_cleanly(root: Path, module: str) -> bool:
    """Whether a fresh Python imports `module` from `root` without an error."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=root, capture_output=True,
                            env={"PYTHONPATH": str(root), "PATH": os.environ.get("PATH", "")})
    return result.returncode == 0


def targets(graph: dict[str, list[Edge]], module: str) -> set[str]:
    return {e.target for e in graph[module]}


def test_builder_finds_a_cycle_made_by_a_function_level_import(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def late():\n    class Inner:\n        def method(self):\n            from . import c\n",
        "pkg/c.py": "import os\n\ndef helper():\n    import pkg.a\n    return pkg.a, os\n",
    })
    graph, _ = build_graph(tmp_path, ("pkg",))
    assert targets(graph, "pkg.b") == {"pkg.c"}
    assert targets(graph, "pkg.c") == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_builder_resolves_from_package_import_submodule_to_the_submodule(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.sub import thing\nNAME = 1\n",
        "pkg/sub/__init__.py": "thing = 1\n",
        "pkg/sub/leaf.py": "from pkg.sub import thing\n",
        "pkg/user.py": "from pkg import sub, NAME\nfrom .sub import leaf\n",
        "other/__init__.py": "",
        "other/m.py": "from pkg.sub import leaf\nimport pkg\n",
    })
    graph, _ = build_graph(tmp_path, ("pkg", "other"))
    assert targets(graph, "pkg.user") == {"pkg.sub", "pkg", "pkg.sub.leaf"}
    assert not [e for e in graph["pkg.user"] if e.target == "pkg.sub" and e.via_package]
    # A name from a package's __init__ is an edge to the package, even from inside it.
    assert targets(graph, "pkg.sub.leaf") == {"pkg.sub"}
    # From outside, the packages above the imported module run too.
    assert targets(graph, "other.m") == {"pkg.sub.leaf", "pkg.sub", "pkg"}
    assert find_cycles(graph) == []


def test_builder_rule_for_a_package_that_imports_its_submodules(tmp_path):
    safe = {
        "pkg/__init__.py": "from pkg.a import A\nfrom pkg.b import B\n",
        "pkg/a.py": "from pkg import b\nA = 1\n",
        "pkg/b.py": "B = 2\n",
    }
    write_package(tmp_path / "safe", safe)
    graph, _ = build_graph(tmp_path / "safe", ("pkg",))
    assert find_cycles(graph) == []  # a sibling submodule through the package path is safe
    assert imports_cleanly(tmp_path / "safe", "pkg.a") and imports_cleanly(tmp_path / "safe", "pkg")

    hazard = dict(safe, **{"pkg/a.py": "from pkg import B\nA = B\n"})  # B is read from pkg/__init__.py
    write_package(tmp_path / "hazard", hazard)
    graph, paths = build_graph(tmp_path / "hazard", ("pkg",))
    cycles = find_cycles(graph)
    assert cycles == [["pkg", "pkg.a", "pkg"]]
    assert "pkg/a.py:1: from pkg import B" in format_cycle(cycles[0], graph, tmp_path / "hazard", paths)
    assert not imports_cleanly(tmp_path / "hazard", "pkg")  # and Python agrees: ImportError


def test_builder_reads_dynamic_family_imports(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "import importlib, pkgutil\n"
                           "for m in pkgutil.iter_modules(__path__):\n"
                           "    importlib.import_module(f'{__name__}.{m.name}')\n",
        "pkg/family.py": "from pkg import REGISTRY\n",
        "pkg/_private.py": "",
        "pkg/loader.py": "import importlib\nimportlib.import_module('pkg.family')\n",
    })
    graph, _ = build_graph(tmp_path, ("pkg",))
    assert targets(graph, "pkg") == {"pkg.family", "pkg.loader"}
    assert targets(graph, "pkg.loader") == {"pkg.family"}
    assert ["pkg", "pkg.family", "pkg"] in find_cycles(graph)


def test_layer_rules_can_fail(tmp_path):
    write_package(tmp_path, {
        "jclip/__init__.py": "",
        "jclip/errors.py": "from jclip import parallel\n",
        "jclip/parallel.py": "",
        "jclip/step.py": "",
        "jclip/train.py": "",
        "jclip/main.py": "from jclip.tools import bench\nfrom jclip import train\n",
        "jclip/models/__init__.py": "",
        "jclip/models/vision.py": "def f():\n    from jclip import step\n",
        "jclip/models/heads.py": "import jclip.build\n",
        "jclip/models/text.py": "from jclip.models import heads\n",
        "jclip/build.py": "from jclip.tools import bench\nfrom jclip import step\n",
        "jclip/restore.py": "from jclip import main\n",
        "jclip/convert/__init__.py": "",
        "jclip/convert/__main__.py": "from jclip import train\nfrom jclip.tools import bench\n",
        "jclip/tools/__init__.py": "",
        "jclip/tools/bench.py": "from jclip import train\n",
    })
    graph, _ = build_graph(tmp_path, ("jclip",))
    found = {(rule, tuple([chain[0].source] + [e.target for e in chain])) for rule, chain in layer_violations(graph)}
    assert found == {
        (ERRORS_RULE, ("jclip.errors", "jclip.parallel")),
        (TOOLS_RULE, ("jclip.build", "jclip.tools")),
        (TOOLS_RULE, ("jclip.build", "jclip.tools.bench")),
        (TOOLS_RULE, ("jclip.restore", "jclip.main")),
        (LOWER_FLOOR_RULE, ("jclip.models.vision", "jclip.step")),
        # Through a middle floor that is allowed to import the step.
        (LOWER_FLOOR_RULE, ("jclip.models.heads", "jclip.build", "jclip.step")),
    }  # and not again for jclip.models.text, which reaches the step only through jclip.models.heads
