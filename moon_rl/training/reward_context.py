"""`ContextReward`: how `MoonGRPOTrainer` calls a reward, with its per-batch context (`RewardBatch`) and its failures
contained.

The trainer wraps each `RewardEntry` of `build_rewards` as `ContextReward(entry.fn, context, entry.name)` and hands
the wrappers to TRL, which logs each under the wrapper's `__name__`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moon_rl.training.candidates import Candidates

logger = logging.getLogger(__name__)

__all__ = ["ContextReward", "RewardBatch"]


@dataclass
class RewardBatch:
    """The state of one generation batch: what its reward functions get beside TRL's keywords, and what its loss steps
    need (the candidate pool; each row's pair and product). One object per generation batch, replaced by the next.

    Attributes:
        embeddings (`torch.Tensor` of shape `(N, D)`): read-outs of this process's completions (no gradient, dropout
            off), L2-normalised.
        candidates (`torch.Tensor` of shape `(M, D)`): direct-mode query embeddings of the candidate pool
            (training/candidates.py): every process's queries, the look-alikes' queries, the queue.
        positive_index (`torch.Tensor` of shape `(N,)`): each completion's own query in `candidates`.
        candidate_mask (`torch.Tensor` of shape `(N, M)`, bool): False where a candidate is another right answer for
            the completion's product (another query of it, or a query listing it among its `positives`): not a wrong
            answer. The positive is always True.
        truncated (`list[bool]`): the completion ran out of tokens before closing its turn.
        attributes (`list[dict[str, str]]`): the product's attributes, per completion.
        pool (`Candidates`): the candidates with their pairs (the loss's InfoNCE negatives).
        pairs (`torch.Tensor` of shape `(N,)`): each completion's pair (its query); rides along as `moon_pair`.
    """

    embeddings: torch.Tensor
    candidates: torch.Tensor
    positive_index: torch.Tensor
    candidate_mask: torch.Tensor
    truncated: list[bool]
    attributes: list[dict[str, str]]
    pool: Candidates
    pairs: torch.Tensor

    #: The fields reward functions receive as keyword arguments (`moon_rl.rewards` documents them).
    REWARD_KWARGS = ("embeddings", "candidates", "positive_index", "candidate_mask", "truncated", "attributes")

    def reward_kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.REWARD_KWARGS}


class ContextReward:
    """A reward function called with moon-rl's per-batch context (embeddings, candidates, ...) as extra kwargs.

    A reward that fails once does not stop the run: if it raises, or returns something that is not one number (or
    None) per completion, every completion of the step gets `None`; a NaN or infinite value becomes `None` for its
    completion. TRL turns `None` into NaN and leaves it out of the step's reward (`nansum` over the reward functions,
    `nanmean` over the group), so the other rewards still score the step. The first failure of each reward is logged
    as a warning; `rewards/<name>/failures` logs the share of completions it failed to score, every step (0.0 when it
    worked, so that every process logs the same metrics). A `None` the reward returns on purpose is no failure.

    A reward that keeps failing does stop the run: after `max_failure_steps` consecutive calls that raised or returned
    an unusable output, the last one raises `RuntimeError` (chained from the reward's own exception). Otherwise a
    broken reward (a typo, a service that is down for good) would silently train on the other rewards alone for the
    whole run. NaN or infinite values never count towards it: they are per-completion scores, not a broken reward.
    A call that returns usable output resets the count.

    Args:
        fn (`Callable`): the reward, following `moon_rl.rewards`' contract.
        context (`Callable[[], dict]`): the current batch's extra keyword arguments, read on every call; they override
            TRL's keywords of the same name.
        name (`str`): the name TRL logs the reward under (`RewardEntry.name`); becomes this wrapper's `__name__`.
        max_failure_steps (`int`, *optional*, defaults to `5`): consecutive failed calls (one per generation batch)
            that stop the run; must be a positive integer.
    """

    def __init__(
        self,
        fn: Callable[..., list[float | None]],
        context: Callable[[], dict[str, Any]],
        name: str,
        max_failure_steps: int = 5,
    ) -> None:
        if isinstance(max_failure_steps, bool) or not isinstance(max_failure_steps, int) or max_failure_steps < 1:
            raise ValueError(f"`max_failure_steps` must be a positive integer, got {max_failure_steps!r}.")
        self.fn = fn
        self.context = context
        self.__name__ = name  # TRL logs rewards under their callable's name
        self.max_failure_steps = max_failure_steps
        self.failure_streak = 0
        self.warned = False

    def __repr__(self) -> str:
        return f"ContextReward({self.fn!r}, name={self.__name__!r}, max_failure_steps={self.max_failure_steps})"

    def __call__(self, completions: list, **kwargs: Any) -> list[float | None]:
        n = len(completions)
        error: Exception | None = None
        try:
            values, failed = self._finite(self.fn(completions, **{**kwargs, **self.context()}), n)
        except Exception as exc:  # a reward is user code: an error in it costs its score for the step, not the run
            error = exc
            self._warn(f"raised {type(exc).__name__}: {exc}", exc_info=logger.isEnabledFor(logging.DEBUG))
            values, failed = [None] * n, n
        if error is None and failed:
            self._warn(f"returned NaN or inf for {failed} of {n} completions")
        if (log_metric := kwargs.get("log_metric")) is not None:
            log_metric(f"rewards/{self.__name__}/failures", failed / max(n, 1))
        self.failure_streak = 0 if error is None else self.failure_streak + 1
        if error is not None and self.failure_streak >= self.max_failure_steps:
            raise RuntimeError(
                f"reward {self.__name__!r} failed on every completion for {self.failure_streak} consecutive steps; "
                f"last error: {type(error).__name__}: {error}"
            ) from error
        return values

    @staticmethod
    def _finite(output: Any, n: int) -> tuple[list[float | None], int]:
        """One finite float or None per completion, and how many were NaN / inf; raises on a broken contract."""
        values = list(output)
        if len(values) != n:
            raise ValueError(f"returned {len(values)} values for {n} completions (expected one per completion)")
        out: list[float | None] = []
        bad = 0
        for value in values:
            number = None if value is None else float(value)  # a string or a list raises: the output is unusable
            if number is not None and not math.isfinite(number):
                number, bad = None, bad + 1
            out.append(number)
        return out, bad

    def _warn(self, what: str, exc_info: bool = False) -> None:
        if not self.warned:
            self.warned = True
            logger.warning(
                "reward %r %s; the step is scored without it there (warned once per reward; the share of completions "
                "it failed on is logged as rewards/%s/failures; %d consecutive steps on which it fails stop the run)",
                self.__name__,
                what,
                self.__name__,
                self.max_failure_steps,
                exc_info=exc_info,
            )
