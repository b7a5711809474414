"""Shipped recipes and accelerate configs: `recipe validate --dry-run` passes for each, `moon-rl plan` sizes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moon_rl.cli import app
from moon_rl.plan import KNOWN_ARCHITECTURES, architecture, plan_recipe
from moon_rl.recipe import load_recipe
from moon_rl.recipe.trainer_configs import build_trainer_config

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
REAL = {name: ROOT / "recipes" / f"{name}.yaml" for name in ("qwen2.5-vl-3b", "qwen2.5-vl-7b-qlora", "qwen3-vl-2b")}


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def stage(name: str, overrides: tuple[str, ...] = (), **kwargs):
    """{stage: StagePlan} of a shipped real-model recipe."""
    _, plans = plan_recipe(load_recipe(REAL[name], list(overrides)), **kwargs)
    return {p.stage: p for p in plans}


def test_the_real_model_recipes_ship():
    assert set(REAL.values()) <= set(RECIPES)
    assert ROOT / "recipes" / "tiny-cpu.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_passes_the_dry_run(recipe):
    result = invoke("recipe", "validate", str(recipe), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "ok (dry run" in result.output
    assert "error:" not in result.output


def test_dry_run_reports_what_only_the_target_machine_can_tell_as_notes(tmp_path):
    missing = f"data.catalogue={tmp_path / 'nowhere'}"
    result = invoke("recipe", "validate", str(REAL["qwen2.5-vl-3b"]), "--dry-run", "--set", missing)
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "does not exist" in result.output
    # Without --dry-run this machine is the target: the missing catalogue is an error.
    assert invoke("recipe", "validate", str(REAL["qwen2.5-vl-3b"]), "--set", missing).exit_code == 2


def test_a_broken_generation_batch_fails_the_dry_run_in_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"extends: {REAL['qwen2.5-vl-3b']}\ngrpo:\n  num_generations: 3\n", encoding="utf-8")
    result = invoke("recipe", "validate", str(broken), "--dry-run")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert str(broken.name) in errors[0] and "not divisible by grpo.num_generations (3)" in errors[0]
    assert "Traceback" not in result.output


def test_bf16_recipes_are_built_as_for_the_gpu():
    # bf16 cannot be built on this CPU-only machine without the dry run's device-free build.
    recipe = load_recipe(REAL["qwen2.5-vl-3b"])
    problems, _ = recipe.dry_run()
    assert problems == []
    config = build_trainer_config(recipe, "grpo", device_checks=False)
    assert (config.bf16, config.use_vllm, config.vllm_mode) == (True, True, "colocate")
    assert config.generation_batch_size == 64


@pytest.mark.parametrize("name", sorted(REAL))
def test_plan_prints_a_table_per_real_recipe(name):
    result = invoke("plan", str(REAL[name]), "--gpus", "2")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "| GiB per device | sft | grpo |" in out
    for row in ("weights", "optimizer (AdamW)", "gradients", "activations, checkpointing", "vLLM share", "**total**"):
        assert f"| {row} |" in out, row
    assert KNOWN_ARCHITECTURES[load_recipe(REAL[name]).model.name_or_path].model_type in out


def test_the_recipe_table_quotes_what_plan_prints():
    """recipes/README.md's memory column is `moon-rl plan`'s totals (80 GB card unless the row names another)."""
    import re

    rows = {m.group(1): m for m in re.finditer(r"^\| \[`([\w.-]+)\.yaml`\].*\| ([\d.]+) / ([\d.]+) GiB(?: on a (\d+) GB card)?",
                                                 (ROOT / "recipes" / "README.md").read_text(), re.M)}
    assert set(rows) == set(REAL)
    for name, row in rows.items():
        plans = stage(name, gpu_memory_gib=float(row.group(4) or 80))
        assert (float(row.group(2)), float(row.group(3))) == (round(plans["sft"].total, 1), round(plans["grpo"].total, 1))


def test_parameter_counts_match_the_published_models():
    counts = {name: arch.params()[0] for name, arch in KNOWN_ARCHITECTURES.items()}
    assert counts["Qwen/Qwen2.5-VL-3B-Instruct"] == 3_754_622_976
    assert counts["Qwen/Qwen2.5-VL-7B-Instruct"] == 8_292_166_656
    assert counts["Qwen/Qwen3-VL-2B-Instruct"] == 2_127_532_032


def test_plausible_numbers():
    three = stage("qwen2.5-vl-3b")
    assert 6.0 < three["sft"].parts["weights"] < 8.0  # 3.75 B parameters in bf16
    assert 20e6 < three["sft"].trainable < 100e6  # LoRA r=16 (~30 M) + heads, not the whole model
    assert three["grpo"].parts["vLLM share"] == pytest.approx(0.3 * 80)
    assert three["grpo"].parts["generation KV cache"] == 0  # vLLM generates
    for plan in three.values():
        assert plan.parts["activations, checkpointing"] < plan.parts["activations, no checkpointing"]
    without = stage("qwen2.5-vl-3b", ("sft.gradient_checkpointing=false",))
    assert without["sft"].total > three["sft"].total + 50

    qlora = stage("qwen2.5-vl-7b-qlora")
    bf16 = stage("qwen2.5-vl-7b-qlora", ("model.quantization=null",))
    assert qlora["sft"].parts["weights"] < 0.6 * bf16["sft"].parts["weights"]
    assert 13.0 < bf16["sft"].parts["weights"] < 17.0
    assert qlora["grpo"].parts["vLLM share"] == 0 and qlora["grpo"].parts["generation KV cache"] > 0
    assert qlora["sft"].total < 80

    small = stage("qwen3-vl-2b")
    assert small["sft"].parts["weights"] < three["sft"].parts["weights"]


@pytest.mark.parametrize(("recipe", "overrides", "measured"), [
    # Peak CUDA bytes per token of a forward + backward over the decoder (random init, bf16, sdpa, LoRA r=16 on the
    # default targets, text tokens, no lm_head), on one H200 with transformers 5.17 / peft 0.21: (no checkpointing,
    # per layer; with checkpointing, all layers).
    ("qwen2.5-vl-3b", ("model.lora.dropout=0.0",), (187_096, 402_523)),
    ("qwen2.5-vl-3b", (), (211_387, 451_995)),
    ("qwen2.5-vl-7b-qlora", ("model.quantization=null", "model.lora.dropout=0.0"), (325_437, 643_211)),
    ("qwen2.5-vl-7b-qlora", ("model.quantization=null",), (368_283, 728_998)),
])
def test_activations_match_gpu_measurements(recipe, overrides, measured):
    sft = stage(recipe, overrides)["sft"]
    tokens, layers = sft.rows * sft.seq, KNOWN_ARCHITECTURES[load_recipe(REAL[recipe]).model.name_or_path].layers
    per_layer = sft.parts["activations, no checkpointing"] * 2**30 / tokens / layers
    checkpointed = sft.parts["activations, checkpointing"] * 2**30 / tokens
    assert per_layer == pytest.approx(measured[0], rel=0.06)
    assert checkpointed == pytest.approx(measured[1], rel=0.07)


def test_sharding_and_full_fine_tuning():
    ddp = stage("qwen2.5-vl-3b", ("model.lora=null",), gpus=4)
    zero2 = stage("qwen2.5-vl-3b", ("model.lora=null",), gpus=4, strategy="zero2")
    zero3 = stage("qwen2.5-vl-3b", ("model.lora=null",), gpus=4, strategy="zero3")
    assert ddp["sft"].trainable > 3e9
    assert zero2["sft"].parts["weights"] == ddp["sft"].parts["weights"]
    assert zero2["sft"].parts["gradients"] == pytest.approx(ddp["sft"].parts["gradients"] / 4)
    assert zero3["sft"].parts["weights"] == pytest.approx(ddp["sft"].parts["weights"] / 4)
    assert zero3["sft"].total < zero2["sft"].total < ddp["sft"].total


def test_unknown_models_and_strategies_are_one_line_errors(tmp_path):
    result = invoke("plan", str(REAL["qwen2.5-vl-3b"]), "--set", "model.name_or_path=acme/vl-9000")
    assert result.exit_code == 2
    assert "does not know the shape of 'acme/vl-9000'" in result.output and "config.json" in result.output
    assert "Traceback" not in result.output
    bad = invoke("plan", str(REAL["qwen2.5-vl-3b"]), "--strategy", "zero4")
    assert bad.exit_code == 2 and "zero4" in bad.output
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "hidden_size": 64}))
    partial = invoke("plan", str(REAL["qwen2.5-vl-3b"]), "--set", f"model.name_or_path={folder}")
    assert partial.exit_code == 2 and "missing intermediate_size" in partial.output


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl", "qwen2_vl"])
def test_a_local_config_json_is_sized_exactly(kind, tmp_path):
    """The formulas against transformers' own model, built on the meta device from a small config of each kind."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = {"vocab_size": 500, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    vision = {"depth": 3, "num_heads": 4, "patch_size": 14, "hidden_size": 64, "intermediate_size": 96,
              "out_hidden_size": 128}
    if kind == "qwen3_vl":
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 2])
    if kind == "qwen2_vl":
        vision = {"depth": 3, "num_heads": 4, "patch_size": 14, "embed_dim": 64, "mlp_ratio": 2, "hidden_size": 128}
    AutoConfig.for_model(kind, text_config=text, vision_config=vision).save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tmp_path))
    arch = architecture(load_recipe(REAL["qwen2.5-vl-3b"], [f"model.name_or_path={tmp_path}"]).model)
    total, vision_params, _ = arch.params()
    assert total == sum(p.numel() for p in model.parameters())
    assert vision_params == sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
    linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert linears == {name: (a, b) for name, a, b, _ in arch.linears()}  # LoRA regexes see the real names


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "recipes" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert (config.num_machines, config.num_processes, config.mixed_precision) == (1, 2, "bf16")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if name.startswith("zero"):
        assert raw["distributed_type"] == "DEEPSPEED" and raw["deepspeed_config"]["zero_stage"] == int(name[-1])
    if name == "fsdp":
        import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen

        for cls in raw["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","):
            assert hasattr(qwen, cls), cls
