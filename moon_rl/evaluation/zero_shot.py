"""Zero-shot category classification and attribute prediction from product embeddings.

A product is assigned the label whose text prompt embeds closest to it, as the MOON papers evaluate a representation
without training a classifier: categories are prompted by their name, attributes as `"attribute: value"`. The labels
come from the catalogue itself (every value an attribute takes anywhere in it), so any catalogue with `category` /
`attributes` fields gets these tasks; one without them gets none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moon_rl.data.catalogue import Catalogue
from moon_rl.data.records import Product

TextEncoder = Callable[[list[str]], np.ndarray]


def label_space(catalogue: Catalogue) -> dict[str, list[str]]:
    """`{"category": [...], attribute: [values...]}`: every value seen in the catalogue, sorted; empty ones dropped."""
    space: dict[str, set[str]] = {"category": set()}
    for product in catalogue.products.values():
        if product.category:
            space["category"].add(str(product.category))
        for name, value in (product.attributes or {}).items():
            if name != "category" and value not in (None, ""):
                space.setdefault(name, set()).add(str(value))
    return {name: sorted(values) for name, values in space.items() if len(values) >= 2}


def _predict(product_vecs: np.ndarray, prompt_vecs: np.ndarray) -> np.ndarray:
    return np.argmax(np.asarray(product_vecs, np.float64) @ np.asarray(prompt_vecs, np.float64).T, axis=1)


def macro_f1(truth: Sequence[int], predicted: Sequence[int], n_classes: int) -> float:
    """Unweighted mean over the classes present in `truth` or `predicted` of the per-class F1 (scikit-learn's)."""
    from sklearn.metrics import f1_score  # sentence-transformers' own dependency; imported only when scoring

    del n_classes  # the classes that count are those that occur, as in scikit-learn
    return float(f1_score(np.asarray(truth), np.asarray(predicted), average="macro", zero_division=0.0))


def zero_shot_tasks(
    products: Sequence[Product], product_vecs: np.ndarray, space: dict[str, list[str]], encode_text: TextEncoder,
) -> dict[str, Any]:
    """Category classification and per-attribute prediction of `products` from their embeddings.

    Args:
        products (`Sequence[Product]`): the evaluated products (rows of `product_vecs`).
        product_vecs (`np.ndarray`): (N, D) L2-normalised embeddings.
        space (`dict[str, list[str]]`): `label_space(catalogue)`.
        encode_text (`Callable`): embeds a list of text prompts the way queries are embedded.

    Returns:
        `dict`: `{"classification": {"accuracy", "macro_f1", "n"} | None, "attributes": {attr: accuracy, ...,
        "mean": mean accuracy} | None}`.
    """
    out: dict[str, Any] = {"classification": None, "attributes": None}
    categories = space.get("category")
    if categories:
        rows = [i for i, p in enumerate(products) if p.category in categories]
        if rows:
            predicted = _predict(product_vecs[rows], encode_text(list(categories)))
            truth = [categories.index(products[i].category) for i in rows]
            out["classification"] = {"accuracy": float(np.mean(predicted == np.asarray(truth))),
                                     "macro_f1": macro_f1(truth, predicted, len(categories)), "n": len(rows)}
    accuracies: dict[str, float] = {}
    for name, values in space.items():
        if name == "category":
            continue
        rows = [i for i, p in enumerate(products) if str((p.attributes or {}).get(name)) in values]
        if not rows:
            continue
        predicted = _predict(product_vecs[rows], encode_text([f"{name}: {v}" for v in values]))
        truth = np.asarray([values.index(str(products[i].attributes[name])) for i in rows])
        accuracies[name] = float(np.mean(predicted == truth))
    if accuracies:
        out["attributes"] = {**accuracies, "mean": float(np.mean(list(accuracies.values())))}
    return out
