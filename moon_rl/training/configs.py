"""Training configs: TRL's `SFTConfig` / `GRPOConfig` plus moon-rl's own fields, nothing else.

The `sft` and `grpo` sections of a recipe become these dataclasses (see `moon_rl.recipe.Recipe.sft_config`). Every TRL
field keeps its TRL name, default and validation; moon-rl only adds the fields below, and their defaults live here, not
in `.get()` calls elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

from trl import GRPOConfig, SFTConfig

__all__ = [
    "REWARD_ENTRY_KEYS",
    "REWARD_WEIGHT_DEFAULT",
    "ConfigValueError",
    "MoonContrastiveMixin",
    "MoonGRPOConfig",
    "MoonSFTConfig",
    "default_rewards",
    "normalise_rewards",
]

#: Keys allowed in one entry of `MoonGRPOConfig.rewards`.
REWARD_ENTRY_KEYS = ("name", "weight", "args")
#: Weight of a `rewards` entry that names none.
REWARD_WEIGHT_DEFAULT = 1.0


def default_rewards() -> list[dict[str, Any]]:
    """The rewards a GRPO recipe gets when it names none: the retrieval log-probability (continuous: it still tells
    apart chains that all rank their query first), plus a light format reward."""
    return [
        {"name": "retrieval_logprob", "weight": REWARD_WEIGHT_DEFAULT, "args": {}},
        {"name": "format", "weight": 0.2, "args": {}},
    ]


#: Batch-sizing fields of `MoonSFTConfig` / `MoonGRPOConfig` that must be integers >= 1 when set.
_POSITIVE_INT_FIELDS = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_generations",
    "generation_batch_size",
    "steps_per_generation",
)


class ConfigValueError(ValueError):
    """A moon-rl check of a config field failed. `field` names the field, so that a recipe error names the file that
    set it without reading the message (TRL's and transformers' own errors are free text)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[type[ConfigValueError], tuple[str, str]]:
        return type(self), (self.field, str(self))  # pickles although __init__ takes two arguments


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: object, minimum: int) -> None:
    """`ConfigValueError` unless `value` is an integer (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigValueError(name, f"`{name}` must be an integer >= {minimum}, got {value!r}.")


@dataclass
class MoonContrastiveMixin:
    r"""
    moon-rl fields shared by [`MoonSFTConfig`] and [`MoonGRPOConfig`]: the contrastive (InfoNCE) term added to the
    TRL loss.

    Parameters:
        > Parameters that control the contrastive loss

        contrastive_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the symmetric InfoNCE loss (reason-mode anchor vs direct-mode positive, in-batch negatives)
            added to the TRL loss. `0.0` turns the term off.
        contrastive_temperature (`float`, *optional*, defaults to `0.05`):
            Temperature dividing the cosine similarities in InfoNCE. Must be `> 0`; lower is sharper.
        direct_contrastive_weight (`float`, *optional*, defaults to `1.0`):
            Relative weight of the direct-vs-direct InfoNCE term, which keeps the fast `direct` mode (no generation)
            in the same embedding space as the `reason` mode.
        image_contrastive_weight (`float`, *optional*, defaults to `1.0`):
            Relative weight of the InfoNCE term on image-only anchor pairs (a product photo as the query).

        > Parameters that control the heads' optimizer

        heads_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the fusion / FIRE / projection heads in this stage. `None` uses the recipe's
            `model.heads.learning_rate`. A refining stage (GRPO after SFT) usually wants it lower.
        heads_max_grad_norm (`float` or `None`, *optional*, defaults to `None`):
            Clip the heads' gradient norm to this (their own norm; the Trainer clips the model's). `None` uses
            `max_grad_norm`, as TRL does for the model; `0` turns clipping off.
    """

    contrastive_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the InfoNCE loss added to the TRL loss. 0.0 turns it off."},
    )
    contrastive_temperature: float = field(
        default=0.05,
        metadata={"help": "Temperature of InfoNCE (cosine similarities are divided by it). Must be > 0."},
    )
    direct_contrastive_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the direct-vs-direct InfoNCE term that keeps the fast direct mode in the same "
            "embedding space as the reason mode."
        },
    )
    image_contrastive_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the InfoNCE term on image-only anchor pairs."},
    )
    heads_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the heads in this stage. None = the recipe's model.heads.learning_rate."},
    )
    heads_max_grad_norm: float | None = field(
        default=None,
        metadata={"help": "Clip the heads' gradient norm to this. None = max_grad_norm; 0 = no clipping."},
    )

    def __post_init__(self) -> None:
        lr = self.heads_learning_rate
        if lr is not None and (not _is_number(lr) or lr <= 0):
            raise ConfigValueError(
                "heads_learning_rate", f"`heads_learning_rate` must be a number > 0 or None, got {lr!r}."
            )
        clip = self.heads_max_grad_norm
        if clip is not None and (not _is_number(clip) or clip < 0):
            raise ConfigValueError(
                "heads_max_grad_norm",
                f"`heads_max_grad_norm` must be a number >= 0 (0: no clipping) or None, got {clip!r}.",
            )
        for name in ("contrastive_weight", "direct_contrastive_weight", "image_contrastive_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigValueError(
                    name, f"`{name}` must be a finite number >= 0, got {value!r}; use 0.0 to turn the term off."
                )
        temperature = self.contrastive_temperature
        if not _is_number(temperature) or temperature <= 0:
            raise ConfigValueError(
                "contrastive_temperature",
                f"`contrastive_temperature` must be a finite number > 0, got {temperature!r}; typical values are "
                "0.02-0.1."
            )
        # transformers checks none of these: a negative batch size would fail deep inside the first DataLoader.
        for name in _POSITIVE_INT_FIELDS:
            if (value := getattr(self, name, None)) is not None:
                _check_int(name, value, 1)
        super().__post_init__()  # the TRL config's own validation


@dataclass
class MoonSFTConfig(MoonContrastiveMixin, SFTConfig):
    r"""
    Configuration of `MoonSFTTrainer`: TRL's [`~trl.SFTConfig`] (every field, same name, same default) plus the
    contrastive fields of [`MoonContrastiveMixin`].

    Parameters:
        > Parameters that control the contrastive loss

        contrastive_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the InfoNCE loss added to the LM loss on the reasoning trace.
        contrastive_temperature (`float`, *optional*, defaults to `0.05`):
            Temperature of InfoNCE. Must be `> 0`.
        direct_contrastive_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the direct-vs-direct InfoNCE term.
        image_contrastive_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the InfoNCE term on image-only anchor pairs.
        hard_negatives (`int`, *optional*, defaults to `1`):
            Explicit hard negatives per pair (the first ones of the pair's `negatives`, e.g. look-alikes differing in
            one attribute), embedded in direct mode and added to the direct-vs-direct InfoNCE term as extra candidates.
            `0` turns them off.
        reasoning (`bool`, *optional*, defaults to `True`):
            Train on the catalogue's reasoning traces. `False` ignores them: every product row is a direct-mode prompt,
            no LM loss, contrastive terms only (a model that never learns to reason; the ablation baseline).
        chain_negatives (`bool`, *optional*, defaults to `True`):
            Per pair, the product with its reasoning trace altered in one attribute value (e.g. `colour red` ->
            `colour blue`; reason mode, no LM target) joins the reason-mode InfoNCE term as a hard negative. The
            read-out then learns that a chain naming a wrong value is a worse match than the true chain, which is what
            GRPO's retrieval reward needs to tell a right chain from a wrong one (trained on true traces only, the
            reward preferred the right pattern word for 29% of products, chance 17%). Needs products with
            `attributes` whose values the traces name; pairs without one get no such negative.
        chain_negative_attributes (`list[str]` or `None`, *optional*, defaults to `None`):
            The attributes an altered chain may change (e.g. `[colour, pattern]`: only what the photo shows, so every
            such negative is told apart by looking at the image, not by reading the title). `None`: any attribute the
            trace names. A pair whose trace names none of them gets no chain negative.
        trace_noise (`float`, *optional*, defaults to `0.0`):
            Fraction of each reasoning trace's tokens replaced, in training batches, by tokens drawn from other traces
            (those positions get no LM target). The reason-mode read-out then learns to check the reasoning against
            the raw image and text instead of copying it: a model's own greedy traces are noisier than the teacher's,
            and a read-out trained on clean traces only is misled by them. `0` keeps the traces as they are.
        value_token_weight (`float`, *optional*, defaults to `0.0`):
            Weight of an extra LM loss on the trace tokens that name an attribute value (the mean negative
            log-likelihood of those tokens, from the same forward), added to TRL's loss over all trace tokens. In a
            trace like `category shirt. colour red. pattern striped.` most tokens are fixed words learned in a few
            steps; the values are what the chain is for, and the ones only the image shows (pattern) are the hardest
            to learn. Needs products with `attributes` whose values the traces name. `0` turns it off.
        photo_traces (`bool`, *optional*, defaults to `False`):
            One more LM row per pair whose product has a trace and a photo: the photos alone (no title or
            description), then the trace, with no LM target on the attribute values the product's text names (a photo
            cannot show a brand). With the text in the prompt the model recalls a training product's pattern from its
            title instead of reading the photo; these rows take that shortcut away. About a fifth more SFT time.
        contrastive_chunk_size (`int`, *optional*, defaults to `None`):
            GradCache: split each batch into chunks of this many pairs. Every chunk is embedded once without an
            autograd graph, the contrastive loss and its gradient with respect to every embedding are computed over the
            whole batch, then each chunk is run again with gradient (same random state) and back-propagates the LM
            loss of its rows and those cached embedding gradients. The gradients equal the unchunked step's, and the
            in-batch negatives are the whole batch while activation memory is that of one chunk: raise
            `per_device_train_batch_size` beyond what fits at once. Costs one extra forward (without graph) per
            step. `None` runs the batch in one forward.

    Example:

    ```python
    >>> config = MoonSFTConfig(output_dir="runs/x/sft", use_cpu=True, bf16=False, contrastive_weight=0.5)
    >>> config.contrastive_temperature
    0.05
    ```
    """

    hard_negatives: int = field(
        default=1,
        metadata={"help": "Hard negatives per pair (from the pair's `negatives`) added to the direct InfoNCE term."},
    )
    reasoning: bool = field(
        default=True,
        metadata={"help": "Train on the reasoning traces (LM loss + reason-mode InfoNCE). False: direct-mode "
                  "contrastive training only, the `direct only` baseline of the ablations."},
    )
    chain_negatives: bool = field(
        default=True,
        metadata={"help": "Add the product with a trace altered in one attribute value as a hard negative of the "
                  "reason-mode InfoNCE term, so the read-out prefers true chains."},
    )
    chain_negative_attributes: list[str] | None = field(
        default=None,
        metadata={"help": "The attributes an altered chain (chain_negatives) may change, e.g. [colour, pattern]; "
                  "None: any the trace names."},
    )
    trace_noise: float = field(
        default=0.0,
        metadata={"help": "Fraction of trace tokens replaced by tokens of other traces (no LM target there), so the "
                  "reason-mode read-out learns not to trust the reasoning blindly. 0 = off."},
    )

    value_token_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of an extra LM loss on the trace tokens that name an attribute value (the words "
                  "the chain is for). 0 = off."},
    )

    photo_traces: bool = field(
        default=False,
        metadata={"help": "One more LM row per pair: the product's photos alone, then its trace (no loss on the "
                  "values the product's text names)."},
    )

    contrastive_chunk_size: int | None = field(
        default=None,
        metadata={"help": "GradCache: pairs per chunk; the contrastive loss still sees the whole batch, activations "
                  "one chunk at a time (one extra forward without graph per step). None = one forward."},
    )

    def __post_init__(self) -> None:
        _check_int("hard_negatives", self.hard_negatives, 0)
        if self.contrastive_chunk_size is not None:
            _check_int("contrastive_chunk_size", self.contrastive_chunk_size, 1)
        if not _is_number(self.value_token_weight) or self.value_token_weight < 0:
            raise ConfigValueError("value_token_weight", f"`value_token_weight` must be a number >= 0, got "
                                   f"{self.value_token_weight!r}; 0 turns it off.")
        if not _is_number(self.trace_noise) or not 0.0 <= self.trace_noise < 1.0:
            raise ConfigValueError(
                "trace_noise", f"`trace_noise` must be a number in [0, 1), got {self.trace_noise!r}; 0 turns it off."
            )
        super().__post_init__()


@dataclass
class MoonGRPOConfig(MoonContrastiveMixin, GRPOConfig):
    r"""
    Configuration of `MoonGRPOTrainer`: TRL's [`~trl.GRPOConfig`] (every field, same name, same default, vLLM ones
    included) plus the contrastive fields of [`MoonContrastiveMixin`] and the fields below.

    Parameters:
        > Parameters that control the rewards

        rewards (`list[dict]`, *optional*, defaults to `[{"name": "retrieval_logprob", "weight": 1.0}, {"name": "format",
        "weight": 0.2}]`):
            Reward functions and their weights. Each entry is `{name: str, weight: float = 1.0, args: dict = {}}`;
            `name` resolves through the reward registry (a registered name, an entry point, `package.module:fn` or
            `path/to/file.py:fn`), `args` are passed to the reward. Weights may be negative (a penalty). After
            construction every entry has all three keys. Use this instead of TRL's `reward_weights`.
        min_distinct_anchors (`int`, *optional*, defaults to `4`):
            Fewest distinct anchors a generation batch (`generation_batch_size / num_generations`, over all processes,
            as TRL counts it) must hold, so the retrieval rewards and InfoNCE have negatives to rank against. Checked
            by `Recipe.check()` (one process) and by `moon-rl grpo` (its processes).

        > Parameters that control the initial model

        init_from (`str` or `None`, *optional*, defaults to `None`):
            Model folder to start GRPO from (an error when it holds no moon-rl model). `None` means the SFT stage output
            of the same recipe, or the recipe's base model (with a warning) when there is none.

        > Parameters that control the candidate pool and the checks

        candidate_queue_size (`int`, *optional*, defaults to `256`):
            Direct-mode query embeddings of recent generation batches kept as extra candidates (negatives) for the
            retrieval rewards and GRPO's InfoNCE, like MoCo's queue: a generation batch alone holds a few easy
            candidates, and a reward over them barely varies. Entries of a batch's own products are masked out.
            `0` turns the queue off.
        allow_untrained_reasoning (`bool`, *optional*, defaults to `False`):
            Before training, GRPO samples the starting model on a few products and stops (exit 2) when most
            completions never close the think block, or when the catalogue has no reasoning traces and GRPO starts
            from an untrained model: the rewards could then never vary with what the reasoning says. `True` trains
            anyway.
        max_reward_failure_steps (`int`, *optional*, defaults to `5`):
            A reward that fails on every completion for this many consecutive steps stops the run with its exception
            (one failing step is excluded from that step's reward and logged).
        contrastive_rows (`str`, *optional*, defaults to `"advantaged"`):
            Which completions GRPO's InfoNCE term pulls onto their queries. `"advantaged"`: those whose advantage is
            >= 0 (at least as good as their group's mean reward). `"all"`: every completion; the read-out then learns
            to match a query from any sampled chain, right or wrong, i.e. to ignore what the chain says (on `tiny-cpu`
            over 3 seeds: cos(chain, chain) 0.965 with `all`, 0.954 with `advantaged`; greedy pattern 0.464 vs 0.486).
        sibling_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the sibling-ranking term (`moon_rl.training.sibling.sibling_ranking_loss`): each completion
            with advantage > 0 must score higher against its (detached) query than its group's completions with
            advantage < 0. Siblings share prompt and image, so the read-out can only tell them apart by what their
            chains say: the term makes the embedding follow the chain, in the direction the reward prefers. Siblings
            count within a micro-batch (the whole generation batch when `steps_per_generation` is 1). A
            faithfulness / retrieval trade-off, measured on `tiny-cpu` (3 seeds, bench/RESULTS.md): at 0.1
            cos(chain, chain) 0.971 -> 0.944, but reason-mode text R@1 0.950 -> 0.928 and image 0.556 -> 0.497
            (GRPO then no longer beats SFT): a read-out that follows the chain is misled where the chain is wrong.
            0.15 with `contrastive_weight` 0.75 and 600 steps, chosen on a validation split, gave 0.955 and no image
            gain on test. `0` turns it off.
    """

    rewards: list[dict[str, Any]] = field(
        default_factory=default_rewards,
        metadata={
            "help": "Rewards as a list of {name, weight (default 1.0), args (default {})}; name is a registered reward, "
            "package.module:fn or path/to/file.py:fn."
        },
    )
    min_distinct_anchors: int = field(
        default=4,
        metadata={
            "help": "Fewest distinct anchors per generation batch (generation_batch_size / num_generations), so "
            "retrieval rewards have negatives to rank against."
        },
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Model folder to start GRPO from. None = the SFT stage output of the same recipe."},
    )
    candidate_queue_size: int = field(
        default=256,
        metadata={"help": "Recent query embeddings kept as extra reward / InfoNCE candidates (0 = off)."},
    )
    allow_untrained_reasoning: bool = field(
        default=False,
        metadata={"help": "Train even when the starting model cannot close its think block or never saw traces."},
    )
    max_reward_failure_steps: int = field(
        default=5,
        metadata={"help": "Consecutive steps a reward may fail on every completion before the run stops."},
    )

    contrastive_rows: str = field(
        default="advantaged",
        metadata={"help": "Completions in GRPO's InfoNCE: 'advantaged' (advantage >= 0) or 'all'."},
    )

    sibling_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the term ranking each completion with advantage > 0 above its group's completions "
                  "with advantage < 0 against its query (the read-out then follows the chain). 0 = off."},
    )

    def __post_init__(self) -> None:
        self.rewards = normalise_rewards(self.rewards)
        if not _is_number(self.sibling_weight) or self.sibling_weight < 0:
            raise ConfigValueError(
                "sibling_weight", f"`sibling_weight` must be a finite number >= 0 (0: off), got {self.sibling_weight!r}."
            )
        if self.contrastive_rows not in ("advantaged", "all"):
            raise ConfigValueError(
                "contrastive_rows", f"`contrastive_rows` must be 'advantaged' or 'all', got {self.contrastive_rows!r}."
            )
        if self.reward_weights is not None:
            raise ConfigValueError(
                "reward_weights",
                f"`reward_weights` ({self.reward_weights!r}) is TRL's list for its own `reward_funcs`; moon-rl weights "
                "rewards through `rewards[i].weight`. Remove `reward_weights` and set the weights in `rewards`."
            )
        if isinstance(self.min_distinct_anchors, bool) or not isinstance(self.min_distinct_anchors, int):
            raise ConfigValueError(
                "min_distinct_anchors",
                f"`min_distinct_anchors` must be an int >= 1, got {self.min_distinct_anchors!r}.",
            )
        if self.min_distinct_anchors < 1:
            raise ConfigValueError(
                "min_distinct_anchors", f"`min_distinct_anchors` must be >= 1, got {self.min_distinct_anchors}."
            )
        _check_int("candidate_queue_size", self.candidate_queue_size, 0)
        _check_int("max_reward_failure_steps", self.max_reward_failure_steps, 1)
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ConfigValueError(
                "init_from",
                f"`init_from` must be a model folder path or None (the SFT stage output), got {self.init_from!r}."
            )
        super().__post_init__()


def normalise_rewards(rewards: object) -> list[dict[str, Any]]:
    """Check `rewards` entries and return them with `weight` and `args` filled in.

    Raises:
        ConfigValueError: (a `ValueError`) naming the entry, the bad value and the fix.
    """
    shape = "each entry is {name: str, weight: float = 1.0, args: dict = {}}"
    if not isinstance(rewards, list) or not rewards:
        raise ConfigValueError("rewards", f"`rewards` must be a non-empty list ({shape}), got {rewards!r}.")
    normalised = []
    for i, entry in enumerate(rewards):
        if isinstance(entry, str):
            raise ConfigValueError(
                "rewards", f"`rewards[{i}]` is the string {entry!r}; write it as {{name: {entry}}} ({shape})."
            )
        if not isinstance(entry, dict):
            raise ConfigValueError("rewards", f"`rewards[{i}]` must be a mapping ({shape}), got {entry!r}.")
        for key in entry:
            if key not in REWARD_ENTRY_KEYS:
                close = get_close_matches(str(key), REWARD_ENTRY_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigValueError(
                    "rewards",
                    f"`rewards[{i}]` has unknown key '{key}'{hint}; {shape} (reward parameters go under `args`)."
                )
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigValueError("rewards", f"`rewards[{i}].name` must be a non-empty string, got {name!r}.")
        weight = entry.get("weight", REWARD_WEIGHT_DEFAULT)
        if not _is_number(weight):
            raise ConfigValueError(
                "rewards", f"`rewards[{i}].weight` ({name}) must be a finite number, got {weight!r}."
            )
        args = entry.get("args") or {}  # absent or null: no arguments
        if not isinstance(args, dict):
            raise ConfigValueError(
                "rewards", f"`rewards[{i}].args` ({name}) must be a mapping of keyword arguments, got {args!r}."
            )
        normalised.append({"name": name, "weight": float(weight), "args": dict(args)})
    return normalised
