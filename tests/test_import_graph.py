"""The layout's rules, checked on the import graph read statically from the source (ast, nothing imported).

- the index and query packages import no Beam stage module (``pipeline.stages.*``), not even
  inside a function;
- the Beam-free modules do not load apache_beam when imported: neither they nor anything they
  import at module level imports it at module level (inside a function is allowed: Beam's
  FileSystems is imported on first use);
- no import cycle among the project's modules through module-level imports, nor one that a
  function-level import only hides (``LAZY_CYCLES_ALLOWED`` names any kept for a stated reason).

The checker itself is tested on small synthetic module trees, so a rule that could never fail
would show.
"""
from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pipeline", "encoders", "schemas")
# may import no Beam stage module (pipeline.stages.*), at any depth
NO_STAGE_IMPORTS = ("pipeline.index", "pipeline.query")
STAGES = "pipeline.stages"
# importing these must not load apache_beam (module-level imports, followed through the project)
BEAM_FREE = ("pipeline.index", "pipeline.query", "pipeline.report", "pipeline.storage", "pipeline.config",
             "schemas", "encoders.fusion", "encoders.media", "encoders.specs")
BEAM = "apache_beam"
# cycles through function-level imports that are kept on purpose: frozenset of modules -> the reason
LAZY_CYCLES_ALLOWED: dict[frozenset[str], str] = {}


@dataclasses.dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # a project module, or the top-level name of a third-party package
    line: int
    module_level: bool  # False: inside a function (runs when called, not on import)


def discover(root: pathlib.Path, packages: tuple[str, ...]) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py under the given top-level packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str:
    """The longest project module ``name`` starts with, or its top-level package when not in the project."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return parts[0]


def imports_of(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[Import]:
    """Every import statement of one module: at module level (class bodies, try, if) or inside functions."""
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def names(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        # ``from a.b import c``: c may be a module (a.b.c) or a name defined in a.b
        return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:  # the ``if TYPE_CHECKING`` body never runs
                    visit(ast.Module(body=[sub], type_ignores=[]), module_level)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in dict.fromkeys(names(child)):
                    found.append(Import(module, _resolve(name, modules), child.lineno, module_level))
            else:
                inside = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, module_level and not inside)

    visit(ast.parse(path.read_text(), filename=str(path)), True)
    return found


def import_graph(root: pathlib.Path, packages: tuple[str, ...]) -> dict[str, list[Import]]:
    modules = discover(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def stage_imports(graph: dict[str, list[Import]], guarded: tuple[str, ...] = NO_STAGE_IMPORTS,
                  stages: str = STAGES) -> list[str]:
    """'module:line imports stage' for every import of a stage module from a guarded package."""
    return [f"{imp.source}:{imp.line} imports {imp.target}"
            for module, imps in sorted(graph.items()) if _within(module, guarded)
            for imp in imps if _within(imp.target, (stages,))]


def beam_chains(graph: dict[str, list[Import]], beam_free: tuple[str, ...] = BEAM_FREE,
                beam: str = BEAM) -> list[str]:
    """For each Beam-free module whose import loads Beam: the module-level import chain that does."""
    out = []
    for start in sorted(m for m in graph if _within(m, beam_free)):
        parents: dict[str, tuple[str, int] | None] = {start: None}
        queue, hit = [start], None
        while queue and hit is None:
            module = queue.pop(0)
            for imp in graph.get(module, []):
                if not imp.module_level or imp.target in parents:
                    continue
                parents[imp.target] = (module, imp.line)
                if imp.target == beam:
                    hit = imp.target
                    break
                if imp.target in graph:
                    queue.append(imp.target)
        if hit is not None:
            chain, node = [], hit
            while parents[node] is not None:
                source, line = parents[node]
                chain.append(f"{source}:{line}")
                node = source
            out.append(" -> ".join(reversed(chain)) + f" -> {beam}")
    return out


def cycles(graph: dict[str, list[Import]], lazy: bool = False) -> list[list[str]]:
    """One cycle (as a closed path of modules) per strongly connected group of module-level imports.

    ``lazy``: imports inside functions count too, so a circle that a function-level import only hides
    (it breaks at import time, not in the design) is reported as well.
    """
    edges = {m: sorted({i.target for i in imps if (lazy or i.module_level) and i.target in graph and i.target != m})
             for m, imps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)

    out = []
    for group in groups:  # a shortest path from the group's first module back to itself
        members, start = set(group), group[0]
        parents: dict[str, str] = {}
        queue, last = [start], None
        while queue and last is None:
            v = queue.pop(0)
            for w in edges[v]:
                if w == start:
                    last = v
                    break
                if w in members and w not in parents:
                    parents[w] = v
                    queue.append(w)
        path = [last]
        while path[-1] != start:
            path.append(parents[path[-1]])
        out.append(list(reversed(path)) + [start])
    return out


# ---- the project's graph ----

@pytest.fixture(scope="module")
def project_graph() -> dict[str, list[Import]]:
    return import_graph(ROOT, PROJECT_PACKAGES)


def test_the_graph_is_read(project_graph):
    # the walk sees the packages and the imports the rules are about, so an empty graph cannot pass
    assert {"pipeline.stages.index", "pipeline.index.indexing", "pipeline.query.search", "pipeline.storage",
            "pipeline.report.data"} <= set(project_graph)
    assert any(i.target == "pipeline.index.indexing" and i.module_level for i in project_graph["pipeline.stages.index"])
    assert any(i.target == BEAM for i in project_graph["pipeline.stages.index"])
    assert any(i.target == BEAM and not i.module_level for i in project_graph["pipeline.storage"])


def test_index_and_query_packages_import_no_stage(project_graph):
    found = stage_imports(project_graph)
    assert not found, "the index and query packages must not import a stage module:\n" + "\n".join(found)


def test_beam_free_modules_load_no_beam_on_import(project_graph):
    found = beam_chains(project_graph)
    assert not found, "these Beam-free modules load apache_beam at import:\n" + "\n".join(found)


def test_no_import_cycles(project_graph):
    found = cycles(project_graph)
    assert not found, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_import_cycles_hidden_by_function_level_imports(project_graph):
    found = [c for c in cycles(project_graph, lazy=True) if frozenset(c) not in LAZY_CYCLES_ALLOWED]
    assert not found, ("import cycles that function-level imports only hide (break them, e.g. through the "
                       "encoders.families registry, or allow-list one with its reason):\n"
                       + "\n".join(" -> ".join(c) for c in found))


def test_importing_the_query_side_loads_no_beam():
    # the same rule, observed: a fresh interpreter imports the Beam-free modules and Beam stays unloaded
    modules = ["pipeline.query.search", "pipeline.query.evaluate", "pipeline.query.hits", "pipeline.index.runs",
               "pipeline.index.index_select", "pipeline.report.data", "pipeline.report.stats", "pipeline.config"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"loaded = sorted(m for m in sys.modules if m == 'apache_beam' or m.startswith('apache_beam.'))\n"
            "print(len(loaded), loaded[:5])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("0 "), out.stdout + out.stderr


# ---- the checker, on synthetic trees ----

def _tree(tmp_path: pathlib.Path, files: dict[str, str]) -> dict[str, list[Import]]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return import_graph(tmp_path, ("pipeline",))


CLEAN = {
    "pipeline/__init__.py": "",
    "pipeline/stages/__init__.py": "",
    "pipeline/stages/index.py": "import apache_beam as beam\nfrom pipeline.index import indexing\n",
    "pipeline/index/__init__.py": "",
    "pipeline/index/indexing.py": "import numpy\n\ndef read(p):\n    import apache_beam\n",
    "pipeline/query/__init__.py": "",
    "pipeline/query/search.py": "from pipeline.index import indexing\nfrom . import hits\n",
    "pipeline/query/hits.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.query import search\n",
}


def test_checker_passes_a_clean_tree(tmp_path):
    graph = _tree(tmp_path, CLEAN)
    assert not stage_imports(graph) and not beam_chains(graph) and not cycles(graph)
    # relative imports resolve, lazy imports are seen but are not module-level
    assert Import("pipeline.query.search", "pipeline.query.hits", 2, True) in graph["pipeline.query.search"]
    assert Import("pipeline.index.indexing", "apache_beam", 4, False) in graph["pipeline.index.indexing"]


def test_checker_finds_a_stage_import_even_inside_a_function(tmp_path):
    graph = _tree(tmp_path, {**CLEAN, "pipeline/query/search.py": (
        "from pipeline.index import indexing\n\ndef f():\n    from pipeline.stages.index import x\n")})
    assert stage_imports(graph) == ["pipeline.query.search:4 imports pipeline.stages.index"]


def test_checker_finds_beam_loaded_through_another_module(tmp_path):
    graph = _tree(tmp_path, {**CLEAN, "pipeline/index/indexing.py": "from pipeline import io\n",
                             "pipeline/io.py": "import os\ntry:\n    from apache_beam.io import filesystems\n"
                                               "except ImportError:\n    pass\n"})
    assert beam_chains(graph, beam_free=("pipeline.index",)) == [
        "pipeline.index.indexing:1 -> pipeline.io:3 -> apache_beam"]
    assert beam_chains(graph, beam_free=("pipeline.query",)) == [
        "pipeline.query.search:1 -> pipeline.index.indexing:1 -> pipeline.io:3 -> apache_beam"]


def test_checker_reports_a_cycle_and_ignores_lazy_edges(tmp_path):
    files = {**CLEAN, "pipeline/config.py": "from pipeline import incremental\n",
             "pipeline/incremental.py": "def f():\n    from pipeline import fuse\n",
             "pipeline/fuse.py": "from pipeline.config import Route\n"}
    assert not cycles(_tree(tmp_path, files))  # the lazy edge incremental -> fuse closes no module-level cycle
    # ... but it is a cycle all the same, hidden by the function-level import: the lazy walk reports it
    assert cycles(_tree(tmp_path, files), lazy=True) == [
        ["pipeline.config", "pipeline.incremental", "pipeline.fuse", "pipeline.config"]]
    files["pipeline/incremental.py"] = "import pipeline.fuse\n"
    assert cycles(_tree(tmp_path, files)) == [
        ["pipeline.config", "pipeline.incremental", "pipeline.fuse", "pipeline.config"]]
