"""What only the machine that runs a recipe can tell: whether its catalogue path exists and its packages are installed.

`Recipe.dry_run()` reports these as notes (the target machine may differ from this one); `Recipe.check()` as problems.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from moon_rl.recipe.schema import Recipe
from moon_rl.training.config_checks import config_value

__all__ = ["catalogue_problems", "package_problems"]


def catalogue_problems(recipe: Recipe) -> list[str]:
    """A `data.catalogue` path that does not exist here (every stage reads it); a Hub dataset is checked on loading."""
    catalogue = recipe.data.catalogue
    if not catalogue.startswith(("builtin:", "hf:")) and not Path(catalogue).exists():
        return [f"{recipe.blame('data.catalogue')}: 'data.catalogue' {catalogue!r} does not exist"]
    return []


def package_problems(recipe: Recipe) -> list[str]:
    """Optional packages the recipe needs that are not installed here: vllm, bitsandbytes."""
    problems = []
    uses_vllm = recipe.embed.generation_backend == "vllm" or (
        "grpo" in recipe.stages and config_value("grpo", recipe.grpo, "use_vllm") is True
    )
    if uses_vllm and importlib.util.find_spec("vllm") is None:
        problems.append(
            f"{recipe.blame('embed.generation_backend', 'grpo.use_vllm')}: vllm is requested "
            "(embed.generation_backend or grpo.use_vllm) but not installed; `pip install moon-rl[vllm]` on a GPU "
            "machine, or use embed.generation_backend: hf and grpo.use_vllm: false"
        )
    if recipe.model.quantization is not None and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            f"{recipe.blame('model.quantization')}: model.quantization needs bitsandbytes; "
            "`pip install moon-rl[quant]` or set model.quantization: null"
        )
    return problems
