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

from safetensors.torch import load_file, save_file
from torch import nn

from moon_rl.cache import atomic_write_text
from moon_rl.errors import MoonError
from moon_rl.modeling.folder import is_model_folder

HEADS_FILE = "moon_heads.safetensors"
MARKER_FILE = "moon_rl_checkpoint.json"
FINAL_DIR = "final"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def save_heads(heads: nn.Module, folder: str | Path) -> None:
    """Heads' weights into `folder` (safetensors, via a temporary file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{HEADS_FILE}.tmp"
    save_file({k: v.detach().float().cpu().contiguous() for k, v in heads.state_dict().items()}, str(tmp))
    tmp.replace(folder / HEADS_FILE)


def load_heads(heads: nn.Module, folder: str | Path) -> None:
    """Restore heads saved by `save_heads` (safetensors only)."""
    path = Path(folder) / HEADS_FILE
    if not path.is_file():
        raise MoonError(f"{folder}: checkpoint has no {HEADS_FILE}")
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
    final = output_dir / FINAL_DIR
    if overwrite and resume:
        raise MoonError("--overwrite and --resume contradict each other: choose one")
    if is_model_folder(final) and not overwrite:
        raise MoonError(f"{output_dir} already holds a finished run ({final}); pass --overwrite to train again "
                        "into it, or choose another output_dir")
    if overwrite and output_dir.exists():
        shutil.rmtree(output_dir)
    if resume and latest_checkpoint(output_dir) is None:
        raise MoonError(f"--resume: no complete checkpoint under {output_dir} (looked for checkpoint-N/{MARKER_FILE})")
