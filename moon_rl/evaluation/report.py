"""Evaluation summaries and the `moon-rl eval` report: trained models beside the untrained backbone and MiniLM.

`evaluation_summary` evaluates models and baselines into one summary (`summary_json` makes it JSON); `write_report`
turns it into the report folder (report.md, metrics.json, PNG plots); `run_eval` is the `moon-rl eval` command;
`read_results` reads a metrics.json's results back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moon_rl.cache import atomic_write_text
from moon_rl.data.catalogue import Catalogue
from moon_rl.errors import MoonError
from moon_rl.evaluation.baselines import evaluate_minilm, text_ceiling, text_ceiling_result
from moon_rl.evaluation.result import EvaluationResult
from moon_rl.evaluation.retrieval import TASKS, evaluate_embedder, format_table, markdown_table
from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.modeling.folder import finished_model, is_model_folder
from moon_rl.recipe import Recipe

logger = logging.getLogger(__name__)

#: Recall@k curves run from k = 1 to this.
CURVE_MAX_K = 10


def evaluation_summary(
    recipe: Recipe, embedder: MoonEmbedder, catalogue: Catalogue, *, baseline_embedder: MoonEmbedder | None = None,
    label: str = "trained", others: dict[str, MoonEmbedder] | None = None,
) -> dict[str, Any]:
    """Test-split retrieval of `embedder` and the recipe's baselines, with a markdown table.

    Args:
        recipe (`Recipe`): `eval.modes`, `eval.k`, `eval.batch_size`, `eval.baselines`, `data.test_split`.
        embedder (`MoonEmbedder`): the model to report.
        catalogue (`Catalogue`): with the test split's pairs and gallery.
        baseline_embedder (`MoonEmbedder`, *optional*): the "untrained" baseline; default: a fresh model from the
            recipe (builtin backbones and heads are deterministic, so it is the model training started from).
        label (`str`, *optional*, defaults to `"trained"`): the name of `embedder`'s rows.
        others (`dict[str, MoonEmbedder]`, *optional*): more models to report beside it (e.g. "before GRPO").

    Returns:
        `dict[str, Any]`: `{"split", "results": {name: EvaluationResult}, "text_only", "table"}`; `summary_json`
        turns it into metrics.json's content.
    """
    spec = recipe.eval
    split = recipe.data.test_split
    # Every k up to 10 as well as the recipe's: the Recall@k curves need them; the tables show the recipe's.
    ks = sorted(set(spec.k) | set(range(1, CURVE_MAX_K + 1)))
    results: dict[str, EvaluationResult] = {}
    trained = {label: embedder, **(others or {})}
    for name, model in trained.items():
        logger.info("evaluating %s (%s)", name, ", ".join(spec.modes))
        results[name] = evaluate_embedder(model, catalogue, split, spec.modes, ks, spec.batch_size,
                                          faithfulness=spec.faithfulness, dims=model.heads.config.matryoshka_dims)
    if "untrained" in spec.baselines:
        logger.info("evaluating the untrained backbone")
        baseline = baseline_embedder or MoonEmbedder.from_recipe(recipe)
        results["untrained"] = evaluate_embedder(baseline, catalogue, split, spec.modes, ks, spec.batch_size)
    if "minilm" in spec.baselines:
        minilm = evaluate_minilm(catalogue, split, ks)
        if minilm is not None:
            results["minilm"] = minilm
    ceiling = text_ceiling_result(catalogue, split)
    table_rows = dict(results)
    if ceiling is not None:
        table_rows["text-only ceiling"] = ceiling
    table = format_table(table_rows, spec.k)
    # The commands print the table once, from metrics.json; here only for --verbose.
    logger.debug("test split %r, gallery of %d products:\n%s", split, results[label].gallery_size, table)
    return {"split": split, "results": results, "text_only": text_ceiling(catalogue, split), "table": table}


def summary_json(summary: Mapping[str, Any]) -> dict[str, Any]:
    """An `evaluation_summary` as metrics.json holds it: each result by its `to_dict`, the other entries as they are."""
    return {**summary, "results": {name: result.to_dict() for name, result in summary["results"].items()}}


def read_results(metrics: Path) -> dict[str, EvaluationResult]:
    """The results of a metrics.json (`moon-rl eval`'s or a training stage's), by model name."""
    found = json.loads(Path(metrics).read_text())["results"]
    return {name: EvaluationResult.from_dict(result) for name, result in found.items()}


# ------------------------------------------------------------------------------------------------------------ tables
def _cell(value: Any) -> str:
    return "–" if not isinstance(value, int | float) else f"{value:.3f}"


def main_table(results: Mapping[str, EvaluationResult]) -> str:
    """One row per (model, mode): Recall@1 of every retrieval task, then zero-shot category and attribute accuracy."""
    tasks = [t for t in TASKS if any(t in per_task for r in results.values() for per_task in r.modes.values())]
    header = ["model", "mode", *[f"{t} R@1" for t in tasks], "category acc", "attribute acc"]
    rows = []
    for model, result in results.items():
        for mode, per_task in result.modes.items():
            zero_shot = (result.zero_shot or {}).get(mode) or {}
            rows.append([model, mode, *[_cell((per_task.get(t) or {}).get("recall@1")) for t in tasks],
                         _cell((zero_shot.get("classification") or {}).get("accuracy")),
                         _cell((zero_shot.get("attributes") or {}).get("mean"))])
    return markdown_table(header, rows)


def zero_shot_table(results: Mapping[str, EvaluationResult]) -> str | None:
    """Zero-shot category accuracy / macro-F1 and per-attribute accuracy, one row per (model, mode)."""
    entries = [(model, mode, found) for model, r in results.items()
               for mode, found in (r.zero_shot or {}).items() if found]
    if not entries:
        return None
    attributes = sorted({a for _, _, f in entries for a in (f.get("attributes") or {}) if a != "mean"})
    header = ["model", "mode", "category acc", "category macro-F1", *[f"{a} acc" for a in attributes], "mean attr acc"]
    rows = []
    for model, mode, found in entries:
        classification, attrs = found.get("classification") or {}, found.get("attributes") or {}
        rows.append([model, mode, _cell(classification.get("accuracy")), _cell(classification.get("macro_f1")),
                     *[_cell(attrs.get(a)) for a in attributes], _cell(attrs.get("mean"))])
    return markdown_table(header, rows)


def faithfulness_table(results: Mapping[str, EvaluationResult]) -> str | None:
    """Reason mode: chain-to-chain and reason-to-direct cosines, Recall@1 with own vs swapped reasoning."""
    entries = [(model, r.faithfulness) for model, r in results.items() if r.faithfulness]
    if not entries:
        return None
    tasks = [t for t in TASKS if any(t in (f.get("reason") or {}) for _, f in entries)]
    header = ["model", "chains", "cos(chain, chain)", "cos(reason, direct)",
              *[f"{t} R@1 own / swapped" for t in tasks]]
    rows = []
    for model, found in entries:
        own, swapped = found.get("reason") or {}, found.get("swapped") or {}
        rows.append([model, str(found.get("chains_sampled_for", "–")), _cell(found.get("chain_cosine")),
                     _cell(found.get("reason_direct_cosine")),
                     *[f"{_cell(own.get(t))} / {_cell(swapped.get(t))}" for t in tasks]])
    return markdown_table(header, rows)


def dims_table(results: Mapping[str, EvaluationResult]) -> str | None:
    """Matryoshka models: Recall@1 of each task at each embedding size (`embed --dim`), per model and mode."""
    entries = [(model, mode, per_dim) for model, r in results.items() for mode, per_dim in (r.dims or {}).items()]
    if not entries:
        return None
    tasks = [t for t in TASKS if any(t in per_task for _, _, per_dim in entries for per_task in per_dim.values())]
    header = ["model", "mode", "dim", *[f"{t} R@1" for t in tasks]]
    rows = [[model, mode, dim, *[_cell((per_task.get(t) or {}).get("recall@1")) for t in tasks]]
            for model, mode, per_dim in entries for dim, per_task in per_dim.items()]
    return markdown_table(header, rows)


def chain_attribute_table(results: Mapping[str, EvaluationResult]) -> str | None:
    """Reason mode: per attribute, the share of greedy chains naming the right / a wrong value; a chance row last.

    Chance (the expected right share of a chain naming one value at the catalogue's frequencies) depends only on the
    catalogue, so it is one row, from the first model that has the attribute, rather than repeated in every cell.
    """
    entries = [(model, r.chain_attributes) for model, r in results.items() if r.chain_attributes]
    if not entries:
        return None
    attributes = sorted({a for _, found in entries for a in found})
    header = ["model", "mode", *[f"{a} right / wrong" for a in attributes]]
    rows = []
    for model, found in entries:
        cells = [found.get(a) or {} for a in attributes]
        rows.append([model, "reason", *[f"{_cell(c.get('right'))} / {_cell(c.get('wrong'))}" for c in cells]])
    chance = [next((found[a]["chance"] for _, found in entries if a in found), None) for a in attributes]
    rows.append(["chance", "–", *[f"{_cell(c)} / –" for c in chance]])
    return markdown_table(header, rows)


# ------------------------------------------------------------------------------------------------------------ report
def write_report(out: Path, summary: Mapping[str, Any], *, run_dir: Path | None, models: Mapping[str, str]) -> Path:
    """`report.md`, `metrics.json` and the PNG plots of an `evaluation_summary` into `out`; returns report.md."""
    from moon_rl.evaluation.plots import recall_by_dim, recall_curves, stage_training_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = summary["results"]
    atomic_write_text(out / "metrics.json", json.dumps({**summary_json(summary), "models": dict(models)}, indent=2))
    plots = [p for p in [recall_curves(results, TASKS, out / "recall_at_k.png"),
                         recall_by_dim(results, TASKS, out / "recall_by_dim.png")] if p is not None]
    not_drawn: list[str] = []
    if run_dir is not None:
        plots += stage_training_curves(run_dir, out, not_drawn)
    first = next(iter(results.values()))
    lines = [
        "# moon-rl evaluation report", "",
        f"Split `{summary['split']}`: gallery of {first.gallery_size} products (the catalogue's hard gallery of "
        f"look-alikes where it has one); queries per task: {first.n_queries}. Queries are embedded in direct "
        "mode; the mode column says how the gallery was embedded.", "",
        "Models:", "", *[f"- **{name}**: `{where}`" for name, where in models.items()], "",
        "## Main table", "", main_table(results), "",
        "## Retrieval", "", summary["table"], "",
    ]
    if (table := zero_shot_table(results)) is not None:
        lines += ["## Zero-shot classification and attribute prediction", "",
                  "Each product gets the label whose text prompt (the category name, or `attribute: value`) embeds "
                  "closest to it.", "", table, ""]
    if (table := faithfulness_table(results)) is not None:
        lines += ["## Reasoning faithfulness (reason mode)", "",
                  "cos(chain, chain): the same product read out after two sampled reasoning chains; cos(reason, "
                  "direct): greedy reasoning against no reasoning; swapped: every product read out after another "
                  "product's reasoning. Values near 1 and no drop when swapped mean the embedding ignores the "
                  "reasoning. Reported, not judged.", "", table, ""]
    if (table := dims_table(results)) is not None:
        lines += ["## Embedding size (Matryoshka)", "",
                  "Recall@1 with queries and gallery cut to the first `dim` values of each vector and renormalised, as "
                  "`moon-rl embed --dim` indexes them; the model trained these sizes (`model.heads.matryoshka_dims`).",
                  "", table, ""]
    if (table := chain_attribute_table(results)) is not None:
        lines += ["## Chain attribute accuracy (reason mode)", "",
                  "Share of the gallery products' greedy reasoning chains that name the product's own value of each "
                  "attribute (right) and another value of it (wrong; a chain may do both), matched as whole words "
                  "against every value in the catalogue. Chance: the right share of a chain naming one value drawn "
                  "at the catalogue's frequencies.", "", table, ""]
    examples = [(name, r.reason_examples or []) for name, r in results.items()]
    if any(found for _, found in examples):
        lines += ["## Reasoning examples (greedy, first gallery products)", ""]
        for name, found in examples:
            lines += [f"- **{name}**: " + " / ".join(f"`{e[:160]}`" for e in found[:2])] if found else []
        lines.append("")
    if plots or not_drawn:
        lines += ["## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], *[f"- {note}" for note in not_drawn], ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"


def run_eval(recipe: Recipe, models: Mapping[str, Path], out: Path | None = None, *, run_dir: Path | None = None) -> Path:
    """`moon-rl eval`: evaluate `models` (label -> model folder) and the recipe's baselines; write the report folder.

    Returns the folder (`<output_dir>/eval` by default).
    """
    from moon_rl.data.catalogue import load_recipe_catalogue

    if not models:
        raise MoonError(f"nothing to evaluate: no finished sft/grpo model under {recipe.output_dir} and no --model")
    for label, folder in models.items():
        if not is_model_folder(folder):
            raise MoonError(f"--model {folder} ({label}): not a moon-rl model folder (no moon_rl.json)")
    catalogue = load_recipe_catalogue(recipe.data)
    loaded = {label: MoonEmbedder.load(folder) for label, folder in models.items()}
    first, *rest = loaded
    summary = evaluation_summary(recipe, loaded[first], catalogue, label=first,
                                 others={label: loaded[label] for label in rest})
    out = Path(out) if out is not None else Path(recipe.output_dir) / "eval"
    write_report(out, summary, run_dir=run_dir, models={k: str(v) for k, v in models.items()})
    return out


def evaluate_stage(recipe: Recipe, stage: str) -> Path | None:
    """`moon-rl sft` / `moon-rl grpo`'s test metrics: the stage's final model (read from disk) beside the recipe's
    baselines, and after GRPO the model it started from, written to `<output_dir>/<stage>/metrics.json` (with the
    training seconds from `log_history.json`) by the main process. Every process returns once it is written (they
    share a process group under torchrun). Returns the file, None on the other processes or without a final model.
    """
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.logs import is_main_process

    out = Path(recipe.output_dir) / stage
    written, final = None, finished_model(out)
    if is_main_process() and final is not None:
        catalogue = load_recipe_catalogue(recipe.data)
        embedder = MoonEmbedder.load(final)
        if stage == "grpo":
            init = recipe.grpo_init_path(recipe.grpo_config())
            before = {"before GRPO": MoonEmbedder.load(init)} if is_model_folder(init) else {}
            summary = evaluation_summary(recipe, embedder, catalogue, label="after GRPO", others=before)
        else:
            summary = evaluation_summary(recipe, embedder, catalogue)
        history = json.loads((out / "log_history.json").read_text()) if (out / "log_history.json").is_file() else []
        runtimes = [entry["train_runtime"] for entry in history if "train_runtime" in entry]
        summary["train_seconds"] = round(float(runtimes[-1]), 1) if runtimes else None
        written = out / "metrics.json"
        atomic_write_text(written, json.dumps(summary_json(summary), indent=2))
        logger.info("%s metrics written to %s", stage.upper(), written)
    _wait_for_other_processes()
    return written


def _wait_for_other_processes() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def stage_table(stage_dir: Path) -> str:
    """The stage's test-split table (its metrics.json), printed once by the command, or nothing."""
    metrics = stage_dir / "metrics.json"
    table = json.loads(metrics.read_text()).get("table") if metrics.is_file() else None
    return f"{table}\n\n" if table else ""


def model_label(folder: Path) -> str:
    """`runs/x/grpo/final` -> "grpo"; any other folder -> its name."""
    return folder.parent.name if folder.name == "final" else folder.name


def finished_models(run_dir: Path) -> dict[str, Path]:
    """The finished stage models of a run folder, pipeline order: `{"sft": <run>/sft/final, "grpo": ...}`."""
    found = {}
    for stage in ("sft", "grpo"):
        if (final := finished_model(Path(run_dir) / stage)) is not None:
            found[stage] = final
    return found
