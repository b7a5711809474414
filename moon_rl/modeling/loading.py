"""Load a backbone VLM and its processor from a recipe's `model` section: builtin or HF folder, LoRA, QLoRA.

Nothing here downloads: a name that is not a local folder is passed to transformers, which honours
`HF_HUB_OFFLINE`. `trust_remote_code` stays off unless the recipe asks for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moon_rl.errors import MoonError
from moon_rl.modeling import compat
from moon_rl.modeling.tiny import builtin_model_dir, is_builtin

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, ProcessorMixin

    from moon_rl.modeling.spec import ModelSpec


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(model_spec: ModelSpec) -> str:
    """Local folder (or hub id) of the backbone named by `model.name_or_path`; builds builtin models on first use."""
    name = str(model_spec.name_or_path)
    if is_builtin(name):
        return str(builtin_model_dir(name, size=model_spec.builtin_size))
    return name


def load_processor(
    path: str | Path, *, trust_remote_code: bool = False, min_pixels: int | None = None,
    max_pixels: int | None = None, model_type: str | None = None,
) -> ProcessorMixin:
    """A real multimodal processor for `path`, image-only when torchvision is unusable.

    `AutoProcessor` returns only the tokenizer when a processor cannot be built (research/platform.md), so the result
    is checked: a processor without an image processor is an error, not a silent text-only fallback.
    """
    from transformers import AutoConfig, AutoProcessor

    if model_type is None:
        model_type = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
    image_only = compat.IMAGE_ONLY_PROCESSORS.get(model_type)
    if image_only is not None and not compat.torchvision_available():
        # Stock Qwen-VL processors insist on a torchvision video processor; ours drops it.
        processor = image_only.from_pretrained(path)
    else:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(processor, "image_processor", None) is None and image_only is not None:
            # A folder saved with the image-only processor (the builtin model, or any model saved on a CPU machine)
            # has no video processor config: with torchvision present AutoProcessor then returns the bare tokenizer.
            processor = image_only.from_pretrained(path)
    if getattr(processor, "image_processor", None) is None:
        raise MoonError(
            f"{path}: the processor has no image processor (got {type(processor).__name__}); "
            "moon-rl needs a vision-language model folder with a processor_config.json"
        )
    size = dict(getattr(processor.image_processor, "size", None) or {})
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    if size:
        processor.image_processor.size = size
    processor.tokenizer.padding_side = "left"
    return processor


def quantization_config(model_spec: ModelSpec):
    """`BitsAndBytesConfig` for `model.quantization`, or None. Fails clearly when bitsandbytes is missing."""
    quant = model_spec.quantization
    if quant is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise MoonError(
            "model.quantization is set but bitsandbytes is not installed; install the extra: pip install 'moon-rl[quant]'"
        ) from exc
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _DTYPES.get(str(quant.compute_dtype), torch.float32) if quant.compute_dtype else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=quant.double_quant,
    )


def load_model(path: str | Path, model_spec: ModelSpec) -> PreTrainedModel:
    """The HF image-text-to-text model at `path`, in the recipe's dtype / attention / quantization."""
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": _DTYPES[model_spec.dtype], "trust_remote_code": model_spec.trust_remote_code}
    if model_spec.attn_implementation:
        kwargs["attn_implementation"] = model_spec.attn_implementation
    qconfig = quantization_config(model_spec)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        # 4-bit weights are placed at load time: each process takes its own GPU (LOCAL_RANK under torchrun /
        # accelerate), or every process of a multi-GPU run would pile onto GPU 0.
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"}
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise MoonError(f"model.name_or_path: cannot load a model from {path!r}: {exc}") from exc
    return model


def apply_lora(model: PreTrainedModel, model_spec: ModelSpec, *, gradient_checkpointing: bool = False) -> PeftModel:
    """Wrap `model` with a LoRA adapter on the language model only (regex target, never vision tower or lm_head)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = model_spec.lora
    if model_spec.quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    touched = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    if not touched:
        raise MoonError(f"model.lora.target_modules {lora.target_modules!r} matched no module of the model")
    return peft_model


def load_backbone(model_spec: ModelSpec, *, path: str | Path | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Model (with LoRA when `model.lora` is set) and processor for a recipe's `model` section.

    `path` overrides `model.name_or_path` (e.g. a trained output folder holding a full model).
    """
    path = str(path) if path is not None else resolve_model_path(model_spec)
    processor = load_processor(
        path, trust_remote_code=model_spec.trust_remote_code,
        min_pixels=model_spec.image_min_pixels, max_pixels=model_spec.image_max_pixels,
    )
    model = load_model(path, model_spec)
    if model_spec.lora is not None:
        model = apply_lora(model, model_spec)
    return model, processor


def write_merged_model(peft_model: PeftModel, processor: Any, folder: str | Path) -> Path:
    """A full-weight HF folder (weights, config, tokenizer, processor) of `peft_model` with its LoRA merged in.

    For engines that load full weights by path (vLLM). The merge runs on a copy (peft's `merge_and_unload`), so the
    adapter model keeps training or embedding unchanged; the copy costs one more set of weights until it is written.
    A quantised base cannot be merged without loss: that is an error, not a silent re-quantisation.
    """
    import copy

    base = peft_model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        raise MoonError("a LoRA model on a quantised base (QLoRA) cannot be merged for vLLM without loss; use "
                        "generation_backend 'hf', or export the model (moon-rl export sentence-transformers merges the "
                        "adapter into the unquantised base) and load that")
    folder = Path(folder)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(folder)
    del merged
    processor.save_pretrained(folder)
    return folder
