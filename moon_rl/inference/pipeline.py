"""`moon-rl embed`: a whole catalogue -> vectors (parquet) + a FAISS inner-product index, written atomically.

Under `torchrun` / `accelerate launch` the processes share the catalogue in shards (`moon_rl.inference.shards`),
each written as soon as it is embedded; the main process merges them. A rerun after a crash continues from the
finished shards. DataLoader workers decode images and tokenise prompts (`MoonEmbedder.preprocess`) while the model
embeds the previous batch.

Output folder (everything `moon_rl.inference.search` needs, no parquet reader required for search)::

    embeddings.parquet   id: string, vector: fixed_size_list<float32>[dim]   (L2-normalised rows)
    index.faiss          faiss.IndexFlatIP over the same rows (inner product = cosine)
    ids.json             row -> product id
    embed.json           manifest: model (dir or recipe), mode, dim, count, skipped ids, version, timing
    recipe.yaml          the resolved recipe, when there is one (search rebuilds an untrained model from it)

Images are decoded a few batches ahead at most, so memory stays flat however large the catalogue is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moon_rl.cache import atomic_dir, atomic_write_text
from moon_rl.data.catalogue import Catalogue, load_recipe_catalogue
from moon_rl.errors import DataError, MoonError
from moon_rl.inference.ann import IndexSpec, build_index, measure_recall, resolve_index
from moon_rl.inference.shards import (
    ShardPlan,
    finished_shards,
    read_shard,
    shard_folder,
    shard_rows,
    start_shards,
    write_shard,
)
from moon_rl.modeling.embedder import MODES, MoonEmbedder
from moon_rl.modeling.inputs import EmbedItem, batch_order_key, to_item
from moon_rl.modeling.matryoshka import check_dim
from moon_rl.recipe import Recipe

logger = logging.getLogger(__name__)

EMBEDDINGS_FILE = "embeddings.parquet"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
MANIFEST_FILE = "embed.json"
RECIPE_FILE = "recipe.yaml"
FORMAT_VERSION = 1
#: How many skipped ids the one-line summary lists (the manifest keeps them all).
SHOWN_SKIPPED = 5


@dataclass
class EmbedSummary:
    """What `embed_catalogue` did.

    Attributes:
        count (`int`): products embedded (rows of the index).
        skipped (`list[tuple[str, str]]`): `(product id, reason)` of the rows left out with `skip_bad`.
        dim (`int`): embedding size.
        seconds (`float`): wall time of this run's embedding (image decoding + model), without writing the files.
        out (`Path`): the output folder.
        mode (`str`): `direct` or `reason`.
        resumed_shards (`int`): shards a previous, interrupted run had finished (not embedded again).
        shards (`int`): shards the catalogue was cut into.
        embedded (`int`): products embedded by this run, all processes together (None: not known).
    """

    count: int
    skipped: list[tuple[str, str]]
    dim: int
    seconds: float
    out: Path
    mode: str = "direct"
    model: dict[str, Any] = field(default_factory=dict)
    resumed_shards: int = 0
    shards: int = 1
    embedded: int | None = None

    @property
    def items_per_s(self) -> float:
        rows = self.count if self.embedded is None else self.embedded
        return rows / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        """A few lines for the CLI."""
        lines = [
            f"embedded {self.count} products ({self.mode} mode, dim {self.dim}) in {self.seconds:.1f}s "
            f"({self.items_per_s:.1f} products/s) -> {self.out}",
        ]
        if self.model.get("trained") is False:
            lines.append("model: UNTRAINED, built from the recipe (pass --model, or train first, for useful vectors)")
        if self.resumed_shards:
            lines.append(f"resumed: {self.resumed_shards} of {self.shards} shards came from the interrupted run")
        if self.skipped:
            shown = ", ".join(f"{pid!r}" for pid, _ in self.skipped[:SHOWN_SKIPPED])
            more = f" and {len(self.skipped) - SHOWN_SKIPPED} more" if len(self.skipped) > SHOWN_SKIPPED else ""
            lines.append(f"skipped {len(self.skipped)} bad products: {shown}{more} (reasons in {MANIFEST_FILE})")
        return "\n".join(lines)


class _PreparedBatches(torch.utils.data.Dataset):
    """Batch `i` of this process's unfinished shards with its images decoded and its prompts tokenised (the CPU half
    of embedding, `MoonEmbedder.preprocess`): DataLoader workers prepare the next batches while the model runs."""

    def __init__(self, embedder: Any, catalogue: Catalogue, batches: list[tuple[int, list[str]]], skip_bad: bool,
                 keep_items: bool):
        self.preprocess = embedder.preprocess
        self.max_images = embedder.max_images
        self.catalogue, self.batches, self.skip_bad, self.keep_items = catalogue, batches, skip_bad, keep_items

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, ids = self.batches[index]
        items: list[EmbedItem] = []
        skipped: list[tuple[str, str]] = []
        for product_id in ids:
            try:
                items.append(to_item(self.catalogue.products[product_id], self.catalogue.image, self.max_images))
            except DataError as exc:
                if not self.skip_bad:
                    raise DataError(
                        f"catalogue {str(self.catalogue.base_dir)!r}: product {product_id!r}: {exc}; fix or remove "
                        "the row, or skip bad rows (skip_bad / --skip-bad)"
                    ) from None
                skipped.append((product_id, str(exc)))
        return {"shard": shard, "ids": [item.id for item in items], "skipped": skipped,
                "prompts": self.preprocess(items) if items else None, "items": items if self.keep_items else None}


class _Progress:
    """One bar for the whole job, on the main process: its own products plus the other processes' finished shards."""

    def __init__(self, total: int, done: int, folder: Path, mine: Sequence[int], world_size: int, show: bool,
                 desc: str):
        self.folder, self.mine, self.world_size = folder, set(mine), world_size
        self.counted = finished_shards(folder)
        self.rows = done
        self.last_scan = time.monotonic()
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="product", disable=not show)

    def update(self, rows: int, *, scan: bool = False) -> None:
        self.rows += rows
        if self.world_size > 1 and (scan or time.monotonic() - self.last_scan > 2.0):
            for shard in finished_shards(self.folder) - self.counted - self.mine:
                self.rows += shard_rows(self.folder, shard)
                self.counted.add(shard)
            self.last_scan = time.monotonic()
        self.bar.update(self.rows - self.bar.n)

    def close(self, *, finished: bool = False) -> None:
        if finished:  # every process's shards are written: the bar ends at the whole job
            self.update(0, scan=True)
        self.bar.close()


def _embed_shards(embedder: Any, catalogue: Catalogue, plan: ShardPlan, shards: Sequence[int], folder: Path, *,
                  mode: str, batch_size: int, skip_bad: bool, dim: int | None, num_workers: int,
                  progress: _Progress) -> None:
    """Embed `shards` of `plan` batch by batch, writing each shard as soon as its last batch is done."""
    batches = [(shard, list(plan.shard(shard)[start:start + batch_size]))
               for shard in shards for start in range(0, len(plan.shard(shard)), batch_size)]
    left = Counter(shard for shard, _ in batches)
    parts: dict[int, dict[str, Any]] = {}
    source = _PreparedBatches(embedder, catalogue, batches, skip_bad,
                              keep_items=mode == "reason" and getattr(embedder, "generation_backend", "hf") == "vllm")
    loader = DataLoader(source, batch_size=None, shuffle=False, num_workers=num_workers,
                        prefetch_factor=2 if num_workers else None)
    width = dim or embedder.heads.config.embed_dim
    for batch in loader:
        shard = batch["shard"]
        part = parts.setdefault(shard, {"ids": [], "vectors": [], "skipped": [], "start": time.perf_counter()})
        for product_id, reason in batch["skipped"]:
            logger.warning("skipping product %r: %s", product_id, reason)
        if batch["ids"]:
            part["vectors"].append(np.asarray(embedder.embed_prompts(batch["prompts"], mode, items=batch["items"],
                                                                     dim=dim), dtype=np.float32))
        part["ids"] += batch["ids"]
        part["skipped"] += batch["skipped"]
        progress.update(len(batch["ids"]) + len(batch["skipped"]))
        left[shard] -= 1
        if left[shard] == 0:
            part = parts.pop(shard)
            vectors = np.concatenate(part["vectors"]) if part["vectors"] else np.zeros((0, width), np.float32)
            write_shard(folder, shard, part["ids"], vectors, part["skipped"], time.perf_counter() - part["start"])


def _merge_shards(folder: Path, plan: ShardPlan, width: int) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Ids, (N, D) L2-normalised float32 vectors and skipped rows of every shard, in shard (embedding) order."""
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for shard in range(plan.count):
        shard_ids, vectors, shard_skipped = read_shard(folder, shard)
        ids += shard_ids
        chunks.append(vectors)
        skipped += shard_skipped
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)
    # encode() already normalises; doing it again costs nothing and guarantees inner product == cosine in the index.
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return ids, matrix, skipped


def _processes() -> tuple[int, int, Callable[[], None]]:
    """(rank, world size, barrier): one process, or every process of `torchrun` / `accelerate launch`."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, lambda: None
    from accelerate import PartialState

    # Joins the process group the launcher described: NCCL on GPUs; on a CPU-only machine accelerate must be told
    # (`cpu=True`, gloo), or every process believes it is the only one and embeds the whole catalogue.
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone


def _settings(embedder: Any, catalogue: Catalogue, plan: ShardPlan, *, mode: str, dim: int | None,
              batch_size: int, model_dir: Path | None) -> dict[str, Any]:
    """What a shard's vectors depend on: a rerun must match it to reuse the shards."""
    heads = hashlib.sha256()
    state_dict = getattr(embedder.heads, "state_dict", None)
    for name, tensor in sorted((state_dict() if state_dict else {}).items()):
        heads.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return {
        "model_dir": str(Path(model_dir).resolve()) if model_dir is not None else None,
        "base_model": embedder.meta.get("base_model"),
        "heads_sha256": heads.hexdigest(),  # an untrained model is built afresh by each run: same heads or start over
        "catalogue": str(catalogue.base_dir),
        "ids_sha256": hashlib.sha256("\n".join(plan.ids).encode()).hexdigest(),
        "products": len(plan.ids), "mode": mode, "dim": dim, "batch_size": batch_size, "shard_size": plan.shard_size,
        "max_new_tokens": getattr(embedder, "max_new_tokens", None) if mode == "reason" else None,
    }


def default_num_workers() -> int:
    """Preprocessing workers when the recipe leaves `embed.num_workers` unset: two beside a GPU (which waits on the
    CPU otherwise), none on a CPU-only machine (the workers take the cores the model's forward runs on)."""
    import torch

    return min(2, max(1, (os.cpu_count() or 2) - 1)) if torch.cuda.is_available() else 0


def _write_parquet(path: Path, ids: Sequence[str], vectors: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    pq.write_table(pa.table({"id": pa.array(list(ids), type=pa.string()), "vector": column}), str(path))


def _write_index(path: Path, vectors: np.ndarray, spec: IndexSpec) -> dict[str, Any]:
    """Build and write the index; what the manifest records of it (with its recall against exact search)."""
    import faiss

    index = build_index(vectors, spec)
    faiss.write_index(index, str(path))
    info: dict[str, Any] = {"name": spec.name, "factory": spec.factory, "params": spec.params}
    if spec.factory != "Flat":
        info["measured"] = measure_recall(index, vectors)
        logger.info("index %s (%s): recall@10 %.3f against exact search, %.0f queries/s (exact %.0f)", spec.name,
                    spec.factory, info["measured"]["recall@10"], info["measured"]["qps"],
                    info["measured"]["exact_qps"])
    return info


def _model_record(embedder: MoonEmbedder, model_dir: Path | None, has_recipe: bool) -> dict[str, Any]:
    """How `search` gets the same model back: a saved model folder, or the recipe an untrained model came from."""
    if model_dir is not None:
        source = "dir"
    elif has_recipe:
        source = "recipe"
    else:
        source = "none"  # built by hand: search needs an explicit model
    return {
        "source": source,
        "dir": str(Path(model_dir).resolve()) if model_dir is not None else None,
        "recipe": RECIPE_FILE if has_recipe else None,
        "base_model": embedder.meta.get("base_model"),
        "builtin_size": embedder.meta.get("builtin_size"),
        "trained": model_dir is not None,
    }


def _write_recipe(folder: Path, embedder: MoonEmbedder, recipe: Recipe | None) -> bool:
    if recipe is not None:
        recipe.save(folder / RECIPE_FILE)
        return True
    if embedder.meta.get("recipe"):
        atomic_write_text(folder / RECIPE_FILE, embedder.meta["recipe"])
        return True
    return False


def embed_catalogue(
    embedder: MoonEmbedder, catalogue: Catalogue, out: Path, *, mode: str = "direct", batch_size: int = 32,
    skip_bad: bool = False, show_progress: bool = True, model_dir: Path | None = None, recipe: Recipe | None = None,
    dim: int | None = None, index: str = "flat", index_params: dict[str, int] | None = None,
    num_workers: int | None = None, shard_size: int = 4096,
) -> EmbedSummary:
    """Embed every product of `catalogue` and write vectors, FAISS index, ids and manifest into `out` atomically.

    Args:
        embedder (`MoonEmbedder`): the model.
        catalogue (`Catalogue`): from `load_catalogue`.
        out (`Path`): output folder; replaced as a whole on success, untouched on failure.
        mode (`str`, *optional*, defaults to `"direct"`): `direct` or `reason` (generate reasoning first).
        batch_size (`int`, *optional*, defaults to `32`): products per forward.
        skip_bad (`bool`, *optional*, defaults to `False`): leave out products whose images cannot be decoded
            (listed in the summary and the manifest) instead of stopping.
        show_progress (`bool`, *optional*, defaults to `True`): tqdm bar.
        model_dir (`Path`, *optional*): the folder `embedder` was loaded from; recorded so that search loads it.
        recipe (`Recipe`, *optional*): saved as `recipe.yaml` (else the recipe in `embedder.meta`, if any).
        dim (`int`, *optional*): keep the first `dim` values of each vector, renormalised (Matryoshka); the index,
            the manifest's `dim` and every `search` of the folder use that size. None: the model's `embed_dim`.
        index (`str`, *optional*, defaults to `"flat"`): the search index, a preset or a FAISS factory string
            (`moon_rl.inference.ann`); `index_params` (`dict`, *optional*): its `nprobe` / `efSearch`.
        num_workers (`int`, *optional*): DataLoader workers that decode images and tokenise prompts ahead of the
            model; None: `default_num_workers()`.
        shard_size (`int`, *optional*, defaults to `4096`): products per shard (rounded up to a multiple of
            `batch_size`); each shard is written to `<out>.shards/` when done, and a rerun reuses the finished ones.

    Every process of a `torchrun` / `accelerate launch` job calls it with the same arguments: each embeds its
    shards, the main process writes `out`, and all return once `out` is complete.

    Raises:
        `DataError`: a product's image cannot be decoded (without `skip_bad`), naming the product id; or no product
            could be embedded. `out` is not written then (the finished shards are kept for the rerun).
        `MoonError`: `<out>.shards/` holds shards of an unfinished run with other settings.
    """
    if mode not in MODES:
        raise MoonError(f"embed mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise MoonError(f"embed batch_size must be >= 1, got {batch_size}")
    if not catalogue.products:
        raise DataError(f"catalogue {str(catalogue.base_dir)!r} has no products to embed")
    heads = embedder.heads.config
    check_dim(dim, heads.embed_dim, heads.matryoshka_dims, what="embed dim")
    if shard_size < 1:
        raise MoonError(f"embed shard_size must be >= 1, got {shard_size}")
    out = Path(out)
    rank, world_size, barrier = _processes()
    order = sorted(catalogue.products.values(), key=lambda p: batch_order_key(p, embedder.max_images))
    plan = ShardPlan.make([product.id for product in order], shard_size, batch_size)
    folder = shard_folder(out)
    if rank == 0:
        start_shards(folder, _settings(embedder, catalogue, plan, mode=mode, dim=dim, batch_size=batch_size,
                                       model_dir=model_dir))
    barrier()
    done = finished_shards(folder)
    if done and rank == 0:
        logger.info("resuming the embedding in %s: %d of %d shards were finished", folder, len(done), plan.count)
    mine = plan.owned_by(rank, world_size)
    resumed_rows = sum(shard_rows(folder, shard) for shard in done)
    progress = _Progress(len(plan.ids), resumed_rows, folder, mine, world_size, show_progress and rank == 0,
                         f"embed ({mode})")
    start = time.perf_counter()
    try:
        _embed_shards(embedder, catalogue, plan, [s for s in mine if s not in done], folder, mode=mode,
                      batch_size=batch_size, skip_bad=skip_bad, dim=dim,
                      num_workers=default_num_workers() if num_workers is None else num_workers, progress=progress)
    except BaseException:
        progress.close()
        if rank == 0 and not finished_shards(folder):
            shutil.rmtree(folder, ignore_errors=True)  # nothing to resume from: leave no trace of the failed run
        raise
    barrier()  # every shard is written
    progress.close(finished=True)
    seconds = time.perf_counter() - start
    if rank == 0:
        ids, vectors, skipped = _merge_shards(folder, plan, dim or heads.embed_dim)
        if not ids:
            raise DataError(f"catalogue {str(catalogue.base_dir)!r}: all {len(skipped)} products were skipped as bad; "
                            f"first: {skipped[0][0]!r}: {skipped[0][1]}")
        width = int(vectors.shape[1])
        fresh = len(ids) + len(skipped) - resumed_rows
        with atomic_dir(out) as tmp:
            _write_parquet(tmp / EMBEDDINGS_FILE, ids, vectors)
            index_info = _write_index(tmp / INDEX_FILE, vectors, resolve_index(index, len(ids), width, index_params))
            atomic_write_text(tmp / IDS_FILE, json.dumps(ids))
            model = _model_record(embedder, model_dir, _write_recipe(tmp, embedder, recipe))
            atomic_write_text(tmp / MANIFEST_FILE, json.dumps(_manifest(
                model=model, mode=mode, dim=width, count=len(ids), skipped=skipped, seconds=seconds,
                catalogue=catalogue, batch_size=batch_size, index=index_info,
                embedded=fresh, work={"processes": world_size, "shards": plan.count, "shard_size": plan.shard_size,
                                      "resumed_shards": len(done), "embedded": fresh}), indent=2))
        shutil.rmtree(folder, ignore_errors=True)
    barrier()  # the output folder is complete before any process returns
    manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    return EmbedSummary(count=manifest["count"], skipped=[(s["id"], s["reason"]) for s in manifest["skipped"]],
                        dim=manifest["dim"], seconds=seconds, out=out, mode=mode, model=manifest["model"],
                        resumed_shards=len(done), shards=plan.count, embedded=manifest["work"]["embedded"])


def _manifest(
    *, model: dict[str, Any], mode: str, dim: int, count: int, skipped: list[tuple[str, str]], seconds: float,
    catalogue: Catalogue, batch_size: int, index: dict[str, Any], work: dict[str, Any], embedded: int,
) -> dict[str, Any]:
    import moon_rl

    return {
        "format_version": FORMAT_VERSION,
        "moon_rl_version": moon_rl.__version__,
        "model": model,
        "mode": mode,
        "dim": dim,
        "count": count,
        "metric": "inner_product",  # rows are L2-normalised, so this is cosine similarity
        "index": index,
        "catalogue": str(catalogue.base_dir),
        "batch_size": batch_size,
        "skipped": [{"id": pid, "reason": reason} for pid, reason in skipped],
        "seconds": round(seconds, 3),
        "items_per_s": round(embedded / seconds, 3) if seconds > 0 else None,  # this run's products only
        "work": work,
    }


def run_embed(
    recipe: Recipe, *, model_dir: Path | None, catalogue: str | None, out: Path | None, mode: str | None,
    skip_bad: bool, show_progress: bool = True, dim: int | None = None,
) -> EmbedSummary:
    """`moon-rl embed`: resolve model, catalogue, output folder and mode from the arguments and the recipe.

    Args:
        recipe (`Recipe`): the resolved recipe (`data`, `embed`, `model`, `output_dir`).
        model_dir (`Path`, *optional*): a trained model folder (`MoonEmbedder.save`); None embeds with an untrained
            model built from the recipe (a baseline; a warning says so).
        catalogue (`str`, *optional*): catalogue path; defaults to `recipe.data.catalogue`.
        out (`Path`, *optional*): output folder; defaults to `<recipe.output_dir>/embed`.
        mode (`str`, *optional*): defaults to `recipe.embed.mode`.
        skip_bad (`bool`): see `embed_catalogue`.
        dim (`int`, *optional*): defaults to `recipe.embed.dim` (see `embed_catalogue`).
    """
    if model_dir is not None:
        embedder = MoonEmbedder.load(model_dir)
        embedder.max_new_tokens = recipe.embed.max_new_tokens
    else:
        logger.warning(
            "no model folder given: embedding with an UNTRAINED model built from the recipe (model.name_or_path=%r); "
            "pass a trained model folder (e.g. <output_dir>/grpo/final) for useful vectors",
            recipe.model.name_or_path,
        )
        embedder = MoonEmbedder.from_recipe(recipe)
    mode = mode or recipe.embed.mode
    embedder.generation_backend = recipe.embed.generation_backend
    # Embedding decodes each image anyway and writes nothing unless it succeeds; --skip-bad must see the bad rows.
    cat = load_recipe_catalogue(recipe.data, catalogue, decode_images=False)
    out = Path(out) if out is not None else Path(recipe.output_dir) / "embed"
    return embed_catalogue(
        embedder, cat, out, mode=mode, batch_size=recipe.embed.batch_size, skip_bad=skip_bad,
        show_progress=show_progress, model_dir=model_dir, recipe=recipe, dim=dim or recipe.embed.dim,
        index=recipe.embed.index, index_params=dict(recipe.embed.index_params),
        num_workers=recipe.embed.num_workers, shard_size=recipe.embed.shard_size,
    )
