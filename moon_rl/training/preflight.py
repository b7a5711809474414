"""GRPO's preflight: can the starting model write a reasoning chain that GRPO can reward at all?

GRPO rewards each sampled `<think>...</think>` chain by how well the embedding read out after it retrieves the
product's query. A model that never closes its think block within `grpo.max_completion_length` gives only truncated
completions, so every reward measures noise; so does a model that never saw a reasoning trace (GRPO started from the
base model, or from an SFT run on a catalogue without `reasoning` traces). A user run trained like that for 240 steps
without a word. Before the trainer is built, `reasoning_preflight` samples the starting model on a few products and
`check_can_learn` stops the run (exit 2) unless `grpo.allow_untrained_reasoning` says to train anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moon_rl.data.prompts import THINK_CLOSE
from moon_rl.errors import MoonError
from moon_rl.modeling.inputs import EmbedItem
from moon_rl.training.common import global_count

logger = logging.getLogger(__name__)

#: Seed of the preflight's own sampling: the same products give the same verdict on every run and every process.
PREFLIGHT_SEED = 1234


@dataclass
class PreflightReport:
    """What `reasoning_preflight` saw.

    Args:
        closed_share (`float`): share of sampled completions that closed `</think>` and then ended their turn
            within the token budget (over all processes; `0.0` when nothing was sampled).
        sampled (`int`): completions sampled (over all processes).
        max_new_tokens (`int`): the token budget they had (`grpo.max_completion_length`).
        example (`str`): one decoded completion of this process, for the error message.
        problems (`list[str]`): why GRPO could not learn; empty when it can.
    """

    closed_share: float
    sampled: int
    max_new_tokens: int
    example: str = ""
    problems: list[str] = field(default_factory=list)


def completion_closed(text: str, ids: Sequence[int], *, eos_id: int, max_new_tokens: int) -> bool:
    """Whether one completion closed its think block and then ended its turn by itself, before the budget ran out.

    `generate_reasoning` strips the end-of-turn token (transformers backend), so a completion that ended by itself is
    shorter than `max_new_tokens`, and one that hit the budget has exactly `max_new_tokens` tokens; the vLLM backend
    may keep the end-of-turn token, which then ends the ids.
    """
    ended = (bool(ids) and ids[-1] == eos_id) or len(ids) < max_new_tokens
    return ended and THINK_CLOSE in text


def reasoning_preflight(
    embedder: Any, items: Sequence[EmbedItem], *, catalogue_has_traces: bool, max_new_tokens: int,
    temperature: float, samples: int = 16, min_closed: float = 0.5, batch_size: int = 8, seed: int = PREFLIGHT_SEED,
    make_item: Callable[[Any], EmbedItem] | None = None,
) -> PreflightReport:
    """Sample one reasoning completion for each of up to `samples` of `items` and report whether GRPO can learn.

    Sampling uses a fixed seed inside a forked RNG, so the global RNG state that training sees is unchanged, and the
    train/eval mode of every module is restored. Under `torch.distributed` every process must call it (the counts are
    summed over processes, so all of them reach the same verdict).

    Args:
        embedder (`MoonEmbedder`): the model GRPO starts from.
        items (`Sequence`): GRPO's products, as `EmbedItem`s or as records `make_item` turns into them; `samples` of
            them, evenly spaced, are sampled.
        catalogue_has_traces (`bool`): whether any catalogue product has a `reasoning` trace.
        max_new_tokens (`int`): the completion budget, `grpo.max_completion_length`.
        temperature (`float`): GRPO's sampling temperature.
        samples (`int`, *optional*, defaults to `16`): how many products to sample.
        min_closed (`float`, *optional*, defaults to `0.5`): the share of closed completions below which GRPO would
            mostly reward truncated chains.
        batch_size (`int`, *optional*, defaults to `8`): products per `generate` call.
        seed (`int`, *optional*): the sampling seed.
        make_item (`Callable`, *optional*): record -> `EmbedItem`, called on the sampled records only (a catalogue's
            images are decoded for those, not for every product).
    """
    step = max(1, len(items) // max(1, samples))
    chosen = list(items[::step][:samples])
    if make_item is not None:
        chosen = [make_item(record) for record in chosen]
    ids = _sample(embedder, chosen, max_new_tokens=max_new_tokens, temperature=temperature,
                  batch_size=batch_size, seed=seed)
    texts = embedder.processor.tokenizer.batch_decode(ids, skip_special_tokens=False)
    closed = [completion_closed(t, c, eos_id=embedder.readout_id, max_new_tokens=max_new_tokens)
              for t, c in zip(texts, ids, strict=True)]
    device = embedder.device
    n_closed, n_sampled = global_count(sum(closed), device), global_count(len(closed), device)
    example = next((t for t, ok in zip(texts, closed, strict=True) if not ok), texts[0] if texts else "")
    report = PreflightReport(closed_share=n_closed / n_sampled if n_sampled else 0.0, sampled=n_sampled,
                             max_new_tokens=max_new_tokens, example=example)
    if n_sampled and report.closed_share < min_closed:
        report.problems.append(f"{n_sampled - n_closed} of {n_sampled} sampled completions never close {THINK_CLOSE} "
                               f"within grpo.max_completion_length={max_new_tokens} tokens")
    if not catalogue_has_traces and embedder.meta.get("reasoning_trained") is not True:
        report.problems.append("the catalogue has no reasoning traces and the starting model was not SFT-trained on "
                               "traces")
    return report


def check_can_learn(report: PreflightReport, allow: bool) -> None:
    """Stop GRPO with one line saying what is wrong and what to do, or (with `allow`) log it as a warning.

    Raises:
        `MoonError`: when `report` has problems and `allow` is False.
    """
    if not report.problems:
        logger.info("grpo preflight: %d of %d sampled completions close their think block",
                    round(report.closed_share * report.sampled), report.sampled)
        return
    what = "; ".join(report.problems)
    example = report.example[:80] + ("..." if len(report.example) > 80 else "")
    if allow:
        logger.warning("grpo.allow_untrained_reasoning is true, training anyway although GRPO can hardly learn: %s "
                       "(e.g. %r)", what, example)
        return
    raise MoonError(
        f"GRPO cannot learn from this starting model: {what} (e.g. {example!r}). Train it with `moon-rl sft` on a "
        "catalogue whose products have `reasoning` traces (`moon-rl annotate RECIPE --template` or `--teacher MODEL` "
        "writes a copy of yours that has them), longer if it was (more `sft.max_steps`: its completions must learn to "
        "close the think block), raise `grpo.max_completion_length`, or set `grpo.allow_untrained_reasoning: true` to "
        "train anyway"
    )


def _sample(embedder: Any, items: list[EmbedItem], *, max_new_tokens: int, temperature: float, batch_size: int,
            seed: int) -> list[list[int]]:
    """Sampled completion ids for `items`, leaving the global RNG state and every module's train/eval mode as found."""
    modes = {module: module.training for module in embedder.modules()}
    device = embedder.device
    # Fork the CUDA generator of the model's device too: sampling there draws from it, not from the CPU one.
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            # Not `torch.manual_seed`: it would also (lazily) seed every CUDA device, outside the fork.
            torch.random.default_generator.manual_seed(seed)
            for index in cuda_devices:
                torch.cuda.default_generators[index].manual_seed(seed)
            return [ids for start in range(0, len(items), batch_size)
                    for ids in embedder.generate_reasoning(items[start:start + batch_size], do_sample=True,
                                                           temperature=temperature, max_new_tokens=max_new_tokens)]
    finally:
        for module, training in modes.items():
            module.train(training)
