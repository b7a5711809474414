"""GRPO's candidate pool: dedupe by pair, mask right answers, a queue of recent queries that never serves stale positives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moon_rl.training.candidates import CandidatePool


def vectors(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, 4, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_fresh_candidates_first_in_pair_order_and_positions_follow_pairs():
    pool = CandidatePool(queue_size=0)
    cands = pool.build([3, 5, 9], vectors(3, 0))
    assert cands.fresh == 3 and cands.pairs.tolist() == [3, 5, 9]
    assert cands.positions([9, 3, 3, 5]).tolist() == [2, 0, 0, 1]
    assert len(pool) == 0


def test_mask_hides_other_right_answers_but_never_the_positive():
    pool = CandidatePool(queue_size=0)
    cands = pool.build([3, 5, 9], vectors(3, 0))
    # Row 0 (pair 3): pairs 3 and 5 are the text and image query of its product, so 5 is no wrong answer (the pair
    # itself pads the row). Row 1 (pair 9): its only answer is itself.
    answers = torch.tensor([[3, 5], [9, 9]])
    mask = cands.mask(answers, cands.positions([3, 9]))
    assert mask.tolist() == [[True, False, True], [True, True, True]]
    # A row whose positive is among its answers keeps it: the own positive always counts.
    assert cands.mask(torch.tensor([[5, 3]]), cands.positions([5])).tolist() == [[False, True, True]]


def test_queue_adds_earlier_queries_as_negatives_and_replaces_stale_copies():
    pool = CandidatePool(queue_size=3)
    first = vectors(2, 1)
    pool.build([1, 2], first)
    second = vectors(2, 2)
    cands = pool.build([2, 7], second)
    # Fresh: 2 and 7 (this batch's vectors); queue: only pair 1 (pair 2's old copy is stale, the fresh one wins).
    assert cands.pairs.tolist() == [2, 7, 1] and cands.fresh == 2
    torch.testing.assert_close(cands.vectors[0], second[0])
    torch.testing.assert_close(cands.vectors[2], first[0])
    assert len(pool) == 3  # 1, 2 (refreshed), 7
    assert pool.build([8], vectors(1, 3)).pairs.tolist() == [8, 1, 2, 7]
    # Oldest first out: the queue held [1, 2, 7]; queueing 8 evicted 1.
    assert pool.build([9], vectors(1, 4)).pairs.tolist() == [9, 2, 7, 8] and len(pool) == 3


def test_queue_size_zero_keeps_nothing():
    pool = CandidatePool(queue_size=0)
    pool.build([1, 2], vectors(2, 1))
    assert pool.build([3], vectors(1, 2)).pairs.tolist() == [3]
