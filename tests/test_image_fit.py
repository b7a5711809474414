"""Every prompt's images are resized to the recipe's pixel range first, so that any processor (vLLM's, with the model's
default range) counts the same image tokens as the prompt holds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from moon_rl.errors import DataError
from moon_rl.modeling.inputs import EmbedItem, fit_images, fitted_size, tokenize_prompts
from moon_rl.modeling.loading import load_processor, resolve_model_path

# The 3B recipe's range, and Qwen2.5-VL's own defaults (what vLLM uses when it loads the model by name).
RECIPE_RANGE = (50176, 200704)
MODEL_DEFAULT_RANGE = (3136, 12845056)
SIZES = [(112, 112), (96, 128), (300, 200), (1000, 37), (37, 1000), (4000, 3000), (50, 50), (225, 223), (640, 481)]


@pytest.fixture(scope="module")
def processors():
    path = resolve_model_path(SimpleNamespace(name_or_path="builtin:tiny-vl", builtin_size="tiny"))
    recipe = load_processor(path, min_pixels=RECIPE_RANGE[0], max_pixels=RECIPE_RANGE[1])
    default = load_processor(path, min_pixels=MODEL_DEFAULT_RANGE[0], max_pixels=MODEL_DEFAULT_RANGE[1])
    return recipe, default


def image_tokens(processor, image: Image.Image) -> int:
    prompts = tokenize_prompts(processor, [EmbedItem(text="x", images=[image])])
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return prompts.prompt_ids[0].count(image_token_id)


def raw_tokens(processor, image: Image.Image) -> int:
    """Image tokens of the processor's own resize, without fitting (what vLLM computes from the raw image)."""
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // processor.image_processor.merge_size ** 2


def test_fitted_images_count_the_same_tokens_under_the_model_default_range(processors):
    recipe, default = processors
    differed = 0
    for width, height in SIZES:
        raw = Image.new("RGB", (width, height), (120, 40, 200))
        (fitted,) = fit_images(recipe, [raw])
        tokens = image_tokens(recipe, raw)  # the prompt the trainers and the embedder build
        assert raw_tokens(default, fitted) == tokens, (width, height)  # vLLM, handed the fitted image
        assert raw_tokens(recipe, fitted) == tokens
        low, high = RECIPE_RANGE
        assert low <= fitted.width * fitted.height <= high and fitted.width % 28 == 0 and fitted.height % 28 == 0
        differed += raw_tokens(default, raw) != tokens
    # Without fitting, most sizes would disagree: the example, a 112-px photo, is 64 tokens against 16.
    assert raw_tokens(default, Image.new("RGB", (112, 112))) == 16 and image_tokens(recipe, Image.new("RGB", (112, 112))) == 64
    assert differed >= len(SIZES) - 2


def test_fitting_keeps_conforming_images_and_is_idempotent(processors):
    recipe, _ = processors
    conforming = Image.new("RGB", (224, 448))
    assert fit_images(recipe, [conforming])[0] is conforming  # no resampling of images already at a kept size
    (once,) = fit_images(recipe, [Image.new("RGB", (333, 517))])
    assert fit_images(recipe, [once])[0] is once
    assert fitted_size(SimpleNamespace(size={}), 10, 10) is None  # not a Qwen-VL processor: images untouched


def test_an_extreme_aspect_ratio_is_a_clear_error(processors):
    recipe, _ = processors
    with pytest.raises(DataError, match=r"a 1x300 image cannot be shown to the model.*aspect ratio"):
        fit_images(recipe, [Image.new("RGB", (1, 300))])


def test_grpo_images_and_vllm_requests_are_fitted(tmp_path):
    """TRL hands a batch's images to vLLM as they are, and the embedder's vLLM path sends its items' images: both
    must be the fitted ones, not the catalogue's."""
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import load_recipe
    from moon_rl.training.grpo_data import catalogue_images

    path = tmp_path / "r.yaml"
    path.write_text("model: {lora: null, heads: {embed_dim: 32}, image_min_pixels: 12544, image_max_pixels: 50176}\n"
                    "data: {synthetic: {n_products: 48, seed: 3, image_size: 56}}\n")
    recipe = load_recipe(path, [f"output_dir={tmp_path / 'run'}"])
    catalogue = load_recipe_catalogue(recipe.data)
    embedder = MoonEmbedder.from_recipe(recipe)
    images = catalogue_images(embedder, catalogue)
    for product_id in list(catalogue.products)[:3]:
        assert catalogue.image(catalogue.products[product_id]).size == (56, 56)
        assert [image.size for image in images(product_id)] == [(112, 112)]  # upscaled to the recipe's minimum area

    sent = []

    class FakeVLLM:
        def generate(self, prompt_ids, images, **kwargs):
            sent.extend(image.size for group in images for image in group)
            return [[] for _ in prompt_ids]

    embedder.generation_backend, embedder._vllm = "vllm", FakeVLLM()
    embedder.generate_reasoning([EmbedItem(text="x", images=[Image.new("RGB", (56, 84))], kind="product")])
    assert sent == [fitted_size(embedder.processor.image_processor, 84, 56)[::-1]] and sent != [(56, 84)]
