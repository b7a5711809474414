"""The trainer sections (`sft`, `grpo`) of a recipe as TRL configs: the one module that checks and builds them.

A trainer section is a plain dict of `MoonSFTConfig` / `MoonGRPOConfig` fields (TRL's plus moon-rl's). When a recipe
is loaded, `section_key_problems` checks its keys and value types, once; `build_trainer_config` turns it into the
config dataclass, whose defaults and `__post_init__` validation apply unchanged; `trainer_problems` adds the GRPO rules
that need the whole recipe. Every message names the file that wrote the key at fault.

This module imports trl (through `moon_rl.training.configs`); the schema and the loader import it only when needed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from typing import Any

from moon_rl.errors import RecipeError
from moon_rl.recipe.error_messages import invalid_config_line
from moon_rl.recipe.provenance import Origins, lookup_origin
from moon_rl.recipe.schema import TRAINER_SECTIONS, Recipe
from moon_rl.training.config_checks import (
    CONFIG_CLASSES,
    GENERATION_BATCH_FIELDS,
    config_fields,
    generation_batch_problems,
    section_problems,
    vllm_fire_problems,
)
from moon_rl.training.configs import ConfigValueError, MoonGRPOConfig, MoonSFTConfig

__all__ = ["build_trainer_config", "section_key_problems", "trainer_fields", "trainer_problems"]


def trainer_fields() -> dict[str, Collection[str]]:
    """The field names each trainer section may set: `{"sft": ..., "grpo": ...}`."""
    return {section: config_fields(section).keys() for section in TRAINER_SECTIONS}


def section_key_problems(data: Mapping[str, Any], origins: Origins, fallback: str) -> list[tuple[str, str]]:
    """`(section, line)` for each unknown key or ill-typed value of the trainer sections of merged recipe data.

    The line names the file that wrote the key (`fallback` when none is recorded). Sections that are not mappings are
    left to the schema, which reports them.
    """
    found = []
    for section in TRAINER_SECTIONS:
        values = data.get(section)
        if isinstance(values, dict):
            for key, message in section_problems(section, values):
                found.append((section, f"{lookup_origin(origins, (section, str(key)), fallback)}: {message}"))
    return found


def _config_kwargs(
    recipe: Recipe, section: str, output_dir: str | os.PathLike[str] | None, device_checks: bool
) -> tuple[dict[str, Any], list[str]]:
    """The keyword arguments of `section`'s config, and those of them that hold the recipe's own values."""
    kwargs = dict(getattr(recipe, section))
    replaced = set()
    if output_dir is not None or "output_dir" not in kwargs:
        kwargs["output_dir"] = os.fspath(output_dir if output_dir is not None else recipe.stage_dir(section))
        replaced.add("output_dir")
    if "seed" not in kwargs:
        kwargs["seed"] = recipe.seed  # the recipe's seed, unless the section sets its own
        replaced.add("seed")
    if not device_checks:
        kwargs["use_cpu"] = True  # turns off transformers' "bf16 needs a GPU" check: validate for the target GPU
        replaced.add("use_cpu")
        # `tf32: true` needs an Ampere GPU to be built at all; it is checked on the machine that trains.
        if kwargs.get("tf32"):
            kwargs.pop("tf32")
    return kwargs, [key for key in kwargs if key not in replaced]


def _keys_at_fault(exc: BaseException, keys: list[str]) -> list[str]:
    """Which of the section's `keys` a failed build is about.

    moon-rl's own checks say which field failed (`ConfigValueError.field`). TRL's and transformers' errors are free
    text: there, the keys the message names as whole words (they name their fields, e.g. "--tf32 requires ...").
    """
    if isinstance(exc, ConfigValueError):
        return [exc.field]
    message = str(exc)
    return [key for key in keys if re.search(rf"\b{re.escape(key)}\b", message)]


def build_trainer_config(
    recipe: Recipe, section: str, output_dir: str | os.PathLike[str] | None = None, *, device_checks: bool = True
) -> MoonSFTConfig | MoonGRPOConfig:
    """Build the config dataclass of a trainer section (`Recipe.sft_config()` / `Recipe.grpo_config()`).

    Args:
        recipe: the recipe.
        section: `"sft"` or `"grpo"`.
        output_dir: where TRL writes; defaults to the section's `output_dir` if set, else `<output_dir>/<section>`.
        device_checks: False builds the config as on the target GPU from any machine: `use_cpu` turns off
            transformers' device checks ("bf16 needs a GPU") and `tf32` is left out (it needs an Ampere GPU).

    Raises:
        RecipeError: the config's own validation (TRL's or moon-rl's) failed; the message names the file that set
            the key at fault, or the last file that wrote the section.
    """
    kwargs, own_keys = _config_kwargs(recipe, section, output_dir, device_checks)
    try:
        return CONFIG_CLASSES[section](**kwargs)
    except (ValueError, TypeError) as exc:
        keys = _keys_at_fault(exc, own_keys)
        where = recipe.blame(*(f"{section}.{key}" for key in keys)) if keys else recipe.blame(section)
        raise RecipeError(invalid_config_line(where, section, exc)) from exc


def trainer_problems(recipe: Recipe, section: str, *, device_checks: bool = True) -> list[str]:
    """Problems of one trainer section: the GRPO generation batch and vLLM + FIRE rules, then its config's build.

    Args:
        recipe: the recipe.
        section: `"sft"` or `"grpo"`.
        device_checks: False builds the config as on the target GPU (see `build_trainer_config`).
    """
    problems: list[str] = []
    batch_problems = generation_batch_problems(recipe.grpo) if section == "grpo" else []
    if batch_problems:
        batch_keys = [f"grpo.{key}" for key in GENERATION_BATCH_FIELDS if key in recipe.grpo]
        where = recipe.blame(*batch_keys) if batch_keys else recipe.blame("grpo")
        problems += [f"{where}: {problem}" for problem in batch_problems]
    if section == "grpo" and (fire := vllm_fire_problems(recipe.grpo, recipe.model.heads.fire.enabled)):
        problems += [f"{recipe.blame('grpo.use_vllm', 'model.heads.fire')}: {problem}" for problem in fire]
    try:
        config = build_trainer_config(recipe, section, device_checks=device_checks)
    except RecipeError as exc:
        # TRL's own divisibility error repeats ours, with less advice.
        if not (batch_problems and "num_generations" in str(exc)):
            problems.append(str(exc))
    else:
        if section == "grpo":
            problems += reward_problems(recipe, config.rewards)
    return problems


def reward_problems(recipe: Recipe, rewards: list[dict[str, Any]] | None = None) -> list[str]:
    """The `grpo.rewards` entries that do not resolve, or reject their `args`, one line each (empty when all build).

    `recipe validate` reports them and `moon-rl run` checks them before its first stage: otherwise a misspelt reward
    name surfaces when GRPO starts, after the whole SFT stage.

    Args:
        recipe: the recipe.
        rewards: its normalised `grpo.rewards`; default: built from the recipe (as on the target machine).
    """
    from moon_rl.rewards import RewardError, build_rewards

    if rewards is None:
        rewards = build_trainer_config(recipe, "grpo", device_checks=False).rewards
    try:
        build_rewards(rewards, base_dir=recipe.reward_base_dir)
    except RewardError as exc:
        where = recipe.blame("grpo.rewards")
        return [f"{where}: grpo.{line}" for line in str(exc).splitlines() if line.strip()]
    return []
