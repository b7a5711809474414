"""Catalogue embedding pipeline and nearest-product search: files, vectors, bad rows, model round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pyarrow.parquet as pq
import pytest

from moon_rl.data.catalogue import Catalogue, load_catalogue
from moon_rl.data.sources import load_image
from moon_rl.data.synthetic import SyntheticConfig, synthesize
from moon_rl.errors import DataError, MoonError
from moon_rl.inference.pipeline import embed_catalogue, run_embed
from moon_rl.inference.search import EmbeddingIndex, format_results, search
from moon_rl.modeling.embedder import MoonEmbedder, heads_config_for
from moon_rl.modeling.heads import MoonHeads
from moon_rl.modeling.loading import load_backbone

N_PRODUCTS = 40
N_LISTED = 48  # the 40 products and a duplicate listing of each of the 8 test products (product->product anchors)
OUTPUT_FILES = {"embeddings.parquet", "index.faiss", "ids.json", "embed.json"}


@pytest.fixture(scope="module")
def embedder() -> MoonEmbedder:
    spec = NS(name_or_path="builtin:tiny-vl", builtin_size="tiny", dtype="float32", trust_remote_code=False,
              attn_implementation="sdpa", quantization=None, lora=None, image_min_pixels=56 * 56,
              image_max_pixels=112 * 112,
              heads=NS(embed_dim=64, fusion=NS(enabled=True, num_heads=4, chain=True),
                       fire=NS(enabled=True, layers=None, rank=8), matryoshka_dims=None))
    model, processor = load_backbone(spec)
    return MoonEmbedder(model, processor, MoonHeads(heads_config_for(model, spec.heads)),
                        meta={"base_model": "builtin:tiny-vl", "builtin_size": "tiny"})


@pytest.fixture(scope="module")
def catalogue_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("catalogue") / "synthetic"
    synthesize(out, SyntheticConfig(n_products=N_PRODUCTS, seed=0, image_size=112))
    return out


@pytest.fixture(scope="module")
def catalogue(catalogue_dir) -> Catalogue:
    return load_catalogue(catalogue_dir)


@pytest.fixture(scope="module")
def embedded(embedder, catalogue, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "index"
    embed_catalogue(embedder, catalogue, out, batch_size=8, show_progress=False)
    return out


def _stored(index_dir: Path) -> tuple[list[str], np.ndarray]:
    """The ids and vectors `embeddings.parquet` holds, read directly (not through the search code under test)."""
    table = pq.read_table(index_dir / "embeddings.parquet")
    assert set(table.column_names) == {"id", "vector"}
    return table.column("id").to_pylist(), np.asarray(table.column("vector").to_pylist(), dtype=np.float32)


def test_parquet_matches_encode(embedded, embedder, catalogue):
    ids, vectors = _stored(embedded)
    assert sorted(ids) == sorted(catalogue.products) and len(ids) == N_LISTED
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    products = [catalogue.products[pid] for pid in ids]
    expected = embedder.encode(products, mode="direct", batch_size=8, load_image=catalogue.image)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert json.loads((embedded / "ids.json").read_text()) == ids
    manifest = json.loads((embedded / "embed.json").read_text())
    assert manifest["count"] == N_LISTED and manifest["dim"] == 64 and manifest["mode"] == "direct"
    assert manifest["skipped"] == []


def test_reason_mode_in_shards_with_a_worker_matches_encode(embedder, catalogue, tmp_path):
    """Reason mode through the sharded loop (6 shards of 8, images and prompts prepared by a DataLoader worker):
    each product's vector is `encode`'s, generation included; a batch or shard paired with the wrong ids fails."""
    embedder.max_new_tokens, saved = 6, embedder.max_new_tokens  # the untrained model never closes its chain
    try:
        summary = embed_catalogue(embedder, catalogue, tmp_path / "reason", mode="reason", batch_size=8, shard_size=8,
                                  num_workers=1, show_progress=False)
        table = pq.read_table(tmp_path / "reason" / "embeddings.parquet")
        ids = table.column("id").to_pylist()
        vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
        products = [catalogue.products[pid] for pid in ids]
        expected = embedder.encode(products, mode="reason", batch_size=8, load_image=catalogue.image)
    finally:
        embedder.max_new_tokens = saved
    assert summary.shards == 6 and summary.mode == "reason" and sorted(ids) == sorted(catalogue.products)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    direct = embedder.encode(products[:4], mode="direct", batch_size=8, load_image=catalogue.image)
    assert np.abs(vectors[:4] - direct).max() > 1e-3  # the chains were written and read


def test_index_search_ranks_own_vector_first(embedded):
    index = EmbeddingIndex.load(embedded)
    table = pq.read_table(embedded / "embeddings.parquet")
    ids = table.column("id").to_pylist()
    vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
    rows = [0, 7, len(ids) - 1]
    for row, hits in zip(rows, index.search_vectors(vectors[rows], k=5), strict=True):
        assert len(hits) == 5
        scores = [score for _, score in hits]
        assert scores == sorted(scores, reverse=True)
        assert hits[0][0] == ids[row] and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    assert len(index.search_vectors(vectors[:1], k=1000)[0]) == len(ids)  # k is capped at the catalogue size


def test_search_text_query(embedded, embedder):
    results = search(embedded, text="red striped cotton shirt", image=None, k=3, embedder=embedder)
    assert len(results) == 3 and [s for _, s in results] == sorted((s for _, s in results), reverse=True)
    lines = format_results(results).splitlines()
    assert len(lines) == 4 and lines[1].split()[0] == "1" and lines[1].split()[1] == results[0][0]
    assert f"{results[0][1]:.4f}" in lines[1]


def test_embed_at_a_matryoshka_size_and_search_it(tmp_path, embedded, embedder, catalogue, caplog):
    """`embed --dim 16`: the index, parquet and manifest hold the renormalised 16-value prefixes; search cuts the
    query to the index's size, so it finds what a search over truncated full vectors finds."""
    out = tmp_path / "index16"
    with caplog.at_level("WARNING"):
        embed_catalogue(embedder, catalogue, out, batch_size=8, show_progress=False, dim=16)
    assert "was trained for [64]" in caplog.text  # this model has no Matryoshka sizes: allowed, with a warning
    full = np.asarray(pq.read_table(embedded / "embeddings.parquet").column("vector").to_pylist(), dtype=np.float32)
    cut = np.asarray(pq.read_table(out / "embeddings.parquet").column("vector").to_pylist(), dtype=np.float32)
    prefix = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, prefix, atol=1e-5)
    assert json.loads((out / "embed.json").read_text())["dim"] == 16 and EmbeddingIndex.load(out).dim == 16
    query = embedder.encode([{"text": "red striped cotton shirt"}], dim=16)
    hits = search(out, text="red striped cotton shirt", image=None, k=3, embedder=embedder)
    assert hits == EmbeddingIndex.load(out).search_vectors(query, k=3)[0]
    with pytest.raises(MoonError, match="between 1 and the model's embedding size 64"):
        embed_catalogue(embedder, catalogue, tmp_path / "too-big", show_progress=False, dim=65)


def test_search_errors(tmp_path, embedded, embedder):
    with pytest.raises(MoonError, match="does not exist"):
        search(tmp_path / "nope", text="shirt", image=None, embedder=embedder)
    broken = tmp_path / "broken"
    shutil.copytree(embedded, broken)
    (broken / "ids.json").unlink()
    with pytest.raises(MoonError, match=r"broken.*missing ids\.json"):
        search(broken, text="shirt", image=None, embedder=embedder)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(embedded, corrupt)
    (corrupt / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(MoonError, match=r"index\.faiss.*not a readable FAISS index"):
        search(corrupt, text="shirt", image=None, embedder=embedder)
    with pytest.raises(MoonError, match="needs a query"):
        search(embedded, text=None, image=None, embedder=embedder)


@pytest.fixture
def corrupt_catalogue(tmp_path, catalogue_dir) -> tuple[Path, str]:
    folder = tmp_path / "cat"
    shutil.copytree(catalogue_dir, folder)
    catalogue = load_catalogue(folder)
    bad = list(catalogue.products.values())[5]
    (folder / bad.images[0]).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return folder, bad.id


def test_corrupt_image_stops_and_writes_nothing(tmp_path, embedder, corrupt_catalogue):
    folder, bad_id = corrupt_catalogue
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"product '{bad_id}'.*(corrupt|not an image)"):
        embed_catalogue(embedder, load_catalogue(folder), out, batch_size=16, show_progress=False)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def test_corrupt_image_skipped(tmp_path, embedder, corrupt_catalogue):
    folder, bad_id = corrupt_catalogue
    summary = embed_catalogue(embedder, load_catalogue(folder), tmp_path / "out", batch_size=16, skip_bad=True,
                              show_progress=False)
    assert summary.count == N_LISTED - 1 and [pid for pid, _ in summary.skipped] == [bad_id]
    assert f"skipped 1 bad products: '{bad_id}'" in summary.summary()
    assert {p.name for p in summary.out.iterdir()} >= OUTPUT_FILES
    ids = json.loads((summary.out / "ids.json").read_text())
    assert bad_id not in ids and len(ids) == N_LISTED - 1
    assert json.loads((summary.out / "embed.json").read_text())["skipped"][0]["id"] == bad_id


def test_run_embed_untrained_recipe_model_round_trip(tmp_path, catalogue_dir):
    """run_embed with no model folder; search rebuilds the same untrained model from the saved recipe."""
    from moon_rl.recipe import load_recipe

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model:\n  lora: null\n  heads:\n    embed_dim: 32\nembed:\n  batch_size: 16\n")
    recipe = load_recipe(recipe_file)
    out = tmp_path / "embed"
    summary = run_embed(recipe, model_dir=None, catalogue=str(catalogue_dir), out=out, mode=None, skip_bad=False,
                        show_progress=False)
    assert summary.count == N_LISTED and summary.dim == 32 and (out / "recipe.yaml").is_file()
    assert json.loads((out / "embed.json").read_text())["model"]["source"] == "recipe"
    index = EmbeddingIndex.load(out)
    rebuilt = index.load_embedder()
    catalogue = load_catalogue(catalogue_dir)
    probe = [catalogue.products[pid] for pid in index.ids[:3]]
    vectors = rebuilt.encode(probe, load_image=catalogue.image)
    for product, hits in zip(probe, index.search_vectors(vectors, k=3), strict=True):
        assert hits[0][0] == product.id and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    assert len(search(out, text=probe[0].title, image=None, k=4)) == 4


def test_model_dir_recorded_and_used(tmp_path, embedder, catalogue_dir):
    model_dir = embedder.save(tmp_path / "model")
    catalogue = load_catalogue(catalogue_dir)
    out = tmp_path / "embed"
    embed_catalogue(MoonEmbedder.load(model_dir), catalogue, out, batch_size=16, show_progress=False,
                    model_dir=model_dir)
    assert json.loads((out / "embed.json").read_text())["model"]["dir"] == str(model_dir.resolve())
    image = catalogue_dir / next(iter(catalogue.products.values())).images[0]
    results = search(out, text=None, image=image, k=2)
    # The recorded model embeds the query: the same top 2, with the same cosines, as brute force over the stored vectors
    # with the query embedded by that model.
    ids, vectors = _stored(out)
    query = embedder.encode([{"image": load_image(str(image), Path.cwd())}], mode="direct", batch_size=1)[0]
    scores = vectors @ query
    best = np.argsort(-scores)[:2]
    assert [pid for pid, _ in results] == [ids[int(i)] for i in best]
    np.testing.assert_allclose([score for _, score in results], scores[best], atol=1e-5)
