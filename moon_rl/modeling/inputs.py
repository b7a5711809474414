"""What gets embedded (`EmbedItem`) and how a batch of items becomes model inputs.

Products and queries become chat prompts (data/prompts.py); a completion (empty in `direct` mode, a
`<think>...</think>` trace in `reason` mode) and the read-out token are appended as token ids, so that the
sequence the embedder reads is exactly the one a trainer's policy forward sees (prompt ids + completion ids).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from moon_rl.data.prompts import PRODUCT_INSTRUCTION, QUERY_INSTRUCTION
from moon_rl.data.records import Product, Query
from moon_rl.errors import DataError


@dataclass
class EmbedItem:
    """One thing to embed: text and/or images, as a catalogue product or as a search query."""

    text: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    kind: Literal["product", "query"] = "query"
    id: str | None = None

    def user_text(self) -> str:
        if self.kind == "product":
            return f"{self.text or ''}\n{PRODUCT_INSTRUCTION}".strip()
        return f"Query: {self.text}\n{QUERY_INSTRUCTION}" if self.text else QUERY_INSTRUCTION

    def messages(self) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in self.images]
        content.append({"type": "text", "text": self.user_text()})
        return [{"role": "user", "content": content}]


def product_text(product: Product) -> str:
    """The text a product shows the model: its title and description."""
    parts = [f"Title: {product.title}"]
    if product.description:
        parts.append(f"Description: {product.description}")
    return "\n".join(parts)


ImageLoader = Callable[[str | bytes], Image.Image]


def batch_order_key(record: Any, max_images: int = 4) -> tuple[int, int]:
    """Batching order: (images shown, text length) of the item `record` becomes, computed without decoding images.

    Sorting by it keeps batches' padding small; every caller that batches records uses it, so their batches agree.
    """
    if isinstance(record, EmbedItem):
        return len(record.images), len(record.text or "")
    if isinstance(record, Product):
        return min(len(record.images), max_images), len(product_text(record))
    if isinstance(record, str):
        return 0, len(record)
    if isinstance(record, Image.Image):
        return 1, 0
    if isinstance(record, Query | dict):
        get = record.get if isinstance(record, dict) else lambda key: getattr(record, key)
        return int(get("image") is not None), len(get("text") or "")
    return 0, 0  # `to_item` reports the unsupported type


def to_item(record: Any, load_image: ImageLoader | None = None, max_images: int = 4) -> EmbedItem:
    """Coerce a Product, Query, dict `{text, image}`, str (text query), PIL image or EmbedItem to an EmbedItem."""
    if isinstance(record, EmbedItem):
        return record
    if isinstance(record, str):
        return EmbedItem(text=record)
    if isinstance(record, Image.Image):
        return EmbedItem(images=[record.convert("RGB")])
    if isinstance(record, dict):
        unknown = set(record) - {"text", "image"}
        if unknown or not (record.get("text") or record.get("image") is not None):
            raise DataError(f"a query dict needs 'text' and/or 'image' and nothing else, got keys {sorted(record)}")
        image = record.get("image")
        images = [_load(image, load_image)] if image is not None else []
        return EmbedItem(text=record.get("text"), images=images)
    if isinstance(record, Query):
        images = [_load(record.image, load_image)] if record.image is not None else []
        return EmbedItem(text=record.text, images=images)
    if isinstance(record, Product):
        images = [_load(ref, load_image) for ref in record.images[:max_images]]
        return EmbedItem(text=product_text(record), images=images, kind="product", id=record.id)
    raise TypeError(f"cannot embed a {type(record).__name__}; expected a Product, Query, dict, str or PIL image")


def _load(ref: str | bytes | Image.Image, load_image: ImageLoader | None) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if load_image is None:
        if isinstance(ref, bytes):
            from moon_rl.data.sources import load_image as load

            return load(ref, Path("."))
        raise DataError(f"image {ref!r}: no catalogue folder to resolve the path against")
    return load_image(ref)


@dataclass
class PromptBatch:
    """Tokenised prompts of a batch (unpadded id lists) and their pixel inputs."""

    prompt_ids: list[list[int]]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


def fitted_size(image_processor: Any, height: int, width: int) -> tuple[int, int] | None:
    """(height, width) that `image_processor` resizes a `height` x `width` image to, or None if it is not a
    Qwen-VL-style processor (patch and merge sizes, a pixel range in `size`)."""
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    size = dict(getattr(image_processor, "size", None) or {})
    min_pixels = size.get("shortest_edge", getattr(image_processor, "min_pixels", None))
    max_pixels = size.get("longest_edge", getattr(image_processor, "max_pixels", None))
    if not (patch and merge and min_pixels and max_pixels):
        return None
    try:
        return smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as err:  # an aspect ratio over 200: say which image, not just the ratio
        raise DataError(f"a {width}x{height} image cannot be shown to the model: {err}") from None


def fit_images(processor: Any, images: Sequence[Image.Image]) -> list[Image.Image]:
    """`images` resized (the processor's resampling) to the size the recipe's processor gives them.

    The recipe sets the processor's pixel range (`model.image_min_pixels` / `image_max_pixels`); vLLM, which loads the
    model by name, resizes with the model's default range instead and would count different image tokens than the prompt
    holds (a 112-px image: 64 tokens at the 3B recipe's range, 16 at the default). An image already at a size the
    processor keeps (sides multiples of patch x merge, area in range) is kept by any processor whose range contains it,
    so every prompt (SFT, GRPO, embedding, evaluation, vLLM) gets its images through here.
    """
    image_processor = getattr(processor, "image_processor", processor)
    out = []
    for image in images:
        target = fitted_size(image_processor, image.height, image.width)
        if target is not None and target != (image.height, image.width):
            resample = getattr(image_processor, "resample", None)
            image = image.resize((target[1], target[0]), Image.Resampling(int(resample) if resample is not None else 3))
        out.append(image)
    return out


def tokenize_prompts(processor: Any, items: Sequence[EmbedItem]) -> PromptBatch:
    """Chat-templated prompts (with generation prompt) for `items`, through the real multimodal processor."""
    texts = [processor.apply_chat_template(item.messages(), add_generation_prompt=True, tokenize=False) for item in items]
    images = fit_images(processor, [image for item in items for image in item.images])
    enc = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    return PromptBatch(prompt_ids=ids, pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"))


class PromptCache:
    """Tokenised single-item prompts (ids + pixels) by key, for items that recur every epoch or step, up to a size.

    The trainers re-embed the same products and queries over and over; decoding and resizing their images each time
    was a sixth of a tiny-model SFT step. Pixel values are float32 patches: about 0.3 MB for a 112-px image, 4.8 MB at
    448 px, so a real catalogue cannot keep them all: past `max_bytes` the least recently used prompts are dropped (and
    tokenised again when they come back).

    Args:
        processor: the model's processor.
        max_bytes (`int`, *optional*): the most bytes of pixel values and ids kept; None keeps everything.
    """

    def __init__(self, processor: Any, max_bytes: int | None = None):
        self.processor = processor
        self.max_bytes = max_bytes
        self.bytes = 0
        self._prompts: OrderedDict[Any, tuple[PromptBatch, int]] = OrderedDict()

    def get(self, key: Any, make_item: Callable[[], EmbedItem]) -> PromptBatch:
        """The prompt stored under `key`, tokenising `make_item()` when it is not (or no longer) kept."""
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key][0]
        prompt = tokenize_prompts(self.processor, [make_item()])
        size = _prompt_bytes(prompt)
        if self.max_bytes is not None and size > self.max_bytes:
            return prompt  # larger than the whole cache: never kept
        self._prompts[key] = (prompt, size)
        self.bytes += size
        while self.max_bytes is not None and self.bytes > self.max_bytes:
            _, (_, dropped) = self._prompts.popitem(last=False)
            self.bytes -= dropped
        return prompt

    def __len__(self) -> int:
        return len(self._prompts)


def _prompt_bytes(prompt: PromptBatch) -> int:
    tensors = [t for t in (prompt.pixel_values, prompt.image_grid_thw) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) + 8 * sum(len(ids) for ids in prompt.prompt_ids)


def concat_prompts(parts: Sequence[PromptBatch]) -> PromptBatch:
    """One batch from several (e.g. cached single-item batches), in order; pixel rows follow their prompts."""
    pixels = [p.pixel_values for p in parts if p.pixel_values is not None]
    grids = [p.image_grid_thw for p in parts if p.image_grid_thw is not None]
    return PromptBatch(
        prompt_ids=[ids for p in parts for ids in p.prompt_ids],
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids) if grids else None,
    )


def assemble(
    prompts: PromptBatch, completions: Sequence[Sequence[int]], readout_id: int, pad_id: int, image_token_id: int,
    padding_side: Literal["left", "right"] = "left", append_readout: bool = True,
) -> dict[str, torch.Tensor]:
    """Model inputs for prompt + completion + read-out token, padded; also `prompt_mask` and `readout_index`.

    A completion that already ends with the read-out token (the model emitted its end of turn) is not given a second.
    With `append_readout=False` the sequences are taken as they are and read out at their last token (GRPO: a
    truncated completion has no end of turn, and the loss forward cannot add one).
    """
    seqs, prompt_lens = [], []
    for prompt, completion in zip(prompts.prompt_ids, completions, strict=True):
        completion = list(completion)
        if append_readout and (not completion or completion[-1] != readout_id):
            completion.append(readout_id)
        seqs.append(prompt + completion)
        prompt_lens.append(len(prompt))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    readout = torch.zeros(len(seqs), dtype=torch.long)
    for row, (seq, plen) in enumerate(zip(seqs, prompt_lens, strict=True)):
        start = width - len(seq) if padding_side == "left" else 0
        input_ids[row, start:start + len(seq)] = torch.tensor(seq)
        attention[row, start:start + len(seq)] = 1
        prompt_mask[row, start:start + plen] = True
        readout[row] = start + len(seq) - 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mm_token_type_ids": (input_ids == image_token_id).long(),
        "prompt_mask": prompt_mask,
        "readout_index": readout,
    }
    if prompts.pixel_values is not None:
        batch["pixel_values"] = prompts.pixel_values
        batch["image_grid_thw"] = prompts.image_grid_thw
    return batch
