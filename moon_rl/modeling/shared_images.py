"""Run a VLM's vision tower once per distinct image of a forward (GRPO's reward forward repeats every prompt image).

A GRPO generation batch holds each prompt `num_generations` times, images included: the reward forward would encode
every product image `num_generations` times over. Inside `shared_image_features(model)` a pre-hook on the vision
tower keeps one copy of each distinct image (compared byte for byte) and a forward hook copies the features back to
every occurrence, so the language model and the taps see exactly what they would have seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from moon_rl.modeling.taps import backbone_of


def image_key(pixels: torch.Tensor) -> bytes:
    """An image's pixel patches as raw bytes, whatever the dtype (numpy has no bfloat16): equal bytes, equal image."""
    return pixels.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


@contextlib.contextmanager
def shared_image_features(model: nn.Module) -> Iterator[None]:
    """Inside the block, duplicate images in one vision-tower call are encoded once (Qwen2/2.5-VL style towers)."""
    visual = getattr(backbone_of(model), "visual", None)
    merge = getattr(visual, "spatial_merge_size", None)
    if visual is None or merge is None:
        yield
        return
    plan: dict[str, Any] = {}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan.clear()
        pixels = args[0] if args else kwargs.get("hidden_states")
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if pixels is None or grid is None or len(grid) < 2:
            return None
        patches = grid.prod(-1).tolist()
        chunks = torch.split(pixels, patches)
        first: dict[bytes, int] = {}
        index = []  # occurrence -> distinct image
        for chunk in chunks:
            index.append(first.setdefault(image_key(chunk), len(first)))
        if len(first) == len(index):
            return None
        keep = [index.index(u) for u in range(len(first))]
        plan.update(index=index, patches=[patches[i] for i in keep],
                    tokens=[patches[i] // merge**2 for i in keep])
        new_pixels, new_grid = torch.cat([chunks[i] for i in keep]), grid[keep]
        # Qwen-VL models call `visual(pixel_values, grid_thw=...)`; other layouts pass through untouched above.
        rest = args[2:] if len(args) > 1 else ()
        args = (new_pixels, new_grid, *rest) if len(args) > 1 else (new_pixels,) if args else ()
        if len(args) < 2:
            kwargs = {**kwargs, "grid_thw": new_grid}
        if not args:
            kwargs["hidden_states"] = new_pixels
        return args, kwargs

    def expand(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        parts = torch.split(tensor, sizes)
        return torch.cat([parts[u] for u in plan["index"]])

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not plan:
            return None
        for name, value in list(output.items()):
            if isinstance(value, torch.Tensor) and value.shape[0] == sum(plan["tokens"]):
                output[name] = expand(value, plan["tokens"])
            elif isinstance(value, torch.Tensor) and value.shape[0] == sum(plan["patches"]):
                output[name] = expand(value, plan["patches"])
            else:
                raise RuntimeError(f"shared_image_features: cannot copy the vision tower's {name!r} back to "
                                   "repeated images; call the model without shared_image_features")
        plan.clear()
        return output

    handles = [visual.register_forward_pre_hook(before, with_kwargs=True),
               visual.register_forward_hook(after, with_kwargs=True, prepend=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
