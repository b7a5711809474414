"""Is a loaded recipe ready to run? The problems a run would hit that the schema cannot see.

`check_recipe` (`Recipe.check()`) builds the TRL configs of the stages the recipe lists and applies the rules that
span sections; `dry_run` (`Recipe.dry_run()`) does the same for the target machine from any machine, and returns what
only that machine can tell as notes.
"""

from __future__ import annotations

from moon_rl.recipe.environment import catalogue_problems, package_problems
from moon_rl.recipe.schema import TRAINER_SECTIONS, Recipe
from moon_rl.recipe.trainer_configs import trainer_problems

__all__ = ["check_recipe", "dry_run"]


def _quantised_without_lora(recipe: Recipe) -> list[str]:
    """Quantised weights are frozen: a stage that trains a quantised model must train LoRA adapters."""
    training = [stage for stage in TRAINER_SECTIONS if stage in recipe.stages]
    if recipe.model.quantization is not None and recipe.model.lora is None and training:
        return [
            f"{recipe.blame('model.quantization', 'model.lora')}: stages {training} train a quantised model without "
            "LoRA, but quantised weights are frozen; set model.lora (QLoRA) or model.quantization: null"
        ]
    return []


def check_recipe(recipe: Recipe, *, device_checks: bool = True, check_catalogue: bool = True) -> list[str]:
    """`Recipe.check()`: every problem, one line each, trainer sections first; empty when the recipe is ready."""
    problems: list[str] = []
    for section in TRAINER_SECTIONS:
        if section in recipe.stages:
            problems += trainer_problems(recipe, section, device_checks=device_checks)
    problems += _quantised_without_lora(recipe)
    if check_catalogue:
        problems += catalogue_problems(recipe)
    if device_checks:
        problems += package_problems(recipe)
    return problems


def dry_run(recipe: Recipe) -> tuple[list[str], list[str]]:
    """`Recipe.dry_run()`: `(problems, notes)`; a note is for the target machine to check (see `environment`)."""
    problems = check_recipe(recipe, device_checks=False, check_catalogue=False)
    return problems, catalogue_problems(recipe) + package_problems(recipe)
