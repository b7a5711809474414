"""A real `moon-rl sft` run killed with SIGKILL mid-training resumes from its newest complete checkpoint and ends with the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moon_rl.training.checkpoint import MARKER_FILE, latest_checkpoint
from tests.helpers import TINY_SFT, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_finishes_with_the_uninterrupted_weights(tmp_path):
    """SIGKILL mid-training (maybe mid-write), then `--resume`: the run ends with the weights an uninterrupted run ends
    with (backbone and heads), whichever checkpoint survived. A half-written newer checkpoint (files without the
    completion marker, as a kill during a save leaves them) is planted before resuming, so the skip of an unfinished
    checkpoint is tested whatever the kill's timing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def recipe_for(name: str) -> Path:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(tiny_recipe(tmp_path / name, sft={**TINY_SFT, "max_steps": 20, "save_steps": 3}, eval={}))
        return recipe

    reference = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sft", str(recipe_for("straight"))],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    recipe = recipe_for("run")
    out = tmp_path / "run" / "sft"
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
    assert json.loads((newest / MARKER_FILE).read_text())["step"] in (3, 6)
    partial = out / "checkpoint-9"  # newer than any finished one, cut mid-save: weights half written, no marker
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(newest, partial)
    (partial / MARKER_FILE).unlink()
    weights = partial / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert latest_checkpoint(out) == newest

    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sft", str(recipe), "--resume"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {newest}" in result.stderr
    # The checkpoint's history (steps up to it) then the resumed steps, once each, to the end.
    steps = [e["step"] for e in json.loads((out / "log_history.json").read_text()) if "infonce" in e]
    assert steps == list(range(1, 21))
    for part in ("model/model.safetensors", "heads.safetensors"):
        resumed, straight = load_file(out / "final" / part), load_file(tmp_path / "straight" / "sft" / "final" / part)
        assert resumed.keys() == straight.keys()
        for key in straight:
            torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6, msg=f"{part}: {key}")


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
