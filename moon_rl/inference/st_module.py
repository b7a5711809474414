"""sentence-transformers input module of an exported moon-rl embedder (`direct` mode).

`moon_rl.inference.st_export` ships this file as `moon_st.py` in the exported folder, with every `moon_rl` import
rewritten to a relative one (`from .embedder import MoonEmbedder`): the folder then loads with
`SentenceTransformer(folder, trust_remote_code=True)` without moon-rl installed. The modelling code it imports
(`embedder`, `heads`, `taps`, `inputs`, ...) is generated from moon-rl's own source at export time; this class only
adapts sentence-transformers' inputs and files to `MoonEmbedder`.

Inputs: a `str` is a text query, a PIL image an image query, `{"text": ..., "image": ...}` a query with both (as
`MoonEmbedder.encode`). `encode_document` embeds the same inputs as catalogue products (product instruction);
format a product's text as moon-rl does: `"Title: <title>\\nDescription: <description>"`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from sentence_transformers.base.modules import InputModule
from transformers import AutoModelForImageTextToText

# Importing compat registers the image-only Qwen-VL processors with AutoProcessor (torchvision may be unusable).
from moon_rl.modeling.compat import IMAGE_ONLY_PROCESSORS  # noqa: F401
from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.modeling.folder import HEADS_CONFIG, HEADS_WEIGHTS
from moon_rl.modeling.heads import HeadsConfig, MoonHeads
from moon_rl.modeling.inputs import EmbedItem
from moon_rl.modeling.loading import load_processor

MODEL_DIR = "model"
PROCESSOR_DIR = "processor"


class MoonSentenceEmbedder(InputModule):
    """The whole moon-rl embedder (backbone + fusion/FIRE heads + projection) as one sentence-transformers module.

    It writes `sentence_embedding` (L2-normalised, float32) directly, so no Pooling/Normalize modules follow it.

    Args:
        embedder (`MoonEmbedder`): the embedder (its embedding subset when loaded from an exported folder).
        model_type (`str`): the backbone's `model_type` (picks the image-only processor class).
        readout_token (`str`, *optional*, defaults to `"<|im_end|>"`): token whose last hidden state is read out.
        max_images (`int`, *optional*, defaults to `4`): images per product, as in moon-rl.
    """

    config_file_name = "moon_st_config.json"
    config_keys = ["model_type", "readout_token", "max_images"]

    def __init__(self, embedder: MoonEmbedder, model_type: str, readout_token: str = "<|im_end|>", max_images: int = 4):
        super().__init__()
        self.embedder = embedder
        self.model_type = model_type
        self.readout_token = readout_token
        self.max_images = max_images

    @property
    def modalities(self) -> list[Any]:
        # "message" is listed because sentence-transformers labels a batch that mixes text and images "message";
        # chat-message inputs themselves are rejected in `preprocess`.
        return ["text", "image", ("image", "text"), "message"]

    @property
    def processor(self) -> Any:
        return self.embedder.processor

    @property
    def tokenizer(self) -> Any:
        return self.embedder.processor.tokenizer

    def get_embedding_dimension(self) -> int:
        """Size of the vectors `encode` returns."""
        return self.embedder.heads.config.embed_dim

    # ------------------------------------------------------------------ encode
    def to_item(self, value: Any, kind: str = "query") -> EmbedItem:
        """A moon-rl `EmbedItem` for one sentence-transformers input (str, PIL image or `{text, image}` dict)."""
        if isinstance(value, str):
            return EmbedItem(text=value, kind=kind)
        if isinstance(value, Image.Image):
            return EmbedItem(images=[value.convert("RGB")], kind=kind)
        if isinstance(value, dict) and not ({"role", "content"} & set(value)):
            unknown = set(value) - {"text", "image"}
            image = value.get("image")
            if unknown or not (value.get("text") or image is not None):
                raise ValueError(f"a moon-rl input dict needs 'text' and/or 'image' and nothing else, got {sorted(value)}")
            if image is not None and not isinstance(image, Image.Image):
                raise ValueError(f"a moon-rl input dict's 'image' must be a PIL image, got {type(image).__name__}")
            return EmbedItem(text=value.get("text"), images=[] if image is None else [image.convert("RGB")], kind=kind)
        raise ValueError(
            f"moon-rl models embed a str (text), a PIL image or a {{'text', 'image'}} dict, got {type(value).__name__}"
        )

    def preprocess(
        self, inputs: Sequence[Any], prompt: str | None = None, task: str | None = None, **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Chat-templated, tokenised batch (with the read-out token appended), exactly as `MoonEmbedder.prepare`.

        `task="document"` (`encode_document`) embeds the inputs as catalogue products, anything else as queries.
        """
        if prompt:
            # The instructions are part of the trained model (data/prompts.py); a free prompt would change them.
            raise ValueError("moon-rl models build their own instruction prompts; do not pass `prompt`/`prompt_name`")
        kind = "product" if task == "document" else "query"
        items = [self.to_item(value, kind) for value in inputs]
        return self.embedder.prepare(items)

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Adds `sentence_embedding` (B, embed_dim), one backbone forward through the moon-rl heads."""
        features["sentence_embedding"] = self.embedder(features)
        return features

    # ------------------------------------------------------------------ files
    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Backbone (full weights), processor, heads and this module's config, in the layout `load` reads."""
        out = Path(output_path)
        self.embedder.model.save_pretrained(out / MODEL_DIR, safe_serialization=safe_serialization)
        self.embedder.processor.save_pretrained(out / PROCESSOR_DIR)
        heads = self.embedder.heads
        save_file({k: v.detach().float().cpu().contiguous() for k, v in heads.state_dict().items()},
                  str(out / HEADS_WEIGHTS))
        (out / HEADS_CONFIG).write_text(json.dumps(heads.config.to_dict(), indent=2))
        self.save_config(output_path)

    @classmethod
    def load(
        cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
        cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None, **kwargs: Any,
    ) -> MoonSentenceEmbedder:
        """Rebuild the embedder from a folder (local or hub) written by `save` or by moon-rl's exporter.

        `model_kwargs` go to `AutoModelForImageTextToText.from_pretrained` (default `dtype="auto"`: the saved dtype).
        """
        hub = {"subfolder": subfolder, "token": token, "cache_folder": cache_folder, "revision": revision,
               "local_files_only": local_files_only}
        folder = Path(cls.load_dir_path(model_name_or_path, **hub))
        config = cls.load_config(model_name_or_path, **hub)
        processor = load_processor(folder / PROCESSOR_DIR, model_type=config["model_type"])
        model = AutoModelForImageTextToText.from_pretrained(folder / MODEL_DIR, **{"dtype": "auto", **(model_kwargs or {})})
        heads = MoonHeads(HeadsConfig(**json.loads((folder / HEADS_CONFIG).read_text())))
        heads.load_state_dict(load_file(str(folder / HEADS_WEIGHTS)))
        embedder = MoonEmbedder(model, processor, heads, readout_token=config.get("readout_token", "<|im_end|>"),
                                max_images=config.get("max_images", 4))
        return cls(embedder.eval(), **config)
