"""The builtin tiny VLM's vision pre-training: swatches are what they say, and the saved tower tells textures apart."""

from __future__ import annotations

import random

import torch

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


def _centroid_accuracy(model, processor) -> float:
    """Nearest texture centroid (from 192 swatches) on 96 other swatches: how well the tower's mean token reads texture."""
    rng = random.Random(123)  # not the builder's seed: these swatches were never trained on
    train = [draw_swatch(rng, 112) for _ in range(192)]
    test = [draw_swatch(rng, 112) for _ in range(96)]
    features = _tower_features(model, processor, [image for image, _, _ in train])
    labels = torch.tensor([texture for _, texture, _ in train])
    centroids = torch.stack([features[labels == k].mean(0) for k in range(len(PATTERNS))])
    predicted = (_tower_features(model, processor, [image for image, _, _ in test]) @ centroids.T).argmax(-1)
    return float((predicted == torch.tensor([texture for _, texture, _ in test])).float().mean())


def test_builtin_tower_is_pretrained_to_read_texture():
    folder = tiny.builtin_model_dir(tiny.TINY_VL, size="tiny")
    processor = load_processor(folder)
    pretrained = load_model(folder, ModelSpec()).eval()
    torch.manual_seed(0)
    random_init = type(pretrained)(pretrained.config)  # same architecture, the tower as it was before pre-training
    random_init.eval()
    pretrained_accuracy, random_accuracy = _centroid_accuracy(pretrained, processor), _centroid_accuracy(random_init, processor)
    assert pretrained_accuracy >= 0.8, (pretrained_accuracy, random_accuracy)
    assert pretrained_accuracy >= random_accuracy + 0.3, (pretrained_accuracy, random_accuracy)
