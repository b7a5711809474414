"""Does the reasoning matter? Numbers on how much a reason-mode embedding depends on what its reasoning says.

A public reason-then-embed model was found to give nearly the same embedding whatever its reasoning said (cosine
0.95-0.98 across different chains). For a gallery embedded in `reason` mode this module reports, without judging:

* `chain_cosine`: mean cosine between two embeddings of the same product from two independently sampled chains;
  beside it `chains_identical` (the share of those pairs whose two chains are the same text, so embed alike by
  construction) and `chain_cosine_differing` (the mean over the other pairs: how far a different chain moves the
  embedding; None when every pair is identical);
* `reason_direct_cosine`: mean cosine between each product's greedy reason-mode and direct-mode embeddings;
* `swapped`: each retrieval task's Recall@1 when every gallery product is read out after ANOTHER product's greedy
  reasoning (a fixed random derangement), beside `reason` (its own reasoning). A model whose embedding follows its
  reasoning drops sharply; one that ignores it does not move.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A permutation of range(n) with no fixed point (n >= 2): a random order rotated by one."""
    order = np.random.default_rng(seed).permutation(n)
    target = np.empty(n, dtype=np.int64)
    target[order] = np.roll(order, 1)
    return target


def spread_sample(records: Sequence[Any], n: int) -> list[Any]:
    """At most `n` of `records`, evenly spread (first and last included): the products whose chains are sampled."""
    return [records[i] for i in np.linspace(0, len(records) - 1, min(n, len(records))).astype(int)]


def two_sampled_chains(embedder: Any, records: Sequence[Any], *, seed: int, temperature: float = 1.0,
                       return_completions: bool | str = "ids", **encode: Any) -> tuple[Any, Any]:
    """Two independently sampled reason-mode read-outs of `records`: `((vectors, chains), (vectors, chains))`, drawn
    under `torch.manual_seed(seed)` in a forked RNG (the caller's RNG state is left as it was).

    `encode` goes to `embedder.encode` (mode, batch size, image loader); `return_completions` says how the chains
    come back (`"ids"` or `True` for text).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tuple(embedder.encode(records, do_sample=True, temperature=temperature,  # type: ignore[return-value]
                                     return_completions=return_completions, **encode) for _ in range(2))


def _row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def faithfulness(
    embedder: Any, gallery: Sequence[Any], greedy_vecs: np.ndarray, greedy_ids: Sequence[Sequence[int]],
    direct_vecs: np.ndarray | None, recall_at_1: Callable[[np.ndarray], dict[str, float]], *,
    load_image: Any = None, batch_size: int = 32, temperature: float = 1.0, seed: int = 0, max_sampled: int = 64,
) -> dict[str, Any]:
    """The faithfulness numbers of one model on one gallery (see the module docstring).

    Args:
        embedder (`MoonEmbedder`): the model.
        gallery (`Sequence`): gallery records (products).
        greedy_vecs (`np.ndarray`): their reason-mode embeddings with greedy reasoning.
        greedy_ids (`Sequence[Sequence[int]]`): that reasoning, as token ids.
        direct_vecs (`np.ndarray`, *optional*): their direct-mode embeddings.
        recall_at_1 (`Callable`): gallery vectors -> `{task: Recall@1}` for the split's retrieval tasks.
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature of the two chains.
        seed (`int`, *optional*, defaults to `0`): seeds sampling and the derangement.
        max_sampled (`int`, *optional*, defaults to `64`): chains are sampled for at most this many products (an
            even spread over the gallery): sampling is the expensive part, and the mean settles long before.
    """
    encode = dict(mode="reason", batch_size=batch_size, load_image=load_image)
    sampled = spread_sample(gallery, max_sampled)
    (first, first_chains), (second, second_chains) = two_sampled_chains(embedder, sampled, seed=seed,
                                                                        temperature=temperature, **encode)
    differing = np.array([list(a) != list(b) for a, b in zip(first_chains, second_chains, strict=True)], dtype=bool)
    result: dict[str, Any] = {"chain_cosine": _row_cosine(first, second), "chains_sampled_for": len(sampled),
                              "chains_identical": float(1.0 - differing.mean()) if len(differing) else None,
                              "chain_cosine_differing": (_row_cosine(first[differing], second[differing])
                                                         if differing.any() else None),
                              "reason_direct_cosine": None, "swapped": None, "reason": recall_at_1(greedy_vecs),
                              "sample_temperature": temperature}
    if direct_vecs is not None:
        result["reason_direct_cosine"] = _row_cosine(greedy_vecs, direct_vecs)
    if len(gallery) >= 2:
        donor = derangement(len(gallery), seed)
        swapped = embedder.encode(gallery, completions=[greedy_ids[j] for j in donor], **encode)
        result["swapped"] = recall_at_1(swapped)
    return result
