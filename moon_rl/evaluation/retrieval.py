"""Retrieval evaluation: Recall@k, MRR@10 and nDCG@10 of an embedder on a catalogue split's hard gallery.

Each pair of a split is one query; its anchor kind names the task it belongs to (`text->product`, `image->product`,
`multimodal->product`, `product->product`) and its positive (or `positives`, with their graded `relevance`) are the
relevant gallery products: Recall@k and MRR count the first relevant product retrieved, nDCG uses the gains. The gallery is
`Catalogue.gallery(split)`: for the synthetic catalogue, the test products with their look-alike families, so a
model must tell a product from its near-duplicates.

Queries are always embedded in `direct` mode; only the gallery products are embedded once per mode, because reasoning
is a property of how the catalogue is indexed (offline, once) while a search query must be answered at once.

    result = evaluate_embedder(embedder, catalogue, split="test", modes=("direct", "reason"))
    print(format_table({"moon-rl": result}, ks=(1, 5, 10)))
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
from moon_rl.evaluation.ranking import (
    RANK_CUTOFF,
    chance_metrics,
    graded_metrics,
    positive_ranks,
    relevant_ranks,
    retrieval_metrics,
)
from moon_rl.evaluation.result import EvaluationResult, TaskMetrics
from moon_rl.evaluation.zero_shot import label_space, zero_shot_tasks
from moon_rl.modeling.matryoshka import truncate

__all__ = [  # the ranking metrics are re-exported: they are this module's API too
    "RANK_CUTOFF",
    "TASKS",
    "positive_ranks",
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
) -> EvaluationResult:
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
        `EvaluationResult`: `modes` is `{mode: {task: {"recall@1": ..., "mrr@10": ..., "ndcg@10": ...}}}` for each
        mode; `gallery_size`, `n_queries` (`{task: int}`), `chance` (`{task: metrics}` of a random ranking; recall@1 =
        1 / gallery_size) and `split` are always set; with `zero_shot` (and a catalogue with categories or
        attribute values to predict), `zero_shot`: `{mode: {"classification": ..., "attributes": ...}}`; with
        `faithfulness` and the `reason` mode, `faithfulness` (see `faithfulness.faithfulness`); with the `reason`
        mode, `reason_format_rate`, `reason_examples` and, for products with attributes, `chain_attributes`:
        `{attribute: {"right", "wrong", "chance", "n"}}`, the share of the gallery's greedy chains naming the
        product's value, another value of the attribute, and chance, over the whole catalogue's values (see
        `moon_rl.data.chains.chain_attribute_accuracy`); with `dims`, `dims`: `{mode: {str(d): {task: metrics}}}` for
        every size, the full one included. The fields it leaves None have no key in `to_dict` (metrics.json).

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
    result = EvaluationResult(modes={}, split=split)
    per_dim: dict[str, dict[str, TaskMetrics]] = {}
    per_mode_zero_shot: dict[str, dict[str, Any]] = {}
    space = label_space(catalogue) if zero_shot else {}

    def encode_text(texts: list[str]) -> np.ndarray:
        return embedder.encode(texts, mode="direct", batch_size=batch_size)

    def task_metrics(gallery_vecs: np.ndarray, cutoffs: Sequence[int], dim: int | None = None) -> TaskMetrics:
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
            result.reason_format_rate = well_formed_rate(traces)
            result.reason_examples = traces[:3]
            result.chain_attributes = _chain_attributes(traces, gallery_products, catalogue) or None
        result.modes[mode] = task_metrics(gallery_vecs, ks)
        if dims:
            full = gallery_vecs.shape[1]
            per_dim[mode] = {str(d): result.modes[mode] if d == full else task_metrics(gallery_vecs, ks, d)
                             for d in sorted({full, *dims}, reverse=True)}
        if space:
            per_mode_zero_shot[mode] = zero_shot_tasks(gallery_products, gallery_vecs, space, encode_text)
    result.dims = per_dim or None
    result.zero_shot = per_mode_zero_shot or None
    if faithfulness and "reason" in vectors:
        result.faithfulness = measure_faithfulness(
            embedder, gallery_products, vectors["reason"], trace_ids, vectors.get("direct"),
            lambda vecs: {name: m["recall@1"] for name, m in task_metrics(vecs, (1,)).items()},
            load_image=catalogue.image, batch_size=batch_size,
        )
    result.gallery_size = len(gallery_ids)
    result.n_queries = {task.name: len(task) for task in tasks}
    # product->product leaves the anchor out of the ranking when it is in the gallery: one candidate fewer.
    result.chance = {task.name: task_chance(task, len(gallery_ids), ks) for task in tasks}
    return result


# ------------------------------------------------------------------------------------------------------------ table
def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_table(
    results: Mapping[str, EvaluationResult], ks: Sequence[int] = (1, 5, 10), *, include_chance: bool = True
) -> str:
    """A markdown table of retrieval results: one row per (model, mode), columns task x metric.

    Args:
        results (`Mapping[str, EvaluationResult]`): model name -> its result; one row per mode of its `modes`. A
            task's metrics may be None (not applicable, e.g. image tasks of a text-only model) and a metric may be
            missing (e.g. a ceiling known only at R@1): shown as `–`.
        ks (`Sequence[int]`, *optional*, defaults to `(1, 5, 10)`): the `recall@k` columns (R@k); MRR@10 follows.
        include_chance (`bool`, *optional*, defaults to `True`): add a `chance` row from the first result that has
            `chance`.

    Returns:
        `str`: the table, without a trailing newline.
    """
    rows: list[tuple[str, str, Mapping[str, Any]]] = []
    for model, result in results.items():
        rows += [(model, mode, per_task) for mode, per_task in result.modes.items()]
    chance = next((r.chance for r in results.values() if r.chance is not None), None)
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
