"""Recipes: one YAML file = one experiment (model, data, sft, grpo, embed, eval, stages).

`load_recipe(path, overrides)` reads a recipe, follows its `extends:` chain (deep merge: mappings merge, lists and
scalars replace), applies `--set a.b=c` overrides and validates everything at once. Every problem is reported in one
`RecipeError`, one line each, naming the file that wrote the key (or `--set`), the full key path and, for a misspelt
key, the closest valid one.

The `sft` and `grpo` sections stay plain dicts of the keys the recipe set; their keys and value types are checked
against `MoonSFTConfig` / `MoonGRPOConfig` (TRL's configs plus moon-rl's fields), and `Recipe.sft_config()` /
`Recipe.grpo_config()` build those dataclasses, whose defaults and `__post_init__` validation apply unchanged.

Paths: `data.catalogue` and `path/to/file.py:fn` reward names are inputs shipped with recipes, so a relative value
resolves against the folder of the file that set it (the CWD for `--set`). `output_dir` and `grpo.init_from` are run
outputs and stay relative to the CWD.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import tempfile
import typing
from collections.abc import Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic import field_validator as _field_validator
from pydantic_core import PydanticCustomError

from moon_rl.errors import RecipeError
from moon_rl.recipe_yaml import RecipeDumper, RecipeLoader

if TYPE_CHECKING:
    from moon_rl.training.configs import MoonGRPOConfig, MoonSFTConfig

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

Stage = Literal["data", "sft", "grpo", "embed", "eval"]
#: Pipeline stages, in the order `moon-rl run` executes them.
STAGES: tuple[str, ...] = typing.get_args(Stage)
BUILTIN_MODELS: tuple[str, ...] = ("builtin:tiny-vl",)
BUILTIN_CATALOGUES: tuple[str, ...] = ("builtin:synthetic",)
#: Where a key set by a `--set` override "was written", in error messages.
OVERRIDE_SOURCE = "--set"
#: LoRA on the language model's attention and MLP projections only: never the vision tower or lm_head.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


# ---- Schema


class _Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, and values are not coerced ("32" is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _unique(values: list[Any]) -> list[Any]:
    if len(set(values)) != len(values):
        raise ValueError("values must not repeat")
    return values


class LoraSpec(_Section):
    """LoRA adapters (peft). `null` in a recipe trains every weight instead (the tiny random-init model does)."""

    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: str = DEFAULT_LORA_TARGETS

    @_field_validator("target_modules")
    @classmethod
    def _regex_compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(
                f"target_modules is a regular expression on module names and does not compile: {exc}"
            ) from exc
        return value


class QuantSpec(_Section):
    """bitsandbytes quantisation of the frozen base weights (QLoRA); needs `model.lora`."""

    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    double_quant: bool = True


class FusionSpec(_Section):
    """Multi-head modality fusion: read-out state attends to the raw image and text signals (and the chain's words)."""

    enabled: bool = True
    num_heads: PositiveInt = 4
    chain: bool = True


class FireSpec(_Section):
    """FIRE: low-rank residual re-injection of raw visual tokens at chosen decoder layers."""

    enabled: bool = True
    layers: list[NonNegativeInt] | None = None
    rank: PositiveInt = 8

    @_field_validator("layers")
    @classmethod
    def _layers_unique(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else _unique(value)


class HeadsSpec(_Section):
    """`MoonHeads`: fusion, FIRE and the projection to the embedding."""

    embed_dim: PositiveInt = 256
    learning_rate: PositiveFloat = 1e-3
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    fire: FireSpec = Field(default_factory=FireSpec)


class ModelSpec(_Section):
    """The backbone VLM, its adapters and the embedding heads."""

    name_or_path: str = Field(default="builtin:tiny-vl", min_length=1)
    builtin_size: Literal["tiny", "small"] = "tiny"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = "sdpa"
    trust_remote_code: bool = False
    lora: LoraSpec | None = Field(default_factory=LoraSpec)
    quantization: QuantSpec | None = None
    heads: HeadsSpec = Field(default_factory=HeadsSpec)
    readout_token: str = Field(default="<|im_end|>", min_length=1)
    image_max_pixels: PositiveInt = 112 * 112
    image_min_pixels: PositiveInt = 56 * 56

    @property
    def is_builtin(self) -> bool:
        """Whether `name_or_path` names a built-in model (`builtin:...`)."""
        return self.name_or_path.startswith("builtin:")

    @model_validator(mode="after")
    def _cross_fields(self) -> ModelSpec:
        if self.is_builtin and self.name_or_path not in BUILTIN_MODELS:
            raise ValueError(f"name_or_path {self.name_or_path!r} is not a built-in model; built-ins: {BUILTIN_MODELS}")
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError(
                f"image_min_pixels ({self.image_min_pixels}) is larger than image_max_pixels ({self.image_max_pixels})"
            )
        return self


class SyntheticSpec(_Section):
    """The procedural `builtin:synthetic` catalogue (ignored for other catalogues)."""

    n_products: PositiveInt = 600
    seed: int = 0
    image_size: PositiveInt = 112
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    lookalikes: NonNegativeInt = 3
    trace_errors: float = Field(default=0.0, ge=0.0, le=1.0)
    trace_error_attributes: list[Literal["colour", "pattern"]] = Field(default_factory=lambda: ["colour"], min_length=1)


class DataSpec(_Section):
    """Catalogue and pairs."""

    catalogue: str = Field(default="builtin:synthetic", min_length=1)
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
        return value


class EmbedSpec(_Section):
    """`moon-rl embed`: catalogue -> vectors."""

    mode: Literal["direct", "reason"] = "direct"
    batch_size: PositiveInt = 32
    max_new_tokens: PositiveInt = 96
    generation_backend: Literal["hf", "vllm"] = "hf"


class EvalSpec(_Section):
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
        return _unique(value)


# ---- The sft / grpo sections: TRL config fields, checked against the moon config dataclasses.

_CONFIG_SECTIONS = ("sft", "grpo")
_SECTIONS = ("model", "data", "sft", "grpo", "embed", "eval")


def _config_class(section: str) -> type[MoonSFTConfig] | type[MoonGRPOConfig]:
    # Imported lazily: trl + transformers take seconds to import.
    from moon_rl.training.configs import CONFIG_CLASSES

    return CONFIG_CLASSES[section]


# ---- The recipe


class Recipe(_Section):
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

    # Where each key was written ("recipes/x.yaml" or "--set"), the files of the extends chain (base first), overrides.
    _origins: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)
    _files: list[str] = PrivateAttr(default_factory=list)
    _overrides: list[str] = PrivateAttr(default_factory=list)

    @_field_validator("sft", "grpo")
    @classmethod
    def _config_keys(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from moon_rl.training.configs import section_problems

        problems = section_problems(info.field_name, value)
        if problems:
            raise PydanticCustomError("moon_config_keys", "; ".join(message for _, message in problems))
        return value

    @_field_validator("stages")
    @classmethod
    def _stages_in_order(cls, value: list[str]) -> list[str]:
        _unique(value)
        if value != sorted(value, key=STAGES.index):
            raise ValueError(f"stages run in pipeline order {list(STAGES)}; list them in that order")
        return value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Recipe):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    # ---- provenance -------------------------------------------------------------------------------------------------

    @property
    def files(self) -> list[str]:
        """Recipe files this recipe was read from, base of the `extends` chain first (empty when built in code)."""
        return list(self._files)

    @property
    def overrides(self) -> list[str]:
        """The `--set` overrides applied, in order."""
        return list(self._overrides)

    def origin(self, key: str) -> str | None:
        """Where a dotted key (e.g. `"sft.learning_rate"`) was set: a recipe file, `"--set"`, or None (a default)."""
        return _lookup_origin(self._origins, tuple(key.split(".")), None)

    def _where(self, *keys: str) -> str:
        """The file (or `--set`) to blame for a problem with `keys`: the last writer among them, `--set` first."""
        found = [origin for key in keys if (origin := self.origin(key)) is not None]
        rank = {source: i for i, source in enumerate([*self._files, OVERRIDE_SOURCE])}
        if found:
            return max(found, key=lambda source: rank.get(source, -1))
        return self._files[-1] if self._files else "recipe"

    # ---- stage outputs and configs ----------------------------------------------------------------------------------

    def stage_dir(self, stage: str) -> Path:
        """Output folder of a stage: `<output_dir>/<stage>` (relative to the CWD when `output_dir` is)."""
        return Path(self.output_dir) / stage

    def grpo_init_path(self, config: MoonGRPOConfig) -> Path:
        """The model folder GRPO starts from: `config.init_from`, or this recipe's SFT stage output when None."""
        return Path(config.init_from) if config.init_from is not None else self.stage_dir("sft") / "final"

    def sft_config(self, output_dir: str | os.PathLike[str] | None = None) -> MoonSFTConfig:
        """Build the `MoonSFTConfig` of the `sft` section.

        Args:
            output_dir: where TRL writes; defaults to `sft.output_dir` if the recipe set it, else `<output_dir>/sft`.

        Raises:
            RecipeError: the config's own validation (TRL's or moon-rl's) failed; the message names the recipe file.
        """
        return self._build_config("sft", output_dir)  # type: ignore[return-value]

    def grpo_config(self, output_dir: str | os.PathLike[str] | None = None) -> MoonGRPOConfig:
        """Build the `MoonGRPOConfig` of the `grpo` section (`output_dir` defaults to `<output_dir>/grpo`).

        Raises:
            RecipeError: the config's own validation (TRL's or moon-rl's) failed; the message names the recipe file.
        """
        return self._build_config("grpo", output_dir)  # type: ignore[return-value]

    def _build_config(
        self, section: str, output_dir: str | os.PathLike[str] | None, force_cpu: bool = False
    ) -> MoonSFTConfig | MoonGRPOConfig:
        kwargs = dict(getattr(self, section))
        if output_dir is not None or "output_dir" not in kwargs:
            kwargs["output_dir"] = os.fspath(output_dir if output_dir is not None else self.stage_dir(section))
        if "seed" not in kwargs:
            kwargs["seed"] = self.seed  # the recipe's seed, unless the section sets its own
        if force_cpu:
            kwargs["use_cpu"] = True  # turns off transformers' "bf16 needs a GPU" check: validate for the target GPU
            # `tf32: true` needs an Ampere GPU to be built at all; it is checked on the machine that trains.
            if kwargs.get("tf32"):
                kwargs.pop("tf32")
        try:
            return _config_class(section)(**kwargs)
        except (ValueError, TypeError) as exc:
            message = " ".join(str(exc).split())
            # Blame the file that set a field the message names (TRL and moon-rl messages name their fields).
            named = [f"{section}.{key}" for key in kwargs if re.search(rf"\b{re.escape(key)}\b", message)]
            raise RecipeError(
                f"{self._where(*named) if named else self._where(section)}: invalid '{section}' config: {message}"
            ) from exc

    # ---- checks -----------------------------------------------------------------------------------------------------

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
        from moon_rl.training.configs import GENERATION_BATCH_FIELDS, generation_batch_problems, vllm_fire_problems

        problems: list[str] = []
        for section in _CONFIG_SECTIONS:
            if section not in self.stages:
                continue
            batch_problems = generation_batch_problems(self.grpo) if section == "grpo" else []
            if batch_problems:
                batch_keys = [f"grpo.{key}" for key in GENERATION_BATCH_FIELDS if key in self.grpo]
                where = self._where(*batch_keys) if batch_keys else self._where("grpo")
                problems += [f"{where}: {problem}" for problem in batch_problems]
            if section == "grpo" and (fire := vllm_fire_problems(self.grpo, self.model.heads.fire.enabled)):
                problems += [f"{self._where('grpo.use_vllm', 'model.heads.fire')}: {problem}" for problem in fire]
            try:
                self._build_config(section, None, force_cpu=not device_checks)
            except RecipeError as exc:
                # TRL's own divisibility error repeats ours, with less advice.
                if not (batch_problems and "num_generations" in str(exc)):
                    problems.append(str(exc))
        training = [stage for stage in _CONFIG_SECTIONS if stage in self.stages]
        if self.model.quantization is not None and self.model.lora is None and training:
            problems.append(
                f"{self._where('model.quantization', 'model.lora')}: stages {training} train a quantised model without "
                "LoRA, but quantised weights are frozen; set model.lora (QLoRA) or model.quantization: null"
            )
        if check_catalogue:
            problems += self._catalogue_problems()
        if device_checks:
            problems += self._package_problems()
        return problems

    def dry_run(self) -> tuple[list[str], list[str]]:
        """`check()` for the machine the recipe will run on, from any machine (a laptop, CI): loads no weights.

        Builds every TRL config of the listed stages as on the target GPU (TRL's device checks, such as "bf16 needs a
        GPU", are off; `tf32` is left to the target machine) and checks the GRPO generation batch rules, the
        quantisation/LoRA rule and every key. What only the target machine can tell (a catalogue path missing here,
        vllm or bitsandbytes not installed here) comes back as notes.

        Returns:
            `(problems, notes)`: a problem breaks the recipe anywhere; a note is to check on the target machine.
        """
        problems = self.check(device_checks=False, check_catalogue=False)
        return problems, self._catalogue_problems() + self._package_problems()

    def _catalogue_problems(self) -> list[str]:
        catalogue = self.data.catalogue
        if not catalogue.startswith("builtin:") and not Path(catalogue).exists():  # every stage reads it
            return [f"{self._where('data.catalogue')}: 'data.catalogue' {catalogue!r} does not exist"]
        return []

    def _package_problems(self) -> list[str]:
        from moon_rl.training.configs import config_value

        problems = []
        uses_vllm = self.embed.generation_backend == "vllm" or (
            "grpo" in self.stages and config_value("grpo", self.grpo, "use_vllm") is True
        )
        if uses_vllm and importlib.util.find_spec("vllm") is None:
            problems.append(
                f"{self._where('embed.generation_backend', 'grpo.use_vllm')}: vllm is requested "
                "(embed.generation_backend or grpo.use_vllm) but not installed; `pip install moon-rl[vllm]` on a GPU "
                "machine, or use embed.generation_backend: hf and grpo.use_vllm: false"
            )
        if self.model.quantization is not None and importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                f"{self._where('model.quantization')}: model.quantization needs bitsandbytes; "
                "`pip install moon-rl[quant]` or set model.quantization: null"
            )
        return problems

    # ---- output -----------------------------------------------------------------------------------------------------

    def to_yaml(self) -> str:
        """The fully resolved recipe as YAML: every default of moon-rl's own sections filled in, `extends` and
        overrides applied. `sft` / `grpo` show the keys the recipe set (the rest are the config dataclasses'
        defaults, with trl pinned). Loading the text back gives an equal recipe."""
        import trl

        from moon_rl import __version__

        header = [
            f"# Resolved moon-rl recipe (moon-rl {__version__}, trl {trl.__version__}).",
            "# sft/grpo list only the keys the recipe set; others are MoonSFTConfig/MoonGRPOConfig defaults.",
        ]
        if self._files:
            header.append(f"# From: {' <- '.join(reversed(self._files))}")
        header += [f"# --set {override}" for override in self._overrides]
        body = yaml.dump(self.model_dump(), Dumper=RecipeDumper, sort_keys=False, allow_unicode=True, width=120)
        return "\n".join(header) + "\n" + body

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `to_yaml()` to `path` atomically (temp file + rename) and return the path.

        Call it on the main process only when running distributed.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_yaml())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target


# ---- Loading: extends chain, deep merge with provenance, overrides, path resolution, validation

Origins = dict[tuple[str, ...], str]


def _display(path: Path) -> str:
    """A file as messages show it: relative to the CWD when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path, shown: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{shown}: cannot read recipe: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        bad = exc.object[exc.start : exc.start + 1].hex()
        raise RecipeError(f"{shown}:{line}: not valid UTF-8 (byte 0x{bad}); save the recipe as UTF-8") from exc
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}" if mark is not None else shown
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: invalid YAML: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{shown}: a recipe is a mapping of sections (model:, data:, ...), got {type(data).__name__}")
    return data


def _read_chain(path: Path) -> list[tuple[Path, str, dict[str, Any]]]:
    """The recipe and the files it extends, base first, as (path, shown name, data without `extends`)."""
    chain: list[tuple[Path, str, dict[str, Any]]] = []
    current = path.expanduser().resolve()
    shown = _display(current)
    if not current.is_file():
        raise RecipeError(f"{shown}: recipe file not found")
    while True:
        if any(current == seen for seen, _, _ in chain):
            cycle = " -> ".join([name for _, name, _ in chain] + [shown])
            raise RecipeError(f"{chain[-1][1]}: 'extends' cycle: {cycle}")
        data = _read_yaml(current, shown)
        parent = data.pop("extends", None)
        chain.append((current, shown, data))
        if parent is None:
            return chain[::-1]
        if not isinstance(parent, str) or not parent:
            raise RecipeError(f"{shown}: 'extends' must be the path of one recipe file, got {parent!r}")
        candidate = (current.parent / Path(parent).expanduser()).resolve()
        if not candidate.is_file():
            raise RecipeError(f"{shown}: 'extends' file {parent!r} not found (looked for {candidate})")
        current, shown = candidate, _display(candidate)


def _set_origin(origins: Origins, prefix: tuple[str, ...], value: Any, source: str) -> None:
    """Record that `source` wrote `value` at `prefix` (and everything inside it), forgetting older writers."""
    for key in [k for k in origins if k[: len(prefix)] == prefix]:
        del origins[key]
    origins[prefix] = source
    if isinstance(value, dict):
        for key, inner in value.items():
            _set_origin(origins, (*prefix, str(key)), inner, source)


def _merge(dst: dict[str, Any], src: dict[str, Any], origins: Origins, source: str, prefix: tuple[str, ...]) -> None:
    """Deep-merge `src` into `dst`: mappings merge, lists and scalars replace."""
    for key, value in src.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            origins[path] = source
            _merge(dst[key], value, origins, source, path)
        else:
            dst[key] = copy.deepcopy(value)
            _set_origin(origins, path, value, source)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Parse one `--set` override `a.b.c=value` into (key path, typed value).

    Values follow the recipe YAML rules: `true`/`false` -> bool, `3` -> int, `1e-4` -> float, `null` -> None,
    `[1, 2]` -> list, `{a: 1}` -> dict, anything else a string (`a,b` stays the string "a,b").

    Raises:
        RecipeError: not of the form KEY=VALUE, or the value is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(
            f"{OVERRIDE_SOURCE}: expected KEY=VALUE with a dotted KEY (e.g. sft.learning_rate=1e-4), got {text!r}"
        )
    try:
        value = yaml.load(raw.strip(), Loader=RecipeLoader) if raw.strip() else ""  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RecipeError(f"{OVERRIDE_SOURCE}: value of {key!r} is not valid YAML ({raw!r}): {exc}") from exc
    return tuple(key.split(".")), value


def _apply_override(data: dict[str, Any], origins: Origins, text: str) -> None:
    path, value = parse_override(text)
    if path[0] == "extends":
        raise RecipeError(f"{OVERRIDE_SOURCE}: 'extends' cannot be overridden; point the recipe's extends: at the file")
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:  # absent or null (e.g. `lora: null`): the override starts a fresh section
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise RecipeError(
                f"{OVERRIDE_SOURCE}: cannot set '{'.'.join(path)}': '{where}' is {type(child).__name__} {child!r}, "
                "not a section"
            )
        node = child
    node[path[-1]] = value
    _set_origin(origins, path, value, OVERRIDE_SOURCE)


_REWARD_FILE_RE = re.compile(r"^(?P<file>.+\.py):(?P<fn>[A-Za-z_][\w.]*)$")


def _resolve_paths(data: dict[str, Any], origins: Origins, folders: dict[str, Path]) -> None:
    """Make relative input paths absolute against the folder of the file that wrote them (CWD for `--set`)."""

    def absolute(value: str, key: tuple[str, ...]) -> str:
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        folder = folders.get(_lookup_origin(origins, key, OVERRIDE_SOURCE), Path.cwd())
        return os.path.normpath(folder / path)

    section = data.get("data")
    if isinstance(section, dict) and isinstance(section.get("catalogue"), str):
        catalogue = section["catalogue"]
        if catalogue and not catalogue.startswith("builtin:"):
            section["catalogue"] = absolute(catalogue, ("data", "catalogue"))
    grpo = data.get("grpo")
    rewards = grpo.get("rewards") if isinstance(grpo, dict) else None
    for entry in rewards if isinstance(rewards, list) else []:
        match = _REWARD_FILE_RE.match(entry.get("name", "")) if isinstance(entry, dict) else None
        if match and isinstance(entry["name"], str):
            entry["name"] = f"{absolute(match['file'], ('grpo', 'rewards'))}:{match['fn']}"


def _lookup_origin(origins: Origins, key: tuple[Any, ...], fallback: str | None) -> str | None:
    """The source of the longest recorded prefix of `key`."""
    for end in range(len(key), 0, -1):
        found = origins.get(tuple(str(part) for part in key[:end]))
        if found is not None:
            return found
    return fallback


def _dotted(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _section_class(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The schema class of the mapping at `loc` (e.g. ("model", "heads") -> HeadsSpec)."""
    cls: type[BaseModel] = Recipe
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        inner = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
        if not (isinstance(inner[0], type) and issubclass(inner[0], BaseModel)):
            return None
        cls = inner[0]
    return cls


def _unknown_key_message(loc: tuple[Any, ...]) -> str:
    key, parent = str(loc[-1]), loc[:-1]
    cls = _section_class(parent)
    valid = list(cls.model_fields) if cls is not None else []
    prefix = _dotted(parent) + "." if parent else ""
    hint = ""
    if not parent:
        valid.append("extends")
        from moon_rl.training.configs import config_fields

        homes = [s for s in _CONFIG_SECTIONS if key in config_fields(s)]
        if homes:
            hint = f" (did you mean {' or '.join(repr(f'{s}.{key}') for s in homes)}?)"
    if not hint:
        close = get_close_matches(key, valid, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(valid)})"
    return f"unknown key '{prefix}{key}'{hint}"


def _format_error(error: Any, origins: Origins, fallback: str) -> str | None:
    """One line for one pydantic error, or None when it is reported otherwise (sft/grpo keys)."""
    loc = tuple(error["loc"])
    if error["type"] == "moon_config_keys":
        return None
    source = _lookup_origin(origins, loc, fallback)
    if error["type"] == "extra_forbidden":
        return f"{source}: {_unknown_key_message(loc)}"
    if error["type"] == "missing":
        return f"{source}: missing key '{_dotted(loc)}'"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ").replace("Input should be", "should be")
    got = error.get("input")
    shown_got = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: bad value for '{_dotted(loc)}': {message}{shown_got}"


def _load(path: str | os.PathLike[str], overrides: Sequence[str]) -> tuple[Recipe | None, list[str]]:
    """Read, merge, override and validate; fatal problems (missing file, bad YAML, bad override) raise."""
    chain = _read_chain(Path(path))
    data: dict[str, Any] = {}
    origins: Origins = {}
    folders: dict[str, Path] = {OVERRIDE_SOURCE: Path.cwd()}
    for file, shown, content in chain:
        folders[shown] = file.parent
        _merge(data, content, origins, shown, ())
    for text in overrides:
        _apply_override(data, origins, text)
    top_file, top_shown = chain[-1][0], chain[-1][1]
    data.setdefault("output_dir", f"runs/{top_file.stem}")
    for section in _SECTIONS:
        if section in data and data[section] is None:  # `sft:` with every line commented out: all defaults
            data[section] = {}
    _resolve_paths(data, origins, folders)

    recipe, problems = _validate(data, origins, top_shown)
    if recipe is not None:
        recipe._origins = origins
        recipe._files = [shown for _, shown, _ in chain]
        recipe._overrides = list(overrides)
    return recipe, problems


def _validate(data: dict[str, Any], origins: Origins, fallback: str) -> tuple[Recipe | None, list[str]]:
    """Validate merged recipe data; problems come one line each, in section order."""
    from moon_rl.training.configs import section_problems

    found: list[tuple[str, str]] = []  # (top-level key, line)
    found += [
        (str(key), f"{fallback}: top-level key {key!r} is not a string") for key in data if not isinstance(key, str)
    ]
    for section in _CONFIG_SECTIONS:
        values = data.get(section)
        if isinstance(values, dict):
            for key, message in section_problems(section, values):
                found.append((section, f"{_lookup_origin(origins, (section, str(key)), fallback)}: {message}"))
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            line = _format_error(error, origins, fallback)
            if line is not None:
                found.append((str(error["loc"][0]) if error["loc"] else "", line))
    order = list(Recipe.model_fields)
    found.sort(key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    problems = list(dict.fromkeys(line for _, line in found))
    return (None if problems else recipe), problems


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe file: follow `extends`, apply `--set` overrides, validate.

    Args:
        path: the recipe YAML file.
        overrides: `KEY=VALUE` strings (`sft.learning_rate=1e-4`, `stages=[sft, grpo]`), applied in order after the
            `extends` chain is merged.

    Raises:
        RecipeError: every problem of the recipe, one line each (file or `--set`, key path, what was expected).
    """
    recipe, problems = _load(path, overrides)
    if problems or recipe is None:
        raise RecipeError("\n".join(problems))
    return recipe


def validate_recipe(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), device_checks: bool = True
) -> list[str]:
    """All problems of a recipe (schema, then `Recipe.check()`), one line each; empty when it is ready to run."""
    try:
        recipe, problems = _load(path, overrides)
    except RecipeError as exc:
        return str(exc).splitlines()
    if problems or recipe is None:
        return problems
    return recipe.check(device_checks=device_checks)
