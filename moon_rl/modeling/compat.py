"""Image-only Qwen-VL processors, registered with `AutoProcessor`.

transformers' Qwen2-VL-family video processors are torchvision-only, and PyPI's torchvision cannot be imported next
to the CPU torch wheel this project uses. `ProcessorMixin` derives its sub-processors from the `__init__` signature, so
a subclass whose `__init__` has no `video_processor` argument drops it. Without registration,
`AutoProcessor.from_pretrained(folder)` silently returns only the tokenizer for such folders, and TRL would then treat
the model as text-only (research/platform.md, gotcha 2). Importing this module registers the subclasses.
"""

from __future__ import annotations

import importlib.util

from transformers import (
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):  # noqa: N801 - mirrors the transformers class name
    """`Qwen2_5_VLProcessor` without the (torchvision-only) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without the (torchvision-only) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the (torchvision-only) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


#: model_type -> image-only processor class, used when the stock processor cannot be built.
IMAGE_ONLY_PROCESSORS: dict[str, type] = {
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
}


def torchvision_available() -> bool:
    """True when torchvision is importable (it may be installed yet broken next to the CPU torch)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a broken install raises RuntimeError from its C++ ops; any failure means "unusable"
        return False
    return True


AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(Qwen3VLConfig, Qwen3VLImageOnlyProcessor, exist_ok=True)
