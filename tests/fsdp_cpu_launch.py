"""`bench/fsdp_check.py` under accelerate's FSDP on CPU, for `tests/test_fsdp_cpu.py` (not a test module itself).

accelerate runs FSDP on GPUs only: on a machine without one it picks the MULTI_CPU (DDP) backend and ignores the FSDP
config. torch's FSDP itself runs on CPU with gloo, so this launcher reports a GPU-style backend ("gloo",
MULTI_GPU) to accelerate and places everything on the CPU (`ACCELERATE_TORCH_DEVICE=cpu`); the rest of accelerate's
FSDP path (wrapping, mixed precision, upcasting, state dicts, checkpoints) runs unchanged. One process only: with two,
torch's FULL_STATE_DICT gather with `offload_to_cpu` crashes on CPU tensors (a CPU-only limitation).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")

import accelerate.state  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402


def _gpu_style_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


accelerate.state.PartialState._prepare_backend = _gpu_style_backend
script = Path(__file__).resolve().parents[1] / "bench" / "fsdp_check.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
