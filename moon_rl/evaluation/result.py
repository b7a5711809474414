"""`EvaluationResult`: what `evaluate_embedder` and the baselines return, and what `metrics.json` holds per model.

Retrieval metrics per gallery mode (`direct`, `reason`) and task, plus what else an evaluation measured (gallery
size, queries per task, chance, zero-shot accuracy, faithfulness, chain attribute accuracy, Matryoshka sizes), each
in a typed field. `to_dict` writes the JSON layout moon-rl has always written (modes and info keys side by side in one
object) and `from_dict` reads it back, older files included; a field that was not measured is None and has no key.

Like a sentence-transformers evaluator, a result names one primary metric (`primary_metric`, `primary_value`): the
number to compare two models by when only one is wanted.

    result = evaluate_embedder(embedder, catalogue, "test", modes=("direct", "reason"))
    result.recall_at_1("reason", "text->product")
    result.primary_metric, result.primary_value  # "reason/text->product/recall@1", 0.42
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["MODES", "PRIMARY_TASK", "EvaluationResult", "TaskMetrics"]

#: Gallery embedding modes (`recipe.eval.modes`): the keys of a result's JSON that are modes.
MODES: tuple[str, ...] = ("direct", "reason")
#: The task whose Recall@1 is the primary metric when the split has it: the search moon-rl is built for.
PRIMARY_TASK = "text->product"

#: `{task: {"recall@1": ..., "mrr@10": ..., "ndcg@10": ...}}`; a task's metrics are None where it does not apply
#: (a text-only baseline's image tasks).
TaskMetrics = dict[str, dict[str, float] | None]

# `to_dict`'s key order is the order `evaluate_embedder` used to insert the keys, so that metrics.json files stay
# byte-identical to the ones written before this class: the reason-mode keys just before the `reason` mode, the
# per-mode maps after the first mode, faithfulness and the split's numbers last.
_BEFORE_REASON = ("reason_format_rate", "reason_examples", "chain_attributes")
_AFTER_FIRST_MODE = ("dims", "zero_shot")
_LAST = ("faithfulness", "gallery_size", "n_queries", "chance", "split")


@dataclass
class EvaluationResult:
    """Retrieval metrics of one model on one split, per gallery mode and task, and what else was measured.

    Every field but `modes` is None when it was not measured (and then has no key in `to_dict`).

    Attributes:
        modes (`dict[str, TaskMetrics]`): `{mode: {task: {"recall@1": ..., "mrr@10": ..., "ndcg@10": ...}}}`, one
            entry per gallery mode evaluated (queries are always embedded in `direct` mode).
        gallery_size (`int`, *optional*): products in the split's gallery.
        n_queries (`dict[str, int]`, *optional*): queries per task.
        chance (`dict[str, dict[str, float]]`, *optional*): per task, a random ranking's expected metrics.
        split (`str`, *optional*): the split evaluated.
        reason_format_rate (`float`, *optional*): `reason` mode: share of the gallery's greedy chains that are one
            well-formed `<think>...</think>` block.
        reason_examples (`list[str]`, *optional*): `reason` mode: the first gallery products' greedy chains.
        zero_shot (`dict[str, dict]`, *optional*): `{mode: {"classification": ..., "attributes": ...}}`
            (evaluation/zero_shot.py).
        faithfulness (`dict`, *optional*): how much the `reason` embeddings follow the reasoning
            (evaluation/faithfulness.py).
        chain_attributes (`dict[str, dict[str, float]]`, *optional*): `reason` mode: `{attribute: {"right", "wrong",
            "chance", "n"}}` of the gallery's greedy chains (`moon_rl.data.chains.chain_attribute_accuracy`).
        dims (`dict[str, dict[str, TaskMetrics]]`, *optional*): Matryoshka sizes, `{mode: {str(dim): {task:
            metrics}}}`, the full size included.
    """

    modes: dict[str, TaskMetrics]
    gallery_size: int | None = None
    n_queries: dict[str, int] | None = None
    chance: dict[str, dict[str, float]] | None = None
    split: str | None = None
    reason_format_rate: float | None = None
    reason_examples: list[str] | None = None
    zero_shot: dict[str, dict[str, Any]] | None = None
    faithfulness: dict[str, Any] | None = None
    chain_attributes: dict[str, dict[str, float]] | None = None
    dims: dict[str, dict[str, TaskMetrics]] | None = None

    # ------------------------------------------------------------------------------------------------ reading
    def recall_at_1(self, mode: str, task: str) -> float | None:
        """Recall@1 of `task` with the gallery in `mode`; None where the task does not apply (its metrics are None).

        Raises:
            `KeyError`: `mode` was not evaluated, or the split has no `task` queries.
        """
        metrics = self.modes[mode][task]
        return None if metrics is None else metrics.get("recall@1")

    @property
    def primary_mode(self) -> str | None:
        """`reason` when it was evaluated, else `direct`, else the first mode; None without modes."""
        # The reasoning gallery is what moon-rl trains for; `direct` is the fallback every model has.
        for mode in ("reason", "direct"):
            if mode in self.modes:
                return mode
        return next(iter(self.modes), None)

    def _primary(self) -> tuple[str, str] | None:
        mode = self.primary_mode
        scored = [task for task, metrics in self.modes[mode].items() if metrics] if mode is not None else []
        if not scored:
            return None
        return mode, PRIMARY_TASK if PRIMARY_TASK in scored else scored[0]

    @property
    def primary_metric(self) -> str | None:
        """The name of the one number to compare models by: `"{mode}/{task}/recall@1"`.

        The mode is `primary_mode` (`reason` when evaluated: the gallery reasons first, what moon-rl trains for;
        else `direct`). The task is `text->product` (`PRIMARY_TASK`) when that mode scored it, else the first task it
        scored. None when no task was scored.
        """
        found = self._primary()
        return None if found is None else f"{found[0]}/{found[1]}/recall@1"

    @property
    def primary_value(self) -> float | None:
        """The value of `primary_metric` (None where it is)."""
        found = self._primary()
        return None if found is None else self.recall_at_1(*found)

    # ------------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of `metrics.json`'s `results` entries: each mode under its name, beside the info keys.

        Returns:
            `dict`: `{mode: {task: metrics}, ..., "gallery_size": ..., "n_queries": ..., ...}`; fields that are None
            are left out. The nested dicts are this result's own, not copies.
        """
        info = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "modes"}
        order: list[str] = []
        for number, mode in enumerate(self.modes):
            if mode == "reason":
                order += _BEFORE_REASON
            order.append(mode)
            if number == 0:
                order += _AFTER_FIRST_MODE
        order += [name for name in info if name not in order and name not in _LAST] + list(_LAST)
        values = {**info, **self.modes}
        return {key: values[key] for key in order if values[key] is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        """Read a result back from `to_dict`'s layout (a `metrics.json` `results` entry, older ones included).

        Args:
            data (`Mapping[str, Any]`): mode names (`MODES`) and info keys (this class's field names); a missing
                info key (a file older than that measurement) reads as None.

        Returns:
            `EvaluationResult`: the result; its modes keep the order of `data`.

        Raises:
            `ValueError`: a key is neither a mode nor an info key (naming both lists).
        """
        info = {f.name for f in fields(cls)} - {"modes"}
        unknown = [key for key in data if key not in info and key not in MODES]
        if unknown:
            raise ValueError(f"evaluation result: unknown keys {unknown}; modes are {list(MODES)}, other keys "
                             f"{sorted(info)}")
        return cls(modes={key: value for key, value in data.items() if key in MODES},
                   **{key: value for key, value in data.items() if key in info})
