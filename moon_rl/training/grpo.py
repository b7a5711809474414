"""Stage 2: `MoonGRPOTrainer` — GRPO with retrieval-rank rewards plus InfoNCE on the policy's own read-outs.

Differences from TRL's `GRPOTrainer` (everything else, generation and vLLM included, is inherited unchanged):

* `_calculate_rewards`: one no-grad forward embeds every sampled completion (prompt + completion, read out at its
  last token: the end of turn, or the last sampled token of a truncated completion, which is flagged; each distinct
  prompt, vision tower included, runs once and its completions run on its KV cache: modeling/shared_prompts.py). A
  second one embeds the pairs' queries in direct mode as candidates (tokenised once per pair), gathered across
  processes. Reward functions (`moon_rl.rewards`) get `embeddings`, `candidates`, `positive_index`, `truncated` and
  `attributes` on top of TRL's keyword arguments and every dataset column.
* `_generate_and_score_completions`: the output dict also carries each row's positive (its query's embedding,
  detached) and pair id, so they follow the rows through TRL's shuffle and micro-batch split.
* `compute_loss`: GRPO loss + `contrastive_weight` x InfoNCE(read-out of each completion from the policy's own loss
  forward, captured by the backbone hooks; positive = its query embedding; negatives = the other rows' queries),
  divided by the gradient-accumulation steps as TRL does for its auxiliary loss. No second policy forward. With
  `sibling_weight`, also a term ranking each better-than-average completion above its group's worse ones against its
  query (`sibling.sibling_ranking_loss`), on the same read-outs and queries.
* heads, their optimizer, checkpoints, resume: `MoonTrainerMixin` (training/common.py). The heads are not part of
  the HF model, so the weights TRL syncs to vLLM never include them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl import GRPOTrainer

from moon_rl.data.chains import (
    AttributeVocabulary,
    attribute_vocabulary,
    chain_attribute_accuracy,
    reward_prefers_truth,
)
from moon_rl.errors import MoonError
from moon_rl.modeling.embedder import MoonEmbedder, eval_mode
from moon_rl.modeling.folder import FINAL_DIR, is_model_folder
from moon_rl.modeling.inputs import EmbedItem, PromptBatch, PromptCache, concat_prompts
from moon_rl.modeling.shared_images import ImageFeatureCache, shared_image_features
from moon_rl.modeling.shared_prompts import embed_completions, select_rows
from moon_rl.modeling.taps import backbone_of
from moon_rl.rewards import RewardEntry, build_rewards, completion_text, retrieval_rank
from moon_rl.training.candidates import CandidatePool, answer_mask
from moon_rl.training.checkpoint import check_output_dir
from moon_rl.training.common import MoonTrainerMixin, train_and_save
from moon_rl.training.config_checks import generation_batch_problems, vllm_fire_problems
from moon_rl.training.configs import MoonGRPOConfig
from moon_rl.training.grpo_data import answers_by_product, catalogue_images, grpo_dataset, lookalike_pairs
from moon_rl.training.losses import gather_ids, matryoshka_info_nce
from moon_rl.training.reward_context import ContextReward, RewardBatch
from moon_rl.training.sampling import end_generation_at_readout, importance_sampling_share
from moon_rl.training.sibling import sibling_ranking_loss

if TYPE_CHECKING:  # types only: the trainers read a Recipe's attributes; the recipe builds their configs
    from moon_rl.recipe import Recipe

logger = logging.getLogger(__name__)


class MoonGRPOTrainer(MoonTrainerMixin, GRPOTrainer):
    """TRL `GRPOTrainer` with retrieval rewards on reasoning-then-embed read-outs and a joint InfoNCE term.

    Args:
        embedder (`MoonEmbedder`): the policy (`embedder.model`, trained by TRL) and its heads.
        reward_funcs (`Sequence[RewardEntry]`): named, weighted reward functions following `moon_rl.rewards`'
            contract (`moon_rl.rewards.build_rewards` makes them from a recipe's `grpo.rewards`); TRL logs each under
            its name and sums them with their weights.
        args (`MoonGRPOConfig`): TRL's GRPO fields plus moon-rl's.
        query_item (`Callable[[int], EmbedItem]`): the query (positive) of a pair, by the dataset's `pair` column.
        related_pairs (`Callable[[int], list[int]]`, *optional*): pairs whose queries join the candidates as hard
            negatives (e.g. the same kind of query for the pair's look-alike products). Without them a small
            generation batch of random products is ranked almost perfectly and the reward stops discriminating.
        pair_products (`Sequence[str]`, *optional*): the product of each pair (by the dataset's `pair` column), so
            that another query of a completion's own product is never counted as a wrong answer. Without it each
            pair is its own product.
        pair_relevant (`Sequence[Sequence[str]]`, *optional*): every product relevant to each pair's query (a pair
            with several `positives` is one dataset row per positive, each listing them all): a query is then a right
            answer for each of them, never a wrong one. Defaults to each pair's own product.
        heads_learning_rate (`float`): learning rate of the heads' optimizer.
        product_images (`Callable[[str], list[Image]]`, *optional*): a product's images, fitted to the processor
            (`catalogue_images`), by the dataset's `product_id` column: `grpo_dataset` rows hold no images, which are
            decoded per generation batch instead of living in memory for the whole catalogue. Without it the rows
            must carry their own `images`.
        prompt_cache_bytes (`int`, *optional*): the most bytes of tokenised candidate queries kept between steps
            (the recipe's `data.prompt_cache_mb`); None keeps all.
        **kwargs: passed to `GRPOTrainer` (train_dataset, callbacks, ...).
    """

    def __init__(self, embedder: MoonEmbedder, reward_funcs: Sequence[RewardEntry], args: MoonGRPOConfig, *,
                 query_item: Callable[[int], EmbedItem], heads_learning_rate: float,
                 related_pairs: Callable[[int], list[int]] | None = None, pair_products: Sequence[str] | None = None,
                 pair_relevant: Sequence[Sequence[str]] | None = None,
                 product_images: Callable[[str], list[Any]] | None = None, prompt_cache_bytes: int | None = None,
                 **kwargs: Any):
        self._init_moon(embedder, heads_learning_rate, kwargs)
        self.query_item = query_item
        self.related_pairs = related_pairs
        self.pair_products = pair_products
        self._answers = answers_by_product(pair_products, pair_relevant)
        self.candidate_pool = CandidatePool(args.candidate_queue_size)
        self._batch: RewardBatch | None = None  # the current generation batch (rewards, then its loss steps)
        dataset = kwargs.get("train_dataset")
        self.attribute_vocabulary: AttributeVocabulary = attribute_vocabulary(
            json.loads(a or "{}") for a in dataset["attributes_json"]
        ) if dataset is not None and "attributes_json" in dataset.column_names else {}
        self.product_images = product_images
        self._query_prompts = PromptCache(embedder.processor, prompt_cache_bytes)  # every step re-ranks the same queries
        end_generation_at_readout(args, embedder.readout_id)
        wrapped = [ContextReward(entry.fn, lambda: self._batch.reward_kwargs(), entry.name, args.max_reward_failure_steps)
                   for entry in reward_funcs]
        # The weights travel with their rewards: TRL's `reward_weights` is set here, never by the user (rejected).
        args.reward_weights = [entry.weight for entry in reward_funcs]
        super().__init__(model=embedder.model, reward_funcs=wrapped, args=args, processing_class=embedder.processor,
                         **kwargs)
        self._finish_moon_init()
        # TRL's completion mask and truncation test follow `eos_token_ids`: the read-out token alone, as generation.
        self.eos_token_ids = [embedder.readout_id]

    # ------------------------------------------------------------------ rewards
    def _local_candidate_pairs(self, pairs: list[int]) -> list[int]:
        """This process's candidate pairs: its rows' pairs and their related (look-alike) pairs."""
        related = [r for p in set(pairs) for r in self.related_pairs(p)] if self.related_pairs else []
        return sorted(set(pairs) | set(related))

    def _pair_product(self, pair: int) -> str:
        return self.pair_products[pair] if self.pair_products is not None else f"pair:{pair}"

    def _answer_table(self, pairs: Sequence[int], device: torch.device) -> torch.Tensor:
        """(N, K) long: per row, the pairs whose query is a right answer for the row's product (its own pair among
        them), padded by repeating its own pair."""
        rows = [self._answers.get(self._pair_product(p), (p,)) for p in pairs]
        width = max([len(r) for r in rows] + [1])
        return torch.tensor([[*r, *[p] * (width - len(r))] for p, r in zip(pairs, rows, strict=True)],
                            dtype=torch.long, device=device).reshape(len(pairs), width)

    def _query_batch(self, pairs: Sequence[int]) -> dict[str, torch.Tensor]:
        """Direct-mode model inputs of the pairs' queries (tokenised once per pair)."""
        return self.embedder.prepare(None, prompts=concat_prompts(
            [self._query_prompts.get(pair, lambda pair=pair: self.query_item(pair)) for pair in pairs]))

    @torch.no_grad()
    def _reward_forward(self, prompts: list, completion_ids_list: list[list[int]], candidate_pairs: list[int],
                        products: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """No-grad read-outs of the completions, and direct-mode embeddings of the local candidates.

        Completions are read out at their last token, exactly the tokens (and position) of the loss forward; the
        candidate queries get their end-of-turn appended (direct mode). Two forwards, not one: in one batch the short
        queries would be padded to the completions' length (measured: one merged forward 0.38 s, two 0.31 s).
        Dropout (and LoRA dropout) is off: the reward compares chains of one product, and dropout noise was larger than
        the differences between them. Each product's prompt (`products`: per row) goes through the processor once, not
        once per completion, and both forwards run in chunks of the per-device batch, as TRL's own.
        """
        first_row: dict[str, int] = {}
        for row, product in enumerate(products):
            first_row.setdefault(product, row)
        distinct = list(first_row)  # each product once, in order of first appearance
        prompt_ids, _, fields = self._tokenize_prompts([prompts[row] for row in first_row.values()])
        # TRL tokenises without `return_tensors`: image fields may come back as numpy arrays.
        pixels, grid = fields.get("pixel_values"), fields.get("image_grid_thw")
        distinct_batch = PromptBatch([list(p) for p in prompt_ids],
                                     None if pixels is None else torch.as_tensor(np.asarray(pixels)),
                                     None if grid is None else torch.as_tensor(np.asarray(grid)))
        merge = getattr(getattr(backbone_of(self.embedder.model), "visual", None), "spatial_merge_size", None) or 1
        index = {product: i for i, product in enumerate(distinct)}
        prompt_batch = select_rows(distinct_batch, [index[product] for product in products],
                                   self.embedder.image_token_id, merge)
        chunk = self.args.per_device_train_batch_size
        # These forwards call the HF model directly, not through the FSDP wrapper: like TRL's generation, gather the
        # root unit's parameters first (the inner units gather their own). A no-op without FSDP.
        with self._dist.summon_full_params(self.model_wrapped, recurse=False), eval_mode(self.model):
            # Each prompt appears num_generations times: its forward runs once, its completions on its KV cache.
            embeddings = embed_completions(self.embedder, prompt_batch, completion_ids_list, max_rows=chunk)
            candidates = torch.cat([self.embedder(self._query_batch(candidate_pairs[start:start + chunk]))
                                    for start in range(0, len(candidate_pairs), chunk)])
        truncated = [not ids or ids[-1] not in self.eos_token_ids for ids in completion_ids_list]
        return embeddings, candidates, truncated

    @torch.no_grad()
    def _fill_queue(self, batch_size: int = 64) -> None:
        """Fill the candidate queue before the first step with the queries of random training pairs.

        A queue that filled up during training would make the first steps' rewards easier than the last ones' (fewer
        candidates), and a rising reward would then say nothing. The draw is seeded: every process queues the same.
        """
        n_pairs = len(self.train_dataset)
        chosen = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(self.args.seed))
        chosen = chosen[:self.args.candidate_queue_size].tolist()
        device = self.accelerator.device
        with self._dist.summon_full_params(self.model_wrapped, recurse=False), eval_mode(self.model):
            for start in range(0, len(chosen), batch_size):
                pairs = chosen[start:start + batch_size]
                self.candidate_pool.push(torch.tensor(pairs, device=device), self.embedder(self._query_batch(pairs)))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self.args.candidate_queue_size and not len(self.candidate_pool):
            self._fill_queue()
        pairs = [int(x["pair"]) for x in inputs]
        row_products = [self._pair_product(p) for p in pairs]
        local_pairs = self._local_candidate_pairs(pairs)
        embeddings, local_candidates, truncated = self._reward_forward(
            prompts, completion_ids_list, local_pairs, row_products)
        pool = self.candidate_pool.build(local_pairs, local_candidates)
        positive_index = pool.positions(pairs)
        device = embeddings.device
        self._batch = RewardBatch(
            embeddings=embeddings, candidates=pool.vectors, positive_index=positive_index,
            candidate_mask=pool.mask(self._answer_table(pairs, device), positive_index), truncated=truncated,
            attributes=[json.loads(x.get("attributes_json") or "{}") for x in inputs],
            pool=pool, pairs=torch.tensor(pairs, device=device),
        )
        texts = [completion_text(c) for c in completions]
        self._log_batch(self._batch, completions, texts)
        # The batch's own candidates over every process (deduplicated) against this process's: the gather at work.
        self._log_metric("retrieval/batch_candidates", float(pool.fresh))
        self._log_metric("retrieval/local_candidates", float(len(local_pairs)))
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._log_reward_judge(rewards_per_func, texts, self._batch.attributes)
        return rewards_per_func

    def _log_reward_judge(self, rewards_per_func: torch.Tensor, texts: list[str],
                          attributes: list[dict[str, str]]) -> None:
        """`reward_judge/<attribute>`: of the groups whose chains disagree on naming the product's value, the share in
        which the total reward preferred a chain that names it (data/chains.py `reward_prefers_truth`). At or below 0.5
        the reward teaches the attribute no better than a coin; `bench/reward_judge.py` measures the same offline."""
        if not self.attribute_vocabulary:
            return
        # TRL gathered the rewards over every process (groups may straddle processes): gather the chains alike.
        rows = gather_object(list(zip(texts, attributes, strict=True)))
        weights = self.reward_weights.to(rewards_per_func.device)
        totals = (rewards_per_func * weights[None, :]).nansum(dim=1)  # TRL's own sum of the weighted rewards
        judged = reward_prefers_truth([text for text, _ in rows], [attrs for _, attrs in rows], totals.tolist(),
                                      self.num_generations, self.attribute_vocabulary)
        for name, (preferred, groups) in judged.items():
            self._log_metric(f"reward_judge/{name}", preferred / groups)

    def _log_batch(self, state: RewardBatch, completions: list, texts: list[str]) -> None:
        """Per-step diagnostics of the reward signal: retrieval of the positives among the (masked) candidates, how
        different a group's chains embed, and whether sampled chains name the product's attributes."""
        reciprocal_ranks = retrieval_rank(completions, **state.reward_kwargs())
        self._log_metric("retrieval/mrr", float(np.mean(reciprocal_ranks)))
        self._log_metric("retrieval/candidates", float(state.candidates.shape[0]))
        self._log_metric("retrieval/queue", float(len(self.candidate_pool)))
        self._log_metric("completions/truncated", float(np.mean(state.truncated)))
        group = self.num_generations
        if group > 1 and len(state.embeddings) % group == 0:
            grouped = state.embeddings.view(-1, group, state.embeddings.shape[-1])
            cosine = grouped @ grouped.transpose(1, 2)
            off_diagonal = ~torch.eye(group, dtype=torch.bool, device=cosine.device)
            self._log_metric("spread/group_embedding_cosine", float(cosine[:, off_diagonal].mean()))
        if self.attribute_vocabulary:
            accuracy = chain_attribute_accuracy(texts, state.attributes, self.attribute_vocabulary)
            for name, values in accuracy.items():
                self._log_metric(f"chain/{name}", values["right"])

    def _generate_and_score_completions(self, inputs):
        if self.product_images is not None:  # decoded here, once per distinct product of the batch
            decoded: dict[str, list[Any]] = {}
            for row in inputs:
                if row["product_id"] not in decoded:
                    decoded[row["product_id"]] = self.product_images(row["product_id"])
            inputs = [{**row, "images": decoded[row["product_id"]]} for row in inputs]
        # Generation's prefill encodes each distinct product image once, and the reward forward reuses those features
        # (same weights, no gradient) instead of encoding the images again.
        with self._fsdp_autocast(), shared_image_features(self.model, ImageFeatureCache()):
            output = super()._generate_and_score_completions(inputs)
        if output.get("importance_sampling_ratio") is not None:  # vLLM sampled, TRL corrects: say what it cost
            name, share = importance_sampling_share(
                output["importance_sampling_ratio"], output["completion_mask"], self.vllm_importance_sampling_mode,
                self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max)
            # Straight into this step's metrics (TRL flushed its pending ones already), averaged over processes.
            local = torch.tensor([share], device=self.accelerator.device)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode][f"sampling/is_{name}_share"].append(float(self.accelerator.gather(local).mean()))
        # (B,) tensors: TRL shuffles and splits them into micro-batches with the other rows.
        output.update(moon_pair=self._batch.pairs)
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
        # TRL keeps the generation batch and feeds it again when num_iterations > 1: never mutate it.
        inputs = dict(inputs)
        pair_ids = inputs.pop("moon_pair")
        with self.embedder.taps.capture() as records:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.args.contrastive_weight == 0 and self.args.sibling_weight == 0:
            return loss
        embeddings = self.completion_embeddings(records, inputs)
        # `mask_truncated_completions` hides a truncated completion's tokens from the loss forward: its read-out there is
        # not the one the reward saw (read at its last token), so it leaves the InfoNCE as it leaves the policy loss.
        shown = inputs["completion_mask"].sum(1) > 0
        advantages = inputs["advantages"]
        advantages = advantages if advantages.dim() == 1 else advantages[:, 0]  # (B, T) from TRL subclasses
        if not shown.all():
            embeddings, pair_ids, advantages = embeddings[shown], pair_ids[shown], advantages[shown]
        if not len(embeddings) and self.accelerator.num_processes == 1:
            return loss  # nothing left to pull (several processes still join the InfoNCE's gathers, with no rows)
        mode = "train" if self.model.training else "eval"
        steps = self.current_gradient_accumulation_steps if mode == "train" else 1
        # One query forward for both terms; with gradient only where the InfoNCE trains the query side.
        queries = self._queries(sorted(set(pair_ids.tolist())), grad=self.args.contrastive_weight != 0)
        if self.args.contrastive_weight != 0:
            keep = slice(None)
            if self.args.contrastive_rows == "advantaged":
                # Only the completions at least as good as their group's mean: pulling a chain the reward ranks below
                # its siblings onto its query would teach the read-out to ignore what the chain says.
                keep = advantages >= 0
            term = self._contrastive(embeddings[keep], pair_ids[keep], queries)
            self._metrics[mode]["infonce"].append(float(term.global_loss))
            self._metrics[mode]["retrieval_acc"].append(float(term.accuracy))
            loss = loss + self.args.contrastive_weight * term.loss / steps
        if self.args.sibling_weight != 0:
            unique, vectors = queries
            rows = torch.tensor([unique.index(p) for p in pair_ids.tolist()], dtype=torch.long,
                                device=vectors.device)
            # Detached queries: the term moves the completions' read-outs only (the InfoNCE trains the query side).
            sibling, accuracy = sibling_ranking_loss(embeddings, vectors[rows].detach().to(embeddings.dtype), pair_ids,
                                                     advantages, temperature=self.args.contrastive_temperature)
            self._metrics[mode]["sibling/loss"].append(float(sibling.detach()))
            if accuracy is not None:
                self._metrics[mode]["sibling/accuracy"].append(accuracy)
            loss = loss + self.args.sibling_weight * sibling / steps
        return loss

    def _queries(self, unique: list[int], *, grad: bool) -> tuple[list[int], torch.Tensor]:
        """Direct-mode embeddings of the pairs `unique` (sorted): `(unique, (len(unique), d) tensor)`.

        Embedded here (with gradient when `grad`) so that GRPO trains the query side too: with the queries as fixed
        targets the backbone drifted away from them (image->product direct -35 of 480 queries at lr 1e-4). Sharded
        training (FSDP, DeepSpeed) cannot run this extra forward outside the wrapper and takes the pool's detached
        vectors.
        """
        if not unique:
            return unique, self._batch.pool.vectors.new_zeros((0, self._batch.pool.vectors.shape[-1]))
        if self.is_sharded:
            return unique, self._batch.pool.vectors[self._batch.pool.positions(unique)]
        with contextlib.nullcontext() if grad else torch.no_grad():
            return unique, self.embedder(self._query_batch(unique))

    def _contrastive(self, embeddings: torch.Tensor, pair_ids: torch.Tensor,
                     queries: tuple[list[int], torch.Tensor]):
        """Symmetric InfoNCE between the micro-batch's completions and their queries, against the whole pool.

        `queries` is `_queries`' output for a superset of these rows' pairs (embedded with gradient, except under
        sharded training). Completion -> query ranks each completion's query among the micro-batch's queries (every
        process's) and the rest of the step's pool (other queries, look-alikes, the queue: detached); query ->
        completion ranks the completions of every process's micro-batch. A completion's right answers (its product's
        queries, and those listing it among several positives) are never its negatives, nor is it theirs.
        """
        pool = self._batch.pool
        pairs = pair_ids.tolist()
        unique = sorted(set(pairs))
        known, vectors = queries
        if not unique:  # no rows here (all masked or filtered); other processes' gathers still need this one
            queries_here = embeddings.new_zeros((0, embeddings.shape[-1]))
        else:
            queries_here = vectors[torch.tensor([known.index(p) for p in unique], device=vectors.device)]
        positives = queries_here[torch.tensor([unique.index(p) for p in pairs], device=queries_here.device)]
        # Every process's micro-batch queries are in-batch candidates of the loss already (gathered, with gradient):
        # the pool keeps only the others, so that no query is counted twice.
        in_batch = gather_ids(torch.tensor(unique, dtype=torch.long, device=pool.pairs.device))
        others = ~torch.isin(pool.pairs, in_batch)
        pool_vectors = pool.vectors[others]
        negatives = pool_vectors[None].expand(len(pairs), -1, -1)
        answers = self._answer_table(pairs, pair_ids.device)
        negative_mask = answer_mask(pool.pairs[others], answers)
        # Ids are pairs: a row's "relevant" ids are the pairs answering its product (its own product's rows included).
        return matryoshka_info_nce(embeddings, positives, self.contrastive_dims,
                                   temperature=self.args.contrastive_temperature, positive_ids=pair_ids,
                                   relevant_ids=list(answers), hard_negatives=negatives if len(pool_vectors) else None,
                                   hard_negative_mask=negative_mask if len(pool_vectors) else None, symmetric=True)

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


def build_grpo_trainer(recipe: Recipe, embedder: MoonEmbedder, *, args: MoonGRPOConfig | None = None,
                       catalogue: Any = None, preflight: bool = True,
                       callbacks: Sequence[TrainerCallback] = ()) -> MoonGRPOTrainer:
    """The trainer `run_grpo` trains, for the CLI and every bench alike (rewards, candidates, images as the recipe says).

    Args:
        recipe (`Recipe`): the loaded recipe; reward files are resolved next to the file that named them.
        embedder (`MoonEmbedder`): the policy, trainable (e.g. `MoonEmbedder.load(sft_final, trainable=True)`).
        args (`MoonGRPOConfig`, *optional*): defaults to `recipe.grpo_config()`.
        catalogue (`Catalogue`, *optional*): defaults to the recipe's catalogue.
        preflight (`bool`, *optional*, defaults to `True`): sample the starting model first and refuse one that cannot
            learn (`grpo.allow_untrained_reasoning` overrides); a bench timing a random-init model turns it off.
        callbacks (`Sequence[TrainerCallback]`, *optional*): added to the trainer's.
    """
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.modeling.inputs import to_item
    from moon_rl.training.preflight import check_can_learn, reasoning_preflight
    from moon_rl.training.sft_data import sft_examples

    args = args if args is not None else recipe.grpo_config()
    catalogue = catalogue if catalogue is not None else load_recipe_catalogue(recipe.data)
    examples = sft_examples(catalogue, recipe.data.train_split, recipe.data.max_train_pairs)
    rewards = build_rewards(args.rewards, base_dir=recipe.reward_base_dir)

    def query_item(pair: int) -> EmbedItem:
        return to_item(examples[pair].anchor, catalogue.image, embedder.max_images)

    if preflight:
        # Products as records: the preflight decodes the images of the few it samples, not the catalogue's.
        products = [catalogue.products[ex.positive] for ex in examples]
        report = reasoning_preflight(embedder, products,
                                     catalogue_has_traces=any(p.reasoning for p in catalogue.products.values()),
                                     max_new_tokens=args.max_completion_length, temperature=args.temperature,
                                     make_item=lambda product: to_item(product, catalogue.image, embedder.max_images))
        check_can_learn(report, allow=args.allow_untrained_reasoning)
    return MoonGRPOTrainer(embedder, rewards, args, query_item=query_item, related_pairs=lookalike_pairs(examples),
                           pair_products=[ex.positive for ex in examples],
                           pair_relevant=[ex.relevant or (ex.positive,) for ex in examples],
                           heads_learning_rate=args.heads_learning_rate or recipe.model.heads.learning_rate,
                           product_images=catalogue_images(embedder, catalogue),
                           prompt_cache_bytes=recipe.data.prompt_cache_mb * 2**20,
                           train_dataset=grpo_dataset(embedder, catalogue, examples), callbacks=list(callbacks))


def run_grpo(recipe: Recipe, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Stage 2 of a recipe: GRPO from the SFT model; the final model, checkpoints and `log_history.json` in
    `<output_dir>/grpo`. Returns the final model's folder; `moon_rl.evaluation.report.evaluate_stage` evaluates it."""
    from moon_rl.data.catalogue import load_recipe_catalogue

    # The same rule `moon-rl recipe validate` checks, enforced before any model is loaded.
    # WORLD_SIZE: set by torchrun / accelerate launch before anything is initialised (TRL's own count is the same).
    problems = generation_batch_problems(recipe.grpo, num_processes=int(os.environ.get("WORLD_SIZE", "1")))
    if problems := problems + vllm_fire_problems(recipe.grpo, recipe.model.heads.fire.enabled):
        raise MoonError("; ".join(problems))
    args = recipe.grpo_config()
    out = Path(args.output_dir)
    check_output_dir(out, overwrite=overwrite, resume=resume)
    init = recipe.grpo_init_path(args)
    if is_model_folder(init):
        logger.info("grpo: starting from %s", init)
        embedder = MoonEmbedder.load(init, trainable=True)
    elif args.init_from is not None:
        # Asked for by name: starting from the base model instead would train the wrong model without a word.
        raise MoonError(f"grpo.init_from: {init} is not a moon-rl model folder (no moon_rl.json); point it at a saved "
                        "model (e.g. <output_dir>/sft/final) or remove it to start from this recipe's SFT output")
    else:
        logger.warning("grpo: no trained model at %s; starting from the recipe's base model", init)
        embedder = MoonEmbedder.from_recipe(recipe).train()
    embedder.meta["recipe"] = recipe.to_yaml()
    torch.manual_seed(args.seed)
    catalogue = load_recipe_catalogue(recipe.data)
    trainer = build_grpo_trainer(recipe, embedder, args=args, catalogue=catalogue)
    train_and_save(trainer, embedder, out, resume=resume)
    # The other processes wait for the saving one's model: leaving early while it still works on the open process
    # group aborted a process under torchrun ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    return out / FINAL_DIR
