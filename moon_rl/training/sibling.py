"""The sibling-ranking term of GRPO (`grpo.sibling_weight`): a read-out that follows what the chain says.

GRPO samples a group of completions ("siblings") per prompt. They share the prompt and the image, so only their
reasoning can set their read-outs apart; ranking the better ones above the worse ones against their query makes the
embedding depend on the chain, in the direction the reward prefers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sibling_ranking_loss"]


def sibling_ranking_loss(
    completions: torch.Tensor, queries: torch.Tensor, groups: torch.Tensor, advantages: torch.Tensor,
    *, temperature: float = 0.05,
) -> tuple[torch.Tensor, float | None]:
    r"""
    Rank each better-than-average completion above its group's worse ones, against its own query.

    GRPO samples a group of completions per prompt; they share the prompt and the image, so only their reasoning can
    set their read-outs apart. For each row \(i\) with advantage \(A_i > 0\) whose group has rows \(W_i\) with
    \(A_j < 0\):

    $$ \ell_i = -\log \frac{\exp(q_i \cdot e_i / \tau)}{\exp(q_i \cdot e_i / \tau)
        + \sum_{j \in W_i} \exp(q_i \cdot e_j / \tau)} $$

    and the loss is the mean over those rows. The reward (computed from these read-outs) said chain \(i\) beats its
    siblings \(W_i\); the term makes the read-out agree more firmly, i.e. follow what the chains say. Pass the queries
    detached to train the completions' side only.

    Args:
        completions (`torch.Tensor` of shape `(n, d)`): the rows' read-outs, L2-normalised.
        queries (`torch.Tensor` of shape `(n, d)`): each row's query embedding, L2-normalised.
        groups (`torch.Tensor` of shape `(n,)`): a group id per row (rows of one prompt share it).
        advantages (`torch.Tensor` of shape `(n,)`): GRPO's advantage per row.
        temperature (`float`, *optional*, defaults to `0.05`): divides the similarities.

    Returns:
        `(loss, accuracy)`: the mean loss (a zero that keeps the graph when no row has a worse sibling) and the share
        of those rows whose own read-out already scores highest (None without such rows).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = completions.shape[0]
    if queries.shape != completions.shape or groups.shape != (n,) or advantages.shape != (n,):
        raise ValueError(f"completions {tuple(completions.shape)}, queries {tuple(queries.shape)}, groups "
                         f"{tuple(groups.shape)} and advantages {tuple(advantages.shape)} must describe the same rows")
    worse_siblings = (groups[:, None] == groups[None, :]) & (advantages < 0)[None, :]
    rows = ((advantages > 0) & worse_siblings.any(dim=1)).nonzero().flatten()
    if not len(rows):
        return completions.sum() * 0.0, None
    dtype = torch.promote_types(completions.dtype, torch.float32)
    scores = queries[rows].to(dtype) @ completions.to(dtype).T / temperature
    candidates = worse_siblings[rows]
    candidates[torch.arange(len(rows), device=rows.device), rows] = True
    scores = scores.masked_fill(~candidates, float("-inf"))
    loss = F.cross_entropy(scores, rows)
    accuracy = float((scores.detach().argmax(dim=1) == rows).float().mean())
    return loss, accuracy
