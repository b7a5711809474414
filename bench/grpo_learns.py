"""Does GRPO learn beyond seed noise, and why? SFT then GRPO on `recipes/tiny-cpu.yaml` as shipped, several seeds.

    python bench/grpo_learns.py                       # seeds 0 1 2 at the recipe's sizes; writes bench/RESULTS.md
    python bench/grpo_learns.py --quick --set sft.max_steps=6 --set grpo.max_steps=4   # a smoke run: seed 0
    python bench/grpo_learns.py --recipe recipes/tiny-cpu-true-traces.yaml --section grpo_learns_true_traces \
        --out runs/grpo_learns_true_traces             # another recipe, into its own section
    python bench/grpo_learns.py --set data.synthetic.validation=true --out runs/grpo_learns_validation \
        --set grpo.sibling_weight=0.1   # compare settings on held-out training families, not test (-> <out>/RESULTS.md)

Per seed (`sft.seed` = `grpo.seed` = the seed; the catalogue's own seed stays as shipped) the recipe's SFT and GRPO
stages run in-process, then both final models are evaluated on the test split in direct and reason mode with the
faithfulness numbers, and GRPO's `log_history.json` gives the training signal: how many groups had no reward spread
(no advantage, no gradient), and whether the retrieval reward rose from the first to the last 20% of logged steps.
The section `grpo_learns` of the results file gets mean ± spread (population std over seeds) and the issue's bars;
`<out>/grpo_learns.json` gets every per-seed number.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Sibling bench modules: bench/ is on sys.path when this runs as a script (tests add it before importing).
from ablations import spread
from results_md import machine_description, seeds_and_results, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

if TYPE_CHECKING:
    from moon_rl.evaluation.result import EvaluationResult
    from moon_rl.recipe import Recipe  # imported when used at run time, as every moon_rl module here

ROOT = Path(__file__).resolve().parents[1]
SECTION = "grpo_learns"
logger = logging.getLogger("grpo_learns")

ATTRIBUTES = ("colour", "pattern", "category", "material", "brand")
#: the issue's bar on the GRPO model's greedy chains: share naming the product's own value, per attribute
CHAIN_BARS = {"material": 0.9, "brand": 0.9, "category": 0.9, "colour": 0.6, "pattern": 0.5}
MAX_ZERO_SPREAD = 0.3  # share of GRPO groups whose rewards are all equal (they give no gradient)
MIN_SWAP_DROP = 0.10  # text R@1 must fall at least this much when products read another product's chain
MAX_CHAIN_COSINE = 0.95  # two sampled chains of one product must not embed (almost) the same
TASKS = ("text->product", "image->product")
#: Table 1's columns after the chain attributes: (header, per-model metric key)
RETRIEVAL_COLUMNS = [("text R@1 reason", "reason/text->product"), ("image R@1 reason", "reason/image->product"),
                     ("text R@1 direct", "direct/text->product"), ("image R@1 direct", "direct/image->product"),
                     ("text R@1 swapped chains", "swapped/text->product"), ("cos(chain, chain)", "chain_cosine"),
                     ("sampled chains identical", "chains_identical"),
                     ("cos(chain, chain), chains differing", "chain_cosine_differing"),
                     ("cos(reason, direct)", "reason_direct_cosine")]
#: with `data.synthetic.trace_errors`: greedy chains of the training products whose trace is wrong
REPAIR_COLUMNS = [("wrong-trace products: chain names the truth", "repair/true"),
                  ("wrong-trace products: chain repeats the trace", "repair/trace")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    parser.add_argument("--quick", action="store_true", help="seed 0 only; results default to <out>/RESULTS.md")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny-cpu.yaml",
                        help="the recipe measured (default: the shipped recipes/tiny-cpu.yaml)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "grpo_learns")
    parser.add_argument("--results", type=Path, default=None,
                        help="markdown file to write (default bench/RESULTS.md; quick: <out>/RESULTS.md)")
    parser.add_argument("--section", default=SECTION,
                        help=f"the results file's section to (re)write (default {SECTION}; e.g. one per catalogue)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, as `moon-rl --set` (repeatable)")
    args = parser.parse_args(argv)
    if args.results is None and validation_catalogue(args):
        # Numbers of the validation split are for choosing settings: never into bench/RESULTS.md's tables of the test.
        args.results = args.out / "RESULTS.md"
    return seeds_and_results(args)


def validation_catalogue(args: argparse.Namespace) -> bool:
    """Whether the recipe, with the user's `--set`s, trains on the validation catalogue (`data.synthetic.validation`)."""
    from moon_rl.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    return recipe.data.catalogue == "builtin:synthetic" and recipe.data.synthetic.validation


def load_seed_recipe(args: argparse.Namespace, seed: int) -> Recipe:
    """The recipe (default: the shipped one) with the user's `--set`s, then this seed's output folder and training
    seeds (they win)."""
    from moon_rl.recipe import load_recipe

    return load_recipe(args.recipe, [
        "sft.disable_tqdm=true", "grpo.disable_tqdm=true", *args.overrides,
        f"output_dir={args.out / f'seed{seed}'}", f"sft.seed={seed}", f"grpo.seed={seed}",
    ])


def retrieval_reward_key(recipe: Recipe) -> str | None:
    """TRL's log key of the mean of the recipe's first retrieval reward (None when the recipe has none)."""
    names = [entry["name"] for entry in recipe.grpo_config().rewards if str(entry["name"]).startswith("retrieval")]
    return f"rewards/{names[0]}/mean" if names else None


def model_metrics(results: EvaluationResult) -> dict[str, float | None]:
    """The numbers this bench reports, flattened out of `evaluate_embedder`'s result (None where it has none)."""
    chains = results.chain_attributes or {}
    faith = results.faithfulness or {}
    metrics: dict[str, float | None] = {}
    for attr in ATTRIBUTES:
        metrics[f"chain/{attr}"] = (chains.get(attr) or {}).get("right")
        metrics[f"chance/chain/{attr}"] = (chains.get(attr) or {}).get("chance")
    for task in TASKS:
        for mode in ("reason", "direct"):
            metrics[f"{mode}/{task}"] = results.recall_at_1(mode, task)
        metrics[f"swapped/{task}"] = (faith.get("swapped") or {}).get(task)
        metrics[f"chance/{task}"] = (results.chance or {})[task]["recall@1"]
    metrics["chain_cosine"] = faith.get("chain_cosine")
    metrics["chains_identical"] = faith.get("chains_identical")
    metrics["chain_cosine_differing"] = faith.get("chain_cosine_differing")
    metrics["reason_direct_cosine"] = faith.get("reason_direct_cosine")
    metrics["reason_format_rate"] = results.reason_format_rate
    return metrics


def evaluate(recipe: Recipe, model_dir: Path, catalogue: Any) -> dict[str, float | None]:
    from moon_rl.evaluation.retrieval import evaluate_embedder
    from moon_rl.modeling.embedder import MoonEmbedder

    embedder = MoonEmbedder.load(model_dir)
    results = evaluate_embedder(embedder, catalogue, split=recipe.data.test_split, modes=("direct", "reason"),
                                batch_size=recipe.eval.batch_size, zero_shot=False, faithfulness=True)
    return {**model_metrics(results), **trace_error_chains(embedder, catalogue)}


def trace_error_chains(embedder: Any, catalogue: Any) -> dict[str, float]:
    """Does the model repeat its teacher's errors? On the training products whose trace names a wrong value
    (`catalogue.json` `trace_errors`, from `data.synthetic.trace_errors`): the share of greedy chains naming the true
    value (`repair/true`) and the trace's wrong one (`repair/trace`). Empty when the traces have no errors."""
    from moon_rl.data.chains import named_values

    errors = catalogue.manifest.get("trace_errors") or {}
    if not errors:
        return {}
    ids = sorted(errors)
    _, chains = embedder.encode([catalogue.products[pid] for pid in ids], mode="reason", load_image=catalogue.image,
                                return_completions=True)
    true = trace = 0
    for pid, chain in zip(ids, chains, strict=True):
        error = errors[pid]
        named = named_values(chain, {error["attribute"]: {error["true"]: 1, error["trace"]: 1}})
        named_value = named.get(error["attribute"], set())
        true += named_value == {error["true"]}
        trace += named_value == {error["trace"]}
    return {"repair/true": true / len(ids), "repair/trace": trace / len(ids), "repair/products": float(len(ids))}


def edge_windows(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The first and the last 20% of a series (at least one value each; they overlap on a series under 2 long)."""
    n = max(1, len(values) // 5)
    return list(values[:n]), list(values[-n:])


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def training_signal(history: Sequence[Mapping[str, Any]], reward_key: str | None) -> dict[str, float | None]:
    """GRPO's per-step diagnostics, summarised: mean zero-spread share and group cosine, first/last 20% rewards."""
    rows = [row for row in history if "step" in row and "train_runtime" not in row]

    def series(key: str | None) -> list[float]:
        return [float(row[key]) for row in rows if key is not None and row.get(key) is not None]

    rewards = series(reward_key)
    first, last = edge_windows(rewards) if rewards else ([], [])
    signal = {"logged_steps": float(len(rows)), "zero_spread": _mean(series("frac_reward_zero_std")),
              "group_cosine": _mean(series("spread/group_embedding_cosine")),
              "reward_first": _mean(first), "reward_last": _mean(last)}
    signal["reward_gain"] = None if not first else signal["reward_last"] - signal["reward_first"]
    for attr in ATTRIBUTES:
        values = series(f"chain/{attr}")
        if values:
            head, tail = edge_windows(values)
            signal[f"chain_first/{attr}"], signal[f"chain_last/{attr}"] = _mean(head), _mean(tail)
        signal[f"reward_judge/{attr}"] = _mean(series(f"reward_judge/{attr}"))
    return signal


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Train SFT then GRPO for one seed, evaluate both final models, read GRPO's log; every number of the seed."""
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.training.grpo import run_grpo
    from moon_rl.training.sft import run_sft

    recipe = load_seed_recipe(args, seed)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    sft_final = run_sft(recipe, overwrite=True)
    seconds["sft"] = time.perf_counter() - started
    logger.info("seed %d: SFT %.0f s", seed, seconds["sft"])
    started = time.perf_counter()
    grpo_final = run_grpo(recipe, overwrite=True)
    seconds["grpo"] = time.perf_counter() - started
    logger.info("seed %d: GRPO %.0f s", seed, seconds["grpo"])
    catalogue = load_recipe_catalogue(recipe.data)
    models = {}
    for stage, final in (("sft", sft_final), ("grpo", grpo_final)):
        started = time.perf_counter()
        models[stage] = evaluate(recipe, final, catalogue)
        seconds[f"eval_{stage}"] = time.perf_counter() - started
        logger.info("seed %d: evaluation of the %s model %.0f s", seed, stage.upper(), seconds[f"eval_{stage}"])
    history = json.loads((grpo_final.parent / "log_history.json").read_text())
    return {"seed": seed, "seconds": {k: round(v, 1) for k, v in seconds.items()}, **models,
            "signal": training_signal(history, retrieval_reward_key(recipe))}


def values(runs: Sequence[Mapping[str, Any]], group: str, key: str) -> list[float]:
    """`runs[i][group][key]` over seeds, skipping seeds that lack it."""
    return [run[group][key] for run in runs if run[group].get(key) is not None]


def chain_mean(run: Mapping[str, Any], group: str) -> float | None:
    """One seed's greedy chain accuracy averaged over the five attributes (None if any is missing)."""
    found = [run[group].get(f"chain/{attr}") for attr in ATTRIBUTES]
    return None if None in found else statistics.fmean(found)


def fmt(found: Sequence[float], digits: int = 3) -> str:
    """Mean ± spread over seeds; the bare value for one seed, which has no spread; – when nothing was measured."""
    if not found:
        return "–"
    mean, std = spread(list(found))
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(found) > 1 else f"{mean:.{digits}f}"


def beyond_spread(higher: Sequence[float], lower: Sequence[float]) -> tuple[float, float, bool]:
    """mean(higher) - mean(lower), the larger of the two population stds, and whether the difference exceeds it.

    One seed has no spread to exceed: that never passes, whatever the difference."""
    (mh, sh), (ml, sl) = spread(list(higher)), spread(list(lower))
    diff, noise = mh - ml, max(sh, sl)
    return diff, noise, diff > noise and min(len(higher), len(lower)) > 1


@dataclass
class Bar:
    title: str
    passed: bool
    detail: str


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _gain(label: str, higher: Sequence[float], lower: Sequence[float]) -> tuple[bool, str]:
    if not higher or not lower:
        return False, f"{label}: not measured"
    diff, noise, ok = beyond_spread(higher, lower)
    note = " (one seed: no spread)" if min(len(higher), len(lower)) < 2 else ""
    means = f"{statistics.fmean(higher):.3f} vs {statistics.fmean(lower):.3f}"
    return ok, f"{label} {means} ({diff:+.3f}, spread {noise:.3f}{note}) {_verdict(ok)}"


def _at_most(label: str, found: Sequence[float], limit: float, above: bool = False) -> tuple[bool, str]:
    if not found:
        return False, f"{label}: not measured"
    mean = spread(list(found))[0]
    ok = mean >= limit if above else mean <= limit
    return ok, f"{label} {mean:.3f} {'≥' if above else '≤'} {limit} {_verdict(ok)}"


def _bar(title: str, parts: Sequence[tuple[bool, str]]) -> Bar:
    return Bar(title, all(ok for ok, _ in parts), "; ".join(text for _, text in parts))


def bars(runs: Sequence[Mapping[str, Any]]) -> list[Bar]:
    """The issue's acceptance bars 1-4 on per-seed numbers (see the module docstring and `beyond_spread`)."""
    chains = _bar("final (GRPO) greedy chain accuracy", [
        _at_most(attr, values(runs, "grpo", f"chain/{attr}"), limit, above=True) for attr, limit in CHAIN_BARS.items()])
    signal = _bar("GRPO training signal", [
        _at_most("zero-spread share", values(runs, "signal", "zero_spread"), MAX_ZERO_SPREAD),
        _gain("retrieval reward last vs first 20%", values(runs, "signal", "reward_last"),
              values(runs, "signal", "reward_first"))])
    sft_chain = [v for run in runs if (v := chain_mean(run, "sft")) is not None]
    grpo_chain = [v for run in runs if (v := chain_mean(run, "grpo")) is not None]
    chain_up = bool(sft_chain and grpo_chain) and statistics.fmean(grpo_chain) > statistics.fmean(sft_chain)
    chain_text = (f"mean chain accuracy {statistics.fmean(grpo_chain):.3f} vs {statistics.fmean(sft_chain):.3f} "
                  f"{_verdict(chain_up)}" if sft_chain and grpo_chain else "mean chain accuracy: not measured")
    gains = _bar("GRPO beats SFT (reason mode)", [
        *[_gain(f"{task} R@1", values(runs, "grpo", f"reason/{task}"), values(runs, "sft", f"reason/{task}"))
          for task in TASKS], (chain_up, chain_text)])
    own, swapped = values(runs, "grpo", "reason/text->product"), values(runs, "grpo", "swapped/text->product")
    drop = statistics.fmean(own) - statistics.fmean(swapped) if own and swapped else None
    drop_ok = drop is not None and drop >= MIN_SWAP_DROP
    faithful = _bar("faithfulness (GRPO model)", [
        (drop_ok, f"text R@1 own chains - swapped chains {drop:+.3f} ≥ {MIN_SWAP_DROP} {_verdict(drop_ok)}"
         if drop is not None else "swapped chains: not measured"),
        _at_most("cos(chain, chain)", values(runs, "grpo", "chain_cosine"), MAX_CHAIN_COSINE)])
    return [chains, signal, gains, faithful]


def reasoning_statement(runs: Sequence[Mapping[str, Any]], group: str) -> str:
    """Bar 5 (reported, no bar): does reason mode beat direct mode on text->product for this model?"""
    reason, direct = values(runs, group, "reason/text->product"), values(runs, group, "direct/text->product")
    if not reason or not direct:
        return f"{group.upper()}: not measured"
    diff, noise, helps = beyond_spread(reason, direct)
    _, _, hurts = beyond_spread(direct, reason)
    word = "reasoning helps" if helps else "reasoning hurts" if hurts else "no difference beyond the seed spread"
    if min(len(reason), len(direct)) < 2:
        word += " (one seed: no spread)"
    return (f"{group.upper()}: text R@1 reason {statistics.fmean(reason):.3f} vs direct {statistics.fmean(direct):.3f} "
            f"({diff:+.3f}, spread {noise:.3f}): {word}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Markdown table lines: the first column left-aligned, the numbers right-aligned."""
    return ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *["| " + " | ".join(row) + " |" for row in rows]]


def model_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    header = ["model", *[f"chain {attr}" for attr in ATTRIBUTES], *[label for label, _ in RETRIEVAL_COLUMNS]]
    keys = [*[f"chain/{attr}" for attr in ATTRIBUTES], *[key for _, key in RETRIEVAL_COLUMNS]]
    if values(runs, "sft", "repair/true"):  # the catalogue's traces have errors: does the model repeat them?
        header += [label for label, _ in REPAIR_COLUMNS]
        keys += [key for _, key in REPAIR_COLUMNS]
    rows = [[group.upper(), *[fmt(values(runs, group, key)) for key in keys]] for group in ("sft", "grpo")]
    chance = {"reason/text->product": "chance/text->product", "reason/image->product": "chance/image->product",
              "direct/text->product": "chance/text->product", "direct/image->product": "chance/image->product",
              "swapped/text->product": "chance/text->product", **{f"chain/{a}": f"chance/chain/{a}" for a in ATTRIBUTES}}
    rows.append(["chance", *[fmt(values(runs, "grpo", chance[key])) if key in chance else "–" for key in keys]])
    return _table(header, rows)


def signal_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [["zero-spread share of groups (mean over steps)", "zero_spread"],
            ["retrieval reward, first 20% of steps", "reward_first"], ["retrieval reward, last 20%", "reward_last"],
            ["retrieval reward, last − first", "reward_gain"], ["group embedding cosine", "group_cosine"]]
    for attr in ATTRIBUTES:
        rows += [[f"sampled-chain {attr}, first 20%", f"chain_first/{attr}"],
                 [f"sampled-chain {attr}, last 20%", f"chain_last/{attr}"],
                 [f"reward preferred the chain naming the true {attr} (groups that disagree)", f"reward_judge/{attr}"]]
    found = [[label, fmt(values(runs, "signal", key))] for label, key in rows if values(runs, "signal", key)]
    return _table(["GRPO training signal", "mean ± spread"], found or [["(nothing logged)", "–"]])


def _recipe_name(path: Path) -> str:
    """The recipe as the results file names it: relative to the checkout when it is in it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def section(args: argparse.Namespace, runs: Sequence[Mapping[str, Any]], command: str, minutes: float) -> str:
    """The markdown of this bench's section of the results file."""
    lines = [
        "## Does GRPO learn? (bench/grpo_learns.py)" + ("" if args.section == SECTION else f": {args.section}"), "",
        f"Command: `{command}`  ", f"Machine: {machine_description()}  ",
        f"Seeds: {list(args.seeds)} (`sft.seed` = `grpo.seed`; catalogue seed as shipped); recipe "
        f"`{_recipe_name(args.recipe)}`{' with ' + ', '.join(f'`{o}`' for o in args.overrides) if args.overrides else ''}"
        f"; total {minutes:.1f} minutes; seconds per seed: "
        + ", ".join(f"{stage} {fmt([run['seconds'][stage] for run in runs if stage in run.get('seconds', {})], 0)}"
                    for stage in ("sft", "grpo", "eval_sft", "eval_grpo")) + ".", "",
        "Mean ± spread (population std over seeds). Test split, queries in direct mode; chain columns: share of the "
        "gallery's greedy chains naming the product's own value; swapped: the gallery read out after another "
        "product's chain." + (
            f" Wrong-trace columns: the {int(values(runs, 'sft', 'repair/products')[0])} *training* products whose "
            "trace names a wrong value (`data.synthetic.trace_errors`): share of greedy chains naming the true value, "
            "and repeating the trace's." if values(runs, "sft", "repair/products") else ""), "",
        *model_table(runs), "", *signal_table(runs), "",
        "### Bars", "",
        "\"By more than the spread\": the difference of means exceeds the larger population std of the two compared "
        "rows (one seed never passes).", "",
        *[f"{i}. **{_verdict(bar.passed)}** {bar.title}: {bar.detail}" for i, bar in enumerate(bars(runs), 1)],
        "5. reason vs direct (no bar): " + "; ".join(reasoning_statement(runs, group) for group in ("sft", "grpo")),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    command = ("python bench/grpo_learns.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    raw = args.out / "grpo_learns.json"
    for seed in args.seeds:
        runs.append(run_seed(args, seed))
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps({"command": command, "seeds": args.seeds, "overrides": args.overrides,
                                   "runs": runs}, indent=2))
    minutes = (time.perf_counter() - started) / 60
    write_section(args.results, args.section, section(args, runs, command, minutes))
    logger.info("total %.1f minutes; wrote %s and %s", minutes, args.results, raw)
    return args.results


if __name__ == "__main__":
    main()
