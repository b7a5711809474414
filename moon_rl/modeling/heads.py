"""`MoonHeads`: moon-rl's reading of MOON3.0's multi-head modality fusion and FIRE, plus the projection.

The paper's internals are not public (research/paper.md); DESIGN.md section 4 records our reading:

* **Modality fusion** (paper component 1: long reasoning dilutes attention to the raw input): the read-out state
  attends, with multi-head cross-attention, separately to the raw visual tokens entering the LLM and to the prompt's
  text-token embeddings; an input-dependent gate mixes {read-out, image, text}; the result is added to the read-out
  through a zero-initialised output projection, so a fresh module is exactly the identity. A missing modality is
  masked out of the gate (its logit is -inf), never zero-filled. With `fusion_chain`, a third attention reads the
  reasoning chain's own tokens (their input embeddings), so the embedding depends on what the chain *says*: a chain
  that names the product's colour puts that word's embedding into the vector, as a text query naming it does on the
  query side. Direct mode has no chain: that source is masked out.
* **FIRE** (fine-grained residual enhancement, paper component 3: local detail fades with depth): at the input of
  chosen decoder layers a zero-initialised low-rank projection of the raw visual tokens is added back onto the
  image-token positions. The hooks that apply it live in `moon_rl.modeling.taps`; its parameters live here, outside the HF
  model, so weight sync to vLLM never sees them.
* **Projection** to `embed_dim` and L2 normalisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def default_fire_layers(num_layers: int) -> list[int]:
    """Every 4th decoder layer, the last one included (0-based): 12 layers -> [3, 7, 11]; 2 layers -> [1]."""
    return sorted({i for i in range(num_layers) if (i + 1) % 4 == 0} | {num_layers - 1})


@dataclass
class HeadsConfig:
    """Shape and switches of `MoonHeads` (saved as `heads_config.json` next to `heads.safetensors`)."""

    hidden_size: int
    embed_dim: int = 256
    fusion: bool = True
    fusion_heads: int = 4
    #: The fusion also attends to the chain's tokens. False in configs saved before it existed (their heads have no
    #: chain attention); recipes switch it on by default (`model.heads.fusion.chain`).
    fusion_chain: bool = False
    fire: bool = True
    fire_layers: list[int] = field(default_factory=list)
    fire_rank: int = 8
    init_seed: int = 0
    #: Prefix sizes trained with the Matryoshka loss besides `embed_dim` (empty: the full size only).
    matryoshka_dims: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ModalityFusion(nn.Module):
    """Read-out state attends to raw image and text tokens; a gate mixes the three; zero-init residual output."""

    def __init__(self, hidden_size: int, num_heads: int, chain: bool = False):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"model.heads.fusion.num_heads={num_heads} must divide the hidden size {hidden_size}")
        self.image_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.text_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.chain_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True) if chain else None
        self.norm = nn.LayerNorm(hidden_size)
        sources = 4 if chain else 3
        self.gate = nn.Linear(sources * hidden_size, sources)
        self.out = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def _attend(attn: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor):
        """`attn` of each row's one query over its unmasked keys; rows without keys give zeros and `present=False`.

        The same function as `attn(query[:, None], keys, keys, key_padding_mask=~mask)` (its weights, its heads), with
        the key and value projections folded into the query instead of applied to every key: head h's score of key x
        is q_h . (W_k,h x + b_k,h) = (W_k,h^T q_h) . x + q_h . b_k,h, and the last term, the same for every key, cancels
        in the softmax; its output is W_v,h (sum_j a_j x_j) + b_v,h since the weights sum to one. Projecting all
        B x L keys costs B x L x 2H^2; this costs B x (2H^2 + 2 x heads x L x H): at H=512 the heads' forward takes a
        sixth of the time and forward + backward a third, and far less at a real model's width and prompt length,
        where a row has hundreds of image and text tokens.
        """
        present = mask.any(dim=1)
        rows, width = query.shape
        n_heads = attn.num_heads
        head_dim = width // n_heads
        w_q, w_k, w_v = attn.in_proj_weight.split(width)
        b_q, _, b_v = attn.in_proj_bias.split(width) if attn.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q).view(rows, n_heads, head_dim).transpose(0, 1) * head_dim**-0.5  # (heads, B, d)
        folded = torch.bmm(q, w_k.view(n_heads, head_dim, width)).transpose(0, 1)  # (B, heads, H): W_k,h^T q_h
        scores = folded @ keys.transpose(1, 2)  # (B, heads, L)
        # A row with no keys would make softmax NaN: let it see its first key, then zero its result.
        safe_mask = mask.clone()
        safe_mask[~present, 0] = True
        weights = scores.masked_fill(~safe_mask[:, None, :], float("-inf")).softmax(dim=-1)
        pooled = weights @ keys  # (B, heads, H): each head's weighted mean of the raw keys
        values = torch.bmm(pooled.transpose(0, 1), w_v.view(n_heads, head_dim, width).transpose(1, 2))  # (heads, B, d)
        values = values.transpose(0, 1).reshape(rows, width)
        if b_v is not None:
            values = values + b_v
        out = attn.out_proj(values)
        return out * present[:, None].to(out.dtype), present

    def forward(
        self, readout: torch.Tensor, image_tokens: torch.Tensor, image_mask: torch.Tensor,
        text_tokens: torch.Tensor, text_mask: torch.Tensor,
        chain_tokens: torch.Tensor | None = None, chain_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = self.norm(readout)
        image, has_image = self._attend(self.image_attn, q, image_tokens, image_mask)
        text, has_text = self._attend(self.text_attn, q, text_tokens, text_mask)
        sources, present = [q, image, text], [torch.ones_like(has_image), has_image, has_text]
        if self.chain_attn is not None:
            if chain_tokens is None or chain_mask is None:  # no chain given: direct mode
                chain_tokens, chain_mask = text_tokens[:, :1], torch.zeros_like(text_mask[:, :1])
            chain, has_chain = self._attend(self.chain_attn, q, chain_tokens, chain_mask)
            sources.append(chain)
            present.append(has_chain)
        logits = self.gate(torch.cat(sources, dim=-1))
        weights = logits.masked_fill(~torch.stack(present, dim=-1), float("-inf")).softmax(dim=-1)
        mixed = sum(weights[:, i:i + 1] * source for i, source in enumerate(sources))
        return readout + self.out(mixed)


class FireAdapters(nn.Module):
    """One zero-initialised low-rank map (down: H->r, up: r->H) per FIRE layer, applied to raw visual tokens."""

    def __init__(self, hidden_size: int, layers: list[int], rank: int):
        super().__init__()
        self.layers = list(layers)
        self.down = nn.ModuleDict({str(i): nn.Linear(hidden_size, rank, bias=False) for i in self.layers})
        self.up = nn.ModuleDict({str(i): nn.Linear(rank, hidden_size, bias=False) for i in self.layers})
        for up in self.up.values():
            nn.init.zeros_(up.weight)

    def delta(self, layer: int, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Residual to add at the image-token positions of decoder layer `layer` (same order as the tokens)."""
        key = str(layer)
        return self.up[key](self.down[key](visual_tokens))


class MoonHeads(nn.Module):
    """Fusion + FIRE + projection. Fresh heads leave the read-out untouched before the projection."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        # The projection is initialised from its own seed, so that switching fusion/FIRE on or off does not change
        # it: a fresh model embeds identically with the modules on and off.
        gen = torch.Generator().manual_seed(config.init_seed)
        self.proj = nn.Linear(h, config.embed_dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(config.embed_dim, h, generator=gen) / h**0.5)
        self.fusion = ModalityFusion(h, config.fusion_heads, config.fusion_chain) if config.fusion else None
        self.fire = FireAdapters(h, config.fire_layers, config.fire_rank) if config.fire and config.fire_layers else None

    def forward(
        self, readout: torch.Tensor, image_tokens: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
        chain_tokens: torch.Tensor | None = None, chain_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L2-normalised embeddings (B, embed_dim) from read-out states (B, H) and the raw tokens (B, L, H)."""
        x = readout.float()
        if self.fusion is not None and image_tokens is not None:
            x = self.fusion(x, image_tokens.float(), image_mask, text_tokens.float(), text_mask,
                            None if chain_tokens is None else chain_tokens.float(), chain_mask)
        return F.normalize(self.proj(x), dim=-1)
