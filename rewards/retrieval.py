"""Retrieval rewards: how well a completion's read-out embedding finds its product among the candidates.

moon-rl's GRPO trainer passes, besides TRL's keywords:

- `embeddings` (`torch.Tensor` of shape `(N, D)`): L2-normalised read-out embeddings of the N completions,
- `candidates` (`torch.Tensor` of shape `(M, D)`): L2-normalised direct-mode embeddings of the candidate queries
  (the deduplicated positives of the whole generation batch, gathered across processes),
- `positive_index` (`torch.Tensor` of shape `(N,)`, long): for each completion, its positive's row in `candidates`,
- `candidate_mask` (`torch.Tensor` of shape `(N, M)`, bool, *optional*): `True` where candidate `j` may compete with
  completion `i`'s positive; `False` for the other queries of the same product (they are no negatives) and for
  candidates to ignore. A completion's own positive always counts, whatever its mask says; without a mask every
  candidate counts,
- `product_ids` (`list` of N hashables, *optional*): the product each completion shows; the dataset's `product_id`
  column, which TRL passes like every column, serves when it is absent.

Both embeddings are unit vectors, so a dot product is the cosine similarity. Scores are computed in float64 on
detached tensors: rewards are not differentiated, and bf16 scores would turn near-ties into ties.

The built-ins: `retrieval_rank` (reciprocal rank), `retrieval_margin` (positive minus hard negatives) and
`retrieval_logprob` (log-probability of the right match under a softmax, in either search direction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from moon_rl.rewards.registry import reward

__all__ = ["RetrievalLogprob", "RetrievalMargin", "retrieval_rank"]


@reward("retrieval_rank")
def retrieval_rank(
    completions: Sequence[Any],
    embeddings: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    positive_index: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> list[float | None]:
    r"""
    Reciprocal rank of each completion's positive among the candidates, by cosine similarity.

    The rank is 1 plus the number of allowed candidates scoring strictly higher than the positive, so a tie with the
    positive does not cost rank: rank 1 gives `1.0`, rank 2 gives `0.5`, rank 3 gives `1/3`, and so on. It logs no
    metric: the trainer logs `retrieval/mrr` itself, over the whole candidate pool, and a second `retrieval/mrr`
    from here would overwrite or double it.

    Args:
        completions (`Sequence`):
            The completions; only their number is used.
        embeddings (`torch.Tensor` of shape `(N, D)`):
            L2-normalised read-out embeddings of the completions.
        candidates (`torch.Tensor` of shape `(M, D)`):
            L2-normalised embeddings of the candidate queries.
        positive_index (`torch.Tensor` of shape `(N,)`):
            Row of `candidates` that is each completion's positive.
        candidate_mask (`torch.Tensor` of shape `(N, M)`, bool, *optional*):
            `False` where a candidate does not count for a completion (another query of its product, or one to
            ignore); the positive always counts. Defaults to every candidate counting.
        **kwargs:
            Other keywords from the trainer, ignored.

    Returns:
        `list[float | None]`: One reciprocal rank in `(0, 1]` per completion.

    Example:
    ```python
    >>> import torch
    >>> from moon_rl.rewards import retrieval_rank
    >>> candidates = torch.eye(3)
    >>> embeddings = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0]])
    >>> retrieval_rank(["a", "b"], embeddings=embeddings, candidates=candidates, positive_index=torch.tensor([0, 1]))
    [1.0, 0.5]

    ```
    """
    scores, positive = _scores("retrieval_rank", completions, embeddings, candidates, positive_index)
    allowed = _allowed("retrieval_rank", candidate_mask, scores, positive)
    positive_scores = scores.gather(1, positive[:, None])
    ranks = ((scores > positive_scores) & allowed).sum(dim=1) + 1
    # Reciprocals in Python floats, so rank 3 gives exactly 1/3.
    return [1.0 / rank for rank in ranks.tolist()]


@reward("retrieval_margin")
class RetrievalMargin:
    r"""
    Positive similarity minus a softmax-weighted mean of the negatives' similarities.

    For a completion with similarities $s_j$ to the candidates and positive $p$, the negatives are the allowed
    candidates $j \ne p$ (all of them without a `candidate_mask`) and

    $$
    r = s_p - \sum_{j \ne p} w_j s_j, \qquad w = \operatorname{softmax}_{j \ne p}(s_j / \tau).
    $$

    A small temperature $\tau$ weights the hardest negatives most (at $\tau \to 0$ the margin to the closest
    negative), a large one approaches the plain mean. Unlike `retrieval_rank`, the reward keeps growing once the
    positive ranks first, so it still separates completions that all rank first. A completion without negatives (a
    single candidate, or all others masked) gets `None` (excluded).

    Args:
        temperature (`float`, *optional*, defaults to `0.05`):
            Softmax temperature over the negatives' similarities; must be positive.

    Example:
    ```python
    >>> import torch
    >>> from moon_rl.rewards import RetrievalMargin
    >>> margin = RetrievalMargin(temperature=0.05)
    >>> candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> embeddings = torch.tensor([[0.8, 0.6]])
    >>> [round(r, 6) for r in margin(["a"], embeddings=embeddings, candidates=candidates, positive_index=torch.tensor([0]))]
    [0.2]

    ```
    """

    def __init__(self, temperature: float = 0.05) -> None:
        self.temperature = _temperature(temperature)
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
        candidate_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """Score each completion; see the class docstring."""
        scores, positive = _scores("retrieval_margin", completions, embeddings, candidates, positive_index)
        is_positive = _one_hot(scores, positive)
        negative = _allowed("retrieval_margin", candidate_mask, scores, positive) & ~is_positive
        # exp(-inf) = 0 removes the positive and masked candidates from the softmax and, through their zero weight,
        # from the mean. A row without negatives is all -inf (NaN weights); it is answered None below.
        weights = torch.softmax((scores / self.temperature).masked_fill(~negative, -math.inf), dim=1)
        negative_mean = (weights * scores.masked_fill(~negative, 0.0)).sum(dim=1)
        positive_scores = scores.gather(1, positive[:, None]).squeeze(1)
        margins = (positive_scores - negative_mean).tolist()
        return [m if has else None for m, has in zip(margins, negative.any(dim=1).tolist(), strict=True)]


@reward("retrieval_logprob")
class RetrievalLogprob:
    r"""
    Log-probability that retrieval picks the right match, under a softmax over cosine similarities.

    With similarities $s_{ij}$ between completion $i$ and candidate query $j$, temperature $\tau$ and $p_i$ the
    positive of completion $i$:

    - `completion_to_query`: the completion searches the queries,
      $r_i = s_{i p_i}/\tau - \log \sum_{j} \exp(s_{ij}/\tau)$ over the allowed candidates $j$ (`candidate_mask`).
    - `query_to_completion`: the direction evaluation measures, a query searching the products. Query $p_i$ ranks
      completion $i$ against the completions $k$ of *other* products:
      $r_i = s_{i p_i}/\tau - \log\big(\exp(s_{i p_i}/\tau) + \sum_{k} \exp(s_{k p_i}/\tau)\big)$. Completions of the
      same product are no negatives (`product_ids`, else the `product_id` column, else the same positive); nor is a
      completion $k$ for which `candidate_mask[k, p_i]` is `False`, which also catches same-product completions
      sampled for another query when no product ids are given.
    - `both` (the default): the mean of the two.

    Each is at most 0 (the match takes all the probability). Unlike `retrieval_rank`, it keeps growing once the
    positive ranks first, so it still separates completions that all rank first; unlike `retrieval_margin`, it is a
    proper log-likelihood, the quantity an InfoNCE loss maximises.

    Args:
        temperature (`float`, *optional*, defaults to `0.05`):
            Softmax temperature; must be positive and finite.
        direction (`str`, *optional*, defaults to `"both"`):
            `"completion_to_query"`, `"query_to_completion"` or `"both"`.

    Example:
    ```python
    >>> import math, torch
    >>> from moon_rl.rewards import RetrievalLogprob
    >>> c2q = RetrievalLogprob(temperature=0.5, direction="completion_to_query")
    >>> out = c2q(["a"], embeddings=torch.tensor([[0.8, 0.6]]), candidates=torch.eye(2), positive_index=torch.tensor([0]))
    >>> math.isclose(out[0], 1.6 - math.log(math.exp(1.6) + math.exp(1.2)), abs_tol=1e-6)
    True

    ```
    """

    DIRECTIONS = ("completion_to_query", "query_to_completion", "both")

    def __init__(self, temperature: float = 0.05, direction: str = "both") -> None:
        self.temperature = _temperature(temperature)
        if direction not in self.DIRECTIONS:
            raise ValueError(f"`direction` must be one of {', '.join(map(repr, self.DIRECTIONS))}, got {direction!r}.")
        self.direction = direction
        # TRL logs a callable object by its `__name__`.
        self.__name__ = "retrieval_logprob"

    def __repr__(self) -> str:
        return f"RetrievalLogprob(temperature={self.temperature}, direction={self.direction!r})"

    def __call__(
        self,
        completions: Sequence[Any],
        embeddings: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
        positive_index: torch.Tensor | None = None,
        candidate_mask: torch.Tensor | None = None,
        product_ids: Sequence[Any] | None = None,
        product_id: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """Score each completion; see the class docstring."""
        name = "retrieval_logprob"
        scores, positive = _scores(name, completions, embeddings, candidates, positive_index)
        allowed = _allowed(name, candidate_mask, scores, positive)
        logits = scores / self.temperature
        own = logits.gather(1, positive[:, None]).squeeze(1)
        terms = []
        if self.direction != "query_to_completion":
            terms.append(own - torch.logsumexp(logits.masked_fill(~allowed, -math.inf), dim=1))
        if self.direction != "completion_to_query":
            ids = product_ids if product_ids is not None else product_id
            same = _same_product(name, ids, positive)
            # [i, k] = s_{k, p_i} / tau: how query p_i scores completion k; completion k competes for query p_i when it
            # shows another product and p_i is a usable candidate for it. The diagonal is completion i itself.
            column = logits[:, positive].T
            competes = (~same & allowed[:, positive].T) | torch.eye(len(own), dtype=torch.bool, device=own.device)
            terms.append(own - torch.logsumexp(column.masked_fill(~competes, -math.inf), dim=1))
        return (sum(terms) / len(terms)).tolist()


def _temperature(temperature: Any) -> float:
    """`temperature` as a float, or a `ValueError` saying why it is unusable."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
    if not math.isfinite(temperature):
        raise ValueError(f"`temperature` must be finite, got {temperature!r}.")
    return float(temperature)


def _one_hot(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """`(N, M)` bool, True at each completion's positive."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, positive[:, None], True)


def _allowed(
    name: str, candidate_mask: torch.Tensor | None, scores: torch.Tensor, positive: torch.Tensor
) -> torch.Tensor:
    """`(N, M)` bool: the candidates each completion is scored against, its positive always among them."""
    if candidate_mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if not isinstance(candidate_mask, torch.Tensor) or candidate_mask.dtype != torch.bool:
        raise ValueError(f"Reward {name!r}: candidate_mask must be a bool tensor, got {_describe(candidate_mask)}.")
    if tuple(candidate_mask.shape) != tuple(scores.shape):
        raise ValueError(
            f"Reward {name!r}: candidate_mask {tuple(candidate_mask.shape)} must be (N, M) = {tuple(scores.shape)}, "
            "one row per completion and one column per candidate."
        )
    return candidate_mask.detach().to(scores.device) | _one_hot(scores, positive)


def _same_product(name: str, ids: Sequence[Any] | torch.Tensor | None, positive: torch.Tensor) -> torch.Tensor:
    """`(N, N)` bool: completions `i` and `k` show the same product (by id, else by the same positive)."""
    if ids is None:
        codes = positive
    else:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if len(values) != len(positive):
            raise ValueError(f"Reward {name!r}: {len(positive)} completions but {len(values)} product ids.")
        index: dict[Any, int] = {}
        try:
            codes = torch.tensor([index.setdefault(v, len(index)) for v in values], device=positive.device)
        except TypeError as exc:  # an unhashable id
            raise ValueError(f"Reward {name!r}: product ids must be hashable, got {values!r}.") from exc
    return codes[:, None] == codes[None, :]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


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
