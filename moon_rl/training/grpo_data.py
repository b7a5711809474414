"""GRPO's data: the training dataset (one prompt row per pair, images by reference), the products' images by id,
which pairs answer which product, and each pair's look-alike pairs (training/grpo.py trains on them)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset

from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.modeling.inputs import EmbedItem

__all__ = ["answers_by_product", "catalogue_images", "grpo_dataset", "lookalike_pairs"]


def answers_by_product(pair_products: Sequence[str] | None, pair_relevant: Sequence[Sequence[str]] | None
                        ) -> dict[str, tuple[int, ...]]:
    """Product -> the pairs whose query is a right answer for it (every pair that lists it as a positive); {} when
    each pair is its own product."""
    if pair_products is None:
        return {}
    relevant = pair_relevant if pair_relevant is not None else [(p,) for p in pair_products]
    if len(relevant) != len(pair_products):
        raise ValueError(f"pair_relevant has {len(relevant)} entries for {len(pair_products)} pairs")
    answers: dict[str, list[int]] = {}
    for pair, (own, products) in enumerate(zip(pair_products, relevant, strict=True)):
        for product in dict.fromkeys((own, *products)):
            answers.setdefault(product, []).append(pair)
    return {product: tuple(pairs) for product, pairs in answers.items()}


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
    """One row per training pair: the product prompt (TRL inserts the images), pair id, product id, attributes.

    No images: a catalogue's photos would all sit in memory (datasets stores them encoded in its table). The trainer
    decodes each generation batch's from `product_images` (`catalogue_images`).
    """
    from moon_rl.modeling.inputs import product_text

    rows = []
    for i, ex in enumerate(examples):
        product = catalogue.products[ex.positive]
        item = EmbedItem(text=product_text(product), kind="product", id=product.id)  # the user text, no image decoded
        rows.append({"prompt": [{"role": "user", "content": item.user_text()}], "pair": i, "product_id": product.id,
                     "attributes_json": json.dumps(product.attributes, sort_keys=True)})
    return Dataset.from_list(rows)


def catalogue_images(embedder: MoonEmbedder, catalogue: Any) -> Callable[[str], list[Any]]:
    """A product's images by id, decoded from the catalogue and fitted to the processor (the trainer's
    `product_images`). Fitted here, not only in the trainer's processor call: TRL hands them to vLLM as they are."""
    from moon_rl.modeling.inputs import fit_images, to_item

    def images(product_id: str) -> list[Any]:
        item = to_item(catalogue.products[product_id], catalogue.image, embedder.max_images)
        return fit_images(embedder.processor, item.images)

    return images
