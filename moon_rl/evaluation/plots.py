"""PNG plots for `moon-rl eval`: Recall@k curves per model and mode, and training curves of every stage of a run.

matplotlib runs headless (Agg); every function writes one file and returns its path, or None when there is nothing
to draw (e.g. a stage without logged steps).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from moon_rl.evaluation.result import EvaluationResult

logger = logging.getLogger(__name__)


class Panel(NamedTuple):
    """One training-curves panel: its title, the log_history keys (or `re:` regexes) it draws, and its y range.

    `unit_interval` pins the y axis to [0, 1] for shares and cosines, so a flat 0.98 reads as near the top rather than
    as a line through the middle of an auto-scaled axis.
    """

    title: str
    patterns: list[str]
    unit_interval: bool = False


#: Per stage: the panels, in drawing order; a panel none of whose keys were logged is left out (older runs).
TRAINING_PANELS: dict[str, list[Panel]] = {
    "sft": [
        Panel("total loss", ["loss"]),
        Panel("LM loss on the reasoning", ["lm_loss"]),
        Panel("InfoNCE", [r"re:^infonce/"]),
        Panel("in-batch retrieval accuracy", [r"re:^retrieval_acc/"]),
    ],
    "grpo": [
        Panel("reward (weighted total; mean within-group std)", ["reward", "reward_std"]),
        Panel("reward per function (mean)", [r"re:^rewards/.+/mean$"]),
        # Collapse of a group's spread starves GRPO of advantage: every group alike means no gradient.
        Panel("group spread (zero-std groups, completion cosine)",
              ["frac_reward_zero_std", "spread/group_embedding_cosine"], unit_interval=True),
        Panel("sampled chains naming the right value", [r"re:^chain/"], unit_interval=True),
        # Below 0.5 the reward pushes the policy away from the truth as often as towards it.
        Panel("reward preferred the right chain (groups that disagree)", [r"re:^reward_judge/"], unit_interval=True),
        Panel("InfoNCE", ["infonce"]),
        Panel("completion length (tokens)", ["completions/mean_length"]),
    ],
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    import io

    from moon_rl.cache import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def recall_curves(results: Mapping[str, EvaluationResult], tasks: Sequence[str], path: Path) -> Path | None:
    """Recall@k against k, one panel per retrieval task, one line per (model, mode); a dotted line for chance."""
    plt = _pyplot()
    series = []
    for model, result in results.items():
        for mode, per_task in result.modes.items():
            series.append((f"{model} ({mode})", per_task))
    chance = next((r.chance for r in results.values() if r.chance is not None), None)
    tasks = [t for t in tasks if any((per_task.get(t) or {}) for _, per_task in series)]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for label, per_task in series + ([("chance", chance)] if chance else []):
            metrics = per_task.get(task) or {}
            points = sorted((int(k.split("@")[1]), v) for k, v in metrics.items()
                            if k.startswith("recall@") and v is not None)
            if points:
                style = dict(linestyle=":", color="grey") if label == "chance" else dict(marker="o", markersize=3)
                ax.plot([k for k, _ in points], [v for _, v in points], label=label, **style)
        ax.set(title=task, xlabel="k", ylabel="Recall@k", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    # One legend for all panels: a text-only baseline draws in the first panel only.
    labelled: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labelled.setdefault(label, handle)
    fig.suptitle("Test split: Recall@k against the hard gallery")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.legend(list(labelled.values()), list(labelled), fontsize=7, loc="center right")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def recall_by_dim(results: Mapping[str, EvaluationResult], tasks: Sequence[str], path: Path) -> Path | None:
    """Recall@1 against the embedding size (log scale), one panel per task, one line per (model, mode) that has
    Matryoshka results (`evaluate_embedder(dims=...)`); None when none has."""
    series = [(f"{model} ({mode})", per_dim) for model, r in results.items() for mode, per_dim in (r.dims or {}).items()]
    tasks = [t for t in tasks if any(t in per_task for _, per_dim in series for per_task in per_dim.values())]
    if not series or not tasks:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for label, per_dim in series:
            points = sorted((int(d), (per_task.get(task) or {}).get("recall@1")) for d, per_task in per_dim.items())
            points = [(d, v) for d, v in points if v is not None]
            if points:
                ax.plot([d for d, _ in points], [v for _, v in points], marker="o", markersize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set(title=task, xlabel="embedding size", ylabel="Recall@1", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Test split: Recall@1 against the embedding size (Matryoshka)")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _matching(keys: Sequence[str], pattern: str) -> list[str]:
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return sorted(k for k in keys if rx.search(k))
    return [pattern] if pattern in keys else []


def _step_rows(log_history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    # The final summary row (train_runtime, ...) has a step too, but no per-step metrics worth a point.
    return [r for r in log_history if "step" in r and "train_runtime" not in r]


def training_panels(log_history: Sequence[Mapping[str, Any]], stage: str) -> list[tuple[Panel, list[str]]]:
    """The stage's panels that have logged metrics, each with the log_history keys it draws (older runs lack some)."""
    rows = _step_rows(log_history)
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, int | float)})
    panels = [(panel, [k for p in panel.patterns for k in _matching(keys, p)]) for panel in TRAINING_PANELS.get(stage, [])]
    return [(panel, found) for panel, found in panels if found]


def training_curves(log_history: Sequence[Mapping[str, Any]], stage: str, path: Path) -> Path | None:
    """The stage's logged training metrics against the optimizer step (panels from `TRAINING_PANELS`)."""
    rows = _step_rows(log_history)
    panels = training_panels(log_history, stage)
    if not panels:
        return None
    plt = _pyplot()
    cols = min(len(panels), 2)
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(6 * cols, 3.4 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (panel, found) in zip(axes.flat, panels, strict=False):
        for key in found:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            ax.plot([s for s, _ in points], [v for _, v in points], label=key, marker="o", markersize=2)
        ax.set(title=panel.title, xlabel="step")
        if panel.unit_interval:
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        # Several lines need a legend; so does a regex panel, whose title cannot say which key (`chain/colour`) it drew.
        if len(found) > 1 or found != panel.patterns:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{stage}: training curves")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def stage_training_curves(run_dir: Path, out: Path, missing: list[str] | None = None) -> list[Path]:
    """`training_<stage>.png` for every stage of `run_dir` that left a `log_history.json`; a stage whose log holds no
    logged step gets no plot, and a line saying why in `missing` (when given)."""
    written = []
    for stage in TRAINING_PANELS:
        log = Path(run_dir) / stage / "log_history.json"
        if not log.is_file():
            continue
        try:
            history = json.loads(log.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("%s: unreadable (%s); no training curves for %s", log, exc, stage)
            continue
        path = training_curves(history, stage, out / f"training_{stage}.png")
        if path is not None:
            written.append(path)
        elif missing is not None:
            missing.append(f"`training_{stage}.png` not drawn: {log} holds no logged training step (the stage ran "
                           f"fewer steps than its `logging_steps`)")
    return written
