"""The layering rule, enforced: imports run down the layers only, and no two packages import each other.

data, rewards <- modeling <- training (and recipe, which builds the trainers' configs) <- inference / evaluation <- run /
plan / serve <- cli (`moon_rl/cli.py`, above everything: nothing imports it). `errors`, `cache` and `logs` are at the
bottom. `moon_rl.rewards` lives in the repository's top-level `rewards/` folder (pyproject.toml's `package-dir`).
Every import counts, the ones inside functions too (they run sooner or later); imports under `if TYPE_CHECKING:` do
not (types only, never executed).

The known exceptions are listed below as debt (issue 15): a new one fails this test, and so does a listed one that is
gone (remove it from the list, so that it cannot come back unnoticed).
"""

from __future__ import annotations

import ast
import tomllib
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moon_rl"
#: moon_rl's packages that the repository keeps outside moon_rl/ (`moon_rl.rewards` in rewards/): name -> folder.
MAPPED = {name.removeprefix("moon_rl."): ROOT / folder for name, folder in
          tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].items()}
LEVEL = {"errors": 0, "cache": 0, "logs": 0, "data": 1, "rewards": 1, "modeling": 2, "recipe": 3, "training": 3,
         "inference": 4, "evaluation": 4, "plan": 5, "run": 5, "serve": 5, "cli": 6}
#: (importing module, imported package): imports that run up the layers today. None since the trainers stopped
#: evaluating (the CLI and `run` do) and a saved model carries its `ModelSpec` in `moon_rl.json`; keep it so.
KNOWN_UPWARD: set[tuple[str, str]] = set()
#: Pairs of packages that import each other today. None since the trainers name `Recipe` for types only (the recipe
#: builds their TRL configs, so it is the one that imports `training`).
KNOWN_CYCLES: set[tuple[str, str]] = set()


def _runtime_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(node) for block in ast.walk(tree)
                 if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                 for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def _sources() -> dict[str, Path]:
    """Every moon_rl module as installed (dotted name) -> its file in the repository."""
    found = {".".join(path.relative_to(ROOT).with_suffix("").parts): path for path in PACKAGE.rglob("*.py")}
    for package, folder in MAPPED.items():
        found |= {".".join(("moon_rl", package, *path.relative_to(folder).with_suffix("").parts)): path
                  for path in folder.rglob("*.py")}
    return found


def _package_imports() -> dict[str, set[tuple[str, str]]]:
    """Per moon_rl module (dotted), the moon_rl packages it imports at run time, other than its own."""
    edges: dict[str, set[tuple[str, str]]] = {}
    for module, path in sorted(_sources().items()):
        parts = module.split(".")
        own = parts[1] if len(parts) > 1 else None
        for imported in _runtime_imports(path):
            names = imported.split(".")
            if names[0] == "moon_rl" and len(names) > 1 and names[1] != own:
                edges.setdefault(module, set()).add((own, names[1]))
    return edges


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()} | set(MAPPED)
    assert packages == set(LEVEL), f"give {sorted(packages - set(LEVEL))} a layer (or drop {sorted(set(LEVEL) - packages)})"


def test_imports_run_down_the_layers_only():
    upward = {(module, imported) for module, edges in _package_imports().items() for own, imported in edges
              if LEVEL[imported] > LEVEL[own]}
    assert upward - KNOWN_UPWARD == set(), "imports that run up the layers"
    assert KNOWN_UPWARD - upward == set(), "fixed: remove these from KNOWN_UPWARD"


def test_no_two_packages_import_each_other():
    pairs = {edge for edges in _package_imports().values() for edge in edges}
    cycles = {tuple(sorted(p)) for p in combinations(LEVEL, 2) if p in pairs and p[::-1] in pairs}
    assert cycles - KNOWN_CYCLES == set(), "packages that import each other"
    assert KNOWN_CYCLES - cycles == set(), "fixed: remove these from KNOWN_CYCLES"


def test_no_source_file_is_over_500_lines():
    """Small modules with one job: a file past 500 lines (issue 15's bar) is doing several; split it by job."""
    sources = [*_sources().values(), ROOT / "cli.py"]
    long = {str(path.relative_to(ROOT)): n for path in sources
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long
