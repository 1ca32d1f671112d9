"""Structural checks that keep the package readable (issue 11, "Done when"); run by ``tests/test_structure.py``.

Checks (each a function returning a list of :class:`Violation`):

- :func:`check_sizes` — no module over 600 lines and no function or method over 80 lines (from its ``def``
  line to its last line, docstring included, decorators not) in ``adaptive_dp/`` and ``controllers/``;
- :func:`check_method_type` — the text ``MethodType`` does not occur in ``adaptive_dp/`` (no patching of
  opacus objects' methods);
- :func:`check_opacus_private_calls` — no call ``x._name(...)`` in ``adaptive_dp/`` of a private
  (``_``-prefixed, not dunder) function or method that the installed opacus defines, unless adaptive_dp
  defines ``_name`` itself (our own helpers and overrides may share opacus' names); ``super()._name(...)``
  is flagged whenever the calling class's own override is adaptive_dp's only definition of ``_name`` —
  that call runs opacus' private implementation;
- :func:`check_import_cycles` — the graph of module-level imports between the modules of ``adaptive_dp``
  and ``controllers`` has no cycle (imports under ``if TYPE_CHECKING:`` do not run and are left out;
  importing ``a.b.c`` also runs the packages ``a.b`` that the importer is not inside); cycles that need a
  function-level (deferred) import are returned separately as warnings;
- :func:`check_design_md` — no reference to a ``DESIGN.md`` (not in the repository) in the packages.

``python tools/check_structure.py`` prints every violation as ``path:line: message`` (then the warnings)
and exits 1 if there is any violation, else 0.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("adaptive_dp", "controllers")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


@dataclass(frozen=True, order=True)
class Violation:
    """One finding: ``path`` relative to the checked root, 1-based ``line``, and what is wrong."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


# ------------------------------------------------------------------------------------------------ helpers


def python_files(root: Path, packages: Iterable[str]) -> list[Path]:
    """Every ``*.py`` file under ``root/<package>`` for each package, sorted (missing packages are skipped)."""
    files: list[Path] = []
    for package in packages:
        files.extend(sorted((root / package).rglob("*.py")))
    return files


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _functions(tree: ast.AST) -> Iterator[FunctionNode]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


# -------------------------------------------------------------------------------------------------- sizes


def check_sizes(
    root: Path = REPO,
    packages: Iterable[str] = PACKAGES,
    *,
    max_module_lines: int = MAX_MODULE_LINES,
    max_function_lines: int = MAX_FUNCTION_LINES,
) -> list[Violation]:
    """Modules over ``max_module_lines`` lines and functions/methods over ``max_function_lines`` lines."""
    found = []
    for path in python_files(root, packages):
        text = path.read_text(encoding="utf-8")
        rel = _relative(path, root)
        n_lines = len(text.splitlines())
        if n_lines > max_module_lines:
            found.append(Violation(rel, 1, f"module has {n_lines} lines (> {max_module_lines})"))
        for node in _functions(ast.parse(text, filename=str(path))):
            length = node.end_lineno - node.lineno + 1
            if length > max_function_lines:
                found.append(
                    Violation(
                        rel, node.lineno, f"function {node.name} has {length} lines (> {max_function_lines})"
                    )
                )
    return sorted(found)


# ------------------------------------------------------------------------------------------- text patterns


def _grep(root: Path, packages: Iterable[str], needle: str, message: str) -> list[Violation]:
    found = []
    for path in python_files(root, packages):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if needle in line:
                found.append(Violation(_relative(path, root), number, message))
    return found


def check_method_type(root: Path = REPO, packages: Iterable[str] = ("adaptive_dp",)) -> list[Violation]:
    """Lines mentioning ``MethodType``: methods of opacus objects must not be patched (subclass instead)."""
    return _grep(
        root, packages, "MethodType", "MethodType: do not patch methods; subclass or use a public hook"
    )


def check_design_md(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> list[Violation]:
    """Lines pointing at ``DESIGN.md``, which is not in the repository (point at ``docs/`` instead)."""
    return _grep(
        root, packages, "DESIGN.md", "points at DESIGN.md, which is not in the repository (use docs/)"
    )


# ------------------------------------------------------------------------------------ opacus private calls


@functools.lru_cache(maxsize=4)
def opacus_private_names(opacus_dir: Path | None = None) -> frozenset[str]:
    """Names of the private (``_x``, not dunder) functions and methods defined in opacus' source.

    Args:
        opacus_dir: the opacus package folder; default: the installed ``opacus`` (its ``tests`` are skipped).

    Raises:
        ImportError: opacus is not installed and no folder was given.
    """
    if opacus_dir is None:
        spec = importlib.util.find_spec("opacus")  # located, not imported (no torch import)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("opacus is not installed; pass opacus_dir=")
        opacus_dir = Path(next(iter(spec.submodule_search_locations)))
    names = set()
    for path in sorted(Path(opacus_dir).rglob("*.py")):
        if "tests" in path.relative_to(opacus_dir).parts:
            continue
        try:
            tree = _parse(path)
        except SyntaxError:
            continue
        names.update(node.name for node in _functions(tree) if _is_private(node.name))
    return frozenset(names)


def _own_definitions(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Private function name -> the "module:Class" (or "module:") scopes that define it."""
    owners: dict[str, set[str]] = {}
    for rel, tree in trees.items():
        for scope, node in _scoped_functions(tree):
            if _is_private(node.name):
                owners.setdefault(node.name, set()).add(f"{rel}:{scope}")
    return owners


def _scoped_functions(tree: ast.AST, scope: str = "") -> Iterator[tuple[str, FunctionNode]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            yield from _scoped_functions(node, node.name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield scope, node
            yield from _scoped_functions(node, scope)
        else:
            yield from _scoped_functions(node, scope)


def _calls_with_class(tree: ast.AST, scope: str = "") -> Iterator[tuple[str, ast.Call]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Call):
            yield scope, node
        yield from _calls_with_class(node, node.name if isinstance(node, ast.ClassDef) else scope)


def _is_super_call(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def check_opacus_private_calls(
    root: Path = REPO,
    packages: Iterable[str] = ("adaptive_dp",),
    *,
    private_names: frozenset[str] | None = None,
) -> list[Violation]:
    """Calls of opacus' private functions/methods (see the module docstring for the rule)."""
    private = opacus_private_names() if private_names is None else private_names
    trees = {_relative(path, root): _parse(path) for path in python_files(root, packages)}
    owners = _own_definitions(trees)
    found = []
    for rel, tree in trees.items():
        for scope, call in _calls_with_class(tree):
            func = call.func
            if not (isinstance(func, ast.Attribute) and func.attr in private):
                continue
            others = owners.get(func.attr, set()) - {f"{rel}:{scope}"}
            if _is_super_call(func.value) and not others:
                found.append(
                    Violation(rel, call.lineno, f"super().{func.attr}() runs opacus' private method")
                )
            elif func.attr not in owners:
                found.append(Violation(rel, call.lineno, f"calls opacus' private {func.attr}()"))
    return sorted(found)


def opacus_private_imports(root: Path = REPO, packages: Iterable[str] = ("adaptive_dp",)) -> list[Violation]:
    """``from opacus... import _name`` lines (private names imported from opacus), reported as warnings."""
    found = []
    for path in python_files(root, packages):
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "opacus":
                for alias in node.names:
                    if _is_private(alias.name):
                        message = f"imports opacus' private {node.module}.{alias.name}"
                        found.append(Violation(_relative(path, root), node.lineno, message))
    return found


# ----------------------------------------------------------------------------------------------- imports


@dataclass(frozen=True)
class ImportEdge:
    """``importer`` imports ``target`` (dotted module names) at ``path:line``; ``deferred`` inside a function."""

    importer: str
    target: str
    path: str
    line: int
    deferred: bool


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of ``root/a/b/c.py`` (``a.b.c``; a package's ``__init__.py`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(
    tree: ast.AST, deferred: bool = False
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, deferred
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]), deferred)
        else:
            inner = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _import_nodes(node, inner)


def _known(name: str, modules: set[str]) -> str | None:
    """``name`` or its longest prefix that is a known module."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _targets(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]
) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = importer.split(".") if is_package else importer.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
        ]
    return [t for t in (_known(n, modules) for n in names) if t is not None]


def _with_packages(target: str, importer: str) -> list[str]:
    """The target and the packages above it that importing it runs (those the importer is not inside)."""
    parts = target.split(".")
    chain = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return [m for m in chain if m != importer and not (importer + ".").startswith(m + ".")]


def import_edges(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> list[ImportEdge]:
    """All import edges between the modules of ``packages`` (module-level and deferred)."""
    files = {module_name(p, root): p for p in python_files(root, packages)}
    modules = set(files)
    edges = []
    for importer, path in files.items():
        is_package = path.name == "__init__.py"
        for node, deferred in _import_nodes(_parse(path)):
            for target in _targets(node, importer, is_package, modules):
                for module in _with_packages(target, importer):
                    edges.append(ImportEdge(importer, module, _relative(path, root), node.lineno, deferred))
    return edges


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; only those that contain a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    return components


def _cycle_path(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """A shortest cycle start -> ... -> start inside ``members`` (breadth-first search)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    return [start]


def _graph(edges: Iterable[ImportEdge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.target)
    return graph


def _cycle_violations(edges: list[ImportEdge], graph: dict[str, set[str]], label: str) -> list[Violation]:
    found = []
    for component in _strongly_connected(graph):
        members = set(component)
        cycle = _cycle_path(graph, component[0], members)
        first = next(e for e in edges if e.importer == cycle[0] and e.target == cycle[1])
        found.append(Violation(first.path, first.line, f"{label}: {' -> '.join(cycle)}"))
    return found


def check_import_cycles(
    root: Path = REPO, packages: Iterable[str] = PACKAGES
) -> tuple[list[Violation], list[Violation]]:
    """(cycles of module-level imports, extra cycles that go through a deferred import).

    The first list are violations; the second are warnings: a deferred import hides the cycle from the
    import system, but the modules still depend on each other.
    """
    edges = import_edges(root, packages)
    eager = [e for e in edges if not e.deferred]
    eager_graph = _graph(eager)
    cycles = _cycle_violations(eager, eager_graph, "import cycle")
    eager_components = [set(c) for c in _strongly_connected(eager_graph)]
    warnings = []
    full_graph = _graph(edges)
    for component in _strongly_connected(full_graph):
        if any(set(component) <= known for known in eager_components):
            continue
        cycle = _cycle_path(full_graph, component[0], set(component))
        first = next(e for e in edges if e.importer == cycle[0] and e.target == cycle[1])
        warnings.append(
            Violation(first.path, first.line, f"import cycle through a deferred import: {' -> '.join(cycle)}")
        )
    return sorted(cycles), sorted(warnings)


# --------------------------------------------------------------------------------------------------- main


def run_checks(root: Path = REPO) -> tuple[list[Violation], list[Violation]]:
    """Every check on the tree at ``root``: (violations, warnings)."""
    cycles, deferred_cycles = check_import_cycles(root)
    violations = [
        *check_sizes(root),
        *check_method_type(root),
        *check_opacus_private_calls(root),
        *cycles,
        *check_design_md(root),
    ]
    return violations, [*deferred_cycles, *opacus_private_imports(root)]


def main(argv: list[str] | None = None) -> int:
    """Print violations (and warnings) as ``path:line: message``; return 1 if there is any violation."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO, help="repository root (default: %(default)s)")
    args = parser.parse_args(argv)
    violations, warnings = run_checks(args.root)
    for violation in violations:
        print(violation)
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"{len(violations)} violation(s), {len(warnings)} warning(s)", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
