"""Checkpoint bookkeeping shared by the trainers: heads in every checkpoint, completion markers, resume, finished runs.

transformers' `Trainer` writes `checkpoint-N/` file by file. moon-rl adds the heads to it and then writes a marker file
last (atomically); a checkpoint without the marker was interrupted and is never resumed from. So a crash at any moment
leaves the previous complete checkpoint usable.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from moon_rl.cache import atomic_write_bytes, atomic_write_text
from moon_rl.errors import MoonError
from moon_rl.modeling.folder import HEADS_WEIGHTS, finished_model

_LEGACY_HEADS_FILE = "moon_heads.safetensors"  # checkpoints written before the names were unified
MARKER_FILE = "moon_rl_checkpoint.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def save_heads(heads: nn.Module, folder: str | Path) -> None:
    """Heads' weights into `folder` (safetensors, written atomically)."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in heads.state_dict().items()}
    atomic_write_bytes(Path(folder) / HEADS_WEIGHTS, safetensors_bytes(state))


def load_heads(heads: nn.Module, folder: str | Path) -> None:
    """Restore heads saved by `save_heads` (safetensors only)."""
    path = Path(folder) / HEADS_WEIGHTS
    if not path.is_file() and (Path(folder) / _LEGACY_HEADS_FILE).is_file():
        path = Path(folder) / _LEGACY_HEADS_FILE
    if not path.is_file():
        raise MoonError(f"{folder}: checkpoint has no {HEADS_WEIGHTS}")
    heads.load_state_dict(load_file(str(path)))


def mark_complete(folder: str | Path, step: int) -> None:
    atomic_write_text(Path(folder) / MARKER_FILE, json.dumps({"step": step}))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` under `output_dir` that holds the completion marker, or None."""
    found = []
    for child in Path(output_dir).glob("checkpoint-*"):
        match = _CHECKPOINT_RE.match(child.name)
        if match and (child / MARKER_FILE).is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def check_output_dir(output_dir: str | Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to train into a folder that holds a finished run, unless `overwrite` (resume continues unfinished ones).

    With `overwrite` (and no `resume`) the stage folder is cleared first, so no stale checkpoint of the old run can be
    resumed from later.
    """
    output_dir = Path(output_dir)
    final = finished_model(output_dir)
    if overwrite and resume:
        raise MoonError("--overwrite and --resume contradict each other: choose one")
    if final is not None and not overwrite:
        raise MoonError(f"{output_dir} already holds a finished run ({final}); pass --overwrite to train again "
                        "into it, or choose another output_dir")
    if overwrite and output_dir.exists():
        shutil.rmtree(output_dir)
    if resume and latest_checkpoint(output_dir) is None:
        raise MoonError(f"--resume: no complete checkpoint under {output_dir} (looked for checkpoint-N/{MARKER_FILE})")
