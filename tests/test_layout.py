"""The package's layout is its architecture: `model` imports nothing of `training` or
`inference`, `training` nothing of `inference`, the commands sit on top; no function longer
than 80 lines, in `data_pipelines/` and `experiments/` too. (No import circles:
tests/test_imports.py.)"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "fer_jax")
LAYERS = {"model": 0, "training": 1, "inference": 2}  # a layer imports only those below it
COMMANDS = {"fer_jax.main", "fer_jax.predict", "fer_jax.export", "fer_jax.serve"}


def _modules(package: str = PACKAGE) -> dict[str, ast.Module]:
    out = {}
    for root, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                dotted = dotted.removesuffix(".__init__")
                with open(path) as f:
                    out[dotted] = ast.parse(f.read(), path)
    return out


MODULES = _modules()
# The 80-line rule covers the data pipelines and the experiment scripts as well (issue 36).
LINE_RULE_MODULES = {
    **MODULES,
    **_modules(os.path.join(REPO, "data_pipelines")),
    **_modules(os.path.join(REPO, "experiments")),
}


def _imports(tree: ast.Module) -> set[str]:
    """The fer_jax modules `tree` imports, anywhere in it (function-local imports too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(tree) for name, tree in MODULES.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 2 else None


def test_the_subpackages_hold_the_modules():
    top = {m for m in MODULES if m.count(".") == 1 and m.split(".")[1] not in LAYERS}
    assert top == COMMANDS | {"fer_jax.user_errors", "fer_jax.host_memory"}
    for layer in LAYERS:
        assert any(m.startswith(f"fer_jax.{layer}.") for m in MODULES), layer


def test_imports_go_down_the_layers_only():
    wrong = []
    for module, imported in GRAPH.items():
        mine = _layer(module)
        for other in imported:
            theirs = _layer(other)
            if other in COMMANDS and module not in COMMANDS:
                wrong.append(f"{module} -> {other}")
            elif mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} -> {other}")
    assert not wrong, wrong


@pytest.mark.parametrize("module", sorted(LINE_RULE_MODULES))
def test_no_function_is_longer_than_80_lines(module):
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(LINE_RULE_MODULES[module])
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long


def test_readme_stays_a_front_page():
    # Issue 36: README keeps the headline figures and links; the model card is MODEL_CARD.md.
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 180, f"README.md has {len(lines)} lines (at most 180)"
