"""Forward hooks that read the raw signals out of a HF VLM and apply FIRE inside it.

One `ForwardRecord` is made per call of the backbone (`model.model`, e.g. `Qwen2_5_VLModel`): the input ids and mask,
the raw visual tokens entering the LLM (output of the vision tower's merger), the token embeddings, and the last
hidden state. TRL's fused LM head (trl/trainer/utils.py `add_fused_lm_head`) returns no hidden states, so hooks are the
one way to see them in the policy's own loss forward without a second forward.

FIRE must be idempotent under gradient checkpointing: a checkpointed decoder layer is run again during backward,
after later forwards may have replaced the "current" record. Each decoder-layer call therefore binds to its record
through the `position_embeddings` tuple, which the language model creates once per forward and passes (by
reference) to every layer, including the recomputation. The recomputed layer adds the same delta from the same
record: never twice, never another forward's.

The hook contract (three owners put hooks on the same modules; this is the order they rely on):

1. `BackboneTaps` (this module) installs its hooks once, when `MoonEmbedder` wraps the model: backbone pre/post hooks,
   token-embedding and vision-tower forward hooks (read only), and FIRE's pre-hooks on the decoder layers (they
   change each layer's input).
2. `shared_images.shared_image_features` replaces the vision tower's `forward`, only inside its block: one copy of
   each distinct image goes in (or none, when its features are cached) and the features come back copied to every
   occurrence. Hooks wrap `forward`, so `_on_visual` here still runs after it and the taps (and FIRE, which reads
   `record.visual`) see one feature row per image occurrence, as without sharing
   (`tests/test_shared_prompts.py::test_taps_see_every_image_occurrence_when_images_are_shared`).
3. `shared_prompts.embed_completions` calls the backbone itself (prompt, then completions on its KV cache) inside
   `shared_image_features`; FIRE's pre-hook skips the decoding calls, which hold no image tokens.

Any new hook on these modules must say where it goes in this order; one that edits an output in place must be
prepended (or it would run after the taps have read the output).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from moon_rl.modeling.heads import MoonHeads


@dataclass
class ForwardRecord:
    """What the hooks saw during one backbone forward."""

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    visual: torch.Tensor | None = None  # (N_image_tokens, H) in image-token order, all rows concatenated
    token_embeds: torch.Tensor | None = None  # (B, L, H), before image features are scattered in
    last_hidden: torch.Tensor | None = None  # (B, L, H), after the final norm
    fire_applied: list[int] = field(default_factory=list)

    def image_mask(self, image_token_id: int) -> torch.Tensor | None:
        return None if self.input_ids is None else self.input_ids == image_token_id

    def visual_tokens(self, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's raw visual tokens, left-aligned and padded (B, K, H), and their mask (B, K); K >= 1."""
        hidden = self.last_hidden
        counts = self.image_mask(image_token_id).sum(dim=1)
        if self.visual is None:
            counts = torch.zeros_like(counts)
        width = max(int(counts.max()), 1)
        grid = hidden.new_zeros((hidden.shape[0], width, hidden.shape[-1]))
        mask = torch.arange(width, device=counts.device)[None, :] < counts[:, None]
        if self.visual is not None and int(counts.sum()):
            # Image features come in image-token order, row after row: exactly the order of `mask`'s True cells.
            grid = grid.masked_scatter(mask[..., None], self.visual.to(grid.dtype))
        return grid, mask


def compact(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only the masked-in positions of each row, left-aligned: (B, L, H) -> (B, K, H), K = max count (>= 1).

    Attention over the few real keys instead of the whole padded sequence (what fusion reads is short).
    """
    counts = mask.sum(dim=1)
    width = max(int(counts.max()), 1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    picked = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
    return picked, torch.arange(width, device=mask.device)[None, :] < counts[:, None]


def unwrap_hf_model(model: nn.Module) -> nn.Module:
    """The `PreTrainedModel` under DDP/PEFT wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def backbone_of(model: nn.Module) -> nn.Module:
    """The multimodal backbone (`model.model` for Qwen-VL): returns `last_hidden_state`, runs vision + LM."""
    base = unwrap_hf_model(model)
    return getattr(base, base.base_model_prefix)


def decoder_layers_of(model: nn.Module) -> nn.ModuleList:
    backbone = backbone_of(model)
    lm = getattr(backbone, "language_model", backbone)
    return lm.layers


class BackboneTaps:
    """Installs the hooks on `model` once; `capture()` collects the records of the forwards run inside it."""

    def __init__(self, model: nn.Module, heads: MoonHeads | None, image_token_id: int):
        self.heads = heads
        self.image_token_id = image_token_id
        self._current: ForwardRecord | None = None
        self._bound: dict[int, ForwardRecord] = {}
        self._sinks: list[list[ForwardRecord]] = []
        backbone = backbone_of(model)
        self._handles = [
            backbone.register_forward_pre_hook(self._on_backbone_start, with_kwargs=True),
            backbone.register_forward_hook(self._on_backbone_end),
            backbone.get_input_embeddings().register_forward_hook(self._on_embeddings),
            backbone.visual.register_forward_hook(self._on_visual),
        ]
        layers = decoder_layers_of(model)
        fire_layers = heads.fire.layers if heads is not None and heads.fire is not None else []
        for i in fire_layers:
            if not 0 <= i < len(layers):
                raise ValueError(f"model.heads.fire.layers: layer {i} does not exist (the model has {len(layers)})")
            self._handles.append(layers[i].register_forward_pre_hook(self._fire_hook(i), with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[ForwardRecord]]:
        """Records of every backbone forward run inside the block, in order."""
        sink: list[ForwardRecord] = []
        self._sinks.append(sink)
        try:
            yield sink
        finally:
            self._sinks.remove(sink)

    # ------------------------------------------------------------------ hooks
    def _on_backbone_start(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._current = ForwardRecord(input_ids=input_ids, attention_mask=kwargs.get("attention_mask"))

    def _on_backbone_end(self, module, args, output):
        record = self._current
        if record is None:
            return
        record.last_hidden = output.last_hidden_state
        for sink in self._sinks:
            sink.append(record)
        self._current = None

    def _on_embeddings(self, module, args, output):
        if self._current is not None and self._current.token_embeds is None:
            self._current.token_embeds = output

    def _on_visual(self, module, args, output):
        if self._current is not None:
            self._current.visual = output.pooler_output

    def _fire_hook(self, layer: int):
        # A pre-hook: the residual enters the layer's input, so the layer's attention carries it to the read-out
        # position (added to the output of the last layer it could never reach the read-out).
        def hook(module, args, kwargs):
            record = self._record_for(kwargs.get("position_embeddings"))
            if record is None or record.visual is None or record.input_ids is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = record.image_mask(self.image_token_id)
            if mask.shape != hidden.shape[:2] or int(mask.sum()) != record.visual.shape[0]:
                return None  # a decoding step (no image tokens in this call) or a partial forward
            delta = self.heads.fire.delta(layer, record.visual.to(self.heads.fire.down[str(layer)].weight.dtype))
            residual = hidden.new_zeros(hidden.shape).masked_scatter(mask[..., None], delta.to(hidden.dtype))
            if layer not in record.fire_applied:
                record.fire_applied.append(layer)
            if args:
                return (hidden + residual, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden + residual}

        return hook

    def _record_for(self, position_embeddings) -> ForwardRecord | None:
        """The record a decoder-layer call belongs to (stable across gradient-checkpoint recomputation)."""
        if position_embeddings is None:
            return self._current
        anchor = position_embeddings[0]
        key = id(anchor)
        record = self._bound.get(key)
        if record is None and self._current is not None:
            record = self._bound[key] = self._current
            weakref.finalize(anchor, self._bound.pop, key, None)
        return record
