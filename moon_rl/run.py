"""`moon-rl run`: a recipe's `stages` in pipeline order (data -> sft -> grpo -> embed -> eval), in one output folder.

A stage whose output is complete is skipped (rerunning a run costs nothing; an index embedded by another model than
the run's newest is not complete), an interrupted training stage resumes
from its newest complete checkpoint, and `overwrite=True` redoes every listed stage. The training stages skip their
own evaluation here: the `eval` stage evaluates every model of the run once, beside the baselines.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from moon_rl.errors import RecipeError
from moon_rl.modeling.folder import MODEL_MANIFEST, finished_model
from moon_rl.recipe import Recipe
from moon_rl.training.checkpoint import latest_checkpoint

logger = logging.getLogger(__name__)


def _say(message: str) -> None:
    logger.info(message)  # the run's progress (moon_rl/logs.py: plain lines on the main process)


def _data(recipe: Recipe, overwrite: bool) -> str:
    from moon_rl.data.catalogue import load_recipe_catalogue

    catalogue = load_recipe_catalogue(recipe.data)
    splits = ", ".join(f"{split} {len(pairs)}" for split, pairs in sorted(catalogue.pairs.items()))
    return f"{len(catalogue)} products, pairs: {splits} ({catalogue.base_dir})"


def _train(stage: str) -> Callable[[Recipe, bool], str]:
    def run(recipe: Recipe, overwrite: bool) -> str:
        if stage == "sft":
            from moon_rl.training.sft import run_sft as train
        else:
            from moon_rl.training.grpo import run_grpo as train
        folder = Path(recipe.output_dir) / stage
        checkpoint = None if overwrite else latest_checkpoint(folder)
        resume = checkpoint is not None
        if resume:
            _say(f"{stage}: resuming the interrupted run from {checkpoint}")
        final = train(recipe, resume=resume, overwrite=overwrite)
        return f"model in {final}"

    return run


def _embed(recipe: Recipe, overwrite: bool) -> str:
    from moon_rl.inference.pipeline import run_embed

    model = latest_model(recipe)
    summary = run_embed(recipe, model_dir=model, catalogue=None, out=None, mode=None, skip_bad=False)
    return summary.summary()


def _eval(recipe: Recipe, overwrite: bool) -> str:
    from moon_rl.evaluation.report import finished_models, run_eval

    run_dir = Path(recipe.output_dir)
    out = run_eval(recipe, finished_models(run_dir), run_dir=run_dir)
    return f"report in {out / 'report.md'}"


def latest_model(recipe: Recipe) -> Path | None:
    """The run's newest finished model (`<output_dir>/grpo/final`, else `<output_dir>/sft/final`), or None."""
    for stage in ("grpo", "sft"):
        if (final := finished_model(Path(recipe.output_dir) / stage)) is not None:
            return final
    return None


STAGE_RUNNERS: dict[str, Callable[[Recipe, bool], str]] = {
    "data": _data, "sft": _train("sft"), "grpo": _train("grpo"), "embed": _embed, "eval": _eval,
}


def stage_done(recipe: Recipe, stage: str) -> Path | None:
    """The file that shows `stage` finished in the recipe's output folder, or None (data is never 'done')."""
    out = Path(recipe.output_dir)
    if stage in ("sft", "grpo"):
        final = finished_model(out / stage)
        return None if final is None else final / MODEL_MANIFEST
    marker = {"embed": out / "embed" / "embed.json", "eval": out / "eval" / "report.md"}.get(stage)
    if marker is None or not marker.is_file():
        return None
    if stage == "embed" and (model := latest_model(recipe)) is not None:
        # An index embedded by another model (an untrained one, or SFT's before GRPO finished) is not this run's.
        try:
            made_by = json.loads(marker.read_text(encoding="utf-8"))["model"]["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if made_by != str(model.resolve()):
            return None
    return marker


def run_stages(recipe: Recipe, *, overwrite: bool = False) -> Path:
    """Run the recipe's stages; returns the output folder. See the module docstring."""
    stages = list(recipe.stages)
    if "grpo" in stages and (overwrite or stage_done(recipe, "grpo") is None):
        from moon_rl.recipe.trainer_configs import reward_problems

        # A misspelt reward would otherwise stop the run when GRPO starts, after the whole SFT stage.
        if problems := reward_problems(recipe):
            raise RecipeError("\n".join(problems))
    started = time.perf_counter()
    for number, stage in enumerate(stages, 1):
        head = f"[{number}/{len(stages)}] {stage}"
        done = stage_done(recipe, stage)
        if done is not None and not overwrite:
            _say(f"{head}: already finished ({done}); skipped (--overwrite to redo)")
            continue
        _say(f"{head}: starting")
        t0 = time.perf_counter()
        what = STAGE_RUNNERS[stage](recipe, overwrite)
        _say(f"{head}: done in {time.perf_counter() - t0:.0f} s: {what}")
    _say(f"all stages done in {time.perf_counter() - started:.0f} s; output in {recipe.output_dir}")
    return Path(recipe.output_dir)
