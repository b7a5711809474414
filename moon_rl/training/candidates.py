"""GRPO's candidate pool: the queries a completion's embedding must single its own out from.

A retrieval reward over a generation batch alone ranks a handful of easy candidates; every sampled chain of a product
then ranks its query first, the group's rewards are equal and GRPO's advantage is zero (measured on the demo: 23 of 24
groups). The pool is large and hard:

* the direct-mode embeddings of every query of the generation batch, gathered across processes (a pair sampled on two
  processes counts once);
* the queries of the batch's look-alike products (same text attributes, another colour or pattern), as hard negatives;
* a queue of the queries of recent batches (MoCo-style; `grpo.candidate_queue_size`), detached and slightly stale,
  which only ever serve as negatives.

Candidates are identified by pair (a query). A completion's right answers are every query its product is relevant to:
its own, its product's other queries (its text query when the positive is its image query), the queries that list the
product among several `positives`, and stale queue copies of those. The trainer knows them (`answers`, per row) and
`Candidates.mask` hides all but the row's own one: they are never counted as wrong answers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moon_rl.training.losses import gather_ids, gather_with_grad


@dataclass
class Candidates:
    """One generation batch's candidate queries.

    Attributes:
        vectors (`torch.Tensor` of shape `(M, D)`): L2-normalised direct-mode query embeddings, no gradient.
        pairs (`torch.Tensor` of shape `(M,)`): the pair (query) of each candidate.
        fresh (`int`): the first `fresh` rows are this batch's (gathered) queries; the rest come from the queue.
    """

    vectors: torch.Tensor
    pairs: torch.Tensor
    fresh: int

    def positions(self, pairs: Sequence[int]) -> torch.Tensor:
        """Row of each pair's query (each must be among the fresh candidates)."""
        row = {int(p): i for i, p in enumerate(self.pairs[:self.fresh].tolist())}
        return torch.tensor([row[int(p)] for p in pairs], device=self.vectors.device)

    def mask(self, answers: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
        """(N, M) bool: True where candidate j is a fair candidate for row i: no right answer for row i's product
        (`answers`: per row, the pairs whose query is one, padded by repeating any of them), or row i's own positive."""
        return answer_mask(self.pairs, answers, positive_index)


class CandidatePool:
    """Builds each step's `Candidates` from the local queries, every process's, and a queue of recent ones.

    Args:
        queue_size (`int`): queries kept from earlier batches (0: none).
    """

    def __init__(self, queue_size: int):
        self.queue_size = queue_size
        self._queue: OrderedDict[int, torch.Tensor] = OrderedDict()  # pair -> vector, oldest first

    def build(self, local_pairs: Sequence[int], local_vectors: torch.Tensor) -> Candidates:
        """Gather this process's candidates with every other process's, dedupe by pair, append the queue, then queue
        this batch's queries for the next steps (every process calls it: it holds collectives)."""
        device = local_vectors.device
        pairs = gather_ids(torch.tensor(list(local_pairs), dtype=torch.long, device=device))
        vectors = gather_with_grad(local_vectors.detach())
        first: dict[int, int] = {}
        for row, pair in enumerate(pairs.tolist()):
            first.setdefault(pair, row)
        keep = torch.tensor(sorted(first.values()), device=device)
        pairs, vectors = pairs[keep], vectors[keep]
        fresh = len(pairs)
        fresh_pairs = set(pairs.tolist())
        # The queue's copy of a pair that is fresh again is stale: the fresh one replaces it.
        queued = [(pair, vector) for pair, vector in self._queue.items() if pair not in fresh_pairs]
        if queued:
            pairs = torch.cat([pairs, torch.tensor([e[0] for e in queued], device=device)])
            vectors = torch.cat([vectors, torch.stack([e[1].to(device) for e in queued])])
        self.push(pairs[:fresh], vectors[:fresh])
        return Candidates(vectors=vectors, pairs=pairs, fresh=fresh)

    def push(self, pairs: torch.Tensor, vectors: torch.Tensor) -> None:
        """Queue queries (pair ids, vectors), evicting the oldest beyond `queue_size`."""
        if not self.queue_size:
            return
        for pair, vector in zip(pairs.tolist(), vectors, strict=True):
            self._queue.pop(pair, None)  # re-inserted at the young end
            self._queue[pair] = vector.detach().clone()
        while len(self._queue) > self.queue_size:
            self._queue.popitem(last=False)

    def __len__(self) -> int:
        return len(self._queue)


def answer_mask(pairs: torch.Tensor, answers: torch.Tensor, positive_index: torch.Tensor | None = None) -> torch.Tensor:
    """(N, M) bool: False where candidate pair `pairs[j]` is among row i's right answers (`answers`, (N, K) pair ids),
    except at row i's own positive (`positive_index`), which stays True."""
    allowed = ~(pairs.to(answers.device)[None, :, None] == answers[:, None, :]).any(-1)
    if positive_index is not None:
        allowed[torch.arange(len(positive_index), device=allowed.device), positive_index] = True
    return allowed
