"""Check that every third-party module the code imports comes from a distribution pyproject.toml declares.

    .venv/bin/python scripts/check_dependencies.py        # exit 1 and a list when something is undeclared

Every `import X` / `from X import ...` (at any depth: imports inside functions count, since the
command that reaches them fails without the package) is mapped to the distribution that installs it
in this environment (`importlib.metadata.packages_distributions`). The package (`lowformer/`) may use
`dependencies` and the extras; `tests/` and `benchmarks/` may also use the `test` extra. A module that
is not installed here cannot be mapped and is reported too. Needs Python >= 3.11 (tomllib).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from collections import defaultdict
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {"lowformer", "helpers", "conftest"} | {p.stem for p in (ROOT / "tests").glob("test_*.py")}


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0])


def imports(folder: Path) -> dict[str, list[str]]:
    """Top-level module -> the places that import it, for every .py file under `folder`."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found[name.split(".")[0]].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def check(folder: str, allowed: set[str], providers: dict[str, list[str]]) -> list[str]:
    problems = []
    for module, places in sorted(imports(ROOT / folder).items()):
        if module in sys.stdlib_module_names or module in LOCAL:
            continue
        dists = {normalise(d) for d in providers.get(module, [])}
        if not dists:
            problems.append(f"{module}: not installed here, cannot tell its distribution ({places[0]})")
        elif not dists & allowed:
            shown = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
            problems.append(f"{module} (distribution {', '.join(sorted(dists))}) is not declared: {shown}")
    return problems


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project.get("dependencies", [])}
    optional = project.get("optional-dependencies", {})
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in optional.items()}
    every_extra = set().union(*extras.values())
    providers = md.packages_distributions()
    problems = check("lowformer", core | every_extra, providers)
    for folder in ("tests", "benchmarks"):
        problems += check(folder, core | extras.get("test", set()), providers)
    for line in problems:
        print(line)
    if not problems:
        print(f"every import is declared ({len(core)} dependencies, extras: {', '.join(sorted(extras))})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
