"""GradCache: SFT at 256 pairs per step with the activation memory of a 32-pair step (issue 17)

    python bench/gradcache.py                       # memory probes + seed 0 of each arm; writes bench/RESULTS.md
    python bench/gradcache.py --quick --steps32 16  # a smoke run, into <out>/RESULTS.md

Memory: three short SFT runs of `recipes/tiny-cpu.yaml` (`--probe-steps` steps each, one fresh process each, the
prompt cache at its 1 MB minimum so that cached images do not count): 32 pairs per step in one forward, 256 pairs in
chunks of 32 (`sft.contrastive_chunk_size: 32`), and 256 pairs in one forward. Each reports the process's peak resident
memory during `trainer.train()` above what it held before (model, data and optimizer set up), sampled every 2 ms,
twice: with glibc's default heap, which keeps freed blocks resident, and with one that returns them
(`LIVE_MEMORY_ENV`), so that resident memory follows the live tensors, as a GPU's allocated memory does. The bar:
the chunked 256-pair step within 1.2x the 32-pair step's peak, on live memory.

Quality: per seed, two SFT runs seeing the same number of pairs: the shipped recipe (32 pairs x `--steps32` steps) and
256 pairs x `--steps32 / 8` steps in chunks of 32; reason- and direct-mode Recall@1 on the test split against its
hard gallery. There is no bar on quality: the table says what a bigger batch buys at the same number of pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ablations import spread
from results_md import RUNS, machine_description, run_seeds, seeded_parser, seeds_and_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

ROOT = Path(__file__).resolve().parents[1]
SECTION = "gradcache"
TASKS = ("text->product", "image->product")
MODES = ("reason", "direct")
SMALL, LARGE, CHUNK = 32, 256, 32
PROBES = ((SMALL, None), (LARGE, CHUNK), (LARGE, None))
BAR = 1.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = seeded_parser(__doc__, "gradcache", seeds=[0], seeds_help="quality seeds (default: 0)")
    parser.add_argument("--steps32", type=int, default=380,
                        help="steps of the 32-pair run (default 380, the recipe's); the 256-pair run takes 1/8")
    parser.add_argument("--probe-steps", type=int, default=3, help="SFT steps of each memory probe (default 3)")
    parser.add_argument("--probe", type=str, default=None, help=argparse.SUPPRESS)  # internal: "BATCH,CHUNK,OUT"
    return seeds_and_results(parser.parse_args(argv))


def recipe_for(out: Path, batch: int, chunk: int | None, steps: int, seed: int, *extra: str):
    from moon_rl.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [
        f"output_dir={out}", f"sft.per_device_train_batch_size={batch}", f"sft.max_steps={steps}",
        f"sft.contrastive_chunk_size={json.dumps(chunk)}", f"sft.seed={seed}", "sft.disable_tqdm=true",
        "sft.save_steps=100000", *extra])


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe(batch: int, chunk: int | None, steps: int, out: Path) -> dict[str, float]:
    """In this process: peak resident memory of `steps` SFT steps above the memory held before training."""
    import gc

    import torch

    from moon_rl.training.sft import build_sft_trainer

    torch.manual_seed(0)
    trainer = build_sft_trainer(recipe_for(out, batch, chunk, steps, 0, "data.prompt_cache_mb=1"))
    gc.collect()
    baseline = peak = resident_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"batch": batch, "chunk": chunk, "peak_mb": (peak - baseline) / 2**20, "seconds_per_step": seconds / steps}


#: glibc keeps freed memory in its heaps for reuse (its mmap threshold grows with the largest block freed), so a
#: process's resident memory follows what the allocator holds, not the tensors alive: after a chunk's forward without
#: gradient, its freed activations stay resident while the next forward allocates anew. With a fixed threshold, large
#: blocks are mapped and unmapped one by one and resident memory follows the live tensors.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_probe(args: argparse.Namespace, batch: int, chunk: int | None) -> dict[str, Any]:
    """`probe` in fresh processes (a process's memory high-water mark is its own): glibc's default heap and one that
    returns freed blocks (`LIVE_MEMORY_ENV`)."""
    runs: dict[str, dict[str, Any]] = {}
    for name, env in (("default", {}), ("live", LIVE_MEMORY_ENV)):
        subprocess.run([sys.executable, __file__, "--probe", f"{batch},{chunk or 0},{args.probe_steps}",
                        "--out", str(args.out)], check=True, cwd=ROOT, env={**os.environ, **env})
        runs[name] = json.loads((args.out / f"probe_{batch}_{chunk}.json").read_text())
    return {**runs["default"], "peak_mb_default": runs["default"]["peak_mb"], "peak_mb_live": runs["live"]["peak_mb"]}


def train_and_evaluate(out: Path, batch: int, chunk: int | None, steps: int, seed: int) -> dict[str, Any]:
    from moon_rl.data.catalogue import load_catalogue, resolve_catalogue_path
    from moon_rl.evaluation.retrieval import evaluate_embedder
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.training.sft import run_sft

    started = time.perf_counter()
    final = run_sft(recipe_for(out, batch, chunk, steps, seed), overwrite=True)
    seconds = time.perf_counter() - started
    catalogue = load_catalogue(resolve_catalogue_path("builtin:synthetic"))
    result = evaluate_embedder(MoonEmbedder.load(final), catalogue, "test", list(MODES), [1], zero_shot=False)
    return {"seconds": seconds, "steps": steps,
            **{f"{mode} {task}": result.recall_at_1(mode, task) for mode in MODES for task in TASKS}}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    if not args.probes:  # once per bench run, before the first seed
        args.probes = [run_probe(args, batch, chunk) for batch, chunk in PROBES]
    folder = args.out / f"seed{seed}"
    return {"seed": seed, "probes": args.probes,
            "small": train_and_evaluate(folder / "small", SMALL, None, args.steps32, seed),
            "large": train_and_evaluate(folder / "large", LARGE, CHUNK, max(1, args.steps32 * SMALL // LARGE), seed)}


def section(args: argparse.Namespace, runs: list[dict[str, Any]], minutes: float) -> str:
    def fmt(values: list[float]) -> str:
        mean, std = spread(values)
        return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"

    probes = runs[0]["probes"]
    options = "".join(f" {flag} {value}" for flag, value, default in (
        ("--seeds", " ".join(map(str, args.seeds)), "0"), ("--steps32", args.steps32, 380),
        ("--probe-steps", args.probe_steps, 3), ("--out", args.out, RUNS / "gradcache")) if value != default)
    lines = ["## GradCache: 256 pairs per step in the memory of 32 (bench/gradcache.py)", "",
             f"Command: `python bench/gradcache.py{options}`  ",
             f"Machine: {machine_description()}  ",
             f"`recipes/tiny-cpu.yaml`; memory: {args.probe_steps} SFT steps per configuration, each in a fresh process, "
             "peak resident memory during `trainer.train()` above the memory held before it (prompt cache at 1 MB)"
             f"{'' if minutes != minutes else f'; total {minutes:.1f} minutes'}.", "",
             "| pairs per step | contrastive_chunk_size | peak live memory above baseline (MB) | vs 32 pairs "
             "| peak with glibc's default heap (MB) | vs 32 pairs | s / step (default heap) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    base_live, base_default = probes[0]["peak_mb_live"], probes[0]["peak_mb_default"]
    for p in probes:
        lines.append(f"| {p['batch']} | {p['chunk'] or '–'} | {p['peak_mb_live']:.0f} | "
                     f"{p['peak_mb_live'] / base_live:.2f}x | {p['peak_mb_default']:.0f} | "
                     f"{p['peak_mb_default'] / base_default:.2f}x | {p['seconds_per_step']:.2f} |")
    ratio = probes[1]["peak_mb_live"] / base_live
    lines += ["", f"Bar: 256 pairs in chunks of 32 within {BAR}x the 32-pair step's peak live memory: {ratio:.2f}x, "
              f"**{'PASS' if ratio <= BAR else 'FAIL'}**. With glibc's default heap the chunked step's resident peak is "
              f"{probes[1]['peak_mb_default'] / base_default:.2f}x: the heap keeps each chunk's freed activations "
              "for reuse.", "",
              f"Quality (seeds {list(args.seeds)}): the same number of pairs seen, 32 x {args.steps32} steps against "
              f"256 x {max(1, args.steps32 * SMALL // LARGE)} steps (chunks of 32); test split, hard gallery, "
              "queries in direct mode.", "",
              "| run | " + " | ".join(f"{task} R@1 ({mode})" for mode in MODES for task in TASKS) + " | SFT seconds |",
              "|---|" + "---:|" * (len(MODES) * len(TASKS) + 1)]
    for arm, name in (("small", "32 pairs / step"), ("large", "256 pairs / step, chunks of 32")):
        cells = [fmt([run[arm][f"{mode} {task}"] for run in runs]) for mode in MODES for task in TASKS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt([run[arm]['seconds'] for run in runs])} |")
    lines += ["", "GradCache changes how many negatives a step sees, not how many steps train: at the same number of pairs "
              "the 256-pair run takes an eighth of the optimizer steps, at the recipe's learning rate and schedule "
              "(tuned for 32 pairs), and the table compares them as they are. Its cost per pair is the chunked "
              "step's seconds against 8 of the 32-pair steps above (one more forward without graph and one more "
              "collation per chunk). The seconds are wall times, not a timing benchmark: measure them on a quiet machine."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe:
        batch, chunk, steps = (int(v) for v in args.probe.split(","))
        found = probe(batch, chunk or None, steps, args.out / f"probe_{batch}_{chunk or None}")
        (args.out / f"probe_{batch}_{chunk or None}.json").write_text(json.dumps(found))
        return
    args.probes = None
    run_seeds(args, "gradcache.json", SECTION, run_seed, section)


if __name__ == "__main__":
    main()
