"""`moon-rl serve`: the HTTP routes over a `SearchService`, and the search page.

    GET  /                              the search page (static HTML/JS, no build step)
    GET  /health                        status, index size, mode, batching counters (no API key needed)
    POST /embed                         texts / images / products -> vectors (JSON or a form)
    POST /search                        a text and/or image query, or a product id -> the k nearest products
    GET  /products/{id}                 a catalogue product
    GET  /products/{id}/images/{n}      its n-th image, as the catalogue stores it

Every refusal is `{"detail": "<what was wrong>"}` with a 4xx status: 400 an unreadable upload, 401 a missing or wrong
API key, 404 an unknown product or image, 413 an oversize body, 415 a body that is neither JSON nor multipart, 422 a
field out of range or of the wrong type.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from moon_rl.data.records import Product
from moon_rl.errors import MoonError
from moon_rl.modeling.embedder import MoonEmbedder
from moon_rl.modeling.inputs import EmbedItem, product_text
from moon_rl.modeling.matryoshka import loss_dims
from moon_rl.serve.inputs import (
    MAX_INPUTS,
    ApiError,
    EmbedRequest,
    SearchRequest,
    check_dim,
    decode_base64,
    decode_image,
    truncate_dim,
)
from moon_rl.serve.limits import BodyLimit
from moon_rl.serve.service import SearchService, ServeConfig

STATIC = Path(__file__).parent / "static"
#: The page's files, by URL: a fixed table, so that no request path ever reaches the file system.
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/static/style.css": ("style.css", "text/css; charset=utf-8")}
#: Form bodies read as fields (+ files): multipart, or a URL-encoded form for a text-only request (`curl -d`).
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
#: The largest non-file multipart field (a query text).
MAX_FIELD_BYTES = 64 * 1024


def create_app(
    index_dir: str | Path, model_dir: str | Path | None = None, api_key: str | None = None, batching: bool = True,
    max_batch: int = 16, max_wait_ms: float = 5.0, *, catalogue: str | Path | None = None,
    embedder: MoonEmbedder | None = None, max_pixels: int | None = None, max_body_bytes: int | None = None,
) -> FastAPI:
    """The service for a `moon-rl embed` folder, ready for uvicorn (or an in-process test client).

    Args:
        index_dir (`Path`): a folder written by `moon-rl embed`.
        model_dir (`Path`, *optional*): the model; defaults to the one that built the index.
        api_key (`str`, *optional*): when set, every route but `/`, its static files and `/health` needs it, in the
            `X-API-Key` header or as `Authorization: Bearer <key>`.
        batching (`bool`, *optional*, defaults to `True`): merge concurrent requests into one model forward.
        max_batch (`int`, *optional*, defaults to `16`): the most records one forward collects.
        max_wait_ms (`float`, *optional*, defaults to `5.0`): how long a forward waits for more requests.
        catalogue (`Path`, *optional*): the catalogue, when it is no longer where the index records it.
        embedder (`MoonEmbedder`, *optional*): an already loaded model (programmatic use; skips loading).
        max_pixels (`int`, *optional*): the largest uploaded image, width x height (default 40 million).
        max_body_bytes (`int`, *optional*): the largest request body (default 20 MiB).

    Raises:
        `MoonError`: a missing or corrupt index folder, model or catalogue.
    """
    options = ServeConfig(batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms)
    if max_pixels is not None:
        options.max_pixels = max_pixels
    if max_body_bytes is not None:
        options.max_body_bytes = max_body_bytes
    service = SearchService.open(Path(index_dir), model_dir=Path(model_dir) if model_dir else None,
                                 catalogue=catalogue, embedder=embedder, options=options)
    return build_app(service, api_key=api_key)


def build_app(service: SearchService, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over a loaded service (`create_app` loads one from an index folder)."""
    if api_key is not None and not api_key:
        raise MoonError("api_key is empty: give a key, or none for an open service")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    # No /docs, /redoc or /openapi.json: the POST routes read JSON or forms themselves (one route, two encodings), so
    # the generated schema would show no body, and the docs pages load their scripts from a CDN. README documents the API.
    app = FastAPI(title="moon-rl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.options.max_body_bytes)
    _add_error_handlers(app)
    guarded = [Depends(_key_check(api_key))]

    for url, (name, media_type) in PAGE_FILES.items():
        app.add_api_route(url, _page_route(name, media_type), methods=["GET"], include_in_schema=False)

    @app.get("/health")
    def health() -> dict[str, Any]:
        index = service.index
        heads = service.embedder.heads.config
        return {"status": "ok", "products": len(index.ids), "dim": index.dim, "mode": service.mode,
                "trained_dims": loss_dims(heads.embed_dim, heads.matryoshka_dims),
                "auth": api_key is not None, "model": index.manifest.get("model"),
                "batching": {"enabled": service.options.batching, "max_batch": service.options.max_batch,
                             "max_wait_ms": service.options.max_wait_ms, **service.batcher.stats.as_dict()}}

    @app.post("/embed", dependencies=guarded)
    async def embed(request: Request) -> dict[str, Any]:
        body, files = await _parse(request, EmbedRequest, list_fields=("texts",), file_fields=("images",))
        check_dim(body.dim, service.index.dim)  # before any work
        records, inputs = await run_in_threadpool(_embed_records, body, files, service.options.max_pixels)
        encoded = await service.embed(records, body.mode)
        vectors = truncate_dim(encoded.vectors, body.dim)
        out: dict[str, Any] = {"mode": body.mode, "dim": int(vectors.shape[1]), "count": len(records),
                               "inputs": inputs, "vectors": vectors.tolist()}
        if encoded.chains is not None:
            out["chains"] = encoded.chains
        return out

    @app.post("/search", dependencies=guarded)
    async def search(request: Request) -> dict[str, Any]:
        body, files = await _parse(request, SearchRequest, file_fields=("image",))
        mode = body.mode or service.mode
        chain = None
        if body.product_id is not None:
            if body.text or body.image or files:
                raise ApiError(422, "product_id: give either a product id (more like this) or a text/image query, "
                                    "not both")
            vector = service.stored_vector(body.product_id)
        else:
            record = await run_in_threadpool(_search_record, body, files, service.options.max_pixels)
            encoded = await service.embed([record], mode)
            vector, chain = encoded.vectors[0], (encoded.chains or [None])[0]
        results = await run_in_threadpool(service.neighbours, vector, body.k)
        return {"query": {"text": body.text, "image": bool(body.image or files), "product_id": body.product_id},
                "mode": mode, "k": body.k, "chain": chain, "results": results}

    @app.get("/products/{product_id}", dependencies=guarded)
    def product(product_id: str) -> dict[str, Any]:
        return service.product_details(product_id)

    @app.get("/products/{product_id}/images/{number}", dependencies=guarded)
    def product_image(product_id: str, number: int) -> Response:
        data, media_type = service.product_image(product_id, number)
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    return app


# ---------------------------------------------------------------------------------------------------- requests
async def _parse(request: Request, model: type[Any], *, list_fields: tuple[str, ...] = (),
                 file_fields: tuple[str, ...] = ()) -> tuple[Any, list[tuple[str, bytes, str | None]]]:
    """The request body as `model` (JSON), or a form's fields as `model` plus its uploaded files as
    `(field, bytes, filename)`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            return model.model_validate_json(await request.body()), []
        except ValidationError as exc:
            raise ApiError(422, _validation_message(exc)) from None
    if content_type not in FORM_TYPES:
        raise ApiError(415, f"send the request as application/json or multipart/form-data, not {content_type!r}"
                            if content_type else "send the request as application/json or multipart/form-data "
                                                 "(no Content-Type header)")
    async with request.form(max_files=MAX_INPUTS, max_fields=MAX_INPUTS + 8, max_part_size=MAX_FIELD_BYTES) as form:
        fields, files = await _form_parts(form, list_fields, file_fields)
    try:
        return model.model_validate(fields), files
    except ValidationError as exc:
        raise ApiError(422, _validation_message(exc)) from None


async def _form_parts(form: FormData, list_fields: tuple[str, ...],
                      file_fields: tuple[str, ...]) -> tuple[dict[str, Any], list[tuple[str, bytes, str | None]]]:
    fields: dict[str, Any] = {}
    files: list[tuple[str, bytes, str | None]] = []
    count: dict[str, int] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in file_fields:
                raise ApiError(422, f"{key}: unexpected file; upload images as {' or '.join(file_fields) or 'JSON'}")
            count[key] = count.get(key, -1) + 1
            files.append((f"{key}[{count[key]}]", await value.read(), value.filename))
        elif key in list_fields:
            fields.setdefault(key, []).append(value)
        elif key in file_fields:
            raise ApiError(422, f"{key}: send the image as a file upload in multipart forms")
        else:
            fields[key] = value  # pydantic coerces "5" to 5 and rejects unknown keys
    return fields, files


def _embed_records(body: EmbedRequest, files: list[tuple[str, bytes, str | None]],
                   max_pixels: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """What `/embed` embeds, in response order (texts, images, products), with a description of each."""
    count = len(body.texts) + len(body.images) + len(files) + len(body.products)
    if count == 0:
        raise ApiError(422, "nothing to embed: give texts, images and/or products")
    if count > MAX_INPUTS:
        raise ApiError(422, f"too many inputs: {count}, the limit is {MAX_INPUTS} per request")
    records: list[Any] = []
    inputs: list[dict[str, Any]] = []
    for i, text in enumerate(body.texts):
        if not text.strip():
            raise ApiError(422, f"texts[{i}]: empty text")
        records.append(text)
        inputs.append({"kind": "text", "index": i})
    images = [decode_image(f"images[{i}]", decode_base64(f"images[{i}]", value), max_pixels=max_pixels)
              for i, value in enumerate(body.images)]
    images += [decode_image(field, data, max_pixels=max_pixels, filename=name) for field, data, name in files]
    for i, image in enumerate(images):
        records.append(image)
        inputs.append({"kind": "image", "index": i})
    for i, product in enumerate(body.products):
        photos = [decode_image(f"products[{i}].images[{j}]", decode_base64(f"products[{i}].images[{j}]", value),
                               max_pixels=max_pixels) for j, value in enumerate(product.images)]
        # As the catalogue's rows are embedded (title + description, product instruction): comparable to the index.
        text = product_text(Product(id=f"request-{i}", title=product.title, description=product.description))
        records.append(EmbedItem(text=text, images=photos, kind="product"))
        inputs.append({"kind": "product", "index": i})
    return records, inputs


def _search_record(body: SearchRequest, files: list[tuple[str, bytes, str | None]], max_pixels: int) -> dict[str, Any]:
    """The query record of a text and/or image search."""
    if len(files) > 1:
        raise ApiError(422, f"image: one query image per search, got {len(files)}")
    record: dict[str, Any] = {}
    if body.text and body.text.strip():
        record["text"] = body.text
    if body.image:
        record["image"] = decode_image("image", decode_base64("image", body.image), max_pixels=max_pixels)
    elif files:
        field, data, name = files[0]
        record["image"] = decode_image("image", data, max_pixels=max_pixels, filename=name)
    if not record:
        raise ApiError(422, "search needs a query: give text and/or image (or product_id for more like this)")
    return record


# ---------------------------------------------------------------------------------------------------- plumbing
def _key_check(api_key: str | None) -> Any:
    expected = api_key.encode() if api_key else None

    def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("x-api-key")
        if given is None and request.headers.get("authorization", "").lower().startswith("bearer "):
            given = request.headers["authorization"][7:].strip()
        if given is None:
            raise ApiError(401, "missing API key: send it in the X-API-Key header (or Authorization: Bearer <key>)")
        if not hmac.compare_digest(given.encode(), expected):  # constant time: no guessing it byte by byte
            raise ApiError(401, "wrong API key")

    return check


def _page_route(name: str, media_type: str) -> Any:
    def page() -> Response:
        return Response((STATIC / name).read_bytes(), media_type=media_type, headers={"Cache-Control": "no-cache"})

    return page


def _validation_message(exc: ValidationError | RequestValidationError) -> str:
    """Pydantic's errors as one line: `k: Input should be less than or equal to 100; ...`."""
    parts = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
        where = ".".join(loc) if loc else "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(MoonError)
    async def moon_error(_: Request, exc: MoonError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)
