"""What makes a folder a saved moon-rl model: its manifest, written last by `MoonEmbedder.save` (no torch import here,
so that run planning and the CLI can ask cheaply)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["FINAL_DIR", "HEADS_CONFIG", "HEADS_WEIGHTS", "MODEL_MANIFEST", "finished_model", "is_model_folder"]

#: The manifest every saved model folder holds; its presence marks a finished model folder.
MODEL_MANIFEST = "moon_rl.json"
#: The heads' weights (safetensors) in a model folder, a training checkpoint and the sentence-transformers export.
HEADS_WEIGHTS = "heads.safetensors"
#: Their shape and switches (`HeadsConfig`), beside the weights.
HEADS_CONFIG = "heads_config.json"
#: Where a training stage (`<output_dir>/sft`, `<output_dir>/grpo`) saves its final model.
FINAL_DIR = "final"


def is_model_folder(path: str | Path) -> bool:
    """True when `path` holds a model `MoonEmbedder.save` finished writing."""
    return (Path(path) / MODEL_MANIFEST).is_file()


def finished_model(stage_dir: str | Path) -> Path | None:
    """The final model of a training stage's folder (`<stage_dir>/final`) if the stage finished, else None.

    The one answer to "is this stage finished?" for `moon-rl run` (skip it), the trainers (refuse to overwrite it)
    and evaluation (which models to compare)."""
    final = Path(stage_dir) / FINAL_DIR
    return final if is_model_folder(final) else None
