"""The package's static import graph (every `import` / `from ... import`, at module top or inside a function)
has no cycle: a cycle means two modules that cannot be understood, tested or moved one without the other.
Static only: `importlib` calls (the CLI's command discovery, `datasets.builder_class`) are not seen."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ctglip_jax", "tfds_builders")


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module prefix of a dotted name (`pkg.mod.func` -> `pkg.mod`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in (_target(n, modules) for n in names) if t and t != module}
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}."""
    modules = module_files()
    return {module: imports_of(module, modules) for module in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (stdlib graphlib names one), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return list(error.args[1])
    return None


def test_the_graph_is_read_right():
    graph = import_graph()
    assert "ctglip_jax.data.report_writer" in graph["ctglip_jax.data.phantom_dictionary"]
    assert "ctglip_jax.data.findings" in graph["ctglip_jax.data.report_writer"]
    assert "ctglip_jax.eval_inputs" in graph["ctglip_jax.evaluation"]  # a module-top import
    assert "ctglip_jax.zeroshot" in graph["ctglip_jax.eval_inputs"]  # a function-local import
    assert "ctglip_jax.errors" in graph["tfds_builders.ctglip_nifti.grid"]
    assert len(graph) > 80


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_a_cycle_is_found():
    graph = import_graph()
    graph["ctglip_jax.data.findings"].add("ctglip_jax.data.phantom_dictionary")
    cycle = find_cycle(graph)
    assert cycle is not None and "ctglip_jax.data.findings" in cycle
