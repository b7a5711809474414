"""The builtin tiny VLM's vision pre-training: swatches are what they say, and the saved tower tells textures apart."""

from __future__ import annotations

import random

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from moon_rl.data.synthetic import PATTERNS
from moon_rl.modeling import tiny
from moon_rl.modeling.loading import load_model, load_processor
from moon_rl.modeling.tiny_vision import draw_swatch
from moon_rl.recipe import ModelSpec


def test_swatches_are_deterministic_and_labelled():
    first = [draw_swatch(random.Random(7), 112) for _ in range(3)]
    again = [draw_swatch(random.Random(7), 112) for _ in range(3)]
    for (image, texture, colour), (image2, texture2, colour2) in zip(first, again, strict=True):
        assert image.size == (112, 112) and image.mode == "RGB"
        assert list(image.getdata()) == list(image2.getdata()) and (texture, colour) == (texture2, colour2)
    labels = {draw_swatch(random.Random(i), 112)[1] for i in range(200)}
    assert labels == set(range(len(PATTERNS)))  # every texture is drawn


def _tower_features(model, processor, images) -> torch.Tensor:
    visual = model.model.visual
    inputs = processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        tokens = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    counts = (inputs["image_grid_thw"].prod(-1) // visual.spatial_merge_size**2).tolist()
    return torch.nn.functional.normalize(torch.stack([t.mean(0) for t in tokens.split(counts)]), dim=-1)


def _probe_accuracy(model, processor, attribute: int) -> float:
    """A linear probe (logistic regression on 192 swatches, scored on 96 others) of the tower's mean token: how well it
    reads the swatch's texture (`attribute` 1) or colour (2). (Nearest-centroid scoring missed colour: the v4 tower
    scored 0.36 on it against this probe's 0.92, the texture-only v3 tower 0.23.)"""
    rng = random.Random(123)  # not the builder's seed: these swatches were never trained on
    train = [draw_swatch(rng, 112) for _ in range(192)]
    test = [draw_swatch(rng, 112) for _ in range(96)]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(_tower_features(model, processor, [drawn[0] for drawn in train]).numpy(), [d[attribute] for d in train])
    return float(probe.score(_tower_features(model, processor, [drawn[0] for drawn in test]).numpy(),
                             [drawn[attribute] for drawn in test]))


def test_builtin_tower_is_pretrained_to_read_texture_and_keeps_colour():
    """Texture pre-training alone taught the tower to ignore colour (BUILD_VERSION 3: colour probe 0.95 -> 0.46, and
    SFT's chains named the colour 0.15 of the time); the builder trains both."""
    folder = tiny.builtin_model_dir(tiny.TINY_VL, size="tiny")
    processor = load_processor(folder)
    pretrained = load_model(folder, ModelSpec()).eval()
    torch.manual_seed(0)
    random_init = type(pretrained)(pretrained.config)  # same architecture, the tower as it was before pre-training
    random_init.eval()
    texture = _probe_accuracy(pretrained, processor, 1), _probe_accuracy(random_init, processor, 1)
    assert texture[0] >= 0.8 and texture[0] >= texture[1] + 0.3, texture
    colour = _probe_accuracy(pretrained, processor, 2), _probe_accuracy(random_init, processor, 2)
    assert colour[0] >= 0.8, colour
