"""What the HTTP layer calls: the loaded index, catalogue and model, behind the micro-batcher.

`SearchService` knows nothing about HTTP routes; it raises `ApiError` with the status a client should see (404 for an
unknown product id) so that the app only translates. Product images are found by product id and image number in
the catalogue the index was built from: a client never names a file.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, UnidentifiedImageError

from moon_rl.data.catalogue import Catalogue
from moon_rl.data.records import Product
from moon_rl.data.sources import DEFAULT_MAX_PIXELS, resolve_image_path
from moon_rl.errors import MoonError
from moon_rl.inference.annotate import extract_trace
from moon_rl.inference.search import EmbeddingIndex
from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.serve.batcher import Encoded, MicroBatcher
from moon_rl.serve.inputs import ApiError

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """How the service batches and what it accepts.

    Args:
        batching (`bool`, *optional*, defaults to `True`): merge concurrent requests into one forward.
        max_batch (`int`, *optional*, defaults to `16`): the most records one forward collects.
        max_wait_ms (`float`, *optional*, defaults to `5.0`): how long a forward waits for more requests.
        max_pixels (`int`, *optional*, defaults to `40_000_000`): the largest uploaded image (width x height).
        max_body_bytes (`int`, *optional*, defaults to 20 MiB): the largest request body.
    """

    batching: bool = True
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_body_bytes: int = 20 * 1024 * 1024


def product_url(product_id: str) -> str:
    return f"/products/{quote(product_id, safe='')}"


def image_url(product_id: str, number: int = 0) -> str:
    return f"{product_url(product_id)}/images/{number}"


#: The name before issue 15's naming rule (a recipe section is a `*Spec`, what a component is built with a `*Config`).
ServeOptions = ServeConfig


class SearchService:
    """An index folder, its catalogue and its model, served.

    Args:
        index (`EmbeddingIndex`): a loaded `moon-rl embed` folder.
        catalogue (`Catalogue`): the catalogue it was built from (titles and images).
        embedder (`MoonEmbedder`): the model that built it.
        options (`ServeConfig`, *optional*): batching and limits.
    """

    def __init__(self, index: EmbeddingIndex, catalogue: Catalogue, embedder: MoonEmbedder,
                 options: ServeConfig | None = None):
        self.index = index
        self.catalogue = catalogue
        self.embedder = embedder.eval()
        self.options = options or ServeConfig()
        self.batcher = MicroBatcher(self._encode, max_batch=self.options.max_batch,
                                    max_wait_ms=self.options.max_wait_ms, enabled=self.options.batching)
        missing = [pid for pid in index.ids if pid not in catalogue.products]
        if missing:
            logger.warning("%d indexed products are not in the catalogue %s (e.g. %r): they are served without title "
                           "or images", len(missing), catalogue.base_dir, missing[0])

    @classmethod
    def open(cls, index_dir: Path, *, model_dir: Path | None = None, catalogue: str | Path | None = None,
             embedder: MoonEmbedder | None = None, options: ServeConfig | None = None) -> SearchService:
        """Load the index folder, its catalogue and its model (`model_dir`, else the one the index records).

        Raises:
            `MoonError`: a missing or corrupt index folder, model or catalogue, named.
        """
        index = EmbeddingIndex.load(index_dir)
        cat = index.load_catalogue(catalogue)
        embedder = embedder or index.load_embedder(model_dir)
        if embedder.heads.config.embed_dim < index.dim:
            raise MoonError(f"the model's embedding size {embedder.heads.config.embed_dim} is smaller than the index's "
                            f"{index.dim}; serve the index with the model that built it")
        return cls(index, cat, embedder, options)

    @property
    def dim(self) -> int | None:
        """The size queries are cut to: the index's, when it holds Matryoshka prefixes (`embed --dim`); else None."""
        return self.index.query_dim(self.embedder)

    # ------------------------------------------------------------------ model
    def _encode(self, records: list[Any], mode: str) -> tuple[np.ndarray, list[str] | None]:
        """The batcher's worker: one `encode` call for every record it collected."""
        size = max(len(records), 1)
        if mode != "reason":
            return self.embedder.encode(records, mode="direct", batch_size=size, dim=self.dim), None
        vectors, ids = self.embedder.encode(records, mode="reason", batch_size=size, return_completions="ids",
                                            dim=self.dim)
        tokenizer = self.embedder.processor.tokenizer
        return vectors, [extract_trace(text) for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]

    async def embed(self, records: Sequence[Any], mode: str) -> Encoded:
        """Vectors (and chains in reason mode) of `records`, computed in a batch with other waiting requests."""
        return await asyncio.wrap_future(self.batcher.submit(records, mode))

    def close(self) -> None:
        self.batcher.close()

    # ------------------------------------------------------------------ index and catalogue
    @property
    def mode(self) -> str:
        """The mode the index was built in: queries are embedded in it unless a request asks otherwise."""
        return self.index.mode

    def product(self, product_id: str) -> Product:
        product = self.catalogue.products.get(product_id)
        if product is None:
            raise ApiError(404, f"unknown product id {product_id!r}")
        return product

    def stored_vector(self, product_id: str) -> np.ndarray:
        """A product's vector as indexed ("more like this" needs no forward)."""
        if product_id not in self.index.rows:
            raise ApiError(404, f"unknown product id {product_id!r}: it is not in the index")
        return self.index.vector(product_id)

    def neighbours(self, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The `k` nearest products to `vector`, best first, with what a page shows of each."""
        return [self.describe(pid, score, rank)
                for rank, (pid, score) in enumerate(self.index.search_vectors(vector[None], k)[0], start=1)]

    def describe(self, product_id: str, score: float | None = None, rank: int | None = None) -> dict[str, Any]:
        """A product as the API shows it: id, title, its URLs and the images it has."""
        product = self.catalogue.products.get(product_id)
        out: dict[str, Any] = {"id": product_id}
        if rank is not None:
            out["rank"] = rank
        if score is not None:
            out["score"] = score
        out["title"] = product.title if product else None
        out["image_url"] = image_url(product_id) if product and product.images else None
        out["url"] = product_url(product_id)
        return out

    def product_details(self, product_id: str) -> dict[str, Any]:
        """`GET /products/{id}`: the catalogue row (images as URLs, never paths or bytes)."""
        product = self.product(product_id)
        return {
            "id": product.id, "title": product.title, "description": product.description,
            "category": product.category, "attributes": product.attributes,
            "images": [image_url(product.id, n) for n in range(len(product.images))],
            "indexed": product.id in self.index.rows,
        }

    def product_image(self, product_id: str, number: int) -> tuple[bytes, str]:
        """The bytes and media type of a product's image `number`, as the catalogue stores it."""
        product = self.product(product_id)
        if not 0 <= number < len(product.images):
            raise ApiError(404, f"product {product_id!r} has {len(product.images)} image(s); there is no image {number}")
        ref = product.images[number]
        if isinstance(ref, bytes):
            data = ref
        else:
            path = resolve_image_path(ref, self.catalogue.base_dir)
            try:
                data = path.read_bytes()
            except OSError as exc:
                logger.warning("product %r image %d: %s: %s", product_id, number, path, exc)
                raise ApiError(404, f"product {product_id!r} image {number} cannot be read") from None
        try:
            fmt = Image.open(io.BytesIO(data)).format  # the header only: the browser decodes it
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            fmt = None
        media_type = Image.MIME.get(fmt or "")
        if media_type is None:
            raise ApiError(404, f"product {product_id!r} image {number} is not an image a browser can show")
        return data, media_type
