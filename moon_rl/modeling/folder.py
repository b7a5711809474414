"""What makes a folder a saved moon-rl model: its manifest, written last by `MoonEmbedder.save` (no torch import here,
so that run planning and the CLI can ask cheaply)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODEL_MANIFEST", "is_model_folder"]

#: The manifest every saved model folder holds; its presence marks a finished model folder.
MODEL_MANIFEST = "moon_rl.json"


def is_model_folder(path: str | Path) -> bool:
    """True when `path` holds a model `MoonEmbedder.save` finished writing."""
    return (Path(path) / MODEL_MANIFEST).is_file()
