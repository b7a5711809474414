"""`builtin:tiny-vl`: a Qwen2.5-VL-architecture model built locally, with no download: random-init, except the `tiny`
size's vision tower, pre-trained at build time to tell textures and colours apart (tiny_vision.py).

Tests and the CPU demo need a real multimodal model (vision tower, image tokens, chat template, generation) but the
machines have no model hub. This module builds one from a config, with a byte-level BPE tokenizer trained on the
synthetic catalogue's own words (so attribute words are single tokens: a generic word list splits them into 1-3
character pieces, research/platform.md) plus the chat special tokens and `<think>`/`</think>`, and a PIL-backed image
processor. The folder is written once into the cache (`MOON_RL_CACHE`) and later loads read it from there.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moon_rl.cache import atomic_dir, build_lock, cache_root
from moon_rl.modeling.tiny_vision import PRETRAIN_STEPS, pretrain_vision

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
TINY_VL = "builtin:tiny-vl"
#: Bump when the builder's output changes, so stale cache folders are not reused.
BUILD_VERSION = 4

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
#: Reasoning markers are ordinary added tokens (not "special"), so decoding with `skip_special_tokens=True` (as TRL
#: does for completions) keeps them and format rewards can see them.
THINK_TOKENS = ["<think>", "</think>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyVLSize:
    """Dimensions of a builtin size (text hidden/layers, vision hidden/depth; head_dim is fixed at 32, mrope) and the
    steps of its vision pre-training (tiny_vision.py; 0 = a random-init tower)."""

    hidden: int
    layers: int
    vision_hidden: int
    vision_depth: int
    vision_pretrain_steps: int = 0


SIZES: dict[str, TinyVLSize] = {
    # ~1M parameters: unit tests and the CPU demo (the best demo model at every budget up to 8 min, platform.md).
    "tiny": TinyVLSize(hidden=128, layers=2, vision_hidden=64, vision_depth=2, vision_pretrain_steps=PRETRAIN_STEPS),
    # ~14M parameters: closer to a real model's shape, for speed and memory benchmarks (its tower stays random: pre-
    # training it would take about 30x the tiny tower's 27 s on one CPU core, and those benchmarks never read pixels).
    "small": TinyVLSize(hidden=512, layers=4, vision_hidden=256, vision_depth=4),
}


def is_builtin(name_or_path: str) -> bool:
    """True for `builtin:...` model names."""
    return str(name_or_path).startswith(BUILTIN_PREFIX)


def builtin_model_dir(name: str = TINY_VL, size: str = "tiny", seed: int = 0) -> Path:
    """Folder of a builtin model, building it into the cache on first use."""
    if name != TINY_VL:
        from moon_rl.errors import RecipeError

        raise RecipeError(f"unknown builtin model {name!r}; available: {TINY_VL!r}")
    if size not in SIZES:
        from moon_rl.errors import RecipeError

        raise RecipeError(f"unknown builtin size {size!r} for {name}; available: {sorted(SIZES)}")
    folder = cache_root() / "builtin" / f"tiny-vl-{size}-seed{seed}-v{BUILD_VERSION}"
    if not (folder / "config.json").exists():
        # Under torchrun, transformers' save_pretrained writes the weights on global rank 0 only: rank 0 builds, the
        # other ranks wait for it and then find the folder built.
        with _main_process_first(), build_lock(folder):
            if not (folder / "config.json").exists():
                with atomic_dir(folder, replace=False) as tmp:
                    build_tiny_vl(tmp, size=size, seed=seed)
    return folder


@contextlib.contextmanager
def _main_process_first() -> Iterator[None]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def _tokenizer_corpus(seed: int) -> list[str]:
    from moon_rl.data.prompts import instruction_texts
    from moon_rl.data.synthetic import vocabulary_corpus

    chat_words = ["system", "user", "assistant", "You are a helpful assistant."]
    texts = vocabulary_corpus(seed=seed)
    # Repeat fixed strings so their words win merges, and shuffle deterministically.
    texts = texts + (instruction_texts() + chat_words) * 50
    random.Random(seed).shuffle(texts)
    return texts


def build_tokenizer(seed: int = 0, vocab_size: int = 2048):
    """Byte-level BPE tokenizer trained on the catalogue vocabulary, with Qwen-style chat tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        model_max_length=4096, padding_side="left", chat_template=CHAT_TEMPLATE,
    )


def build_tiny_vl(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build and save the builtin model, tokenizer and processor into `out` (deterministic in `seed`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from moon_rl.modeling.compat import Qwen2_5_VLImageOnlyProcessor

    dims = SIZES[size]
    tokenizer = build_tokenizer(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},  # min/max pixels: 112 px -> 16 image tokens
        patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    h = dims.hidden
    text_cfg = dict(
        vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=dims.layers,
        num_attention_heads=h // 32, num_key_value_heads=2, max_position_embeddings=4096,
        # mrope sections must sum to head_dim / 2 = 16
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vh = dims.vision_hidden
    vision_cfg = dict(
        depth=dims.vision_depth, hidden_size=vh, intermediate_size=2 * vh, num_heads=vh // 32, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=h,
        fullatt_block_indexes=[dims.vision_depth - 1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text_cfg, vision_config=vision_cfg,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    # One thread: float sums split across threads round differently, and 250 steps of pre-training turn that into a
    # different tower (two builds, on 1 and 2 threads, differed in what SFT learnt from them: bench/RESULTS.md).
    # Other CPUs' kernels may still round differently; the pre-training is what keeps any build reading texture/colour.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(config)
            # A real VLM's vision encoder comes pretrained; a random tower never learns texture through the LM.
            if dims.vision_pretrain_steps:
                accuracy = pretrain_vision(model, image_processor, steps=dims.vision_pretrain_steps, seed=seed)
                logger.debug("builtin:tiny-vl (%s): vision tower pre-trained, held-out swatch accuracy %s", size,
                             accuracy)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    processor = Qwen2_5_VLImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
