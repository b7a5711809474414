"""Helpers shared by the test modules (not a test module itself)."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_sft_recipe(run_dir: Path, *, max_steps: int, save_steps: int, batch_size: int = 8) -> str:
    """The head of a small end-to-end recipe: output folder, tiny model, 48-product catalogue, a short CPU SFT stage.

    Tests append their own `grpo`, `embed` and `eval` sections.
    """
    return (
        f"output_dir: {run_dir}\n"
        "model: {lora: null, heads: {embed_dim: 32}}\n"
        "data: {synthetic: {n_products: 48, seed: 3, image_size: 56}}\n"
        f"sft: {{bf16: false, use_cpu: true, report_to: none, per_device_train_batch_size: {batch_size}, "
        "learning_rate: 1.0e-3,\n"
        f"      max_steps: {max_steps}, logging_steps: 1, save_steps: {save_steps}, gradient_checkpointing: false, "
        "max_length: null,\n"
        "      dataloader_num_workers: 0, disable_tqdm: true}\n"
    )
