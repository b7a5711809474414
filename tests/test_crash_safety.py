"""A real `moon-rl sft` run killed with SIGKILL mid-training resumes from its newest complete checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moon_rl.training.checkpoint import MARKER_FILE, latest_checkpoint
from tests.helpers import tiny_sft_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_finishes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        tiny_sft_recipe(tmp_path / "run", max_steps=40, save_steps=3) +
        "eval: {modes: [direct], baselines: []}\n"
    )
    out = tmp_path / "run" / "sft"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "sft", str(recipe)], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # Kill as soon as the second checkpoint is being written or done: mid-training, maybe mid-write.
        while time.monotonic() < deadline and not list(out.glob("checkpoint-6")):
            assert run.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == -signal.SIGKILL
    assert not (out / "final").exists()
    newest = latest_checkpoint(out)
    assert newest is not None and (newest / MARKER_FILE).is_file()  # a complete one survives, whatever was cut
    resumed_from = json.loads((newest / MARKER_FILE).read_text())["step"]
    assert resumed_from in (3, 6)

    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sft", str(recipe), "--resume"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {newest}" in result.stderr
    assert (out / "final" / "moon_rl.json").is_file()
    # The checkpoint's history (steps up to it) then the resumed steps, once each, to the end.
    steps = [e["step"] for e in json.loads((out / "log_history.json").read_text()) if "infonce" in e]
    assert steps == list(range(1, 41))


def test_heads_are_saved_atomically_under_the_model_folder_name_and_old_checkpoints_still_load(tmp_path: Path):
    import torch

    from moon_rl.modeling.folder import HEADS_WEIGHTS
    from moon_rl.training.checkpoint import load_heads, save_heads

    torch.manual_seed(0)
    heads = torch.nn.Linear(3, 2)
    save_heads(heads, tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [HEADS_WEIGHTS]  # no temporary file left
    fresh = torch.nn.Linear(3, 2)
    load_heads(fresh, tmp_path / "new")
    assert torch.equal(fresh.weight, heads.weight) and torch.equal(fresh.bias, heads.bias)
    (tmp_path / "new" / HEADS_WEIGHTS).rename(tmp_path / "new" / "moon_heads.safetensors")  # a checkpoint of before
    older = torch.nn.Linear(3, 2)
    load_heads(older, tmp_path / "new")
    assert torch.equal(older.weight, heads.weight)
    with pytest.raises(Exception, match="checkpoint has no heads.safetensors"):
        load_heads(older, tmp_path)
