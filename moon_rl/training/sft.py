"""Stage 1: `MoonSFTTrainer` — LM loss on the reasoning trace + InfoNCE, both embedding modes in one space.

Differences from TRL's `SFTTrainer` (everything else is inherited unchanged):

* `compute_loss`: the collator (training/sft_data.py) packs, per pair, the product with its `<think>` trace, the anchor
  (a text query or another photo, direct mode), the product in direct mode and its hard negatives into ONE batch. TRL's
  own fused-LM-head forward gives the LM loss on the traces; the backbone hooks (modeling/taps.py) give every row's
  read-out from that same forward. Added: `contrastive_weight * (InfoNCE(anchor, reason-mode product)
  + direct_contrastive_weight * InfoNCE(anchor, direct product, hard negatives))`, image-only anchors weighted by
  `image_contrastive_weight`, divided by the gradient-accumulation steps as TRL does for its auxiliary loss.
  With `value_token_weight`, plus that weight x the mean negative log-likelihood of the trace tokens that name an
  attribute value, scored from the same forward's last hidden states.
* `training_step`, with `contrastive_chunk_size` only: GradCache (training/grad_cache.py). The collator hands over
  the rows of each chunk; every chunk is collated and embedded without a graph, the contrastive loss and its gradient
  with respect to each embedding are taken over the whole batch, then each chunk runs again with gradient (same
  random state) and back-propagates its LM loss plus the cached embedding gradients. Same gradients, one chunk's
  memory.
* heads, their optimizer, checkpoints and resume: `MoonTrainerMixin` (training/common.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTTrainer

from moon_rl.data.catalogue import Catalogue
from moon_rl.data.prompts import THINK_CLOSE
from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.modeling.folder import FINAL_DIR
from moon_rl.training.checkpoint import check_output_dir
from moon_rl.training.common import MoonTrainerMixin, global_count, train_and_save
from moon_rl.training.configs import ConfigValueError, MoonSFTConfig
from moon_rl.training.grad_cache import RngState, embedding_gradients
from moon_rl.training.losses import matryoshka_info_nce
from moon_rl.training.sft_data import (
    MoonSFTCollator,
    NoiseEpoch,
    layout_blocks,
    merge_chunk_embeddings,
    sft_examples,
)

if TYPE_CHECKING:  # types only: the trainers read a Recipe's attributes; the recipe builds their configs
    from moon_rl.recipe import Recipe

logger = logging.getLogger(__name__)


class MoonSFTTrainer(MoonTrainerMixin, SFTTrainer):
    """TRL `SFTTrainer` whose loss adds MOON3.0's contrastive term on read-outs of the policy's own forward.

    Args:
        embedder (`MoonEmbedder`): backbone (trained by TRL as `model`) + heads (trained by their own optimizer).
        args (`MoonSFTConfig`): TRL's SFT fields plus the contrastive ones.
        heads_learning_rate (`float`): learning rate of the heads' optimizer.
        **kwargs: passed to `SFTTrainer` (train_dataset, data_collator, callbacks, ...).
    """

    def __init__(self, embedder: MoonEmbedder, args: MoonSFTConfig, *, heads_learning_rate: float, **kwargs: Any):
        self._init_moon(embedder, heads_learning_rate, kwargs)
        super().__init__(model=embedder.model, args=args, processing_class=embedder.processor, **kwargs)
        self._finish_moon_init()
        if args.contrastive_chunk_size and self.is_deepspeed_enabled:
            # DeepSpeed's engine steps inside `backward`: several backward passes per step would step it several times.
            raise ConfigValueError("contrastive_chunk_size", "`contrastive_chunk_size` (GradCache) runs one backward "
                                   "pass per chunk, which DeepSpeed does not allow; use DDP or FSDP, or unset it.")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "moon_chunks" in inputs:  # a GradCache batch outside training (training runs it in `training_step`)
            return self._chunked_loss(model, inputs["moon_chunks"], num_items_in_batch, backward=False)
        lm_loss, embeddings, hidden, layout = self._forward_with_readouts(model, inputs, num_items_in_batch)
        contrastive, metrics = self._contrastive_loss(embeddings, layout)
        mode = "train" if self.model.training else "eval"
        metrics = {"lm_loss": float(lm_loss.detach()), **metrics}
        # As TRL does for its auxiliary loss: with `num_items_in_batch` the Trainer leaves accumulation to the loss.
        steps = self.current_gradient_accumulation_steps if (num_items_in_batch is not None and mode == "train") else 1
        loss = lm_loss + self.args.contrastive_weight * contrastive / steps
        if self.args.value_token_weight:
            value_loss = self._value_token_loss(hidden, inputs["input_ids"], layout["value_mask"])
            metrics["lm_loss/values"] = float(value_loss.detach())
            loss = loss + self.args.value_token_weight * value_loss / steps
        self._log_process_means(mode, metrics)
        return loss

    def _log_process_means(self, mode: str, metrics: dict[str, float]) -> None:
        """Log this step's metrics as their mean over processes, as TRL logs its own: each process's LM loss and
        InfoNCE cover its own rows (the LM loss divided by the global token count and scaled by the process count), so
        the mean is what one process holding the whole batch logs. A metric a process did not measure (no anchor of
        that kind in its rows) is averaged over the processes that did; objects, since the keys may differ."""
        found = gather_object([metrics]) if self.accelerator.num_processes > 1 else [metrics]
        for name in dict.fromkeys(key for measured in found for key in measured):
            values = [measured[name] for measured in found if name in measured]
            self._metrics[mode][name].append(sum(values) / len(values))

    def _forward_with_readouts(self, model, inputs: dict[str, Any], num_items_in_batch: Any
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """TRL's LM loss of one batch, every row's embedding and last hidden states (one forward), and the layout."""
        inputs = dict(inputs)
        layout = inputs.pop("moon")
        with self.embedder.taps.capture() as records:
            lm_loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], **layout}
        return lm_loss, self.embedder.embed_record(records[-1], batch), records[-1].last_hidden, layout

    def training_step(self, model, inputs, num_items_in_batch=None):
        if "moon_chunks" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        # What `Trainer.training_step` does around the loss; the backward passes are the chunks' own.
        with self.maybe_activation_offload_context:
            model.train()
            if callable(getattr(self.optimizer, "train", None)):
                self.optimizer.train()
            return self._chunked_loss(model, inputs["moon_chunks"], num_items_in_batch, backward=True)

    def _chunk_batch(self, rows: list[int]) -> dict[str, Any]:
        """A GradCache chunk's batch, on the device: collated when it runs, so memory holds one chunk's images."""
        return self._prepare_inputs(self.data_collator.collate(rows))

    def _chunk_embeddings(self, model, chunk: dict[str, Any]) -> torch.Tensor:
        """A chunk's embeddings from a forward without LM loss (the caller turns gradients off)."""
        model_inputs = {k: v for k, v in chunk.items() if k not in ("moon", "labels")}
        with self.embedder.taps.capture() as records:
            # Through the wrapped model (DDP/FSDP gather their parameters there); one logit row, not the full logits.
            model(**model_inputs, use_cache=False, logits_to_keep=1)
        batch = {"input_ids": chunk["input_ids"], "attention_mask": chunk["attention_mask"], **chunk["moon"]}
        return self.embedder.embed_record(records[-1], batch)

    def _chunked_loss(self, model, chunks: list[list[int]], num_items_in_batch: Any, *, backward: bool
                      ) -> torch.Tensor:
        """`compute_loss` of the batch the chunks' rows make up, run GradCache's way (training/grad_cache.py).

        Each chunk is collated and run twice (without, then with gradient); only one chunk's inputs and activations
        are held at a time. With `backward`, back-propagates each chunk's share as it goes and returns the detached
        loss, scaled for gradient accumulation as `Trainer.training_step` would have scaled `compute_loss`'s. A
        GradCache batch holds no `labels` for the Trainer to count, so `num_items_in_batch` is None in training and
        the LM loss is the batch's mean over its trace tokens (TRL's loss without `num_items_in_batch`).
        """
        mode = "train" if self.model.training else "eval"
        scaled = num_items_in_batch is not None and mode == "train"  # the Trainer leaves accumulation to the loss
        steps = self.current_gradient_accumulation_steps if scaled else 1
        accumulation = self.current_gradient_accumulation_steps if (backward and not scaled) else 1
        cfg = self.args
        # 1. Every chunk's embeddings without an autograd graph, from a random state the second forward replays.
        states, cached, layouts, label_counts, value_counts = [], [], [], [], []
        with torch.no_grad(), self.compute_loss_context_manager():
            for rows in chunks:
                chunk = self._chunk_batch(rows)
                states.append(RngState.capture(chunk["input_ids"].device))
                cached.append(self._chunk_embeddings(model, chunk))
                layouts.append(chunk["moon"])
                label_counts.append(int(chunk["labels"][..., 1:].ne(-100).sum()))
                value_counts.append(int(chunk["moon"]["value_mask"].sum()))
                del chunk
        # 2. The contrastive loss over the whole batch, and its gradient with respect to each chunk's embeddings.
        metrics: dict[str, float] = {}

        def contrastive_of(leaves: list[torch.Tensor]) -> torch.Tensor:
            embeddings, layout = merge_chunk_embeddings(leaves, layouts)
            with self.compute_loss_context_manager():
                loss, found = self._contrastive_loss(embeddings, layout)
            metrics.update(found)
            return cfg.contrastive_weight * loss / steps

        contrastive, grads = embedding_gradients(contrastive_of, cached)
        # 3. Each chunk again, with gradient: its LM loss plus the cached gradients through its embeddings.
        lm_total = value_total = contrastive.new_zeros(())
        for index, (rows, state, grad) in enumerate(zip(chunks, states, grads, strict=True)):
            last = index == len(chunks) - 1
            sync = self.accelerator.no_sync(model) if backward and not last else contextlib.nullcontext()
            chunk = self._chunk_batch(rows)
            with state.replay(), sync, torch.set_grad_enabled(backward), self.compute_loss_context_manager():
                lm_loss, embeddings, hidden, layout = self._forward_with_readouts(model, chunk, num_items_in_batch)
                if num_items_in_batch is None:  # TRL's loss is then the chunk's mean: weigh it by its tokens
                    lm_loss = lm_loss * label_counts[index] / max(sum(label_counts), 1)
                piece = lm_loss + (embeddings * grad.to(embeddings.dtype)).sum()
                if cfg.value_token_weight:
                    value_loss = self._value_token_loss(hidden, chunk["input_ids"], layout["value_mask"])
                    value_loss = value_loss * value_counts[index] / max(sum(value_counts), 1)
                    value_total = value_total + value_loss.detach()
                    piece = piece + cfg.value_token_weight * value_loss / steps
                if backward:
                    self.accelerator.backward(piece / accumulation)
            lm_total = lm_total + lm_loss.detach()
            del chunk, piece, embeddings, hidden
        metrics = {"lm_loss": float(lm_total), **metrics}
        if cfg.value_token_weight:
            metrics["lm_loss/values"] = float(value_total)
        metrics["grad_cache/chunks"] = float(len(chunks))
        self._log_process_means(mode, metrics)
        loss = lm_total + contrastive + cfg.value_token_weight * value_total / steps
        return loss / accumulation

    def _value_token_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, value_mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of the trace tokens that name an attribute value (zero when there are none).

        Scored from the last hidden states the hooks captured in TRL's own forward (the position before each value
        token predicts it), through the LM head on those few positions only: no second forward, no full logits.
        """
        rows, cols = value_mask.to(hidden.device).nonzero(as_tuple=True)
        if len(rows) == 0:
            return hidden.sum() * 0.0  # connected to the graph, so every process runs the same backward
        head = self.embedder.model.get_output_embeddings()
        logits = head(hidden[rows, cols - 1].to(head.weight.dtype)).float()
        return torch.nn.functional.cross_entropy(logits, input_ids.to(hidden.device)[rows, cols])

    def _contrastive_loss(self, embeddings: torch.Tensor, layout: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        n, k = int(layout["n_pairs"]), int(layout["hard_negatives"])
        reason, anchor, direct, negatives, chains = layout_blocks(embeddings, layout)
        negatives = negatives.view(n, k, -1) if k else None
        # The product with a chain altered in one attribute value: a hard negative of the reason-mode term.
        chain_mask = layout["chain_negative_mask"].to(embeddings.device)
        chain_negatives = chains.view(n, 1, -1) if len(chain_mask) else None
        image_only = layout["image_only"].to(embeddings.device)
        ids, relevant = layout["positive_ids"], layout.get("relevant_ids")
        dims = self.contrastive_dims  # the full size alone unless Matryoshka is on
        cfg = self.args
        total = embeddings.new_zeros(())
        metrics: dict[str, float] = {"pairs/global": 0.0}
        for subset, weight, tag in ((~image_only, 1.0, "text"), (image_only, cfg.image_contrastive_weight, "image")):
            rows = subset.nonzero().flatten()
            global_rows = global_count(len(rows), embeddings.device)
            # In-batch negatives come from every process: the candidates of each row are the global subset.
            metrics["pairs/global"] += global_rows
            if global_rows == 0 or weight == 0:
                continue
            sub_ids = [ids[i] for i in rows.tolist()]
            sub_relevant = None if relevant is None else [relevant[i] for i in rows.tolist()]
            reason_term = matryoshka_info_nce(
                anchor[rows], reason[rows], dims, temperature=cfg.contrastive_temperature, positive_ids=sub_ids,
                relevant_ids=sub_relevant, hard_negatives=None if chain_negatives is None else chain_negatives[rows],
                hard_negative_mask=None if chain_negatives is None else chain_mask[rows, None],
            )
            direct_term = matryoshka_info_nce(
                anchor[rows], direct[rows], dims, temperature=cfg.contrastive_temperature, positive_ids=sub_ids,
                relevant_ids=sub_relevant, hard_negatives=None if negatives is None else negatives[rows],
                hard_negative_mask=None if negatives is None else layout["negative_mask"].to(rows.device)[rows],
            )
            total = total + weight * (reason_term.loss + cfg.direct_contrastive_weight * direct_term.loss)
            metrics[f"infonce/{tag}_reason"] = float(reason_term.global_loss)
            metrics[f"infonce/{tag}_direct"] = float(direct_term.global_loss)
            metrics[f"retrieval_acc/{tag}_reason"] = float(reason_term.accuracy)
            metrics[f"retrieval_acc/{tag}_direct"] = float(direct_term.accuracy)
        metrics["infonce"] = float(total.detach())
        return total, metrics


def build_sft_trainer(recipe: Recipe, *, args: MoonSFTConfig | None = None, embedder: MoonEmbedder | None = None,
                      catalogue: Catalogue | None = None, callbacks: Sequence[TrainerCallback] = ()) -> MoonSFTTrainer:
    """The trainer `run_sft` trains, for the CLI and every bench alike (collator, dataset and heads as the recipe says).

    Args:
        recipe (`Recipe`): the loaded recipe.
        args (`MoonSFTConfig`, *optional*): defaults to `recipe.sft_config()` (a bench may pass its own output folder).
        embedder (`MoonEmbedder`, *optional*): defaults to `MoonEmbedder.from_recipe(recipe)`.
        catalogue (`Catalogue`, *optional*): defaults to the recipe's catalogue.
        callbacks (`Sequence[TrainerCallback]`, *optional*): added to the trainer's (e.g. a bench's timers).

    Returns:
        `MoonSFTTrainer`: the embedder it trains is `.embedder`.
    """
    from moon_rl.data.catalogue import load_recipe_catalogue

    args = args if args is not None else recipe.sft_config()
    # The collator hands TRL ready tensors and the extra "moon" layout; TRL must neither tokenise nor drop columns.
    args.remove_unused_columns = False
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    catalogue = catalogue if catalogue is not None else load_recipe_catalogue(recipe.data)
    examples = sft_examples(catalogue, recipe.data.train_split, recipe.data.max_train_pairs)
    without_trace = sum(1 for ex in examples if not (args.reasoning and catalogue.products[ex.positive].reasoning))
    logger.info("SFT on %d pairs (%d image-only anchors)", len(examples), sum(ex.image_only for ex in examples))
    if without_trace:
        logger.warning("%d of %d SFT pairs have no reasoning trace and train on the contrastive term only",
                       without_trace, len(examples))
    if args.reasoning and examples and without_trace == len(examples):
        logger.warning("%s", untraced_catalogue_advice(catalogue))
    embedder = embedder if embedder is not None else MoonEmbedder.from_recipe(recipe)
    # Saved in moon_rl.json: GRPO's preflight refuses to start from a model that never learnt to write a trace.
    embedder.meta["reasoning_trained"] = bool(args.reasoning) and any(
        catalogue.products[ex.positive].reasoning for ex in examples)
    collator = MoonSFTCollator(embedder, catalogue, examples, args.hard_negatives, args.trace_noise, args.reasoning,
                               seed=args.seed, chain_negatives=args.chain_negatives,
                               chain_negative_attributes=args.chain_negative_attributes,
                               value_token_weight=args.value_token_weight, photo_traces=args.photo_traces,
                               prompt_cache_bytes=recipe.data.prompt_cache_mb * 2**20,
                               chunk_size=args.contrastive_chunk_size)
    return MoonSFTTrainer(
        embedder, args, heads_learning_rate=args.heads_learning_rate or recipe.model.heads.learning_rate,
        train_dataset=Dataset.from_dict({"pair": collator.dataset_rows()}), data_collator=collator,
        callbacks=[NoiseEpoch(collator), *callbacks],
    )


def untraced_catalogue_advice(catalogue: Catalogue) -> str:
    """What to tell a user whose catalogue has no reasoning traces: reason mode will not learn, and how to annotate."""
    has_values = any(product.category or product.attributes for product in catalogue.products.values())
    how = ("its products have categories or attributes: `moon-rl annotate RECIPE --template` writes traces from them "
           "in seconds" if has_values else
           "its products have no categories or attributes either: `moon-rl annotate RECIPE --teacher MODEL` has a "
           "vision-language model write them")
    return ("the catalogue has no reasoning traces, so reason mode will not be trained (its chains will not close "
            f"{THINK_CLOSE} and GRPO cannot start from this model); {how}, then train with "
            "--set data.catalogue=<the annotated folder>")


def run_sft(recipe: Recipe, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Stage 1 of a recipe: SFT + InfoNCE; the final model, checkpoints and `log_history.json` in `<output_dir>/sft`.

    Returns the folder of the trained model (`<output_dir>/sft/final`). Its test metrics are the evaluation layer's
    (`moon_rl.evaluation.report.evaluate_stage`, which `moon-rl sft` calls).
    """
    from moon_rl.data.catalogue import load_recipe_catalogue

    args = recipe.sft_config()
    out = Path(args.output_dir)
    check_output_dir(out, overwrite=overwrite, resume=resume)
    torch.manual_seed(args.seed)
    catalogue = load_recipe_catalogue(recipe.data)
    trainer = build_sft_trainer(recipe, args=args, catalogue=catalogue)
    train_and_save(trainer, trainer.embedder, out, resume=resume)
    # The other processes wait for the saving one's model: leaving early while it still works on the open process
    # group aborted a process under torchrun ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    return out / FINAL_DIR
