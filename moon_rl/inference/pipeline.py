"""`moon-rl embed`: a whole catalogue -> vectors (parquet) + a FAISS inner-product index, written atomically.

Output folder (everything `moon_rl.inference.search` needs, no parquet reader required for search)::

    embeddings.parquet   id: string, vector: fixed_size_list<float32>[dim]   (L2-normalised rows)
    index.faiss          faiss.IndexFlatIP over the same rows (inner product = cosine)
    ids.json             row -> product id
    embed.json           manifest: model (dir or recipe), mode, dim, count, skipped ids, version, timing
    recipe.yaml          the resolved recipe, when there is one (search rebuilds an untrained model from it)

Images are decoded one batch at a time, so memory stays flat however large the catalogue is.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moon_rl.cache import atomic_dir, atomic_write_text
from moon_rl.data.catalogue import Catalogue, load_recipe_catalogue
from moon_rl.errors import DataError, MoonError
from moon_rl.inference.ann import IndexSpec, build_index, measure_recall, resolve_index
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
        seconds (`float`): wall time of the embedding loop (image decoding + model), without writing the files.
        out (`Path`): the output folder.
        mode (`str`): `direct` or `reason`.
    """

    count: int
    skipped: list[tuple[str, str]]
    dim: int
    seconds: float
    out: Path
    mode: str = "direct"
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        """A few lines for the CLI."""
        lines = [
            f"embedded {self.count} products ({self.mode} mode, dim {self.dim}) in {self.seconds:.1f}s "
            f"({self.items_per_s:.1f} products/s) -> {self.out}",
        ]
        if self.skipped:
            shown = ", ".join(f"{pid!r}" for pid, _ in self.skipped[:SHOWN_SKIPPED])
            more = f" and {len(self.skipped) - SHOWN_SKIPPED} more" if len(self.skipped) > SHOWN_SKIPPED else ""
            lines.append(f"skipped {len(self.skipped)} bad products: {shown}{more} (reasons in {MANIFEST_FILE})")
        return "\n".join(lines)


def _loaded_batches(
    embedder: MoonEmbedder, catalogue: Catalogue, batch_size: int, skip_bad: bool, skipped: list[tuple[str, str]],
) -> Iterator[list[EmbedItem]]:
    """Length-sorted batches of items with their images decoded; bad rows raise or are recorded in `skipped`."""
    # `encode`'s own order: without skips our batches are exactly its batches (same padding, same vectors).
    products = sorted(catalogue.products.values(), key=lambda p: batch_order_key(p, embedder.max_images))
    pending: list[EmbedItem] = []
    for product in products:
        try:
            pending.append(to_item(product, catalogue.image, embedder.max_images))
        except DataError as exc:
            if not skip_bad:
                raise DataError(
                    f"catalogue {str(catalogue.base_dir)!r}: product {product.id!r}: {exc}; fix or remove the row, "
                    "or skip bad rows (skip_bad / --skip-bad)"
                ) from None
            logger.warning("skipping product %r: %s", product.id, exc)
            skipped.append((product.id, str(exc)))
            continue
        if len(pending) == batch_size:
            yield pending
            pending = []
    if pending:
        yield pending


def _embed_rows(
    embedder: MoonEmbedder, catalogue: Catalogue, *, mode: str, batch_size: int, skip_bad: bool, show_progress: bool,
    dim: int | None = None,
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Ids, (N, D) float32 L2-normalised vectors and skipped rows, in length-sorted order."""
    skipped: list[tuple[str, str]] = []
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    bar = tqdm(total=len(catalogue.products), desc=f"embed ({mode})", unit="product", disable=not show_progress)

    def on_batch(items: list[EmbedItem], vectors: np.ndarray) -> None:
        chunks.append(np.asarray(vectors, dtype=np.float32))
        ids.extend(item.id for item in items)
        # Skipped rows count as done too, so the bar ends at 100 % and its rate stays honest.
        bar.update(len(ids) + len(skipped) - bar.n)
        if skipped:
            bar.set_postfix(skipped=len(skipped))

    try:
        # One encode() call per batch: the same computation as encoding the whole list (our batches are its batches),
        # while only one batch of images is decoded at a time. Prefetching the next batch in a thread was measured
        # slower on a 2-core CPU (it competes with torch's threads), so the loop stays sequential.
        for items in _loaded_batches(embedder, catalogue, batch_size, skip_bad, skipped):
            on_batch(items, embedder.encode(items, mode=mode, batch_size=len(items), dim=dim))
        bar.update(len(ids) + len(skipped) - bar.n)
    finally:
        bar.close()
    width = dim or embedder.heads.config.embed_dim
    matrix = np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)
    # encode() already normalises; doing it again costs nothing and guarantees inner product == cosine in the index.
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return ids, matrix, skipped


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

    Raises:
        `DataError`: a product's image cannot be decoded (without `skip_bad`), naming the product id; or no product
            could be embedded. Nothing is written then.
    """
    if mode not in MODES:
        raise MoonError(f"embed mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise MoonError(f"embed batch_size must be >= 1, got {batch_size}")
    if not catalogue.products:
        raise DataError(f"catalogue {str(catalogue.base_dir)!r} has no products to embed")
    heads = embedder.heads.config
    check_dim(dim, heads.embed_dim, heads.matryoshka_dims, what="embed dim")
    out = Path(out)
    start = time.perf_counter()
    ids, vectors, skipped = _embed_rows(embedder, catalogue, mode=mode, batch_size=batch_size, skip_bad=skip_bad,
                                        show_progress=show_progress, dim=dim)
    seconds = time.perf_counter() - start
    if not ids:
        raise DataError(f"catalogue {str(catalogue.base_dir)!r}: all {len(skipped)} products were skipped as bad; "
                        f"first: {skipped[0][0]!r}: {skipped[0][1]}")
    dim = int(vectors.shape[1])
    with atomic_dir(out) as tmp:
        _write_parquet(tmp / EMBEDDINGS_FILE, ids, vectors)
        index_info = _write_index(tmp / INDEX_FILE, vectors, resolve_index(index, len(ids), dim, index_params))
        atomic_write_text(tmp / IDS_FILE, json.dumps(ids))
        model = _model_record(embedder, model_dir, _write_recipe(tmp, embedder, recipe))
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(_manifest(
            model=model, mode=mode, dim=dim, count=len(ids), skipped=skipped, seconds=seconds,
            catalogue=catalogue, batch_size=batch_size, index=index_info), indent=2))
    return EmbedSummary(count=len(ids), skipped=skipped, dim=dim, seconds=seconds, out=out, mode=mode, model=model)


def _manifest(
    *, model: dict[str, Any], mode: str, dim: int, count: int, skipped: list[tuple[str, str]], seconds: float,
    catalogue: Catalogue, batch_size: int, index: dict[str, Any],
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
        "items_per_s": round(count / seconds, 3) if seconds > 0 else None,
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
    )
