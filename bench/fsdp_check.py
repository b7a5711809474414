"""FSDP check: `moon-rl sft` (with a kill-like interruption and `--resume`), then `moon-rl grpo`, under
`recipes/accelerate/fsdp.yaml`, on the builtin `small` model in bf16. Needs CUDA: accelerate runs FSDP on GPUs only
(`tests/fsdp_cpu_launch.py` works around that to run it on CPU in the test suite).

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 1 bench/fsdp_check.py --out DIR

`bench/gpu_check.sh --parts fsdp` runs it that way, with one process per visible GPU. It calls the stage functions
`moon-rl sft/grpo` call (`run_sft`, `run_grpo`) and checks, on the main process:

1. SFT, 4 steps, a checkpoint every 2: both checkpoints are complete (marker, heads, the heads' optimizer, FSDP's
   model and optimizer state); the final model and `metrics.json` are written.
2. Resume: the final model and checkpoint-4 are deleted, as if the run had been killed after checkpoint-2;
   `run_sft(resume=True)` finishes steps 3-4 and its heads match the straight run's.
3. GRPO from that SFT model, 2 steps: a complete checkpoint, the final model and `metrics.json`.
4. SFT with LoRA (r=8), 2 steps: the final adapter is written and reloads. Under FSDP on one process moon-rl refuses
   it at start-up instead (torch's NO_SHARD fallback cannot checkpoint frozen weights); the check expects that error.

Prints `PASS: <check>` or `FAILED: <check>: <why>` per check; exit code 1 if any failed. `--report FILE` also writes
the outcome as JSON (`checks`: name -> null or the error; `measured`: the numbers behind them), which the CPU test reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

import torch  # noqa: E402

MAIN = int(os.environ.get("RANK", "0")) == 0


CPU = False  # --device cpu: float32 weights, no bf16, use_cpu (see --help)


EXTRA: list[str] = []  # --set overrides, applied last

MEASURED: dict[str, object] = {}  # what the checks measured, for --report


class _UpcastCount(logging.Handler):
    """Records how many parameters moon-rl upcast to float32 under FSDP mixed precision (it does so only then)."""

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("FSDP mixed precision:"):
            MEASURED["fsdp_upcast_parameters"] = record.args[0]


def recipe_for(out: Path, size: str, extra: list[str]):
    from moon_rl.recipe import load_recipe

    sets = [
        f"output_dir={out}", f"model.builtin_size={size}", f"model.dtype={'float32' if CPU else 'bfloat16'}",
        "model.lora=null", "data.synthetic.n_products=48", "eval.modes=[direct]", "eval.baselines=[]",
    ]
    for stage in ("sft", "grpo"):
        sets += [f"{stage}.bf16={str(not CPU).lower()}", f"{stage}.use_cpu={str(CPU).lower()}",
                 f"{stage}.report_to=none", f"{stage}.logging_steps=1",
                 f"{stage}.save_steps=2", f"{stage}.disable_tqdm=true", f"{stage}.warmup_steps=0",
                 f"{stage}.gradient_checkpointing=false", f"{stage}.dataloader_num_workers=0"]
    sets += ["sft.max_steps=4", "sft.per_device_train_batch_size=8",
             "grpo.max_steps=2", "grpo.use_vllm=false", "grpo.per_device_train_batch_size=16",
             "grpo.num_generations=4", "grpo.max_completion_length=16", "grpo.beta=0.0",
             "grpo.allow_untrained_reasoning=true"]  # a 4-step SFT cannot reason yet
    return load_recipe(str(ROOT / "recipes" / "tiny-cpu.yaml"), [*sets, *extra, *EXTRA])


def check_checkpoint(folder: Path) -> None:
    from moon_rl.modeling.folder import HEADS_WEIGHTS
    from moon_rl.training.checkpoint import MARKER_FILE
    from moon_rl.training.heads_optimizer import HEADS_OPTIMIZER_FILE

    names = sorted(p.name for p in folder.iterdir())
    for name in (MARKER_FILE, HEADS_WEIGHTS, HEADS_OPTIMIZER_FILE, "scheduler.pt"):
        assert (folder / name).is_file(), f"{folder} lacks {name}: has {names}"
    assert any(n.startswith("optimizer") for n in names), f"{folder} has no optimizer state: {names}"
    print(f"  {folder.name}: {names}")


def sft_steps(out: Path) -> list[int]:
    history = json.loads((out / "log_history.json").read_text())
    return [e["step"] for e in history if "loss" in e]


def check_sft(args) -> None:
    from safetensors.torch import load_file

    from moon_rl.evaluation.report import evaluate_stage, read_results
    from moon_rl.modeling.folder import HEADS_WEIGHTS
    from moon_rl.training.sft import run_sft

    out = args.out / "run" / "sft"
    run_sft(recipe_for(args.out / "run", args.size, []))
    evaluate_stage(recipe_for(args.out / "run", args.size, []), "sft")  # as `moon-rl sft` does
    if MAIN:
        for step in (2, 4):
            check_checkpoint(out / f"checkpoint-{step}")
        assert (out / "final" / "moon_rl.json").is_file() and (out / "metrics.json").is_file()
        assert sft_steps(out) == [1, 2, 3, 4], sft_steps(out)
        r1 = read_results(out / "metrics.json")["trained"].recall_at_1("direct", "text->product")
        print(f"  SFT text->product R@1 {r1:.3f}")
        shutil.copy(out / "final" / "heads.safetensors", args.out / "straight_heads.safetensors")
        # As if killed after checkpoint-2 was written.
        shutil.rmtree(out / "final")
        shutil.rmtree(out / "checkpoint-4")
        (out / "log_history.json").unlink()
    barrier()
    run_sft(recipe_for(args.out / "run", args.size, []), resume=True)
    if MAIN:
        assert sft_steps(out) == [1, 2, 3, 4], sft_steps(out)
        resumed = load_file(str(out / "final" / "heads.safetensors"))
        straight = load_file(str(args.out / "straight_heads.safetensors"))
        at_2 = load_file(str(out / "checkpoint-2" / HEADS_WEIGHTS))
        diff = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
        moved = max(float((at_2[k] - straight[k]).abs().max()) for k in straight)
        print(f"  heads, resumed vs straight run: max |diff| {diff:.2e}; steps 3-4 moved them by {moved:.2e}")
        MEASURED.update(resume_max_diff=diff, resume_steps_moved=moved)
        # Exact on CPU; CUDA kernels (bf16 autocast, atomics) may differ in the last bits between two runs.
        assert diff < 0.02 * moved, "the resumed run's heads differ from the straight run's"


def check_grpo(args) -> None:
    from moon_rl.evaluation.report import evaluate_stage, read_results
    from moon_rl.training.grpo import run_grpo

    out = args.out / "run" / "grpo"
    run_grpo(recipe_for(args.out / "run", args.size, []))
    evaluate_stage(recipe_for(args.out / "run", args.size, []), "grpo")
    if MAIN:
        check_checkpoint(out / "checkpoint-2")
        metrics = read_results(out / "metrics.json")
        assert {"after GRPO", "before GRPO"} <= metrics.keys(), metrics.keys()
        print(f"  GRPO text->product R@1 {metrics['after GRPO'].recall_at_1('direct', 'text->product'):.3f}")


def check_lora(args) -> None:
    from moon_rl.errors import MoonError
    from moon_rl.modeling.embedder import MoonEmbedder
    from moon_rl.training.sft import run_sft

    out = args.out / "lora"
    recipe = recipe_for(out, args.size, ["model.lora={r: 8, alpha: 16}", "sft.max_steps=2"])
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process: FSDP's NO_SHARD fallback cannot checkpoint frozen weights; moon-rl refuses up front.
        try:
            run_sft(recipe)
        except MoonError as exc:
            print(f"  refused as expected: {exc}")
            MEASURED["lora_refusal"] = str(exc)
            assert "--num_processes >= 2" in str(exc)
            return
        raise AssertionError("LoRA under single-process FSDP was not refused")
    run_sft(recipe)
    if MAIN:
        check_checkpoint(out / "sft" / "checkpoint-2")
        final = out / "sft" / "final"
        assert (final / "adapter" / "adapter_model.safetensors").is_file(), sorted(p.name for p in final.iterdir())
        embedder = MoonEmbedder.load(final)
        lora = sum(p.numel() for n, p in embedder.model.named_parameters() if "lora_" in n)
        print(f"  adapter reloads: {lora} LoRA parameters")
        MEASURED["lora_parameters"] = lora
        assert lora > 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (written, not cleaned)")
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: float32 weights, no bf16 (run directly: the same checks without FSDP, a smoke test; "
                             "tests/fsdp_cpu_launch.py runs it under FSDP on CPU)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override applied after this script's own (repeatable)")
    parser.add_argument("--report", type=Path, help="also write the outcome as JSON here (main process)")
    args = parser.parse_args()
    EXTRA.extend(args.sets)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("moon_rl.training.common").setLevel(logging.INFO)  # shows the float32 upcast under FSDP
    logging.getLogger("moon_rl.training.common").addHandler(_UpcastCount())
    global CPU
    CPU = args.device == "cpu"
    outcome: dict[str, str | None] = {}
    for name, check in (("fsdp sft + resume", check_sft), ("fsdp grpo", check_grpo), ("fsdp lora", check_lora)):
        print(f"\n===== {name} =====", flush=True)
        try:
            check(args)
            outcome[name] = None
            if MAIN:
                print(f"PASS: {name}", flush=True)
        except Exception as exc:
            outcome[name] = f"{type(exc).__name__}: {exc}"
            print(f"FAILED: {name}: {outcome[name]}", flush=True)
            traceback.print_exc()
        barrier()
    if args.report and MAIN:
        args.report.write_text(json.dumps({"checks": outcome, "measured": MEASURED}, indent=2))
    return 1 if any(outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
