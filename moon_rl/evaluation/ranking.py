"""Ranking metrics of retrieval (no model): the rank of each query's relevant gallery items, Recall@k, MRR@10 and
graded nDCG@10, and their exact chance values under a uniformly random ranking. `moon_rl.evaluation.retrieval`
embeds the queries and the gallery and calls these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["RANK_CUTOFF", "chance_metrics", "graded_metrics", "metrics_from_ranks", "positive_ranks",
           "relevant_ranks", "retrieval_metrics"]

#: MRR and nDCG are reported at this cutoff (the usual BEIR / MTEB / sentence-transformers choice).
RANK_CUTOFF = 10
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
