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
from typing import Any

logger = logging.getLogger(__name__)

#: Per stage: (panel title, metric keys or regexes of the trainer's log_history) in drawing order.
TRAINING_PANELS: dict[str, list[tuple[str, list[str]]]] = {
    "sft": [
        ("total loss", ["loss"]),
        ("LM loss on the reasoning", ["lm_loss"]),
        ("InfoNCE", [r"re:^infonce/"]),
        ("in-batch retrieval accuracy", [r"re:^retrieval_acc/"]),
    ],
    "grpo": [
        ("reward (weighted total)", ["reward"]),
        ("reward per function (mean)", [r"re:^rewards/.+/mean$"]),
        ("InfoNCE", ["infonce"]),
        ("completion length (tokens)", ["completions/mean_length"]),
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


def recall_curves(results: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], path: Path) -> Path | None:
    """Recall@k against k, one panel per retrieval task, one line per (model, mode); a dotted line for chance."""
    from moon_rl.evaluation.retrieval import result_modes

    plt = _pyplot()
    series = []
    for model, result in results.items():
        for mode, per_task in result_modes(result).items():
            series.append((f"{model} ({mode})", per_task))
    chance = next((r.get("chance") for r in results.values() if isinstance(r.get("chance"), Mapping)), None)
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


def _matching(keys: Sequence[str], pattern: str) -> list[str]:
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return sorted(k for k in keys if rx.search(k))
    return [pattern] if pattern in keys else []


def training_curves(log_history: Sequence[Mapping[str, Any]], stage: str, path: Path) -> Path | None:
    """The stage's logged training metrics against the optimizer step (panels from `TRAINING_PANELS`)."""
    rows = [r for r in log_history if "step" in r and "train_runtime" not in r]
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, int | float)})
    panels = [(title, [k for p in patterns for k in _matching(keys, p)])
              for title, patterns in TRAINING_PANELS.get(stage, [])]
    panels = [(title, found) for title, found in panels if found]
    if not panels:
        return None
    plt = _pyplot()
    cols = min(len(panels), 2)
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(6 * cols, 3.4 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (title, found) in zip(axes.flat, panels, strict=False):
        for key in found:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            ax.plot([s for s, _ in points], [v for _, v in points], label=key, marker="o", markersize=2)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if len(found) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{stage}: training curves")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def stage_training_curves(run_dir: Path, out: Path) -> list[Path]:
    """`training_<stage>.png` for every stage of `run_dir` that left a `log_history.json`."""
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
    return written
