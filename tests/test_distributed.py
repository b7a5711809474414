"""`moon-rl sft` and `moon-rl grpo` under `torchrun --nproc_per_node 2` on CPU (gloo): run, gather, write once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import TINY_GRPO, TINY_SFT, free_port, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def torchrun(cwd, verb: str, recipe) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "cli.py"), verb, str(recipe)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_sft_then_grpo_under_torchrun_with_two_processes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(
        tmp_path / "run", sft={**TINY_SFT, "per_device_train_batch_size": 4, "max_steps": 3, "save_steps": 2},
        grpo={**TINY_GRPO, "min_distinct_anchors": 8}, eval={}))
    result = torchrun(tmp_path, "sft", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    # Both processes run the command; only the main one reports: one progress line, one table, one result.
    assert result.stderr.count("SFT on ") == 1 and result.stdout.count("SFT model:") == 1
    assert result.stdout.count("| model | mode |") == 1
    out = tmp_path / "run" / "sft"
    assert (out / "final" / "moon_rl.json").is_file()
    assert (out / "checkpoint-2" / "moon_rl_checkpoint.json").is_file()
    history = json.loads((out / "log_history.json").read_text())
    steps = [entry for entry in history if "infonce" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]  # logged once, by the main process
    # Each process holds 4 pairs; InfoNCE's in-batch candidates are the gathered 8.
    assert all(entry["pairs/global"] == 8 for entry in steps)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "trained" in metrics["results"]

    # GRPO from that SFT model: the retrieval reward ranks every process's candidates, the log is written once. The
    # generation batch is global, as TRL counts it: 8 rows x 2 processes / 2 generations = 8 anchors (min 8).
    result = torchrun(tmp_path, "grpo", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run" / "grpo"
    assert (out / "final" / "moon_rl.json").is_file() and (out / "checkpoint-2" / "moon_rl_checkpoint.json").is_file()
    history = [e for e in json.loads((out / "log_history.json").read_text()) if "retrieval/candidates" in e]
    assert [entry["step"] for entry in history] == [1, 2]
    # Each process sampled its own anchors; the candidates it ranked against are the union over both processes.
    assert all(entry["retrieval/batch_candidates"] > entry["retrieval/local_candidates"] for entry in history)
    assert all(entry["retrieval/candidates"] > entry["retrieval/batch_candidates"] for entry in history)  # + queue
    assert "after GRPO" in json.loads((out / "metrics.json").read_text())["results"]


@pytest.mark.slow
def test_grad_cache_under_torchrun_trains_as_the_whole_batch(tmp_path):
    """GradCache under DDP with gathered in-batch negatives: 2 processes x 4 pairs, chunks of 2 pairs (the first
    chunk's backward without gradient sync, the contrastive gradient over all 8 pairs), trains the same 3 steps as
    the unchunked run: the logged losses and gradient norms of every step agree (the norms are logged before
    clipping: a gradient scaled wrongly shows there first; the losses of steps 2-3 check the updates). And both train
    as ONE process with the same 8 pairs per step: the same losses, gradient norms and final heads (a gather that
    dropped the other process's pairs, or a loss averaged twice, shows here).

    Adam's epsilon is 1e-3 here: some heads' gradients are zero up to rounding (attention's key bias, which softmax
    ignores; query biases over near-identical keys), and with the default 1e-8 Adam turns that rounding noise, which
    differs between 1 and 2 processes and between CPUs, into full-size steps of either sign. A large epsilon keeps
    such steps as small as their gradients and leaves the real ones (norms 1-15 here) normalised."""
    histories = []
    for chunk, processes in ((None, 2), (2, 2), (None, 1)):
        name = f"run{chunk}-{processes}"
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(tiny_recipe(
            tmp_path / name, sft={**TINY_SFT, "per_device_train_batch_size": 8 // processes, "max_steps": 3,
                                  "save_steps": 3, "contrastive_chunk_size": chunk, "lr_scheduler_type": "constant",
                                  "adam_epsilon": 1.0e-3},
            eval={}))
        if processes == 2:
            result = torchrun(tmp_path, "sft", recipe)
        else:
            result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sft", str(recipe)], capture_output=True,
                                    text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        history = json.loads((tmp_path / name / "sft" / "log_history.json").read_text())
        histories.append([entry for entry in history if "infonce" in entry])
    plain, chunked, single = histories
    for a, b in zip(single, plain, strict=True):
        assert b["pairs/global"] == a["pairs/global"] == 8
        for key in ("loss", "lm_loss", "infonce", "grad_norm", "heads_grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), ("1 vs 2 processes", a["step"], key)
    heads = [load_file(tmp_path / name / "sft" / "final" / "heads.safetensors") for name in ("runNone-1", "runNone-2")]
    assert heads[0].keys() == heads[1].keys()
    for key in heads[0]:
        torch.testing.assert_close(heads[1][key], heads[0][key], rtol=1e-4, atol=1e-6, msg=key)
    assert [e["step"] for e in chunked] == [1, 2, 3] and all(e["grad_cache/chunks"] == 2 for e in chunked)
    assert all(e["pairs/global"] == 8 for e in chunked)
    for a, b in zip(plain, chunked, strict=True):
        for key in ("loss", "lm_loss", "infonce", "grad_norm", "heads_grad_norm"):  # grad norms: before clipping
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["step"], key)
