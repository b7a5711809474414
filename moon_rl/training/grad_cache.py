"""GradCache pieces (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

A contrastive loss over N rows needs every row's embedding at once, but not every row's activations: its gradient
reaches the model only through the embeddings. So: embed the batch chunk by chunk without an autograd graph, compute
the loss and its gradient with respect to each embedding (`embedding_gradients`), then run each chunk again with
gradient and back-propagate `(embedding * cached_gradient).sum()`. Summed over chunks that is exactly the full loss's
gradient, as long as the second forward computes what the first did: `RngState` replays dropout's random draws.
`MoonSFTTrainer` (training/sft.py) runs the steps; this module holds what is not specific to SFT.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["RngState", "embedding_gradients"]


@dataclass
class RngState:
    """The random state a chunk's first forward started from, to replay it in the second (dropout draws alike)."""

    cpu: torch.Tensor
    device: torch.device
    accelerator: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device | str) -> RngState:
        device = torch.device(device)
        accelerator = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, accelerator)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from this state; the generators continue afterwards where they were before it."""
        devices = [self.device] if self.accelerator is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.accelerator is not None:
                torch.cuda.set_rng_state(self.accelerator, self.device)
            yield


def embedding_gradients(loss_fn: Callable[[list[torch.Tensor]], torch.Tensor], embeddings: Sequence[torch.Tensor]
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss over every chunk's (graph-free) embeddings, and its gradient with respect to each chunk's embeddings.

    Args:
        loss_fn: the scalar loss to differentiate, of one leaf tensor per chunk (the embeddings with `requires_grad`).
        embeddings: each chunk's embeddings, computed without gradient.

    Returns:
        The detached loss and one gradient tensor per chunk, shaped like its embeddings (zeros where the loss does
        not depend on them, e.g. a contrastive weight of 0).
    """
    leaves = [emb.detach().requires_grad_(True) for emb in embeddings]
    with torch.enable_grad():
        loss = loss_fn(leaves)
        if not loss.requires_grad:
            return loss.detach(), [torch.zeros_like(leaf) for leaf in leaves]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True)]
