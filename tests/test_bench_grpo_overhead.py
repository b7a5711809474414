"""bench/grpo_overhead.py runs end to end at its smallest settings; its ratios are its own printed timings' ratios."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grpo_overhead_bench_prints_each_repetition_and_their_median_ratio_last():
    cmd = [sys.executable, str(ROOT / "bench" / "grpo_overhead.py"), "--size", "tiny", "--steps", "2", "--repeats", "3",
           "--batch-size", "8", "--generations", "2", "--completion-length", "4", "--n-products", "48",
           "--image-size", "56"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"median ratio \(moon-rl s/step / stock GRPOTrainer s/step\) = (\d+\.\d{3})", last)
    assert match, last
    reps = re.findall(r"^rep (\d+): moon-rl +([\d.]+) s/step +stock +([\d.]+) s/step +ratio ([\d.]+)$", result.stdout,
                      flags=re.M)
    assert [int(r[0]) for r in reps] == [1, 2, 3]
    for _, moon, stock, ratio in reps:  # each ratio is moon / stock of its own line, to the printed precision
        moon_s, stock_s = float(moon), float(stock)
        rounding = moon_s / stock_s * (5e-4 / moon_s + 5e-4 / stock_s) + 5e-4
        assert float(ratio) == pytest.approx(moon_s / stock_s, abs=rounding)
    # The median of the three, not the mean, the first or the last (the bench reports the median).
    assert float(match.group(1)) == pytest.approx(sorted(float(r[3]) for r in reps)[1], abs=1e-3)


@pytest.mark.slow
def test_grpo_overhead_profile_times_every_moon_rl_stage():
    """`--profile` wraps moon-rl's stages by name: a renamed method (the InfoNCE once) must fail here, not in a bench."""
    cmd = [sys.executable, str(ROOT / "bench" / "grpo_overhead.py"), "--size", "tiny", "--steps", "2", "--repeats", "1",
           "--batch-size", "8", "--generations", "2", "--completion-length", "4", "--n-products", "48",
           "--image-size", "56", "--profile"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("stage profile", 1)[1]
    for stage in ("reward: completions + candidates forward", "loss: heads on captured read-outs", "loss: InfoNCE",
                  "loss: the queries' forward", "TRL GRPO loss (policy forward)"):
        row = re.search(rf"^ +{re.escape(stage)} +([\d.]+) +([\d.]+) +[-+][\d.]+ +\(([\d.]+) calls/step moon-rl\)$",
                        table, flags=re.M)
        assert row, f"no profile row for {stage!r} in:\n{table}"
        assert float(row.group(3)) > 0, row.group(0)  # wrapped and called by moon-rl (its time may print as 0.000)
