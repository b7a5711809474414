"""Can GRPO's retrieval reward teach an attribute? The reward as a judge of chains, against the policy's own chains.

    python bench/reward_judge.py --runs runs/grpo_learns            # every seed folder's SFT and GRPO model
    python bench/reward_judge.py --models runs/tiny-cpu/sft/final --splits train test --attributes pattern

GRPO can only move the policy towards chains its reward prefers. For each product of a split, the model writes its
greedy chain; where the chain names exactly one value of an attribute, it is rewritten with every value of that
attribute (everything else unchanged) and each variant is read out (reason mode). The **judge accuracy** is the share of
products whose true-value variant gets a reward above every other variant's (a tie counts as no) against the product's
own query, per query kind:

* `cos`: cosine similarity of the read-out with the query (the query -> completion score, what evaluation ranks by);
* `logprob`: the completion -> query log-probability of the recipe's `retrieval_logprob` reward (temperature 0.05)
  over every query of the split, the product's other queries masked out.

Beside it, **greedy**: the share of the same products whose own greedy chain names the true value. A judge less
accurate than the policy on the training products (where GRPO samples) knows less about the attribute than the traces
the policy imitated: rewarding samples by it cannot beat imitating them there. GRPO logs the online counterpart,
`reward_judge/<attribute>` (data/chains.py `reward_prefers_truth`): in the sampled groups whose chains disagree, how
often the total reward preferred a right one. The section `reward_judge` of the results file gets the table (mean ±
population std over models of one kind).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Sibling bench modules: bench/ is on sys.path when this runs as a script.
from results_md import machine_description, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

ROOT = Path(__file__).resolve().parents[1]
SECTION = "reward_judge"
TEMPERATURE = 0.05  # retrieval_logprob's default, the recipe's
KINDS = ("text", "image")
logger = logging.getLogger("reward_judge")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=None, help="a grpo_learns output folder (seed*/sft, seed*/grpo)")
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="model folders (moon_rl.json inside)")
    parser.add_argument("--splits", nargs="+", default=["train", "test"])
    parser.add_argument("--attributes", nargs="+", default=["pattern", "colour"])
    parser.add_argument("--max-products", type=int, default=120, help="products per split (the first by id)")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny-cpu.yaml")
    parser.add_argument("--results", type=Path, default=None,
                        help="markdown file to write (default bench/RESULTS.md; with --models: print only)")
    args = parser.parse_args(argv)
    if args.runs is None and not args.models:
        parser.error("give --runs or --models")
    return args


def model_folders(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(kind, final model folder): the SFT and GRPO model of every seed under --runs, then --models as `model`."""
    found = []
    if args.runs is not None:
        for seed_dir in sorted(args.runs.glob("seed*")):
            found += [(stage, seed_dir / stage / "final") for stage in ("sft", "grpo")
                      if (seed_dir / stage / "final" / "moon_rl.json").is_file()]
        if not found:
            raise SystemExit(f"no seed*/sft/final or seed*/grpo/final model under {args.runs}")
    found += [("model", path) for path in args.models]
    return found


def split_queries(catalogue: Any, split: str) -> tuple[list[Any], list[str], dict[tuple[str, str], int]]:
    """The split's text and image queries, their products, and each (product, kind)'s first query."""
    from moon_rl.data.records import Query

    queries, products, first = [], [], {}
    for pair in catalogue.pairs[split]:
        anchor = pair.anchor
        if not isinstance(anchor, Query) or bool(anchor.text) == (anchor.image is not None):
            continue  # product anchors and text+image queries: neither kind
        kind = "text" if anchor.text else "image"
        first.setdefault((pair.positive_ids[0], kind), len(queries))
        queries.append(anchor)
        products.append(pair.positive_ids[0])
    return queries, products, first


def judge(embedder: Any, catalogue: Any, split: str, attributes: Sequence[str], max_products: int) -> dict[str, Any]:
    """Greedy and judge accuracy of one model on one split, per attribute (see the module docstring)."""
    from moon_rl.data.chains import attribute_vocabulary, named_values, replace_value

    vocabulary = attribute_vocabulary(p.attributes for p in catalogue.products.values())
    queries, query_products, first = split_queries(catalogue, split)
    product_ids = sorted({pid for pid, _ in first})[:max_products]
    products = [catalogue.products[pid] for pid in product_ids]
    _, chains = embedder.encode(products, mode="reason", load_image=catalogue.image, return_completions=True)
    query_vectors = embedder.encode(queries, mode="direct", load_image=catalogue.image)
    query_owner = np.array(query_products)  # the product of each query
    out: dict[str, Any] = {}
    for attr in attributes:
        values = sorted(vocabulary.get(attr, ()))
        records, completions, owners = [], [], []
        greedy = []
        for product, chain in zip(products, chains, strict=True):
            truth = str(product.attributes.get(attr, "")).strip().lower()
            body = chain.replace("<think>", "").replace("</think>", "").strip()
            named = named_values(body, {attr: set(values)}).get(attr, set())
            if truth not in values or len(named) != 1:
                continue
            greedy.append(truth in named)
            (said,) = named
            for value in values:
                records.append(product)
                completions.append(embedder.tokenize_reasoning([replace_value(body, said, value)])[0])
            owners.append((product.id, values.index(truth)))
        if not owners:
            out[attr] = {"products": 0}
            continue
        vectors = embedder.encode(records, mode="reason", load_image=catalogue.image, completions=completions)
        vectors = vectors.reshape(len(owners), len(values), -1)
        picks: dict[str, list[bool]] = defaultdict(list)
        for (pid, truth_index), variants in zip(owners, vectors, strict=True):
            scores = variants @ query_vectors.T / TEMPERATURE  # (values, queries)
            allowed = query_owner != pid  # the product's other queries are no negatives
            for kind in KINDS:
                own = first.get((pid, kind))
                if own is None:
                    continue
                negatives = scores[:, allowed]
                top = np.maximum(negatives.max(axis=1), scores[:, own])
                logprob = scores[:, own] - top - np.log(np.exp(scores[:, own] - top)
                                                        + np.exp(negatives - top[:, None]).sum(axis=1))
                picks[f"cos/{kind}"].append(_strict_best(scores[:, own], truth_index))
                picks[f"logprob/{kind}"].append(_strict_best(logprob, truth_index))
        out[attr] = {"products": len(owners), "greedy": float(np.mean(greedy)), "values": len(values),
                     **{key: float(np.mean(found)) for key, found in picks.items()}}
    return out


def _strict_best(rewards: np.ndarray, index: int) -> bool:
    """The variant at `index` scores above every other one: a tie is no preference for it."""
    return bool(np.all(np.delete(rewards, index) < rewards[index]))


def table(rows: Sequence[dict[str, Any]], attributes: Sequence[str], splits: Sequence[str]) -> list[str]:
    columns = ["greedy", *[f"{score}/{kind}" for score in ("cos", "logprob") for kind in KINDS]]
    header = ["model", "split", "attribute", "products", "policy: greedy chain right",
              *[f"judge: {c.split('/')[0]}, {c.split('/')[1]} query" for c in columns[1:]]]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for kind in dict.fromkeys(row["kind"] for row in rows):
        for split in splits:
            for attr in attributes:
                found = [row["result"][split][attr] for row in rows if row["kind"] == kind]
                cells = []
                for column in ["products", *columns]:
                    numbers = [f[column] for f in found if column in f]
                    if not numbers:
                        cells.append("–")
                    elif column == "products":
                        cells.append(str(round(statistics.fmean(numbers))))
                    else:
                        mean = statistics.fmean(numbers)
                        std = statistics.pstdev(numbers) if len(numbers) > 1 else None
                        cells.append(f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else ""))
                lines.append(f"| {kind.upper()} | {split} | {attr} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import load_recipe

    command = ("python bench/reward_judge.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    catalogue = load_recipe_catalogue(load_recipe(args.recipe, []).data)
    rows = []
    started = time.perf_counter()
    for kind, folder in model_folders(args):
        embedder = MoonEmbedder.load(folder)
        result = {split: judge(embedder, catalogue, split, args.attributes, args.max_products) for split in args.splits}
        rows.append({"kind": kind, "model": str(folder), "result": result})
        logger.info("%s: %s", folder, json.dumps(result))
    lines = table(rows, args.attributes, args.splits)
    print("\n".join(lines))
    results = args.results or (ROOT / "bench" / "RESULTS.md" if args.runs is not None else None)
    if results is not None:
        minutes = (time.perf_counter() - started) / 60
        write_section(results, SECTION, "\n".join([
            "## Can the retrieval reward teach an attribute? (bench/reward_judge.py)", "",
            f"Command: `{command}`  ", f"Machine: {machine_description()}  ",
            f"{len(rows)} models, {minutes:.1f} minutes. Per split, the first {args.max_products} products (by id) "
            "with a query of each kind. *Policy*: share whose greedy chain names the true value. *Judge*: share whose "
            "true-value rewrite of that chain gets a higher reward than every other rewrite (a tie is no) against the "
            "product's own query (cos: cosine, "
            "the query -> completion score; logprob: completion -> query over all the split's queries). Mean ± "
            "population std over the models of a kind.", "",
            *lines,
        ]))
        (args.runs or Path(".")).joinpath("reward_judge.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
