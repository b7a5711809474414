"""Stage 2: `MoonGRPOTrainer` — GRPO with retrieval-rank rewards plus InfoNCE on the policy's own read-outs.

Differences from TRL's `GRPOTrainer` (everything else, generation and vLLM included, is inherited unchanged):

* `_calculate_rewards`: one no-grad forward embeds every sampled completion (prompt + completion, read out at its
  last token: the end of turn, or the last sampled token of a truncated completion, which is flagged; the vision
  tower runs once per distinct prompt image). A second one embeds the pairs' queries in direct mode as candidates
  (tokenised once per pair), gathered across processes. Reward functions (rewards/) get
  `embeddings`, `candidates`, `positive_index`, `truncated` and `attributes` on top of TRL's keyword arguments and
  every dataset column.
* `_generate_and_score_completions`: the output dict also carries each row's positive (its query's embedding,
  detached) and pair id, so they follow the rows through TRL's shuffle and micro-batch split.
* `compute_loss`: GRPO loss + `contrastive_weight` x InfoNCE(read-out of each completion from the policy's own loss
  forward, captured by the backbone hooks; positive = its query embedding; negatives = the other rows' queries),
  divided by the gradient-accumulation steps as TRL does for its auxiliary loss. No second policy forward.
* heads, their optimizer, checkpoints, resume: `MoonTrainerMixin` (training/common.py). The heads are not part of
  the HF model, so the weights TRL syncs to vLLM never include them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from trl import GRPOTrainer

from moon_rl.cache import atomic_write_text
from moon_rl.errors import MoonError
from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.modeling.inputs import EmbedItem, PromptBatch, PromptCache, assemble, concat_prompts
from moon_rl.modeling.shared_images import shared_image_features
from moon_rl.training.checkpoint import FINAL_DIR, check_output_dir
from moon_rl.training.common import MoonTrainerMixin, train_and_save, trained_embedder
from moon_rl.training.configs import MoonGRPOConfig, generation_batch_problems
from moon_rl.training.losses import gather_ids, gather_with_grad, info_nce

logger = logging.getLogger(__name__)


class ContextReward:
    """A reward function called with moon-rl's per-batch context (embeddings, candidates, ...) as extra kwargs.

    A reward that fails does not stop the run: if it raises, or returns something that is not one number (or None)
    per completion, every completion of the step gets `None`; a NaN or infinite value becomes `None` for its
    completion. TRL turns `None` into NaN and leaves it out of the step's reward (`nansum` over the reward functions,
    `nanmean` over the group), so the other rewards still score the step. The first failure of each reward is logged
    as a warning; `rewards/<name>/failures` logs the share of completions it failed to score, every step (0.0 when it
    worked, so that every process logs the same metrics). A `None` the reward returns on purpose is no failure.
    """

    def __init__(self, fn: Callable[..., list[float | None]], context: Callable[[], dict[str, Any]], name: str):
        self.fn = fn
        self.context = context
        self.__name__ = name  # TRL logs rewards under their callable's name
        self.warned = False

    def __call__(self, completions: list, **kwargs: Any) -> list[float | None]:
        n = len(completions)
        try:
            values, failed = self._finite(self.fn(completions, **{**kwargs, **self.context()}), n)
        except Exception as exc:  # a reward is user code: an error in it costs its score for the step, not the run
            self._warn(f"raised {type(exc).__name__}: {exc}", exc_info=logger.isEnabledFor(logging.DEBUG))
            values, failed = [None] * n, n
        if failed:
            self._warn(f"returned NaN or inf for {failed} of {n} completions")
        if (log_metric := kwargs.get("log_metric")) is not None:
            log_metric(f"rewards/{self.__name__}/failures", failed / max(n, 1))
        return values

    @staticmethod
    def _finite(output: Any, n: int) -> tuple[list[float | None], int]:
        """One finite float or None per completion, and how many were NaN / inf; `ValueError` on a broken contract."""
        values = list(output)
        if len(values) != n:
            raise ValueError(f"returned {len(values)} values for {n} completions (expected one per completion)")
        out: list[float | None] = []
        bad = 0
        for value in values:
            number = None if value is None else float(value)  # a string or a list raises: the output is unusable
            if number is not None and not math.isfinite(number):
                number, bad = None, bad + 1
            out.append(number)
        return out, bad

    def _warn(self, what: str, exc_info: bool = False) -> None:
        if not self.warned:
            self.warned = True
            logger.warning("reward %r %s; the step is scored without it there (warned once per reward; the share "
                           "of completions it failed on is logged as rewards/%s/failures)", self.__name__, what,
                           self.__name__, exc_info=exc_info)


class MoonGRPOTrainer(MoonTrainerMixin, GRPOTrainer):
    """TRL `GRPOTrainer` with retrieval rewards on reasoning-then-embed read-outs and a joint InfoNCE term.

    Args:
        embedder (`MoonEmbedder`): the policy (`embedder.model`, trained by TRL) and its heads.
        reward_funcs (`list[tuple[str, Callable]]`): `(name, fn)` with fn following rewards/'s contract.
        args (`MoonGRPOConfig`): TRL's GRPO fields plus moon-rl's.
        query_item (`Callable[[int], EmbedItem]`): the query (positive) of a pair, by the dataset's `pair` column.
        related_pairs (`Callable[[int], list[int]]`, *optional*): pairs whose queries join the candidates as hard
            negatives (e.g. the same kind of query for the pair's look-alike products). Without them a small
            generation batch of random products is ranked almost perfectly and the reward stops discriminating.
        heads_learning_rate (`float`): learning rate of the heads' optimizer.
        **kwargs: passed to `GRPOTrainer` (train_dataset, callbacks, ...).
    """

    def __init__(self, embedder: MoonEmbedder, reward_funcs: Sequence[tuple[str, Callable]], args: MoonGRPOConfig, *,
                 query_item: Callable[[int], EmbedItem], heads_learning_rate: float,
                 related_pairs: Callable[[int], list[int]] | None = None, **kwargs: Any):
        self._init_moon(embedder, heads_learning_rate, kwargs)
        self.query_item = query_item
        self.related_pairs = related_pairs
        self._reward_context: dict[str, Any] = {}
        self._positives: dict[str, torch.Tensor] = {}
        self._query_prompts = PromptCache(embedder.processor)  # every step re-ranks the same queries
        wrapped = [ContextReward(fn, lambda: self._reward_context, name) for name, fn in reward_funcs]
        reward_weights = [float(entry["weight"]) for entry in args.rewards]
        if len(reward_weights) == len(wrapped):
            args.reward_weights = reward_weights
        super().__init__(model=embedder.model, reward_funcs=wrapped, args=args, processing_class=embedder.processor,
                         **kwargs)
        self._finish_moon_init()

    # ------------------------------------------------------------------ rewards
    def _local_candidate_pairs(self, pairs: list[int]) -> list[int]:
        """This process's candidate pairs: its rows' pairs and their related (look-alike) pairs."""
        related = [r for p in set(pairs) for r in self.related_pairs(p)] if self.related_pairs else []
        return sorted(set(pairs) | set(related))

    @torch.no_grad()
    def _reward_forward(self, prompts: list, completion_ids_list: list[list[int]], candidate_pairs: list[int]
                        ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """No-grad read-outs of the completions, and direct-mode embeddings of the local candidates.

        Completions are read out at their last token, exactly the tokens (and position) of the loss forward; the
        candidate queries get their end-of-turn appended (direct mode). Two forwards, not one: in one batch the short
        queries would be padded to the completions' length (measured: one merged forward 0.38 s, two 0.31 s).
        """
        prompt_ids, _, fields = self._tokenize_prompts(prompts)
        # TRL tokenises without `return_tensors`: image fields may come back as numpy arrays.
        pixels, grid = fields.get("pixel_values"), fields.get("image_grid_thw")
        prompt_batch = PromptBatch([list(p) for p in prompt_ids],
                                   None if pixels is None else torch.as_tensor(np.asarray(pixels)),
                                   None if grid is None else torch.as_tensor(np.asarray(grid)))
        batch = assemble(prompt_batch, completion_ids_list, self.embedder.readout_id, self.embedder.pad_id,
                         self.embedder.image_token_id, append_readout=False)
        queries = self.embedder.prepare(None, prompts=concat_prompts(
            [self._query_prompts.get(pair, lambda pair=pair: self.query_item(pair)) for pair in candidate_pairs]))
        # These forwards call the HF model directly, not through the FSDP wrapper: like TRL's generation, gather the
        # root unit's parameters first (the inner units gather their own). A no-op without FSDP.
        with self._dist.summon_full_params(self.model_wrapped, recurse=False):
            with shared_image_features(self.embedder.model):  # each prompt image appears num_generations times
                embeddings = self.embedder(batch)
            candidates = self.embedder(queries)
        truncated = [not ids or ids[-1] not in self.eos_token_ids for ids in completion_ids_list]
        return embeddings, candidates, truncated

    @torch.no_grad()
    def _gather_candidates(self, local_pairs: list[int], local_vectors: torch.Tensor, pairs: list[int]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates of every process (a pair sampled on two processes counts once) and each row's positive."""
        device = self.accelerator.device
        ids = gather_ids(torch.tensor(local_pairs, dtype=torch.long, device=device))
        vectors = gather_with_grad(local_vectors)
        order: dict[int, int] = {}
        for row, pid in enumerate(ids.tolist()):
            order.setdefault(pid, row)
        keep = torch.tensor(sorted(order.values()), device=device)
        candidates, candidate_ids = vectors[keep], ids[keep]
        position = {pid: i for i, pid in enumerate(candidate_ids.tolist())}
        return candidates, torch.tensor([position[p] for p in pairs], device=device)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        pairs = [int(x["pair"]) for x in inputs]
        local_pairs = self._local_candidate_pairs(pairs)
        embeddings, local_candidates, truncated = self._reward_forward(prompts, completion_ids_list, local_pairs)
        candidates, positive_index = self._gather_candidates(local_pairs, local_candidates, pairs)
        scores = embeddings @ candidates.T
        ranks = 1 + (scores > scores.gather(1, positive_index[:, None])).sum(1)
        self._log_metric("retrieval/mrr", float((1.0 / ranks.float()).mean()))
        # Candidates from every process (deduplicated) against this process's own: the gather at work.
        self._log_metric("retrieval/candidates", float(len(candidates)))
        self._log_metric("retrieval/local_candidates", float(len(local_pairs)))
        self._log_metric("completions/truncated", float(np.mean(truncated)))
        self._positives = {"moon_positive": candidates[positive_index].detach(),
                           "moon_pair": torch.tensor(pairs, device=embeddings.device)}
        self._reward_context = {
            "embeddings": embeddings, "candidates": candidates, "positive_index": positive_index,
            "truncated": truncated, "attributes": [json.loads(x.get("attributes_json") or "{}") for x in inputs],
        }
        try:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self._reward_context = {}

    def _generate_and_score_completions(self, inputs):
        with self._fsdp_autocast():
            output = super()._generate_and_score_completions(inputs)
        output.update(self._positives)  # (B, ...) tensors: shuffled and split with the other rows
        return output

    def _fsdp_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for generation and the reward forward under FSDP mixed precision.

        Both call the HF model directly, not through the FSDP root: the root's own parameters (embeddings, vision patch
        embedding, merger) are then in full precision (accelerate upcasts them for FSDP mixed precision) while the
        wrapped layers compute in bf16/fp16, and a matmul would mix the two. `accelerator.autocast()` does nothing
        under FSDP, so this builds torch's own. Without FSDP or mixed precision: a no-op.
        """
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.accelerator.mixed_precision))
        if not self.is_fsdp_enabled or dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.accelerator.device.type, dtype=dtype)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positives, pair_ids = inputs.pop("moon_positive"), inputs.pop("moon_pair")
        with self.embedder.taps.capture() as records:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.args.contrastive_weight == 0:
            return loss
        embeddings = self.completion_embeddings(records, inputs)
        term = info_nce(embeddings, positives, temperature=self.args.contrastive_temperature, positive_ids=pair_ids,
                        symmetric=False)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["infonce"].append(float(term.global_loss))
        self._metrics[mode]["retrieval_acc"].append(float(term.accuracy))
        steps = self.current_gradient_accumulation_steps if mode == "train" else 1
        return loss + self.args.contrastive_weight * term.loss / steps

    def completion_embeddings(self, records: list, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings of the loss forward's rows, read out at each completion's last token."""
        width = inputs["prompt_ids"].shape[1]
        completion_mask = inputs["completion_mask"]
        rows = []
        start = 0
        for record in records:  # TRL may split the micro-batch into chunks: one record each
            n = record.last_hidden.shape[0]
            chunk_mask = completion_mask[start:start + n]
            batch = {
                "input_ids": record.input_ids,
                "attention_mask": torch.cat([inputs["prompt_mask"][start:start + n], chunk_mask], dim=1),
                "prompt_mask": torch.cat([inputs["prompt_mask"][start:start + n].bool(),
                                          torch.zeros_like(chunk_mask, dtype=torch.bool)], dim=1),
                "readout_index": width + chunk_mask.sum(1) - 1,
            }
            rows.append(self.embedder.embed_record(record, batch))
            start += n
        return torch.cat(rows)


def lookalike_pairs(examples: list) -> Callable[[int], list[int]]:
    """For a pair, the pairs with the same kind of query (text / image / product) for its hard-negative products."""

    def kind(ex: Any) -> str:
        if isinstance(ex.anchor, str):
            return "product"
        return "image" if ex.image_only else ("text" if ex.anchor.image is None else "multimodal")

    by_product: dict[tuple[str, str], int] = {}
    for i, ex in enumerate(examples):
        by_product.setdefault((ex.positive, kind(ex)), i)

    def related(pair: int) -> list[int]:
        ex = examples[pair]
        return [by_product[(neg, kind(ex))] for neg in ex.negatives if (neg, kind(ex)) in by_product]

    return related


def grpo_dataset(embedder: MoonEmbedder, catalogue: Any, examples: list) -> Dataset:
    """One row per training pair: the product prompt (TRL inserts the images), images, pair id, attributes."""
    from moon_rl.modeling.inputs import to_item

    rows = []
    for i, ex in enumerate(examples):
        product = catalogue.products[ex.positive]
        item = to_item(product, catalogue.image, embedder.max_images)
        rows.append({"prompt": [{"role": "user", "content": item.user_text()}], "images": item.images, "pair": i,
                     "product_id": product.id, "attributes_json": json.dumps(product.attributes, sort_keys=True)})
    return Dataset.from_list(rows)


def run_grpo(recipe: Any, *, resume: bool = False, overwrite: bool = False, evaluate: bool = True) -> Path:
    """Stage 2 of a recipe: GRPO from the SFT model; final model and `metrics.json` in `<output_dir>/grpo`."""
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.modeling.inputs import to_item
    from moon_rl.training.sft_data import sft_examples
    from rewards import build_rewards

    # The same rule `moon-rl recipe validate` checks, enforced before any model is loaded.
    if problems := generation_batch_problems(recipe.grpo):
        raise MoonError("; ".join(problems))
    args = recipe.grpo_config()
    out = Path(args.output_dir)
    check_output_dir(out, overwrite=overwrite, resume=resume)
    init = recipe.grpo_init_path(args)
    if (init / "moon_rl.json").is_file():
        embedder = MoonEmbedder.load(init, trainable=True)
    else:
        logger.warning("grpo: no trained model at %s; starting from the recipe's base model", init)
        embedder = MoonEmbedder.from_recipe(recipe).train()
    embedder.meta["recipe"] = recipe.to_yaml()
    torch.manual_seed(args.seed)
    catalogue = load_recipe_catalogue(recipe.data)
    examples = sft_examples(catalogue, recipe.data.train_split, recipe.data.max_train_pairs)
    base_dir = Path(recipe.files[-1]).parent if recipe.files else None
    rewards = [(getattr(fn, "__name__", "reward"), fn) for fn, _ in build_rewards(args.rewards, base_dir=base_dir)]

    def query_item(pair: int) -> EmbedItem:
        return to_item(examples[pair].anchor, catalogue.image, embedder.max_images)

    trainer = MoonGRPOTrainer(embedder, rewards, args, query_item=query_item, related_pairs=lookalike_pairs(examples),
                              heads_learning_rate=args.heads_learning_rate or recipe.model.heads.learning_rate,
                              train_dataset=grpo_dataset(embedder, catalogue, examples))
    seconds = train_and_save(trainer, embedder, out, resume=resume)
    if seconds is not None and evaluate:
        _write_metrics(recipe, trained_embedder(trainer, embedder, out), init, catalogue, out, seconds)
    return out / FINAL_DIR


def _write_metrics(recipe: Any, embedder: MoonEmbedder, init: Path, catalogue: Any, out: Path, seconds: float) -> None:
    """Test metrics after GRPO beside the model GRPO started from (and the recipe's baselines)."""
    from moon_rl.evaluation.report import evaluation_summary

    before = {"before GRPO": MoonEmbedder.load(init)} if (init / "moon_rl.json").is_file() else {}
    summary = evaluation_summary(recipe, embedder, catalogue, label="after GRPO", others=before)
    summary["train_seconds"] = round(seconds, 1)
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
