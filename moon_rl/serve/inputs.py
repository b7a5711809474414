"""What clients send, checked: request bodies, uploaded images and the `dim` of `/embed`.

Every check raises `ApiError` with the HTTP status and a message naming the field, so the client learns what to fix.
Uploaded images go through `moon_rl.data.sources.load_image` (decompression-bomb guard, full decode, RGB) as *bytes*
only: a string from a client is always base64, never a path, so nothing a client sends can open a file.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from moon_rl.data.sources import load_image
from moon_rl.errors import DataError
from moon_rl.modeling.matryoshka import truncate

#: The most results one search returns.
MAX_K = 100
#: The most inputs (texts + images + products) one /embed request carries.
MAX_INPUTS = 64


class ApiError(Exception):
    """A request the service refuses: answered as `{"detail": message}` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ProductIn(BaseModel):
    """A product to embed as the catalogue's products are (title, description, photos): its vector is comparable to
    the index's rows."""

    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1)
    description: str | None = None
    images: list[str] = Field(default_factory=list, description="base64 or data: URIs")


class EmbedRequest(BaseModel):
    """`POST /embed` as JSON. Texts and images are embedded as search queries, products as catalogue rows; vectors come
    back in that order: texts, images, products."""

    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(default_factory=list)
    images: list[str] = Field(default_factory=list, description="base64 or data: URIs")
    products: list[ProductIn] = Field(default_factory=list)
    mode: Literal["direct", "reason"] = "direct"
    dim: int | None = None


class SearchRequest(BaseModel):
    """`POST /search` as JSON: a text and/or an image, or a catalogue product ("more like this")."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = Field(None, description="base64 or a data: URI")
    product_id: str | None = None
    k: int = Field(10, ge=1, le=MAX_K)
    mode: Literal["direct", "reason"] | None = None  # default: the index's mode


def decode_base64(field: str, value: str) -> bytes:
    """The bytes of a base64 string or `data:` URI sent in a JSON body."""
    payload = value
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(422, f"{field}: a data URI must be base64 ('data:image/png;base64,...')")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: not valid base64 (send the image file's bytes base64-encoded, or upload it "
                            "as multipart/form-data)") from None


def decode_image(field: str, data: bytes, *, max_pixels: int, filename: str | None = None) -> Image.Image:
    """A fully decoded RGB image from uploaded bytes; 400 naming `field` for a non-image, a bomb or a corrupt file."""
    where = f"{field} ({filename!r})" if filename else field
    if not data:
        raise ApiError(400, f"{where}: empty upload")
    try:
        # Always bytes, never a str: `load_image` reads a str as a path, and no client string may become one.
        return load_image(bytes(data), Path("."), max_pixels=max_pixels)
    except DataError as exc:
        raise ApiError(400, f"{where}: {exc}") from None


def check_dim(dim: int | None, size: int) -> None:
    """Refuse a `dim` the model cannot give: valid when 1 <= dim <= the embedding size `size`.

    Any prefix is served (as sentence-transformers' `truncate_dim`); a model retrieves best at the sizes it trained
    (`model.heads.matryoshka_dims`, listed by `GET /health`).
    """
    if dim is not None and not 1 <= dim <= size:
        raise ApiError(422, f"dim: must be between 1 and the embedding size {size}, got {dim}")


def truncate_dim(vectors: np.ndarray, dim: int | None) -> np.ndarray:
    """Matryoshka read-out: the first `dim` coordinates of each row, L2-renormalised; all of them for None."""
    check_dim(dim, vectors.shape[1])
    return truncate(np.ascontiguousarray(vectors, dtype=np.float32), dim)
