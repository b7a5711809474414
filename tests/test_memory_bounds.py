"""Memory on real catalogues: tokenised prompts are kept up to a size, GRPO's rows hold no images, and the GRPO
preflight decodes only the products it samples."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from moon_rl.modeling.inputs import EmbedItem, PromptCache
from moon_rl.modeling.loading import load_processor, resolve_model_path


@pytest.fixture(scope="module")
def processor():
    path = resolve_model_path(SimpleNamespace(name_or_path="builtin:tiny-vl", builtin_size="tiny"))
    return load_processor(path)


def item(i: int) -> EmbedItem:
    return EmbedItem(text=f"product {i}", images=[Image.new("RGB", (112, 112), (i % 256, 7, 7))], kind="product")


def test_prompt_cache_stays_within_its_bytes_as_the_catalogue_grows(processor):
    one = PromptCache(processor).get(0, lambda: item(0))
    size = one.pixel_values.numel() * 4  # float32 patches of one 112-px image: ~0.3 MB
    cache = PromptCache(processor, max_bytes=int(5.5 * size))
    made = []
    for n in range(40):  # a growing catalogue: the cache plateaus at 5 prompts
        cache.get(n, lambda n=n: made.append(n) or item(n))
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 5 and len(made) == 40
    cache.get(39, lambda: made.append("again") or item(39))  # recent: kept
    again = cache.get(0, lambda: made.append(0) or item(0))  # evicted long ago: tokenised again, the same prompt
    assert made[-1] == 0 and "again" not in made
    torch.testing.assert_close(again.pixel_values, one.pixel_values)
    assert again.prompt_ids == one.prompt_ids
    unbounded = PromptCache(processor)
    for n in range(12):
        unbounded.get(n, lambda n=n: item(n))
    assert len(unbounded) == 12  # None keeps everything (the tiny demo's working set)


def test_grpo_rows_hold_no_images_and_the_preflight_decodes_only_its_samples(tmp_path):
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.modeling.inputs import to_item
    from moon_rl.recipe import load_recipe
    from moon_rl.training.grpo_data import grpo_dataset
    from moon_rl.training.preflight import reasoning_preflight
    from moon_rl.training.sft_data import sft_examples

    path = tmp_path / "r.yaml"
    path.write_text("model: {lora: null, heads: {embed_dim: 32}}\ndata: {synthetic: {n_products: 48, seed: 3}}\n")
    recipe = load_recipe(path, [f"output_dir={tmp_path / 'run'}"])
    catalogue = load_recipe_catalogue(recipe.data)
    examples = sft_examples(catalogue, "train")
    embedder = MoonEmbedder.from_recipe(recipe)
    rows = grpo_dataset(embedder, catalogue, examples)
    assert "images" not in rows.column_names and len(rows) == len(examples) > 16
    assert rows.data.nbytes < 1000 * len(rows)  # prompt text and ids: no encoded photo (~10 kB each) in the table

    decoded = []

    def make_item(product):
        decoded.append(product.id)
        return to_item(product, catalogue.image, embedder.max_images)

    records = [catalogue.products[ex.positive] for ex in examples]
    reasoning_preflight(embedder, records, catalogue_has_traces=True, max_new_tokens=4, temperature=1.0,
                        make_item=make_item)
    assert len(decoded) == 16
