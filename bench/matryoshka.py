"""Does the Matryoshka loss keep retrieval at a quarter of the embedding size? (issue 17)

    python bench/matryoshka.py                    # seeds 0 1 2, SFT 150 steps per arm; writes bench/RESULTS.md
    python bench/matryoshka.py --quick --steps 6  # a smoke run: seed 0, into <out>/RESULTS.md

Per seed, two SFT runs of `recipes/tiny-cpu.yaml` (shortened to `--steps`, as bench/ablations.py) on the builtin
synthetic catalogue, identical but for the loss:

* `plain`: the shipped recipe (InfoNCE on the full 256-value embedding);
* `matryoshka`: `model.heads.matryoshka_dims: [128, 64, 32]` (InfoNCE averaged over the full size and each prefix).

Both are evaluated in direct mode on the test split against its hard gallery at every size, queries and gallery cut
to their first `d` values and renormalised (as `moon-rl embed --dim d` indexes them). The bar: R@1 at 64 values
within 0.05 of R@1 at 256 for the Matryoshka model; the plain model's same truncation is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ablations import spread
from results_md import RUNS, machine_description, run_seeds, seeded_parser, seeds_and_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

ROOT = Path(__file__).resolve().parents[1]
SECTION = "matryoshka"
TASKS = ("text->product", "image->product")
ARMS = ("plain", "matryoshka")
DIMS = (256, 128, 64, 32)
BAR = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = seeded_parser(__doc__, "matryoshka")
    parser.add_argument("--steps", type=int, default=150, help="SFT steps per arm (default 150, as the ablations)")
    return seeds_and_results(parser.parse_args(argv))


def train(out: Path, seed: int, steps: int, matryoshka: bool) -> Path:
    from moon_rl.recipe import load_recipe
    from moon_rl.training.sft import run_sft

    dims = [d for d in DIMS[1:]] if matryoshka else None
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [
        f"output_dir={out}", f"sft.max_steps={steps}", f"sft.seed={seed}", "sft.disable_tqdm=true",
        "sft.save_steps=100000", f"model.heads.matryoshka_dims={json.dumps(dims)}"])
    return run_sft(recipe, overwrite=True)


def recall_by_dim(model: Path) -> dict[str, dict[str, float]]:
    """{dim: {task: R@1}} of a model, direct mode, test split (the same catalogue the recipe trains on)."""
    from moon_rl.data.catalogue import load_catalogue, resolve_catalogue_path
    from moon_rl.evaluation.retrieval import evaluate_embedder
    from moon_rl.modeling.embedder import MoonEmbedder

    catalogue = load_catalogue(resolve_catalogue_path("builtin:synthetic"))
    result = evaluate_embedder(MoonEmbedder.load(model), catalogue, "test", ["direct"], [1], zero_shot=False,
                               dims=DIMS[1:])
    return {dim: {task: per_task[task]["recall@1"] for task in TASKS}
            for dim, per_task in (result.dims or {})["direct"].items()}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    folder = args.out / f"seed{seed}"
    return {"seed": seed, **{arm: recall_by_dim(train(folder / arm, seed, args.steps, arm == "matryoshka"))
                             for arm in ARMS}}


def verdict(runs: list[dict[str, Any]], task: str) -> str:
    full, small = str(DIMS[0]), "64"
    drops = {arm: [run[arm][full][task] - run[arm][small][task] for run in runs] for arm in ARMS}
    (m_drop, m_sd), (p_drop, p_sd) = spread(drops["matryoshka"]), spread(drops["plain"])
    return (f"R@1 lost from {full} to {small} values: Matryoshka {m_drop:.3f} ± {m_sd:.3f} (bar <= {BAR}: "
            f"{'PASS' if m_drop <= BAR else 'FAIL'}), plain {p_drop:.3f} ± {p_sd:.3f}")


def section(args: argparse.Namespace, runs: list[dict[str, Any]], minutes: float) -> str:
    def fmt(values: list[float]) -> str:
        mean, std = spread(values)
        return f"{mean:.3f} ± {std:.3f}"

    options = "".join(f" {flag} {value}" for flag, value, default in (
        ("--steps", args.steps, 150), ("--out", args.out, RUNS / "matryoshka")) if value != default)
    lines = ["## Matryoshka dimensions (bench/matryoshka.py)", "",
             f"Command: `python bench/matryoshka.py{options}`  ",
             f"Machine: {machine_description()}  ",
             f"Seeds: {list(args.seeds)}; SFT {args.steps} steps per arm, otherwise `recipes/tiny-cpu.yaml` (256-value "
             f"embedding); `matryoshka` adds `model.heads.matryoshka_dims: {list(DIMS[1:])}`. Direct mode, test split "
             "against its hard gallery; queries and gallery cut to the first `dim` values and renormalised"
             f"{'' if minutes != minutes else f'; total {minutes:.1f} minutes'}.", "",
             "| arm | dim | " + " | ".join(f"{task} R@1" for task in TASKS) + " |", "|---|---:|" + "---:|" * len(TASKS)]
    for arm in ARMS:
        for dim in DIMS:
            lines.append(f"| {arm} | {dim} | "
                         + " | ".join(fmt([run[arm][str(dim)][task] for run in runs]) for task in TASKS) + " |")
    lines.append("")
    lines += [f"- {task}: {verdict(runs, task)}" for task in TASKS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_seeds(args, "matryoshka.json", SECTION, run_seed, section)

if __name__ == "__main__":
    main()
