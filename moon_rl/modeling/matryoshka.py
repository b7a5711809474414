"""Matryoshka embeddings: the first `d` values of a vector, renormalised, are an embedding of their own.

A model trained with the Matryoshka loss (`model.heads.matryoshka_dims`; the contrastive losses over every listed
prefix, `moon_rl.training.losses.matryoshka_info_nce`) keeps most of its retrieval quality at a fraction of the size,
which is what an index of millions of products pays for. Any model can be truncated; only a trained one is good at it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from moon_rl.errors import MoonError

__all__ = ["check_dim", "check_range", "loss_dims", "truncate"]

logger = logging.getLogger(__name__)

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def loss_dims(embed_dim: int, matryoshka_dims: Sequence[int] | None) -> list[int]:
    """The prefix sizes the contrastive losses train, largest first: the full size, then the listed ones."""
    return sorted({embed_dim, *(matryoshka_dims or [])}, reverse=True)


def truncate(vectors: ArrayT, dim: int | None) -> ArrayT:
    """The first `dim` values of each row, L2-normalised again (rows stay unit vectors); `None` or the full size
    returns `vectors` as they are."""
    if dim is None or dim >= vectors.shape[-1]:
        return vectors
    if isinstance(vectors, torch.Tensor):
        return F.normalize(vectors[..., :dim], dim=-1)
    head = vectors[..., :dim]
    return head / np.maximum(np.linalg.norm(head, axis=-1, keepdims=True), 1e-12)


def check_range(dim: int | None, embed_dim: int, *, what: str = "dim") -> None:
    """Refuse a size the model cannot give (None: the full size, always fine)."""
    if dim is not None and not 1 <= dim <= embed_dim:
        raise MoonError(f"{what}={dim}: must be between 1 and the model's embedding size {embed_dim}")


def check_dim(dim: int | None, embed_dim: int, matryoshka_dims: Sequence[int] | None, *, what: str = "dim") -> None:
    """Refuse a size the model cannot give; warn when the model was not trained for it (it still works, worse)."""
    check_range(dim, embed_dim, what=what)
    if dim is None:
        return
    trained = loss_dims(embed_dim, matryoshka_dims)
    if dim not in trained:
        logger.warning("%s=%d: the model was trained for %s (model.heads.matryoshka_dims); a prefix it was not trained "
                       "for retrieves worse", what, dim, trained)
