"""ANN indexes: presets sized to the catalogue, training on a sample, search parameters stored and overridable, recall
against exact search measured and written beside the index."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from moon_rl.errors import MoonError
from moon_rl.inference.ann import apply_params, build_index, measure_recall, resolve_index


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 centres: neighbours exist, as in a catalogue of look-alike families."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.4 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_presets_follow_the_catalogue_size_and_dimension():
    assert resolve_index("flat", 1000, 256).factory == "Flat"
    hnsw = resolve_index("hnsw", 10**6, 256, {"efSearch": 64})
    assert (hnsw.factory, hnsw.params) == ("HNSW32,Flat", {"efSearch": 64})  # the user's value over the default
    big = resolve_index("ivfpq", 10**6, 256)
    assert big.factory == "IVF4000,PQ64" and big.params == {"nprobe": 125} and big.trains
    assert resolve_index("ivf", 10**6, 256).params == {"nprobe": 62}
    small = resolve_index("ivf", 2000, 96)
    assert small.factory == "IVF51,Flat" and small.params == {"nprobe": 8}  # 2000 / 39 cells: >= 39 vectors each
    assert resolve_index("ivfpq", 5000, 100).factory.endswith("PQ25")  # 25 divides 100
    assert resolve_index("IVF16,SQ8", 5000, 64).name == "custom"
    with pytest.raises(MoonError, match="unknown \\['ef'\\]"):
        resolve_index("hnsw", 10, 8, {"ef": 3})


def test_indexes_reach_exact_results_when_searched_exhaustively_and_measure_it():
    vectors = clustered(3000)
    ivf = build_index(vectors, resolve_index("ivf", len(vectors), 32, {"nprobe": 1}))
    narrow = measure_recall(ivf, vectors, n_queries=300)
    apply_params(ivf, {"nprobe": ivf.nlist})  # every cell: exact
    wide = measure_recall(ivf, vectors, n_queries=300)
    assert wide["recall@10"] == pytest.approx(1.0, abs=1e-3) and narrow["recall@10"] < wide["recall@10"]
    hnsw = build_index(vectors, resolve_index("hnsw", len(vectors), 32))
    assert measure_recall(hnsw, vectors, n_queries=300)["recall@10"] > 0.95
    pq = build_index(vectors, resolve_index("ivfpq", len(vectors), 32))
    assert 0.3 < measure_recall(pq, vectors, n_queries=300)["recall@10"] < 1.0  # lossy codes: measured, not assumed
    with pytest.raises(MoonError, match="'NotAnIndex' is not a preset"):
        build_index(vectors, resolve_index("NotAnIndex", len(vectors), 32))
    with pytest.raises(MoonError, match="nprobe=4 does not apply"):
        apply_params(faiss.IndexFlatIP(32), {"nprobe": 4})


def test_embed_writes_the_preset_and_its_recall_and_search_uses_the_stored_parameters(tmp_path, synthetic_catalogue):
    from types import SimpleNamespace

    from moon_rl.data.catalogue import load_catalogue
    from moon_rl.inference.pipeline import embed_catalogue
    from moon_rl.inference.search import EmbeddingIndex

    catalogue = load_catalogue(synthetic_catalogue(48, 3, 56))
    table = {pid: v for pid, v in zip(catalogue.products, clustered(len(catalogue.products), 16), strict=True)}

    class Planted:  # vectors by product id: no model needed to test the index plumbing
        heads = SimpleNamespace(config=SimpleNamespace(embed_dim=16, matryoshka_dims=[]))
        meta: dict = {}
        max_images = 1

        def preprocess(self, items):
            return [item.id for item in items]

        def embed_prompts(self, ids, mode="direct", items=None, dim=None):
            return np.stack([table[pid] for pid in ids])

    embed_catalogue(Planted(), catalogue, tmp_path / "hnsw", index="hnsw", index_params={"efSearch": 40},
                    show_progress=False)
    manifest = json.loads((tmp_path / "hnsw" / "embed.json").read_text())
    assert manifest["index"]["factory"] == "HNSW32,Flat" and manifest["index"]["params"] == {"efSearch": 40}
    assert manifest["index"]["measured"]["recall@10"] > 0.9 and manifest["index"]["measured"]["queries"] == len(table)
    loaded = EmbeddingIndex.load(tmp_path / "hnsw")
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == 40  # the stored parameter is in force
    assert faiss.downcast_index(EmbeddingIndex.load(tmp_path / "hnsw", {"efSearch": 7}).index).hnsw.efSearch == 7
    own = loaded.search_vectors(np.stack([table[pid] for pid in list(table)[:5]]), k=1)
    assert [hits[0][0] for hits in own] == list(table)[:5]
    embed_catalogue(Planted(), catalogue, tmp_path / "flat", show_progress=False)
    assert json.loads((tmp_path / "flat" / "embed.json").read_text())["index"] == {
        "name": "flat", "factory": "Flat", "params": {}}  # exact: nothing to measure
