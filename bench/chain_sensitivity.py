"""How far does a reason-mode embedding move when its chain names another value? Per attribute, against real changes.

    python bench/chain_sensitivity.py --models runs/grpo_learns/seed0/sft/final runs/grpo_learns/seed0/grpo/final

cos(chain, chain), bar 4 of issue 13, mixes two things: how often a model's sampled chains differ (a confident policy
writes the same chain twice) and how far a different chain moves the embedding. This bench takes them apart, on the
gallery of a split (test by default), per attribute:

* `lookalike`: mean cosine between the greedy reason-mode embeddings of two products whose attributes differ in that
  attribute only (the hard gallery's look-alikes): how far a *real* change of the value moves the embedding;
* `rewrite`: mean cosine between a product's greedy embedding and its embedding after the same chain with the
  product's value of the attribute replaced by another value (seeded draw; products whose chain does not name their
  value are left out): how far the *chain's word* alone moves it. Near 1 while `lookalike` is far below: the read-out
  takes the attribute from elsewhere (the photo, the title), not from what the chain says;
* `random`: mean cosine of two random gallery products, for scale;
* two chains sampled per product (temperature 1, as `moon-rl eval`'s faithfulness numbers): the share of identical
  pairs, and the mean cosine of the pairs whose chains differ in exactly that attribute's values.

Prints one markdown table per model; writes nothing.

    python bench/chain_sensitivity.py --cross --models runs/grpo_learns/seed0/sft/final runs/grpo_learns/seed0/grpo/final

`--cross` takes cos(chain, chain) apart between the two halves of a model instead: each model samples two chains per
product, and every model reads both out (the models must share a tokenizer: fine-tunes of one base). A row is a
sampler, a column a reader: whether a second model's higher cosine comes from its chains (more identical pairs,
smaller differences) or from its read-out (the same chains embedded closer together).
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="model folders (moon_rl.json inside)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny-cpu.yaml",
                        help="the recipe whose catalogue is measured")
    parser.add_argument("--split", default=None, help="default: the recipe's test split")
    parser.add_argument("--sampled", type=int, default=64, help="products whose two chains are sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cross", action="store_true",
                        help="chains sampled by each model, read out by each model (one table)")
    return parser.parse_args(argv)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosines of two equally shaped matrices."""
    return np.sum(_unit(a) * _unit(b), axis=-1)


def lookalike_cosines(vectors: np.ndarray, attributes: Sequence[dict[str, str]],
                      names: Sequence[str]) -> tuple[dict[str, tuple[float, int]], float]:
    """`{attribute: (mean cosine, pairs)}` over product pairs differing in that attribute only, and the mean over all
    pairs."""
    unit = _unit(vectors)
    similarity = unit @ unit.T  # every pair's cosine at once
    found: dict[str, list[float]] = defaultdict(list)
    everything = []
    for i, j in itertools.combinations(range(len(vectors)), 2):
        cosine = float(similarity[i, j])
        everything.append(cosine)
        differ = [name for name in names if attributes[i].get(name) != attributes[j].get(name)]
        if len(differ) == 1:
            found[differ[0]].append(cosine)
    return ({name: (float(np.mean(v)), len(v)) for name, v in found.items()},
            float(np.mean(everything)) if everything else float("nan"))


def rewrite_cosines(embedder: Any, products: Sequence[Any], vectors: np.ndarray, chains: Sequence[str],
                    vocabulary: dict[str, dict[str, int]], load_image: Any, seed: int = 0,
                    batch_size: int = 32) -> dict[str, tuple[float, int]]:
    """`{attribute: (mean cosine, products)}` between each greedy embedding and the same chain's with the product's
    value of the attribute replaced by another value of the catalogue (products whose chain names it)."""
    from moon_rl.data.chains import named_values, replace_value

    draw = random.Random(seed)
    found = {}
    for name, values in vocabulary.items():
        rows, rewritten = [], []
        for row, (product, chain) in enumerate(zip(products, chains, strict=True)):
            own = str(product.attributes.get(name, "")).strip().lower()
            others = [value for value in values if value != own]
            if own and others and own in named_values(chain, vocabulary).get(name, set()):
                rows.append(row)
                rewritten.append(replace_value(chain, own, draw.choice(others)))
        if rows:
            # The chains are decoded completions (think tags, end of turn): tokenised as they are, not re-wrapped.
            ids = embedder.processor.tokenizer(rewritten, add_special_tokens=False)["input_ids"]
            moved = embedder.encode([products[r] for r in rows], mode="reason", load_image=load_image,
                                    batch_size=batch_size, completions=ids)
            found[name] = (float(np.mean(_cosines(moved, vectors[rows]))), len(rows))
    return found


def sampled_pair_cosines(first: np.ndarray, second: np.ndarray, first_chains: Sequence[str],
                         second_chains: Sequence[str], vocabulary: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Identical share of two sampled chains per product, and the mean cosine of the pairs differing in exactly one
    attribute's values (`{attribute: (mean cosine, pairs)}`)."""
    from moon_rl.data.chains import named_values

    cosines = _cosines(first, second)
    identical = [a == b for a, b in zip(first_chains, second_chains, strict=True)]
    by_attribute: dict[str, list[float]] = defaultdict(list)
    for a, b, cosine, same in zip(first_chains, second_chains, cosines, identical, strict=True):
        if same:
            continue
        named_a, named_b = named_values(a, vocabulary), named_values(b, vocabulary)
        differ = [name for name in vocabulary if named_a.get(name) != named_b.get(name)]
        if len(differ) == 1:
            by_attribute[differ[0]].append(float(cosine))
    return {"identical": float(np.mean(identical)) if identical else float("nan"), "mean": float(np.mean(cosines)),
            "differing": {name: (float(np.mean(v)), len(v)) for name, v in by_attribute.items()}}


def measure(embedder: Any, catalogue: Any, split: str, sampled: int = 64, seed: int = 0) -> dict[str, Any]:
    """Every number of the module docstring for one model on one split's gallery."""
    from moon_rl.data.chains import attribute_vocabulary
    from moon_rl.evaluation.faithfulness import spread_sample, two_sampled_chains

    vocabulary = attribute_vocabulary(p.attributes for p in catalogue.products.values())
    gallery = [catalogue.products[pid] for pid in catalogue.gallery(split)]
    encode = dict(mode="reason", load_image=catalogue.image)
    vectors, chains = embedder.encode(gallery, return_completions=True, **encode)
    lookalike, random_pairs = lookalike_cosines(vectors, [p.attributes for p in gallery], list(vocabulary))
    rewrite = rewrite_cosines(embedder, gallery, vectors, chains, vocabulary, catalogue.image, seed)
    (first, first_chains), (second, second_chains) = two_sampled_chains(
        embedder, spread_sample(gallery, sampled), seed=seed, return_completions=True, **encode)
    return {"lookalike": lookalike, "random": random_pairs, "rewrite": rewrite,
            "sampled": sampled_pair_cosines(first, second, first_chains, second_chains, vocabulary)}


def cross_read(embedders: dict[str, Any], catalogue: Any, split: str, sampled: int = 64,
               seed: int = 0) -> dict[tuple[str, str], dict[str, float]]:
    """`{(sampler, reader): {"identical", "mean", "differing"}}`: two chains sampled per product by `sampler` (the same
    seed for every sampler), both read out by `reader`; the share of identical pairs, the mean cosine of all pairs, and
    of the pairs whose chains differ (nan when none do)."""
    from moon_rl.evaluation.faithfulness import spread_sample, two_sampled_chains

    chosen = spread_sample([catalogue.products[pid] for pid in catalogue.gallery(split)], sampled)
    encode = dict(mode="reason", load_image=catalogue.image)
    found = {}
    for sampler_name, sampler in embedders.items():
        (_, first), (_, second) = two_sampled_chains(sampler, chosen, seed=seed, **encode)
        differing = np.array([list(a) != list(b) for a, b in zip(first, second, strict=True)], dtype=bool)
        for reader_name, reader in embedders.items():
            cosines = _cosines(reader.encode(chosen, completions=first, **encode),
                               reader.encode(chosen, completions=second, **encode))
            found[sampler_name, reader_name] = {
                "identical": float(1.0 - differing.mean()), "mean": float(cosines.mean()),
                "differing": float(cosines[differing].mean()) if differing.any() else float("nan")}
    return found


def cross_table(found: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    """Markdown: a row per sampler, a column per reader; cells `mean (differing pairs)`."""
    samplers = list(dict.fromkeys(s for s, _ in found))
    readers = list(dict.fromkeys(r for _, r in found))
    lines = ["| chains sampled by | identical pairs | " + " | ".join(f"read out by {r}" for r in readers) + " |",
             "|---|---:|" + "---:|" * len(readers)]
    for s in samplers:
        cells = [f"{found[s, r]['mean']:.3f} ({found[s, r]['differing']:.3f})" for r in readers]
        lines.append(f"| {s} | {found[s, readers[0]]['identical']:.3f} | " + " | ".join(cells) + " |")
    lines.append("\ncells: cos(chain, chain) over all sampled pairs (over the pairs whose chains differ)")
    return lines


def table(result: dict[str, Any]) -> list[str]:
    def cell(entry: tuple[float, int] | None) -> str:
        return "–" if entry is None else f"{entry[0]:.3f} ({entry[1]})"

    names = sorted({*result["lookalike"], *result["rewrite"]})
    lines = ["| attribute | look-alikes differing only in it | chain's word rewritten | sampled chains differing "
             "only in it |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {cell(result['lookalike'].get(name))} | {cell(result['rewrite'].get(name))} | "
              f"{cell(result['sampled']['differing'].get(name))} |" for name in names]
    sampled = result["sampled"]
    lines.append(f"\nrandom product pairs {result['random']:.3f}; sampled chains: identical {sampled['identical']:.3f}, "
                 f"cos(chain, chain) {sampled['mean']:.3f} (cells: mean cosine (count))")
    return lines


def main(argv: list[str] | None = None) -> list[dict[Any, Any]]:
    args = parse_args(argv)
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    catalogue = load_recipe_catalogue(recipe.data)
    split = args.split or recipe.data.test_split
    if args.cross:
        found = cross_read({str(folder): MoonEmbedder.load(folder) for folder in args.models}, catalogue, split,
                           args.sampled, args.seed)
        print(f"\n## Chains sampled by one model, read out by another ({split} gallery)\n")
        print("\n".join(cross_table(found)), flush=True)
        return [found]
    results = []
    for folder in args.models:
        result = measure(MoonEmbedder.load(folder), catalogue, split, args.sampled, args.seed)
        print(f"\n## {folder} ({split} gallery)\n")
        print("\n".join(table(result)), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
