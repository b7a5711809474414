"""Retrieval rewards: how well a completion's read-out embedding finds its product among the candidates.

moon-rl's GRPO trainer passes, besides TRL's keywords:

- `embeddings` (`torch.Tensor` of shape `(N, D)`): L2-normalised read-out embeddings of the N completions,
- `candidates` (`torch.Tensor` of shape `(M, D)`): L2-normalised direct-mode embeddings of the candidate products
  (the deduplicated positives of the whole generation batch, gathered across processes),
- `positive_index` (`torch.Tensor` of shape `(N,)`, long): for each completion, its positive's row in `candidates`.

Both embeddings are unit vectors, so a dot product is the cosine similarity. Scores are computed in float64 on
detached tensors: rewards are not differentiated, and bf16 scores would turn near-ties into ties.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rewards.registry import reward

__all__ = ["RetrievalMargin", "retrieval_rank"]


@reward("retrieval_rank")
def retrieval_rank(
    completions: Sequence[Any],
    embeddings: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    positive_index: torch.Tensor | None = None,
    log_metric: Callable[[str, float], None] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    r"""
    Reciprocal rank of each completion's positive among the candidates, by cosine similarity.

    The rank is 1 plus the number of candidates scoring strictly higher than the positive, so a tie with the
    positive does not cost rank: rank 1 gives `1.0`, rank 2 gives `0.5`, rank 3 gives `1/3`, and so on. The batch's
    mean (the mean reciprocal rank) is logged as `retrieval/mrr` when `log_metric` is given.

    Args:
        completions (`Sequence`):
            The completions; only their number is used.
        embeddings (`torch.Tensor` of shape `(N, D)`):
            L2-normalised read-out embeddings of the completions.
        candidates (`torch.Tensor` of shape `(M, D)`):
            L2-normalised embeddings of the candidate products.
        positive_index (`torch.Tensor` of shape `(N,)`):
            Row of `candidates` that is each completion's positive.
        log_metric (`Callable[[str, float], None]`, *optional*):
            TRL's metric logger.
        **kwargs:
            Other keywords from the trainer, ignored.

    Returns:
        `list[float | None]`: One reciprocal rank in `(0, 1]` per completion.

    Example:
    ```python
    >>> import torch
    >>> from rewards import retrieval_rank
    >>> candidates = torch.eye(3)
    >>> embeddings = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]])
    >>> retrieval_rank(["a", "b"], embeddings=embeddings, candidates=candidates, positive_index=torch.tensor([0, 1]))
    [1.0, 0.5]

    ```
    """
    scores, positive = _scores("retrieval_rank", completions, embeddings, candidates, positive_index)
    positive_scores = scores.gather(1, positive[:, None])
    ranks = (scores > positive_scores).sum(dim=1) + 1
    # Reciprocals in Python floats, so rank 3 gives exactly 1/3.
    rewards: list[float | None] = [1.0 / rank for rank in ranks.tolist()]
    if log_metric is not None and rewards:
        log_metric("retrieval/mrr", sum(rewards) / len(rewards))
    return rewards


@reward("retrieval_margin")
class RetrievalMargin:
    r"""
    Positive similarity minus a softmax-weighted mean of the negatives' similarities.

    For a completion with similarities $s_j$ to the candidates and positive $p$, the negatives are all $j \ne p$ and

    $$
    r = s_p - \sum_{j \ne p} w_j s_j, \qquad w = \operatorname{softmax}_{j \ne p}(s_j / \tau).
    $$

    A small temperature $\tau$ weights the hardest negatives most (at $\tau \to 0$ the margin to the closest
    negative), a large one approaches the plain mean. Unlike `retrieval_rank`, the reward keeps growing once the
    positive ranks first, so it still separates completions that all rank first. With a single candidate there are no
    negatives and every reward is `None` (excluded).

    Args:
        temperature (`float`, *optional*, defaults to `0.05`):
            Softmax temperature over the negatives' similarities; must be positive.

    Example:
    ```python
    >>> import torch
    >>> from rewards import RetrievalMargin
    >>> margin = RetrievalMargin(temperature=0.05)
    >>> candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> embeddings = torch.tensor([[0.8, 0.6]])
    >>> [round(r, 6) for r in margin(["a"], embeddings=embeddings, candidates=candidates, positive_index=torch.tensor([0]))]
    [0.2]

    ```
    """

    def __init__(self, temperature: float = 0.05) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
        if not math.isfinite(temperature):
            raise ValueError(f"`temperature` must be finite, got {temperature!r}.")
        self.temperature = float(temperature)
        # TRL logs a callable object by its `__name__`.
        self.__name__ = "retrieval_margin"

    def __repr__(self) -> str:
        return f"RetrievalMargin(temperature={self.temperature})"

    def __call__(
        self,
        completions: Sequence[Any],
        embeddings: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
        positive_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """Score each completion; see the class docstring."""
        scores, positive = _scores("retrieval_margin", completions, embeddings, candidates, positive_index)
        if scores.shape[1] < 2:
            return [None] * scores.shape[0]
        is_positive = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, positive[:, None], True)
        # exp(-inf) = 0 removes the positive from the softmax and, through its zero weight, from the mean.
        weights = torch.softmax((scores / self.temperature).masked_fill(is_positive, -math.inf), dim=1)
        negative_mean = (weights * scores.masked_fill(is_positive, 0.0)).sum(dim=1)
        positive_scores = scores.gather(1, positive[:, None]).squeeze(1)
        return (positive_scores - negative_mean).tolist()


def _scores(
    name: str,
    completions: Sequence[Any],
    embeddings: torch.Tensor | None,
    candidates: torch.Tensor | None,
    positive_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities `(N, M)` in float64 and the positives `(N,)`, after checking the shapes agree."""
    missing = [
        key
        for key, value in (("embeddings", embeddings), ("candidates", candidates), ("positive_index", positive_index))
        if value is None
    ]
    if missing:
        raise ValueError(
            f"Reward {name!r} needs {', '.join(missing)}, which moon-rl's GRPO trainer passes; a plain TRL "
            "GRPOTrainer does not."
        )
    assert embeddings is not None and candidates is not None and positive_index is not None  # for the type checker
    n = len(completions)
    if embeddings.ndim != 2 or candidates.ndim != 2 or embeddings.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"Reward {name!r}: embeddings {tuple(embeddings.shape)} and candidates {tuple(candidates.shape)} must be "
            "(N, D) and (M, D) with the same D."
        )
    if embeddings.shape[0] != n or tuple(positive_index.shape) != (n,):
        raise ValueError(
            f"Reward {name!r}: {n} completions, but embeddings {tuple(embeddings.shape)} and positive_index "
            f"{tuple(positive_index.shape)}; expected ({n}, D) and ({n},)."
        )
    positive = positive_index.detach().to(device=candidates.device, dtype=torch.long)
    if n and (positive.min() < 0 or positive.max() >= candidates.shape[0]):
        raise ValueError(
            f"Reward {name!r}: positive_index {positive.tolist()} out of range for {candidates.shape[0]} candidates."
        )
    scores = embeddings.detach().to(device=candidates.device, dtype=torch.float64) @ candidates.detach().double().T
    return scores, positive
