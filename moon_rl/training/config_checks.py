"""Checks of a recipe's `sft` / `grpo` section (a dict of field names) against the config dataclasses of
`moon_rl.training.configs`, before they are built: unknown keys with "did you mean", values of the wrong type, the
GRPO generation-batch rules and vLLM with FIRE.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from difflib import get_close_matches
from functools import cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

from moon_rl.training.configs import MoonGRPOConfig, MoonSFTConfig, normalise_rewards

__all__ = ["CONFIG_CLASSES", "GENERATION_BATCH_FIELDS", "config_fields", "config_value", "generation_batch_problems",
           "section_problems", "vllm_fire_problems"]


#: Recipe section name -> the config dataclass it becomes.
CONFIG_CLASSES: dict[str, type[MoonSFTConfig] | type[MoonGRPOConfig]] = {"sft": MoonSFTConfig, "grpo": MoonGRPOConfig}


@cache
def config_fields(section: str) -> dict[str, Any]:
    """Field name -> type annotation, for every field a recipe's `section` ("sft" or "grpo") may set."""
    cls = CONFIG_CLASSES[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def config_value(section: str, values: Mapping[str, Any], name: str) -> Any:
    """The value field `name` will take: the section's, else the dataclass default (the one place defaults live)."""
    if name in values:
        return values[name]
    field_ = next(f for f in dataclasses.fields(CONFIG_CLASSES[section]) if f.name == name)
    return field_.default_factory() if field_.default is dataclasses.MISSING else field_.default  # type: ignore[misc]


@cache
def _field_adapter(section: str, name: str) -> TypeAdapter[Any] | None:
    try:
        return TypeAdapter(config_fields(section)[name])
    except Exception:  # an annotation pydantic cannot check is left to the dataclass's own validation
        return None


def _type_name(annotation: Any) -> str:
    """`transformers.trainer_utils.SchedulerType | str` -> `SchedulerType | str`."""
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(\w+)", r"\1", str(annotation))


def section_problems(section: str, values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`(key, problem)` for each unknown key or ill-typed value of a recipe's `sft` / `grpo` section.

    Unknown keys get the closest valid key (or the other section, when the key belongs there); values are checked
    strictly against the field's annotation (`"32"` is not an int) and `rewards` entries are checked as in
    `MoonGRPOConfig`. Cross-field rules are left to the dataclasses' `__post_init__`.
    """
    fields = config_fields(section)
    other = "grpo" if section == "sft" else "sft"
    problems = []
    for key, value in values.items():
        if key not in fields:
            if key in config_fields(other):
                hint = f" (it is a '{other}' key, not a '{section}' one)"
            else:
                close = get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
            problems.append((key, f"unknown key '{section}.{key}'{hint}"))
            continue
        adapter = _field_adapter(section, key)
        if adapter is not None:
            try:
                adapter.validate_python(value, strict=True)
            except ValidationError:
                expected = _type_name(fields[key])
                problems.append((key, f"bad value for '{section}.{key}': expected {expected}, got {value!r}"))
                continue
        if section == "grpo" and key == "rewards":
            try:
                normalise_rewards(value)
            except ValueError as exc:
                problems.append((key, f"bad value for 'grpo.rewards': {exc}"))
    return problems


#: The GRPO fields that size a generation batch, as `generation_batch_problems` reads them.
GENERATION_BATCH_FIELDS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "generation_batch_size",
    "num_generations",
    "min_distinct_anchors",
)


def generation_batch_problems(values: Mapping[str, Any], num_processes: int = 1) -> list[str]:
    """Check that each GRPO generation batch holds whole groups and enough distinct anchors.

    As in TRL, the generation batch is global: `generation_batch_size` when set (it must then be divisible by
    `per_device_train_batch_size x num_processes`), else `per_device_train_batch_size x num_processes x
    steps_per_generation` (TRL's default `steps_per_generation` is `gradient_accumulation_steps`). It must be divisible
    by `num_generations`, and hold at least `min_distinct_anchors` anchors (`generation batch / num_generations`): the
    retrieval rewards and InfoNCE rank against the queries of every process's completions.

    Args:
        values: a recipe's `grpo` section; missing fields take the `MoonGRPOConfig` defaults.
        num_processes (`int`, *optional*, defaults to `1`): training processes (`WORLD_SIZE`); `recipe validate`
            checks the single-process run.

    Returns:
        One message per broken rule, naming the fields to change; empty when all hold.
    """
    batch, accumulation, steps, generation_batch, generations, min_anchors = (
        config_value("grpo", values, name) for name in GENERATION_BATCH_FIELDS
    )
    if generation_batch is not None and steps is not None:
        return []  # TRL rejects setting both, with a clear message
    numbers = (batch, accumulation, generations, min_anchors, generation_batch or 1, steps or 1, num_processes)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in numbers):
        return []  # bad types or values are reported by the type check and TRL
    processes = f" x {num_processes} processes" if num_processes > 1 else ""
    if generation_batch is None:
        steps = accumulation if steps is None else steps
        generation_batch = batch * num_processes * steps
        how = f"per_device_train_batch_size ({batch}){processes} x steps_per_generation ({steps})"
    else:
        how = f"generation_batch_size ({generation_batch})"
        if generation_batch % (batch * num_processes):
            return [
                f"grpo.generation_batch_size ({generation_batch}) is not divisible by grpo.per_device_train_batch_size "
                f"({batch}){processes} (TRL splits it into whole per-device batches); change either"
            ]
    if generation_batch % generations:
        return [
            f"the GRPO generation batch, {how} = {generation_batch}, is not divisible by grpo.num_generations "
            f"({generations}); change grpo.per_device_train_batch_size, grpo.gradient_accumulation_steps (or "
            "grpo.steps_per_generation) or grpo.num_generations"
        ]
    anchors = generation_batch // generations
    if anchors < min_anchors:
        return [
            f"a GRPO generation batch holds {anchors} distinct anchor(s) ({how} = {generation_batch} completions / "
            f"grpo.num_generations {generations}), fewer than grpo.min_distinct_anchors ({min_anchors}); raise "
            "grpo.per_device_train_batch_size or grpo.gradient_accumulation_steps (or grpo.steps_per_generation), "
            "or lower grpo.num_generations"
        ]
    return []


def vllm_fire_problems(values: Mapping[str, Any], fire_enabled: bool) -> list[str]:
    """GRPO sampling with vLLM while FIRE is on: only a token-level truncated importance-sampling correction is allowed.

    vLLM samples from the backbone alone: FIRE's weights are not part of the HF model, yet after SFT they change every
    token's probability in the policy that trains. TRL corrects for the mismatch with importance-sampling ratios; its
    default (`sequence_mask`) zeroes every sequence whose ratio leaves the bounds, so GRPO would quietly train on the
    sequences FIRE changed least. `token_truncate` keeps every token and clips its weight; without a correction the
    FIRE-less samples would be trained on as if on-policy.

    Args:
        values: a recipe's `grpo` section; missing fields take the `MoonGRPOConfig` defaults.
        fire_enabled (`bool`): the recipe's `model.heads.fire.enabled`.
    """
    if not fire_enabled or not config_value("grpo", values, "use_vllm"):
        return []
    correction = config_value("grpo", values, "vllm_importance_sampling_correction")
    mode = config_value("grpo", values, "vllm_importance_sampling_mode")
    if correction and mode == "token_truncate":
        return []
    now = "no importance-sampling correction" if not correction else f"vllm_importance_sampling_mode {mode!r}"
    return [
        f"grpo.use_vllm with FIRE on (model.heads.fire.enabled): vLLM samples without FIRE, and {now} would "
        f"{'train on those samples as if on-policy' if not correction else 'drop the samples FIRE changes most'}; set "
        "grpo.vllm_importance_sampling_mode: token_truncate (keeps every token, clips its weight), or sample with "
        "transformers (grpo.use_vllm: false), or turn FIRE off"
    ]
