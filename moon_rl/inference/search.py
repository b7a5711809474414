"""`moon-rl search`: nearest catalogue products to a text and/or image query, from a folder `moon-rl embed` wrote.

The query is embedded by the same model as the catalogue: the model folder recorded in `embed.json`, or, for an
untrained recipe model, the model rebuilt from the saved `recipe.yaml` (builtin backbones and fresh heads are
deterministic, so the rebuilt model gives the same vectors), in the same mode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from moon_rl.data.catalogue import Catalogue, load_catalogue
from moon_rl.data.sources import load_image
from moon_rl.data.synthetic import SyntheticConfig
from moon_rl.errors import MoonError
from moon_rl.inference.ann import apply_params
from moon_rl.inference.pipeline import IDS_FILE, INDEX_FILE, MANIFEST_FILE, RECIPE_FILE
from moon_rl.modeling.embedder import MoonEmbedder


@dataclass
class EmbeddingIndex:
    """A loaded `moon-rl embed` folder: FAISS index, row ids and manifest."""

    folder: Path
    index: Any  # faiss.Index
    ids: list[str]
    manifest: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def mode(self) -> str:
        return str(self.manifest.get("mode", "direct"))

    def query_dim(self, embedder: MoonEmbedder) -> int | None:
        """The size `embedder`'s query vectors are cut to for this index: its own, when it holds Matryoshka prefixes
        (`embed --dim`) shorter than the model's vectors; else None (the full vectors)."""
        return self.dim if self.dim < embedder.heads.config.embed_dim else None

    @classmethod
    def load(cls, folder: Path, params: dict[str, int] | None = None) -> EmbeddingIndex:
        """Read the index, ids and manifest of `folder`, checking they agree; set the search parameters the manifest
        stored (`nprobe`, `efSearch`), then `params` over them.

        Raises:
            `MoonError`: naming the folder and the missing or unreadable part.
        """
        import faiss

        folder = Path(folder)
        hint = "run `moon-rl embed` to build it"
        if not folder.is_dir():
            raise MoonError(f"index folder {str(folder)!r} does not exist; {hint}")
        missing = [name for name in (INDEX_FILE, IDS_FILE, MANIFEST_FILE) if not (folder / name).is_file()]
        if missing:
            raise MoonError(f"index folder {str(folder)!r} is not a moon-rl embed output: missing {', '.join(missing)}; "
                            f"{hint}")
        manifest = _read_json(folder / MANIFEST_FILE, dict, "a JSON object (the embed manifest)")
        ids = _read_json(folder / IDS_FILE, list, "a JSON list of product ids")
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MoonError(f"{folder / INDEX_FILE}: not a readable FAISS index ({first_line}); {hint}") from None
        if index.ntotal != len(ids):
            raise MoonError(f"index folder {str(folder)!r}: {INDEX_FILE} has {index.ntotal} vectors but {IDS_FILE} "
                            f"lists {len(ids)} ids; the folder is inconsistent, {hint} again")
        if index.ntotal == 0:
            raise MoonError(f"index folder {str(folder)!r}: the index is empty; {hint}")
        apply_params(index, {**((manifest.get("index") or {}).get("params") or {}), **(params or {})})
        return cls(folder, index, [str(i) for i in ids], manifest)

    @cached_property
    def rows(self) -> dict[str, int]:
        """Product id -> row of the index."""
        return {pid: row for row, pid in enumerate(self.ids)}

    def vector(self, product_id: str) -> np.ndarray:
        """The stored vector of a product (shape (dim,), L2-normalised), without running the model.

        Raises:
            `MoonError`: the id is not in the index.
        """
        if product_id not in self.rows:
            raise MoonError(f"product {product_id!r} is not in the index {str(self.folder)!r}")
        return np.asarray(self.index.reconstruct(self.rows[product_id]), dtype=np.float32)

    def search_vectors(self, vectors: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-`k` `(id, score)` per row of `vectors` (L2-normalised float32, shape (Q, dim)), best first."""
        if k < 1:
            raise MoonError(f"k must be >= 1, got {k}")
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.dim:
            raise MoonError(f"query vectors have dim {vectors.shape[1]} but the index in {str(self.folder)!r} has "
                            f"dim {self.dim}; embed the query with the model that built the index")
        scores, rows = self.index.search(vectors, min(k, self.index.ntotal))
        return [[(self.ids[r], float(s)) for r, s in zip(row_ids, row_scores, strict=True) if r >= 0]
                for row_ids, row_scores in zip(rows, scores, strict=True)]

    def load_embedder(self, model_dir: Path | None = None) -> MoonEmbedder:
        """The model that built the index: `model_dir` if given, else the one the manifest records."""
        if model_dir is not None:
            return MoonEmbedder.load(model_dir)
        model = self.manifest.get("model") or {}
        if model.get("dir"):
            if not Path(model["dir"]).is_dir():
                raise MoonError(f"{self.folder / MANIFEST_FILE}: the model folder {model['dir']!r} the index was built "
                                "with no longer exists; pass the model folder explicitly (--model)")
            return MoonEmbedder.load(model["dir"])
        recipe_file = self.folder / (model.get("recipe") or RECIPE_FILE)
        if recipe_file.is_file():
            from moon_rl.recipe import load_recipe

            # An untrained recipe model: rebuilding it gives the same weights (seeded builtin backbone, seeded heads).
            return MoonEmbedder.from_recipe(load_recipe(recipe_file)).eval()
        raise MoonError(f"index folder {str(self.folder)!r} records no model folder and has no {RECIPE_FILE}; "
                        "pass the model folder the index was built with (--model)")

    def load_catalogue(self, path: str | Path | None = None) -> Catalogue:
        """The catalogue the index was built from (titles, images): `path` if given, else the folder the manifest
        records, else the saved recipe's `data.catalogue`; the saved recipe's `data.columns` / `data.splits` apply.

        Raises:
            `MoonError`: when no catalogue can be found (pass one explicitly); `DataError` for a broken one.
        """
        recipe = None
        if (self.folder / RECIPE_FILE).is_file():
            from moon_rl.recipe import load_recipe

            recipe = load_recipe(self.folder / RECIPE_FILE)
        recorded = self.manifest.get("catalogue")
        if path is None and recorded and Path(recorded).is_dir():
            path = recorded
        elif path is None and recipe is not None:
            path = recipe.data.catalogue
        if path is None:
            raise MoonError(f"index folder {str(self.folder)!r}: the catalogue it was built from ({recorded!r}) is not "
                            "there; pass the catalogue explicitly (--catalogue)")
        if recipe is None:
            return load_catalogue(path)
        return load_catalogue(path, synthetic=SyntheticConfig(**recipe.data.synthetic.model_dump()),
                              columns=recipe.data.columns, splits=recipe.data.splits)


def _read_json(path: Path, kind: type, expected: str) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoonError(f"{path}: unreadable ({exc}); expected {expected}") from None
    if not isinstance(data, kind):
        raise MoonError(f"{path}: expected {expected}, got {type(data).__name__}")
    return data


def search(
    index_dir: Path, *, text: str | None, image: Path | None, k: int = 5, model_dir: Path | None = None,
    embedder: MoonEmbedder | None = None, params: dict[str, int] | None = None,
) -> list[tuple[str, float]]:
    """Top-`k` catalogue products `(id, cosine score)` for a text and/or image query, best first.

    Args:
        index_dir (`Path`): a folder written by `moon-rl embed`.
        text (`str`, *optional*): query text.
        image (`Path`, *optional*): query image file.
        k (`int`, *optional*, defaults to `5`): how many results (at most the catalogue size).
        model_dir (`Path`, *optional*): the model folder; defaults to the one recorded in the index folder.
        embedder (`MoonEmbedder`, *optional*): an already loaded model (programmatic use; skips loading).
        params (`dict`, *optional*): search-time index parameters over the stored ones (`nprobe`, `efSearch`).

    Raises:
        `MoonError`: no query, a missing or corrupt index folder, or a model that does not match the index.
        `DataError`: the query image cannot be read.
    """
    if not text and image is None:
        raise MoonError("search needs a query: give text (--text) and/or an image (--image)")
    if k < 1:
        raise MoonError(f"k must be >= 1, got {k}")
    index = EmbeddingIndex.load(index_dir, params)
    query: dict[str, Any] = {"text": text} if text else {}
    if image is not None:
        query["image"] = load_image(str(image), Path.cwd())
    embedder = embedder or index.load_embedder(model_dir)
    vector = embedder.encode([query], mode=index.mode, batch_size=1, dim=index.query_dim(embedder))
    return index.search_vectors(vector, k)[0]


def format_results(results: list[tuple[str, float]]) -> str:
    """`rank  id  score` lines for the CLI (score with 4 decimals)."""
    if not results:
        return "no results"
    width = max(len("id"), *(len(pid) for pid, _ in results))
    lines = [f"{'rank':>4}  {'id':<{width}}  score"]
    lines += [f"{rank:>4}  {pid:<{width}}  {score:.4f}" for rank, (pid, score) in enumerate(results, start=1)]
    return "\n".join(lines)
