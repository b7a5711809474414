"""Shards of `moon-rl embed`: the catalogue in fixed pieces, each written as soon as it is embedded, so that several
processes share the work and a rerun after a crash continues where the last one stopped.

The catalogue's products, in embedding order (length-sorted, as `MoonEmbedder.encode` batches them), are cut into
shards of `shard_size` products (a multiple of the batch size, so a shard's batches are exactly the batches one
process would run). Shard `s` belongs to process `s % world_size`. The shards live beside the output folder, in
`<out>.shards/`:

    plan.json            what the shards were made with (model, catalogue, mode, sizes); a rerun must match it
    shard-00003.npy      float32 (rows, dim) vectors of shard 3       (numpy format, read without pickle)
    shard-00003.json     its product ids and skipped rows; written last, so it marks the shard finished

The cut depends on the catalogue and the sizes only, never on the number of processes: one process and eight give
the same batches, hence the same vectors. When every shard is finished the main process merges them, in shard order,
into the output folder, and deletes `<out>.shards/`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moon_rl.cache import atomic_open, atomic_write_text
from moon_rl.errors import MoonError

__all__ = ["ShardPlan", "finished_shards", "read_shard", "shard_folder", "shard_rows", "start_shards", "write_shard"]

PLAN_FILE = "plan.json"
_SHARD_MARKER = re.compile(r"shard-(\d{5})\.json$")


def shard_folder(out: Path) -> Path:
    """Where the shards of output folder `out` are kept until they are merged."""
    out = Path(out)
    return out.with_name(out.name + ".shards")


@dataclass(frozen=True)
class ShardPlan:
    """The catalogue cut into shards.

    Args:
        ids (`Sequence[str]`): every product id, in embedding order.
        shard_size (`int`): products per shard (the last one may be shorter).
    """

    ids: Sequence[str]
    shard_size: int

    @classmethod
    def make(cls, ids: Sequence[str], shard_size: int, batch_size: int) -> ShardPlan:
        """A plan whose shard size is `shard_size` rounded up to a multiple of `batch_size`: a shard's batches are
        then the batches a single unsharded pass over `ids` would run."""
        return cls(list(ids), math.ceil(shard_size / batch_size) * batch_size)

    @property
    def count(self) -> int:
        return math.ceil(len(self.ids) / self.shard_size)

    def shard(self, index: int) -> Sequence[str]:
        return self.ids[index * self.shard_size:(index + 1) * self.shard_size]

    def owned_by(self, rank: int, world_size: int) -> list[int]:
        """The shards process `rank` of `world_size` embeds (round robin, so the processes finish close together)."""
        return list(range(rank, self.count, world_size))


def start_shards(folder: Path, settings: dict[str, Any]) -> set[int]:
    """Open (or create) the shard folder for a run with these settings; the shards already finished.

    Called by the main process before the others look at the folder.

    Raises:
        `MoonError`: the folder holds shards made with other settings (another model, catalogue, mode or size):
            mixing them would silently merge vectors of two different embeddings.
    """
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / PLAN_FILE
    if plan_file.is_file():
        found = json.loads(plan_file.read_text(encoding="utf-8"))
        changed = sorted(key for key in {*found, *settings} if found.get(key) != settings.get(key))
        if changed:
            details = "; ".join(f"{key}: {found.get(key)!r} then, {settings.get(key)!r} now" for key in changed)
            raise MoonError(f"{folder} holds the shards of an unfinished embedding made with other settings ({details}); "
                            "rerun with the same ones to finish it, or delete the folder to start over")
    else:
        atomic_write_text(plan_file, json.dumps(settings, indent=2))
    return finished_shards(folder)


def finished_shards(folder: Path) -> set[int]:
    """Indices of the shards whose files are complete (the JSON marker is written after the vectors)."""
    if not folder.is_dir():
        return set()
    return {int(match.group(1)) for path in folder.iterdir() if (match := _SHARD_MARKER.match(path.name))}


def _paths(folder: Path, index: int) -> tuple[Path, Path]:
    return folder / f"shard-{index:05d}.npy", folder / f"shard-{index:05d}.json"


def write_shard(folder: Path, index: int, ids: Sequence[str], vectors: np.ndarray,
                skipped: Sequence[tuple[str, str]], seconds: float) -> None:
    """Write shard `index` atomically: the vectors, then the marker with its ids (a crash in between leaves no
    marker, and the shard is embedded again)."""
    vectors_path, marker = _paths(folder, index)
    with atomic_open(vectors_path) as fh:
        np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
    atomic_write_text(marker, json.dumps({"ids": list(ids), "skipped": [list(s) for s in skipped],
                                          "seconds": round(seconds, 3)}))


def read_shard(folder: Path, index: int) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Ids, vectors and skipped rows of a finished shard."""
    vectors_path, marker = _paths(folder, index)
    info = json.loads(marker.read_text(encoding="utf-8"))
    vectors = np.load(vectors_path, allow_pickle=False)
    if vectors.shape[0] != len(info["ids"]):
        raise MoonError(f"{vectors_path}: {vectors.shape[0]} vectors for {len(info['ids'])} ids in {marker.name}; "
                        "delete both files to embed the shard again")
    return info["ids"], vectors, [tuple(s) for s in info["skipped"]]


def shard_rows(folder: Path, index: int) -> int:
    """Products a finished shard accounts for (embedded or skipped), from its marker."""
    info = json.loads(_paths(folder, index)[1].read_text(encoding="utf-8"))
    return len(info["ids"]) + len(info["skipped"])
