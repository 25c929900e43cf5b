"""The design's one-way flow, as tests: kvscope's import graph has no cycle, nothing below the CLI imports it, nothing
branches on an allocator's name outside that allocator's module and the registry, long modules say why, and mypy
is clean (configured in pyproject.toml, like ruff in test_lint.py)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's sources live (pyproject's package-dir): kernels/ and app/ ship inside kvscope.
PACKAGE_DIRS = {"kvscope": ROOT / "kvscope", "kvscope.kernels": ROOT / "kernels", "kvscope.app": ROOT / "app"}
ALLOCATOR_NAMES = {"static", "paged", "vmm"}
# The modules allowed to name allocators: each allocator's own module and the registry that lists them. The replay
# package's table for traces recorded before configs declared their addressing maps names without comparing them.
NAME_OWNERS = {"kvscope.alloc.static", "kvscope.alloc.paged", "kvscope.alloc.vmm", "kvscope.alloc.registry"}
LONG_MODULE_LINES = 400
LONG_MODULE_MARK = "longer than 400 lines"


def modules() -> dict[str, Path]:
    """Every module of the installed package: dotted name -> source file."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if name.startswith("kvscope.kernels.") or not any(
                name.startswith(other + ".") and other != package for other in PACKAGE_DIRS
            ):
                found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[tuple[str, ...], int]]:
    """(candidates, line) for every runtime import: at the top and inside functions alike (an import in a function
    is still a dependency), but not under `if TYPE_CHECKING:` (annotations only). The first candidate that is a
    module is what was imported: `from pkg import x` imports the submodule pkg.x if there is one, else pkg."""
    package = module if is_package else module.rpartition(".")[0]
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield (alias.name,), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                yield (f"{base}.{alias.name}", base), node.lineno
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> nx.DiGraph:
    """Module -> module it imports, within kvscope. `import a.b.c` depends on a.b.c itself: a package's
    __init__ running first is Python's doing, not a dependency of the importer."""
    mods = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        if name == "kvscope":
            # The root package's functions (the lazy __getattr__ behind kvscope.load_trace, load_ipython_extension)
            # are entry points run by users, never while another kvscope module imports.
            tree.body = [n for n in tree.body if not isinstance(n, ast.FunctionDef)]
        for candidates, line in _imports(tree, name, path.name == "__init__.py"):
            target = next((c for c in candidates if c in mods), None)
            if target is not None and target != name and not graph.has_edge(name, target):
                graph.add_edge(name, target, line=line)
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph.number_of_edges() > 100  # the scan sees the real imports
    cycles = sorted(nx.simple_cycles(graph), key=len)[:5]
    shown = [" -> ".join([*c, c[0]]) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(shown)


def test_nothing_below_the_cli_imports_it():
    graph = import_graph()
    # The CLI and its commands, and the notebook magic: `%kvscope run/report` are the CLI's own commands with its own
    # parsers (a surface beside the CLI, not below it).
    cli = {"kvscope.cli", "kvscope.magic"} | {m for m in graph if m.startswith("kvscope.commands")}
    wrong = [
        f"{src} imports {dst} (line {graph.edges[src, dst]['line']})"
        for src, dst in graph.edges
        if dst in cli and src not in cli
    ]
    assert not wrong, "\n".join(wrong)


def _name_branches(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Comparisons against an allocator's name: `x == "paged"`, `x in ("static", "vmm")`, `case "vmm":`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for v in values:
                    if isinstance(v, ast.Constant) and v.value in ALLOCATOR_NAMES:
                        yield node.lineno, v.value
        elif (
            isinstance(node, ast.MatchValue)
            and isinstance(node.value, ast.Constant)
            and node.value.value in ALLOCATOR_NAMES
        ):
            yield node.lineno, node.value.value


def test_no_branch_on_an_allocator_name_outside_its_module_and_the_registry():
    wrong = []
    for name, path in modules().items():
        if name in NAME_OWNERS:
            continue
        for line, value in _name_branches(ast.parse(path.read_text(), str(path))):
            wrong.append(f"{path.relative_to(ROOT)}:{line} compares with {value!r}")
    assert not wrong, "\n".join(wrong)


def test_modules_over_400_lines_say_why():
    long = []
    for _, path in modules().items():
        text = path.read_text()
        if text.count("\n") > LONG_MODULE_LINES and LONG_MODULE_MARK not in text:
            long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
    assert not long, (
        f"modules over {LONG_MODULE_LINES} lines without a comment saying why ({LONG_MODULE_MARK!r}):\n"
        + ("\n".join(long))
    )


def test_mypy_is_clean():
    mypy = shutil.which("mypy") or str(Path(sys.executable).with_name("mypy"))
    if not Path(mypy).exists():
        pytest.fail("mypy is not installed (it is in the dev extra: pip install -e '.[dev]')")
    result = subprocess.run([mypy, "--no-incremental"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
