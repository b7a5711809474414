"""Run a VLM's vision tower once per distinct image (GRPO repeats every prompt image, and encodes it several times).

A GRPO generation batch holds each prompt `num_generations` times, images included, and one step encodes the batch's
product images in generation and again in the reward forward. Inside `shared_image_features(model)` the vision tower
receives one copy of each distinct image of a call (compared byte for byte) and its features are copied back to every
occurrence, so the language model and the taps see exactly what they would have seen.

With an `ImageFeatureCache`, features also outlive the call: an image the block encoded once (say in generation's
prefill) is not encoded again by a later call in the block (the reward forward), as long as no gradient is wanted
(cached features carry no graph) and the weights have not changed (the caller scopes the cache: GRPO makes one per
generation batch). A tower whose output depends on its train/eval mode (a dropout, e.g. LoRA dropout on its layers)
keeps one entry per mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moon_rl.modeling.taps import backbone_of

__all__ = ["ImageFeatureCache", "image_key", "shared_image_features"]


def image_key(pixels: torch.Tensor) -> bytes:
    """An image's pixel patches as raw bytes, whatever the dtype (numpy has no bfloat16): equal bytes, equal image."""
    return pixels.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


@dataclass
class ImageFeatureCache:
    """Vision-tower outputs per image, kept across the calls of a `shared_image_features` block.

    Attributes:
        features (`dict`): (image key, tower mode) -> {output field: this image's rows}.
        encoded (`int`): images the tower encoded; `reused` (`int`): image occurrences served without encoding.
    """

    features: dict[tuple[bytes, bool | None], dict[str, torch.Tensor]] = field(default_factory=dict)
    output_type: type | None = None
    encoded: int = 0
    reused: int = 0


def _mode_dependent(module: nn.Module) -> bool:
    """Whether train and eval mode compute different outputs (an active dropout or batch norm inside)."""
    return any((isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or isinstance(m, nn.modules.batchnorm._NormBase)
               for m in module.modules())


@contextlib.contextmanager
def shared_image_features(model: nn.Module, cache: ImageFeatureCache | None = None) -> Iterator[None]:
    """Inside the block, each distinct image of a vision-tower call is encoded once (Qwen2/2.5-VL style towers); with
    `cache`, once for the whole block while no gradient is needed. A block nested in another one on the same model
    changes nothing (the outer block already shares)."""
    visual = getattr(backbone_of(model), "visual", None)
    merge = getattr(visual, "spatial_merge_size", None)
    if visual is None or merge is None or "forward" in vars(visual):  # not a Qwen-VL tower, or already shared
        yield
        return
    original = visual.forward
    mode_dependent = _mode_dependent(visual)

    def forward(*args: Any, **kwargs: Any) -> Any:
        pixels = args[0] if args else kwargs.pop("hidden_states")
        grid = args[1] if len(args) > 1 else kwargs.pop("grid_thw", None)
        if grid is None:
            return original(*args, **kwargs) if args else original(hidden_states=pixels, **kwargs)
        rest = args[2:]
        patches = grid.prod(-1).tolist()
        tokens = [p // merge**2 for p in patches]
        mode = visual.training if mode_dependent else None
        keys = [(image_key(chunk), mode) for chunk in torch.split(pixels, patches)]
        # Cached features have no graph: with gradient on, each call starts from scratch (sharing within it only).
        store = cache if cache is not None and not torch.is_grad_enabled() else ImageFeatureCache()
        first = {key: i for i, key in reversed(list(enumerate(keys)))}  # each distinct image's first occurrence
        missing = sorted(i for key, i in first.items() if key not in store.features)
        if len(missing) == len(keys) and cache is None:
            return original(pixels, grid, *rest, **kwargs)  # nothing repeats: the plain call
        if missing:
            chunks = torch.split(pixels, patches)
            output = original(torch.cat([chunks[i] for i in missing]), grid[missing], *rest, **kwargs)
            store.output_type = type(output)
            sizes = {sum(patches[i] for i in missing): [patches[i] for i in missing],
                     sum(tokens[i] for i in missing): [tokens[i] for i in missing]}
            per_image: list[dict[str, torch.Tensor]] = [{} for _ in missing]
            for name, value in output.items():
                if not isinstance(value, torch.Tensor) or value.shape[0] not in sizes:
                    raise RuntimeError(f"shared_image_features: cannot copy the vision tower's {name!r} back to "
                                       "repeated images; call the model without shared_image_features")
                for slot, part in zip(per_image, torch.split(value, sizes[value.shape[0]]), strict=True):
                    slot[name] = part
            for i, features in zip(missing, per_image, strict=True):
                store.features[keys[i]] = features
            store.encoded += len(missing)
        store.reused += len(keys) - len(missing)
        names = list(store.features[keys[0]])
        assert store.output_type is not None
        return store.output_type(**{name: torch.cat([store.features[key][name] for key in keys]) for name in names})

    visual.forward = forward
    try:
        yield
    finally:
        del visual.forward
