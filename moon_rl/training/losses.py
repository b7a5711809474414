r"""Contrastive losses: symmetric InfoNCE with in-batch negatives gathered across processes.

The loss pulls each anchor (a query embedding, e.g. a reason-mode read-out) towards its positive (the product's
direct-mode embedding) and pushes it away from every other positive in the *global* batch (all processes), plus
optional per-row hard negatives. Embeddings are assumed L2-normalised, so the dot product is the cosine similarity.

For anchors \(a_i\), positives \(p_j\) over a global batch of \(N\) pairs and temperature \(\tau\):

$$
\ell^{a\to p}_i = -\log \frac{\exp(a_i \cdot p_i / \tau)}
    {\sum_{j \in C_i} \exp(a_i \cdot p_j / \tau) + \sum_{k} m_{ik} \exp(a_i \cdot h_{ik} / \tau)},
\qquad
\ell^{p\to a}_i = -\log \frac{\exp(p_i \cdot a_i / \tau)}{\sum_{j \in C_i} \exp(p_i \cdot a_j / \tau)},
$$

$$
\mathcal{L} = \frac{1}{N} \sum_{i=1}^{N} \tfrac{1}{2} \left(\ell^{a\to p}_i + \ell^{p\to a}_i\right)
\quad (\text{or } \tfrac{1}{N}\textstyle\sum_i \ell^{a\to p}_i \text{ when not symmetric}),
$$

where \(C_i\) is every row \(j\) of the global batch except the rows \(j \ne i\) that share row \(i\)'s product
id (or anchor id): two pairs for the same product (say a text query and a photo of product *p*) are both right
answers, so they must never push each other apart. With several positives per query (`relevant_ids`), the rows
\(j\) whose product is relevant to row \(i\)'s anchor leave \(C_i\) in the \(a \to p\) direction, and the rows
\(j\) whose anchor row \(i\)'s product is relevant to leave it in the \(p \to a\) direction. \(h_{ik}\) are row
\(i\)'s explicit hard negatives and \(m_{ik} \in \{0, 1\}\) their mask.

Relation to sentence-transformers: without ids and hard negatives, the `a -> p` direction is exactly
`MultipleNegativesRankingLoss(scale=1 / temperature, similarity_fct=cos_sim)` and the symmetric loss is
`MultipleNegativesSymmetricRankingLoss`; `gather=True` is their `gather_across_devices=True`. Differences: hard
negatives here are *per row* (ST shares every row's hard negatives with every anchor), rows that share an id are
masked, and batches may differ in size across processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "InfoNCEOutput",
    "gather_ids",
    "gather_with_grad",
    "info_nce",
    "matryoshka_info_nce",
    "stable_id_hash",
]

IdsLike = Sequence[str] | Sequence[int] | torch.Tensor


def _world() -> tuple[int, int]:
    """`(rank, world_size)`, or `(0, 1)` when `torch.distributed` is unavailable or not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sizes(n: int, device: torch.device) -> list[int]:
    """Every process's batch size, in rank order (one tiny all-gather)."""
    _, world = _world()
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _all_gather_uneven(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """All-gather `x` along dim 0 when processes hold different numbers of rows (no autograd).

    `dist.all_gather` needs equal shapes, so every process pads to the largest batch and the padding is trimmed.
    """
    max_n = max(sizes)
    padded = x.detach()
    if x.shape[0] < max_n:
        padded = torch.cat([padded, padded.new_zeros((max_n - x.shape[0], *x.shape[1:]))], dim=0)
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded.contiguous())
    return [buf[:n] for buf, n in zip(buffers, sizes, strict=True)]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each process the gradient that *every* process computed for its rows.

    Each process's local loss uses the other processes' rows as negatives, so the gradient w.r.t. rank r's embeddings
    is spread over all processes. The backward sums the gathered gradient across processes (an all-reduce; a
    reduce-scatter would move less data but gloo has none for uneven sizes) and keeps this process's slice. The
    "replace the local slot with the input, detach the rest" trick drops those cross-process terms: its gradients
    are only exact when every process recomputes the full global loss (see `info_nce`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        rank, _ = _world()
        parts = _all_gather_uneven(x, sizes)
        parts[rank] = x  # bit-identical to the input, whatever the transport did
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        # Autograd may hand the same buffer to other consumers: reduce a copy, never in place.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def gather_with_grad(x: torch.Tensor, *, sizes: list[int] | None = None) -> torch.Tensor:
    r"""
    All-gather `x` along dim 0 across `torch.distributed` processes, keeping it differentiable.

    The result is the concatenation of every process's `x` in rank order; this process's slice holds exactly `x`'s
    values. In the backward pass, the gradient of the result is summed over all processes and this process's slice is
    returned to `x`, so the gradient that other processes' losses send to this process's rows (where they act as
    negatives) is not lost. Processes may hold different numbers of rows (the sizes are gathered first, batches padded
    to the largest, then trimmed); the other dimensions and the dtype must agree. Identity when `torch.distributed`
    is not initialised or the world has one process.

    Every process must call it, in the same order, and every process must run the backward too (it holds a
    collective).

    Args:
        x (`torch.Tensor` of shape `(n, ...)`):
            This process's rows.
        sizes (`list[int]`, *optional*):
            Every process's row count in rank order, when the caller already has them (saves one all-gather).

    Returns:
        `torch.Tensor` of shape `(sum(sizes), ...)`: the rows of all processes.

    Example:

    ```python
    >>> import torch
    >>> from moon_rl.training.losses import gather_with_grad
    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> gather_with_grad(x) is x  # not distributed: identity
    True
    ```
    """
    _, world = _world()
    if world == 1:
        return x
    if sizes is None:
        sizes = _all_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes)


def stable_id_hash(value: str | int) -> int:
    """A signed 64-bit hash of an id that is the same in every process and every run.

    Python's `hash()` of a `str` is salted per process (`PYTHONHASHSEED`), so it cannot be compared across ranks;
    the first 8 bytes of a BLAKE2b digest can (collisions are ~2**-64 per pair).
    """
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _ids_tensor(ids: IdsLike, device: torch.device | str | None) -> torch.Tensor:
    """Ids as an `int64` tensor: tensors are kept, strings (and ints, to match strings of ints) are hashed."""
    if isinstance(ids, torch.Tensor):
        return ids.to(device=device, dtype=torch.long).reshape(-1)
    return torch.tensor([stable_id_hash(v) for v in ids], dtype=torch.long, device=device)


def gather_ids(
    ids: IdsLike, *, device: torch.device | str | None = None, sizes: list[int] | None = None
) -> torch.Tensor:
    r"""
    All-gather ids (product ids, group labels) across processes as one `int64` tensor, in rank order.

    Strings and Python ints are mapped with [`stable_id_hash`] so equal ids compare equal on every process; an
    integer tensor is gathered as it is. Identity (apart from the conversion) when not distributed.

    Args:
        ids (`Sequence[str]`, `Sequence[int]` or `torch.Tensor` of shape `(n,)`):
            This process's ids, one per row.
        device (`torch.device` or `str`, *optional*):
            Where the result lives; with NCCL it must be this process's GPU. Defaults to the tensor's device, or CPU.
        sizes (`list[int]`, *optional*):
            Every process's row count in rank order, when the caller already has them.

    Returns:
        `torch.LongTensor` of shape `(sum(sizes),)`.

    Example:

    ```python
    >>> from moon_rl.training.losses import gather_ids
    >>> ids = gather_ids(["p1", "p2", "p1"])
    >>> bool(ids[0] == ids[2]), bool(ids[0] == ids[1])
    (True, False)
    ```
    """
    local = _ids_tensor(ids, device)
    _, world = _world()
    if world == 1:
        return local
    if sizes is None:
        sizes = _all_sizes(local.shape[0], local.device)
    return torch.cat(_all_gather_uneven(local, sizes), dim=0)


@dataclass
class InfoNCEOutput:
    """
    What [`info_nce`] returns.

    Args:
        loss (`torch.Tensor`, scalar):
            The loss to back-propagate on this process. Under DDP (gradients averaged over processes) its gradients
            equal those of the single-process loss on the global batch; the mean of `loss` over processes equals
            `global_loss` (so a trainer that averages the loss across ranks for logging reports the right value).
        global_loss (`torch.Tensor`, scalar, detached):
            The mean per-row loss over the global batch, identical on every process and equal to the single-process
            loss. Log this one.
        accuracy (`float`):
            Global top-1 accuracy of anchor -> positive retrieval: the fraction of rows whose own positive has the
            highest logit among the row's candidates (in-batch positives left after id masking, plus hard negatives).
        logits (`torch.Tensor` of shape `(n, N + K)`):
            This process's anchor -> candidate logits (similarity / temperature; masked candidates are `-inf`).
    """

    loss: torch.Tensor
    global_loss: torch.Tensor
    accuracy: float
    logits: torch.Tensor


def _check_inputs(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    temperature: float,
    hard_negatives: torch.Tensor | None,
    hard_negative_mask: torch.Tensor | None,
) -> None:
    if anchors.ndim != 2 or anchors.shape != positives.shape:
        raise ValueError(
            f"anchors and positives must both be (batch, dim); got {tuple(anchors.shape)} and {tuple(positives.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hard_negatives is not None:
        b, d = anchors.shape
        if hard_negatives.ndim != 3 or hard_negatives.shape[0] != b or hard_negatives.shape[2] != d:
            raise ValueError(f"hard_negatives must be ({b}, K, {d}); got {tuple(hard_negatives.shape)}")
        if hard_negative_mask is not None and hard_negative_mask.shape != hard_negatives.shape[:2]:
            raise ValueError(
                f"hard_negative_mask must be {tuple(hard_negatives.shape[:2])}; got {tuple(hard_negative_mask.shape)}"
            )
    elif hard_negative_mask is not None:
        raise ValueError("hard_negative_mask was given without hard_negatives")


def _same_id_mask(
    anchor_ids: IdsLike | None,
    positive_ids: IdsLike | None,
    rows: torch.Tensor,
    device: torch.device,
    sizes: list[int] | None,
) -> torch.Tensor | None:
    """`(n, N)` bool: True where global column j shares a product (or anchor) id with local row i, j != i's target.

    The same mask serves both directions: if pairs i and j share an id, then p_j answers a_i and a_j answers p_i.
    `sizes` is None when the batch is not gathered: the ids then stay local too.
    """
    n = rows.shape[0]
    mask = None
    for ids in (positive_ids, anchor_ids):
        if ids is None:
            continue
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} ids for {n} rows")
        global_ids = _ids_tensor(ids, device) if sizes is None else gather_ids(ids, device=device, sizes=sizes)
        same = global_ids[rows].unsqueeze(1) == global_ids.unsqueeze(0)
        mask = same if mask is None else mask | same
    if mask is not None:
        mask[torch.arange(n, device=device), rows] = False  # never mask the target itself
    return mask


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    *,
    temperature: float = 0.05,
    anchor_ids: IdsLike | None = None,
    positive_ids: IdsLike | None = None,
    hard_negatives: torch.Tensor | None = None,
    hard_negative_mask: torch.Tensor | None = None,
    symmetric: bool = True,
    gather: bool = True,
    relevant_ids: Sequence[Sequence[str | int] | torch.Tensor] | None = None,
) -> InfoNCEOutput:
    r"""
    InfoNCE (in-batch negatives ranking loss) between anchors and positives, symmetric by default.

    Row i's anchor should retrieve row i's positive among all positives of the global batch (every process's rows
    when `gather=True`) plus its own hard negatives; with `symmetric=True`, row i's positive should also retrieve row
    i's anchor among all anchors, and the two cross-entropies are averaged. See the module docstring for the formula
    and the relation to sentence-transformers' `MultipleNegativesRankingLoss`.

    Inputs are assumed L2-normalised: the similarity is the plain dot product, i.e. the cosine. Logits are computed
    in (at least) float32 whatever the input dtype: at `temperature=0.05`, bf16 would round logits near 20 by ~0.1.

    Distributed convention (`gather=True`, `N` global rows, `n` local rows, `W` processes): each process computes
    the per-row losses of its *local* rows against the *global* candidates, and returns
    `loss = W / N * sum(local row losses)` (the local mean when batches are equal). Because [`gather_with_grad`]
    sums the gradient over processes in its backward, DDP's averaging of gradients over the `W` processes then gives
    exactly the gradient of the single-process mean loss over the `N` rows, also when batch sizes differ.
    `global_loss` (an all-reduced, detached scalar) is the single-process value to log.

    Args:
        anchors (`torch.Tensor` of shape `(n, d)`):
            This process's anchor embeddings (queries), L2-normalised.
        positives (`torch.Tensor` of shape `(n, d)`):
            This process's positive embeddings (row i is anchor i's product), L2-normalised.
        temperature (`float`, *optional*, defaults to `0.05`):
            Divides the similarities (`scale = 1 / temperature` in sentence-transformers terms). Must be `> 0`.
        anchor_ids (`Sequence[str]`, `Sequence[int]` or `torch.Tensor`, *optional*):
            One id per row for the anchor (e.g. a query id). Rows that share it are not each other's negatives.
        positive_ids (`Sequence[str]`, `Sequence[int]` or `torch.Tensor`, *optional*):
            One product id per row. Rows for the same product (e.g. a text and an image query of product p) are not
            each other's negatives, in either direction.
        hard_negatives (`torch.Tensor` of shape `(n, K, d)`, *optional*):
            Extra per-row negatives for the anchor -> positive direction only, L2-normalised. None of them may be the
            row's positive product: that is the caller's job (it is not checked, and would be pushed away).
        hard_negative_mask (`torch.Tensor` of shape `(n, K)`, bool, *optional*):
            `False` marks a padding hard negative that is ignored. Defaults to all valid.
        symmetric (`bool`, *optional*, defaults to `True`):
            Average the anchor -> positive and positive -> anchor losses; `False` keeps anchor -> positive only.
        gather (`bool`, *optional*, defaults to `True`):
            Use every process's rows as negatives (needs every process to call this function). No effect when not
            distributed. With `False`, each process's loss is the plain mean over its own batch.
        relevant_ids (`Sequence[Sequence[str | int]]`, *optional*):
            Per row, every product id relevant to the row's anchor (a pair's `positives`), as `positive_ids` gives
            them (required with it; a tensor row for hashed ids, as `gather_ids` makes). Every process must pass it
            or none. A row whose product is relevant to row i's anchor is no negative of
            anchor i, and anchor j is no negative of row i's product when that product is relevant to anchor j.

    Returns:
        [`InfoNCEOutput`]: `loss` to back-propagate, `global_loss` to log, `accuracy`, `logits`.

    Example:

    ```python
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from moon_rl.training.losses import info_nce
    >>> a = F.normalize(torch.randn(8, 16), dim=-1)
    >>> out = info_nce(a, a, temperature=0.05, positive_ids=[f"p{i}" for i in range(8)])
    >>> out.accuracy
    1.0
    ```
    """
    _check_inputs(anchors, positives, temperature, hard_negatives, hard_negative_mask)
    n, device = anchors.shape[0], anchors.device
    rank, world = _world()
    distributed = gather and world > 1
    sizes = _all_sizes(n, device) if distributed else [n]
    offset = sum(sizes[:rank]) if distributed else 0
    total = sum(sizes)
    if total == 0:
        raise ValueError("info_nce got an empty batch on every process")

    # At least float32 (float64 stays float64, which the exactness tests rely on).
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    a, p = anchors.to(dtype), positives.to(dtype)
    all_p = gather_with_grad(p, sizes=sizes) if distributed else p
    # Anchors are only candidates in the reverse direction: skip their all-gather otherwise.
    all_a = gather_with_grad(a, sizes=sizes) if distributed and symmetric else a
    targets = torch.arange(offset, offset + n, device=device)
    same_id = _same_id_mask(anchor_ids, positive_ids, targets, device, sizes if distributed else None)
    forward_mask = reverse_mask = same_id
    if relevant_ids is not None:
        if positive_ids is None:
            raise ValueError("relevant_ids needs positive_ids (the ids it refers to)")
        relevant, answered = _relevance_masks(relevant_ids, positive_ids, targets, device,
                                              sizes if distributed else None)
        forward_mask = relevant if same_id is None else same_id | relevant
        reverse_mask = answered if same_id is None else same_id | answered

    logits = a @ all_p.T / temperature
    if forward_mask is not None:
        logits = logits.masked_fill(forward_mask, float("-inf"))
    if hard_negatives is not None:
        hard = torch.einsum("nd,nkd->nk", a, hard_negatives.to(dtype)) / temperature
        if hard_negative_mask is not None:
            hard = hard.masked_fill(~hard_negative_mask.bool(), float("-inf"))
        logits = torch.cat([logits, hard], dim=1)
    row_loss = F.cross_entropy(logits, targets, reduction="none")

    if symmetric:
        reverse = p @ all_a.T / temperature
        if reverse_mask is not None:
            reverse = reverse.masked_fill(reverse_mask, float("-inf"))
        row_loss = (row_loss + F.cross_entropy(reverse, targets, reduction="none")) / 2

    # Sum over local rows, scaled so that DDP's mean over W processes is the mean over the N global rows.
    loss = row_loss.sum() * (len(sizes) / total)  # len(sizes) is W, or 1 when not gathered
    stats = torch.stack([row_loss.detach().sum(), (logits.detach().argmax(dim=1) == targets).sum().float()])
    if distributed:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return InfoNCEOutput(
        loss=loss, global_loss=stats[0] / total, accuracy=float(stats[1].item()) / total, logits=logits
    )


def _relevance_masks(
    relevant_ids: Sequence[Sequence[str | int] | torch.Tensor],
    positive_ids: IdsLike,
    rows: torch.Tensor,
    device: torch.device,
    sizes: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(n, N)` bool masks, False at each row's target: (column j's product is relevant to local row i's anchor,
    local row i's product is relevant to column j's anchor)."""
    n = rows.shape[0]
    if len(relevant_ids) != n:
        raise ValueError(f"got {len(relevant_ids)} relevant-id lists for {n} rows")
    own = _ids_tensor(positive_ids, device)
    width = max([len(ids) for ids in relevant_ids] + [1])
    if sizes is not None:  # every process pads to the same width, so that the rows can be gathered
        width_t = torch.tensor([width], device=device)
        dist.all_reduce(width_t, op=dist.ReduceOp.MAX)
        width = int(width_t)
    # Padded with the row's own product, which masks nothing new (same-product rows are masked already).
    table = own[:, None].repeat(1, width)
    for i, ids in enumerate(relevant_ids):
        if len(ids):
            table[i, :len(ids)] = _ids_tensor(ids if isinstance(ids, torch.Tensor) else list(ids), device)
    if sizes is not None:
        table = torch.cat(_all_gather_uneven(table, sizes), dim=0)
        products = gather_ids(own, device=device, sizes=sizes)
    else:
        products = own
    relevant = (table[rows][:, None, :] == products[None, :, None]).any(-1)
    answered = (table[None, :, :] == products[rows][:, None, None]).any(-1)
    local = torch.arange(n, device=device)
    relevant[local, rows] = False
    answered[local, rows] = False
    return relevant, answered


def matryoshka_info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    dims: Sequence[int],
    *,
    hard_negatives: torch.Tensor | None = None,
    **kwargs: Any,
) -> InfoNCEOutput:
    r"""
    [`info_nce`] averaged over prefixes of the embeddings (Matryoshka representation learning).

    For each size $d$ in `dims` the first $d$ values of every anchor, positive and hard negative are L2-normalised
    again and [`info_nce`] is computed on them; the loss is the mean over the sizes (sentence-transformers'
    `MatryoshkaLoss` with equal weights, divided by their number so the loss keeps the scale of one term). `accuracy`
    and `logits` are the full size's (the largest in `dims`). With one size equal to the full width it is exactly
    [`info_nce`].

    Args:
        anchors, positives (`torch.Tensor` of shape `(n, D)`): L2-normalised, as for [`info_nce`].
        dims (`Sequence[int]`): the prefix sizes, each in `[1, D]` (e.g. `moon_rl.modeling.matryoshka.loss_dims`).
        hard_negatives (`torch.Tensor` of shape `(n, K, D)`, *optional*): truncated like the rest.
        **kwargs: the other arguments of [`info_nce`].
    """
    sizes = sorted(set(dims), reverse=True)
    if not sizes or sizes[-1] < 1 or sizes[0] > anchors.shape[-1]:
        raise ValueError(f"dims {list(dims)} must be non-empty sizes in [1, {anchors.shape[-1]}]")

    def cut(x: torch.Tensor | None, d: int) -> torch.Tensor | None:
        return x if x is None or d == x.shape[-1] else F.normalize(x[..., :d], dim=-1)

    outputs = [info_nce(cut(anchors, d), cut(positives, d), hard_negatives=cut(hard_negatives, d), **kwargs)
               for d in sizes]
    full = outputs[0]
    if len(outputs) == 1:
        return full
    return InfoNCEOutput(loss=sum(o.loss for o in outputs) / len(outputs),
                         global_loss=sum(o.global_loss for o in outputs) / len(outputs),
                         accuracy=full.accuracy, logits=full.logits)

