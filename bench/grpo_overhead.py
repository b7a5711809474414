"""Seconds per optimizer step of `MoonGRPOTrainer` against stock TRL `GRPOTrainer` on the same model and batch.

    python bench/grpo_overhead.py [--size tiny|small] [--steps 6] [--repeats 3] [--batch-size 16] [--generations 4]
                                  [--completion-length 32] [--threads N] [--profile]

Both sides train the same freshly built `builtin:tiny-vl` weights (the stock side loads its own copy from the same
builtin folder; both are reset to the initial weights before every repetition) on the same `grpo_dataset` rows of a
small synthetic catalogue, with the same processor, batch, group size, seed and `bf16=False`, `use_cpu=True`,
`beta=0`, no gradient checkpointing, no saving:

* moon-rl: `MoonGRPOTrainer` as `run_grpo` builds it (`build_grpo_trainer`) with the recipe's rewards (`tiny-cpu`:
  `retrieval_logprob` and `format`), which cost a no-grad embedding forward of every completion plus a direct-mode
  forward of the candidates (the generation batch's queries and their look-alike hard negatives; the query queue is
  filled in the first, discarded step), the heads (fusion, FIRE hooks, projection) and the InfoNCE term on the
  read-outs captured from the policy's own loss forward.
* stock: TRL `GRPOTrainer` with one constant reward function (`zero_reward`), i.e. generation + policy forward/backward
  and nothing else.

Every completion is forced to exactly `--completion-length` tokens (`generation_kwargs={"min_new_tokens": L}` on
both sides, `max_completion_length = L`), so generation costs the same whatever the weights sample.

A `TrainerCallback` times each optimizer step (`on_step_begin` -> `on_step_end`: generation, rewards, loss, backward,
optimizer); the first step of each run is a warm-up and is discarded. The sides alternate who goes first over
`--repeats` repetitions; each repetition is printed and the median ratio `moon_s_per_step / stock_s_per_step` comes
last. `--profile` also times the stages of each side's steps (generation, reward, loss, ...) with method wrappers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from moon_rl.data.catalogue import load_recipe_catalogue  # noqa: E402
from moon_rl.modeling.embedder import MoonEmbedder  # noqa: E402
from moon_rl.modeling.loading import load_backbone  # noqa: E402
from moon_rl.recipe import Recipe, load_recipe  # noqa: E402
from moon_rl.training import grpo as moon_grpo  # noqa: E402
from moon_rl.training.grpo import MoonGRPOTrainer, build_grpo_trainer, catalogue_images, grpo_dataset  # noqa: E402
from moon_rl.training.sft_data import sft_examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def zero_reward(completions: list, **kwargs: Any) -> list[float]:
    """The stock side's reward: constant, free."""
    return [0.0] * len(completions)


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step (`on_step_begin` -> `on_step_end`)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


class StageTimers:
    """Wraps methods of objects (on the instance or module) and sums the seconds spent in each, outermost call only
    per name (a recursive or re-entrant call is not counted twice)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._active: set[str] = set()
        self._undo: list[tuple[Any, str, Any, bool]] = []

    def wrap(self, owner: Any, attr: str, label: str | None = None) -> None:
        label = label or attr
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if label in self._active:
                return original(*args, **kwargs)
            self._active.add(label)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1
                self._active.discard(label)

        self._undo.append((owner, attr, original, attr in getattr(owner, "__dict__", {})))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original, was_own in reversed(self._undo):
            if was_own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)  # an instance wrapper over a class method: back to the class's
        self._undo.clear()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is discarded)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="per_device_train_batch_size")
    parser.add_argument("--generations", type=int, default=4, help="num_generations")
    parser.add_argument("--completion-length", type=int, default=32, help="max_completion_length (= min_new_tokens)")
    parser.add_argument("--n-products", type=int, default=96, help="synthetic catalogue size")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-cpu.yaml"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="also time each side's stages (one extra run each)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is a warm-up)")
    return args


def build(args: argparse.Namespace, out: Path) -> NS:
    """Recipe, catalogue, dataset, embedder, a second hook-free copy of the backbone, initial weights, rewards."""
    L = args.completion_length
    recipe = load_recipe(args.recipe, [
        f"output_dir={out}",
        "stages=[grpo]",
        f"model.builtin_size={args.size}",
        "model.lora=null",
        "model.dtype=float32",
        f"data.synthetic.n_products={args.n_products}",
        f"data.synthetic.image_size={args.image_size}",
        f"grpo.per_device_train_batch_size={args.batch_size}",
        f"grpo.num_generations={args.generations}",
        f"grpo.max_completion_length={L}",
        f"grpo.generation_kwargs={{min_new_tokens: {L}}}",
        f"grpo.max_steps={args.steps}",
        "grpo.logging_steps=100000",
        "grpo.save_strategy=no",
        "grpo.bf16=false",
        "grpo.use_cpu=true",
        "grpo.report_to=none",
        "grpo.beta=0.0",
        "grpo.gradient_checkpointing=false",
        "grpo.disable_tqdm=true",
    ])
    catalogue = load_recipe_catalogue(recipe.data)
    examples = sft_examples(catalogue, recipe.data.train_split, recipe.data.max_train_pairs)
    embedder = MoonEmbedder.from_recipe(recipe).train()
    stock_model, _ = load_backbone(recipe.model)  # same builtin folder: same weights, no hooks
    init_model = copy.deepcopy(embedder.model.state_dict())
    init_heads = copy.deepcopy(embedder.heads.state_dict())
    stock_state = stock_model.state_dict()
    assert all(torch.equal(init_model[k], stock_state[k]) for k in init_model), "stock copy differs from the embedder"
    images = catalogue_images(embedder, catalogue)
    # The same rows moon-rl trains on, with their images, as stock TRL needs them (moon-rl decodes each generation
    # batch's images itself, a cost it pays in `moon-rl grpo` too).
    dataset = grpo_dataset(embedder, catalogue, examples).map(lambda row: {"images": images(row["product_id"])})
    return NS(recipe=recipe, catalogue=catalogue, embedder=embedder, stock_model=stock_model, init_model=init_model,
              init_heads=init_heads, dataset=dataset, out=out)


def stock_config(recipe: Recipe, output_dir: Path) -> GRPOConfig:
    """A plain TRL `GRPOConfig` from the recipe's `grpo` section (its TRL fields only), same seed as moon-rl's."""
    trl_fields = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
    kwargs = {k: copy.deepcopy(v) for k, v in recipe.grpo.items() if k in trl_fields}
    kwargs.setdefault("seed", recipe.seed)
    return GRPOConfig(**{**kwargs, "output_dir": str(output_dir)})


def make_moon(b: NS, timer: StepTimer) -> MoonGRPOTrainer:
    b.embedder.model.load_state_dict(b.init_model)
    b.embedder.heads.load_state_dict(b.init_heads)
    b.embedder.train()
    # Exactly what `moon-rl grpo` trains (no preflight: the random-init model has never learnt to write a trace).
    return build_grpo_trainer(b.recipe, b.embedder, args=b.recipe.grpo_config(b.out / "moon"), catalogue=b.catalogue,
                              preflight=False, callbacks=[timer])


def make_stock(b: NS, timer: StepTimer) -> GRPOTrainer:
    b.stock_model.load_state_dict(b.init_model)
    b.stock_model.train()
    return GRPOTrainer(model=b.stock_model, reward_funcs=[zero_reward], args=stock_config(b.recipe, b.out / "stock"),
                       processing_class=b.embedder.processor, train_dataset=b.dataset, callbacks=[timer])


def seconds_per_step(make: Callable[[NS, StepTimer], Any], b: NS, stages: StageTimers | None = None) -> float:
    timer = StepTimer()
    trainer = make(b, timer)
    if stages is not None:
        instrument(trainer, stages)
    try:
        trainer.train()
    finally:
        if stages is not None:
            stages.restore()
    timed = timer.seconds[1:]  # the first step warms up allocator, kernels and lazy imports
    if not timed:
        raise RuntimeError(f"only {len(timer.seconds)} step(s) ran; raise --steps")
    return statistics.mean(timed)


def instrument(trainer: GRPOTrainer, stages: StageTimers) -> None:
    """Timers around the stages of a GRPO step (on the trainer instance; moon-rl's only where it has them)."""
    stages.wrap(trainer, "_generate_and_score_completions", "generate+score (total)")
    stages.wrap(trainer, "_generate", "  generation (sampling)")
    stages.wrap(trainer, "_calculate_rewards", "  rewards (total)")
    stages.wrap(trainer, "compute_loss", "compute_loss (total)")
    stages.wrap(trainer, "_compute_loss", "  TRL GRPO loss (policy forward)")
    stages.wrap(trainer, "_tokenize_prompts", "  _tokenize_prompts (all calls)")
    stages.wrap(trainer, "training_step", "training_step (gen + loss + backward)")
    if isinstance(trainer, MoonGRPOTrainer):
        stages.wrap(trainer, "_reward_forward", "    reward: completions + candidates forward")
        stages.wrap(trainer.candidate_pool, "build", "    reward: candidate pool (gather, queue)")
        stages.wrap(trainer, "_log_batch", "    reward: diagnostics (mrr, spread, chain accuracy)")
        stages.wrap(trainer, "completion_embeddings", "  loss: heads on captured read-outs")
        stages.wrap(trainer, "_queries", "  loss: the queries' forward")
        stages.wrap(trainer, "_contrastive", "  loss: InfoNCE term (pool, masks)")
        stages.wrap(moon_grpo, "matryoshka_info_nce", "  loss: InfoNCE")
        fire = trainer.embedder.heads.fire
        if fire is not None:
            stages.wrap(fire, "delta", "  FIRE delta (hooks, all forwards)")


def profile(b: NS) -> None:
    """One instrumented run of each side; seconds per step of each stage, warm-up step included (both alike)."""
    print(f"\nstage profile (one run each, {b.recipe.grpo['max_steps']} steps, s/step incl. the warm-up step):")
    results = {}
    for name, make in (("stock", make_stock), ("moon-rl", make_moon)):
        stages = StageTimers()
        per_step = seconds_per_step(make, b, stages)
        results[name] = (per_step, stages)
    steps = b.recipe.grpo["max_steps"]
    labels = list(dict.fromkeys([*results["moon-rl"][1].seconds, *results["stock"][1].seconds]))
    print(f"  {'stage':<44} {'stock':>9} {'moon-rl':>9} {'extra':>9}")
    for label in labels:
        s = results["stock"][1].seconds.get(label, 0.0) / steps
        m = results["moon-rl"][1].seconds.get(label, 0.0) / steps
        calls = results["moon-rl"][1].calls.get(label, 0) / steps
        print(f"  {label:<44} {s:9.3f} {m:9.3f} {m - s:+9.3f}   ({calls:.1f} calls/step moon-rl)")
    print(f"  {'s/step (timed steps, warm-up excluded)':<44} {results['stock'][0]:9.3f} {results['moon-rl'][0]:9.3f}")


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="moon-bench-grpo-"))
    b = build(args, out)
    params = sum(p.numel() for p in b.embedder.model.parameters())
    heads = sum(p.numel() for p in b.embedder.heads.parameters())
    print(f"builtin:tiny-vl size={args.size} params={params / 1e6:.2f}M (+{heads / 1e6:.2f}M heads) "
          f"batch={args.batch_size} generations={args.generations} completion_length={args.completion_length} "
          f"steps={args.steps} (first discarded) repeats={args.repeats} torch_threads={torch.get_num_threads()} "
          f"cpu_count={os.cpu_count()} torch={torch.__version__}")
    config = b.recipe.grpo_config(out / "probe")  # resolved: a recipe that names no rewards gets the defaults
    rewards = ", ".join(reward["name"] for reward in config.rewards)
    print(f"moon-rl: MoonGRPOTrainer ({rewards} rewards, look-alike candidates, heads, InfoNCE "
          f"weight={config.contrastive_weight}). stock: TRL GRPOTrainer + zero_reward. "
          f"Same weights, data ({len(b.dataset)} rows), processor, seed; every completion exactly "
          f"{args.completion_length} tokens.")
    ratios: list[float] = []
    for rep in range(args.repeats):
        # Alternate who goes first, so slow drift (thermal, other load) does not favour one side.
        if rep % 2 == 0:
            moon, stock = seconds_per_step(make_moon, b), seconds_per_step(make_stock, b)
        else:
            stock, moon = seconds_per_step(make_stock, b), seconds_per_step(make_moon, b)
        ratios.append(moon / stock)
        print(f"rep {rep + 1}: moon-rl {moon:7.3f} s/step  stock {stock:7.3f} s/step  ratio {ratios[-1]:.3f}", flush=True)
    if args.profile:
        profile(b)
    median = statistics.median(ratios)
    print(f"median ratio (moon-rl s/step / stock GRPOTrainer s/step) = {median:.3f}")
    return median


if __name__ == "__main__":
    main()
