"""Vision pre-training of `builtin:tiny-vl`: a stand-in for the pretrained vision encoder every real VLM ships with.

A real Qwen2.5-VL tells stripes from dots, and red from blue, out of the box; a random-init tower reads colour but not
texture, and it does not learn texture through the language model either. Measured on the synthetic catalogue's 120
test products (product photo alone, one seed), training the whole model to write the pattern word after
`<think>pattern` (LM loss only, batch 32, lr 1e-3): from the random tower 0.35 right after 400 steps (chance 0.17);
from a texture-pre-trained tower 0.92 after 200.

Texture alone is not enough: naming the texture of swatches drawn in every colour teaches the tower to *ignore* colour.
Linear probes on the mean output token of 512 held-out swatches (250 steps; weight 0.1 over three seeds, the others
one):

| pre-training                        | texture probe | colour probe |
|-------------------------------------|---------------|--------------|
| none (random tower)                 | 0.46          | 0.95         |
| texture only (BUILD_VERSION <= 3)   | 0.96          | 0.46         |
| texture + colour, colour weight 1   | 0.52          | 1.00         |
| texture + colour, colour weight 0.3 | 0.84          | 0.98         |
| texture + colour, colour weight 0.1 | 0.98-0.99     | 0.98         |

With the texture-only tower, SFT's chains named the colour 0.15 of the time (bench/RESULTS.md). So the builder
pre-trains the tower once, before saving: `PRETRAIN_STEPS` steps of naming the texture *and* the colour
(`COLOUR_WEIGHT`) of procedurally drawn swatches (a textured ellipse or rectangle in any of the generator's colours,
on a pale noisy background: the synthetic generator's textures and colours, never its product images, silhouettes
or catalogue), with two linear heads on the mean of the tower's output tokens that are then discarded. Deterministic
in the seed on one thread (the builder pins it); about 27 s on one CPU core for `tiny`.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from moon_rl.data.synthetic import COLOURS, PATTERNS
from moon_rl.data.synthetic_images import BACKGROUNDS, pale_background, pattern_fill

__all__ = ["COLOUR_WEIGHT", "PRETRAIN_STEPS", "draw_swatch", "pretrain_vision"]

PRETRAIN_STEPS = 250
#: Weight of the colour loss beside the texture loss (colour is learnt far sooner; at 0.3 and above it crowds texture
#: out).
COLOUR_WEIGHT = 0.1
_COLOUR_NAMES = tuple(COLOURS)


def draw_swatch(rng: random.Random, size: int) -> tuple[Image.Image, int, int]:
    """One swatch: a random textured ellipse or rectangle on a pale noisy gradient; (image, texture, colour) ids."""
    texture, colour = rng.randrange(len(PATTERNS)), rng.randrange(len(_COLOUR_NAMES))
    period = max(6, round(size * rng.uniform(0.7, 1.05) / 7))
    fill = pattern_fill(size, COLOURS[_COLOUR_NAMES[colour]], PATTERNS[texture], period, rng.randrange(period))
    image = pale_background(size, *rng.sample(BACKGROUNDS, 2), np.random.default_rng(rng.getrandbits(32)))
    w, h = (rng.uniform(0.65, 1.0) * size for _ in range(2))
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    mask = Image.new("L", (size, size), 0)
    shape = ImageDraw.Draw(mask).ellipse if rng.random() < 0.5 else ImageDraw.Draw(mask).rectangle
    shape((x0, y0, x0 + w, y0 + h), fill=255)
    return Image.composite(fill, image, mask), texture, colour


def pretrain_vision(model, image_processor, *, steps: int = PRETRAIN_STEPS, seed: int = 0, batch_size: int = 32,
                    image_size: int = 112, learning_rate: float = 1e-3,
                    colour_weight: float = COLOUR_WEIGHT) -> dict[str, float]:
    """Train `model`'s vision tower (and merger) in place to name swatches' textures and colours; returns the heads'
    held-out accuracy per attribute (`{"texture": ..., "colour": ...}`).

    Args:
        model: a Qwen2.5-VL-architecture model (`model.model.visual` is the tower).
        image_processor: the model's image processor (the swatches go through it as product photos do).
        steps (`int`): optimizer steps of `batch_size` fresh swatches each.
        seed (`int`): seeds the swatches (the head's initialisation follows torch's global seed).
        batch_size (`int`): swatches per step.
        image_size (`int`): swatch side in pixels (the synthetic catalogue's).
        learning_rate (`float`): AdamW's.
        colour_weight (`float`): weight of the colour loss (0 = texture only, as `BUILD_VERSION` 3 and earlier).
    """
    visual = model.model.visual
    width = model.config.vision_config.out_hidden_size
    rng = random.Random(f"tiny-vl-vision:{seed}")
    texture_head, colour_head = torch.nn.Linear(width, len(PATTERNS)), torch.nn.Linear(width, len(_COLOUR_NAMES))
    optimizer = torch.optim.AdamW([*visual.parameters(), *texture_head.parameters(), *colour_head.parameters()],
                                  lr=learning_rate)

    def batch(n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        drawn = [draw_swatch(rng, image_size) for _ in range(n)]
        inputs = image_processor(images=[image for image, _, _ in drawn], return_tensors="pt")
        textures, colours = torch.tensor([d[1] for d in drawn]), torch.tensor([d[2] for d in drawn])
        return inputs, textures, colours

    def pooled(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        counts = (inputs["image_grid_thw"].prod(-1) // visual.spatial_merge_size**2).tolist()
        return torch.stack([chunk.mean(0) for chunk in tokens.split(counts)])

    visual.train()
    for _ in range(steps):
        inputs, texture, colour = batch(batch_size)
        features = pooled(inputs)
        loss = torch.nn.functional.cross_entropy(texture_head(features), texture)
        if colour_weight:
            loss = loss + colour_weight * torch.nn.functional.cross_entropy(colour_head(features), colour)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        inputs, texture, colour = batch(128)
        features = pooled(inputs)
        return {"texture": float((texture_head(features).argmax(-1) == texture).float().mean()),
                "colour": float((colour_head(features).argmax(-1) == colour).float().mean())}
