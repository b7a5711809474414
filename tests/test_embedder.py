"""MoonEmbedder: identity at init, gradients reach every trainable part, FIRE under checkpointing, artifacts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.modeling.inputs import EmbedItem
from moon_rl.recipe import Recipe


def tiny_recipe(**model_updates) -> Recipe:
    recipe = Recipe()
    heads = recipe.model.heads.model_copy(update={"embed_dim": 64})
    model = recipe.model.model_copy(update={"heads": heads, **model_updates})
    return recipe.model_copy(update={"model": model})


def heads_switched(recipe: Recipe, fusion: bool, fire: bool) -> Recipe:
    heads = recipe.model.heads
    heads = heads.model_copy(update={"fusion": heads.fusion.model_copy(update={"enabled": fusion}),
                                     "fire": heads.fire.model_copy(update={"enabled": fire})})
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"heads": heads})})


def image(rgb, size=(112, 112)) -> Image.Image:
    return Image.new("RGB", size, rgb)


RECORDS = [
    "red striped cotton shirt",
    image((200, 30, 30)),
    {"text": "blue dotted dress", "image": image((30, 30, 200), (96, 128))},
    EmbedItem(text="Title: two views", images=[image((10, 200, 10)), image((200, 200, 10))], kind="product"),
]


def randomise_heads(embedder: MoonEmbedder, scale: float = 0.05) -> None:
    """Fresh heads are the identity; give their zero-init output layers weights so tests exercise them."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in embedder.heads.named_parameters():
            if name.startswith(("fusion.out", "fire.up")):
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def full_embedder() -> MoonEmbedder:
    return MoonEmbedder.from_recipe(tiny_recipe(lora=None))


def test_fresh_heads_are_identity():
    base = tiny_recipe(lora=None)
    on = MoonEmbedder.from_recipe(heads_switched(base, True, True))
    off = MoonEmbedder.from_recipe(heads_switched(base, False, False), model=on.model, processor=on.processor)
    assert on.heads.fusion is not None and on.heads.fire is not None
    assert off.heads.fusion is None and off.heads.fire is None
    diff = np.abs(on.encode(RECORDS) - off.encode(RECORDS)).max()
    assert diff < 1e-6
    off.taps.remove()


def test_text_image_and_multi_image_inputs(full_embedder):
    vectors = full_embedder.encode(RECORDS, batch_size=2)
    assert vectors.shape == (4, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The image-only and multi-image rows really see their pixels: other pixels, other vectors.
    moved = full_embedder.encode([image((30, 200, 30))])[0]
    assert np.abs(moved - vectors[1]).max() > 1e-4
    # A batch embeds each row as it would alone (sorting by length, padding and batching are invisible).
    alone = np.stack([full_embedder.encode([r])[0] for r in RECORDS])
    np.testing.assert_allclose(vectors, alone, atol=2e-5)


def test_left_and_right_padding_give_the_same_vectors(full_embedder):
    randomise_heads(full_embedder)
    left = full_embedder.encode(RECORDS, padding_side="left")
    right = full_embedder.encode(RECORDS, padding_side="right")
    np.testing.assert_allclose(left, right, atol=1e-5)


def _contrastive_loss(embedder: MoonEmbedder) -> torch.Tensor:
    queries = [EmbedItem(text=t) for t in ("red shirt", "blue dress", "green hat")]
    products = [EmbedItem(text=f"Title: {t}", images=[image(c)], kind="product")
                for t, c in (("shirt", (200, 0, 0)), ("dress", (0, 0, 200)), ("hat", (0, 200, 0)))]
    q = embedder(embedder.prepare(queries))
    # Products in reason mode: the fusion's chain attention reads their reasoning.
    chains = embedder.tokenize_reasoning([f"category {t}." for t in ("shirt", "dress", "hat")])
    p = embedder(embedder.prepare(products, chains))
    logits = q @ p.T / 0.05
    return F.cross_entropy(logits, torch.arange(3))


def test_one_step_reaches_heads_fire_and_lora():
    embedder = MoonEmbedder.from_recipe(tiny_recipe())  # LoRA on (the default for pretrained backbones)
    embedder.train()
    params = {n: p for n, p in embedder.named_parameters() if p.requires_grad}
    groups = {
        "lora": [n for n in params if "lora_" in n],
        # The chain attention sits behind the zero-initialised fusion output: it gets gradient from step 1 (below).
        "fusion": [n for n in params if n.startswith("heads.fusion")],
        "fire": [n for n in params if n.startswith("heads.fire")],
        "proj": [n for n in params if n.startswith("heads.proj")],
    }
    assert all(groups.values()), groups
    assert any("chain_attn" in n for n in groups["fusion"])
    assert not any("visual" in n for n in groups["lora"]), "LoRA must not touch the vision tower"
    assert not any("lm_head" in n for n in groups["lora"])
    before = embedder.encode(RECORDS)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        _contrastive_loss(embedder).backward()
        nonzero = {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
        for group, names in groups.items():
            assert nonzero & set(names), f"step {step}: no gradient reached {group}"
        if step == 1:
            # Zero-initialised output layers (fusion.out, fire.up, lora_B) block upstream gradients only at step 0.
            assert nonzero == set(params), sorted(set(params) - nonzero)
        optimizer.step()
    after = embedder.encode(RECORDS)
    assert np.abs(after - before).max() > 1e-3


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_fire_is_idempotent_under_gradient_checkpointing(use_reentrant):
    embedder = MoonEmbedder.from_recipe(tiny_recipe(lora=None))
    randomise_heads(embedder, scale=0.5)
    embedder.train()
    for module in embedder.modules():  # dropout off: compare two identical computations
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0

    def run():
        embedder.zero_grad()
        loss = _contrastive_loss(embedder)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss_plain, grads_plain = run()
    embedder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    loss_ckpt, grads_ckpt = run()
    assert embedder.model.model.language_model.gradient_checkpointing
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-6, rtol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-5, msg=name)
    fire_grad = sum(g.abs().sum() for n, g in grads_plain.items() if n.startswith("heads.fire"))
    assert fire_grad > 0


def test_save_load_round_trip(tmp_path):
    embedder = MoonEmbedder.from_recipe(tiny_recipe())  # LoRA: the adapter is saved, the base rebuilt
    randomise_heads(embedder)
    with torch.no_grad():
        for name, param in embedder.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    expected = embedder.encode(RECORDS)
    embedder.save(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"adapter", "processor", "heads.safetensors", "heads_config.json", "moon_rl.json", "recipe.yaml"} <= files
    assert not list((tmp_path / "m").rglob("*.bin")) and not list((tmp_path / "m").rglob("*.pt"))
    loaded = MoonEmbedder.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.encode(RECORDS), expected)


def test_a_saved_model_carries_its_model_spec(tmp_path):
    """Loading needs no recipe: `moon_rl.json` keeps the `model` section (here a bf16 backbone) and `load` builds the
    base from it; a folder saved before that came from the recipe saved beside it; with neither, the defaults."""
    import json

    embedder = MoonEmbedder.from_recipe(tiny_recipe(dtype="bfloat16"))
    folder = embedder.save(tmp_path / "m")
    manifest = json.loads((folder / "moon_rl.json").read_text())
    assert manifest["model_spec"]["dtype"] == "bfloat16" and manifest["model_spec"]["heads"]["embed_dim"] == 64
    (folder / "recipe.yaml").unlink()
    loaded = MoonEmbedder.load(folder)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.meta["model_spec"] == manifest["model_spec"]  # and a re-save keeps it
    older = dict(manifest, model_spec=None)  # as written before the spec was kept: the recipe beside it decides
    (folder / "moon_rl.json").write_text(json.dumps(older))
    (folder / "recipe.yaml").write_text(embedder.meta["recipe"])
    assert next(MoonEmbedder.load(folder).model.parameters()).dtype == torch.bfloat16
    (folder / "recipe.yaml").unlink()
    assert next(MoonEmbedder.load(folder).model.parameters()).dtype == torch.float32  # the default spec


def test_reason_mode_generates_then_embeds(full_embedder):
    vectors, traces = full_embedder.encode(RECORDS[:2], mode="reason", return_completions=True)
    assert vectors.shape == (2, 64)
    assert all(isinstance(t, str) and t for t in traces)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_qlora_4bit_embeds_on_cpu():
    from moon_rl.recipe import QuantSpec

    embedder = MoonEmbedder.from_recipe(tiny_recipe(quantization=QuantSpec(bits=4, compute_dtype="float32")))
    assert any("4bit" in type(m).__name__ for m in embedder.model.modules())
    vectors = embedder.encode(RECORDS)
    assert vectors.shape == (4, 64) and np.isfinite(vectors).all()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the message shown without vllm")
def test_vllm_backend_without_vllm_is_a_clear_error(full_embedder):
    from moon_rl.errors import MoonError

    full_embedder.generation_backend = "vllm"
    try:
        with pytest.raises(MoonError, match=r"vllm is not installed.*moon-rl\[vllm\]"):
            full_embedder.encode(RECORDS[:1], mode="reason")
        assert full_embedder.encode(RECORDS[:1], mode="direct").shape == (1, 64)  # direct mode never generates
    finally:
        full_embedder.generation_backend = "hf"


def test_batch_order_key_needs_no_image_and_matches_the_item():
    from moon_rl.data.records import Product
    from moon_rl.modeling.inputs import batch_order_key, to_item

    product = Product(id="p1", title="shirt", description="cotton", images=["a.png", "b.png"])
    assert batch_order_key(product, max_images=1) == (1, len("Title: shirt\nDescription: cotton"))
    loader = lambda ref: image((1, 2, 3))  # noqa: E731 - decoding happens only in to_item
    for record in (*RECORDS, product):
        item = to_item(record, loader, max_images=1)
        assert batch_order_key(record, max_images=1) == batch_order_key(item), record


def test_shared_image_features_encode_each_distinct_image_once(full_embedder):
    from moon_rl.modeling.shared_images import ImageFeatureCache, shared_image_features
    from moon_rl.modeling.taps import backbone_of

    randomise_heads(full_embedder)
    red, blue = image((200, 30, 30)), image((30, 30, 200), (96, 128))
    items = [EmbedItem(text="Title: a", images=[red], kind="product"),
             EmbedItem(text="Title: b", images=[blue, red], kind="product"),
             EmbedItem(text="Title: a", images=[red], kind="product"), EmbedItem(text="no image")]
    batch = full_embedder.prepare(items)
    grid = batch["image_grid_thw"].prod(-1).tolist()  # patches per image occurrence: red, blue, red, red
    encoded: list[int] = []  # patch rows entering the tower's patch embedding, per call
    visual = backbone_of(full_embedder.model).visual
    handle = visual.patch_embed.register_forward_hook(lambda module, args, out: encoded.append(out.shape[0]))
    cache = ImageFeatureCache()
    try:
        with torch.no_grad():
            plain = full_embedder(batch)
            with shared_image_features(full_embedder.model):
                shared = full_embedder(batch)
            with shared_image_features(full_embedder.model, cache):
                first = full_embedder(batch)
                again = full_embedder(full_embedder.prepare(items[2:]))  # red only: served from the cache
        with torch.enable_grad(), shared_image_features(full_embedder.model, cache):
            full_embedder(full_embedder.prepare(items[:1]))  # a gradient wants a graph: encoded again
    finally:
        handle.remove()
    assert encoded == [sum(grid), grid[0] + grid[1], grid[0] + grid[1], grid[0]]
    assert (cache.encoded, cache.reused) == (2, 2 + 1)
    assert "forward" not in vars(visual)  # the block leaves the tower as it found it
    torch.testing.assert_close(shared, plain, atol=1e-6, rtol=1e-5)  # fusion and FIRE saw the same features
    torch.testing.assert_close(first, plain, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(again, plain[2:], atol=1e-5, rtol=1e-4)


def test_full_weight_folder_is_a_complete_hf_model_folder(tmp_path, full_embedder):
    """vLLM loads `model/` by path: the tokenizer and processor (with the recipe's pixel range) must be there."""
    from transformers import AutoTokenizer

    from moon_rl.modeling.loading import load_processor

    full_embedder.save(tmp_path / "m")
    folder = tmp_path / "m" / "model"
    assert {"config.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in folder.iterdir()}
    processor = load_processor(folder)
    assert processor.image_processor.size == full_embedder.processor.image_processor.size
    assert AutoTokenizer.from_pretrained(folder)("red shirt")["input_ids"] == \
        full_embedder.processor.tokenizer("red shirt")["input_ids"]


def test_lora_model_merges_into_a_full_folder_for_vllm(tmp_path, monkeypatch):
    """A LoRA embedder can generate with vLLM: the adapter is merged into a copy written as a full folder whose
    logits equal the adapter model's; the adapter model itself stays unmerged."""
    from moon_rl.modeling import generation
    from moon_rl.modeling.loading import load_model, write_merged_model

    embedder = MoonEmbedder.from_recipe(tiny_recipe()).eval()  # no LoRA dropout in the reference logits
    with torch.no_grad():
        for name, param in embedder.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    batch = embedder.prepare([EmbedItem(text="red striped shirt", images=[image((200, 30, 30))], kind="product")])
    inputs = {k: v for k, v in batch.items() if k not in ("prompt_mask", "readout_index")}
    with torch.no_grad():
        expected = embedder.model(**inputs).logits
    write_merged_model(embedder.model, embedder.processor, tmp_path / "merged")
    merged = load_model(tmp_path / "merged", embedder_spec := tiny_recipe().model).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(embedder.model(**inputs).logits, expected)  # the original is untouched
    assert any("lora_A" in n for n, _ in embedder.model.named_parameters())
    assert embedder_spec.lora is not None and not any("lora" in n for n, _ in merged.named_parameters())

    opened = []

    class FakeVLLM:
        def __init__(self, model_path, **kwargs):
            opened.append(Path(model_path))

        def generate(self, prompt_ids, images, **kwargs):
            return [[] for _ in prompt_ids]

    monkeypatch.setattr(generation, "VLLMGenerator", FakeVLLM)
    embedder.generation_backend = "vllm"
    embedder.encode(["red shirt"], mode="reason")
    assert len(opened) == 1 and (opened[0] / "config.json").is_file() and (opened[0] / "tokenizer_config.json").is_file()
    del embedder
    import gc

    gc.collect()
    assert not opened[0].exists()  # the temporary folder goes with the embedder


def test_merging_a_quantised_base_is_a_clear_error():
    from moon_rl.errors import MoonError
    from moon_rl.modeling.loading import write_merged_model

    quantised = SimpleNamespace(get_base_model=lambda: SimpleNamespace(is_loaded_in_4bit=True))
    with pytest.raises(MoonError, match=r"QLoRA.*cannot be merged.*generation_backend 'hf'"):
        write_merged_model(quantised, None, "unused")
