"""The `model` section of a recipe, as typed specs: the backbone, LoRA, quantisation and the embedding heads.

The modeling layer builds and loads models from a `ModelSpec`, and a saved model carries its own in `moon_rl.json`,
so that loading one never needs the recipe package; `moon_rl.recipe.schema` builds the rest of a recipe's sections on
the same `Section` base.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import field_validator as _field_validator

__all__ = ["BUILTIN_MODELS", "DEFAULT_LORA_TARGETS", "FireSpec", "FusionSpec", "HeadsSpec", "LoraSpec", "ModelSpec",
           "NonNegativeInt", "PositiveFloat", "PositiveInt", "QuantSpec", "Section", "unique"]

BUILTIN_MODELS: tuple[str, ...] = ("builtin:tiny-vl",)
#: LoRA on the language model's attention and MLP projections only: never the vision tower or lm_head.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, and values are not coerced ("32" is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def unique(values: list[Any]) -> list[Any]:
    """`values`, refused (ValueError) when one repeats."""
    if len(set(values)) != len(values):
        raise ValueError("values must not repeat")
    return values


class LoraSpec(Section):
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


class QuantSpec(Section):
    """bitsandbytes quantisation of the frozen base weights (QLoRA); needs `model.lora`."""

    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    double_quant: bool = True


class FusionSpec(Section):
    """Multi-head modality fusion: read-out state attends to the raw image and text signals (and the chain's words)."""

    enabled: bool = True
    num_heads: PositiveInt = 4
    chain: bool = True


class FireSpec(Section):
    """FIRE: low-rank residual re-injection of raw visual tokens at chosen decoder layers."""

    enabled: bool = True
    layers: list[NonNegativeInt] | None = None
    rank: PositiveInt = 8

    @_field_validator("layers")
    @classmethod
    def _layersunique(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else unique(value)


class HeadsSpec(Section):
    """`MoonHeads`: fusion, FIRE and the projection to the embedding."""

    embed_dim: PositiveInt = 256
    learning_rate: PositiveFloat = 1e-3
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    fire: FireSpec = Field(default_factory=FireSpec)
    #: Matryoshka: the contrastive losses also train these prefixes of the embedding (e.g. [128, 64, 32]), so that
    #: `embed --dim 64` keeps most of the quality at a quarter of the size. The full `embed_dim` always trains.
    matryoshka_dims: list[PositiveInt] | None = None

    @_field_validator("matryoshka_dims")
    @classmethod
    def _dimsunique(cls, value: list[int] | None) -> list[int] | None:
        return None if value is None else sorted(unique(value), reverse=True)

    @model_validator(mode="after")
    def _dims_fit(self) -> HeadsSpec:
        if self.matryoshka_dims and max(self.matryoshka_dims) > self.embed_dim:
            raise ValueError(f"matryoshka_dims {self.matryoshka_dims} must not exceed embed_dim {self.embed_dim}")
        return self


class ModelSpec(Section):
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
