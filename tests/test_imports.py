"""No import cycles among uniemo's modules at any level: imports inside functions and ``TYPE_CHECKING`` imports count.

Every ``import`` and ``from ... import`` of a ``uniemo`` module is an edge, wherever it sits in the file: at the
top, inside a function, in a ``try``, or under ``if TYPE_CHECKING:`` (a cycle of types is a cycle of concepts,
even when it never runs). ``from uniemo.pkg import name`` counts as an edge to ``uniemo.pkg.name`` when that is a
module, else to ``uniemo.pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import uniemo

PACKAGE = Path(uniemo.__file__).parent


def _module_files() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(tree: ast.AST, package: str) -> list[str]:
    """Every imported dotted name in ``tree`` (relative imports resolved), ``if TYPE_CHECKING`` bodies included."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            found.append(base)
            found.extend(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """uniemo module -> the uniemo modules it imports (anywhere in the file)."""
    modules = _module_files()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = {owner(t) for t in _imports(ast.parse(path.read_text()), package) if t.startswith("uniemo")}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_find_cycles_sees_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_and_type_checking_imports_are_edges():
    tree = ast.parse("def f():\n    from uniemo.x import y\nif TYPE_CHECKING:\n    import uniemo.z\n")
    assert sorted(_imports(tree, "uniemo")) == ["uniemo.x", "uniemo.x.y", "uniemo.z"]


def test_no_import_cycles_among_uniemo_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (counting imports inside functions and under TYPE_CHECKING): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_cli_help_path_loads_no_heavy_package():
    """The lazy imports that remain pay for themselves: ``uniemo --help`` builds every command's parser without
    torch, Ray, DeepSpeed, diffusers, transformers or numpy."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom uniemo.cli import build_parser\nbuild_parser()\n"
        "print(' '.join(m for m in ('torch', 'ray', 'deepspeed', 'diffusers', 'transformers', 'numpy') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


LAYERS = {
    "uniemo.training": ("uniemo.inference", "uniemo.evaluation", "uniemo.feedback", "uniemo.pipeline"),
    "uniemo.distributed": ("uniemo.training", "uniemo.inference", "uniemo.evaluation", "uniemo.feedback"),
    "uniemo.models": ("uniemo.training", "uniemo.inference", "uniemo.distributed", "uniemo.evaluation",
                      "uniemo.feedback", "uniemo.data.loader"),
    "uniemo.run_layout": ("uniemo.",),
}
"""What a package must not import (at any level): the training stack never needs inference, the distributed
plumbing holds no training logic, models are pure modules, run_layout is a leaf every module may import. Command
modules (``*cli``) are entry points and may import what their commands run."""


def test_layers_import_only_downwards():
    graph = import_graph()
    wrong = [f"{module} -> {target}" for module, targets in graph.items() for layer, banned in LAYERS.items()
             if (module == layer or module.startswith(layer + ".")) and not module.endswith("cli")
             for target in targets if target.startswith(banned)]
    assert not wrong, wrong
