"""The package's layers: each module imports only from the layers below its own (and from its own
package's modules, in one direction), never inside a function to dodge a circle, and no file is longer than
600 lines. The layers, lowest first, are what README's "Layout" describes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "simmim"
# Lowest first. A module may import from any earlier layer; within a layer, only inside its own package
# (simmim.data, simmim.models, simmim.evaluation, simmim.study), without a cycle.
LAYERS = [
    ["simmim.models"],
    ["simmim.errors", "simmim.config_fields", "simmim.bounded_yaml", "simmim.precision", "simmim.masking"],
    ["simmim.config_io"],
    ["simmim.config"],
    ["simmim.data"],
    ["simmim.rundir", "simmim.optim", "simmim.launch"],
    ["simmim.checkpoints", "simmim.run_log", "simmim.sharding", "simmim.compilation", "simmim.batches"],
    ["simmim.meter"],
    ["simmim.exports"],
    ["simmim.evaluation"],
    ["simmim.engine"],
    ["simmim.pretrain", "simmim.finetune"],
    ["simmim.cli"],
    ["simmim.study"],
]
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == unit or module.startswith(unit + ".") for unit in layer):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py: add it where it belongs")


def unit_of(module: str) -> str:
    return next(u for layer in LAYERS for u in layer if module == u or module.startswith(u + "."))


def simmim_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(module imported, line, at module level) for every import of a simmim module."""
    found = []
    top = {id(node) for node in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "simmim":
            names = [node.module] if node.module != "simmim" else [f"simmim.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "simmim"]
        else:
            continue
        found += [(name, node.lineno, id(node) in top) for name in names]
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {m: {name for name, _, _ in simmim_imports(ast.parse(p.read_text()))} for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_what_is_below_it(module):
    if module == "simmim":
        return
    tree = ast.parse(MODULES[module].read_text())
    mine = layer_of(module)
    for name, line, at_top in simmim_imports(tree):
        assert at_top, f"{module}:{line} imports {name} inside a function"
        if name == "simmim":
            continue
        theirs = layer_of(name)
        same_package = unit_of(name) == unit_of(module)
        assert theirs < mine or same_package, (
            f"{module}:{line} imports {name}, which is not below it (layer {theirs} >= {mine})"
        )


def test_no_import_cycles():
    def visit(module: str, path: list[str]) -> None:
        for name in sorted(GRAPH.get(module, ())):
            target = name if name in MODULES else name.rsplit(".", 1)[0]
            if target in path:
                cycle = path[path.index(target) :] + [target]
                # A package's __init__ re-exporting its own modules is not a cycle of code.
                if not all(m == cycle[0] or m.startswith(cycle[0] + ".") for m in cycle):
                    raise AssertionError(" -> ".join(cycle))
                continue
            if target in MODULES and target != module:
                visit(target, [*path, target])

    for module in MODULES:
        visit(module, [module])


def test_no_file_is_over_600_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: {long}"
