"""A resolved recipe as YAML text, and written to a file, so that a result can be reproduced from its folder alone."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from moon_rl import __version__
from moon_rl.cache import atomic_write_text
from moon_rl.recipe.yaml_dialect import RecipeDumper

if TYPE_CHECKING:
    from moon_rl.recipe.schema import Recipe

__all__ = ["recipe_to_yaml", "save_recipe"]


def _trl_version() -> str:
    # What `trl.__version__` says (trl reads its own metadata), without importing trl for one string.
    try:
        return version("trl")
    except PackageNotFoundError:
        return "unknown"


def recipe_to_yaml(recipe: Recipe) -> str:
    """`Recipe.to_yaml()`: a header naming the versions, files and overrides, then every resolved value."""
    header = [
        f"# Resolved moon-rl recipe (moon-rl {__version__}, trl {_trl_version()}).",
        "# sft/grpo list only the keys the recipe set; others are MoonSFTConfig/MoonGRPOConfig defaults.",
    ]
    if recipe.files:
        header.append(f"# From: {' <- '.join(reversed(recipe.files))}")
    header += [f"# --set {override}" for override in recipe.overrides]
    body = yaml.dump(recipe.model_dump(), Dumper=RecipeDumper, sort_keys=False, allow_unicode=True, width=120)
    return "\n".join(header) + "\n" + body


def save_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> Path:
    """`Recipe.save()`: write `recipe_to_yaml(recipe)` to `path` atomically (temp file + rename), return the path."""
    target = Path(path)
    atomic_write_text(target, recipe_to_yaml(recipe))
    return target
