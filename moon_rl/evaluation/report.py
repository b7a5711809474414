"""Evaluation summaries written next to trained models: the model beside the untrained backbone and MiniLM."""

from __future__ import annotations

import logging
from typing import Any

from moon_rl.data.catalogue import Catalogue
from moon_rl.evaluation.baselines import evaluate_minilm, text_ceiling, text_ceiling_result
from moon_rl.evaluation.retrieval import evaluate_embedder, format_table
from moon_rl.modeling.embedder import MoonEmbedder

logger = logging.getLogger(__name__)


def evaluation_summary(
    recipe: Any, embedder: MoonEmbedder, catalogue: Catalogue, *, baseline_embedder: MoonEmbedder | None = None,
    label: str = "trained", others: dict[str, MoonEmbedder] | None = None,
) -> dict[str, Any]:
    """Test-split retrieval of `embedder` and the recipe's baselines, as one JSON-able dict with a markdown table.

    Args:
        recipe (`Recipe`): `eval.modes`, `eval.k`, `eval.batch_size`, `eval.baselines`, `data.test_split`.
        embedder (`MoonEmbedder`): the model to report.
        catalogue (`Catalogue`): with the test split's pairs and gallery.
        baseline_embedder (`MoonEmbedder`, *optional*): the "untrained" baseline; default: a fresh model from the
            recipe (builtin backbones and heads are deterministic, so it is the model training started from).
        label (`str`, *optional*, defaults to `"trained"`): the name of `embedder`'s rows.
        others (`dict[str, MoonEmbedder]`, *optional*): more models to report beside it (e.g. "before GRPO").
    """
    spec = recipe.eval
    split = recipe.data.test_split
    results: dict[str, Any] = {}
    results[label] = evaluate_embedder(embedder, catalogue, split, spec.modes, spec.k, spec.batch_size)
    for name, other in (others or {}).items():
        results[name] = evaluate_embedder(other, catalogue, split, spec.modes, spec.k, spec.batch_size)
    if "untrained" in spec.baselines:
        baseline = baseline_embedder or MoonEmbedder.from_recipe(recipe)
        results["untrained"] = evaluate_embedder(baseline, catalogue, split, spec.modes, spec.k, spec.batch_size)
    if "minilm" in spec.baselines:
        minilm = evaluate_minilm(catalogue, split, spec.k)
        if minilm is not None:
            results["minilm"] = minilm
    ceiling = text_ceiling_result(catalogue, split)
    table_rows = dict(results)
    if ceiling is not None:
        table_rows["text-only ceiling"] = ceiling
    table = format_table(table_rows, spec.k)
    logger.warning("test split %r, gallery of %d products:\n%s", split, results[label]["gallery_size"], table)
    return {"split": split, "results": results, "text_only": text_ceiling(catalogue, split), "table": table}
