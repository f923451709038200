"""The package's layering, read from the code (fast tier, AST only): the rules README's "Where things live"
states. Imports inside functions count: they are how a cycle hides.

    CLIs (raygpt/*.py) -> driver/, prep/ -> core/, config/, storage/;  worker/ -> core/, config/, storage/
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raygpt"
README = PACKAGE.parent / "README.md"

# Modules below every layer: the error type and refusal helpers, and the one home of Ray's private APIs.
BASE = {"raygpt.errors", "raygpt.ray_compat"}
# What each layer may import from raygpt besides itself and BASE. A few named modules cross sideways: the
# worker rebuilds the launcher's RunPlan; prep connects to Ray as the launcher does.
ALLOWED = {
    "core": {"core", "config", "storage"},
    "config": {"core", "config", "storage"},
    "storage": {"core", "config", "storage"},
    "worker": {"core", "config", "storage", "raygpt.driver.plan"},
    "prep": {"core", "config", "storage", "raygpt.driver.ray_cluster"},
    "driver": {"core", "config", "storage", "prep", "worker"},
}
WITHOUT_RAY = {"core", "config"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def layer(module: str) -> str:
    """'core', 'worker', ... for a module in a layer folder; 'cli' for the top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else "cli"


def imported(module: str, tree: ast.Module) -> set[str]:
    """Every module `module` imports, at any depth of the file (raygpt's own resolved to a module name)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                package = module.split(".")[: -node.level] if MODULES[module].name != "__init__.py" else None
                base = ".".join([*(package or module.split(".")), *([base] if base else [])])
            names.add(base)
            # `from raygpt.core import model` imports the module raygpt.core.model
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return names


def raygpt_imports(module: str) -> set[str]:
    return {name for name in imported(module, TREES[module]) if name in MODULES and name != module}


def test_the_import_graph_has_no_cycle():
    graph = {module: raygpt_imports(module) for module in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in ALLOWED))
def test_imports_point_down(module):
    own = layer(module)
    for target in sorted(raygpt_imports(module)):
        if target in BASE or target == "raygpt" or layer(target) == own:
            continue
        allowed = ALLOWED[own]
        assert layer(target) in allowed or target in allowed, f"{module} ({own}/) imports {target}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in WITHOUT_RAY))
def test_core_and_config_never_import_ray(module):
    rays = sorted(name for name in imported(module, TREES[module]) if name == "ray" or name.startswith("ray."))
    assert not rays, f"{module} imports {rays}"
    assert "raygpt.ray_compat" not in raygpt_imports(module)


def private_ray_uses(tree: ast.Module) -> list[str]:
    """Names of Ray's that are not its public API: a module path or name with a leading underscore
    (ray._private, ray.train._internal, _internal_kv_put, _TorchBackend) or an override of one."""
    found = []
    ray_names = set()  # local names bound to ray modules (import ray; from ray import train as t)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ray":
                    ray_names.add((alias.asname or alias.name).split(".")[0])
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
            path = node.module.split(".") + [alias.name for alias in node.names]
            found += [f"{node.module}.{part}" for part in path if part.startswith("_")][:1]
            ray_names.update(alias.asname or alias.name for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in ray_names:
                found.append(ast.unparse(node))
        elif isinstance(node, ast.ClassDef) and any(
            isinstance(base, ast.Name) and base.id in ray_names for base in node.bases
        ):
            found += [
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef) and item.name.startswith("_") and not item.name.startswith("__")
            ]
    return found


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "raygpt.ray_compat"))
def test_private_ray_names_live_only_in_ray_compat(module):
    assert not private_ray_uses(TREES[module]), f"{module}: {private_ray_uses(TREES[module])}"


def test_the_private_ray_check_finds_what_it_looks_for():
    uses = private_ray_uses(TREES["raygpt.ray_compat"])
    assert any("internal_kv" in use for use in uses), uses
    sample = (
        "import ray\nfrom ray.train import TorchTrainer\nclass T(TorchTrainer):\n    def _hook(self): ...\n"
        "ray._private.x\nfrom ray.experimental.internal_kv import _internal_kv_put\nfrom ray.train import report\n"
    )
    assert private_ray_uses(ast.parse(sample)) == [
        "ray.experimental.internal_kv._internal_kv_put",
        "T._hook",
        "ray._private",
    ]


def test_every_module_is_on_the_readme_map():
    section = README.read_text().split("## Where things live", 1)[1].split("\n## ", 1)[0]
    mentioned = set(re.findall(r"`(raygpt/[\w/]+\.py)`", section))
    modules = {str(path.relative_to(PACKAGE.parent)) for path in MODULES.values() if path.name != "__init__.py"}
    assert not modules - mentioned, f"not on README's map: {sorted(modules - mentioned)}"
    assert not mentioned - modules, f"on README's map but not in raygpt/: {sorted(mentioned - modules)}"


def test_no_function_is_over_80_lines():
    long = [
        f"{MODULES[module].relative_to(PACKAGE.parent)}:{node.name} ({node.end_lineno - node.lineno + 1})"
        for module, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, f"functions over 80 lines: {long}"
