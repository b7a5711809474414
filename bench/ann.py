"""How much recall do the ANN presets give up, and how much faster are they than exact search? (issue 17)

    python bench/ann.py                          # 1,000,000 vectors, presets hnsw ivf ivfpq; writes bench/RESULTS.md
    python bench/ann.py --n 20000 --quick        # a smoke run into <out>/RESULTS.md

The index holds the synthetic catalogue's real embeddings (a trained model's with `--model DIR`, else the untrained
`tiny-cpu` model's: their structure is a trained model's, families of look-alikes close together) mixed into `--n`
random unit vectors, which play the rest of a large catalogue. Queries are real embeddings with a little noise
(a product looked up by a near-duplicate listing); their true neighbours are found by exact search (`Flat`). Each
preset (`moon_rl.inference.ann`, as `moon-rl embed` builds it) reports build seconds, Recall@10 against exact search,
and queries per second on one batch of queries, side by side with exact search on the same machine, at its stored
search knob (`nprobe` / `efSearch`) and at 1/2, 1/4 and 1/8 of it. The bar: a preset
with Recall@10 >= 0.95 at >= 5x exact search's queries per second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from results_md import machine_description, seeds_and_results, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

ROOT = Path(__file__).resolve().parents[1]
SECTION = "ann"
RECALL_BAR, SPEED_BAR = 0.95, 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--presets", nargs="+", default=["hnsw", "ivf", "ivfpq"])
    parser.add_argument("--model", type=Path, default=None, help="a trained model folder (default: untrained tiny-cpu)")
    parser.add_argument("--dim", type=int, default=None, help="a Matryoshka prefix of the embeddings (default: all)")
    parser.add_argument("--noise", type=float, default=0.05, help="query noise (std per value before renormalising)")
    parser.add_argument("--quick", action="store_true", help="results default to <out>/RESULTS.md")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ann")
    parser.add_argument("--results", type=Path, default=None)
    return seeds_and_results(parser.parse_args(argv))


def real_embeddings(model: Path | None, dim: int | None) -> np.ndarray:
    from moon_rl.data.catalogue import load_catalogue, resolve_catalogue_path
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import load_recipe

    catalogue = load_catalogue(resolve_catalogue_path("builtin:synthetic"))
    embedder = MoonEmbedder.load(model) if model else MoonEmbedder.from_recipe(
        load_recipe(ROOT / "recipes" / "tiny-cpu.yaml")).eval()
    return embedder.encode(list(catalogue.products.values()), load_image=catalogue.image, dim=dim, batch_size=64)


def dataset(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, int]:
    """The index's vectors (real ones scattered among random ones), the queries, and how many are real."""
    real = real_embeddings(args.model, args.dim).astype(np.float32)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.n, real.shape[1]), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    slots = rng.choice(args.n, size=len(real), replace=False)
    vectors[slots] = real
    queries = real[rng.integers(0, len(real), args.queries)] + args.noise * rng.standard_normal(
        (args.queries, real.shape[1]), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return vectors, queries.astype(np.float32), len(real)


def knob_settings(params: dict[str, int]) -> list[dict[str, int]]:
    """The preset's search parameters, then the same knob at 1/2, 1/4 and 1/8 of its value (at least 1)."""
    if not params:
        return [params]
    (name, value), = params.items()
    return [{name: v} for v in dict.fromkeys([value, max(1, value // 2), max(1, value // 4), max(1, value // 8)])]


def timed_search(index, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, rows = index.search(queries, k)
    return rows, len(queries) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    import faiss

    from moon_rl.inference.ann import apply_params, build_index, recall_at_k, resolve_index

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    vectors, queries, n_real = dataset(args)
    dim = vectors.shape[1]
    exact = faiss.IndexFlatIP(dim)
    exact.add(vectors)
    truth, exact_qps = timed_search(exact, queries)
    print(f"exact: {exact_qps:.0f} queries/s", flush=True)
    rows = []
    for preset in args.presets:
        spec = resolve_index(preset, len(vectors), dim)
        start = time.perf_counter()
        index = build_index(vectors, spec)
        built = time.perf_counter() - start
        # The stored search knob, then narrower settings of it on the same index: the recall / speed trade-off.
        for params in knob_settings(spec.params):
            apply_params(index, params)
            found, qps = timed_search(index, queries)
            recall = recall_at_k(truth, found)
            rows.append((preset, spec.factory, params, built, recall, qps))
            print(f"{preset} ({spec.factory}, {params}): built in {built:.0f} s, recall@10 {recall:.3f}, "
                  f"{qps:.0f} queries/s ({qps / exact_qps:.1f}x exact)", flush=True)
    passing = [f"{r[0]} {r[2]}" for r in rows if r[4] >= RECALL_BAR and r[5] >= SPEED_BAR * exact_qps]
    lines = ["## ANN index presets (bench/ann.py)", "",
             f"Command: `python bench/ann.py{'' if args.n == 1_000_000 else f' --n {args.n}'}"
             f"{'' if args.model is None else f' --model {args.model}'}{'' if args.dim is None else f' --dim {args.dim}'}`  ",
             f"Machine: {machine_description()}, faiss {faiss.__version__}  ",
             f"{len(vectors):,} vectors of {dim} values: {n_real} real embeddings of the synthetic catalogue "
             f"({'model ' + str(args.model) if args.model else 'untrained tiny-cpu model'}) among random unit vectors; "
             f"{len(queries)} queries (real embeddings + noise {args.noise}), one batch, k = 10.", "",
             "| index | factory | search params | build s | Recall@10 vs exact | queries/s | x exact |",
             "|---|---|---|---:|---:|---:|---:|",
             f"| flat (exact) | Flat | – | – | 1.000 | {exact_qps:.0f} | 1.0 |"]
    lines += [f"| {p} | {f} | {params or '–'} | {b:.0f} | {r:.3f} | {q:.0f} | {q / exact_qps:.1f} |"
              for p, f, params, b, r, q in rows]
    lines += ["", f"Bar (Recall@10 >= {RECALL_BAR} at >= {SPEED_BAR:.0f}x exact queries/s): "
              + (f"PASS ({', '.join(passing)})" if passing else "FAIL")]
    write_section(args.results, SECTION, "\n".join(lines))
    print(f"wrote section {SECTION!r} of {args.results}")


if __name__ == "__main__":
    main()
