"""bench/grpo_overhead.py runs end to end at its smallest settings and ends with the median ratio line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grpo_overhead_bench_prints_a_ratio_last():
    cmd = [sys.executable, str(ROOT / "bench" / "grpo_overhead.py"), "--size", "tiny", "--steps", "2", "--repeats", "1",
           "--batch-size", "8", "--generations", "2", "--completion-length", "4", "--n-products", "48",
           "--image-size", "56"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"median ratio \(moon-rl s/step / stock GRPOTrainer s/step\) = (\d+\.\d{3})", last)
    assert match, last
    assert float(match.group(1)) > 0
