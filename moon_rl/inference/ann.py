"""Approximate-nearest-neighbour indexes for `moon-rl embed` / `moon-rl search` (FAISS).

`embed.index` names the index: a preset, or any FAISS `index_factory` string (inner-product metric: the vectors are
L2-normalised, so scores are cosines):

| preset  | factory string            | for                                                                      |
|---------|---------------------------|--------------------------------------------------------------------------|
| `flat`  | `Flat`                    | exact search; the default, and right up to a few hundred thousand products |
| `hnsw`  | `HNSW32,Flat`             | graph search: fast and accurate, memory of the full vectors plus the graph |
| `ivf`   | `IVF{nlist},Flat`         | inverted lists over k-means cells; `nprobe` cells are searched            |
| `ivfpq` | `IVF{nlist},PQ{m}`        | the same with product-quantised vectors (`m` bytes each): millions in little memory |

`nlist` follows the catalogue size (about 4 sqrt(N), at least 39 training vectors per cell), `m` the dimension (one
byte per 4 values, dividing it). Indexes that need training (IVF, PQ) train on a seeded sample of the vectors. The
search-time knobs (`nprobe` for IVF, `efSearch` for HNSW) are stored in the manifest with a default per preset, and
`moon-rl search` can override them. After building, `measure_recall` searches a sample of the catalogue's own vectors
with the index and exactly, and the manifest records Recall@10 against exact search and the speed-up, so that a
preset's cost in quality is written beside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moon_rl.errors import MoonError

__all__ = ["PRESETS", "IndexSpec", "apply_params", "build_index", "measure_recall", "recall_at_k", "resolve_index"]

PRESETS = ("flat", "hnsw", "ivf", "ivfpq")
#: Vectors per k-means cell the training sample should hold at least (FAISS warns below 39).
_PER_CELL = 39


@dataclass
class IndexSpec:
    """A resolved index: the FAISS factory string and its search-time parameters."""

    name: str  # the preset, or "custom"
    factory: str
    params: dict[str, int] = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        return self.factory.startswith(("IVF", "OPQ", "PQ")) or ",PQ" in self.factory


def _nlist(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // _PER_CELL))


def _pq_bytes(dim: int) -> int:
    """About one byte per 4 values, a divisor of `dim` (FAISS needs the sub-vectors to split it evenly)."""
    target = max(1, dim // 4)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def resolve_index(spec: str, n: int, dim: int, params: dict[str, int] | None = None) -> IndexSpec:
    """The factory string and search parameters of `spec` (a preset or a factory string) for `n` vectors of `dim`."""
    params = dict(params or {})
    unknown = set(params) - {"nprobe", "efSearch"}
    if unknown:
        raise MoonError(f"embed.index_params: unknown {sorted(unknown)}; known: nprobe (IVF), efSearch (HNSW)")
    if spec == "flat":
        return IndexSpec("flat", "Flat")
    if spec == "hnsw":
        return IndexSpec("hnsw", "HNSW32,Flat", {"efSearch": 128, **params})
    if spec in ("ivf", "ivfpq"):
        nlist = _nlist(n)
        factory = f"IVF{nlist},Flat" if spec == "ivf" else f"IVF{nlist},PQ{_pq_bytes(dim)}"
        # Measured on a million vectors (bench/ann.py): IVF-Flat kept Recall@10 1.000 down to nlist / 128 cells
        # searched, at 14x exact search's speed; nlist / 64 (at least 8) leaves room for less clustered catalogues.
        # Quantised vectors lose ranking precision: twice as many cells for them.
        nprobe = min(nlist, max(8, nlist // 64)) if spec == "ivf" else min(nlist, max(16, nlist // 32))
        return IndexSpec(spec, factory, {"nprobe": nprobe, **params})
    return IndexSpec("custom", spec, params)


def apply_params(index: Any, params: dict[str, int]) -> None:
    """Set search-time parameters (`nprobe`, `efSearch`) on a FAISS index (through its IVF / HNSW part)."""
    import faiss

    if not params:
        return
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, int(value))
        except RuntimeError as exc:
            raise MoonError(f"index parameter {name}={value} does not apply to this index ({exc})".splitlines()[0]) \
                from None


def build_index(vectors: np.ndarray, spec: IndexSpec, *, seed: int = 0, max_train: int = 200_000) -> Any:
    """A FAISS index of `vectors` (L2-normalised float32, (N, D)) as `spec` says, trained on a seeded sample."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    try:
        index = faiss.index_factory(vectors.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise MoonError(f"embed.index: {spec.factory!r} is not a preset ({', '.join(PRESETS)}) nor a FAISS "
                        f"index_factory string FAISS accepts for {vectors.shape[1]}-d vectors "
                        f"({str(exc).strip().splitlines()[-1]})") from None
    if not index.is_trained:
        rows = np.random.default_rng(seed).permutation(len(vectors))[:max_train]
        index.train(vectors[np.sort(rows)])
    index.add(vectors)
    apply_params(index, spec.params)
    return index


def recall_at_k(truth: np.ndarray, found: np.ndarray) -> float:
    """Share of the exact top-k rows (`truth`, (Q, k)) that the index also returned (`found`, (Q, k))."""
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True))
    return hits / truth.size if truth.size else 1.0


def measure_recall(index: Any, vectors: np.ndarray, *, k: int = 10, n_queries: int = 1000, seed: int = 0
                   ) -> dict[str, Any]:
    """Recall@k of `index` against exact search, with a seeded sample of the indexed vectors as queries, and the
    queries per second of both (one thread pool, whole batch)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.random.default_rng(seed).permutation(len(vectors))[:n_queries]
    queries = vectors[np.sort(rows)]
    k = min(k, len(vectors))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    start = time.perf_counter()
    _, truth = exact.search(queries, k)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    _, found = index.search(queries, k)
    index_s = time.perf_counter() - start
    return {f"recall@{k}": recall_at_k(truth, found), "queries": len(queries),
            "qps": round(len(queries) / max(index_s, 1e-9), 1), "exact_qps": round(len(queries) / max(exact_s, 1e-9), 1)}
