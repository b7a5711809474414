"""GPU check: the builtin `small` model in bf16 on CUDA through SFT steps, GRPO steps and 4-bit QLoRA steps.

    bash bench/gpu_check.sh [--steps 6] [--parts sft,grpo,qlora]       # on a CUDA machine (installs .whl/ first)
    python bench/gpu_check.py --device cpu --steps 3                     # smoke test on a CPU (float32)

Each part builds a fresh `builtin:tiny-vl` (`model.builtin_size=small`, random init, built locally: no download) and
a small synthetic catalogue from `recipes/tiny-cpu.yaml` with `--set`-style overrides, then trains `--steps`
optimizer steps with the trainers `moon-rl sft` / `moon-rl grpo` use, constructed as `run_sft` / `run_grpo` construct
them (no checkpoints, no final save, no evaluation):

* `sft`: `MoonSFTTrainer`, full weights (`model.lora=null`, as `tiny-cpu`), bf16 weights and `sft.bf16=true`.
* `grpo`: `MoonGRPOTrainer` with transformers generation (`use_vllm=false`), full weights in bf16, rewards
  `retrieval_rank` + `format`, every completion forced to `--completion-length` tokens so steps cost the same.
* `qlora`: `MoonSFTTrainer` on a 4-bit NF4 base (`model.quantization={bits: 4}`, bf16 compute) with LoRA on the
  language model (`model.lora={r: 16}`). Prints `SKIPPED: bitsandbytes not installed` when bitsandbytes is missing.
* `fp16`: the `sft` part with float32 weights and fp16 autocast (`sft.fp16=true`): loss scaling, which the heads'
  own optimizer must undo. Fails unless the heads changed and stayed finite.
* `fsdp`: `bench/fsdp_check.py` under `accelerate launch --config_file recipes/accelerate/fsdp.yaml`, one process per
  GPU: SFT with checkpoints, kill-like interruption and resume, GRPO, LoRA (see that file). Not timed.
* `real3b`: `bench/real_size_check.py`: `recipes/qwen2.5-vl-3b.yaml` as a user runs it (LoRA, bf16, its pixel limits
  and batches, `run_sft` then `run_grpo` with transformers generation), 2 steps each, on a random-init model with
  Qwen2.5-VL-3B's shapes built locally; peak memory beside `moon-rl plan`'s estimate. In its own process.
* `annotate`: `moon-rl annotate --teacher` with the builtin model as the teacher (bf16 on the GPU): traces for 16
  synthetic products, a `--limit 8` trial then a resumed run; fails unless the counts add up. Not timed per step.

Each part prints seconds per optimizer step (a `TrainerCallback` from `on_step_begin` to `on_step_end`, CUDA
synchronised; the first step is a warm-up and is discarded), the peak CUDA memory (`torch.cuda.max_memory_allocated`),
the dtypes of the trainable parameters (backbone and heads) and the last logged loss. A part that raises prints
`FAILED: <part>: <exception>` and its traceback, and the next part runs; the exit code is 1 if any part failed (a
non-finite loss counts as a failure), 0 otherwise. `--device cpu` runs the same parts in float32 (`use_cpu=true`,
smaller batches); QLoRA runs there only when bitsandbytes imports (its CPU backend is slow).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

from transformers import TrainerCallback  # noqa: E402

PARTS = ("sft", "grpo", "qlora", "fp16", "fsdp", "real3b", "annotate")
#: Packages whose versions head the output (import name, shown name).
PACKAGES = (("transformers", "transformers"), ("trl", "trl"), ("peft", "peft"), ("accelerate", "accelerate"),
            ("datasets", "datasets"), ("bitsandbytes", "bitsandbytes"), ("pydantic", "pydantic"),
            ("tokenizers", "tokenizers"), ("huggingface_hub", "huggingface_hub"), ("pyarrow", "pyarrow"),
            ("numpy", "numpy"), ("torchvision", "torchvision"))


class Skipped(Exception):
    """A part that cannot run here (not a failure)."""


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step (`on_step_begin` -> `on_step_end`), CUDA synchronised at both ends."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)


class LossLog(TrainerCallback):
    """Every logged training `loss` (logging_steps=1: one per step)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


@dataclass
class Result:
    part: str
    status: str = "ok"  # ok | FAILED | SKIPPED
    seconds: list[float] = field(default_factory=list)
    peak_gib: float | None = None
    loss: float | None = None
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: bf16 on the first GPU (default); cpu: float32 smoke test")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per part (the first is discarded)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--size", choices=["tiny", "small"], default="small", help="builtin:tiny-vl size")
    parser.add_argument("--n-products", type=int, default=96, help="synthetic catalogue size")
    parser.add_argument("--sft-batch-size", type=int, default=None,
                        help="SFT/QLoRA pairs per step (default 16 on cuda, 4 on cpu)")
    parser.add_argument("--grpo-batch-size", type=int, default=None,
                        help="GRPO per_device_train_batch_size (default 16 on cuda, 8 on cpu)")
    parser.add_argument("--generations", type=int, default=None, help="GRPO num_generations (default 4 cuda, 2 cpu)")
    parser.add_argument("--completion-length", type=int, default=None,
                        help="GRPO max_completion_length = min_new_tokens (default 32 cuda, 12 cpu)")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "tiny-cpu.yaml"))
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is a warm-up)")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in args.parts if p not in PARTS]:
        parser.error(f"--parts: unknown {unknown}; choose from {PARTS}")
    cuda = args.device == "cuda"
    args.sft_batch_size = args.sft_batch_size or (16 if cuda else 4)
    args.grpo_batch_size = args.grpo_batch_size or (16 if cuda else 8)
    args.generations = args.generations or (4 if cuda else 2)
    args.completion_length = args.completion_length or (32 if cuda else 12)
    return args


def package_version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # missing or broken: say which
        text = " ".join(str(exc).split())
        return f"NOT IMPORTABLE ({type(exc).__name__}: {text[:120]})"
    where = Path(getattr(mod, "__file__", "") or "").parent
    return f"{getattr(mod, '__version__', '?')}  [{where}]"


def print_header(args: argparse.Namespace) -> None:
    print(f"python {platform.python_version()} ({sys.executable}) on {platform.machine()}, cpu_count={os.cpu_count()}")
    print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {torch.cuda.get_device_name(0)}, capability {props.major}.{props.minor}, "
              f"{props.total_memory / 2**30:.1f} GiB, bf16 supported: {torch.cuda.is_bf16_supported()}")
    for module, name in PACKAGES:
        print(f"  {name:<16} {package_version(module)}")
    print(f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')} MOON_RL_CACHE={os.environ.get('MOON_RL_CACHE')}")
    print(f"device={args.device} size={args.size} steps={args.steps} (first discarded) parts={','.join(args.parts)} "
          f"n_products={args.n_products} sft_batch={args.sft_batch_size} grpo_batch={args.grpo_batch_size} "
          f"generations={args.generations} completion_length={args.completion_length}", flush=True)


def overrides(args: argparse.Namespace, out: Path, section: str, extra: list[str]) -> list[str]:
    """`--set` overrides of `--recipe` for one part: the small model, a small catalogue, a short unsaved run."""
    cuda = args.device == "cuda"
    return [
        f"output_dir={out}",
        f"model.builtin_size={args.size}",
        f"model.dtype={'bfloat16' if cuda else 'float32'}",
        "model.lora=null",
        f"data.synthetic.n_products={args.n_products}",
        f"{section}.max_steps={args.steps}",
        f"{section}.bf16={'true' if cuda else 'false'}",
        f"{section}.use_cpu={'false' if cuda else 'true'}",
        f"{section}.report_to=none",
        f"{section}.logging_steps=1",
        f"{section}.save_strategy=no",
        f"{section}.disable_tqdm=true",
        f"{section}.gradient_checkpointing=false",
        f"{section}.warmup_steps=0",
        f"{section}.dataloader_num_workers=0",
        *extra,
    ]


def dtype_summary(module: torch.nn.Module, trainable: bool = True) -> str:
    """`dtype count` of the (trainable or frozen) parameters, e.g. `bfloat16 37.21M`."""
    counts: Counter[str] = Counter()
    for param in module.parameters():
        if param.requires_grad == trainable:
            counts[str(param.dtype).removeprefix("torch.")] += param.numel()
    return ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.most_common()) or "none"


def describe_model(part: str, embedder: Any) -> None:
    model = embedder.model
    first = next(model.parameters())
    four_bit = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    print(f"[{part}] model {type(model).__name__} on {first.device}; processor {type(embedder.processor).__name__}; "
          f"4-bit linears: {four_bit}")
    print(f"[{part}] trainable dtypes: backbone {dtype_summary(model)} | heads {dtype_summary(embedder.heads)}")
    print(f"[{part}] frozen dtypes:    backbone {dtype_summary(model, trainable=False)}", flush=True)


def train(part: str, trainer: Any, embedder: Any, timer: StepTimer, losses: LossLog, result: Result,
          setup_seconds: float) -> None:
    describe_model(part, embedder)
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    result.seconds = timer.seconds
    result.loss = losses.losses[-1] if losses.losses else None
    if torch.cuda.is_available():
        result.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    timed = timer.seconds[1:]
    if not timed:
        raise RuntimeError(f"only {len(timer.seconds)} step(s) ran; raise --steps")
    steps = ", ".join(f"{s:.3f}" for s in timer.seconds)
    print(f"[{part}] setup {setup_seconds:.1f} s, train() {total:.1f} s; step seconds: {steps}")
    print(f"[{part}] {statistics.mean(timed):.4f} s/step mean, {statistics.median(timed):.4f} median "
          f"(steps 2..{len(timer.seconds)}; first {timer.seconds[0]:.3f} s discarded)")
    peak = f"{result.peak_gib:.3f} GiB" if result.peak_gib is not None else "n/a (no CUDA)"
    print(f"[{part}] peak CUDA memory allocated: {peak}")
    loss_text = ", ".join(f"{x:.4f}" for x in losses.losses)
    print(f"[{part}] losses: {loss_text}; final loss {result.loss}", flush=True)
    if result.loss is None or not math.isfinite(result.loss):
        raise RuntimeError(f"final loss is {result.loss} (not a finite number)")


def run_sft_part(part: str, args: argparse.Namespace, out: Path, result: Result, quantized: bool = False,
                 fp16: bool = False) -> None:
    from moon_rl.recipe import load_recipe
    from moon_rl.training.sft import build_sft_trainer

    cuda = args.device == "cuda"
    extra = [f"sft.per_device_train_batch_size={args.sft_batch_size}"]
    if quantized:
        compute = "bfloat16" if cuda else "float32"
        extra += ["model.lora={r: 16, alpha: 32}", f"model.quantization={{bits: 4, compute_dtype: {compute}}}",
                  "sft.learning_rate=2.0e-4"]
    if fp16:
        extra += ["model.dtype=float32", "sft.bf16=false", "sft.fp16=true"]
    started = time.perf_counter()
    recipe = load_recipe(args.recipe, overrides(args, out, "sft", extra))
    cfg = recipe.sft_config(out / part)
    torch.manual_seed(cfg.seed)
    timer, losses = StepTimer(cuda), LossLog()
    trainer = build_sft_trainer(recipe, args=cfg, callbacks=[timer, losses])  # exactly what `moon-rl sft` trains
    embedder = trainer.embedder
    print(f"[{part}] {len(trainer.train_dataset)} training rows, {args.sft_batch_size} pairs/step "
          f"(+{cfg.hard_negatives} hard negative(s) each), trainer args bf16={cfg.bf16} fp16={cfg.fp16} "
          f"use_cpu={cfg.use_cpu}")
    heads_before = {n: p.detach().clone() for n, p in embedder.heads.named_parameters()}
    train(part, trainer, embedder, timer, losses, result, time.perf_counter() - started)
    moved = max(float((p.detach() - heads_before[n]).abs().max()) for n, p in embedder.heads.named_parameters())
    finite = all(bool(torch.isfinite(p).all()) for p in embedder.heads.parameters())
    print(f"[{part}] heads moved by max |delta| {moved:.3e}; finite: {finite}", flush=True)
    if not (finite and moved > 0):
        raise RuntimeError("the heads did not train (unchanged or not finite)")


def run_grpo_part(part: str, args: argparse.Namespace, out: Path, result: Result) -> None:
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.recipe import load_recipe
    from moon_rl.training.grpo import build_grpo_trainer

    cuda = args.device == "cuda"
    length = args.completion_length
    extra = [
        f"grpo.per_device_train_batch_size={args.grpo_batch_size}",
        f"grpo.num_generations={args.generations}",
        f"grpo.max_completion_length={length}",
        f"grpo.generation_kwargs={{min_new_tokens: {length}}}",
        "grpo.use_vllm=false",
        "grpo.beta=0.0",
        "grpo.rewards=[{name: retrieval_rank, weight: 1.0}, {name: format, weight: 0.2}]",
    ]
    started = time.perf_counter()
    recipe = load_recipe(args.recipe, overrides(args, out, "grpo", extra))
    cfg = recipe.grpo_config(out / part)
    embedder = MoonEmbedder.from_recipe(recipe).train()  # random init: no SFT model to start from here
    torch.manual_seed(cfg.seed)
    timer, losses = StepTimer(cuda), LossLog()
    # Exactly what `moon-rl grpo` trains; no preflight: this random-init model has never learnt to write a trace.
    trainer = build_grpo_trainer(recipe, embedder, args=cfg, preflight=False, callbacks=[timer, losses])
    print(f"[{part}] {len(trainer.train_dataset)} prompts, batch {args.grpo_batch_size}, {args.generations} generations, "
          f"{length} completion tokens, use_vllm={cfg.use_vllm}, trainer args bf16={cfg.bf16} use_cpu={cfg.use_cpu}")
    train(part, trainer, embedder, timer, losses, result, time.perf_counter() - started)


def run_qlora_part(part: str, args: argparse.Namespace, out: Path, result: Result) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise Skipped("bitsandbytes not installed") from exc
    except Exception as exc:  # installed but broken (e.g. no library for this CUDA): a failure, not a skip
        raise RuntimeError(f"bitsandbytes does not import: {exc}") from exc
    run_sft_part(part, args, out, result, quantized=True)


def run_fp16_part(part: str, args: argparse.Namespace, out: Path, result: Result) -> None:
    if args.device != "cuda":
        raise Skipped("fp16 autocast needs CUDA")
    run_sft_part(part, args, out, result, fp16=True)


def run_fsdp_part(part: str, args: argparse.Namespace, out: Path, result: Result) -> None:
    if args.device != "cuda":
        raise Skipped("accelerate runs FSDP on GPUs only")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", str(torch.cuda.device_count()),
           str(ROOT / "bench" / "fsdp_check.py"), "--out", str(out / part), "--size", args.size]
    print(" ".join(cmd), flush=True)
    started = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    result.note = f"{time.perf_counter() - started:.0f} s"
    if code != 0:
        raise RuntimeError(f"bench/fsdp_check.py exited with {code}")


def run_real3b_part(part: str, args: argparse.Namespace, out: Path, result: Result) -> None:
    if args.device != "cuda":
        raise Skipped("a 3B-parameter model needs the GPU (bench/real_size_check.py --device cpu shrinks it)")
    cmd = [sys.executable, str(ROOT / "bench" / "real_size_check.py"), "--out", str(out / part)]
    print(" ".join(cmd), flush=True)
    started = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT).returncode  # its own process: its peak memory is its own
    result.note = f"{time.perf_counter() - started:.0f} s; table above"
    if code != 0:
        raise RuntimeError(f"bench/real_size_check.py exited with {code}")


def run_annotate_part(part: str, args: argparse.Namespace, out: Path, result: Result) -> None:
    """`moon-rl annotate --teacher` on the device: the builtin model (bf16 on CUDA) writes traces for 16 products of
    the synthetic catalogue in two runs (a `--limit 8` trial, then the rest: resumed); the counts must add up."""
    from moon_rl.data.catalogue import load_recipe_catalogue
    from moon_rl.inference.annotate import Teacher, annotate_with_teacher
    from moon_rl.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides(args, out, "sft", []))
    catalogue = load_recipe_catalogue(recipe.data)
    catalogue.products = dict(list(catalogue.products.items())[:16])
    catalogue.pairs, catalogue.galleries = {}, {}
    started = time.perf_counter()
    teacher = Teacher(recipe.model.name_or_path, recipe.model)
    print(f"[{part}] teacher {type(teacher.model).__name__} on {teacher.model.device}, "
          f"{next(teacher.model.parameters()).dtype}", flush=True)
    kwargs = {"retrace": True, "batch_size": 8, "max_new_tokens": 24, "show_progress": False}
    first = annotate_with_teacher(catalogue, out / part, teacher, limit=8, **kwargs)
    second = annotate_with_teacher(catalogue, out / part, teacher, **kwargs)
    print(f"[{part}] trial: {first.summary().splitlines()[0]}\n[{part}] resumed: {second.summary().splitlines()[0]}")
    if torch.cuda.is_available():
        result.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    result.note = f"{time.perf_counter() - started:.0f} s; {second.annotated} annotated, {second.dropped} dropped"
    if (first.pending, second.resumed, second.annotated + second.dropped) != (8, 8, 16):
        raise RuntimeError(f"counts do not add up: trial {first.counts()}, resumed {second.counts()}")


def run_part(part: str, fn: Callable[..., None], args: argparse.Namespace, out: Path) -> Result:
    result = Result(part)
    print(f"\n===== {part} =====", flush=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        fn(part, args, out, result)
    except Skipped as exc:
        result.status, result.note = "SKIPPED", str(exc)
        print(f"SKIPPED: {part}: {exc}")
    except Exception as exc:
        result.status, result.note = "FAILED", f"{type(exc).__name__}: {exc}"
        print(f"FAILED: {part}: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        sys.stdout.flush()
        sys.stderr.flush()
    return result


def print_summary(results: list[Result]) -> None:
    print("\n===== summary =====")
    print(f"{'part':<8} {'status':<8} {'s/step':>9} {'peak GiB':>9} {'final loss':>11}  note")
    for r in results:
        timed = r.seconds[1:]
        per_step = f"{statistics.mean(timed):9.4f}" if timed else f"{'-':>9}"
        peak = f"{r.peak_gib:9.3f}" if r.peak_gib is not None else f"{'-':>9}"
        loss = f"{r.loss:11.4f}" if r.loss is not None else f"{'-':>11}"
        print(f"{r.part:<8} {r.status:<8} {per_step} {peak} {loss}  {r.note[:200]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_header(args)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("FAILED: setup: --device cuda but torch sees no CUDA device (use --device cpu for a smoke test)")
            return 1
        torch.cuda.set_device(0)
    out = Path(tempfile.mkdtemp(prefix="moon-gpu-check-"))
    parts = {"sft": run_sft_part, "grpo": run_grpo_part, "qlora": run_qlora_part, "fp16": run_fp16_part,
             "fsdp": run_fsdp_part, "real3b": run_real3b_part, "annotate": run_annotate_part}
    try:
        results = [run_part(part, parts[part], args, out) for part in args.parts]
    finally:
        shutil.rmtree(out, ignore_errors=True)  # trainer output folders only: nothing is saved
    print_summary(results)
    failed = [r.part for r in results if r.status == "FAILED"]
    print(f"\nFAILED parts: {', '.join(failed)}" if failed else "\nall parts passed (or were skipped)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
