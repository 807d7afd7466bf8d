"""The package's layers (docs/architecture.md): a module imports only from its own layer or lower
ones, the import graph has no cycle, and no module reaches into another's private names."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "spd_jax"
#: layer of each top-level part of the package (lower = more basic)
LAYERS = {
    "diffusion": 0, "host_malloc": 0,
    "models": 1, "tasks": 1, "data": 1, "prepare": 1, "images": 1,
    "losses": 2, "metrics": 2,
    "training": 3,
    "run": 4,
}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


MODULES = _modules()


def _imports(tree: ast.Module) -> set[str]:
    """spd_jax modules imported anywhere in ``tree`` (function-level imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("spd_jax"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spd_jax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_part_of_the_package_has_a_layer():
    parts = {name.split(".")[1] for name in MODULES if "." in name}
    assert parts <= set(LAYERS), f"modules without a layer: {sorted(parts - set(LAYERS))}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) is not None))
def test_a_module_imports_nothing_from_a_higher_layer(module):
    own = _layer(module)
    higher = sorted(d for d in _imports(MODULES[module]) if (_layer(d) or -1) > own)
    assert not higher, f"{module} (layer {own}) imports higher layers: {higher}"


def test_the_import_graph_has_no_cycle():
    graph = {m: {d for d in _imports(t) if d in MODULES and d != m and not m.startswith(d + ".")}
             for m, t in MODULES.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_uses_another_modules_private_names(module):
    tree = MODULES[module]
    aliases = {}  # local name -> spd_jax module it stands for
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spd_jax"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    bad.append(f"from {node.module} import {alias.name}")
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("spd_jax"):
                    aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                and not node.attr.startswith("__") and aliases.get(node.value.id) in MODULES):
            bad.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    assert not bad, f"{module} uses private names of other modules: {bad}"
