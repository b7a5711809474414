"""Recipes: one YAML file = one experiment (model, data, sft, grpo, embed, eval, stages).

`load_recipe(path, overrides)` reads a recipe, follows its `extends:` chain, applies `--set a.b=c` overrides and
validates everything at once, reporting every problem in one `RecipeError`, one line each, naming the file that wrote
the key (or `--set`). The result is a `Recipe`; `Recipe.check()` says whether it is ready to run, `Recipe.sft_config()`
/ `Recipe.grpo_config()` build its TRL configs and `Recipe.to_yaml()` writes it out resolved.

One module per job:

    schema.py           the sections (ModelSpec, DataSpec, ...) and `Recipe`
    loader.py           YAML files, the extends chain, merge, overrides, input paths, validation: `load_recipe`
    provenance.py       where each key was written, and which file a message names
    error_messages.py   pydantic's and TRL's errors as one line naming file and key
    trainer_configs.py  the `sft` / `grpo` sections: key checks and `MoonSFTConfig` / `MoonGRPOConfig` (imports trl)
    checks.py           `Recipe.check()` / `Recipe.dry_run()`: problems the schema cannot see
    environment.py      what only the running machine can tell (catalogue path, installed packages)
    serialise.py        the resolved recipe as YAML, saved atomically
    yaml_dialect.py     the YAML 1.2 reading and writing rules of recipes

Importing this package does not import trl: the loader imports `trainer_configs` when it first validates a recipe.
"""

from moon_rl.recipe.loader import load_recipe, parse_override, validate_recipe
from moon_rl.recipe.schema import (
    BUILTIN_CATALOGUES,
    BUILTIN_MODELS,
    STAGES,
    DataSpec,
    EmbedSpec,
    EvalSpec,
    FireSpec,
    FusionSpec,
    HeadsSpec,
    LoraSpec,
    ModelSpec,
    QuantSpec,
    Recipe,
    SyntheticSpec,
)

__all__ = [
    "BUILTIN_CATALOGUES",
    "BUILTIN_MODELS",
    "STAGES",
    "DataSpec",
    "EmbedSpec",
    "EvalSpec",
    "FireSpec",
    "FusionSpec",
    "HeadsSpec",
    "LoraSpec",
    "ModelSpec",
    "QuantSpec",
    "Recipe",
    "SyntheticSpec",
    "load_recipe",
    "parse_override",
    "validate_recipe",
]
