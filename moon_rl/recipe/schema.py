"""The recipe schema: one pydantic model per section (model, data, embed, eval, ...) and `Recipe`, the whole.

Sections are strict: unknown keys are errors, and values are not coerced (`"32"` is not an int). The `sft` and `grpo`
sections stay plain dicts of the keys the recipe set; their keys are checked against `MoonSFTConfig` /
`MoonGRPOConfig` by `moon_rl.recipe.trainer_configs` once, when `load_recipe` loads a recipe (a `Recipe(...)` built
in code meets the config dataclasses' own checks when `sft_config()` / `grpo_config()` build them).

This module imports neither trl nor transformers, so that any layer (modeling included) can import the schema. The
`Recipe` methods whose work needs trl hand it to the module that owns it, imported when they are called.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator
from pydantic import field_validator as _field_validator

from moon_rl.modeling.spec import (
    BUILTIN_MODELS,
    DEFAULT_LORA_TARGETS,
    FireSpec,
    FusionSpec,
    HeadsSpec,
    LoraSpec,
    ModelSpec,
    NonNegativeInt,
    PositiveInt,
    QuantSpec,
    Section,
    unique,
)
from moon_rl.recipe.provenance import Provenance
from moon_rl.recipe.serialise import recipe_to_yaml, save_recipe

if TYPE_CHECKING:
    from moon_rl.training.configs import MoonGRPOConfig, MoonSFTConfig

__all__ = [
    "BUILTIN_CATALOGUES",
    "BUILTIN_MODELS",
    "DEFAULT_LORA_TARGETS",
    "SECTIONS",
    "STAGES",
    "TRAINER_SECTIONS",
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
]

Stage = Literal["data", "sft", "grpo", "embed", "eval"]
#: Pipeline stages, in the order `moon-rl run` executes them.
STAGES: tuple[str, ...] = typing.get_args(Stage)
BUILTIN_CATALOGUES: tuple[str, ...] = ("builtin:synthetic",)
class SyntheticSpec(Section):
    """The procedural `builtin:synthetic` catalogue (ignored for other catalogues)."""

    n_products: PositiveInt = 600
    seed: int = 0
    image_size: PositiveInt = 112
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    lookalikes: NonNegativeInt = 3
    trace_errors: float = Field(default=0.0, ge=0.0, le=1.0)
    trace_error_attributes: list[Literal["colour", "pattern"]] = Field(default_factory=lambda: ["colour"], min_length=1)
    validation: bool = False


class DataSpec(Section):
    """Catalogue and pairs.

    `catalogue` is a folder or file, `builtin:synthetic`, or a Hub dataset `hf:owner/name[:config][@revision]`.
    `columns` maps moon-rl fields to the catalogue's column names (`{id: sku, title: name, image: img}`), `splits`
    moon-rl split names to the catalogue's (`{test: validation}`; when set, only the splits it lists are read).
    """

    catalogue: str = Field(default="builtin:synthetic", min_length=1)
    columns: dict[str, str] = Field(default_factory=dict)
    splits: dict[str, Annotated[str, Field(min_length=1)]] = Field(default_factory=dict)
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)
    train_split: str = Field(default="train", min_length=1)
    test_split: str = Field(default="test", min_length=1)
    max_images_per_product: PositiveInt = 4
    max_train_pairs: PositiveInt | None = None
    #: MB of tokenised prompts (pixel values) each trainer keeps between steps; the least recently used go first.
    prompt_cache_mb: PositiveInt = 2048

    @_field_validator("catalogue")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        if value.startswith("builtin:") and value not in BUILTIN_CATALOGUES:
            raise ValueError(f"{value!r} is not a built-in catalogue; built-ins: {BUILTIN_CATALOGUES}")
        if value.startswith("hf:"):
            from moon_rl.data.hub import parse_hub_ref  # the data layer, imported only when needed (import time)

            parse_hub_ref(value)  # its ValueError names the accepted forms
        return value

    @_field_validator("columns")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        if value:
            from moon_rl.data.columns import column_map_problems

            if problems := column_map_problems(value):
                raise ValueError("; ".join(problems))
        return value

    @_field_validator("splits")
    @classmethod
    def _split_names(cls, value: dict[str, str]) -> dict[str, str]:
        if "" in value:
            raise ValueError("a moon-rl split name is empty")
        return value


class EmbedSpec(Section):
    """`moon-rl embed`: catalogue -> vectors."""

    mode: Literal["direct", "reason"] = "direct"
    batch_size: PositiveInt = 32
    max_new_tokens: PositiveInt = 96
    generation_backend: Literal["hf", "vllm"] = "hf"
    #: Keep the first `dim` values of each vector (renormalised): one of the model's `matryoshka_dims` for a model
    #: trained for it. None keeps the model's full `embed_dim`.
    dim: PositiveInt | None = None
    #: The search index: `flat` (exact), `hnsw`, `ivf`, `ivfpq` (presets sized to the catalogue) or a FAISS
    #: index_factory string; see moon_rl/inference/ann.py.
    index: str = Field(default="flat", min_length=1)
    #: Search-time parameters stored with the index (`nprobe` for IVF, `efSearch` for HNSW); presets have defaults.
    index_params: dict[Literal["nprobe", "efSearch"], PositiveInt] = Field(default_factory=dict)
    #: DataLoader workers that decode images and tokenise prompts while the model embeds (None: 2 beside a GPU, 0 on
    #: a CPU-only machine, where they would take the cores the forward runs on).
    num_workers: NonNegativeInt | None = None
    #: Products per shard: each is written to `<out>.shards/` when done; processes share shards, reruns reuse them.
    shard_size: PositiveInt = 4096


class EvalSpec(Section):
    """`moon-rl eval`: retrieval, zero-shot classification / attributes, faithfulness, baselines."""

    modes: list[Literal["direct", "reason"]] = Field(default_factory=lambda: ["direct", "reason"], min_length=1)
    batch_size: PositiveInt = 32
    baselines: list[Literal["untrained", "minilm"]] = Field(default_factory=lambda: ["untrained", "minilm"])
    k: list[PositiveInt] = Field(default_factory=lambda: [1, 5, 10], min_length=1)
    # Reason mode of trained models: how much the embedding depends on its reasoning (two sampled chains per product
    # and one read-out with swapped reasoning; about 3x the reason-mode gallery cost).
    faithfulness: bool = True

    @_field_validator("modes", "baselines", "k")
    @classmethod
    def _no_repeats(cls, value: list[Any]) -> list[Any]:
        return unique(value)


# ---- The recipe

#: The sections of a recipe, in the order messages list their problems.
SECTIONS = ("model", "data", "sft", "grpo", "embed", "eval")
#: The sections that become TRL configs (`MoonSFTConfig` / `MoonGRPOConfig`), each trained by the stage of its name.
TRAINER_SECTIONS = ("sft", "grpo")


class Recipe(Section):
    """A resolved recipe. Build it with `load_recipe`; `Recipe()` is the all-defaults recipe.

    `sft` / `grpo` hold only the keys the recipe set (TRL field names plus moon-rl's); the rest take the defaults of
    `MoonSFTConfig` / `MoonGRPOConfig`. Two recipes are equal when their resolved values are equal, wherever they were
    loaded from.
    """

    output_dir: str = Field(default="runs/recipe", min_length=1)
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    sft: dict[str, Any] = Field(default_factory=dict)
    grpo: dict[str, Any] = Field(default_factory=dict)
    embed: EmbedSpec = Field(default_factory=EmbedSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES), min_length=1)

    # Where each key was written, the files of the extends chain (base first) and the overrides; see `load_recipe`.
    _provenance: Provenance = PrivateAttr(default_factory=Provenance)

    @_field_validator("stages")
    @classmethod
    def _stages_in_order(cls, value: list[str]) -> list[str]:
        unique(value)
        if value != sorted(value, key=STAGES.index):
            raise ValueError(f"stages run in pipeline order {list(STAGES)}; list them in that order")
        return value

    @model_validator(mode="after")
    def _record_provenance(self, info: ValidationInfo) -> Recipe:
        # The loader knows where every key came from before it validates, and hands that over as validation context.
        if info.context and "provenance" in info.context:
            self._provenance = info.context["provenance"]
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Recipe):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    # ---- provenance -------------------------------------------------------------------------------------------------

    @property
    def files(self) -> list[str]:
        """Recipe files this recipe was read from, base of the `extends` chain first (empty when built in code)."""
        return list(self._provenance.files)

    @property
    def reward_base_dir(self) -> Path | None:
        """Folder a relative `path/to/file.py:fn` reward name resolves against: that of the last recipe file read (the
        one that named it, or extends a file that did); None for a recipe built in code (the current directory)."""
        return Path(self.files[-1]).parent if self.files else None

    @property
    def overrides(self) -> list[str]:
        """The `--set` overrides applied, in order."""
        return list(self._provenance.overrides)

    def origin(self, key: str) -> str | None:
        """Where a dotted key (e.g. `"sft.learning_rate"`) was set: a recipe file, `"--set"`, or None (a default)."""
        return self._provenance.origin(key)

    def blame(self, *keys: str) -> str:
        """The file (or `--set`) a message about dotted `keys` names: the last writer among them."""
        return self._provenance.blame(*keys)

    # ---- stage outputs ----------------------------------------------------------------------------------------------

    def stage_dir(self, stage: str) -> Path:
        """Output folder of a stage: `<output_dir>/<stage>` (relative to the CWD when `output_dir` is)."""
        return Path(self.output_dir) / stage

    def grpo_init_path(self, config: MoonGRPOConfig) -> Path:
        """The model folder GRPO starts from: `config.init_from`, or this recipe's SFT stage output when None."""
        return Path(config.init_from) if config.init_from is not None else self.stage_dir("sft") / "final"

    # ---- work owned by other modules --------------------------------------------------------------------------------
    # trainer_configs and checks import trl (seconds, and a layer the schema must not need), so they are imported here
    # when called, not with the schema.

    def sft_config(self, output_dir: str | os.PathLike[str] | None = None) -> MoonSFTConfig:
        """Build the `MoonSFTConfig` of the `sft` section.

        Args:
            output_dir: where TRL writes; defaults to `sft.output_dir` if the recipe set it, else `<output_dir>/sft`.

        Raises:
            RecipeError: the config's own validation (TRL's or moon-rl's) failed; the message names the recipe file.
        """
        from moon_rl.recipe.trainer_configs import build_trainer_config

        return build_trainer_config(self, "sft", output_dir)  # type: ignore[return-value]

    def grpo_config(self, output_dir: str | os.PathLike[str] | None = None) -> MoonGRPOConfig:
        """Build the `MoonGRPOConfig` of the `grpo` section (`output_dir` defaults to `<output_dir>/grpo`).

        Raises:
            RecipeError: the config's own validation (TRL's or moon-rl's) failed; the message names the recipe file.
        """
        from moon_rl.recipe.trainer_configs import build_trainer_config

        return build_trainer_config(self, "grpo", output_dir)  # type: ignore[return-value]

    def check(self, device_checks: bool = True, check_catalogue: bool = True) -> list[str]:
        """Problems a run would hit that the schema cannot see; empty when the recipe is ready to run.

        Builds the `MoonSFTConfig` / `MoonGRPOConfig` of the stages listed in `stages` (running TRL's validation),
        checks the GRPO generation batch (divisible by `num_generations`, at least `min_distinct_anchors` distinct
        anchors), that a catalogue path exists, that a trained quantised model has LoRA, and optional packages.

        Args:
            device_checks: also run checks that depend on this machine (bf16 support, installed vllm/bitsandbytes).
                Pass False to validate a GPU recipe on a CPU-only machine (CI).
            check_catalogue: also check that a `data.catalogue` path exists on this machine.
        """
        from moon_rl.recipe.checks import check_recipe

        return check_recipe(self, device_checks=device_checks, check_catalogue=check_catalogue)

    def dry_run(self) -> tuple[list[str], list[str]]:
        """`check()` for the machine the recipe will run on, from any machine (a laptop, CI): loads no weights.

        Builds every TRL config of the listed stages as on the target GPU (TRL's device checks, such as "bf16 needs a
        GPU", are off; `tf32` is left to the target machine) and checks the GRPO generation batch rules, the
        quantisation/LoRA rule and every key. What only the target machine can tell (a catalogue path missing here,
        vllm or bitsandbytes not installed here) comes back as notes.

        Returns:
            `(problems, notes)`: a problem breaks the recipe anywhere; a note is to check on the target machine.
        """
        from moon_rl.recipe.checks import dry_run

        return dry_run(self)

    # ---- output -----------------------------------------------------------------------------------------------------

    def to_yaml(self) -> str:
        """The fully resolved recipe as YAML: every default of moon-rl's own sections filled in, `extends` and
        overrides applied. `sft` / `grpo` show the keys the recipe set (the rest are the config dataclasses'
        defaults, with trl pinned). Loading the text back gives an equal recipe."""
        return recipe_to_yaml(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_yaml()` to `path` atomically (temp file + rename) and return the path.

        Call it on the main process only when running distributed.
        """
        return save_recipe(self, path)
