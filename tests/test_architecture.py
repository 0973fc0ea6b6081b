"""The package's layering, as docs/architecture.md draws it: a module imports only from layers below
its own. The table is read from the doc, so the picture and the code cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowformer"


def _layers() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```", 2)[1]
    layers = {}
    for line in block.splitlines():
        match = re.match(r"\s+(\d+)\s+(.+)", line)
        if match:
            for name in match.group(2).split():
                layers[name.removesuffix("/").removesuffix(".py")] = int(match.group(1))
    return layers


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    """The package's top-level units that `path` imports (relative and absolute imports)."""
    module = list(path.relative_to(ROOT).with_suffix("").parts)
    if module[-1] == "__init__":
        module.append("_")  # a package's relative imports count from the package itself
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = module[: len(module) - node.level] if node.level else []
            target += (node.module or "").split(".") if node.module else []
            names = [target + [alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        else:
            continue
        for name in names:
            if len(name) > 1 and name[0] == "lowformer":
                found.add(name[1])
    return found


def test_the_doc_lists_every_part_of_the_package():
    layers = _layers()
    units = {_unit(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert units <= set(layers), f"not in docs/architecture.md: {sorted(units - set(layers))}"


def test_every_import_points_to_a_lower_layer():
    layers = _layers()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        if unit in ("__init__", "__main__"):
            continue
        for target in _imported_units(path) - {unit}:
            if target in layers and layers[target] >= layers[unit]:
                wrong.append(
                    f"{path.relative_to(ROOT)} (layer {layers[unit]}) imports {target} (layer {layers[target]})"
                )
    assert not wrong, "\n".join(wrong)
