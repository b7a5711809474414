"""`moon-rl mine`: hard negatives for a split's pairs, mined with a trained model, false negatives filtered out.

Every product of the catalogue is embedded (the gallery, `direct` mode by default) and every distinct anchor of the
split's pairs (queries in direct mode, as evaluation embeds them). Each pair's candidates are the products in order
of their score with the anchor; a candidate is skipped, and counted under the filter that skipped it, when it is

- `anchor`: the anchor product itself (product -> product pairs);
- `positive`: a positive of the same anchor (this pair's, or another pair's with the same anchor: a query can have
  several right answers, and training would push them apart);
- `duplicate`: another listing of a positive: the same main image, or the same title (case and spacing ignored),
  category and attributes;
- `too_close`: scored above `margin` x the positive's score (the least similar positive's, with several;
  positive-aware mining, NV-Retriever's TopK-PercPos: what scores almost as high as the positive is more often an
  unlabelled positive than a negative);

and the first `k` candidates left become the pair's `negatives`. Products that only other splits use (the test
split's products and gallery) are never candidates: training on them as negatives would leak the evaluation set. The result is a copy of the catalogue whose split
has the mined negatives (the given ones are replaced, or kept first with `keep_given`); SFT and GRPO read them as any
given negatives.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moon_rl.data.annotate import write_catalogue_copy
from moon_rl.data.catalogue import Catalogue
from moon_rl.data.records import Pair, Product, Query
from moon_rl.errors import DataError, MoonError

__all__ = ["FILTERS", "MineReport", "held_out_products", "mine_negatives", "write_mined_catalogue"]

logger = logging.getLogger(__name__)

FILTERS = ("anchor", "positive", "duplicate", "too_close")


@dataclass
class MineReport:
    """What mining did: negatives per pair, and how many candidates each filter removed."""

    split: str
    pairs: int
    k: int
    margin: float | None
    held_out: int = 0  # products of other splits only: never candidates
    mined: list[list[str]] = field(default_factory=list)  # per pair of the split, in order
    removed: Counter = field(default_factory=Counter)  # filter -> candidates removed
    short: int = 0  # pairs that got fewer than k negatives (a small catalogue, or everything filtered)

    def counts(self) -> dict[str, Any]:
        return {"split": self.split, "pairs": self.pairs, "k": self.k, "margin": self.margin, "held_out": self.held_out,
                "negatives": sum(len(m) for m in self.mined), "short": self.short,
                "removed": {name: int(self.removed[name]) for name in FILTERS}}

    def summary(self) -> str:
        removed = ", ".join(f"{name} {self.removed[name]}" for name in FILTERS)
        text = (f"{sum(len(m) for m in self.mined)} negatives mined for {self.pairs} {self.split!r} pairs "
                f"(k={self.k}, margin={self.margin}); candidates removed: {removed}; {self.held_out} products of "
                "other splits only were never candidates")
        return text + (f"; {self.short} pairs got fewer than {self.k}" if self.short else "")


def _anchor_key(anchor: str | Query) -> str:
    return f"product:{anchor}" if isinstance(anchor, str) else "query:" + json.dumps(
        [anchor.text, anchor.image if isinstance(anchor.image, str) or anchor.image is None
         else hashlib.sha256(anchor.image).hexdigest()])


def _listing_keys(product: Product) -> set[str]:
    """What two listings of one product share: the main image, or the title (case and spacing ignored) together with
    the category and attributes. Not the title alone: look-alikes (another colour of the same shirt) often share it,
    and they are the hard negatives worth mining."""
    described = json.dumps([" ".join(product.title.lower().split()), product.category,
                            sorted((k, str(v).lower()) for k, v in product.attributes.items())])
    keys = {"text:" + described}
    if product.images:
        image = product.images[0]
        keys.add("image:" + (image if isinstance(image, str) else hashlib.sha256(image).hexdigest()))
    return keys


def held_out_products(catalogue: Catalogue, split: str) -> set[str]:
    """Products that only other splits use (their pairs' products, their galleries): mining for `split` must not make
    them training negatives, or the model would train on the held-out products it is evaluated on."""
    def used(name: str) -> set[str]:
        ids = set(catalogue.galleries.get(name, []))
        for pair in catalogue.pairs.get(name, []):
            ids |= {*pair.positive_ids, *pair.negatives} | ({pair.anchor} if isinstance(pair.anchor, str) else set())
        return ids

    others = set().union(*(used(name) for name in catalogue.pairs if name != split), set())
    return others - used(split)


def mine_negatives(embedder: Any, catalogue: Catalogue, split: str = "train", *, k: int = 4,
                   margin: float | None = 0.95, mode: str = "direct", batch_size: int = 32,
                   show_progress: bool = True) -> MineReport:
    """Mine `k` hard negatives for each pair of `split` (see the module docstring for the filters).

    Args:
        embedder (`MoonEmbedder`): a trained model.
        catalogue (`Catalogue`): every product is a candidate.
        split (`str`, *optional*, defaults to `"train"`): the pairs to mine for.
        k (`int`, *optional*, defaults to `4`): negatives per pair.
        margin (`float`, *optional*, defaults to `0.95`): candidates scoring above `margin` x the positive's score
            are skipped; None turns the filter off.
        mode (`str`, *optional*, defaults to `"direct"`): how the products are embedded (`reason` generates a chain
            per product: slower).
    """
    if k < 1:
        raise MoonError(f"mine: k must be at least 1, got {k}")
    pairs = catalogue.pairs.get(split)
    if not pairs:
        raise DataError(f"mine: the catalogue has no pairs for split {split!r} (splits: "
                        f"{', '.join(catalogue.pairs) or 'none'})")
    ids = list(catalogue.products)
    index = {pid: i for i, pid in enumerate(ids)}
    for number, pair in enumerate(pairs):
        for pid in ([pair.anchor] if isinstance(pair.anchor, str) else []) + pair.positive_ids:
            if pid not in index:
                raise DataError(f"mine: split {split!r}, pair {number}: unknown product id {pid!r}")
    products = embedder.encode(list(catalogue.products.values()), mode=mode, batch_size=batch_size,
                               load_image=catalogue.image, show_progress=show_progress)
    pair_keys = [_anchor_key(pair.anchor) for pair in pairs]
    first: dict[str, str | Query] = {}  # each distinct anchor once, in order of first appearance
    positives_of: dict[str, set[int]] = defaultdict(set)
    for key, pair in zip(pair_keys, pairs, strict=True):
        first.setdefault(key, pair.anchor)
        positives_of[key].update(index[pid] for pid in pair.positive_ids)
    records = [catalogue.products[a] if isinstance(a, str) else a for a in first.values()]
    anchors = embedder.encode(records, mode="direct", batch_size=batch_size, load_image=catalogue.image,
                              show_progress=show_progress)
    anchor_row = {key: i for i, key in enumerate(first)}
    product_keys = [_listing_keys(product) for product in catalogue.products.values()]
    listings: dict[str, set[int]] = defaultdict(set)
    for i, keys in enumerate(product_keys):
        for key in keys:
            listings[key].add(i)
    held_out = held_out_products(catalogue, split)
    report = MineReport(split, len(pairs), k, margin, held_out=len(held_out))
    scores = anchors @ products.T  # (anchors, products): both L2-normalised, so cosines
    if held_out:
        scores[:, [index[pid] for pid in held_out]] = -np.inf
    for key, pair in zip(pair_keys, pairs, strict=True):
        row = scores[anchor_row[key]]
        positives = positives_of[key]
        duplicates = {j for p in positives for lk in product_keys[p] for j in listings[lk]} - positives
        # Several positives: the least similar one sets the ceiling (the stricter filter against false negatives).
        ceiling = margin * min(float(row[index[pid]]) for pid in pair.positive_ids) if margin is not None else None
        skip = {"anchor": {index[pair.anchor]} if isinstance(pair.anchor, str) else set(), "positive": positives,
                "duplicate": duplicates}
        chosen: list[str] = []
        for j in _ranked(row, 8 * k + 64):
            if row[j] == -np.inf:
                break  # only held-out products are left
            reason = next((name for name, members in skip.items() if j in members), None)
            if reason is None and ceiling is not None and row[j] > ceiling:
                reason = "too_close"
            if reason is not None:
                report.removed[reason] += 1
                continue
            chosen.append(ids[j])
            if len(chosen) == k:
                break
        report.short += len(chosen) < k
        report.mined.append(chosen)
    logger.info("%s", report.summary())
    return report


def _ranked(row: np.ndarray, head: int):
    """Indices of `row` from the highest score down: the top `head` sorted first (enough for almost every pair),
    the rest only if the filters got through all of them."""
    if head >= len(row):
        yield from np.argsort(-row, kind="stable")
        return
    top = np.argpartition(-row, head)[:head]
    top = top[np.argsort(-row[top], kind="stable")]
    yield from top
    rest = np.setdiff1d(np.arange(len(row)), top, assume_unique=True)
    yield from rest[np.argsort(-row[rest], kind="stable")]


def write_mined_catalogue(catalogue: Catalogue, report: MineReport, out: str | Path, *, keep_given: bool = False,
                          model: str | None = None, overwrite: bool = False) -> Path:
    """A copy of `catalogue` at `out` whose `report.split` pairs carry the mined negatives (after the given ones with
    `keep_given`, duplicates dropped); everything else as in the source (see `write_catalogue_copy`)."""
    mined_pairs: list[Pair] = []
    for pair, negatives in zip(catalogue.pairs[report.split], report.mined, strict=True):
        merged = list(dict.fromkeys([*pair.negatives, *negatives])) if keep_given else negatives
        mined_pairs.append(pair.model_copy(update={"negatives": merged}))
    return write_catalogue_copy(
        catalogue, out, command="mine", pairs={**catalogue.pairs, report.split: mined_pairs}, overwrite=overwrite,
        manifest_entry=("mining", {**report.counts(), "model": model, "keep_given": keep_given}))
