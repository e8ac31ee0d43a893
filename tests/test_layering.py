"""The package's layering, read from its imports (ast): no upward import, no cycle, no hidden import.

The allowed order is written once, in :data:`LAYERS` (docs/architecture.md
mirrors it): a module may import modules of its own layer or of a layer
before it, never one after. Imports under ``if TYPE_CHECKING:`` are type
annotations only and are not counted.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "platform" / "vlptune"

# Lowest first. A name is a module or a package (a package covers its modules).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("vlptune", "vlptune.errors", "vlptune.io", "vlptune.grid", "vlptune.cliutil"),  # the base: no vlptune imports but each other
    ("vlptune.config",),  # typed recipes and the objectives' torch-free contract
    ("vlptune.data",),  # shards, the synthetic world, the loader
    ("vlptune.model",),  # backbone, visual dictionary, fusion, decoder
    ("vlptune.objectives",),  # pretext tasks and the Pretrainer
    ("vlptune.downstream",),  # downstream tasks: heads, losses, what they are scored on
    ("vlptune.train",),  # the one training loop and its evaluation
    ("vlptune.tasks",),  # tasks run on a trained checkpoint
    ("vlptune.cluster",),  # the Ray session, storage checks, job submission
    ("vlptune.search",),  # Ray Tune searches, results, the board
    ("vlptune.study",),  # ablation studies, promotion, importance
    ("vlptune.cli", "vlptune.demo"),  # entry points
)
HEAVY = ("torch", "ray", "transformers", "optuna", "tensorboard", "scipy")
MAX_LINES = 600
LONG_FILE_MARKER = "Longer than 600 lines:"  # a file over MAX_LINES says why in its docstring, on a line starting so


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a submodule when ``from pkg import sub`` names one)
    names: tuple[str, ...]  # names imported with ``from ... import``
    line: int
    local: bool  # inside a function
    has_reason: bool  # a comment on the statement's lines


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def read_imports(modules: dict[str, Path]) -> list[Import]:
    return [i for name, path in modules.items() for i in imports_of(name, path, modules)]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import statement of one module (``from pkg import sub`` counted as importing ``pkg.sub``)."""
    out: list[Import] = []
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)

    def visit(node: ast.AST, local: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, typing_only)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, local, True)
            elif isinstance(child, (ast.Import, ast.ImportFrom)) and not typing_only:
                reason = any("#" in lines[i - 1] for i in range(child.lineno, child.end_lineno + 1))
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        out.append(Import(name, alias.name, (), child.lineno, local, reason))
                else:
                    target = _resolve(child, name, path.name == "__init__.py")
                    names = tuple(a.name for a in child.names)
                    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                    for t in subs or [target]:
                        out.append(Import(name, t, names, child.lineno, local, reason))
            else:
                visit(child, local, typing_only)

    visit(tree, False, False)
    return out


def layer_of(module: str) -> int:
    best, where = -1, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, where = len(n), i
    assert where >= 0, f"{module} is in no layer of LAYERS: add it"
    return where


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


MODULES = all_modules()
IMPORTS = read_imports(MODULES)
INTERNAL = [i for i in IMPORTS if i.target.startswith("vlptune")]


def test_every_module_sits_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_one_from_a_layer_above_it():
    upward = [
        f"{i.source} (line {i.line}) imports {i.target}: layer {layer_of(i.target)} above its own {layer_of(i.source)}"
        for i in INTERNAL
        if layer_of(i.target) > layer_of(i.source)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_base_layer_imports_no_other_vlptune_layer():
    wrong = [f"{i.source} imports {i.target}" for i in INTERNAL if layer_of(i.source) == 0 and layer_of(i.target) != 0]
    assert not wrong, wrong


def test_no_import_cycle_among_modules():
    edges: dict[str, set[str]] = defaultdict(set)
    for i in INTERNAL:
        if i.target in MODULES and i.target != i.source:
            edges[i.source].add(i.target)
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_private_name_is_imported_from_another_module():
    private = [f"{i.source} (line {i.line}) imports {n} from {i.target}" for i in INTERNAL for n in i.names if n.startswith("_") and i.target != i.source]
    assert not private, private


def test_every_function_local_import_says_why():
    silent = [f"{i.source} (line {i.line}): import {i.target}" for i in IMPORTS if i.local and not i.has_reason]
    assert not silent, "function-local imports without a one-line reason (keep only those that keep a heavy dependency lazy):\n" + "\n".join(silent)


def test_config_imports_no_heavy_dependency():
    """Recipe validation (config show, config schema, space check) must not import torch, ray or transformers."""
    heavy = [f"{i.source} (line {i.line}) imports {i.target}" for i in IMPORTS if layer_of(i.source) <= 1 and i.target.split(".")[0] in HEAVY]
    assert not heavy, heavy


def test_a_file_over_600_lines_says_why_at_its_top():
    unexplained = []
    for path in MODULES.values():
        text = path.read_text()
        if text.count("\n") <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.strip().startswith(LONG_FILE_MARKER) for line in doc.splitlines()):
            unexplained.append(f"{path.relative_to(PACKAGE_DIR.parent)} ({text.count(chr(10))} lines)")
    assert not unexplained, f"files over {MAX_LINES} lines without a '{LONG_FILE_MARKER}' line in their docstring: {unexplained}"


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    """The checks above can fail: a planted upward import and a planted cycle are found."""
    planted = [Import("vlptune.data.x", "vlptune.train.loop", (), 1, False, False)]
    assert [i for i in planted if layer_of(i.target) > layer_of(i.source)]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
