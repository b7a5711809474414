"""embed_completions: each distinct prompt runs once, its completions on its KV cache, with the very embeddings one
forward over the whole sequences gives (positions, image features, fusion, FIRE and read-out alike)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from moon_rl.modeling.embedder import MoonEmbedder, eval_mode
from moon_rl.modeling.inputs import EmbedItem, assemble, tokenize_prompts
from moon_rl.modeling.shared_prompts import distinct_prompts, embed_completions
from moon_rl.modeling.taps import backbone_of
from tests.test_embedder import image, randomise_heads, tiny_recipe

RED, BLUE, WIDE_BLUE = image((200, 30, 30)), image((30, 30, 200)), image((30, 30, 200), (96, 128))
PRODUCTS = {
    "a": EmbedItem(text="Title: a", images=[RED], kind="product"),
    "a-blue": EmbedItem(text="Title: a", images=[BLUE], kind="product"),  # same ids as "a", other pixels
    "two": EmbedItem(text="Title: two views", images=[WIDE_BLUE, RED], kind="product"),
    "text": EmbedItem(text="Title: no photo", kind="product"),
}
# Rows as a GRPO batch could hold them, interleaved; completions of every length, one empty.
ROWS = ["a", "a-blue", "a", "two", "text", "a", "two", "a-blue"]
COMPLETIONS = [[101, 102, 103], [104], [105, 106, 107, 108, 109, 110, 111], [], [112, 113], [114, 115, 116, 117],
               [118], [119, 120, 121, 122, 123]]


@contextlib.contextmanager
def rows_per_forward(embedder: MoonEmbedder) -> Iterator[list[int]]:
    """The batch size of every backbone forward inside the block, no-grad and in eval mode."""
    rows: list[int] = []
    handle = backbone_of(embedder.model).register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        with torch.no_grad(), eval_mode(embedder.model):
            yield rows
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def embedder() -> MoonEmbedder:
    embedder = MoonEmbedder.from_recipe(tiny_recipe(lora=None))
    randomise_heads(embedder)  # fusion and FIRE must contribute, or a wrong feature would go unseen
    return embedder


def test_distinct_prompts_compare_ids_and_pixels(embedder):
    prompts = tokenize_prompts(embedder.processor, [PRODUCTS[name] for name in ROWS])
    assert prompts.prompt_ids[0] == prompts.prompt_ids[1]  # "a" and "a-blue" differ only in their pixels
    firsts, owner = distinct_prompts(prompts, embedder.image_token_id, merge_size=2)
    assert firsts == [0, 1, 3, 4]
    assert owner == [0, 1, 0, 2, 3, 0, 2, 1]


def test_shared_prompt_forward_gives_the_whole_sequence_embeddings_and_runs_each_prompt_once(embedder):
    prompts = tokenize_prompts(embedder.processor, [PRODUCTS[name] for name in ROWS])
    batch = assemble(prompts, COMPLETIONS, embedder.readout_id, embedder.pad_id, embedder.image_token_id,
                     append_readout=False)
    with rows_per_forward(embedder) as rows:
        whole = embedder(batch)
        rows.clear()
        shared = embed_completions(embedder, prompts, COMPLETIONS)
    assert rows == [4, 8]  # the 4 distinct prompts, then the 8 completions on their caches
    torch.testing.assert_close(shared, whole, atol=2e-5, rtol=1e-4)
    # Each row is its own: the same prompt with another completion embeds differently.
    assert (shared[0] - shared[2]).abs().max() > 1e-3


def test_without_repeated_prompts_it_is_the_plain_forward(embedder):
    names = ["a", "a-blue", "two", "text"]
    prompts = tokenize_prompts(embedder.processor, [PRODUCTS[name] for name in names])
    completions = COMPLETIONS[:4]
    with rows_per_forward(embedder) as rows:
        shared = embed_completions(embedder, prompts, completions)
    assert rows == [4]
    whole = embedder(assemble(prompts, completions, embedder.readout_id, embedder.pad_id, embedder.image_token_id,
                              append_readout=False))
    torch.testing.assert_close(shared, whole.detach(), atol=1e-6, rtol=1e-5)


def test_micro_batched_forward_gives_the_same_embeddings_in_chunks_of_max_rows(embedder):
    """`max_rows` splits a generation batch into forwards of at most that many rows (each with its own rows' images),
    as TRL splits its own; the embeddings must not change, whatever the chunk boundaries cut."""
    from moon_rl.modeling.shared_prompts import select_rows

    prompts = tokenize_prompts(embedder.processor, [PRODUCTS[name] for name in ROWS])
    with rows_per_forward(embedder) as rows:
        whole = embed_completions(embedder, prompts, COMPLETIONS)
        for max_rows in (3, 4):
            rows.clear()
            chunked = embed_completions(embedder, prompts, COMPLETIONS, max_rows=max_rows)
            torch.testing.assert_close(chunked, whole, atol=2e-5, rtol=1e-4)
            assert max(rows) <= max_rows  # prompt and completion forwards alike
    # Rows picked (repeats allowed) keep their own images: "two" has two, "text" none.
    picked = select_rows(prompts, [3, 4, 0, 3], embedder.image_token_id, merge_size=2)
    again = tokenize_prompts(embedder.processor, [PRODUCTS[name] for name in ("two", "text", "a", "two")])
    assert picked.prompt_ids == again.prompt_ids
    torch.testing.assert_close(picked.pixel_values, again.pixel_values)
    torch.testing.assert_close(picked.image_grid_thw, again.image_grid_thw)


def test_taps_see_every_image_occurrence_when_images_are_shared(embedder):
    """The hook contract (modeling/taps.py): shared_image_features' copy-back hook runs before the taps read the
    vision tower's output, so the taps (and FIRE) get one feature row per image occurrence, as without sharing."""
    from moon_rl.modeling.shared_images import shared_image_features

    items = [PRODUCTS[name] for name in ("a", "a", "two", "a-blue", "a")]  # RED appears 4 times in 5 rows
    batch = embedder.prepare(items)
    with torch.no_grad(), eval_mode(embedder.model):
        with embedder.taps.capture() as plain:
            plain_vectors = embedder(batch)
        with embedder.taps.capture() as shared, shared_image_features(embedder.model):
            shared_vectors = embedder(batch)
    (plain_record,), (shared_record,) = plain, shared
    n_tokens = int((batch["input_ids"] == embedder.image_token_id).sum())
    assert plain_record.visual.shape[0] == shared_record.visual.shape[0] == n_tokens
    torch.testing.assert_close(shared_record.visual, plain_record.visual)
    torch.testing.assert_close(shared_vectors, plain_vectors)
    assert shared_record.fire_applied == plain_record.fire_applied and plain_record.fire_applied
