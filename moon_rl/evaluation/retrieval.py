"""Retrieval evaluation: Recall@k, MRR@10 and nDCG@10 of an embedder on a catalogue split's hard gallery.

Each pair of a split is one query; its anchor kind names the task it belongs to (`text->product`, `image->product`,
`multimodal->product`, `product->product`) and its positive (or `positives`, with their graded `relevance`) are the
relevant gallery products: Recall@k and MRR count the first relevant product retrieved, nDCG uses the gains. The gallery is
`Catalogue.gallery(split)`: for the synthetic catalogue, the test products with their look-alike families, so a
model must tell a product from its near-duplicates.

Queries are always embedded in `direct` mode; only the gallery products are embedded once per mode, because reasoning
is a property of how the catalogue is indexed (offline, once) while a search query must be answered at once.

    results = evaluate_embedder(embedder, catalogue, split="test", modes=("direct", "reason"))
    print(format_table({"moon-rl": results}, ks=(1, 5, 10)))
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moon_rl.data.catalogue import Catalogue
from moon_rl.data.chains import attribute_vocabulary, chain_attribute_accuracy
from moon_rl.data.records import Product, Query
from moon_rl.errors import DataError
from moon_rl.evaluation.faithfulness import faithfulness as measure_faithfulness
from moon_rl.evaluation.zero_shot import label_space, zero_shot_tasks
from moon_rl.modeling.matryoshka import truncate

__all__ = [
    "TASKS",
    "graded_metrics",
    "relevant_ranks",
    "task_chance",
    "RetrievalTask",
    "build_retrieval_tasks",
    "chance_metrics",
    "evaluate_embedder",
    "format_table",
    "retrieval_metrics",
]

logger = logging.getLogger(__name__)

#: Task names, in the order tables list them.
TASKS: tuple[str, ...] = ("text->product", "image->product", "multimodal->product", "product->product")
#: MRR and nDCG are reported at this cutoff (the usual BEIR / MTEB / sentence-transformers choice).
RANK_CUTOFF = 10
#: Keys of an `evaluate_embedder` result that are not modes.
RESULT_INFO_KEYS = frozenset({"gallery_size", "n_queries", "chance", "split", "reason_format_rate", "reason_examples",
                              "zero_shot", "faithfulness", "chain_attributes", "dims"})
# Scores are computed this many queries at a time, so a large gallery never needs a full (queries x gallery) matrix.
_QUERY_CHUNK = 1024


# ----------------------------------------------------------------------------------------------------------- metrics
def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # A zero vector stays zero (scores 0 with everything) instead of becoming NaN.
    return x / np.where(norms > 0, norms, 1.0)


def positive_ranks(
    query_vecs: np.ndarray, gallery_vecs: np.ndarray, positives: Sequence[int], exclude: Sequence[int] | None = None
) -> np.ndarray:
    """0-based rank of each query's positive in its cosine-sorted gallery.

    Ties are broken deterministically: among equal scores the lower gallery index ranks first, so
    rank = #(score > s_pos) + #(score == s_pos and index < pos). This is the order a stable sort by descending score
    gives, and the one sentence-transformers' `InformationRetrievalEvaluator` uses when corpus ids sort like indices.

    Args:
        query_vecs (`np.ndarray` of shape `(Q, D)`): query embeddings.
        gallery_vecs (`np.ndarray` of shape `(G, D)`): gallery embeddings.
        positives (`Sequence[int]`): for each query, the gallery index of its relevant item.
        exclude (`Sequence[int]`, *optional*): for each query, a gallery index to leave out of the ranking (the query
            product itself in `product->product`), or -1 for none.

    Returns:
        `np.ndarray` of shape `(Q,)`, int64.
    """
    queries, gallery = _unit_rows(query_vecs, gallery_vecs)
    pos = np.asarray(positives, dtype=np.int64)
    if pos.shape != (len(queries),):
        raise ValueError(f"expected {len(queries)} positives (one per query), got shape {pos.shape}")
    if len(pos) and (pos.min() < 0 or pos.max() >= len(gallery)):
        raise ValueError(f"positive gallery indices must be in [0, {len(gallery)}), got [{pos.min()}, {pos.max()}]")
    skip = np.full(len(pos), -1, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    if skip.shape != pos.shape or np.any(skip == pos):
        raise ValueError("`exclude` needs one gallery index (or -1) per query, never the query's positive")
    return _item_ranks(queries, gallery, np.arange(len(pos)), pos, skip)


def _unit_rows(query_vecs: np.ndarray, gallery_vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries and gallery as L2-normalised float64 rows, after checking their shapes agree.

    Float64 cosine: rounding cannot create or break ties between distinct float32 vectors.
    """
    queries = np.asarray(query_vecs, dtype=np.float64)
    gallery = np.asarray(gallery_vecs, dtype=np.float64)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"expected (Q, D) queries and (G, D) gallery, got {queries.shape} and {gallery.shape}")
    return _l2_normalise(queries), _l2_normalise(gallery)


def _item_ranks(queries: np.ndarray, gallery: np.ndarray, owner: np.ndarray, items: np.ndarray,
                skip: np.ndarray) -> np.ndarray:
    """0-based rank of gallery item `items[j]` for query `owner[j]` (ties: lower gallery index first), leaving out
    gallery index `skip[owner[j]]` where it is >= 0; in chunks, so no full (queries x gallery) matrix is needed."""
    index = np.arange(len(gallery))
    ranks = np.empty(len(owner), dtype=np.int64)
    for start in range(0, len(owner), _QUERY_CHUNK):
        rows = slice(start, start + _QUERY_CHUNK)
        scores = queries[owner[rows]] @ gallery.T
        target = np.take_along_axis(scores, items[rows, None], axis=1)
        ahead = (scores > target) | ((scores == target) & (index[None, :] < items[rows, None]))
        skipped = skip[owner[rows]]
        excluded = np.nonzero(skipped >= 0)[0]
        ahead[excluded, skipped[excluded]] = False
        ranks[rows] = ahead.sum(axis=1)
    return ranks


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`recall@k` for each k, `mrr@10` and `ndcg@10` from 0-based positive ranks (one relevant item per query)."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("cannot compute retrieval metrics over zero queries")
    out = {f"recall@{k}": float(np.mean(ranks < k)) for k in ks}
    hit = ranks < RANK_CUTOFF
    out[f"mrr@{RANK_CUTOFF}"] = float(np.mean(np.where(hit, 1.0 / (ranks + 1), 0.0)))
    # One relevant item: the ideal DCG is 1, so nDCG is the positive's discount 1 / log2(rank + 2).
    out[f"ndcg@{RANK_CUTOFF}"] = float(np.mean(np.where(hit, 1.0 / np.log2(ranks + 2), 0.0)))
    return out


Relevant = int | Mapping[int, float]
"""A query's relevant gallery items: one index, or `{index: gain}` for several (graded) ones."""


def _as_relevance(positives: Sequence[Relevant], n_queries: int, gallery_size: int) -> list[dict[int, float]]:
    if len(positives) != n_queries:
        raise ValueError(f"expected {n_queries} positives (one entry per query), got {len(positives)}")
    out = []
    for query, entry in enumerate(positives):
        gains = {int(entry): 1.0} if isinstance(entry, int | np.integer) else {int(i): float(g) for i, g in entry.items()}
        if not gains:
            raise ValueError(f"query {query} has no relevant gallery item")
        if min(gains) < 0 or max(gains) >= gallery_size:
            raise ValueError(f"query {query}: relevant gallery indices must be in [0, {gallery_size}), got "
                             f"{sorted(gains)}")
        if not all(g > 0 and math.isfinite(g) for g in gains.values()):
            raise ValueError(f"query {query}: gains must be finite and > 0, got {list(gains.values())}")
        out.append(gains)
    return out


def relevant_ranks(
    query_vecs: np.ndarray, gallery_vecs: np.ndarray, relevant: Sequence[Mapping[int, float]],
    exclude: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """0-based rank of each relevant item of each query in its cosine-sorted gallery (same ties as `positive_ranks`).

    Returns one int64 array per query, its items in `relevant[q]`'s order. Each item is ranked among the whole
    gallery (another relevant item ahead of it counts), which is what DCG needs.
    """
    queries, gallery = _unit_rows(query_vecs, gallery_vecs)
    skip = np.full(len(relevant), -1, dtype=np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    if skip.shape != (len(relevant),) or any(int(s) in rel for s, rel in zip(skip, relevant, strict=True)):
        raise ValueError("`exclude` needs one gallery index (or -1) per query, never one of the query's positives")
    # One row per (query, relevant item), ranked like `positive_ranks` ranks single positives.
    owner = np.repeat(np.arange(len(relevant)), [len(rel) for rel in relevant])
    items = np.fromiter((i for rel in relevant for i in rel), dtype=np.int64, count=len(owner))
    ranks = _item_ranks(queries, gallery, owner, items, skip)
    return np.split(ranks, np.cumsum([len(rel) for rel in relevant])[:-1])


def graded_metrics(ranks: Sequence[np.ndarray], gains: Sequence[Sequence[float]],
                   ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`recall@k`, `mrr@10` and `ndcg@10` from each query's relevant items' 0-based ranks and gains.

    `recall@k` is the hit rate (any relevant item in the top k; sentence-transformers calls it `accuracy@k`), MRR
    the reciprocal rank of the first relevant item, nDCG@10 the DCG of linear gains with a `log2(rank + 2)`
    discount over the ideal DCG (the gains sorted, best first).
    """
    if not len(ranks):
        raise ValueError("cannot compute retrieval metrics over zero queries")
    best = np.array([r.min() for r in ranks])
    out = {f"recall@{k}": float(np.mean(best < k)) for k in ks}
    out[f"mrr@{RANK_CUTOFF}"] = float(np.mean(np.where(best < RANK_CUTOFF, 1.0 / (best + 1), 0.0)))
    ndcg = []
    for rank, gain in zip(ranks, gains, strict=True):
        gain = np.asarray(gain, dtype=np.float64)
        top = rank < RANK_CUTOFF
        ideal = np.sort(gain)[::-1][:RANK_CUTOFF]
        ndcg.append(np.sum(gain[top] / np.log2(rank[top] + 2)) / np.sum(ideal / np.log2(np.arange(len(ideal)) + 2)))
    out[f"ndcg@{RANK_CUTOFF}"] = float(np.mean(ndcg))
    return out


def retrieval_metrics(
    query_vecs: np.ndarray, gallery_vecs: np.ndarray, positives: Sequence[Relevant], ks: Sequence[int] = (1, 5, 10),
    *, exclude: Sequence[int] | None = None,
) -> dict[str, float]:
    """Cosine-similarity retrieval metrics with one or several (graded) relevant gallery items per query.

    Pure numpy and vectorised. Rows need not be normalised (they are, in float64, before scoring). Ties are broken
    deterministically: among equal scores the lower gallery index ranks first (see `positive_ranks`).

    Args:
        query_vecs (`np.ndarray` of shape `(Q, D)`): query embeddings.
        gallery_vecs (`np.ndarray` of shape `(G, D)`): gallery embeddings.
        positives (`Sequence[int | Mapping[int, float]]`): per query, the gallery index of its relevant item, or
            `{gallery index: gain}` for several relevant items with graded gains (> 0).
        ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 10)`): cutoffs of `recall@k`.
        exclude (`Sequence[int]`, *optional*): per query, a gallery index left out of the ranking, or -1.

    Returns:
        `dict[str, float]`: `recall@k` for each k (the hit rate: a relevant item is among the top k), `mrr@10` (first
        relevant item) and `ndcg@10` (graded gains), each a mean over queries in [0, 1].

    Example:
        ```python
        >>> g = np.eye(3, dtype=np.float32)
        >>> retrieval_metrics(g, g, [0, 1, 2], ks=(1,))
        {'recall@1': 1.0, 'mrr@10': 1.0, 'ndcg@10': 1.0}
        >>> retrieval_metrics(g[:1], g, [{1: 1.0, 0: 1.0}], ks=(1,))
        {'recall@1': 1.0, 'mrr@10': 1.0, 'ndcg@10': 1.0}
        ```
    """
    if all(isinstance(p, int | np.integer) for p in positives):
        return metrics_from_ranks(positive_ranks(query_vecs, gallery_vecs, positives, exclude), ks)
    relevant = _as_relevance(positives, len(query_vecs), len(gallery_vecs))
    ranks = relevant_ranks(query_vecs, gallery_vecs, relevant, exclude)
    return graded_metrics(ranks, [list(rel.values()) for rel in relevant], ks)


def chance_metrics(gallery_size: int, ks: Sequence[int] = (1, 5, 10),
                   gains: Sequence[Sequence[float]] | None = None) -> dict[str, float]:
    """Expected metrics of a random ranking of `gallery_size` items.

    With one relevant item per query (`gains=None`) its rank is uniform. With `gains` (per query, the gains of its
    relevant items) the expectation is exact per query, then averaged: a random ranking hits one of m relevant items
    in the top k with probability 1 - C(G-m, k) / C(G, k), and every position holds the mean gain on average.
    """
    if gallery_size < 1:
        raise ValueError(f"gallery_size must be >= 1, got {gallery_size}")
    if gains is None:
        return metrics_from_ranks(np.arange(gallery_size), ks)
    per_query = [_chance_one(gallery_size, tuple(g), ks) for g in gains]
    return {key: float(np.mean([m[key] for m in per_query])) for key in per_query[0]}


def _chance_one(size: int, gains: tuple[float, ...], ks: Sequence[int]) -> dict[str, float]:
    m = len(gains)
    if not 1 <= m <= size:
        raise ValueError(f"a query needs 1 to {size} relevant items, got {m}")
    depth = max([*ks, RANK_CUTOFF])
    # miss[j]: probability that none of the first j positions holds a relevant item.
    miss = np.ones(depth + 1)
    for j in range(1, depth + 1):
        miss[j] = miss[j - 1] * max(size - m - (j - 1), 0) / (size - (j - 1)) if j <= size else 0.0
    out = {f"recall@{k}": float(1 - miss[min(k, depth)]) for k in ks}
    first = miss[:RANK_CUTOFF] - miss[1:RANK_CUTOFF + 1]  # P(first hit at rank r)
    out[f"mrr@{RANK_CUTOFF}"] = float(np.sum(first / np.arange(1, RANK_CUTOFF + 1)))
    positions = np.arange(min(RANK_CUTOFF, size))
    ideal = np.sort(np.asarray(gains))[::-1][:RANK_CUTOFF]
    expected = np.sum(sum(gains) / size / np.log2(positions + 2))  # each position: a random item's gain
    out[f"ndcg@{RANK_CUTOFF}"] = float(expected / np.sum(ideal / np.log2(np.arange(len(ideal)) + 2)))
    return out


# ------------------------------------------------------------------------------------------------------------ tasks
@dataclass
class RetrievalTask:
    """The queries of one anchor kind of a split, with their relevant products' positions in the split's gallery.

    Attributes:
        name (`str`): one of `TASKS`.
        queries (`list[Query | Product]`): what is embedded as the query (inline anchors, or anchor products).
        relevant (`list[dict[int, float]]`): per query, `{index in Catalogue.gallery(split): gain}` of its positives
            (one entry with gain 1.0 for a pair with one `positive`).
        exclude (`list[int]`): per query, a gallery index left out of the ranking (-1 for none): a product anchor
            that is itself in the gallery would otherwise retrieve itself.
        pair_indices (`list[int]`): per query, its pair's position in `catalogue.pairs[split]`.
    """

    name: str
    queries: list[Query | Product] = field(default_factory=list)
    relevant: list[dict[int, float]] = field(default_factory=list)
    exclude: list[int] = field(default_factory=list)
    pair_indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.queries)


def _task_name(anchor: str | Query) -> str:
    if isinstance(anchor, str):
        return "product->product"
    if anchor.text and anchor.image is not None:
        return "multimodal->product"
    return "text->product" if anchor.text else "image->product"


def build_retrieval_tasks(catalogue: Catalogue, split: str) -> list[RetrievalTask]:
    """Group a split's pairs into retrieval tasks by anchor kind, against the split's (hard) gallery.

    Args:
        catalogue (`Catalogue`): a loaded catalogue.
        split (`str`): a split with pairs, e.g. `"test"`.

    Returns:
        `list[RetrievalTask]`: the non-empty tasks, in `TASKS` order; queries keep the pairs' order.

    Raises:
        `DataError`: the split is missing or has no pairs, a positive is not in the gallery (it could never be
            retrieved), or a product anchor is one of its own positives.
    """
    if not catalogue.pairs.get(split):
        raise DataError(f"catalogue has no pairs for split {split!r} (splits: {', '.join(catalogue.pairs) or 'none'})")
    pairs = catalogue.pairs[split]
    gallery = {pid: i for i, pid in enumerate(catalogue.gallery(split))}
    tasks = {name: RetrievalTask(name) for name in TASKS}
    for number, pair in enumerate(pairs):
        for pid in pair.positive_ids:
            if pid not in gallery:
                raise DataError(f"split {split!r}, pair {number}: positive {pid!r} is not in the {split!r} gallery "
                                f"({len(gallery)} products), so it cannot be retrieved")
        if isinstance(pair.anchor, str):
            if pair.anchor in pair.positive_ids:
                raise DataError(f"split {split!r}, pair {number}: product anchor {pair.anchor!r} is one of its own positives")
            if pair.anchor not in catalogue.products:
                raise DataError(f"split {split!r}, pair {number}: unknown anchor product id {pair.anchor!r}")
            query: Query | Product = catalogue.products[pair.anchor]
            skip = gallery.get(pair.anchor, -1)
        else:
            query, skip = pair.anchor, -1
        task = tasks[_task_name(pair.anchor)]
        task.queries.append(query)
        task.relevant.append({gallery[pid]: gain for pid, gain in pair.gains.items()})
        task.exclude.append(skip)
        task.pair_indices.append(number)
    return [task for task in tasks.values() if task.queries]


def task_chance(task: RetrievalTask, gallery_size: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """A random ranking's expected metrics on `task` (its queries' relevant counts and gains, excluded anchors)."""
    size = gallery_size - int(any(s >= 0 for s in task.exclude))
    if all(len(rel) == 1 for rel in task.relevant):
        return chance_metrics(size, ks)
    return chance_metrics(size, ks, gains=[list(rel.values()) for rel in task.relevant])


# ------------------------------------------------------------------------------------------------------- embedding
def _encode(embedder: Any, records: Sequence[Any], mode: str, catalogue: Catalogue, batch_size: int,
            show_progress: bool, ids: bool = False) -> tuple[np.ndarray, list[Any]]:
    """Vectors, and in `reason` mode the reasoning of every record (decoded, or token ids if `ids`; else [])."""
    wanted: bool | str = ("ids" if ids else True) if mode == "reason" else False
    out = embedder.encode(records, mode=mode, batch_size=batch_size, load_image=catalogue.image,
                          show_progress=show_progress, return_completions=wanted)
    return out if mode == "reason" else (out, [])


def _chain_attributes(traces: Sequence[str], products: Sequence[Product],
                      catalogue: Catalogue) -> dict[str, dict[str, float]]:
    """`chain_attribute_accuracy` of the gallery's chains; {} when no gallery product has attributes.

    The vocabulary is the whole catalogue's, not the gallery's: a chain naming a value that only training products
    have is still wrong, and chance follows the catalogue's value frequencies.
    """
    vocabulary = attribute_vocabulary(p.attributes for p in catalogue.products.values())
    return chain_attribute_accuracy(traces, [p.attributes for p in products], vocabulary)


_WELL_FORMED = re.compile(r"^<think>(?:(?!</?think>).)+</think>$", re.S)


def well_formed_rate(traces: Sequence[str]) -> float:
    """Share of completions that are exactly one non-empty `<think>...</think>` block, closed before the turn ends.

    A completion that ran out of tokens (no end of turn) ends mid-thought and does not match.
    """
    return sum(bool(_WELL_FORMED.match(t.strip())) for t in traces) / max(len(traces), 1)


def evaluate_embedder(
    embedder: Any, catalogue: Catalogue, split: str = "test", modes: Sequence[str] = ("direct",),
    ks: Sequence[int] = (1, 5, 10), batch_size: int = 32, show_progress: bool = False, *, zero_shot: bool = True,
    faithfulness: bool = False, dims: Sequence[int] = (),
) -> dict[str, Any]:
    """Retrieval metrics of an embedder on every task of a split, for each gallery embedding mode.

    Queries are embedded once, in `direct` mode, whatever `modes` says: queries never reason (a search has to be
    answered at once; reasoning is spent offline on the catalogue). The gallery is embedded once per mode, so
    `reason` means "the products reason first".

    Args:
        embedder (`MoonEmbedder`): anything with `MoonEmbedder.encode`'s signature.
        catalogue (`Catalogue`): a loaded catalogue with pairs for `split`.
        split (`str`, *optional*, defaults to `"test"`): the split to evaluate (`recipe.data.test_split`).
        modes (`Sequence[str]`, *optional*, defaults to `("direct",)`): gallery modes, `"direct"` and/or `"reason"`.
        ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 10)`): `recall@k` cutoffs (`recipe.eval.k`).
        batch_size (`int`, *optional*, defaults to `32`): encode batch size (`recipe.eval.batch_size`).
        show_progress (`bool`, *optional*, defaults to `False`): progress bars while embedding.
        zero_shot (`bool`, *optional*, defaults to `True`): also classify the gallery's categories and predict its
            attributes zero-shot (evaluation/zero_shot.py), per mode, when the catalogue has them.
        faithfulness (`bool`, *optional*, defaults to `False`): with the `reason` mode, also measure how much the
            embeddings depend on the reasoning (evaluation/faithfulness.py; samples two more chains per product).
        dims (`Sequence[int]`, *optional*): Matryoshka sizes to score besides the full one: queries and gallery cut to
            the first `d` values (renormalised), as `embed --dim d` indexes them.

    Returns:
        `dict`: `{mode: {task: {"recall@1": ..., "mrr@10": ..., "ndcg@10": ...}}}` for each mode, plus
        `"gallery_size"` (int), `"n_queries"` (`{task: int}`), `"chance"` (`{task: metrics}` of a random ranking;
        recall@1 = 1 / gallery_size) and `"split"`; with `zero_shot`, `"zero_shot"`: `{mode: {"classification":
        ..., "attributes": ...}}`; with `faithfulness`, `"faithfulness"` (see `faithfulness.faithfulness`); with the
        `reason` mode and products with attributes, `"chain_attributes"`: `{attribute: {"right", "wrong", "chance",
        "n"}}`, the share of the gallery's greedy chains naming the product's value, another value of the attribute,
        and chance, over the whole catalogue's values (see `moon_rl.data.chains.chain_attribute_accuracy`); with
        `dims`, `"dims"`: `{mode: {str(d): {task: metrics}}}` for every size, the full one included.

    Raises:
        `DataError`: see `build_retrieval_tasks`.
    """
    tasks = build_retrieval_tasks(catalogue, split)
    gallery_ids = catalogue.gallery(split)
    gallery_products = [catalogue.products[pid] for pid in gallery_ids]
    # All tasks' queries in one encode call: fewer, fuller batches.
    all_queries = [q for task in tasks for q in task.queries]
    logger.info("evaluating split %r: %d queries, gallery of %d products, modes %s",
                split, len(all_queries), len(gallery_ids), list(modes))
    query_vecs, _ = _encode(embedder, all_queries, "direct", catalogue, batch_size, show_progress)
    bounds = np.cumsum([0] + [len(task) for task in tasks])
    results: dict[str, Any] = {}
    space = label_space(catalogue) if zero_shot else {}

    def encode_text(texts: list[str]) -> np.ndarray:
        return embedder.encode(texts, mode="direct", batch_size=batch_size)

    def task_metrics(gallery_vecs: np.ndarray, cutoffs: Sequence[int], dim: int | None = None
                     ) -> dict[str, dict[str, float]]:
        queries, gallery = truncate(query_vecs, dim), truncate(gallery_vecs, dim)
        return {
            task.name: retrieval_metrics(queries[bounds[i]:bounds[i + 1]], gallery, task.relevant, cutoffs,
                                         exclude=task.exclude)
            for i, task in enumerate(tasks)
        }

    vectors: dict[str, np.ndarray] = {}
    trace_ids: list[list[int]] = []
    for mode in modes:
        want_ids = faithfulness and mode == "reason"
        gallery_vecs, traces = _encode(embedder, gallery_products, mode, catalogue, batch_size, show_progress,
                                       ids=want_ids)
        vectors[mode] = gallery_vecs
        if want_ids:
            trace_ids = traces
            traces = embedder.processor.tokenizer.batch_decode(traces, skip_special_tokens=False)
        if mode == "reason":
            results["reason_format_rate"] = well_formed_rate(traces)
            results["reason_examples"] = traces[:3]
            if chains := _chain_attributes(traces, gallery_products, catalogue):
                results["chain_attributes"] = chains
        results[mode] = task_metrics(gallery_vecs, ks)
        if dims:
            full = gallery_vecs.shape[1]
            results.setdefault("dims", {})[mode] = {
                str(d): results[mode] if d == full else task_metrics(gallery_vecs, ks, d)
                for d in sorted({full, *dims}, reverse=True)}
        if space:
            results.setdefault("zero_shot", {})[mode] = zero_shot_tasks(gallery_products, gallery_vecs, space,
                                                                          encode_text)
    if faithfulness and "reason" in vectors:
        results["faithfulness"] = measure_faithfulness(
            embedder, gallery_products, vectors["reason"], trace_ids, vectors.get("direct"),
            lambda vecs: {name: m["recall@1"] for name, m in task_metrics(vecs, (1,)).items()},
            load_image=catalogue.image, batch_size=batch_size,
        )
    results["gallery_size"] = len(gallery_ids)
    results["n_queries"] = {task.name: len(task) for task in tasks}
    # product->product leaves the anchor out of the ranking when it is in the gallery: one candidate fewer.
    results["chance"] = {task.name: task_chance(task, len(gallery_ids), ks) for task in tasks}
    results["split"] = split
    return results


# ------------------------------------------------------------------------------------------------------------ table
def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def result_modes(result: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The `{mode: {task: metrics}}` part of an `evaluate_embedder`-shaped result."""
    return {key: value for key, value in result.items() if key not in RESULT_INFO_KEYS and isinstance(value, Mapping)}


def format_table(
    results: Mapping[str, Mapping[str, Any]], ks: Sequence[int] = (1, 5, 10), *, include_chance: bool = True
) -> str:
    """A markdown table of retrieval results: one row per (model, mode), columns task x metric.

    Args:
        results (`Mapping[str, dict]`): model name -> an `evaluate_embedder`-shaped result (`{mode: {task: metrics}}`,
            extra keys such as `gallery_size` ignored). A task's metrics may be None (not applicable, e.g. image
            tasks of a text-only model) and a metric may be missing (e.g. a ceiling known only at R@1): shown as `–`.
        ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 10)`): the `recall@k` columns (R@k); MRR@10 follows.
        include_chance (`bool`, *optional*, defaults to `True`): add a `chance` row from the first result that has
            a `"chance"` entry.

    Returns:
        `str`: the table, without a trailing newline.
    """
    rows: list[tuple[str, str, Mapping[str, Any]]] = []
    for model, result in results.items():
        rows += [(model, mode, per_task) for mode, per_task in result_modes(result).items()]
    chance = next((r["chance"] for r in results.values() if isinstance(r.get("chance"), Mapping)), None)
    if include_chance and chance is not None:
        rows.append(("chance", "–", chance))
    present = {task for _, _, per_task in rows for task in per_task}
    tasks = [t for t in TASKS if t in present] + sorted(present - set(TASKS))
    metrics = [(f"R@{k}", f"recall@{k}") for k in ks] + [("MRR", f"mrr@{RANK_CUTOFF}")]
    header = ["model", "mode"] + [f"{task} {label}" for task in tasks for label, _ in metrics]
    cells = []
    for model, mode, per_task in rows:
        row = [model, mode]
        for task in tasks:
            task_metrics = per_task.get(task) or {}
            row += [_fmt(task_metrics.get(key)) for _, key in metrics]
        cells.append(row)
    return markdown_table(header, cells)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the first two columns (model, mode) left-aligned, the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
