"""`moon-rl serve` through an in-process client: every endpoint, each refusal (status and message), batching.

One tiny model and a 24-product index serve all tests (built once per module, the way `moon-rl embed --model`
writes it); the app loads the model from the folder the index records, as the CLI does.
"""

from __future__ import annotations

import base64
import re
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="moon-rl serve needs the serve extra (fastapi, uvicorn, python-multipart)")
from fastapi.testclient import TestClient  # noqa: E402

from moon_rl.data.sources import resolve_image_path  # noqa: E402
from moon_rl.inference.search import EmbeddingIndex, search  # noqa: E402
from moon_rl.serve import create_app  # noqa: E402
from tests.helpers import served_index  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_catalogue):
    return served_index(tmp_path_factory.mktemp("serve"), synthetic_catalogue(24, 0, 56))


@pytest.fixture(scope="module")
def client(served):
    index_dir, _, _ = served
    with TestClient(create_app(index_dir)) as client:  # the model the index records, loaded as the CLI loads it
        yield client


def image_file(catalogue, product_id: str, number: int = 0) -> Path:
    return resolve_image_path(catalogue.products[product_id].images[number], catalogue.base_dir)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels in a few dozen bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def refused(response, status: int, pattern: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert re.search(pattern, response.json()["detail"]), response.json()["detail"]


# ---------------------------------------------------------------------------------------------------- endpoints
def test_health_and_the_page(client, served):
    index_dir, _, _ = served
    health = client.get("/health").json()
    index = EmbeddingIndex.load(index_dir)
    assert health["status"] == "ok" and health["products"] == len(index.ids) and health["dim"] == 32
    assert health["mode"] == "direct" and health["auth"] is False and health["batching"]["enabled"] is True
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert all(f'id="{name}"' in page.text for name in ("q", "drop", "file", "results", "chain"))
    assert "moon-rl search" in client.get("/static/app.js").text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


def test_an_index_of_matryoshka_prefixes_is_served_at_its_size(tmp_path, synthetic_catalogue):
    """An index written by `embed --dim 16` from a 32-d model: queries are cut to 16 values, as `moon-rl search` cuts
    them, and /health lists the sizes the model trained."""
    index_dir, embedder, _ = served_index(tmp_path, synthetic_catalogue(24, 0, 56), dim=16)
    with TestClient(create_app(index_dir)) as small:
        health = small.get("/health").json()
        assert health["dim"] == 16 and health["trained_dims"] == [32, 16]
        got = small.post("/search", json={"text": "red striped cotton shirt", "k": 3}).json()
        want = search(index_dir, text="red striped cotton shirt", image=None, k=3, embedder=embedder)
        assert [(hit["id"], pytest.approx(hit["score"], abs=1e-5)) for hit in got["results"]] == want
        vectors = np.asarray(small.post("/embed", json={"texts": ["a blue wool hat"]}).json()["vectors"])
        np.testing.assert_allclose(vectors, embedder.encode(["a blue wool hat"], dim=16), atol=1e-5)


def test_embed_texts_match_the_model(client, served):
    _, embedder, _ = served
    texts = ["red striped cotton shirt", "a blue wool hat"]
    body = client.post("/embed", json={"texts": texts}).json()
    vectors = np.asarray(body["vectors"], dtype=np.float32)
    np.testing.assert_allclose(vectors, embedder.encode(texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert body["dim"] == 32 and body["count"] == 2 and body["inputs"] == [{"kind": "text", "index": 0},
                                                                          {"kind": "text", "index": 1}]


def test_embed_a_product_gives_its_index_row(client, served):
    """A catalogue product sent as title + description + photos embeds to the vector the index holds for it."""
    index_dir, _, catalogue = served
    index = EmbeddingIndex.load(index_dir)
    for pid in index.ids[:3]:
        product = catalogue.products[pid]
        photos = [b64(image_file(catalogue, pid, n)) for n in range(len(product.images))]
        body = client.post("/embed", json={"products": [{"title": product.title, "description": product.description,
                                                         "images": photos}]}).json()
        np.testing.assert_allclose(body["vectors"][0], index.vector(pid), atol=1e-4)


def test_embed_multipart_images_and_dim(client, served):
    _, embedder, catalogue = served
    files = [image_file(catalogue, pid) for pid in list(catalogue.products)[:2]]
    full = client.post("/embed", data={"texts": ["shirt", "hat"]},
                       files=[("images", (f.name, f.read_bytes(), "image/png")) for f in files]).json()
    assert [i["kind"] for i in full["inputs"]] == ["text", "text", "image", "image"]
    images = [Image.open(f).convert("RGB") for f in files]
    np.testing.assert_allclose(full["vectors"][2:], embedder.encode(images), atol=1e-5)
    short = client.post("/embed", data={"texts": ["shirt", "hat"], "dim": "8"},
                        files=[("images", (f.name, f.read_bytes(), "image/png")) for f in files]).json()
    head = np.asarray(full["vectors"])[:, :8]
    assert short["dim"] == 8
    np.testing.assert_allclose(short["vectors"], head / np.linalg.norm(head, axis=1, keepdims=True), atol=1e-5)


def test_embed_reason_mode_returns_the_chains(client):
    body = client.post("/embed", json={"texts": ["red shirt", "blue hat"], "mode": "reason"}).json()
    assert body["mode"] == "reason" and len(body["chains"]) == 2 and all(isinstance(c, str) for c in body["chains"])
    assert "<think>" not in "".join(body["chains"])


def test_search_text_matches_moon_rl_search(client, served):
    index_dir, embedder, catalogue = served
    title = catalogue.products[EmbeddingIndex.load(index_dir).ids[5]].title
    body = client.post("/search", json={"text": title, "k": 5}).json()
    expected = search(index_dir, text=title, image=None, k=5, embedder=embedder)
    assert [hit["id"] for hit in body["results"]] == [pid for pid, _ in expected]
    assert [hit["score"] for hit in body["results"]] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert [hit["rank"] for hit in body["results"]] == [1, 2, 3, 4, 5]
    for hit in body["results"]:
        assert hit["title"] == catalogue.products[hit["id"]].title
        assert hit["image_url"] == f"/products/{hit['id']}/images/0" and hit["url"] == f"/products/{hit['id']}"
    assert body["mode"] == "direct" and body["chain"] is None and body["query"]["text"] == title


def test_search_image_upload_matches_moon_rl_search(client, served):
    index_dir, embedder, catalogue = served
    photo = image_file(catalogue, next(iter(catalogue.products)))
    body = client.post("/search", data={"k": "4"}, files={"image": (photo.name, photo.read_bytes(), "image/png")})
    expected = search(index_dir, text=None, image=photo, k=4, embedder=embedder)
    assert [(h["id"], pytest.approx(h["score"], abs=1e-5)) for h in body.json()["results"]] == expected
    as_json = client.post("/search", json={"image": "data:image/png;base64," + b64(photo), "k": 4}).json()
    assert [h["id"] for h in as_json["results"]] == [pid for pid, _ in expected]


def test_search_in_reason_mode_shows_the_chain(client):
    body = client.post("/search", json={"text": "red striped cotton shirt", "k": 3, "mode": "reason"}).json()
    assert body["mode"] == "reason" and isinstance(body["chain"], str) and len(body["results"]) == 3


def test_more_like_this_ranks_the_product_first(client, served):
    index_dir, _, _ = served
    for pid in EmbeddingIndex.load(index_dir).ids[:4]:
        results = client.post("/search", json={"product_id": pid, "k": 3}).json()["results"]
        assert results[0]["id"] == pid and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert results[1]["score"] <= results[0]["score"]


def test_products_and_their_images(client, served):
    _, _, catalogue = served
    pid = next(iter(catalogue.products))
    product = client.get(f"/products/{pid}").json()
    assert product["title"] == catalogue.products[pid].title and product["indexed"] is True
    assert product["images"] == [f"/products/{pid}/images/{n}" for n in range(len(catalogue.products[pid].images))]
    image = client.get(product["images"][0])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == image_file(catalogue, pid).read_bytes()


# ---------------------------------------------------------------------------------------------------- refusals
def test_non_image_uploads_are_refused(client, served):
    _, _, catalogue = served
    refused(client.post("/embed", files={"images": ("notes.txt", b"just some text", "text/plain")}), 400,
            r"^images\[0\] \('notes\.txt'\): image bytes \(14 bytes\) is not an image \(unrecognised format\)")
    photo = image_file(catalogue, next(iter(catalogue.products)))
    refused(client.post("/embed", files=[("images", ("a.png", photo.read_bytes(), "image/png")),
                                         ("images", ("b.png", photo.read_bytes()[:200], "image/png"))]), 400,
            r"^images\[1\] \('b\.png'\): image bytes \(200 bytes\) is (truncated or corrupt|corrupt)")
    refused(client.post("/search", json={"image": base64.b64encode(b"GIF89a garbage").decode()}), 400,
            r"^image: image bytes .* (is not an image|is corrupt|truncated)")
    refused(client.post("/embed", json={"images": ["not base64!"]}), 422, r"^images\[0\]: not valid base64")
    refused(client.post("/search", files={"image": ("empty.png", b"", "image/png")}), 400, r"empty upload")


def test_decompression_bombs_are_refused(client):
    refused(client.post("/search", files={"image": ("bomb.png", png_header(9000, 9000), "image/png")}), 400,
            r"^image \('bomb\.png'\): .*9000x9000 = 81,000,000 pixels, over the limit .*decompression-bomb guard")
    huge = base64.b64encode(png_header(60000, 60000)).decode()
    refused(client.post("/embed", json={"images": [huge]}), 400, r"^images\[0\]: .*decompression-bomb guard")


def test_oversize_bodies_are_refused(served):
    index_dir, embedder, _ = served
    with TestClient(create_app(index_dir, embedder=embedder, max_body_bytes=4096)) as small:
        refused(small.post("/embed", json={"texts": ["x" * 5000]}), 413, r"request body is 5,0\d\d bytes; the limit "
                r"is 4,096 bytes")
        # No Content-Length (chunked): counted as it streams in.
        refused(small.post("/embed", content=iter([b'{"texts": ["', b"x" * 5000, b'"]}']),
                           headers={"content-type": "application/json"}), 413, r"^request body is over the limit of "
                r"4,096 bytes")
        assert small.post("/embed", json={"texts": ["fits"]}).status_code == 200


def test_unknown_ids_and_images_are_404(client, served):
    _, _, catalogue = served
    pid = next(iter(catalogue.products))
    refused(client.get("/products/nope"), 404, r"^unknown product id 'nope'$")
    refused(client.get("/products/nope/images/0"), 404, r"unknown product id 'nope'")
    refused(client.get(f"/products/{pid}/images/7"), 404, rf"product '{pid}' has \d image\(s\); there is no image 7")
    refused(client.post("/search", json={"product_id": "nope"}), 404, r"unknown product id 'nope'.*not in the index")
    refused(client.get(f"/products/{pid}/images/first"), 422, r"^path\.number: .*integer")


def test_k_dim_and_shape_errors(client):
    refused(client.post("/search", json={"text": "shirt", "k": 0}), 422, r"^k: Input should be greater than or "
            r"equal to 1$")
    refused(client.post("/search", data={"text": "shirt", "k": "101"}), 422, r"^k: .*less than or equal to 100")
    refused(client.post("/embed", json={"texts": ["shirt"], "dim": 0}), 422, r"^dim: must be between 1 and the "
            r"embedding size 32, got 0$")
    refused(client.post("/embed", json={"texts": ["shirt"], "dim": 33}), 422, r"got 33$")
    refused(client.post("/embed", json={"texts": ["shirt"], "mode": "think"}), 422, r"^mode: Input should be "
            r"'direct' or 'reason'")
    refused(client.post("/search", json={"k": 3}), 422, r"search needs a query")
    refused(client.post("/embed", json={}), 422, r"nothing to embed")
    refused(client.post("/embed", json={"texts": ["a"] * 65}), 422, r"too many inputs: 65, the limit is 64")
    refused(client.post("/embed", json={"txts": ["shirt"]}), 422, r"^txts: Extra inputs are not permitted")
    refused(client.post("/search", content=b"{not json", headers={"content-type": "application/json"}), 422,
            r"Invalid JSON")
    refused(client.post("/search", content=b"text=shirt", headers={"content-type": "text/plain"}), 415,
            r"application/json or multipart/form-data, not 'text/plain'")
    refused(client.post("/search", json={"product_id": "x", "text": "shirt"}), 422, r"either a product id")


def test_nothing_a_client_sends_reads_a_file(client, served):
    _, _, catalogue = served
    real_image = str(image_file(catalogue, next(iter(catalogue.products))))  # a readable image file, by path
    refused(client.post("/search", json={"image": real_image}), 422, r"^image: not valid base64")
    refused(client.post("/embed", json={"images": ["/etc/passwd"]}), 422, r"not valid base64")
    refused(client.post("/search", data={"image": real_image}), 422, r"send the image as a file upload")
    for path in ("/products/..%2F..%2Fetc%2Fpasswd/images/0", "/products/%2E%2E/images/0"):
        assert client.get(path).status_code == 404
    for path in ("/static/../../cli.py", "/static/%2E%2E/app.py", "/static/app.py", "/app.py"):
        assert client.get(path).status_code == 404, path


def test_api_key(served):
    index_dir, embedder, _ = served
    with TestClient(create_app(index_dir, embedder=embedder, api_key="s3cret")) as locked:
        refused(locked.post("/search", json={"text": "shirt"}), 401, r"^missing API key: send it in the X-API-Key "
                r"header")
        refused(locked.post("/embed", json={"texts": ["shirt"]}, headers={"X-API-Key": "guess"}), 401,
                r"^wrong API key$")
        refused(locked.get("/products/p0000"), 401, r"missing API key")
        assert locked.post("/search", json={"text": "shirt"}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert locked.get("/products/p0000", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert locked.get("/health").json()["auth"] is True and locked.get("/").status_code == 200


# ---------------------------------------------------------------------------------------------------- batching
def _concurrent_embeds(client: TestClient, texts: list[str]) -> list[list[float]]:
    results: dict[int, list[float]] = {}
    barrier = threading.Barrier(len(texts))

    def one(i: int) -> None:
        barrier.wait()
        response = client.post("/embed", json={"texts": [texts[i]]})
        assert response.status_code == 200, response.text
        results[i] = response.json()["vectors"][0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return [results[i] for i in range(len(texts))]


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_are_merged_into_fewer_forwards(served, batching):
    index_dir, embedder, _ = served
    texts = [f"product number {i} in red" for i in range(8)]
    # A generous wait bound: the 8 requests reach the queue within it even on a loaded 2-core machine.
    app = create_app(index_dir, embedder=embedder, batching=batching, max_batch=64, max_wait_ms=300)
    with TestClient(app) as client:
        vectors = _concurrent_embeds(client, texts)
        stats = client.get("/health").json()["batching"]
    np.testing.assert_allclose(vectors, embedder.encode(texts), atol=1e-5)  # each request got its own row back
    assert stats["requests"] == 8 and stats["records"] == 8
    if batching:
        assert stats["forwards"] < 8 and stats["largest_batch"] > 1, stats
    else:
        assert stats["forwards"] == 8 and stats["largest_batch"] == 1, stats


# ---------------------------------------------------------------------------------------------------- the CLI
def test_cli_serve_binds_localhost_by_default(served, monkeypatch, tmp_path):
    import uvicorn
    from typer.testing import CliRunner

    from moon_rl.cli import app as cli_app

    index_dir, _, _ = served
    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    runner = CliRunner()
    result = runner.invoke(cli_app, ["serve", str(index_dir), "--no-batching", "--port", "8123"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    assert f"serving {index_dir} on http://127.0.0.1:8123/" in result.output
    with TestClient(started["app"]) as client:
        health = client.get("/health").json()
        assert health["batching"]["enabled"] is False and health["auth"] is False
    monkeypatch.setenv("MOON_RL_API_KEY", "from-env")
    assert runner.invoke(cli_app, ["serve", str(index_dir)], catch_exceptions=False).exit_code == 0
    with TestClient(started["app"]) as client:
        assert client.get("/health").json()["auth"] is True
    missing = runner.invoke(cli_app, ["serve", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output and "Traceback" not in missing.output
