"""`recipes/accelerate/fsdp.yaml` end to end on CPU: SFT checkpoints, kill-like resume, GRPO, LoRA refusal.

Runs `bench/fsdp_check.py` (the GPU check's FSDP part) through `tests/fsdp_cpu_launch.py`, which lets accelerate's
FSDP path run on CPU, with a bf16-loaded model and bf16 mixed precision as on a GPU. It guards the fixes this path
needed: the heads' optimizer outside FSDP's optimizer checkpoint, the float32 upcast before a resume loads state,
autocast for GRPO's direct model calls, the gathered final save, and the single-process LoRA refusal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fsdp_sft_resume_grpo_and_lora_refusal_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
           "--main_process_port", str(free_port()), "--mixed_precision", "bf16",
           # Both need a GPU device in accelerate (rank 0 loads, the others receive); one process has no others.
           "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false",
           str(ROOT / "tests" / "fsdp_cpu_launch.py"), "--out", str(tmp_path), "--size", "tiny", "--device", "cpu",
           "--report", str(tmp_path / "report.json"),
           "--set", "sft.use_cpu=false", "--set", "grpo.use_cpu=false", "--set", "model.dtype=bfloat16"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checks"] == {"fsdp sft + resume": None, "fsdp grpo": None, "fsdp lora": None}, log[-4000:]
    measured = report["measured"]
    # FSDP with mixed precision really ran (moon-rl upcasts the bf16-loaded trainable weights only then) ...
    assert measured["fsdp_upcast_parameters"] > 0
    # ... the resume was exact on CPU, and steps 3-4 did move the heads (else "exact" would be trivial) ...
    assert measured["resume_max_diff"] == 0.0 and measured["resume_steps_moved"] > 1e-4
    # ... and single-process FSDP refused LoRA up front, saying what to do.
    assert "--num_processes >= 2" in measured["lora_refusal"]
    checkpoint = tmp_path / "run" / "sft" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp.bin").is_file() and (checkpoint / "optimizer.bin").is_file()
