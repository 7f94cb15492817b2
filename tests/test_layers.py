"""Each layer imports only the layers below it: cli -> workflows -> interfaces -> unimo."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unimo_bids"
LAYERS = ["unimo", "interfaces", "workflows", "cli"]
FORBIDDEN_IN_UNIMO = {"nipype", "bids", "niworkflows", "nilearn", "templateflow"}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join(base + ((node.module,) if node.module else ())))
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_layers_below(layer):
    allowed_above = set(LAYERS[LAYERS.index(layer) + 1:])
    for path in (PACKAGE / layer).rglob("*.py"):
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "unimo_bids" and len(parts) > 1:
                assert parts[1] not in allowed_above, f"{path.name} imports {module}"
            if layer == "unimo":
                assert parts[0] not in FORBIDDEN_IN_UNIMO, f"{path.name} imports {module}"
