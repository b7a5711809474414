"""SFT batches: every view of a pair in ONE model forward, so the policy's own forward yields all embeddings.

A row of the SFT dataset is one training pair (anchor -> product). The collator lays out, in one padded batch:

    [ product + "<think>trace</think>" | anchor (direct) | product (direct) | hard negatives (direct)
      | product + "<think>altered trace</think>" (chain negatives, optional)
      | product photo alone + "<think>trace</think>" (photo traces, optional) ]
      ^ LM loss on the trace; its read-out is the reason-mode product embedding

A photo-trace row has LM targets on the trace except the attribute values the product's text names (a photo cannot
show a brand): the image-only values (pattern, colour) must then be read from pixels, not recalled from the title.
With `value_token_weight`, `moon.value_mask` marks the LM targets that are attribute values, for the trainer's extra
loss on them.

One forward (through the DDP-wrapped model, so gradient sync is exact) gives the LM loss and, via the backbone hooks,
the read-out of every row. Products without a `reasoning` trace get no LM targets: their first row is the direct
prompt, trained by the contrastive term only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from moon_rl.data.catalogue import Catalogue
from moon_rl.data.chains import AttributeVocabulary, attribute_vocabulary, named_values, replace_value, value_spans
from moon_rl.data.prompts import format_reasoning
from moon_rl.data.records import Pair, Query
from moon_rl.errors import DataError
from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.modeling.inputs import EmbedItem, PromptBatch, PromptCache, concat_prompts, product_text, to_item

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTExample:
    """One training pair, resolved: anchor item kind and the product ids involved (a pair with several `positives`
    gives one example per positive)."""

    pair_index: int
    anchor: str | Query
    positive: str
    negatives: tuple[str, ...]
    #: Every positive of the pair (this one included): none of them is a negative of this example's anchor.
    relevant: tuple[str, ...] = ()

    @property
    def image_only(self) -> bool:
        return isinstance(self.anchor, Query) and not self.anchor.text


def sft_examples(catalogue: Catalogue, split: str, max_pairs: int | None = None) -> list[SFTExample]:
    """The split's pairs as examples (in file order, truncated to `max_pairs` pairs): one per positive of a pair."""
    pairs: list[Pair] = catalogue.pairs.get(split, [])
    if not pairs:
        raise DataError(f"catalogue {catalogue.base_dir}: split {split!r} has no pairs to train on "
                        f"(splits with pairs: {', '.join(catalogue.splits) or 'none'})")
    return [SFTExample(i, p.anchor, positive, tuple(p.negatives), tuple(p.positive_ids))
            for i, p in enumerate(pairs[:max_pairs] if max_pairs else pairs) for positive in p.positive_ids]


class MoonSFTCollator:
    """Turns a list of `{"pair": index}` rows into one model batch plus the layout `MoonSFTTrainer` reads back.

    Args:
        embedder (`MoonEmbedder`): for the processor, prompt layout and read-out token.
        catalogue (`Catalogue`): products and images.
        examples (`list[SFTExample]`): indexed by the dataset's `pair` column.
        hard_negatives (`int`): direct-mode hard negatives per pair (missing ones are masked).
        trace_noise (`float`): fraction of trace tokens replaced by tokens of other traces, without LM targets.
        reasoning (`bool`): False ignores the traces (direct-mode contrastive training only).
        seed (`int`): seeds the noise, with the dataset row and the epoch (`set_epoch`, called by `NoiseEpoch`).
        chain_negatives (`bool`): one more row per pair, the product with its trace altered in one attribute value
            (reason mode, no LM target), for the reason-mode InfoNCE term's hard negative.
        chain_negative_attributes (`list[str]`, *optional*): the attributes that alteration may change; None: any.
        value_token_weight (`float`): when non-zero, the batch's `moon.value_mask` marks the LM targets that are
            attribute values the trace names (for the trainer's extra loss on them); all False otherwise.
        photo_traces (`bool`): one more row per pair whose product has a trace and a photo: the photo alone, then the
            trace (see the module docstring).
        prompt_cache_bytes (`int`, *optional*): the most bytes of tokenised prompts kept between batches (the
            recipe's `data.prompt_cache_mb`); None keeps all.
        chunk_size (`int`, *optional*): GradCache (`sft.contrastive_chunk_size`): a batch of more pairs than this
            becomes `{"moon_chunks": [[row, ...], ...]}`, the dataset rows of each chunk of at most `chunk_size`
            pairs, uncollated: the trainer collates a chunk (`collate`, laid out as above) when it runs it, so that
            memory holds one chunk's images, not the batch's. `merge_chunk_embeddings` puts the chunks' embeddings
            back in the layout of one batch.
    """

    def __init__(self, embedder: MoonEmbedder, catalogue: Catalogue, examples: list[SFTExample], hard_negatives: int,
                 trace_noise: float = 0.0, reasoning: bool = True, seed: int = 0, chain_negatives: bool = False,
                 value_token_weight: float = 0.0, photo_traces: bool = False, prompt_cache_bytes: int | None = None,
                 chunk_size: int | None = None, chain_negative_attributes: list[str] | None = None):
        self.embedder = embedder
        self.chunk_size = chunk_size
        self.catalogue = catalogue
        self.examples = examples
        self.hard_negatives = hard_negatives
        self.trace_noise = trace_noise
        self.reasoning = reasoning
        self.seed = seed
        self.chain_negatives = chain_negatives and reasoning
        self.chain_negative_attributes = None if chain_negative_attributes is None else set(chain_negative_attributes)
        if self.chain_negatives and self.chain_negative_attributes is not None:
            known = {name for product in catalogue.products.values() for name in product.attributes}
            if unknown := sorted(self.chain_negative_attributes - known):
                raise DataError(f"sft.chain_negative_attributes names {unknown}, which no product of the catalogue "
                                f"has (its attributes: {sorted(known)})")
        self.value_token_weight = value_token_weight
        self.photo_traces = photo_traces and reasoning
        self.multi_positive = any(len(ex.relevant) > 1 for ex in examples)
        self._value_masks: dict[str, tuple[list[bool], list[bool]]] = {}
        self._vocabulary: AttributeVocabulary | None = None
        self.epoch = 0
        self._noise_vocab: torch.Tensor | None = None
        self._trace_ids: dict[str, list[int]] = {}
        # Every product and anchor recurs once per epoch: kept tokenised, up to the recipe's size.
        self._prompts = PromptCache(embedder.processor, prompt_cache_bytes)

    def _product_prompt(self, product_id: str) -> PromptBatch:
        return self._prompts.get(("product", product_id), lambda: to_item(
            self.catalogue.products[product_id], self.catalogue.image, self.embedder.max_images))

    def _anchor_prompt(self, example: SFTExample) -> PromptBatch:
        if isinstance(example.anchor, str):
            return self._product_prompt(example.anchor)
        return self._prompts.get(("anchor", example.pair_index), lambda: to_item(
            example.anchor, self.catalogue.image, self.embedder.max_images))

    def _trace(self, product_id: str) -> list[int]:
        if product_id not in self._trace_ids:
            trace = self.catalogue.products[product_id].reasoning if self.reasoning else None
            self._trace_ids[product_id] = self.embedder.tokenize_reasoning([trace])[0]
        return self._trace_ids[product_id]

    def _noise_tokens(self) -> torch.Tensor:
        """Token ids that noise may insert: every token of every training trace except the `<think>` markers."""
        if self._noise_vocab is None:
            ids: set[int] = set()
            for ex in self.examples:
                ids.update(self._trace(ex.positive)[1:-1])  # drop <think> ... </think>
            self._noise_vocab = torch.tensor(sorted(ids) or [self.embedder.pad_id])
        return self._noise_vocab

    def _generator(self, row: int, stream: int) -> torch.Generator:
        """Draws that depend on (seed, epoch, dataset row, stream) only: see `_noisy`."""
        key = ((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + row) * 7 + stream
        return torch.Generator().manual_seed(key % 2**63)

    @property
    def vocabulary(self) -> AttributeVocabulary:
        """Every value each attribute takes over the catalogue's products (built on first use)."""
        if self._vocabulary is None:
            self._vocabulary = attribute_vocabulary(p.attributes for p in self.catalogue.products.values())
        return self._vocabulary

    def _value_tokens(self, product_id: str) -> tuple[list[bool], list[bool]]:
        """Per token of the product's trace (as `_trace` gives them): does it belong to an attribute value the trace
        names, and to one that the product's own text names too (a value its photo alone need not show)."""
        if product_id not in self._value_masks:
            product = self.catalogue.products[product_id]
            trace = product.reasoning if self.reasoning else None
            ids = self._trace(product_id)
            values, in_text = [False] * len(ids), [False] * len(ids)
            if trace:
                text = format_reasoning(trace)
                encoded = self.embedder.processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                if list(encoded["input_ids"]) == list(ids):
                    written = {v for found in named_values(product_text(product), self.vocabulary).values() for v in found}
                    spans = value_spans(text, self.vocabulary)
                    for i, (start, end) in enumerate(encoded["offset_mapping"]):
                        hits = [text[a:b].lower() for a, b in spans if a < end and start < b]
                        values[i], in_text[i] = bool(hits), any(h in written for h in hits)
            self._value_masks[product_id] = (values, in_text)
        return self._value_masks[product_id]

    def _photo_prompt(self, product_id: str) -> PromptBatch:
        """The product's photos alone, as a product prompt without its text."""
        def make() -> EmbedItem:
            item = to_item(self.catalogue.products[product_id], self.catalogue.image, self.embedder.max_images)
            return EmbedItem(images=item.images, kind="product", id=item.id)

        return self._prompts.get(("photo", product_id), make)

    def _altered_trace(self, product_id: str, row: int) -> list[int]:
        """The product's trace with one attribute value it names replaced by another value of that attribute (as
        token ids), or [] when the trace names none that has an alternative."""
        product = self.catalogue.products[product_id]
        trace = product.reasoning if self.reasoning else None
        if not trace or not product.attributes:
            return []
        named = named_values(trace, self.vocabulary)
        truth = {name: str(value).strip().lower() for name, value in product.attributes.items()}
        options = sorted(name for name, values in named.items()
                         if truth.get(name) in values and len(self.vocabulary[name]) > 1
                         and (self.chain_negative_attributes is None or name in self.chain_negative_attributes))
        if not options:
            return []
        generator = self._generator(row, stream=1)
        name = options[int(torch.randint(len(options), (1,), generator=generator))]
        others = [v for v in self.vocabulary[name] if v != truth[name]]
        other = others[int(torch.randint(len(others), (1,), generator=generator))]
        return self.embedder.tokenize_reasoning([replace_value(trace, truth[name], other)])[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _noisy(self, trace: list[int], row: int) -> tuple[list[int], list[bool]]:
        """`trace` with a `trace_noise` share of its inner tokens replaced, and which positions were replaced.

        The draws depend on (seed, epoch, dataset row) only, not on a running generator: the DataLoader collates a
        batch ahead of the step, so a checkpointed global RNG state would already include the next batch's draws, and
        a resumed run (or a dataloader worker) would draw other noise than a straight run.
        """
        if not self.trace_noise or len(trace) <= 2:
            return trace, [False] * len(trace)
        generator = self._generator(row, stream=0)
        inner = torch.rand(len(trace) - 2, generator=generator) < self.trace_noise
        vocab = self._noise_tokens()
        picks = vocab[torch.randint(len(vocab), (int(inner.sum()),), generator=generator)].tolist()
        noisy, replaced, it = list(trace), [False] * len(trace), iter(picks)
        for pos in inner.nonzero().flatten().tolist():
            noisy[pos + 1], replaced[pos + 1] = next(it), True
        return noisy, replaced

    @property
    def rotations(self) -> int:
        """Dataset rows per pair: each row of a pair starts its hard negatives at another offset of `negatives`."""
        return max(1, max((len(ex.negatives) for ex in self.examples), default=1)) if self.hard_negatives else 1

    def dataset_rows(self) -> list[int]:
        """Row ids for the training dataset: every pair once per rotation, so one pass sees every hard negative."""
        return list(range(len(self.examples) * self.rotations))

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.chunk_size and len(rows) > self.chunk_size:
            ids = [int(row["pair"]) for row in rows]
            return {"moon_chunks": [ids[start:start + self.chunk_size] for start in range(0, len(ids), self.chunk_size)]}
        return self.collate(rows)

    def collate(self, rows: list[dict[str, Any]] | list[int]) -> dict[str, Any]:
        """One batch of these dataset rows (`{"pair": index}` or the index): the same rows give the same batch."""
        rows = [row if isinstance(row, dict) else {"pair": row} for row in rows]
        # Row r is pair r % n with its hard negatives rotated by r // n: deterministic (resumable) yet varied.
        n_pairs = len(self.examples)
        picks = [(self.examples[int(row["pair"]) % n_pairs], int(row["pair"]) // n_pairs) for row in rows]
        examples = [ex for ex, _ in picks]
        n, k = len(examples), self.hard_negatives
        negative_ids: list[str | None] = []
        for ex, offset in picks:
            known = [nid for nid in ex.negatives if nid in self.catalogue.products]
            chosen = (known[offset % len(known):] + known[:offset % len(known)])[:k] if known else []
            negative_ids.extend(chosen + [None] * (k - len(chosen)))
        # A missing negative slot still needs a row; it re-embeds the positive and is masked out of the loss.
        negative_prompts = [self._product_prompt(nid or ex.positive)
                            for ex, nid in zip([e for e in examples for _ in range(k)], negative_ids, strict=True)]
        products = [self._product_prompt(ex.positive) for ex in examples]
        parts = products + [self._anchor_prompt(ex) for ex in examples] + products + negative_prompts
        noised = [self._noisy(self._trace(ex.positive), int(row["pair"])) for ex, row in zip(examples, rows, strict=True)]
        traces = [trace for trace, _ in noised]
        completions = traces + [[] for _ in range(len(parts) - n)]
        if self.chain_negatives:
            altered = [self._altered_trace(ex.positive, int(row["pair"])) for ex, row in zip(examples, rows, strict=True)]
            parts += products
            completions += altered
        photo_rows = [i for i, ex in enumerate(examples) if self.photo_traces and traces[i]
                      and self.catalogue.products[ex.positive].images]
        first_photo = len(parts)
        parts += [self._photo_prompt(examples[i].positive) for i in photo_rows]
        completions += [self._trace(examples[i].positive) for i in photo_rows]
        batch = self.embedder.prepare(None, completions, prompts=concat_prompts(parts))
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        value_mask = torch.zeros_like(labels, dtype=torch.bool)
        for row in range(n):
            if traces[row]:
                # Targets: the trace and the read-out token that closes the turn (the model learns to stop); never a
                # noise token (the model must not learn to write noise).
                targets = batch["attention_mask"][row].bool() & ~batch["prompt_mask"][row]
                positions = targets.nonzero().flatten()
                replaced = torch.tensor(noised[row][1] + [False] * (len(positions) - len(traces[row])))
                targets[positions[replaced]] = False
                labels[row, targets] = batch["input_ids"][row, targets]
                values = self._value_tokens(examples[row].positive)[0] if self.value_token_weight else []
                if any(values):
                    named = torch.tensor(values + [False] * (len(positions) - len(values)))
                    value_mask[row, positions[named & ~replaced]] = True
        for offset, row in enumerate(photo_rows):
            # Photo alone: every trace token is a target except the values only the product's text could tell.
            photo = first_photo + offset
            positions = (batch["attention_mask"][photo].bool() & ~batch["prompt_mask"][photo]).nonzero().flatten()
            values, in_text = (torch.tensor(m + [False] * (len(positions) - len(m)))
                               for m in self._value_tokens(examples[row].positive))
            labels[photo, positions[~in_text]] = batch["input_ids"][photo, positions[~in_text]]
            if self.value_token_weight:
                value_mask[photo, positions[values & ~in_text]] = True
        model_inputs = {k2: v for k2, v in batch.items() if k2 not in ("prompt_mask", "readout_index")}
        model_inputs["labels"] = labels
        model_inputs["moon"] = {
            "prompt_mask": batch["prompt_mask"],
            "readout_index": batch["readout_index"],
            "n_pairs": torch.tensor(n),
            "hard_negatives": torch.tensor(k),
            "negative_mask": torch.tensor([nid is not None for nid in negative_ids], dtype=torch.bool).view(n, k),
            "image_only": torch.tensor([ex.image_only for ex in examples], dtype=torch.bool),
            "has_trace": torch.tensor([bool(t) for t in traces], dtype=torch.bool),
            "chain_negative_mask": (torch.tensor([bool(t) for t in altered], dtype=torch.bool) if self.chain_negatives
                                    else torch.zeros(0, dtype=torch.bool)),
            "photo_rows": torch.tensor(len(photo_rows)),
            "positive_ids": list(ex.positive for ex in examples),
            # Only when some pair has several positives (a static choice: every process then joins the same gathers).
            "relevant_ids": [ex.relevant for ex in examples] if self.multi_positive else None,
            "value_mask": value_mask,
        }
        return model_inputs


def layout_blocks(embeddings: torch.Tensor, layout: dict[str, Any]) -> list[torch.Tensor]:
    """The rows of a batch's blocks, in layout order: reason-mode products, anchors, direct-mode products, hard
    negatives (`k` per pair, pair by pair), chain negatives (empty when off); the photo rows after them are left out
    (no contrastive term reads them)."""
    n, k, chains = int(layout["n_pairs"]), int(layout["hard_negatives"]), len(layout["chain_negative_mask"])
    bounds = [0, n, 2 * n, 3 * n, (3 + k) * n, (3 + k) * n + chains]
    return [embeddings[start:stop] for start, stop in itertools.pairwise(bounds)]


def merge_chunk_embeddings(embeddings: list[torch.Tensor], layouts: list[dict[str, Any]]
                           ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The embeddings and layout one batch of all the chunks' pairs would have had (for the contrastive loss): each
    of `layout_blocks` stacked over the chunks, in chunk order. Differentiable in `embeddings`."""
    per_chunk = [layout_blocks(emb, layout) for emb, layout in zip(embeddings, layouts, strict=True)]
    relevant = [layout["relevant_ids"] for layout in layouts]
    merged = {
        "n_pairs": sum(int(layout["n_pairs"]) for layout in layouts),
        "hard_negatives": int(layouts[0]["hard_negatives"]),
        "negative_mask": torch.cat([layout["negative_mask"] for layout in layouts]),
        "image_only": torch.cat([layout["image_only"] for layout in layouts]),
        "chain_negative_mask": torch.cat([layout["chain_negative_mask"] for layout in layouts]),
        "positive_ids": [pid for layout in layouts for pid in layout["positive_ids"]],
        "relevant_ids": None if relevant[0] is None else [ids for chunk in relevant for ids in chunk],
    }
    return torch.cat([torch.cat(block) for block in zip(*per_chunk, strict=True)]), merged


class NoiseEpoch(TrainerCallback):
    """Tells the collator each epoch's number, so trace noise differs per epoch (and is the same after a resume)."""

    def __init__(self, collator: MoonSFTCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        # `state.epoch` is fractional when resuming mid-epoch; at an epoch's start it is the whole number of epochs.
        self.collator.set_epoch(int((state.epoch or 0) + 1e-6))
