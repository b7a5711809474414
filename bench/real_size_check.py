"""A user's first real-model run, at real size without the real weights: SFT and GRPO steps of a shipped recipe on a
random-init model with a real model's shapes, peak memory beside `moon-rl plan`'s estimate.

    python bench/real_size_check.py                                   # Qwen2.5-VL-3B shapes, recipes/qwen2.5-vl-3b.yaml
    bash bench/gpu_check.sh --parts real3b                            # the same, as a part of the GPU check
    python bench/real_size_check.py --device cpu --arch builtin:tiny-vl/small --steps 2 --completion-length 8 \\
        --set sft.per_device_train_batch_size=2 --set grpo.per_device_train_batch_size=4 \\
        --set grpo.gradient_accumulation_steps=2 --set grpo.num_generations=2     # CPU smoke test of the script

The model folder is built locally (no download): the `--arch` shapes from `moon_rl.plan.KNOWN_ARCHITECTURES`
(`--layers` / `--vision-depth` shorten it for a smoke test), random weights in the recipe's dtype, and the builtin
model's tokenizer and chat template with an image processor at Qwen2.5-VL's *default* pixel range (3136 to 12845056),
as a downloaded model folder has. The recipe then runs as a user runs it, through `run_sft` and `run_grpo` (LoRA, bf16,
its image pixel limits, its batch sizes, gradient checkpointing), on a synthetic catalogue of `--n-products`, for
`--steps` optimizer steps each, with transformers generation (`grpo.use_vllm=false`; every completion forced to
`--completion-length` tokens) and without evaluation. For each stage it prints the wall seconds, the peak CUDA memory
(`torch.cuda.max_memory_allocated`, reset before the stage) and `moon-rl plan`'s estimate for the same recipe on one
device. Exit code 1 if a stage failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

#: Qwen2.5-VL's own image processor range (preprocessor_config.json of the released models).
MODEL_DEFAULT_PIXELS = (3136, 12845056)
STAGES = ("sft", "grpo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="Qwen/Qwen2.5-VL-3B-Instruct", help="a key of plan.KNOWN_ARCHITECTURES")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "qwen2.5-vl-3b.yaml")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--layers", type=int, default=None, help="text decoder layers (default: the architecture's)")
    parser.add_argument("--vision-depth", type=int, default=None, help="vision blocks (default: the architecture's)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of each stage")
    parser.add_argument("--completion-length", type=int, default=None,
                        help="GRPO completion tokens, forced (default: the recipe's max_completion_length)")
    parser.add_argument("--n-products", type=int, default=64, help="synthetic catalogue size")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more recipe overrides, k=v")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    return parser.parse_args(argv)


def build_model_folder(folder: Path, arch_key: str, *, dtype: torch.dtype, device: str, layers: int | None = None,
                       vision_depth: int | None = None) -> Path:
    """A random-init Qwen2.5-VL model folder with `arch_key`'s shapes, the builtin tokenizer and a default-range
    image processor."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from moon_rl.modeling.loading import load_processor
    from moon_rl.modeling.tiny import SPECIAL_TOKENS, builtin_model_dir
    from moon_rl.plan import KNOWN_ARCHITECTURES

    arch = KNOWN_ARCHITECTURES[arch_key]
    if arch.model_type != "qwen2_5_vl":
        raise SystemExit(f"--arch {arch_key}: only Qwen2.5-VL shapes are built here (got {arch.model_type})")
    processor = load_processor(builtin_model_dir(size="tiny"), min_pixels=MODEL_DEFAULT_PIXELS[0],
                               max_pixels=MODEL_DEFAULT_PIXELS[1])
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    depth = vision_depth or arch.vision_depth
    half = arch.head_dim // 2  # mrope sections (temporal, height, width) sum to head_dim / 2, as Qwen2.5-VL's 16/24/24
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.intermediate,
            num_hidden_layers=layers or arch.layers, num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
            max_position_embeddings=32768, tie_word_embeddings=arch.tied,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(
            depth=depth, hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
            num_heads=16 if arch.vision_hidden % 16 == 0 else 1, patch_size=arch.patch, spatial_merge_size=arch.merge,
            temporal_patch_size=2, window_size=112, out_hidden_size=arch.hidden,
            fullatt_block_indexes=[i for i in range(depth) if i % 8 == 7] or [depth - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=arch.tied,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    return folder


def recipe_overrides(args: argparse.Namespace, folder: Path, out: Path) -> list[str]:
    cuda = args.device == "cuda"
    extra = [
        f"output_dir={out / 'run'}", f"model.name_or_path={folder}",
        f"model.dtype={'bfloat16' if cuda else 'float32'}", "data.catalogue=builtin:synthetic",
        f"data.synthetic.n_products={args.n_products}", "grpo.use_vllm=false", "grpo.allow_untrained_reasoning=true",
        "embed.generation_backend=hf",
    ]
    for stage in STAGES:
        extra += [f"{stage}.max_steps={args.steps}", f"{stage}.save_strategy=no", f"{stage}.logging_steps=1",
                  f"{stage}.report_to=none", f"{stage}.disable_tqdm=true"]
        if not cuda:
            extra += [f"{stage}.bf16=false", f"{stage}.use_cpu=true"]
    if args.completion_length:
        extra += [f"grpo.max_completion_length={args.completion_length}"]
    return [*extra, *args.overrides]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("FAILED: --device cuda but torch sees no CUDA device (use --device cpu for a smoke test)")
        return 1
    from moon_rl.plan import plan_recipe
    from moon_rl.recipe import load_recipe
    from moon_rl.training.config_checks import config_value
    from moon_rl.training.grpo import run_grpo
    from moon_rl.training.sft import run_sft

    work = args.out or Path(tempfile.mkdtemp(prefix="moon-real-size-"))
    started = time.perf_counter()
    folder = build_model_folder(work / "model", args.arch, dtype=torch.bfloat16 if cuda else torch.float32,
                                device="cuda" if cuda else "cpu", layers=args.layers, vision_depth=args.vision_depth)
    print(f"built {args.arch} (random init, layers {args.layers or 'all'}, vision depth {args.vision_depth or 'all'}) "
          f"in {time.perf_counter() - started:.0f} s: {folder}", flush=True)
    recipe = load_recipe(args.recipe, recipe_overrides(args, folder, work))
    length = config_value("grpo", recipe.grpo, "max_completion_length")  # forced: every step costs the same
    recipe = load_recipe(args.recipe, [*recipe_overrides(args, folder, work),
                                       f"grpo.generation_kwargs={{min_new_tokens: {length}}}"])
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 80.0
    _, plans = plan_recipe(recipe, gpus=1, gpu_memory_gib=total)
    planned = {plan.stage: plan for plan in plans}
    rows, failed = [], []
    for stage, run in (("sft", run_sft), ("grpo", run_grpo)):
        print(f"\n===== {stage} =====", flush=True)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        try:
            run(recipe, overwrite=True)
            status = "ok"
        except Exception as exc:  # report and go on: the next stage starts from the base model
            status = f"FAILED: {type(exc).__name__}: {exc}"
            failed.append(stage)
            traceback.print_exc()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        rows.append(SimpleNamespace(stage=stage, status=status, seconds=time.perf_counter() - began, peak=peak,
                                    plan=planned[stage].total, rows=planned[stage].rows, seq=planned[stage].seq))
    print("\n===== real-size check: peak memory against moon-rl plan (one device) =====")
    print("| stage | status | seconds | peak GiB (measured) | plan GiB | measured / plan | plan micro batch x seq |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        peak = f"{row.peak:.2f}" if row.peak is not None else "n/a (CPU)"
        ratio = f"{row.peak / row.plan:.2f}" if row.peak is not None else "–"
        print(f"| {row.stage} | {row.status[:80]} | {row.seconds:.0f} | {peak} | {row.plan:.2f} | {ratio} | "
              f"{row.rows} x {row.seq} |")
    summary = {"arch": args.arch, "layers": args.layers, "vision_depth": args.vision_depth, "device": args.device,
               "stages": [vars(row) for row in rows]}
    print("json: " + json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
