"""Do mined negatives recover what the synthetic catalogue's given look-alike negatives bring? (issue 16)

    python bench/mine_negatives.py                    # seeds 0 1 2, SFT 150 steps per arm; writes bench/RESULTS.md
    python bench/mine_negatives.py --quick --steps 6  # a smoke run: seed 0, into <out>/RESULTS.md

Per seed, three SFT runs of `recipes/tiny-cpu.yaml` (shortened to `--steps`, as bench/ablations.py) on the builtin
synthetic catalogue:

* `in-batch`: the training pairs' given negatives removed: in-batch negatives only;
* `given`: the catalogue as shipped (each pair's look-alikes as negatives);
* `mined`: the `in-batch` catalogue with negatives mined by the `in-batch` model (`moon-rl mine`, k = the given
  negatives per pair, margin 0.95).

Each model is evaluated in direct mode on the test split against its hard gallery. The table gives R@1 per arm and
the share of the given negatives' gain that mining recovers, `(mined - in-batch) / (given - in-batch)`; the bar is 0.5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from ablations import spread
from results_md import RUNS, machine_description, run_seeds, seeded_parser, seeds_and_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

ROOT = Path(__file__).resolve().parents[1]
SECTION = "mine_negatives"
TASKS = ("text->product", "image->product")
ARMS = ("in-batch", "given", "mined")
BAR = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = seeded_parser(__doc__, "mine_negatives")
    parser.add_argument("--steps", type=int, default=150, help="SFT steps per arm (default 150, as the ablations)")
    parser.add_argument("--margin", type=float, default=0.95,
                        help="mining's near-twin filter (default 0.95, as `moon-rl mine`); 0 turns it off")
    parser.add_argument("--section", default=SECTION, help=f"the results file's section (default {SECTION})")
    return seeds_and_results(parser.parse_args(argv))


def catalogues(out: Path) -> tuple[Path, Path, int]:
    """The shipped synthetic catalogue's folder, a copy whose training pairs have no negatives, and the number of
    given negatives per training pair."""
    from moon_rl.data.annotate import write_catalogue_copy
    from moon_rl.data.catalogue import load_catalogue, resolve_catalogue_path

    given = resolve_catalogue_path("builtin:synthetic")
    catalogue = load_catalogue(given)
    counts = {len(pair.negatives) for pair in catalogue.pairs["train"]}
    stripped = out / "catalogue-in-batch"
    if not stripped.is_dir():
        pairs = {**catalogue.pairs, "train": [p.model_copy(update={"negatives": []}) for p in catalogue.pairs["train"]]}
        write_catalogue_copy(catalogue, stripped, command="bench/mine_negatives.py", pairs=pairs,
                             manifest_entry=("bench", {"negatives": "removed"}))
    return given, stripped, max(counts)


def train(out: Path, catalogue: Path, seed: int, steps: int) -> Path:
    from moon_rl.recipe import load_recipe
    from moon_rl.training.sft import run_sft

    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [
        f"output_dir={out}", f"data.catalogue={catalogue}", f"sft.max_steps={steps}", f"sft.seed={seed}",
        "sft.disable_tqdm=true", "sft.save_steps=100000"])
    return run_sft(recipe, overwrite=True)


def recall(model: Path, catalogue: Path) -> dict[str, float]:
    from moon_rl.data.catalogue import load_catalogue
    from moon_rl.evaluation.retrieval import evaluate_embedder
    from moon_rl.modeling.embedder import MoonEmbedder

    result = evaluate_embedder(MoonEmbedder.load(model), load_catalogue(catalogue), "test", ["direct"], [1],
                               zero_shot=False)
    return {task: result.recall_at_1("direct", task) for task in TASKS}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from moon_rl.data.catalogue import load_catalogue
    from moon_rl.inference.mine import mine_negatives, write_mined_catalogue
    from moon_rl.modeling.embedder import MoonEmbedder

    given, stripped, k = catalogues(args.out)
    folder = args.out / f"seed{seed}"
    models = {"in-batch": train(folder / "in-batch", stripped, seed, args.steps),
              "given": train(folder / "given", given, seed, args.steps)}
    source = load_catalogue(stripped)
    report = mine_negatives(MoonEmbedder.load(models["in-batch"]), source, "train", k=k, margin=args.margin or None,
                            show_progress=False)
    mined = write_mined_catalogue(source, report, folder / "catalogue-mined", model=str(models["in-batch"]),
                                  overwrite=True)
    models["mined"] = train(folder / "mined", mined, seed, args.steps)
    return {"seed": seed, "k": k, "mining": report.counts(),
            **{arm: recall(models[arm], given) for arm in ARMS}}


def recovered(run: dict[str, Any], task: str) -> float | None:
    gain = run["given"][task] - run["in-batch"][task]
    return (run["mined"][task] - run["in-batch"][task]) / gain if gain > 0 else None


def verdict(runs: list[dict[str, Any]], task: str) -> str:
    """The bar on the means: mined recovers at least half of given's gain over in-batch; a gain within the seed spread
    is no gain to recover, and a recovery within the spread is said to be one."""
    (inb, inb_sd), (giv, giv_sd), (mined, mined_sd) = (spread([run[arm][task] for run in runs]) for arm in ARMS)
    gain, noise = giv - inb, max(inb_sd, giv_sd)
    if gain <= noise:
        return (f"the given negatives bring {gain:+.3f} over in-batch (spread {noise:.3f}): no gain beyond seed noise "
                f"to recover; mined {mined - inb:+.3f}")
    share = (mined - inb) / gain
    beyond = (mined - inb) > max(inb_sd, mined_sd)
    return (f"given {gain:+.3f} over in-batch (spread {noise:.3f}); mined {mined - inb:+.3f} (spread "
            f"{max(inb_sd, mined_sd):.3f}, {'beyond' if beyond else 'within'} it): recovers {share:.2f} of the gain, "
            f"bar {BAR}: {'PASS' if share >= BAR else 'FAIL'}" + ("" if beyond else " (on a difference within noise)"))


def section(args: argparse.Namespace, runs: list[dict[str, Any]], minutes: float) -> str:
    def fmt(values: list[float | None]) -> str:
        found = [v for v in values if v is not None]
        if not found:
            return "–"
        mean, std = spread(found)
        return f"{mean:.3f} ± {std:.3f}"

    options = "".join(f" {flag} {value}" for flag, value, default in (
        ("--steps", args.steps, 150), ("--margin", args.margin, 0.95), ("--section", args.section, SECTION),
        ("--out", args.out, RUNS / "mine_negatives")) if value != default)
    lines = ["## Mined hard negatives against the given ones (bench/mine_negatives.py)"
             + ("" if args.section == SECTION else f": {args.section}"), "",
             f"Command: `python bench/mine_negatives.py{options}`  ",
             f"Machine: {machine_description()}  ",
             f"Seeds: {list(args.seeds)}; SFT {args.steps} steps per arm, otherwise `recipes/tiny-cpu.yaml`; builtin "
             f"synthetic catalogue; direct mode, test split against its hard gallery"
             f"{'' if minutes != minutes else f'; total {minutes:.1f} minutes'}. "
             f"Mined: k = {runs[0]['k']} per pair (as given), margin {args.margin or 'off'}, by the in-batch model.", "",
             "| arm | " + " | ".join(f"{task} R@1" for task in TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
    for arm in ARMS:
        lines.append(f"| {arm} | " + " | ".join(fmt([run[arm][task] for run in runs]) for task in TASKS) + " |")
    lines.append("| recovered share of the given negatives' gain, per seed | "
                 + " | ".join(fmt([recovered(run, task) for run in runs]) for task in TASKS) + " |")
    removed = {name: statistics.fmean(run["mining"]["removed"][name] for run in runs)
               for name in runs[0]["mining"]["removed"]}
    lines += ["", "Candidates removed by each filter (mean over seeds): "
              + ", ".join(f"{name} {value:.0f}" for name, value in removed.items()) + ".", ""]
    for task in TASKS:
        lines.append(f"- {task}: {verdict(runs, task)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_seeds(args, "mine_negatives.json", args.section, run_seed, section)

if __name__ == "__main__":
    main()
