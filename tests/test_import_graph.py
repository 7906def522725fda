"""The package's import graph (every `import` / `from ... import`, at module top or inside a function, and
every `importlib.import_module` call) has no cycle: a cycle means two modules that cannot be understood,
tested or moved one without the other. A dynamic import whose target is built at run time
(`f"tfds_builders.{name}"`, `f"{commands.__name__}.{name}"`) counts as an import of every module directly
inside the package its fixed prefix names."""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
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


def _children(package: str, modules: dict[str, Path]) -> set[str]:
    return {m for m in modules if m.rpartition(".")[0] == package}


def _dynamic_targets(call: ast.Call, aliases: dict[str, str], modules: dict[str, Path]) -> set[str]:
    """Modules an `import_module(...)` call may load: a constant name, or the children of the package named
    by the fixed prefix of an f-string (`{mod.__name__}` resolved through the file's imports)."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name != "import_module" or not call.args:
        return set()
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return {t for t in [_target(arg.value, modules)] if t}
    prefix = ""
    for part in arg.values if isinstance(arg, ast.JoinedStr) else []:
        if isinstance(part, ast.Constant):
            prefix += str(part.value)
            continue
        value = part.value
        named = isinstance(value, ast.Attribute) and value.attr == "__name__"
        if named and isinstance(value.value, ast.Name) and value.value.id in aliases:
            prefix += aliases[value.value.id]
            continue
        break
    if prefix.endswith(".") and prefix[:-1] in modules:
        return _children(prefix[:-1], modules)
    return set()


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}  # local name -> project module, for `{mod.__name__}` in dynamic targets
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                            if f"{node.module}.{a.name}" in modules})
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found |= _dynamic_targets(node, aliases, modules) - {module}
            continue
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
    assert "ctglip_jax.phantom.report_writer" in graph["ctglip_jax.phantom.dictionary"]
    assert "ctglip_jax.phantom.findings" in graph["ctglip_jax.phantom.report_writer"]
    assert "ctglip_jax.eval_inputs" in graph["ctglip_jax.evaluation"]  # a module-top import
    assert "ctglip_jax.zeroshot" in graph["ctglip_jax.eval_inputs"]  # a function-local import
    assert "ctglip_jax.errors" in graph["tfds_builders.ctglip_nifti.grid"]
    assert len(graph) > 80


def test_dynamic_imports_are_edges():
    """`datasets.builder_class` loads `tfds_builders.<name>`; the CLI loads every `commands.<name>`."""
    graph = import_graph()
    assert {"tfds_builders.ctglip_nifti", "tfds_builders.ctglip_synthetic",
            "tfds_builders.msd_tumor"} <= graph["ctglip_jax.data.datasets"]
    assert {"ctglip_jax.commands.train", "ctglip_jax.commands.zeroshot"} <= graph["ctglip_jax.cli"]
    modules = module_files()
    call = ast.parse('importlib.import_module("ctglip_jax.data.organs")').body[0].value
    assert _dynamic_targets(call, {}, modules) == {"ctglip_jax.data.organs"}
    call = ast.parse('importlib.import_module(f"{unknown}.x")').body[0].value
    assert _dynamic_targets(call, {}, modules) == set()  # unresolvable: no edge, rather than a guess


def test_builders_do_not_import_the_dataset_loader():
    """The builders read the record layout from `records.py`; importing `datasets` back would be a cycle
    through `builder_class`'s dynamic import."""
    graph = import_graph()
    graph["tfds_builders.ctglip_synthetic.ctglip_synthetic_dataset_builder"].add("ctglip_jax.data.datasets")
    cycle = find_cycle(graph)
    assert cycle is not None and "ctglip_jax.data.datasets" in cycle


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_a_cycle_is_found():
    graph = import_graph()
    graph["ctglip_jax.phantom.findings"].add("ctglip_jax.phantom.dictionary")
    cycle = find_cycle(graph)
    assert cycle is not None and "ctglip_jax.phantom.findings" in cycle


# the phantom itself, its builder, and the demo and study that run on it
PHANTOM_TOOLS = ("ctglip_jax.phantom", "ctglip_jax.demo", "ctglip_jax.study",
                 "tfds_builders.ctglip_synthetic")


def test_only_the_phantoms_own_tools_import_it_at_module_top():
    """Elsewhere `ctglip_jax.phantom` is imported inside a function, behind a check that the dataset is the
    phantom: a user's data must never reach its catalogue, dictionary or phrasing."""
    modules = module_files()
    offenders = {}
    for module, path in modules.items():
        if module.startswith(PHANTOM_TOOLS):
            continue
        for node in ast.parse(path.read_text()).body:  # module top only (not `if TYPE_CHECKING:`)
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.startswith("ctglip_jax.phantom") for n in names):
                offenders.setdefault(module, []).extend(names)
    assert not offenders


def test_training_evaluation_and_inference_do_not_load_the_phantom():
    code = ("import sys, ctglip_jax.train, ctglip_jax.evaluation, ctglip_jax.zeroshot, ctglip_jax.finetune, "
            "ctglip_jax.cli; print(sorted(m for m in sys.modules if m.startswith('ctglip_jax.phantom')))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
